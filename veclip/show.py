"""``veclip show``: look at rows of any dataset or stage output, images beside their captions.

Works on input shards, enriched shards, caption outputs (joined to their images
through :mod:`veclip.dataset`) and quarantine folders, local or on S3. Rows are
read a row group at a time and reading stops once enough are found, so showing
ten rows of a 300M-row output reads a few row groups, not the dataset.
``--html`` writes self-contained pages (images inline), ``page_rows`` rows each,
linked to one another.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from veclip import schema
from veclip.command import Command, Flag, Said, comma_list
from veclip.dataset import Dataset, open_dataset, read_shard_batches
from veclip.images import ImageError, decode_image
from veclip.storage import StorageOptions

CAPTIONS = (schema.ALT_TEXT, schema.VLM_CAPTION, schema.VECAP, schema.REWRITES)  # shown first, in this order
WHY = ("reason", "detail", schema.REWRITE_FLAGS, schema.CLIP_SCORES)  # why a row was refused or a caption flagged
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class ShowConfig:
    url: str = ""
    """a folder or s3:// prefix: input, enriched, caption output or .veclip/quarantine"""
    rows: int = 10
    """rows to show"""
    offset: int = 0
    """matching rows to pass over first (the next page)"""
    keys: tuple[str, ...] = ()
    """only these keys"""
    where: str = ""
    """only rows with a flag or quarantine reason containing this, e.g. entities_lost"""
    html: str | None = None
    """write HTML pages here (a local file) instead of a terminal table"""
    page_rows: int = 50
    """rows per HTML page"""
    add_captions: tuple[str, ...] = ()
    """more caption outputs of the same input (see veclip train --add-captions)"""
    columns: schema.ColumnMap = field(default_factory=schema.ColumnMap)
    """the data's column names for the contract's roles"""


def matching_rows(config: ShowConfig, options: StorageOptions) -> tuple[Dataset, pa.Table]:
    """The rows to show: from ``offset`` on, ``rows`` of those that match, read row group by row group."""
    dataset = open_dataset(config.url, options, config.add_captions, stage="show")
    found, passed, have, wanted = [], 0, 0, set(config.keys)
    for table in _row_groups(dataset, config.columns):
        keep = [
            i for i, row in enumerate(table.select(_filter_columns(table)).to_pylist()) if _matches(row, config, wanted)
        ]
        take = keep[max(0, config.offset - passed) :][: config.rows - have]
        passed += len(keep)
        if take:
            found.append(table.take(take))
            have += len(take)
        if have >= config.rows:
            break
    return dataset, pa.concat_tables(found, promote_options="default") if found else pa.table(
        {schema.KEY: pa.array([], pa.string())}
    )


def _row_groups(dataset: Dataset, column_map: schema.ColumnMap) -> Iterator[pa.Table]:
    for shard in dataset.shards:
        yield from read_shard_batches(dataset, shard, column_map=column_map)


def _filter_columns(table: pa.Table) -> list[str]:
    return [c for c in (schema.KEY, *WHY) if c in table.column_names]


def _matches(row: dict, config: ShowConfig, keys: set[str]) -> bool:
    if keys and row[schema.KEY] not in keys:
        return False
    if not config.where:
        return True
    flags = row.get(schema.REWRITE_FLAGS) or []
    return any(config.where in text for text in [*flags, row.get("reason") or ""])


def _columns(table: pa.Table) -> list[str]:
    """What to show, in reading order: key, captions, why, then the rest (provenance last)."""
    names = table.column_names
    first = [c for c in (schema.KEY, *CAPTIONS, *WHY) if c in names]
    rest = [c for c in names if c not in first and c != schema.IMAGE]
    return first + sorted(rest, key=lambda c: c.endswith("_provenance"))


def _scores(value: dict) -> str:
    """A score table's cosines (``veclip score``), three decimals, unscored slots left out."""
    rewrites = [f"rewrites.{i} {v:.3f}" for i, v in enumerate(value.get(schema.REWRITES) or []) if v is not None]
    return ", ".join([f"{k} {v:.3f}" for k, v in value.items() if k != schema.REWRITES and v is not None] + rewrites)


def _text(value, width: int | None = None) -> str:
    if isinstance(value, dict) and schema.REWRITES in value:
        value = _scores(value)
    if isinstance(value, list):
        value = " | ".join(str(v) for v in value)
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def render_terminal(table: pa.Table, dataset: Dataset, width: int = 100) -> str:
    """One block per row: the key, then each non-empty column on its own line."""
    lines = [_header(dataset, table.num_rows)]
    columns = [c for c in _columns(table) if not c.endswith("_provenance")]
    for row in table.to_pylist():
        lines.append("")
        lines.append(
            f"{row[schema.KEY]}"
            + (f"  [image: {_image_summary(row.get(schema.IMAGE))}]" if schema.IMAGE in row else "")
        )
        for name in columns[1:]:
            text = _text(row.get(name), width)
            if text:
                lines.append(f"  {name:<14} {text}")
    return "\n".join(lines)


