"""Storage: URLs to filesystems, shard listing, and whole-shard writes with done markers.

One resolver turns a local path, ``file://`` URL or ``s3://`` URL into an
fsspec filesystem plus a path on it. That filesystem serves pyarrow directly,
Ray Data through :meth:`Location.arrow_fs`, and s3fs is what it is on S3.

The shard is the unit of work: an output shard is named after its input shard,
written whole (temp file, then rename or upload), and only then marked done by
a small JSON marker in ``_done/``. A rerun lists the markers and skips those
shards, so a killed job neither loses nor duplicates rows. Local disk and S3
behave the same.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

DONE_DIR = "_done"
QUARANTINE_DIR = "_quarantine"
FAILED_DIR = "_failed"
MANIFEST_FILE = "_markers.jsonl"
STAMP = "_listed_version"  # the marker's listing stamp, kept in the manifest only
PARQUET = ".parquet"

# Arrow's binary/string arrays use int32 offsets: one array holds < 2 GiB.
ARROW_OFFSET_LIMIT = 2**31 - 1
# Row groups are sized by bytes so one group's image column stays far below
# that limit whatever the image size (readers materialise a group at a time).
ROW_GROUP_TARGET_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Unset fields come from the standard AWS
    chain (environment, ``~/.aws``, instance or pod role); ``AWS_ENDPOINT_URL``
    is honoured as botocore does."""

    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    anon: bool = False

    def s3fs_kwargs(self) -> dict:
        kwargs: dict = {"anon": self.anon}
        if self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"):
            kwargs["endpoint_url"] = self.endpoint_url or os.environ["AWS_ENDPOINT_URL"]
        if self.region:
            kwargs["client_kwargs"] = {"region_name": self.region}
        for name in ("key", "secret", "token"):
            if getattr(self, name):
                kwargs[name] = getattr(self, name)
        return kwargs


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path on it)``."""
    options = options or StorageOptions()
    protocol, _, rest = url.partition("://") if "://" in url else ("file", "", url)
    if protocol in ("s3", "s3a"):
        import s3fs

        return s3fs.S3FileSystem(**options.s3fs_kwargs()), rest.rstrip("/")
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(rest))
    raise ValueError(f"unsupported storage URL {url!r}: use a local path, file:// or s3://")


@dataclass(frozen=True)
class Location:
    """A folder (or file) on some filesystem, addressed by URL."""

    url: str
    options: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self):
        fs, path = filesystem(self.url, self.options)
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "path", path)

    fs: fsspec.AbstractFileSystem = field(init=False, repr=False, compare=False)
    path: str = field(init=False, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def arrow_fs(self) -> pyarrow.fs.FileSystem:
        """The same filesystem for pyarrow.dataset and Ray Data's ``filesystem=``."""
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def child(self, *names: str) -> Location:
        return Location(posixpath.join(self.url.rstrip("/"), *names), self.options)

    def join(self, *names: str) -> str:
        """A path on :attr:`fs` below this location."""
        return posixpath.join(self.path, *names)

    def exists(self) -> bool:
        return self.fs.exists(self.path)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def list_file_entries(location: Location) -> list[dict]:
    """Listing entries (name, size, ...) of the visible files directly in ``location``
    (no ``_``/``.`` names), sorted by name, listed fresh."""
    if not location.fs.isdir(location.path):
        raise FileNotFoundError(f"no such folder: {location.url}")
    entries = [e for e in fresh_listing(location.fs, location.path)
               if e["type"] == "file" and not posixpath.basename(e["name"]).startswith(("_", "."))]
    return sorted(entries, key=lambda e: e["name"])


def list_files(location: Location) -> list[str]:
    """Visible files directly in ``location`` (no ``_``/``.`` names), sorted by name."""
    return [e["name"] for e in list_file_entries(location)]


def list_shards(location: Location, suffix: str = PARQUET) -> list[str]:
    """Shard paths in a stable (name) order; the order every stage and rerun sees."""
    return [p for p in list_files(location) if p.endswith(suffix)]


def no_shards(stage: str, url: str, what: str = ".parquet shards") -> FileNotFoundError:
    """The error of a stage that found nothing to read (the same words in every stage)."""
    return FileNotFoundError(f"{stage}: no {what} in {url} (tars or a CSV of images: convert them with `veclip import`)")


