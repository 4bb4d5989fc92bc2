"""One shard's caption scores, step by step: pure functions of its rows, the config and a model.

    rows ──> (row, slot, text) of every caption present        (caption_slots)
    images, texts ──> unit embeddings ──> a cosine per caption  (score: the model)
    cosines ──> "<slot>:low_clip_score" flags                   (gate: threshold, shard percentile)
    keys, cosines, flags, provenance ──> the score table        (score_table)

Slots are named as training names them (``alt_text``, ``vecap``,
``vlm_caption``, ``rewrites.0`` …), so a flag names the exact caption that
training must not use. No storage and no Ray here (:mod:`veclip.score.worker`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from veclip import schema
from veclip.eval.embed import embed_images, encode_texts
from veclip.images import ImageLimits


@dataclass(frozen=True)
class Caption:
    row: int
    slot: str  # alt_text, vecap, vlm_caption or rewrites.<i>
    text: str

    @property
    def column(self) -> str:
        return self.slot.split(".")[0]


def caption_slots(table: pa.Table, columns: tuple[str, ...]) -> list[Caption]:
    """Every non-empty caption of ``columns`` in the table, row by row."""
    out = []
    for column in columns:
        if column not in table.column_names:
            continue
        for i, value in enumerate(table.column(column).to_pylist()):
            texts = enumerate(value or []) if column == schema.REWRITES else [(None, value)]
            out += [
                Caption(i, column if j is None else f"{column}.{j}", text) for j, text in texts if text and text.strip()
            ]
    return out


def score(
    model,
    preprocess,
    tokenizer,
    images: list[bytes | None],
    captions: list[Caption],
    batch_size: int,
    limits: ImageLimits = ImageLimits(),
    device=None,
) -> tuple[np.ndarray, list[str | None]]:
    """The cosine of each caption with its row's image (NaN where the image does not decode), and
    each row's image error. Each image and each caption is encoded once."""
    embedded, errors = embed_images(model, preprocess, images, batch_size, limits, device)
    decoded = np.cumsum([e is None for e in errors]) - 1  # row -> its index among the decoded images
    keep = [c for c in captions if errors[c.row] is None]
    cosines = np.full(len(captions), np.nan, np.float32)
    if keep:
        texts = _unit(encode_texts(model, tokenizer, [c.text for c in keep], batch_size, device))
        image_rows = _unit(embedded)[[decoded[c.row] for c in keep]]
        cosines[[i for i, c in enumerate(captions) if errors[c.row] is None]] = (image_rows * texts).sum(axis=1)
    return cosines, errors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def gate(captions: list[Caption], cosines: np.ndarray, threshold: float | None, percentile: float | None) -> np.ndarray:
    """Which captions are flagged: under ``threshold``, or under the ``percentile`` of their column's
    scores in this shard (the rewrites of every row pooled as one column). NaN is never flagged."""
    low = np.zeros(len(captions), dtype=bool)
    scored = ~np.isnan(cosines)
    if threshold is not None:
        low |= scored & (cosines < threshold)
    if percentile is not None:
        columns = np.array([c.column for c in captions])
        for column in set(columns[scored]):
            mine = scored & (columns == column)
            low |= mine & (cosines < np.percentile(cosines[mine], percentile))
    return low


def score_table(
    keys: list[str],
    table: pa.Table,
    captions: list[Caption],
    cosines: np.ndarray,
    flagged: np.ndarray,
    provenance: dict,
) -> pa.Table:
    """The score table (schema.SCORE_SCHEMA): one row per key, in order; a rewrite's score at its index."""
    rows = [{s: None for s in schema.SINGLE_CAPTION_COLUMNS} | {schema.REWRITES: None} for _ in keys]
    if schema.REWRITES in table.column_names:
        for row, rewrites in zip(rows, table.column(schema.REWRITES).to_pylist()):
            row[schema.REWRITES] = [None] * len(rewrites) if rewrites else None
    flags: list[list[str]] = [[] for _ in keys]
    for caption, cosine, low in zip(captions, cosines.tolist(), flagged.tolist()):
        value = None if np.isnan(cosine) else cosine
        if caption.column == schema.REWRITES:
            rows[caption.row][schema.REWRITES][int(caption.slot.split(".")[1])] = value
        else:
            rows[caption.row][caption.slot] = value
        if low:
            flags[caption.row].append(f"{caption.slot}:{schema.LOW_CLIP_SCORE}")
    return pa.table(
        [
            pa.array(keys, pa.string()),
            pa.array(rows, schema.SCORE_SCHEMA.field(schema.CLIP_SCORES).type),
            pa.array(
                [provenance] * len(keys), schema.SCORE_SCHEMA.field(schema.provenance_column(schema.CLIP_SCORES)).type
            ),
            pa.array(flags, pa.list_(pa.string())),
        ],
        schema=schema.SCORE_SCHEMA,
    )


def column_stats(captions: list[Caption], cosines: np.ndarray, flagged: np.ndarray) -> dict:
    """Per column: captions scored, the sum of their cosines, the shard's median, and how many were flagged."""
    stats = {}
    for column in sorted({c.column for c in captions}):
        mine = np.array([c.column == column for c in captions]) & ~np.isnan(cosines)
        if mine.any():
            values = cosines[mine]
            stats[column] = {
                "scored": int(mine.sum()),
                "sum": float(values.sum()),
                "median": float(np.median(values)),
                "flagged": int(flagged[mine].sum()),
            }
    return stats