def _header(dataset: Dataset, rows: int) -> str:
    joined = (
        f"; captions from {', '.join(s.url for s in dataset.sources)} joined to images in {dataset.images_url}"
        if dataset.sources
        else ""
    )
    return f"{rows} row(s) of {dataset.url}{joined}"


def _image_summary(data: bytes | None) -> str:
    try:
        image = decode_image(data)
    except ImageError as err:
        return err.reason
    return f"{image.width}x{image.height}, {len(data):,} bytes"


def _thumbnail(data: bytes | None) -> str:
    try:
        image = decode_image(data)
    except ImageError as err:
        return f'<div class="noimg">{html.escape(err.reason)}</div>'
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;width:100%}
td,th{border-top:1px solid #ddd;padding:8px;vertical-align:top;text-align:left}
th{width:150px;color:#666;font-weight:normal}
img{width:192px;height:auto;image-rendering:pixelated}.noimg{width:176px;height:96px;background:#fee;color:#a00;padding:8px}
.key{font-family:monospace;color:#555}.flag{background:#fff3cd;padding:1px 4px;margin-right:4px}nav{margin:12px 0}
ol{margin:0;padding-left:20px}.prov{color:#888;font-size:12px}"""


def _cell(name: str, value) -> str:
    if name == schema.REWRITE_FLAGS:
        return "".join(f'<span class="flag">{html.escape(str(f))}</span>' for f in value or []) or "—"
    if name == schema.CLIP_SCORES:
        return html.escape(_scores(value)) if value else "—"
    if isinstance(value, list):
        return "<ol>" + "".join(f"<li>{html.escape(str(v))}</li>" for v in value) + "</ol>"
    if isinstance(value, dict):
        return (
            '<span class="prov">'
            + html.escape(", ".join(f"{k}: {v}" for k, v in value.items() if v is not None))
            + "</span>"
        )
    return "—" if value is None or value == "" else html.escape(str(value))


def render_html(table: pa.Table, dataset: Dataset, page: int, pages: int, name) -> str:
    columns = _columns(table)
    nav = " ".join(
        f'<a href="{html.escape(name(p))}">{p + 1}</a>' if p != page else f"<b>{p + 1}</b>" for p in range(pages)
    )
    rows = []
    for row in table.to_pylist():
        image = _thumbnail(row.get(schema.IMAGE)) if schema.IMAGE in row else ""
        fields = "".join(f"<tr><th>{html.escape(c)}</th><td>{_cell(c, row.get(c))}</td></tr>" for c in columns[1:])
        rows.append(
            f"<tr><td>{image}</td><td><div "
            f'class="key">{html.escape(str(row[schema.KEY]))}</div><table>{fields}</table></td></tr>'
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>veclip show: {html.escape(dataset.url)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(_header(dataset, table.num_rows))}</h1>"
        f"<nav>page {nav}</nav><table>{''.join(rows)}</table><nav>page {nav}</nav></body></html>"
    )


def write_html(table: pa.Table, dataset: Dataset, path: str, page_rows: int) -> list[str]:
    """Pages of ``page_rows`` rows: ``path``, then ``<stem>-2.html`` …; their paths."""
    out = Path(path)
    pages = max(1, -(-table.num_rows // page_rows))

    def name(p: int) -> str:
        return out.name if p == 0 else f"{out.stem}-{p + 1}{out.suffix or '.html'}"

    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for p in range(pages):
        target = out.parent / name(p)
        target.write_text(render_html(table.slice(p * page_rows, page_rows), dataset, p, pages, name))
        written.append(str(target))
    return written


def show(config: ShowConfig, options: StorageOptions | None = None) -> str:
    """Show the rows (terminal text), or write HTML pages and say where."""
    if config.rows < 1 or config.page_rows < 1 or config.offset < 0:
        raise ValueError("show: rows and page_rows must be >= 1 and offset >= 0")
    dataset, table = matching_rows(config, options or StorageOptions())
    if not config.html:
        return render_terminal(table, dataset)
    pages = write_html(table, dataset, config.html, config.page_rows)
    return f"show: {table.num_rows} row(s) of {dataset.url} in {len(pages)} page(s): {', '.join(pages)}"


COMMAND = Command(
    "show",
    "look at rows of a dataset or stage output: captions beside their images, flags, reasons",
    ShowConfig,
    lambda config, options, run=None: Said(show(config, options)),
    flags=(
        Flag("url", "url", metavar="URL"),
        "rows",
        "offset",
        Flag("keys", parse=comma_list),
        "where",
        Flag("html", metavar="FILE"),
        "page_rows",
        Flag("add_captions", metavar="URL[#COLUMNS]"),
        "columns",
    ),
)
