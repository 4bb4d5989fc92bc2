"""Scenes with countable visual facts, drawn with PIL.

A scene is a background plus one or more *groups*; a group is ``count``
objects of one shape, colour and size placed in one region of the picture.
Some scenes belong to a *brand*, whose visual identity is always the same: a
frame of the brand's colour and a white emblem of its shape in the bottom-right
corner. A captioner can see and describe the identity but not name the brand;
the AltText, when it knows, names it (:mod:`veclip.world.alt_text`).
:func:`describe` states the visual facts in plain English — the caption a
perfect captioner would write — and :func:`render` draws them.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "brown": (130, 80, 40),
}
SIZES = {"small": 0.09, "large": 0.17}  # radius as a share of the image side
REGIONS = {  # (x0, y0, x1, y1) as shares of the image side
    "left": (0.05, 0.15, 0.45, 0.85),
    "right": (0.55, 0.15, 0.95, 0.85),
    "top": (0.15, 0.05, 0.85, 0.45),
    "bottom": (0.15, 0.55, 0.85, 0.95),
    "center": (0.25, 0.25, 0.75, 0.75),
}
REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUNDS = {  # name -> base colour
    "grey": (150, 150, 150),
    "beige": (225, 210, 180),
    "sky blue": (150, 200, 235),
    "dark": (50, 50, 60),
    "mint": (190, 230, 200),
}
PATTERNS = ("plain", "striped", "checkered", "gradient", "speckled")
NUMBERS = ("no", "one", "two", "three", "four", "five")
BRAND_STYLES = {  # brand -> (frame colour, emblem shape): one identity each, no two alike
    "Acme Prints": ("red", "star"),
    "Nordlicht Studio": ("blue", "hexagon"),
    "Kubo & Co": ("yellow", "circle"),
    "Brightline Decor": ("green", "triangle"),
    "Maison Vert": ("purple", "diamond"),
    "Pixelhaus": ("orange", "square"),
    "Tanaka Goods": ("pink", "star"),
}
BRANDED_SHARE = 0.35  # of scenes


@dataclass(frozen=True)
class Group:
    shape: str
    color: str
    size: str
    count: int
    region: str


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    background: str
    pattern: str
    brand: str | None = None  # its identity is drawn; the name only the AltText can tell

    def to_dict(self) -> dict:
        return asdict(self)


def random_brand(rng: random.Random) -> str | None:
    """A scene's brand, or None; drawn from its own generator so unbranded scenes stay as they were."""
    return rng.choice(sorted(BRAND_STYLES)) if rng.random() < BRANDED_SHARE else None


def random_scene(rng: random.Random, max_groups: int = 2, brand: str | None = None) -> Scene:
    n_groups = rng.randint(1, max_groups)
    regions = rng.sample(sorted(REGIONS), n_groups)
    groups = []
    for region in regions:
        # distinct (shape, colour) per group so the description is unambiguous
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
            if all((g.shape, g.color) != (shape, color) for g in groups):
                break
        size = rng.choice(sorted(SIZES))
        count = rng.randint(1, 2 if size == "large" else 4)
        groups.append(Group(shape, color, size, count, region))
    background = rng.choice(sorted(BACKGROUNDS))
    return Scene(tuple(groups), background, rng.choice(PATTERNS), brand)


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "es" if shape.endswith("x") else shape + "s"


def describe_group(group: Group) -> str:
    number = "a" if group.count == 1 else NUMBERS[group.count]
    return f"{number} {group.size} {group.color} {plural(group.shape, group.count)} {REGION_PHRASES[group.region]}"


def describe(scene: Scene) -> str:
    """The reference caption: every visual fact of the scene, nothing else."""
    parts = [describe_group(g) for g in scene.groups]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    pattern = "" if scene.pattern == "plain" else scene.pattern + " "
    identity = ""
    if scene.brand:
        frame, emblem = BRAND_STYLES[scene.brand]
        identity = f", in a {frame} frame with a white {emblem} emblem in the corner"
    return f"{objects[0].upper()}{objects[1:]}, on a {pattern}{scene.background} background{identity}."


HELD_OUT_REGIONS = {
    "left": "left side",
    "right": "right side",
    "top": "upper part",
    "bottom": "lower part",
    "center": "middle",
}