NOT_MARKED = "no done marker (still being written, or its writer stopped)"
RECORDED_FAILED = "recorded as failed in _failed/"


def finished_shard_entries(location: Location) -> tuple[list[dict], dict[str, int]]:
    """The listing entries (name, size) of the shards a reader may use, and
    ``{why skipped: count}`` for the others.

    A folder with ``_done/`` markers is a stage's output: only marked shards are
    finished (a rewrite still running, or one that crashed, leaves others beside
    them). A folder without markers is plain input: every shard is used.
    """
    entries = [e for e in list_file_entries(location) if e["name"].endswith(PARQUET)]
    store = ShardStore(location)
    done = store.done()
    if not done:
        return entries, {}
    failed = store.failed()
    kept, skipped = [], {}
    for entry in entries:
        name = posixpath.basename(entry["name"])
        if name in done:
            kept.append(entry)
        else:
            reason = RECORDED_FAILED if name in failed else NOT_MARKED
            skipped[reason] = skipped.get(reason, 0) + 1
    return kept, skipped


@dataclass(frozen=True)
class CaptionTables:
    """A caption-layout output (``rewrite --layout captions``): its caption tables, each
    with the input shard it belongs to (from the markers, which record the input)."""

    inputs_url: str  # the folder of the input shards
    inputs: dict[str, tuple[str, int]]  # caption table path -> (input shard path, input size)


def caption_tables(location: Location, entries: list[dict]) -> CaptionTables | None:
    """The caption tables among ``entries`` (finished shards) of ``location``; None for whole shards."""
    markers = ShardStore(location).markers() if entries else {}
    layouts = {markers.get(posixpath.basename(e["name"]), {}).get("layout", "copy") for e in entries}
    if layouts != {"captions"}:
        if len(layouts) > 1:
            raise ValueError(f"{location.url} mixes output layouts {sorted(layouts)}: rewrite it into one layout")
        return None
    marked = {e["name"]: markers[posixpath.basename(e["name"])] for e in entries}
    inputs_url = posixpath.dirname(next(iter(marked.values()))["input_url"])
    fs = Location(inputs_url, location.options).fs
    return CaptionTables(inputs_url, {path: (fs._strip_protocol(m["input_url"]), int(m["input_size"])) for path, m in marked.items()})


def finished_shards(location: Location) -> tuple[list[str], dict[str, int]]:
    """The paths of :func:`finished_shard_entries`."""
    entries, skipped = finished_shard_entries(location)
    return [e["name"] for e in entries], skipped


def output_shard_name(input_path: str) -> str:
    """The output shard for an input shard: same stem, ``.parquet``.

    ``s3://b/in/00042.tar`` -> ``00042.parquet``; the same input always maps to
    the same output, so reruns overwrite rather than duplicate.
    """
    stem = posixpath.basename(input_path.rstrip("/"))
    for ext in (".parquet", ".tar.gz", ".tgz", ".tar", ".csv"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return stem + PARQUET


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_TARGET_BYTES) -> int:
    """Rows per Parquet row group so that a group holds about ``target_bytes``."""
    if table.num_rows == 0:
        return 1
    bytes_per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, target_bytes // bytes_per_row))


def guard_large_binary(table: pa.Table, limit: int = ARROW_OFFSET_LIMIT) -> pa.Table:
    """Cast binary/string columns that hold more than ``limit`` bytes to their
    ``large_`` (int64-offset) types, so combining chunks cannot overflow."""
    widen = {pa.binary(): pa.large_binary(), pa.string(): pa.large_string()}
    for i, column_field in enumerate(table.schema):
        wide = widen.get(column_field.type)
        if wide is not None and table.column(i).nbytes > limit:
            table = table.set_column(i, column_field.with_type(wide), table.column(i).cast(wide))
    return table


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, target_bytes: int = ROW_GROUP_TARGET_BYTES) -> None:
    """Write ``table`` to ``path`` all at once: readers never see half a file.

    Local disk: a temp file beside the target, then an atomic rename. Object
    stores: a local temp file, then one upload (never a half-closed stream).
    """
    rows = row_group_rows(table, target_bytes)
    parent = posixpath.dirname(path)
    if "file" in _protocols(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, tmp, row_group_size=rows)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.NamedTemporaryFile(suffix=PARQUET) as tmp:
        pq.write_table(table, tmp.name, row_group_size=rows)
        fs.put_file(tmp.name, path)


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: dict) -> None:
    if "file" in _protocols(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(data, indent=1, sort_keys=True, default=str).encode())


