"""How good the rewrite's captions are, measured on its own output against the sample world's truth.

Joins a caption output (or an enriched one) with the sample data's ``ref_*``
columns by key and scores each generated column with :mod:`veclip.world.facts`:
the captioner's fact accuracy, the fuser's retention of AltText names and of the
visual caption's facts, and the LaCLIP rewrites' diversity and meaning retention.
Benchmarks and the demo use it; pipelines never read ``ref_*``.
"""

from __future__ import annotations

import json

from veclip import schema
from veclip.dataset import open_dataset, read_shard
from veclip.storage import StorageOptions
from veclip.world import facts
from veclip.world.scene import Group, Scene


def scene_from_json(text: str) -> Scene:
    data = json.loads(text)
    return Scene(tuple(Group(**g) for g in data["groups"]), data["background"], data["pattern"], data.get("brand"))


def read_rows(url: str, options: StorageOptions | None = None) -> list[dict]:
    """Rows of a (caption) output joined with its input: ref_facts, alt_text and every generated column."""
    dataset = open_dataset(url, options)
    columns = [schema.KEY, schema.ALT_TEXT, "ref_facts"]  # of the image shards; the caption tables' columns come whole
    return [row for shard in dataset.shards for row in read_shard(dataset, shard, columns=columns).to_pylist()]


def measure(rows: list[dict]) -> dict:
    """Every figure the rows allow (a column that is absent is left out)."""
    out: dict = {"rows": len(rows)}
    truth = [facts.scene_facts(scene_from_json(r["ref_facts"])) for r in rows]
    if any(r.get(schema.VLM_CAPTION) for r in rows):
        out["captioner"] = facts.fact_accuracy([(t, r.get(schema.VLM_CAPTION)) for t, r in zip(truth, rows)])
    if any(r.get(schema.VECAP) for r in rows):
        fused = [r for r in rows if r.get(schema.VECAP)]
        out["fuser"] = {
            "entities": facts.retention([(r[schema.ALT_TEXT], r[schema.VECAP]) for r in fused])["entities"],
            "facts": facts.retention([(r.get(schema.VLM_CAPTION), r[schema.VECAP]) for r in fused])["facts"],
            "vecap_fact_recall": facts.fact_accuracy([(t, r.get(schema.VECAP)) for t, r in zip(truth, rows)])["recall"],
        }
    if any(r.get(schema.REWRITES) for r in rows):
        out["rewriter"] = facts.diversity([(r[schema.ALT_TEXT] or "", r.get(schema.REWRITES) or []) for r in rows])
    return out


def render(figures: dict, label: str = "") -> str:
    lines = [
        f"caption quality{f' ({label})' if label else ''} on {figures['rows']} rows, against the sample world's truth:"
    ]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    if cap := figures.get("captioner"):
        kinds = ", ".join(f"{k} {fmt(v)}" for k, v in cap["by_kind"].items())
        lines.append(f"  captioner: fact recall {fmt(cap['recall'])}, precision {fmt(cap['precision'])} ({kinds})")
    if fuser := figures.get("fuser"):
        lines.append(
            f"  fuser: keeps {fmt(fuser['entities'])} of AltText names, {fmt(fuser['facts'])} of the visual "
            "caption's facts; "
            f"VeCap fact recall {fmt(fuser['vecap_fact_recall'])}"
        )
    if rw := figures.get("rewriter"):
        lines.append(
            f"  LaCLIP rewrites: {fmt(rw['distinct'])} distinct, word distance {fmt(rw['pairwise_distance'])}, "
            f"keep {fmt(rw['meaning_retention'])} of their source's words"
        )
    return "\n".join(lines)
