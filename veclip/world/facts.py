"""Visual facts and names read back from a caption, and the quality metrics built on them.

A scene's facts are atomic strings: per group of objects its colour and shape
alone (``"colour=red"``, ``"shape=star"``), together (``"red star"``), and that
object's count, size and position (``"red star: count=2"``); the background and
its pattern; a brand's frame and emblem (``"frame=red"``). :func:`parse` reads the same strings out of any text written
in the sample world's words, so a caption is scored by what it states, whoever
wrote it: the reference description scores 1.0, random text 0.0.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

from veclip.world.alt_text import BRANDS, PLACES, PRODUCTS
from veclip.world.scene import BACKGROUNDS, COLORS, NUMBERS, PATTERNS, REGION_PHRASES, SHAPES, SIZES, Scene

FACT_KINDS = ("colour", "shape", "object", "count", "size", "position", "background", "pattern", "identity")
_WORD = "|".join
_GROUP = re.compile(
    rf"\b(a|an|one|{_WORD(NUMBERS[2:])}) ({_WORD(SIZES)}) ({_WORD(COLORS)}) ({_WORD(SHAPES)})(?:es|s)?"
    rf"(?: ({_WORD(REGION_PHRASES.values())}))?",
    re.IGNORECASE,
)
_BACKGROUND = re.compile(
    rf"\b(?:({_WORD(p for p in PATTERNS if p != 'plain')}) )?({_WORD(BACKGROUNDS)}) background", re.IGNORECASE
)
_IDENTITY = re.compile(rf"\b({_WORD(COLORS)}) frame with a white ({_WORD(SHAPES)}) emblem", re.IGNORECASE)
_REGIONS = {phrase: region for region, phrase in REGION_PHRASES.items()}


def scene_facts(scene: Scene) -> set[str]:
    out = set()
    for g in scene.groups:
        obj = f"{g.color} {g.shape}"
        out |= {
            f"colour={g.color}",
            f"shape={g.shape}",
            obj,
            f"{obj}: count={g.count}",
            f"{obj}: size={g.size}",
            f"{obj}: position={g.region}",
        }
    out |= {f"background={scene.background}", f"pattern={scene.pattern}"}
    if scene.brand:
        from veclip.world.scene import BRAND_STYLES

        frame, emblem = BRAND_STYLES[scene.brand]
        out |= {f"frame={frame}", f"emblem={emblem}"}
    return out


def parse(text: str | None) -> set[str]:
    """The facts a text states, in :func:`scene_facts`' strings."""
    text = text or ""
    out = set()
    for number, size, color, shape, where in _GROUP.findall(text):
        obj = f"{color.lower()} {shape.lower()}"
        count = 1 if number.lower() in ("a", "an", "one") else NUMBERS.index(number.lower())
        out |= {
            f"colour={color.lower()}",
            f"shape={shape.lower()}",
            obj,
            f"{obj}: count={count}",
            f"{obj}: size={size.lower()}",
        }
        if where:
            out.add(f"{obj}: position={_REGIONS[where.lower()]}")
    for match in _BACKGROUND.finditer(text):
        pattern, background = match.groups()
        out |= {f"background={background.lower()}", f"pattern={(pattern or 'plain').lower()}"}
    for frame, emblem in _IDENTITY.findall(text):
        out |= {f"frame={frame.lower()}", f"emblem={emblem.lower()}"}
    return out


def fact_kind(fact: str) -> str:
    if ": " in fact:
        return fact.split(": ")[1].split("=")[0]
    if "=" not in fact:
        return "object"
    key = fact.split("=")[0]
    return {"frame": "identity", "emblem": "identity", "colour": "colour", "shape": "shape"}.get(key, key)


def entities(text: str | None) -> set[str]:
    """The names in a text: brands, places, products (what a fuser must keep)."""
    low = (text or "").lower()
    return {name for name in (*BRANDS, *PLACES, *PRODUCTS) if name.lower() in low}


def _share(found: int, total: int) -> float | None:
    return found / total if total else None


def fact_accuracy(pairs) -> dict:
    """``pairs``: (true facts, text). Recall of the true facts, overall and per kind, and
    precision (the share of stated facts that are true)."""
    hit, total, stated, right = Counter(), Counter(), 0, 0
    for truth, text in pairs:
        said = parse(text)
        stated += len(said)
        right += len(said & truth)
        for fact in truth:
            total[fact_kind(fact)] += 1
            hit[fact_kind(fact)] += fact in said
    return {
        "recall": _share(sum(hit.values()), sum(total.values())),
        "precision": _share(right, stated),
        "by_kind": {k: _share(hit[k], total[k]) for k in FACT_KINDS if total[k]},
        "rows": len(pairs) if hasattr(pairs, "__len__") else None,
    }


def retention(pairs) -> dict:
    """``pairs``: (source text, its rewrite). The share of the source's names and of its
    facts that the rewrite keeps."""
    kept_names = names = kept_facts = facts = 0
    for source, out in pairs:
        source_names, source_facts = entities(source), parse(source)
        names += len(source_names)
        kept_names += len(source_names & entities(out))
        facts += len(source_facts)
        kept_facts += len(source_facts & parse(out))
    return {
        "entities": _share(kept_names, names),
        "facts": _share(kept_facts, facts),
        "names_seen": names,
        "facts_seen": facts,
    }


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def diversity(groups) -> dict:
    """``groups``: (source, [rewrites]). Distinct rewrites per row (share), their mean
    pairwise word distance (1 - Jaccard), and meaning retention: the share of the
    source's words (names, colours, shapes, numbers ...) each rewrite keeps."""
    distinct, distance, kept = [], [], []
    for source, rewrites in groups:
        rewrites = [r for r in rewrites if r]
        if not rewrites:
            continue
        distinct.append(len(set(rewrites)) / len(rewrites))
        for a, b in itertools.combinations(rewrites, 2):
            wa, wb = _words(a), _words(b)
            distance.append(1 - len(wa & wb) / max(1, len(wa | wb)))
        src = _words(source)
        kept += [len(src & _words(r)) / len(src) for r in rewrites if src]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "distinct": mean(distinct),
        "pairwise_distance": mean(distance),
        "meaning_retention": mean(kept),
        "rows": len(distinct),
    }