def _small_file_kwargs(fs: fsspec.AbstractFileSystem) -> dict:
    """s3fs asks for an object's size (a HEAD) before each whole-object read, to split
    big ones; for small files that doubles the requests."""
    return {"max_concurrency": 1} if set(_protocols(fs)) & {"s3", "s3a"} else {}


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """A small JSON object, or None when there is none (never a cached answer)."""
    try:
        return json.loads(fs.cat_file(path, **_small_file_kwargs(fs)))
    except FileNotFoundError:
        return None


def fresh_listing(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """``ls`` with details, never from s3fs's per-process listing cache: other
    processes (actors, other runs) change these folders under us."""
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def version_stamp(entry: dict) -> str:
    """What changes when a listed file is rewritten (S3: its ETag; local: mtime and size)."""
    return str(entry.get("ETag") or (entry.get("mtime"), entry.get("size")))


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes]:
    """Many small files at once: s3fs fetches them concurrently (O(n / its batch
    size) round trips, not n in series). Raises the first error, naming its file."""
    if not paths:
        return {}
    found = fs.cat(list(paths), on_error="return", **_small_file_kwargs(fs))
    for path in paths:
        if isinstance(found.get(path), BaseException):
            raise OSError(f"could not read {path}: {found[path]}") from found[path]
    return {path: found[path] for path in paths}


FOOTER_TAIL_BYTES = 64 * 1024  # one read holds the footer of all but very wide files


def read_footers(fs: fsspec.AbstractFileSystem, files: list[tuple[str, int]]) -> dict[str, pq.FileMetaData | str]:
    """``{path: footer metadata, or the error that kept it from being read}`` of ``(path, size)`` files:
    the last 64 KiB of each, all fetched in one concurrent ``cat_ranges`` (no HEAD
    per file); a footer wider than that costs one more read."""
    tails = fs.cat_ranges([p for p, _ in files], [max(0, n - FOOTER_TAIL_BYTES) for _, n in files], [n for _, n in files],
                          on_error="return") if files else []
    footers: dict[str, pq.FileMetaData | str] = {}
    for (path, size), tail in zip(files, tails):
        try:
            if isinstance(tail, BaseException):
                raise tail
            if len(tail) < 12 or tail[-4:] != b"PAR1":
                raise ValueError(f"not a Parquet file, or truncated ({size} bytes, no footer magic)")
            length = int.from_bytes(tail[-8:-4], "little") + 8
            if length > len(tail):
                if length + 4 > size:
                    raise ValueError(f"truncated: footer of {length} bytes in a {size}-byte file")
                tail = fs.cat_file(path, start=size - length, end=size)
            footers[path] = pq.read_metadata(pa.BufferReader(tail[-length:]))
        except Exception as err:  # noqa: BLE001 - an unreadable footer is the caller's to record
            footers[path] = f"{type(err).__name__}: {err}"[:1000]
    return footers


