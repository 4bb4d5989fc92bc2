"""The dataset card: what a person (or the Hugging Face Hub) needs to use an output without veclip.

Written as ``<output>/_README.md`` after every run (:data:`~veclip.shards.layout.CARD_FILE`): the schema
read from a finished shard, where the rows came from and which models wrote which columns, the counts, and
how to read it with ``datasets``, pandas and pyarrow, and, for caption tables, how to join them to their
images. Its YAML header is the Hub's: upload the card as the repository's ``README.md`` and the Hub reads the
shards (and only them) as the ``train`` split.
"""

from __future__ import annotations

import posixpath

import pyarrow.parquet as pq

from veclip import schema
from veclip.shards.layout import CARD_FILE, Layout
from veclip.shards.marker import CAPTIONS, Marker
from veclip.shards.store import ShardStore
from veclip.storage import Location, write_bytes

HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "*.parquet"
tags:
- veclip
- image-text
---
"""


def write_card(output: Location, stage: str, source: str, models: dict[str, str] | None = None, log=print) -> str:
    """Write the card of ``output`` (written by ``veclip <stage>`` from ``source``, with ``models`` by where
    their configuration names them); the counts are the markers'. Returns its path."""
    store = ShardStore(output)
    path = output.join(CARD_FILE)
    card = render_card(output, store.layout, stage, source, models or {}, store.markers(), len(store.failures()))
    write_bytes(output.fs, path, card.encode())
    log(f"{stage}: dataset card {output.url.rstrip('/')}/{CARD_FILE}")
    return path


def render_card(
    output: Location,
    records: Layout,
    stage: str,
    source: str,
    models: dict[str, str],
    markers: dict[str, Marker],
    failed: int,
) -> str:
    name = posixpath.basename(output.url.rstrip("/"))
    rows_out = sum(m.rows_out for m in markers.values())
    quarantined = sum(m.quarantined for m in markers.values())
    runs = sorted({m.run_id for m in markers.values() if m.run_id})
    lines = [
        HEADER,
        f"# {name}",
        "",
        f"Written by `veclip {stage}` from `{source}`" + (f" (runs: {', '.join(runs)})." if runs else "."),
        "",
        "| shards | rows | rows quarantined | shards failed |",
        "|---|---|---|---|",
        f"| {len(markers)} | {rows_out} | {quarantined} | {failed} |",
        "",
        *_schema(output, markers),
        *_models(models),
        *_reading(output, records, markers),
    ]
    return "\n".join(lines) + "\n"


def _schema(output: Location, markers: dict[str, Marker]) -> list[str]:
    if not markers:
        return []
    shard = output.join(next(iter(markers)))
    with output.fs.open(shard, "rb") as f:
        found = pq.read_schema(f)
    rows = [f"| `{f.name}` | `{f.type}` | {_holds(f.name)} |" for f in found]
    return ["## Schema", "", "| column | type | holds |", "|---|---|---|", *rows, ""]


def _holds(column: str) -> str:
    base = column.removesuffix("_provenance")
    if base != column and base in schema.COLUMN_MEANINGS:
        return f"where `{base}` came from, per row: the model and its settings (prompt version, engine or gate)"
    return schema.COLUMN_MEANINGS.get(column, "carried from the input")


def _models(models: dict[str, str]) -> list[str]:
    if not models:
        return []
    return ["## Models", "", *(f"- `{where}`: `{model}`" for where, model in sorted(models.items())), ""]


def _reading(output: Location, records: Layout, markers: dict[str, Marker]) -> list[str]:
    url = output.url.rstrip("/")
    # datasets reads a local folder as it is; an object store's it reads from a glob (not a folder URL)
    hf = f'"{url}"' if output.is_local else f'"parquet", data_files="{url}/*.parquet"'
    lines = [
        "## Reading it",
        "",
        "```python",
        f"datasets.load_dataset({hf})  # the shards only: the records under .veclip/ are left out",
        f'pandas.read_parquet("{url}")  # and pyarrow.dataset.dataset(..., format="parquet")',
        "```",
        "",
        f"Refused rows, with their reasons, are in `{records.quarantine}/`; `veclip status {url}` shows the runs.",
        "",
    ]
    tables = [m for m in markers.values() if m.layout == CAPTIONS and m.input_url]
    if tables:
        first = tables[0]
        lines += [
            "## Joining the captions to their images",
            "",
            f"Each shard is a caption table: one row per image of its input shard, joined by `{schema.KEY}` (its "
            f"input shard is in the marker, e.g. `{first.shard}` <- `{first.input_url}`).",
            "",
            "```python",
            "import pandas as pd",
            f'images = pd.read_parquet("{first.input_url}")',
            f'captions = pd.read_parquet("{url}/{first.shard}")',
            f'rows = images.merge(captions, on="{schema.KEY}")',
            "```",
            "",
            f"veclip's own readers join them for you: `veclip train --input {url}`.",
            "",
        ]
    return lines
