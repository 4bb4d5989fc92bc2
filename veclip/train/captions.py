"""Caption choice per sample: AltText, VeCap, the VeCLIP mix, LaCLIP's uniform choice,
or any weighting of caption columns.

Every row offers a fixed list of *slots* (``alt_text``, ``vecap``,
``vlm_caption``, ``rewrites.0`` … ``rewrites.R-1``). A mode gives each slot a
weight; per sample and epoch one slot is drawn among the row's present slots,
from a uniform number that depends only on ``(seed, epoch, key)`` — not on the
worker count, the block order or the batch. A drawn caption that is present
but unusable (empty or under ``min_words`` words) falls back to the AltText,
then to any other usable slot of the mode. A slot the caption gate flagged
(``veclip score``: its image–text score is too low) is unusable too. Rows with
no usable slot of the mode are dropped before training and counted.

With ``per_image`` K > 1 each sample brings K captions (multi-positive
training, :mod:`veclip.train.loss`): K distinct usable slots of the mode,
drawn without replacement in proportion to their weights from uniforms of
``(seed, epoch, key, slot)``; a row with fewer usable slots repeats its own.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from veclip import schema

Mode = Literal["alttext", "vecap", "mix", "laclip", "weighted"]
MODES = typing.get_args(Mode)
COLUMN_SLOTS = schema.SINGLE_CAPTION_COLUMNS  # one slot per column, then one per rewrite
ALT_TEXT_SLOT = COLUMN_SLOTS.index(schema.ALT_TEXT)  # the fallback when a drawn caption is unusable
REWRITES = schema.REWRITES


@dataclass(frozen=True)
class CaptionConfig:
    mode: Mode = "mix"
    """caption choice per sample: alttext, vecap, mix, laclip or weighted"""
    p_vecap: float = 0.5
    """VeCLIP's mix: VeCap with probability p, AltText otherwise"""
    weights: dict = field(default_factory=dict)
    """weighted mode: {"alt_text": 1, "vecap": 2, "rewrites": 1}"""
    max_rewrites: int = 4
    """LaCLIP rewrite slots read per row"""
    min_words: int = 2
    """a caption with fewer words is unusable (falls back to AltText)"""
    per_image: int = 1
    """Captions of each image in a step, all positives (MultiPositiveClipLoss); the text tower then encodes K texts
    per image."""
    budget_neutral: bool = False
    """with per_image K: batch_size / K images per step, as many texts as single-caption"""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"train: caption mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.p_vecap <= 1.0:
            raise ValueError("train: p_vecap must be within [0, 1]")
        if self.per_image < 1:
            raise ValueError(f"train: captions.per_image must be >= 1, got {self.per_image}")
        if self.mode == "weighted":
            unknown = set(self.weights) - {*COLUMN_SLOTS, REWRITES}
            if unknown or not self.weights or any(w < 0 for w in self.weights.values()):
                raise ValueError(
                    "train: weighted mode needs non-negative weights over alt_text, vecap, vlm_caption, rewrites; "
                    f"got {self.weights}"
                )

    @property
    def slots(self) -> list[str]:
        return list(COLUMN_SLOTS) + [f"{REWRITES}.{i}" for i in range(self.max_rewrites)]

    def slot_texts(self, column) -> list[list[str | None]]:
        """Per slot, every row's text (None where absent); ``column(name)``: a column's values, or None."""
        rewrites = column(REWRITES)
        out = [column(name) for name in COLUMN_SLOTS]
        return out + [
            [r[i] if r is not None and i < len(r) else None for r in rewrites] for i in range(self.max_rewrites)
        ]

    def slot_weights(self) -> np.ndarray:
        weights = {
            "alttext": {"alt_text": 1.0},
            "vecap": {"vecap": 1.0},
            "mix": {"vecap": self.p_vecap, "alt_text": 1.0 - self.p_vecap},
            "laclip": {"alt_text": 1.0, "rewrites": float(self.max_rewrites)},
            "weighted": dict(self.weights),
        }[self.mode]
        per_rewrite = weights.pop(REWRITES, 0.0) / max(1, self.max_rewrites)
        return np.array([weights.get(s, per_rewrite if s.startswith(REWRITES + ".") else 0.0) for s in self.slots])


