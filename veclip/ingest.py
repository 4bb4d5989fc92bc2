"""``veclip import``: bring users' existing corpora into our Parquet shards.

Two sources, both streamed and resumable shard by shard:

* **webdataset** — a folder/prefix of ``.tar`` shards as img2dataset writes
  them (``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json``). One tar -> one output
  shard of the same stem.
* **csv** — a CSV of image paths (relative to the CSV's folder; absolute
  paths and URLs only with ``allow_outside_paths``) and captions. Every
  ``rows_per_shard`` CSV rows -> one output shard.

img2dataset's Parquet needs no import: every stage reads it through a column
mapping (``--columns image=jpg,alt_text=caption``).

Bad samples (missing or undecodable image, missing file, truncated tar, a tar
member over the size limit, a CSV path outside the CSV's folder) are
quarantined with a reason; they never stop the run and never vanish.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import typing
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from veclip import schema
from veclip.command import Command, Flag, Said
from veclip.images import IMAGE_EXTENSIONS, ImageError, ImageLimits, open_image, resize_jpeg
from veclip.shards.card import write_card
from veclip.shards.layout import output_shard_name
from veclip.shards.lease import OutputLease
from veclip.shards.marker import Marker
from veclip.shards.plan import InputShard, by_name
from veclip.shards.store import ShardStore
from veclip.storage import (
    BATCH_ROWS,
    Location,
    StorageOptions,
    cat_literal,
    filesystem,
    list_files,
    read_batches,
    refuse_overlap,
    with_retries,
)

Format = Literal["auto", "webdataset", "csv"]
FORMATS = typing.get_args(Format)
STAGE = "import"
MEMBER_TOO_LARGE = "member_too_large"  # a tar member over image_limits.max_bytes, left unread
PATH_OUTSIDE_SOURCE = "path_outside_source"  # a CSV image path outside the CSV's folder
PATH_WILDCARD = "path_wildcard"  # a CSV image path with * or ?: one row names one file
FIELD_TOO_LARGE = "field_too_large"  # a CSV field over CSV_FIELD_LIMIT: no caption or path is that long
INVALID_UTF8 = "invalid_utf8"  # a CSV row that is not UTF-8
CSV_FIELD_LIMIT = 128 * 1024  # the csv module's default: larger fields are read, then the row quarantined


@dataclass(frozen=True)
class ImportConfig:
    source: str = ""
    """a folder of .tar shards, or a .csv file"""
    output: str = ""
    """output folder or s3:// prefix"""
    format: Format = "auto"
    """auto (from the source), webdataset or csv"""
    columns: schema.ColumnMap = field(default_factory=schema.ColumnMap)
    """For CSV: which columns hold the image path, the caption and (optionally) the key."""
    rows_per_shard: int = 10_000
    """CSV: rows per output shard"""
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    """max_bytes also bounds every tar member"""
    allow_outside_paths: bool = False
    """CSV: also read absolute paths, URLs and paths above the CSV's folder"""
    resize: int = 0
    """pre-resize: images with a larger short side are scaled to this (e.g. 384) and re-encoded as JPEG (quality 90)"""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"import: format must be one of {FORMATS}, got {self.format!r}")
        if self.rows_per_shard < 1:
            raise ValueError("import: rows_per_shard must be >= 1")
        if self.resize < 0:
            raise ValueError("import: resize must be >= 0 (0 keeps the images' bytes)")

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return "csv" if self.source.lower().endswith(".csv") else "webdataset"

    def fingerprint(self) -> str:
        """What the output's shards are cut from and how: a rerun under another would duplicate or lose rows
        against the shards already marked (another cut), or mix two treatments of the images."""
        csv_cut = self.rows_per_shard if self.resolved_format() == "csv" else None
        source = os.path.realpath(self.source) if "://" not in self.source else self.source.rstrip("/")
        settings = [source, self.resolved_format(), csv_cut, self.resize, str(self.columns), repr(self.image_limits)]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


