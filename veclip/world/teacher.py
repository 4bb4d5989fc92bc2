"""What each model should write, derived from the sample generator's facts.

The training examples of :mod:`veclip.world.model_training` are drawn from their own
stream of scenes (split ``"models"``: never the eval split) and formatted with
the pipeline's own prompt builders, so the models learn exactly the requests
the rewrite sends:

* captioner: image -> :func:`veclip.world.scene.describe` (it never sees AltText);
* fuser: (AltText, visual caption) -> the AltText's names, then the visual caption;
* LaCLIP rewriter: AltText -> a paraphrase that keeps its words' meaning.
"""

from __future__ import annotations

import random
import re

from veclip.world.alt_text import BRANDS, PLACES, PRODUCTS, alt_text
from veclip.world.facts import entities
from veclip.world.scene import Scene, describe, random_brand, random_scene, render

SPLIT = "models"  # the scenes the models learn from: their own random stream, not train or eval


def scene(seed: int, index: int) -> tuple[Scene, random.Random]:
    """The index-th training scene (as the sample generator draws them) and its rng for rendering."""
    rng = random.Random(f"{seed}:{SPLIT}:{index}")
    brand = random_brand(random.Random(f"{seed}:{SPLIT}:{index}:brand"))
    return random_scene(rng, max_groups=2, brand=brand), rng


def example(seed: int, index: int, side: int = 128):
    """(image, AltText, visual caption) of one training scene."""
    s, rng = scene(seed, index)
    image = render(s, side, rng)
    text, _ = alt_text(s, rng)
    return image, text, describe(s)


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _first(names: set[str], among) -> str | None:
    return next((n for n in among if n in names), None)


def fused(alt: str | None, visual: str) -> str:
    """What the AltText knows that the image can't show (its brand, product and place) first,
    then the visual caption: CLIP reads only a caption's first tokens (32 to 77), so the names
    lead. File names, SEO words and wrong descriptions are dropped."""
    names = entities(alt)
    brand, place = _first(names, BRANDS), _first(names, PLACES)
    product = (_first(names, PRODUCTS) or "print").lower()
    if brand:
        knowledge = f"{_article(product).capitalize()} by {brand}" + (f" from {place}" if place else "")
    elif place:
        knowledge = f"A souvenir from {place}"
    else:
        return visual
    return f"{knowledge}: {visual[0].lower()}{visual[1:]}"


SWAPS = (
    ("large", "big"),
    ("small", "little"),
    ("on the left", "to the left"),
    ("on the right", "to the right"),
    ("in the center", "in the middle"),
    ("at the top", "near the top"),
    ("at the bottom", "near the bottom"),
    ("background", "backdrop"),
    ("collection", "series"),
)
OPENERS = ("", "A picture of ", "An image of ", "A photo of ", "Showing ", "Here: ")
CLOSERS = ("", ", as seen online", ", in a photo", ", pictured")


def paraphrase(text: str, rng: random.Random) -> str:
    """A rewrite that keeps every word's meaning: synonyms, reordered parts, a new opening."""
    out = " ".join(text.split())
    for a, b in SWAPS:
        if rng.random() < 0.5:
            out = re.sub(rf"\b{a}\b", b, out)
    parts = [p.strip() for p in re.split(r" \| | - |: ", out) if p.strip()]
    if len(parts) > 1 and rng.random() < 0.5:
        parts.reverse()
    out = ", ".join(parts)
    words = out.split()
    if (
        len(words) > 3 and not any(c in out for c in ",.") and not entities(out) and rng.random() < 0.5
    ):  # keyword lists: any order
        rng.shuffle(words)
        out = " ".join(words)
    out = out.rstrip(".")
    opener = rng.choice(OPENERS)
    if opener and out:
        keep_case = out[:2].isupper() or any(out.startswith(name) for name in (*BRANDS, *PLACES))
        out = opener + (out if keep_case else out[0].lower() + out[1:])
    return (out[0].upper() + out[1:] if out else out) + rng.choice(CLOSERS) + "."