def key_hash(key: str) -> int:
    """A stable signed 64-bit hash of a row key (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a good bijective scramble of 64-bit integers."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def uniforms(key_hashes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One uniform number in [0, 1) per key, a pure function of (seed, epoch, key)."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch) % 2**64], dtype=np.uint64))
        x = _mix64(key_hashes.astype(np.int64).view(np.uint64) ^ salt)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_seeds(key_hashes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A non-negative 63-bit seed per key for its augmentation, a pure function of (seed, epoch, key)."""
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch + 0x5851F42D4C957F2D) % 2**64], dtype=np.uint64))
        x = _mix64(key_hashes.astype(np.int64).view(np.uint64) ^ salt)
    return (x >> np.uint64(1)).astype(np.int64)


def choose(
    key_hashes: np.ndarray, present: np.ndarray, usable: np.ndarray, weights: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Slot index per row (``-1``: nothing usable). ``present``/``usable``: bool [rows, slots]."""
    w = np.where(present, weights[None, :], 0.0)
    total = w.sum(axis=1, keepdims=True)
    cdf = np.cumsum(w, axis=1) / np.where(total > 0, total, 1.0)
    u = uniforms(key_hashes, seed, epoch)[:, None]
    drawn = np.minimum((u >= cdf).sum(axis=1), len(weights) - 1)
    rows = np.arange(len(key_hashes))
    ok = (total[:, 0] > 0) & usable[rows, drawn]
    candidates = usable & (weights[None, :] > 0)
    alt_ok = candidates[:, ALT_TEXT_SLOT]
    first_usable = np.where(candidates.any(axis=1), candidates.argmax(axis=1), -1)
    fallback = np.where(alt_ok, ALT_TEXT_SLOT, first_usable)
    return np.where(ok, drawn, fallback)


def choose_several(
    key_hashes: np.ndarray, usable: np.ndarray, weights: np.ndarray, seed: int, epoch: int, k: int
) -> np.ndarray:
    """K slot indices per row [rows, k] (``-1``: nothing usable): the row's usable slots of the mode
    drawn without replacement, each in proportion to its weight (Efraimidis-Spirakis: the K largest
    ``log(u) / w``, one uniform per (seed, epoch, key, slot)); fewer than K usable slots repeat in order."""
    candidates = usable & (weights[None, :] > 0)
    u = np.stack(
        [uniforms(key_hashes ^ key_hash(f"caption-slot-{j}"), seed, epoch) for j in range(len(weights))], axis=1
    )
    scores = np.where(candidates, np.log(np.maximum(u, 1e-300)) / np.where(weights > 0, weights, 1.0)[None, :], -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    count = candidates.sum(axis=1)
    chosen = np.take_along_axis(order, np.arange(k)[None, :] % np.maximum(count, 1)[:, None], axis=1)
    return np.where(count[:, None] > 0, chosen, -1)


def gated(flags: list[list[str] | None], slots: list[str]) -> np.ndarray:
    """bool [rows, slots]: the slots the caption gate flagged (``<slot>:low_clip_score``, written by
    ``veclip score``); training treats them as unusable, so a drawn one falls back as above."""
    index = {f"{slot}:{schema.LOW_CLIP_SCORE}": j for j, slot in enumerate(slots)}
    out = np.zeros((len(flags), len(slots)), dtype=bool)
    for i, row in enumerate(flags):
        for flag in row or ():
            if flag in index:
                out[i, index[flag]] = True
    return out


def trainable(usable: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rows that have at least one usable caption for the mode (epoch-independent)."""
    return (usable & (weights[None, :] > 0)).any(axis=1)
