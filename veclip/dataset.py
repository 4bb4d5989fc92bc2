"""What readers read: a folder of shards, or caption tables joined by key to their input.

A caption output (``rewrite --layout captions``) holds no images: each caption
table has the rows of one input shard, in that shard's order, and its done
marker names the shard. :func:`open_dataset` turns a URL into the image shards
to read and, per shard, the caption tables to join beside it; more caption
outputs of the same input can be added (a LaCLIP run beside a VeCap run, or two
captioners), each filling caption columns of its own. Training, eval and
``veclip show`` read through it; every join is checked row by row, never
assumed (:func:`join_captions`).
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from veclip import schema
from veclip.shards.store import MARKED_BUT_MISSING, ShardStore, caption_tables, finished_shard_entries
from veclip.storage import Location, StorageOptions, no_shards, read_batches, read_table

GENERATED = schema.GENERATED_CAPTION_COLUMNS  # the caption columns a rewrite writes
SCORES = (schema.CLIP_SCORES, schema.provenance_column(schema.CLIP_SCORES))  # the columns a score output adds


class CaptionMismatch(ValueError):
    """A caption table's rows are not its input shard's rows, in order."""


@dataclass(frozen=True)
class CaptionSource:
    """A caption output and the columns it contributes: ``{its column: the column it becomes}``.

    Spelled ``URL`` (all its caption columns under their own names) or
    ``URL#vecap=vlm_caption,rewrites`` (only these, ``vecap`` renamed: how two
    captioners' VeCaps share one run). A column's provenance follows it.
    """

    url: str
    columns: dict = field(default_factory=dict)  # empty: every generated column the tables hold, same name

    @classmethod
    def parse(cls, spec: str) -> CaptionSource:
        url, _, picks = spec.partition("#")
        columns = {}
        for item in filter(None, (p.strip() for p in picks.split(","))):
            source, _, target = item.partition("=")
            target = target or source
            if (
                source not in GENERATED
                or target not in GENERATED
                or (source == schema.REWRITES) != (target == schema.REWRITES)
            ):
                raise ValueError(
                    f"caption source {spec!r}: {item!r} must pick a generated column {GENERATED} and may rename "
                    "vecap and vlm_caption into each other, e.g. vecap=vlm_caption"
                )
            columns[source] = target
        return cls(url.rstrip("/"), columns)

    def resolve(self, names: list[str]) -> CaptionSource:
        """With its columns made explicit (provenance included) from the tables' column names."""
        picked = self.columns or {c: c for c in GENERATED if c in names}
        missing = sorted(set(picked) - set(names))
        if missing:
            raise ValueError(f"{self.url} has no column(s) {missing}; it has {sorted(set(names) & set(GENERATED))}")
        provenance = {
            schema.provenance_column(s): schema.provenance_column(t)
            for s, t in picked.items()
            if schema.provenance_column(s) in names
        }
        # flags, and a score output's scores (veclip score), ride along under their own names
        extra = {c: c for c in (schema.REWRITE_FLAGS, *SCORES) if c in names}
        return replace(self, columns={**picked, **provenance, **extra})


@dataclass(frozen=True)
class Shard:
    path: str  # the shard holding the images (an input shard, or a whole shard)
    size: int
    captions: tuple[str, ...] = ()  # per caption source of the dataset, its table of this shard's rows


@dataclass(frozen=True)
class Dataset:
    url: str
    options: StorageOptions
    images_url: str  # the folder of the image shards (``url`` itself unless it is a caption output)
    shards: tuple[Shard, ...]
    sources: tuple[CaptionSource, ...] = ()  # the caption outputs joined, columns resolved
    skipped: dict = field(default_factory=dict)  # {why a shard is left out: count}

    @property
    def images(self) -> Location:
        return Location(self.images_url, self.options)

    @property
    def caption_columns(self) -> tuple[str, ...]:
        """The columns the caption sources add (their captions, provenance and flags)."""
        return tuple(dict.fromkeys(t for s in self.sources for t in s.columns.values()))


@dataclass(frozen=True)
class Acceptance:
    """What a reader takes from an output that is not whole; by default nothing: it refuses, saying why."""

    fingerprint: str = ""
    """of an output mixing configurations, the one to take (the others left out, counted)"""
    missing_shards: bool = False
    """take an output some of whose marked shards are gone (left out, counted)"""


class UnsoundOutput(ValueError):
    """An output a reader would read part of, or a mix of, without being told to."""