class ShardStore:
    """An output dataset: whole shards, their quarantined rows, and done markers.

    Layout under the root::

        <name>.parquet               the shard's good rows
        _quarantine/<name>.parquet   its refused rows (only when there are any)
        _done/<name>.parquet.json    written last: rows, quarantined, stats
        _failed/<name>.parquet.json  a shard that kept failing: its error (gone once it is done)
        _markers.jsonl               the markers gathered so far, so a rerun over
                                     30k done shards reads one file, not 30k

    Every listing here is fresh: actors in other processes write markers while
    the driver watches, and s3fs would otherwise answer from a stale cache.
    """

    def __init__(self, location: Location):
        self.location = location

    def write(self, name: str, table: pa.Table, quarantine: pa.Table | None = None, stats: dict | None = None) -> dict:
        fs = self.location.fs
        write_parquet(fs, self.location.join(name), table)
        quarantined = 0 if quarantine is None else quarantine.num_rows
        if quarantined:
            write_parquet(fs, self.location.join(QUARANTINE_DIR, name), quarantine)
        marker = {
            "shard": name,
            "rows": table.num_rows,
            "quarantined": quarantined,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(stats or {}),
        }
        write_json(fs, self._marker_path(name), marker)
        self.clear_failure(name)
        return marker

    def _marker_path(self, name: str) -> str:
        return self.location.join(DONE_DIR, name + ".json")

    def _listed(self, folder: str) -> dict[str, dict]:
        """``{name: listing entry}`` of the ``.json`` records in a subfolder, listed fresh."""
        entries = fresh_listing(self.location.fs, self.location.join(folder))
        named = ((posixpath.basename(e["name"]), e) for e in entries if e["type"] == "file")
        return {n[: -len(".json")]: e for n, e in named if n.endswith(".json")}

    def done(self) -> set[str]:
        """Names of the shards written whole."""
        return set(self._listed(DONE_DIR))

    def is_done(self, name: str) -> bool:
        path = self._marker_path(name)
        self.location.fs.invalidate_cache(posixpath.dirname(path))
        return self.location.fs.exists(path)

    def marker(self, name: str) -> dict:
        return json.loads(self.location.fs.cat_file(self._marker_path(name)))

    def find_marker(self, name: str) -> dict | None:
        """The shard's done marker, or None when it is not done (read fresh: an actor checks before it works)."""
        return read_json(self.location.fs, self._marker_path(name))

    def markers(self, save_manifest: bool = False) -> dict[str, dict]:
        """``{name: marker}`` of every done shard: one listing, the manifest, and
        only the markers the manifest lacks (or holds an older version of),
        fetched concurrently. ``save_manifest`` (the output's one writer only)
        folds what was fetched into the manifest for the next reader."""
        listed = self._listed(DONE_DIR)
        manifest = self._manifest()
        known = {n: m for n, m in manifest.items() if n in listed and m.get(STAMP) == version_stamp(listed[n])}
        missing = sorted(set(listed) - set(known))
        fetched = read_many(self.location.fs, [self._marker_path(n) for n in missing])
        for name in missing:
            known[name] = {**json.loads(fetched[self._marker_path(name)]), STAMP: version_stamp(listed[name])}
        if save_manifest and (missing or len(known) != len(manifest)):
            lines = (json.dumps(known[n], sort_keys=True) for n in sorted(known))
            self.location.fs.pipe_file(self.location.join(MANIFEST_FILE), ("\n".join(lines) + "\n").encode())
        return {n: {k: v for k, v in m.items() if k != STAMP} for n, m in sorted(known.items())}

    def _manifest(self) -> dict[str, dict]:
        try:
            text = self.location.fs.cat_file(self.location.join(MANIFEST_FILE), **_small_file_kwargs(self.location.fs)).decode()
        except FileNotFoundError:
            return {}
        return {m["shard"]: m for m in map(json.loads, text.splitlines()) if m}

    def shards(self) -> list[str]:
        """Paths of the shards marked done, in name order (stray files are ignored)."""
        return [self.location.join(name) for name in sorted(self.done())]

    def quarantine_shards(self) -> list[str]:
        qdir = self.location.child(QUARANTINE_DIR)
        return list_shards(qdir) if self.location.fs.isdir(qdir.path) else []

    # Shards that kept failing: recorded so the run can finish the rest, and a rerun retries exactly them.
    def record_failure(self, name: str, record: dict) -> None:
        write_json(self.location.fs, self.location.join(FAILED_DIR, name + ".json"), {"shard": name, **record})

    def clear_failure(self, name: str) -> None:
        try:
            self.location.fs.rm_file(self.location.join(FAILED_DIR, name + ".json"))
        except FileNotFoundError:
            pass

    def failed(self) -> set[str]:
        """Names of the shards recorded as failed."""
        return set(self._listed(FAILED_DIR))

    def failures(self) -> dict[str, dict]:
        """``{name: failure record}`` of shards recorded as failed and not done since."""
        paths = [self.location.join(FAILED_DIR, n + ".json") for n in sorted(self.failed())]
        records = (json.loads(data) for data in read_many(self.location.fs, paths).values())
        return {record["shard"]: record for record in records}