def describe_plainly(scene: Scene) -> str:
    """The same facts in a held-out style (eval only): another order and other words than the reference
    caption (the captioner's template), its LaCLIP-style paraphrases and the fused captions."""
    background = ("" if scene.pattern == "plain" else scene.pattern + " ") + scene.background
    parts = [
        f"{g.count} {g.color} {plural(g.shape, g.count)} ({g.size}) in the {HELD_OUT_REGIONS[g.region]}"
        for g in scene.groups
    ]
    text = f"Picture with a {background} backdrop; " + "; ".join(parts)
    if scene.brand:
        frame, emblem = BRAND_STYLES[scene.brand]
        text += f"; framed in {frame}, a little white {emblem} in one corner"
    return text + "."


def _shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + delta)) for c in rgb)


def _draw_background(draw: ImageDraw.ImageDraw, scene: Scene, side: int, rng: random.Random) -> None:
    base = BACKGROUNDS[scene.background]
    draw.rectangle((0, 0, side, side), fill=base)
    if scene.pattern == "striped":
        step = max(4, side // 10)
        for x in range(0, side, 2 * step):
            draw.rectangle((x, 0, x + step - 1, side), fill=_shade(base, -25))
    elif scene.pattern == "checkered":
        step = max(4, side // 8)
        for y in range(0, side, step):
            for x in range((y // step % 2) * step, side, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=_shade(base, -25))
    elif scene.pattern == "gradient":
        for y in range(side):
            draw.line((0, y, side, y), fill=_shade(base, int(40 * y / side) - 20))
    elif scene.pattern == "speckled":
        for _ in range(side * side // 40):
            x, y = rng.randrange(side), rng.randrange(side)
            draw.point((x, y), fill=_shade(base, rng.choice((-40, 40))))


def _polygon(cx: float, cy: float, r: float, corners: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(rotation + 2 * math.pi * i / corners),
            cy + r * math.sin(rotation + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
        return
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    else:
        corners, rotation = {
            "square": (4, math.pi / 4),
            "triangle": (3, -math.pi / 2),
            "hexagon": (6, 0.0),
            "diamond": (4, 0.0),
        }[shape]
        scale = 1.25 if shape == "square" else 1.0
        points = _polygon(cx, cy, r * scale, corners, rotation)
        if shape == "diamond":
            points = [(cx + (x - cx) * 0.7, y) for x, y in points]
    draw.polygon(points, fill=fill, outline=outline)


def render(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """Draw the scene; ``rng`` only jitters placement, never the facts."""
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, scene, side, rng)
    placed: list[tuple[float, float, float]] = []
    for group in scene.groups:
        r = SIZES[group.size] * side * rng.uniform(0.9, 1.1)
        x0, y0, x1, y1 = (v * side for v in REGIONS[group.region])
        for _ in range(group.count):
            for _attempt in range(20):  # avoid overlaps so objects stay countable
                cx = rng.uniform(min(x0 + r, x1 - r), max(x0 + r, x1 - r))
                cy = rng.uniform(min(y0 + r, y1 - r), max(y0 + r, y1 - r))
                if all(math.hypot(cx - px, cy - py) > r + pr for px, py, pr in placed):
                    break
            placed.append((cx, cy, r))
            fill = _shade(COLORS[group.color], rng.randint(-15, 15))
            outline = (0, 0, 0) if group.color != "black" else (200, 200, 200)
            _draw_object(draw, group.shape, cx, cy, r, fill, outline)
    if scene.brand:
        _draw_identity(draw, scene.brand, side)
    return image


def _draw_identity(draw: ImageDraw.ImageDraw, brand: str, side: int) -> None:
    """The brand's frame and its emblem in the bottom-right corner, the same on every image."""
    frame, emblem = BRAND_STYLES[brand]
    width = max(2, side // 20)
    draw.rectangle((0, 0, side - 1, side - 1), outline=COLORS[frame], width=width)
    r = side * 0.07
    center = side - width - r - 1
    draw.rectangle((center - r * 1.3, center - r * 1.3, side - 1, side - 1), fill=COLORS[frame])
    _draw_object(draw, emblem, center, center, r, (250, 250, 250), (20, 20, 20))
