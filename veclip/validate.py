"""``veclip validate``: is a folder of Parquet shards usable as input?

Checks, per shard and across shards: the file is Parquet, the schema follows
the input contract (after the column mapping), keys are non-null and unique,
images decode (a sample per shard, every row, or none), and how much AltText is
empty (reported, not an error: VeCap fills it in). Every problem names the
shard, the row and the key.

Built for a 300M-row bucket: footers are read concurrently up front; the
sample reads the image bytes of ``sample_row_groups`` row groups per shard
only (the key and AltText columns are small and read whole); keys are checked
for duplicates across shards with bounded memory (:mod:`veclip.keyindex`).
"""

from __future__ import annotations

import dataclasses
import posixpath
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from veclip import schema
from veclip.command import Command, Flag
from veclip.dataset import first_difference
from veclip.images import ImageError, ImageLimits, decode_image
from veclip.keyindex import KeyIndex
from veclip.shards.store import CaptionTables, ShardStore, caption_tables, finished_shard_entries
from veclip.storage import Location, StorageOptions, list_file_entries, read_batches, read_footers, read_table

IMAGE_CHECKS = ("sample", "full", "none")
# Problems that make a dataset unusable whatever the tolerance.
FATAL = ("no_shards", "unreadable", "schema", "null_key", "duplicate_key", "caption_misaligned")


@dataclass(frozen=True)
class ValidateConfig:
    url: str = ""
    """folder or s3:// prefix holding .parquet shards"""
    columns: schema.ColumnMap = field(default_factory=schema.ColumnMap)
    """the dataset's column names for the contract's roles (see schema.ColumnMap)"""
    images: Literal["sample", "full", "none"] = "sample"
    """decode a sample per shard, every image, or none"""
    sample_per_shard: int = 32
    """images decoded per shard with images=sample"""
    sample_row_groups: int = 1
    """row groups per shard the sample is drawn from (their image bytes are all that is read)"""
    max_bad_image_share: float = 0.0
    """of checked images"""
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_keys_in_memory: int = 20_000_000
    """beyond this, keys are spilled to local disk for the duplicate check"""

    def __post_init__(self):
        if self.images not in IMAGE_CHECKS:
            raise ValueError(f"validate: images must be one of {IMAGE_CHECKS}, got {self.images!r}")
        if not 0.0 <= self.max_bad_image_share <= 1.0:
            raise ValueError("validate: max_bad_image_share must be within [0, 1]")


@dataclass(frozen=True)
class Problem:
    kind: str
    shard: str
    message: str
    row: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.shard + (f" row {self.row}" if self.row is not None else "")
        where += f" (key {self.key!r})" if self.key is not None else ""
        return f"[{self.kind}] {where}: {self.message}"


@dataclass
class ShardReport:
    shard: str
    rows: int = 0
    null_keys: int = 0
    duplicate_keys: int = 0
    images_checked: int = 0
    bad_images: int = 0
    empty_alt_text: int = 0
    readable: bool = True