def _caption_output(
    url: str, options: StorageOptions, accept: Acceptance = Acceptance()
) -> tuple[Location, list[dict], dict, object]:
    location = Location(url, options)
    entries, skipped = finished_shard_entries(location)
    markers = ShardStore(location).markers() if entries else {}  # none for plain input; read once for both
    entries = _accepted(location, entries, skipped, markers, accept)
    return location, entries, skipped, caption_tables(location, entries, markers)


def _accepted(location: Location, entries: list[dict], skipped: dict, markers: dict, accept: Acceptance) -> list[dict]:
    """``entries`` of a stage's output (``markers``: its markers), refused when marked shards are gone or the
    markers hold more than one configuration, unless ``accept`` says what to take (the rest counted in
    ``skipped``)."""
    if skipped.get(MARKED_BUT_MISSING) and not accept.missing_shards:
        raise UnsoundOutput(
            f"{location.url}: {skipped[MARKED_BUT_MISSING]} shard(s) marked done whose file is gone (a lifecycle "
            "rule, a manual rm): rerun the stage that wrote it to redo them, or read the rest with "
            "--set accept.missing_shards=true"
        )
    configs = Counter(markers[n].fingerprint for n in (posixpath.basename(e["name"]) for e in entries) if n in markers)
    if len(configs) <= 1 and not accept.fingerprint:
        return entries
    if accept.fingerprint not in configs:
        held = ", ".join(f"{fp} ({n} shards)" for fp, n in configs.most_common())
        raise UnsoundOutput(
            f"{location.url} holds {len(configs)} configurations ({held}): a rewrite with --redo-mismatched that did "
            "not finish. Rerun it, or read one with --set accept.fingerprint=FINGERPRINT"
            + (f" ({accept.fingerprint!r} is none of them)" if accept.fingerprint else "")
        )
    kept = [e for e in entries if markers[posixpath.basename(e["name"])].fingerprint == accept.fingerprint]
    if dropped := len(entries) - len(kept):
        skipped[f"another configuration than {accept.fingerprint}"] = dropped
    return kept


def _column_names(location: Location, path: str) -> list[str]:
    with location.fs.open(path, "rb") as f:
        return pq.read_schema(f).names


def open_dataset(
    url: str,
    options: StorageOptions | None = None,
    add_captions: tuple[str, ...] = (),
    stage: str = "read",
    accept: Acceptance = Acceptance(),
) -> Dataset:
    """The image shards of ``url`` (finished ones, for a stage's output) with the caption
    tables to join to each: ``url``'s own when it is a caption output, and those of
    every ``add_captions`` source (caption outputs of the same input). A shard some
    source has not finished is left out and counted; an output missing marked shards or
    mixing configurations is refused unless ``accept`` says what to take."""
    options = options or StorageOptions()
    first = CaptionSource.parse(url)
    location, entries, skipped, tables = _caption_output(first.url, options, accept)
    if not entries:
        raise no_shards(stage, first.url)
    if tables:
        images_url, shards = tables.inputs_url, {i: (size, [c]) for c, (i, size) in tables.inputs.items()}
        sources = [first.resolve(_column_names(location, entries[0]["name"]))]
    elif first.columns:
        raise ValueError(f"{url}: #columns picks from a caption output, and {first.url} is not one")
    else:
        images_url, shards, sources = location.url, {e["name"]: (int(e["size"]), []) for e in entries}, []
    images = Location(images_url, options)
    taken = set(_column_names(images, next(iter(shards)))) | {t for s in sources for t in s.columns.values()}
    for spec in add_captions:
        wanted = CaptionSource.parse(spec)
        extra, extra_entries, _, extra_tables = _caption_output(wanted.url, options, accept)
        if not extra_tables:
            raise ValueError(
                f"{wanted.url} is not a caption output (rewrite --layout captions): only caption tables can be added"
            )
        if images.fs._strip_protocol(extra_tables.inputs_url) != images.fs._strip_protocol(images_url):
            raise ValueError(f"{wanted.url} holds captions of {extra_tables.inputs_url}, not of {images_url}")
        source = wanted.resolve(_column_names(extra, extra_entries[0]["name"]))
        clash = sorted(t for t in source.columns.values() if t in taken and t in (*GENERATED, *SCORES))
        if clash:
            raise ValueError(
                f"{wanted.url} would fill {clash}, which another source already fills; pick or rename "
                f"columns with URL#COLUMNS, e.g. --input A#vecap --add-captions B#vecap=vlm_caption"
            )
        taken |= set(source.columns.values())
        by_input = {i: c for c, (i, _) in extra_tables.inputs.items()}
        missing = [path for path in shards if path not in by_input]
        if missing:
            skipped[f"no finished caption table in {wanted.url}"] = len(missing)
        shards = {p: (size, [*tables_of, by_input[p]]) for p, (size, tables_of) in shards.items() if p in by_input}
        sources.append(source)
    ordered = tuple(Shard(p, size, tuple(c)) for p, (size, c) in sorted(shards.items()))
    return Dataset(location.url, options, images_url, ordered, tuple(sources), skipped)