@dataclass
class ImportSummary:
    shards_written: int = 0
    shards_skipped: int = 0
    rows: int = 0
    resized: int = 0
    quarantined: Counter = field(default_factory=Counter)

    def add(self, marker: Marker) -> None:
        self.shards_written += 1
        self.rows += marker.rows
        self.resized += marker.stats.get("resized", 0)
        self.quarantined.update(marker.quarantine_reasons)

    def render(self) -> str:
        lines = [
            f"import: {self.shards_written} shards written, {self.shards_skipped} already done (skipped), "
            f"{self.rows} rows, {sum(self.quarantined.values())} quarantined"
            + (f", {self.resized} images resized" if self.resized else "")
        ]
        lines += [f"  quarantined {n:>6}  {reason}" for reason, n in self.quarantined.most_common()]
        return "\n".join(lines)


class _ShardBuilder:
    """Collects one output shard: its good rows spilled to a local Parquet file a batch at a time (memory
    holds a batch of images, never the shard's ~1 GB), its quarantined rows with their reasons."""

    def __init__(self, limits: ImageLimits, resize: int = 0):
        self.limits, self.resize = limits, resize
        self.rows = 0
        self.bad: list[dict] = []
        self.resized = 0
        self._pending: list[dict] = []
        self._spill = tempfile.TemporaryDirectory(prefix="veclip-import-")
        self._spill_path = os.path.join(self._spill.name, "rows.parquet")
        self._writer = pq.ParquetWriter(
            self._spill_path, schema.IMPORT_SCHEMA, compression="none", use_dictionary=False
        )

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=schema.IMPORT_SCHEMA))
        self._pending.clear()

    def add(
        self,
        key: str,
        image: bytes | None,
        alt_text: str | None,
        url: str | None = None,
        reason: str | None = None,
        detail: str = "",
        source_json: str | None = None,
    ) -> None:
        row = {schema.KEY: key, schema.IMAGE: image, schema.ALT_TEXT: alt_text, schema.URL: url}
        row[schema.SOURCE_JSON] = source_json
        if reason is None:
            try:
                opened = open_image(image, self.limits)
                width, height = opened.size
                if self.resize and min(width, height) > self.resize:
                    row[schema.IMAGE], (width, height) = resize_jpeg(opened, self.resize)
                    self.resized += 1
                row.update({schema.WIDTH: width, schema.HEIGHT: height})
            except ImageError as err:
                reason, detail = err.reason, err.detail
        if reason is None:
            self._pending.append(row)
            self.rows += 1
            if len(self._pending) >= BATCH_ROWS:
                self._flush()
        else:
            self.bad.append({**row, "reason": reason, "detail": detail})

    def write(self, store: ShardStore, name: str, fingerprint: str) -> Marker:
        self._flush()
        self._writer.close()
        quarantine = schema.quarantine_table(self.bad, STAGE, schema.IMPORT_SCHEMA)
        reasons = Counter(row["reason"] for row in self.bad)
        stats = {"resized": self.resized}
        marker = Marker(name, 0, quarantine_reasons=dict(reasons), stats=stats, fingerprint=fingerprint)
        try:
            return store.write(marker, read_batches(fsspec.filesystem("file"), self._spill_path), quarantine)
        finally:
            self._spill.cleanup()


# -- webdataset -------------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