@dataclass
class ValidationReport:
    url: str
    config: ValidateConfig
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    key_partitions: int = 1  # >1: keys were spilled to disk in that many partitions (bounded memory)
    caption_tables_of: str | None = (
        None  # a caption-layout output: the inputs were checked, and each table against its input
    )

    @property
    def totals(self) -> ShardReport:
        total = ShardReport("TOTAL")
        for report in self.shards:
            for name in ("rows", "null_keys", "duplicate_keys", "images_checked", "bad_images", "empty_alt_text"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
        return total

    @property
    def bad_image_share(self) -> float:
        total = self.totals
        return total.bad_images / total.images_checked if total.images_checked else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.usable else 1

    @property
    def usable(self) -> bool:
        if any(p.kind in FATAL for p in self.problems):
            return False
        return self.bad_image_share <= self.config.max_bad_image_share

    def render(self, max_problems: int = 20) -> str:
        """The summary table, then the problems (first few of each kind), then the verdict."""
        header = ("shard", "rows", "null keys", "dup keys", "imgs checked", "bad imgs", "empty alt_text")
        lines = []
        rows = [*self.shards, self.totals]
        for report in rows:
            empty = f"{report.empty_alt_text} ({report.empty_alt_text / report.rows:.0%})" if report.rows else "0"
            cells = (
                report.shard if report.readable else report.shard + " (unreadable)",
                report.rows,
                report.null_keys,
                report.duplicate_keys,
                report.images_checked,
                report.bad_images,
                empty,
            )
            lines.append([str(c) for c in cells])
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )
        out = [f"dataset {self.url}  (columns: {self.config.columns}, images: {self.config.images})", fmt(header)]
        if self.caption_tables_of:
            out.insert(
                0, f"caption tables {self.caption_tables_of}: checked against their inputs, row by row; the inputs:"
            )
        out += [fmt(line) for line in lines]
        for name in self.ignored_files:
            out.append(f"note: ignored non-Parquet file {name}")
        kinds = Counter(p.kind for p in self.problems)
        for kind, count in kinds.items():
            shown = [p for p in self.problems if p.kind == kind][:max_problems]
            out += [f"problem: {p}" for p in shown]
            if count > len(shown):
                out.append(f"problem: ... and {count - len(shown)} more [{kind}]")
        if self.usable:
            out.append(f"OK: usable ({self.totals.rows} rows in {len(self.shards)} shards)")
        else:
            reasons = ", ".join(f"{n} {k}" for k, n in kinds.items())
            if self.bad_image_share > self.config.max_bad_image_share:
                reasons += (
                    f"; bad image share {self.bad_image_share:.2%} > allowed {self.config.max_bad_image_share:.2%}"
                )
            out.append(f"NOT USABLE: {reasons}")
        return "\n".join(out)


