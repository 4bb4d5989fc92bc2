"""Cleaning and checks for generated captions; every rejection has a reason code.

A rejected generation does not drop its row: the column is left null and the
reason goes into the row's ``rewrite_flags``, so training falls back to the
AltText. Only rows whose image is unusable are quarantined.
"""

from __future__ import annotations

import re
import unicodedata

# Reason codes (stable: they appear in flags and run summaries).
EMPTY = "empty_output"
TOO_LONG = "too_long"
TOO_SHORT = "too_short"
REFUSAL = "refusal"
REPETITION = "repetition"
ENTITIES_LOST = "entities_lost"
ENTITY_CHECK = 2  # in the fingerprint of fused outputs; 2: a number counts only beside a name
ALT_TEXT_TRUNCATED = "alt_text_truncated"
GARBLED = "garbled"  # control or replacement characters, or mostly tokens that are not words

_PREFIXES = re.compile(
    r"^\s*(sure[,!.]?\s*)?(here(?: is|'s| are)\b[^:\n]*:|caption\s*:|answer\s*:|output\s*:|rewritten caption\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’`"
_REFUSALS = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|i cannot (help|provide|assist|describe)|i can'?t "
    r"(help|provide|assist|describe)|i am unable|i'?m unable)",
    re.IGNORECASE,
)
_RUN = re.compile(r"(.{2,}?)\1{3,}")  # a chunk repeated 4+ times in a row: "ThreeThreeThreeThree"


def strip_boilerplate(text: str) -> str:
    """Drop "Sure! Here is the caption:"-style openers, surrounding quotes, extra whitespace."""
    text = " ".join(text.split())
    previous = None
    while previous != text:
        previous = text
        text = _PREFIXES.sub("", text).strip().strip(_QUOTES).strip()
    return text


def is_repetitive(text: str) -> bool:
    words = text.lower().split()
    if _RUN.search(text.replace(" ", "")):
        return True
    if len(words) >= 6 and len(set(words)) / len(words) < 0.4:
        return True
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return any(trigrams.count(t) >= 3 for t in set(trigrams))


_WORD = re.compile(
    r"^[(\[\"'“‘]*(?:[^\W\d_]+(?:['’\-][^\W\d_]+)*|\d+(?:[.,:/]\d+)*(?:st|nd|rd|th|s|px|%)?)[)\]\"'”’.,;:!?]*$"
)
_BAD_CATEGORIES = ("Cc", "Cf", "Co", "Cs", "Cn")  # control, format, private-use, surrogate, unassigned


def is_garbled(text: str) -> bool:
    """Text no reader could use: control, format or replacement characters (what a model's
    broken bytes decode to), or fewer than half of its tokens words or numbers."""
    if "\ufffd" in text or any(unicodedata.category(c) in _BAD_CATEGORIES for c in text if not c.isspace()):
        return True
    tokens = text.split()
    return sum(bool(_WORD.match(t)) for t in tokens) * 2 < len(tokens)


def clean(text: str | None, max_words: int, min_words: int = 1) -> tuple[str | None, str | None]:
    """``(caption, None)`` when usable, else ``(None, reason)``."""
    text = strip_boilerplate(text or "")
    if not text:
        return None, EMPTY
    if is_garbled(text):
        return None, GARBLED
    if _REFUSALS.search(text):
        return None, REFUSAL
    if is_repetitive(text):
        return None, REPETITION
    words = len(text.split())
    if words > max_words:
        return None, TOO_LONG
    if words < min_words:
        return None, TOO_SHORT
    return text, None


# Capitalised words that are not names; numbers count as knowledge to keep.
_COMMON = {
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "photo",
    "image",
    "picture",
    "img",
    "new",
    "best",
    "beautiful",
    "free",
    "sale",
    "buy",
    "cheap",
    "modern",
    "poster",
    "print",
    "souvenir",
    "collection",
    "by",
    "from",
    "of",
    "and",
    "with",
    "for",
    "in",
    "on",
    "at",
    "to",
    "my",
    "our",
    "view",
    "untitled",
    "stock",
    "hd",
    "dsc",
    "jpg",
    "png",
    "jpeg",
}
_TOKEN = re.compile(r"[A-Za-z][A-Za-z&'\-]*|\d+(?:[.,]\d+)*")
_FILE_JUNK = re.compile(r"\.(jpe?g|png|webp|gif)$|[A-Za-z][_\-]?\d|\d[_\-]?[A-Za-z]", re.IGNORECASE)


def entities(alt_text: str | None) -> list[str]:
    """Knowledge the VeCap must keep, as the fusion prompt asks: capitalised names (not file-name junk)
    and the numbers that belong to one ("Route 66", "Studio 54"). A number on its own, like an SEO year
    ("free shipping 2024") or a file counter ("untitled (18)"), is the boilerplate the prompt says to
    drop: counting it nulled VeCaps that did what they were asked."""
    words = [w for w in (alt_text or "").split() if not _FILE_JUNK.search(w)]  # IMG_4821.JPG, stock-image-123
    tokens = [t for t in _TOKEN.findall(" ".join(words)) if t.lower() not in _COMMON]
    names = [t[0].isupper() and len(t) > 1 for t in tokens]
    found = []
    for i, token in enumerate(tokens):
        beside_a_name = (i > 0 and names[i - 1]) or (i + 1 < len(tokens) and names[i + 1])
        if names[i] or (token[0].isdigit() and beside_a_name):
            found.append(token)
    return list(dict.fromkeys(found))


def lost_entities(alt_text: str | None, caption: str) -> list[str]:
    """Entities of the AltText that the caption does not contain (case-insensitive)."""
    lowered = caption.lower()
    return [e for e in entities(alt_text) if e.lower() not in lowered]