def read_caption_tables(shard: Shard, dataset: Dataset, columns=None) -> list[tuple[str, dict, pa.Table]]:
    """``shard``'s caption tables, whole (small: keys and text only): per source its table's path, the
    columns picked ``{source name: target name}`` (``columns``: only these targets, default all), and
    the keys with those columns."""
    out = []
    for source, path in zip(dataset.sources, shard.captions):
        picked = {s: t for s, t in source.columns.items() if columns is None or t in columns}
        fs = Location(source.url, dataset.options).fs
        out.append((path, picked, read_table(fs, path, [schema.KEY, *picked])))
    return out


def join_captions(
    table: pa.Table, shard: Shard, first_row: int, dataset: Dataset, columns=None, captions=None
) -> pa.Table:
    """``table`` (rows ``first_row``.. of ``shard``, keys included) with each caption source's
    rows beside it, checked key by key; ``columns``: only these caption columns (default all);
    ``captions``: :func:`read_caption_tables` already read (a shard joined a batch at a time reads
    them once). The flags of several sources are concatenated per row."""
    for path, picked, whole in read_caption_tables(shard, dataset, columns) if captions is None else captions:
        part = whole.slice(first_row, table.num_rows)
        check_aligned(table.column(schema.KEY), part.column(schema.KEY), first_row, path, shard.path)
        for name, target in picked.items():
            column = part.column(name)
            if target in table.column_names:  # flags from an earlier source
                merged = [(a or []) + (b or []) for a, b in zip(table.column(target).to_pylist(), column.to_pylist())]
                table = table.set_column(table.column_names.index(target), target, pa.array(merged, column.type))
            else:
                table = table.append_column(target, column)
    return table


def first_difference(a: list, b: list) -> int:
    """The first index where two key lists differ (the shorter one's length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_aligned(
    keys: pa.ChunkedArray, caption_keys: pa.ChunkedArray, first_row: int, captions_path: str, input_path: str
) -> None:
    if len(keys) == len(caption_keys) and keys.equals(caption_keys):
        return
    a, b = keys.to_pylist(), caption_keys.to_pylist()
    at = first_difference(a, b)
    raise CaptionMismatch(
        f"caption table {captions_path} does not line up with its input {input_path}: row {first_row + at} "
        f"is {a[at] if at < len(a) else None!r} in the input but {b[at] if at < len(b) else None!r} in the captions; "
        "rewrite that shard again"
    )


def read_shard_batches(
    dataset: Dataset, shard: Shard, columns: list[str] | None = None, column_map=None
) -> Iterator[pa.Table]:
    """A shard's rows a batch at a time (:func:`~veclip.storage.read_batches`), captions joined: memory
    holds one batch's image bytes, never a whole ~1 GB shard or row group."""
    column_map = column_map or schema.ColumnMap()
    if columns is not None and shard.captions and column_map.key not in columns:
        columns = [column_map.key, *columns]
    first, captions = 0, read_caption_tables(shard, dataset)  # once per shard, not per batch
    for batch in read_batches(dataset.images.fs, shard.path, columns):
        table = column_map.apply(batch)
        yield join_captions(table, shard, first, dataset, captions=captions) if shard.captions else table
        first += table.num_rows


def read_shard(dataset: Dataset, shard: Shard, columns: list[str] | None = None, column_map=None) -> pa.Table:
    """A whole shard's rows, captions joined (``columns``: image-shard columns to read, default all)."""
    column_map = column_map or schema.ColumnMap()
    if columns is not None and shard.captions and column_map.key not in columns:
        columns = [column_map.key, *columns]
    table = column_map.apply(read_table(dataset.images.fs, shard.path, columns))
    return join_captions(table, shard, 0, dataset) if shard.captions else table