class _Oversized:
    """A tar member left unread: its header declares more bytes than the limit."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size


def _tar_samples(fileobj, max_member_bytes: int):
    """Yield ``(key, {ext: bytes | _Oversized})`` from a tar stream; files of one sample
    are adjacent. A member's size is checked from its header before it is read, so a
    huge member (or a gzip bomb's) streams past without ever being held in memory."""
    key, files = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_member(member.name)
            if key is not None and member_key != key:
                yield key, files
                files = {}
            key = member_key
            files[ext] = (
                _Oversized(member.name, member.size)
                if member.size > max_member_bytes
                else tar.extractfile(member).read()
            )
    if key is not None:
        yield key, files


def _webdataset_row(key: str, files: dict, builder: _ShardBuilder) -> None:
    oversized = [f for f in files.values() if isinstance(f, _Oversized)]
    if oversized:
        detail = ", ".join(f"{f.name}: {f.size} bytes" for f in oversized) + f" > limit {builder.limits.max_bytes}"
        builder.add(posixpath.basename(key), None, None, reason=MEMBER_TOO_LARGE, detail=detail)
        return
    meta, whole = {}, None
    if "json" in files:
        whole = files["json"].decode("utf-8", errors="replace")
        try:
            meta = json.loads(whole)
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    text = files.get("txt")
    alt_text = text.decode("utf-8", errors="replace") if text is not None else meta.get("caption")
    row_key = str(meta.get("key") or posixpath.basename(key))
    if image is None:
        builder.add(
            row_key, None, alt_text, meta.get("url"), "missing_image", f"sample {key} has files {sorted(files)}", whole
        )
    else:
        builder.add(row_key, image, alt_text, meta.get("url"), source_json=whole)


def import_webdataset(config: ImportConfig, options: StorageOptions, log=print) -> ImportSummary:
    source = Location(config.source, options)
    tars = [p for p in list_files(source) if p.endswith((".tar", ".tar.gz", ".tgz"))]
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {config.source}")
    by_name(STAGE, [InputShard(p, 0) for p in tars], config.source)  # x.tar and x.tar.gz: one x.parquet
    store, summary = ShardStore(Location(config.output, options)), ImportSummary()
    done = store.done()
    for path in tars:
        name = output_shard_name(path)
        if name in done:
            summary.shards_skipped += 1
            continue
        builder = with_retries(lambda path=path: _read_tar(source, path, config), f"import: reading {path}")
        summary.add(builder.write(store, name, config.fingerprint()))
        log(f"import: {posixpath.basename(path)} -> {name} ({builder.rows} rows, {len(builder.bad)} quarantined)")
    return summary


def _read_tar(source: Location, path: str, config: ImportConfig) -> _ShardBuilder:
    """One tar's rows. A truncated or corrupt archive keeps what was read and says so in quarantine; a
    transient read error (a reset, a timeout) is raised, so the read is tried again, never recorded as loss."""
    builder = _ShardBuilder(config.image_limits, config.resize)
    try:
        with source.fs.open(path, "rb") as f:
            for key, files in _tar_samples(f, config.image_limits.max_bytes):
                _webdataset_row(key, files, builder)
    except (tarfile.TarError, EOFError) as err:
        # Keep what was read; the rest of the file is unreadable: say so in quarantine.
        builder.add(
            posixpath.basename(path), None, None, reason="truncated_archive", detail=f"{type(err).__name__}: {err}"
        )
    return builder


# -- CSV of image paths -----------------------------------------------------------------------


class RefusedPath(PermissionError):
    """A CSV image path that is not read: its row is quarantined with :attr:`reason`."""

    reason = ""


class OutsideSource(RefusedPath):
    """A CSV image path that leaves the CSV's folder without ``allow_outside_paths``."""

    reason = PATH_OUTSIDE_SOURCE


class WildcardPath(RefusedPath):
    """A CSV image path with ``*`` or ``?``: a pattern (``**`` would be a whole folder), never expanded."""

    reason = PATH_WILDCARD


def _resolve(path: str, base: Location, options: StorageOptions, allow_outside: bool):
    """``(filesystem, path)`` of one CSV image path. A CSV is data from elsewhere: its
    paths stay inside the CSV's folder (no absolute paths, URLs or ``..``) unless the
    user allows otherwise. Paths are read literally (``photo[1].jpg`` is that file); one with a wildcard
    is refused, not taken for the file it would match."""
    if wildcards := sorted({c for c in path if c in "*?"}):
        raise WildcardPath(f"{path!r} holds {' and '.join(wildcards)}: each row names one file, read as written")
    if "://" in path or posixpath.isabs(path):
        if not allow_outside:
            raise OutsideSource(f"{path!r} is absolute or a URL; pass --allow-outside-paths to read it")
        return filesystem(path, options) if "://" in path else (base.fs, path)
    resolved = posixpath.normpath(base.join(path))
    if not allow_outside and not _inside(resolved, base.path):
        raise OutsideSource(f"{path!r} leaves the CSV's folder; pass --allow-outside-paths to read it")
    if base.is_local and not allow_outside:
        real, folder = os.path.realpath(resolved), os.path.realpath(base.path)
        if not _inside(real, folder):  # a symlink inside the folder that points out of it
            raise OutsideSource(f"{path!r} is a link to {real}, outside the CSV's folder; pass --allow-outside-paths")
        if os.path.exists(real) and not os.path.isfile(real):  # a folder, a FIFO, a device: never read
            raise OutsideSource(f"{path!r} is not a regular file")
    return base.fs, resolved


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _fetch(
    paths: list[str], base: Location, options: StorageOptions, allow_outside: bool = False
) -> list[bytes | Exception]:
    """Read many files, concurrently where the filesystem can (s3fs batches ``cat``)."""
    groups: dict[int, tuple] = {}
    results: list = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            fs, resolved = _resolve(path, base, options, allow_outside)
        except (RefusedPath, ValueError) as err:  # outside the folder, a wildcard, a URL scheme we cannot read
            results[i] = err
            continue
        groups.setdefault(id(fs), (fs, []))[1].append((i, resolved))
    for fs, items in groups.values():
        contents = with_retries(
            lambda fs=fs, items=items: _cat_all(fs, [p for _, p in items]), "import: fetching images"
        )
        for i, resolved in items:
            results[i] = contents.get(resolved, FileNotFoundError(resolved))
    return results


def _cat_all(fs, paths: list[str]) -> dict:
    """The files' bytes, a missing one as its FileNotFoundError; any other error (transient) is raised, to be
    tried again."""
    contents = dict(zip(paths, cat_literal(fs, paths)))  # literal: `photo[1].jpg` is no pattern
    for value in contents.values():
        if isinstance(value, OSError) and not isinstance(value, FileNotFoundError):
            raise value
    return contents


def import_csv(config: ImportConfig, options: StorageOptions, log=print) -> ImportSummary:
    fs, csv_path = filesystem(config.source, options)
    if not fs.isfile(csv_path):
        raise FileNotFoundError(f"no such CSV file: {config.source}")
    base = Location(config.source.rsplit("/", 1)[0] if "/" in config.source else ".", options)
    stem = output_shard_name(csv_path)[: -len(".parquet")]
    store, summary = ShardStore(Location(config.output, options)), ImportSummary()
    done = store.done()
    cols = config.columns

    def flush(index: int, rows: list[dict]) -> None:
        name = f"{stem}-{index:05d}.parquet"
        if name in done:
            summary.shards_skipped += 1
            return
        builder = _ShardBuilder(config.image_limits, config.resize)
        for row, content in _fetched(rows, base, options, config):
            key, text, path = row["__key"], row.get(cols.alt_text), row.get(cols.image) or ""
            if row.get("__bad"):
                builder.add(key, None, None, None, *row["__bad"])
            elif isinstance(content, RefusedPath):
                builder.add(key, None, text, path, content.reason, str(content))
            elif isinstance(content, Exception) or not path:
                builder.add(key, None, text, path or None, "missing_file", f"{path!r}: {content}")
            else:
                builder.add(key, content, text, row.get(cols.url) or path)
        summary.add(builder.write(store, name, config.fingerprint()))
        log(f"import: {name} ({builder.rows} rows, {len(builder.bad)} quarantined)")

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # read a huge field, then quarantine its row
    with fs.open(csv_path, "rb") as raw:
        # surrogateescape: a row that is not UTF-8 is read (and quarantined), not the end of the import
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=""))
        missing = [c for c in (cols.image, cols.alt_text) if c not in (reader.fieldnames or [])]
        if missing:
            raise schema.SchemaError(
                f"{config.source}: CSV has no column(s) {missing}; its columns are {reader.fieldnames}. "
                "Map yours with --columns image=<path column>,alt_text=<caption column>"
            )
        batch, shard_index = [], 0
        for line_no, row in enumerate(reader):
            row["__bad"] = _bad_row(row)
            row["__key"] = (not row["__bad"] and row.get(cols.key)) or f"{stem}-{line_no:09d}"
            batch.append(row)
            if len(batch) == config.rows_per_shard:
                flush(shard_index, batch)
                batch, shard_index = [], shard_index + 1
        if batch:
            flush(shard_index, batch)
    return summary


