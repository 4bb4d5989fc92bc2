"""Parquet files as veclip writes them: whole (a reader never sees half a file), in row groups of about
128 MB, with pages a reader of a few rows can fetch alone."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from veclip.storage import PARQUET, protocols, replaced_atomically

# Row groups are sized by bytes so one group's image column stays far below pyarrow's 2 GB per-array
# limit whatever the image size (readers materialise a group at a time).
ROW_GROUP_TARGET_BYTES = 128 * 1024 * 1024


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_TARGET_BYTES) -> int:
    """Rows per Parquet row group so that a group holds about ``target_bytes``."""
    if table.num_rows == 0:
        return 1
    bytes_per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, target_bytes // bytes_per_row))


def write_parquet(
    fs: fsspec.AbstractFileSystem,
    path: str,
    table: pa.Table | Iterable[pa.Table],
    target_bytes: int | None = None,
    metadata: dict[bytes, bytes] | None = None,
) -> int:
    """Write ``table``, or a stream of tables of one schema (a shard batch by batch, so memory never
    holds it whole), to ``path`` all at once: readers never see half a file. Returns the rows written.
    ``metadata`` joins the schema's key-value metadata (in the footer).

    Local disk: a temp file beside the target, then an atomic rename. Object
    stores: a local temp file, then one upload (never a half-closed stream).
    """
    tables = [table] if isinstance(table, pa.Table) else table
    target_bytes = target_bytes or ROW_GROUP_TARGET_BYTES
    if "file" in protocols(fs):
        with replaced_atomically(path) as tmp:
            return _write_row_groups(tables, tmp, target_bytes, metadata)
    with tempfile.NamedTemporaryFile(suffix=PARQUET) as tmp:
        rows = _write_row_groups(tables, tmp.name, target_bytes, metadata)
        fs.put_file(tmp.name, path)
    return rows


# pyarrow checks a page's size after each batch of this many rows (its default, 1,024: 100 MB pages of web
# images, which a reader of the first rows must fetch whole); 64 keeps them near 6 MB
PAGE_ROWS = 64


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Every column but the binary ones: pyarrow's default tries a dictionary on images too, and puts the
    first 1,024 (~100 MB) in one dictionary page that every reader must then hold."""
    return [f.name for f in schema if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]


def _write_row_groups(tables: Iterable[pa.Table], path: str, target_bytes: int, metadata: dict | None = None) -> int:
    """Row groups of about ``target_bytes``: a stream's tables are gathered until they fill whole
    groups, the rest waits for the next table (or the end)."""
    writer, pending, rows = None, [], 0

    def flush(last: bool):
        group = pa.concat_tables(pending)
        size = row_group_rows(group, target_bytes)
        whole = group.num_rows if last else group.num_rows // size * size
        writer.write_table(group.slice(0, whole), row_group_size=size)
        pending[:] = [group.slice(whole)] if whole < group.num_rows else []

    try:
        for table in tables:
            if writer is None:
                schema = table.schema.with_metadata({**(table.schema.metadata or {}), **(metadata or {})})
                writer = pq.ParquetWriter(
                    path, schema, use_dictionary=_dictionary_columns(schema), write_batch_size=PAGE_ROWS
                )
            pending.append(table)
            rows += table.num_rows
            if sum(t.nbytes for t in pending) >= target_bytes:
                flush(last=False)
        if writer is None:
            raise ValueError(f"nothing to write to {path}: not even an empty table")
        if pending:
            flush(last=True)
    finally:
        if writer is not None:
            writer.close()
    return rows
