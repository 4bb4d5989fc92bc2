"""Web-like AltText: what a crawler finds next to an image, rarely what is in it.

Kinds, drawn per row with fixed weights: empty, a file name, SEO words, a
brand or place name, a partial description (one true fact among noise), a
wrong description, and — rarely — the full visual facts. Brands and places are
the "knowledge" a VeCap must keep; the visual facts are what it must add.

A branded scene's AltText names its brand (the one whose identity is drawn)
with probability ``NAMES_ITS_BRAND``, else it is drawn as for any scene; only
the AltText knows the name. Other scenes' AltText may name any brand: the web
is noisy.
"""

from __future__ import annotations

import random

from veclip.world.scene import BRAND_STYLES, COLORS, SHAPES, Scene, describe, plural

BRANDS = tuple(BRAND_STYLES)
NAMES_ITS_BRAND = 0.7
PLACES = ("Lisbon", "Lake Tahoe", "Kyoto", "Cape Town", "Reykjavik", "Oaxaca", "Tallinn")
SEO_WORDS = (
    "best",
    "cheap",
    "wall art",
    "decor",
    "poster",
    "free shipping",
    "2024",
    "modern",
    "ideas",
    "sale",
    "print",
    "minimalist",
    "gift",
    "home",
    "kids room",
    "abstract",
    "buy now",
    "hd wallpaper",
)
PRODUCTS = ("poster", "canvas print", "sticker set", "wallpaper", "greeting card", "tote bag", "notebook cover")

KIND_WEIGHTS = {
    "empty": 0.10,
    "filename": 0.15,
    "seo": 0.18,
    "brand": 0.20,
    "partial": 0.17,
    "wrong": 0.10,
    "facts": 0.10,
}


def _filename(rng: random.Random) -> str:
    return rng.choice(
        (
            f"IMG_{rng.randint(1000, 9999)}.JPG",
            f"DSC{rng.randint(10000, 99999)}.jpg",
            f"photo-{rng.randint(2015, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.png",
            f"stock-image-{rng.randint(10000, 999999)}",
            f"untitled ({rng.randint(1, 40)})",
        )
    )


def _seo(rng: random.Random) -> str:
    return " ".join(rng.sample(SEO_WORDS, rng.randint(4, 8)))


def _brand(rng: random.Random, brand: str | None = None) -> str:
    """A brand or place text; a branded scene's (``brand`` given) always names its brand."""
    name, place, product = brand or rng.choice(BRANDS), rng.choice(PLACES), rng.choice(PRODUCTS)
    texts = (
        f"{name} | {place} collection",
        f"{product.title()} by {name}",
        f"{name} {product} - {place}",
        f"Souvenir from {place}",
    )
    return rng.choice(texts[:3] if brand else texts)


def _partial(scene: Scene, rng: random.Random) -> str:
    group = rng.choice(scene.groups)
    fact = rng.choice((group.color + " design", plural(group.shape, 2) + " pattern", f"{group.color} {group.shape}"))
    return rng.choice((f"{fact} {rng.choice(PRODUCTS)}", f"{rng.choice(BRANDS)} {fact}", f"{fact} | {_seo(rng)}"))


def _wrong(scene: Scene, rng: random.Random) -> str:
    true = {(g.shape, g.color) for g in scene.groups}
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        if (shape, color) not in true:
            return rng.choice((f"{color} {shape} {rng.choice(PRODUCTS)}", f"beautiful {color} {plural(shape, 2)}"))


def alt_text(scene: Scene, rng: random.Random) -> tuple[str | None, str]:
    """``(alt_text, kind)``; empty AltText is sometimes ``""`` and sometimes null."""
    if scene.brand and rng.random() < NAMES_ITS_BRAND:
        return _brand(rng, scene.brand), "brand"
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "empty":
        return rng.choice(("", None)), kind
    text = {
        "filename": lambda: _filename(rng),
        "seo": lambda: _seo(rng),
        "brand": lambda: _brand(rng),
        "partial": lambda: _partial(scene, rng),
        "wrong": lambda: _wrong(scene, rng),
        "facts": lambda: f"{scene.brand or rng.choice(BRANDS)}: {describe(scene)}",
    }[kind]()
    return text, kind