def _fetched(rows: list[dict], base: Location, options: StorageOptions, config: ImportConfig):
    """``(row, its image bytes or the error)``, fetched a batch at a time: never a shard's images at once."""
    column = config.columns.image
    for start in range(0, len(rows), BATCH_ROWS):
        part = rows[start : start + BATCH_ROWS]
        yield from zip(part, _fetch([r.get(column) or "" for r in part], base, options, config.allow_outside_paths))


def _bad_row(row: dict) -> tuple[str, str] | None:
    """``(reason, detail)`` of a CSV row that cannot be imported as it is."""
    for column, value in row.items():
        if not isinstance(value, str):
            continue
        if len(value) > CSV_FIELD_LIMIT:
            return FIELD_TOO_LARGE, f"{column}: {len(value):,} characters (limit {CSV_FIELD_LIMIT:,})"
        if any("\udc80" <= c <= "\udcff" for c in value):
            return INVALID_UTF8, f"{column}: not UTF-8: {value.encode('utf-8', 'backslashreplace')[:200]!r}"
    return None


def run_import(config: ImportConfig, options: StorageOptions | None = None, log=print) -> ImportSummary:
    options = options or StorageOptions()
    refuse_overlap("import", config.output, [config.source], options)
    out = Location(config.output, options)
    lease = OutputLease(out, uuid.uuid4().hex[:12])  # one import into an output at a time
    lease.acquire()
    try:
        _refuse_another_cut(ShardStore(out), config)
        run = import_csv if config.resolved_format() == "csv" else import_webdataset
        summary = run(config, options, log)
        write_card(out, "import", config.source, log=log)
    finally:
        lease.release()
    return summary


class ImportChanged(ValueError):
    """The output was imported under another source, cut, resize, columns or image limits."""


def _refuse_another_cut(store: ShardStore, config: ImportConfig) -> None:
    held = {m.fingerprint for m in store.markers().values()} - {None}  # None: imported before fingerprints
    if held - {config.fingerprint()}:
        raise ImportChanged(
            f"import: {store.location.url} was imported under other settings (fingerprint {', '.join(sorted(held))} "
            f"then, {config.fingerprint()} now): the source, --rows-per-shard, --resize, --columns or the image "
            "limits changed. A rerun would duplicate or lose rows against the shards cut the old way, or mix two "
            "treatments of the images: import into a new output, or remove this one first"
        )


COMMAND = Command(
    "import",
    "convert webdataset tars or a CSV of image paths into Parquet shards",
    ImportConfig,
    lambda config, options, run=None: Said(run_import(config, options).render()),
    flags=(
        Flag("source", "source", metavar="SOURCE"),
        Flag("output", aliases=("--out",), required=True, metavar="URL"),
        "format",
        "columns",
        "rows_per_shard",
        Flag("resize", metavar="PX"),
        "allow_outside_paths",
    ),
)
