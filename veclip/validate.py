"""``veclip validate``: is a folder of Parquet shards usable as input?

Checks, per shard and across shards: the file is Parquet, the schema follows
the input contract (after the column mapping), keys are non-null and unique,
images decode (a sample per shard, every row, or none), and how much AltText is
empty (reported, not an error: VeCap fills it in). Every problem names the
shard, the row and the key.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from veclip import schema
from veclip.images import ImageError, ImageLimits, decode_image
from veclip.storage import Location, StorageOptions, list_files

IMAGE_CHECKS = ("sample", "full", "none")
# Problems that make a dataset unusable whatever the tolerance.
FATAL = ("no_shards", "unreadable", "schema", "null_key", "duplicate_key")


@dataclass(frozen=True)
class ValidateConfig:
    url: str
    columns: schema.ColumnMap = field(default_factory=schema.ColumnMap)
    images: str = "sample"  # sample | full | none
    sample_per_shard: int = 32
    max_bad_image_share: float = 0.0  # of checked images
    image_limits: ImageLimits = field(default_factory=ImageLimits)

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
                report.rows, report.null_keys, report.duplicate_keys, report.images_checked, report.bad_images, empty,
            )
            lines.append([str(c) for c in cells])
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [f"dataset {self.url}  (columns: {self.config.columns}, images: {self.config.images})", fmt(header)]
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
                reasons += f"; bad image share {self.bad_image_share:.2%} > allowed {self.config.max_bad_image_share:.2%}"
            out.append(f"NOT USABLE: {reasons}")
        return "\n".join(out)


def _sample_rows(num_rows: int, config: ValidateConfig) -> list[int]:
    if config.images == "none" or num_rows == 0:
        return []
    if config.images == "full" or num_rows <= config.sample_per_shard:
        return list(range(num_rows))
    step = num_rows / config.sample_per_shard  # evenly spread, deterministic
    return [int(i * step) for i in range(config.sample_per_shard)]


def _check_shard(location: Location, path: str, config: ValidateConfig, seen_keys: dict, report: ValidationReport) -> None:
    name = posixpath.relpath(path, location.path)
    shard = ShardReport(name)
    report.shards.append(shard)
    problem = lambda kind, message, row=None, key=None: report.problems.append(Problem(kind, name, message, row, key))
    try:
        with location.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            file_schema = parquet.schema_arrow
            shard.rows = parquet.metadata.num_rows
    except Exception as err:
        shard.readable = False
        problem("unreadable", f"not a readable Parquet file ({type(err).__name__}: {err})")
        return
    mapped = config.columns.apply(file_schema.empty_table()).schema
    for message in schema.input_schema_problems(mapped):
        problem("schema", message)
    if any(p.kind == "schema" and p.shard == name for p in report.problems):
        return

    columns = config.columns
    wanted = [columns.key, columns.alt_text]
    rows_to_check = _sample_rows(shard.rows, config)
    if rows_to_check:
        wanted.append(columns.image)
    table = columns.apply(pq.read_table(path, columns=wanted, filesystem=location.fs))

    keys = table.column(schema.KEY).to_pylist()
    for row, key in enumerate(keys):
        if key is None:
            shard.null_keys += 1
            problem("null_key", "key is null; every row needs a unique key", row)
        elif key in seen_keys:
            shard.duplicate_keys += 1
            first_shard, first_row = seen_keys[key]
            problem("duplicate_key", f"key also used at {first_shard} row {first_row}", row, key)
        else:
            seen_keys[key] = (name, row)

    alt = pc.utf8_trim_whitespace(table.column(schema.ALT_TEXT).cast(pa.string()))
    shard.empty_alt_text = int(pc.sum(pc.or_kleene(pc.is_null(alt), pc.equal(alt, ""))).as_py() or 0)

    if rows_to_check:
        images = table.column(schema.IMAGE)
        for row in rows_to_check:
            shard.images_checked += 1
            try:
                decode_image(images[row].as_py(), config.image_limits)
            except ImageError as err:
                shard.bad_images += 1
                problem("bad_image", f"{err.reason}: {err.detail}", row, keys[row])


def validate(config: ValidateConfig, options: StorageOptions | None = None) -> ValidationReport:
    location = Location(config.url, options or StorageOptions())
    report = ValidationReport(config.url, config)
    files = list_files(location)  # raises FileNotFoundError naming the URL
    shards = [p for p in files if p.endswith(".parquet")]
    report.ignored_files = [posixpath.basename(p) for p in files if not p.endswith(".parquet")]
    if not shards:
        hint = f" (found {len(files)} other files, e.g. {report.ignored_files[0]}: convert them with `veclip import`)" if files else ""
        report.problems.append(Problem("no_shards", config.url, "no .parquet shards in this folder" + hint))
        return report
    seen_keys: dict = {}
    for path in shards:
        _check_shard(location, path, config, seen_keys, report)
    return report