def _sample(
    footer: pq.FileMetaData, shard_name: str, config: ValidateConfig
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(row groups to read, [(row to check, its index among the rows read)])``: every row for ``full``; else up to
    ``sample_per_shard`` rows spread evenly over ``sample_row_groups`` row groups,
    themselves spread over the shard from an offset that differs per shard (so a
    dataset's samples cover every position while each shard reads few groups)."""
    num_rows, groups = footer.num_rows, footer.num_row_groups
    if config.images == "none" or num_rows == 0:
        return [], []
    if config.images == "full" or num_rows <= config.sample_per_shard:
        return list(range(groups)), [(row, row) for row in range(num_rows)]
    take = min(groups, max(1, config.sample_row_groups))
    offset = zlib.crc32(shard_name.encode()) % groups
    chosen = sorted({(offset + int(i * groups / take)) % groups for i in range(take)})
    starts = np.cumsum([0] + [footer.row_group(g).num_rows for g in range(groups)])
    pool = [int(row) for g in chosen for row in range(starts[g], starts[g + 1])]  # the rows read, in read order
    count = min(len(pool), config.sample_per_shard)
    return chosen, [(pool[int(i * len(pool) / count)], int(i * len(pool) / count)) for i in range(count)]


def _check_shard(
    location: Location, path: str, footer, config: ValidateConfig, keys_index: KeyIndex, report: ValidationReport
) -> None:
    name = posixpath.relpath(path, location.path)
    shard = ShardReport(name)
    report.shards.append(shard)
    problem = lambda kind, message, row=None, key=None: report.problems.append(Problem(kind, name, message, row, key))
    if isinstance(footer, str):
        shard.readable = False
        problem("unreadable", f"not a readable Parquet file ({footer})")
        return
    shard.rows = footer.num_rows
    try:
        for message in schema.input_schema_problems(config.columns.apply_to_footer(footer)):
            problem("schema", message)
    except schema.SchemaError as err:
        problem("schema", str(err))
    if any(p.kind == "schema" and p.shard == name for p in report.problems):
        return

    columns = config.columns
    table = columns.apply(read_table(location.fs, path, [columns.key, columns.alt_text]))
    keys = table.column(schema.KEY)
    for row in np.flatnonzero(np.asarray(keys.is_null())):
        shard.null_keys += 1
        problem("null_key", "key is null; every row needs a unique key", int(row))
    keys_index.add(len(report.shards) - 1, keys.combine_chunks())

    alt = pc.utf8_trim_whitespace(table.column(schema.ALT_TEXT).cast(pa.string()))
    shard.empty_alt_text = int(pc.sum(pc.or_kleene(pc.is_null(alt), pc.equal(alt, ""))).as_py() or 0)

    groups, rows_to_check = _sample(footer, name, config)
    if not rows_to_check:
        return
    read = 0
    for batch in read_batches(location.fs, path, [columns.image], groups):  # one batch's images in memory at a time
        images = batch.column(0)
        for row, position in rows_to_check:
            if read <= position < read + len(images):
                shard.images_checked += 1
                try:
                    decode_image(images[position - read].as_py(), config.image_limits)
                except ImageError as err:
                    shard.bad_images += 1
                    problem("bad_image", f"{err.reason}: {err.detail}", row, keys[row].as_py())
        read += len(images)


def validate(config: ValidateConfig, options: StorageOptions | None = None) -> ValidationReport:
    """Check a folder of shards; for caption tables (``rewrite --layout captions``), their inputs,
    and that every table holds its input's keys in the input's order."""
    options = options or StorageOptions()
    location = Location(config.url, options)
    entries, _ = finished_shard_entries(location) if ShardStore(location).done() else ([], {})
    tables = caption_tables(location, entries)
    if tables:
        report = validate(dataclasses.replace(config, url=tables.inputs_url), options)
        report.caption_tables_of = config.url
        _check_alignment(location, tables, report)
        return report
    return _validate_shards(config, location)


def _check_alignment(location: Location, tables: CaptionTables, report: ValidationReport) -> None:
    inputs = Location(tables.inputs_url, location.options)
    for table, (source, _) in sorted(tables.inputs.items()):
        captions = read_table(location.fs, table, [schema.KEY]).column(schema.KEY).to_pylist()
        key_column = report.config.columns.key
        keys = report.config.columns.apply(read_table(inputs.fs, source, [key_column])).column(schema.KEY).to_pylist()
        if captions != keys:
            row = first_difference(keys, captions)
            report.problems.append(
                Problem(
                    "caption_misaligned",
                    posixpath.basename(table),
                    f"{len(captions)} caption rows for {len(keys)} input rows of {source}; first difference at row "
                    f"{row}",
                    row,
                )
            )


def _validate_shards(config: ValidateConfig, location: Location) -> ValidationReport:
    report = ValidationReport(config.url, config)
    entries = list_file_entries(location)  # raises FileNotFoundError naming the URL
    shards = [e for e in entries if e["name"].endswith(".parquet")]
    report.ignored_files = [posixpath.basename(e["name"]) for e in entries if not e["name"].endswith(".parquet")]
    if not shards:
        hint = (
            f" (found {len(entries)} other files, e.g. {report.ignored_files[0]}: convert them with `veclip import`)"
            if entries
            else ""
        )
        report.problems.append(Problem("no_shards", config.url, "no .parquet shards in this folder" + hint))
        return report
    footers = read_footers(location.fs, [(e["name"], int(e["size"])) for e in shards])
    expected_keys = sum(f.num_rows for f in footers.values() if not isinstance(f, str))
    keys_index = KeyIndex(expected_keys, config.max_keys_in_memory)
    report.key_partitions = keys_index.partitions
    for entry in shards:
        _check_shard(location, entry["name"], footers[entry["name"]], config, keys_index, report)
    for dup in keys_index.duplicates():
        shard = report.shards[dup.shard]
        shard.duplicate_keys += 1
        first = report.shards[dup.first_shard].shard
        report.problems.append(
            Problem("duplicate_key", shard.shard, f"key also used at {first} row {dup.first_row}", dup.row, dup.key)
        )
    return report


def run_validate(config: ValidateConfig, options: StorageOptions, run=None) -> ValidationReport:
    return validate(config, options)


COMMAND = Command(
    "validate",
    "check a folder of Parquet shards against the input schema",
    ValidateConfig,
    run_validate,
    flags=(
        Flag("url", "url", metavar="URL"),
        "columns",
        "images",
        "sample_per_shard",
        "sample_row_groups",
        "max_keys_in_memory",
        "max_bad_image_share",
    ),
)
