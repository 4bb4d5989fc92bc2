"""Storage: URLs to filesystems, fresh listings, whole-file writes, many small reads at once.

One resolver turns a local path, ``file://`` URL or ``s3://`` URL into an
fsspec filesystem plus a path on it. That filesystem serves pyarrow directly,
Ray Data through :meth:`Location.arrow_fs`, and s3fs is what it is on S3.
What a sharded stage keeps on it (shards, markers, the lease) is
:mod:`veclip.shards`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from veclip.clock import clock

PARQUET = ".parquet"


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

    def resolved(self) -> StorageOptions:
        """These options with the endpoint and region this process's environment names filled in: what a driver
        hands its actors, so that actors on nodes whose environment lacks ``AWS_ENDPOINT_URL`` (or names
        another) read and write the store the driver planned against, never a second one."""
        return dataclasses.replace(
            self,
            endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        )

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
        return _local_store or fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(rest))
    raise ValueError(
        f"unsupported storage URL {url!r}: use a local path, file:// or s3:// (or an S3-compatible store with "
        "--s3-endpoint). gs:// is not supported: an output's one-writer lease is a conditional write veclip makes "
        "and checks on S3 only"
    )


_local_store: fsspec.AbstractFileSystem | None = None


@contextmanager
def use_local_store(fs: fsspec.AbstractFileSystem) -> Iterator[fsspec.AbstractFileSystem]:
    """Local paths served by ``fs`` (a :class:`~fsspec.implementations.local.LocalFileSystem` subclass) in this
    process: a simulation's store with S3's latency and faults (:mod:`veclip.shards.simulate`)."""
    global _local_store
    before, _local_store = _local_store, fs
    try:
        yield fs
    finally:
        _local_store = before


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
        return "file" in protocols(self.fs)

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


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def list_file_entries(location: Location) -> list[dict]:
    """Listing entries (name, size, ...) of the visible files directly in ``location``
    (no ``_``/``.`` names), sorted by name, listed fresh."""
    if not location.fs.isdir(location.path):
        bucket = location.path.split("/", 1)[0]
        if not location.is_local and not location.fs.exists(bucket):
            raise FileNotFoundError(f"no such bucket: {bucket} (in {location.url}); check the URL and the endpoint")
        raise FileNotFoundError(f"no such folder: {location.url}; check the path (a prefix with no files is none)")
    entries = [
        e
        for e in fresh_listing(location.fs, location.path)
        if e["type"] == "file" and not posixpath.basename(e["name"]).startswith(("_", "."))
    ]
    return sorted(entries, key=lambda e: e["name"])


def list_files(location: Location) -> list[str]:
    """Visible files directly in ``location`` (no ``_``/``.`` names), sorted by name."""
    return [e["name"] for e in list_file_entries(location)]


def list_shards(location: Location, suffix: str = PARQUET) -> list[str]:
    """Shard paths in a stable (name) order; the order every stage and rerun sees."""
    return [p for p in list_files(location) if p.endswith(suffix)]


class OutputOverlapsInput(ValueError):
    """A stage was asked to write where it reads: it would overwrite its own input."""


def refuse_overlap(stage: str, output: str, inputs: list[str], options: StorageOptions | None = None) -> None:
    """Refuse an ``output`` equal to one of ``inputs`` or inside it (``--output`` = ``--input`` would turn
    each image shard into a caption table of the same name: the corpus lost), before anything is written."""
    target = Location(output, options or StorageOptions())
    for url in filter(None, inputs):
        source = Location(url.partition("#")[0], options or StorageOptions())  # a caption source may pick columns
        if protocols(source.fs) != protocols(target.fs):
            continue
        out, into = _resolved(target), _resolved(source)
        if out == into or out.startswith(into.rstrip("/") + "/"):
            where = "is" if out == into else "is inside"
            raise OutputOverlapsInput(
                f"{stage}: the output {output} {where} the input {url}: writing there would overwrite or mix with "
                "what the stage reads. Write to a folder of its own, e.g. a sibling of the input."
            )


def _resolved(location: Location) -> str:
    """The path, through symlinks on local disk (an output reached by a link is still the folder it names)."""
    return os.path.realpath(location.path) if location.is_local else location.path


RETRY_BACKOFF_SECONDS = 1.0  # doubled each time: 1 + 2 + 4 s, past a throttled prefix's pause
NOT_TRANSIENT = (FileNotFoundError, PermissionError)  # a missing file, a refusal (403): trying again changes nothing


def _transient(got) -> bool:
    return isinstance(got, OSError) and not isinstance(got, NOT_TRANSIENT)


def with_retries(work, what: str, attempts: int = 4, backoff_seconds: float = RETRY_BACKOFF_SECONDS):
    """``work()``, tried again on a transient storage error (a reset, a throttle, a timeout that outlived the
    client's own retries), with exponential backoff; a missing file, a refusal or the last error is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except NOT_TRANSIENT:
            raise
        except OSError as err:
            if attempt == attempts:
                raise OSError(f"{what}: failed {attempts} times, last: {type(err).__name__}: {err}") from err
            clock().sleep(backoff_seconds * 2 ** (attempt - 1))


def explain_storage_error(err: BaseException, options: StorageOptions | None = None) -> str | None:
    """One line a person can act on for what object storage refused (the cause and the fix), or None
    when ``err`` is not a storage error. Botocore's own exceptions are matched by name: no import."""
    name = type(err).__name__
    endpoint = (options.endpoint_url if options else None) or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "") if hasattr(err, "response") else ""
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (
            f"no S3 credentials found ({err}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or run where an instance role or service account provides them; --s3-anon for public buckets"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return (
            f"cannot reach the S3 endpoint {endpoint} ({err}); check --s3-endpoint / AWS_ENDPOINT_URL and the network"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return (
            f"S3 at {endpoint} refused the credentials ({code}); check the key pair, the profile or the session token"
        )
    if code == "NoSuchBucket" or (isinstance(err, FileNotFoundError) and "specified bucket does not exist" in str(err)):
        return f"no such bucket at {endpoint} ({err}); check the URL's bucket name and the endpoint"
    if isinstance(err, PermissionError) or code in ("AccessDenied", "AllAccessDisabled"):
        return f"S3 at {endpoint} denied access ({err}); the credentials in use lack read or write rights there"
    return None


def no_shards(stage: str, url: str, what: str = ".parquet shards") -> FileNotFoundError:
    """The error of a stage that found nothing to read (the same words in every stage)."""
    return FileNotFoundError(
        f"{stage}: no {what} in {url} (tars or a CSV of images: convert them with `veclip import`)"
    )


@contextmanager
def replaced_atomically(path: str) -> Iterator[str]:
    """A temp file beside local ``path`` to write, renamed over ``path`` when the block ends (a reader never
    sees half of it, a crash never leaves half of it), removed when it fails."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """A small file written all at once: :func:`replaced_atomically` on local disk, one PUT on an object store."""
    if "file" not in protocols(fs):
        fs.pipe_file(path, data)
        return
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: dict) -> None:
    write_bytes(fs, path, json.dumps(data, indent=1, sort_keys=True, default=str).encode())


def small_file_kwargs(fs: fsspec.AbstractFileSystem) -> dict:
    """s3fs asks for an object's size (a HEAD) before each whole-object read, to split
    big ones; for small files that doubles the requests."""
    return {"max_concurrency": 1} if set(protocols(fs)) & {"s3", "s3a"} else {}


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """A small JSON object, or None when there is none (never a cached answer)."""
    try:
        return json.loads(with_retries(lambda: fs.cat_file(path, **small_file_kwargs(fs)), f"read {path}"))
    except FileNotFoundError:
        return None


def fresh_listing(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """``ls`` with details, never from s3fs's per-process listing cache: other
    processes (actors, other runs) change these folders under us."""
    fs.invalidate_cache(path)
    try:
        return with_retries(lambda: fs.ls(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return []


def version_stamp(entry: dict) -> str:
    """What changes when a listed file is rewritten (S3: its ETag; local: mtime and size)."""
    return str(entry.get("ETag") or (entry.get("mtime"), entry.get("size")))


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file through ``fs``. Not ``pq.read_table``: on a Python file object it scans
    through pyarrow's dataset layer, whose pool threads drop the file after the call returns; one
    dropped while the interpreter exits aborts the process ("terminate called without an active
    exception", exit -6) after its work was done."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


READ_BUFFER_BYTES = 8 << 20
BATCH_ROWS = 256  # ~25 MiB of web-photo JPEGs


def streaming_parquet(f) -> pq.ParquetFile:
    """A Parquet file to read page by page through a read buffer. ``pre_buffer`` (pyarrow's default)
    would fetch every wanted column chunk of a row group at once: a one-group 10,000-row shard's
    1.7 GB of images (2.2 GB RSS at 10k rows, measured, against 0.5 GB at 1k)."""
    return pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)


def read_batches(
    fs: fsspec.AbstractFileSystem,
    path: str,
    columns: list[str] | None = None,
    row_groups: list[int] | None = None,
    rows: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[pa.Table]:
    """A Parquet file ``rows`` at a time (fewer when ``max_bytes`` of the columns, at the file's mean bytes per
    row, hold fewer), streamed page by page through a read buffer: memory holds a batch, never a whole row
    group (a 10,000-row shard as pyarrow, pandas or img2dataset write it by default is one ~1 GB row group)."""
    with fs.open(path, "rb") as f:
        parquet = streaming_parquet(f)
        empty, rows = True, rows or BATCH_ROWS
        if max_bytes:
            rows = min(rows, _rows_within(parquet.metadata, columns, max_bytes))
        for batch in parquet.iter_batches(batch_size=rows, row_groups=row_groups, columns=columns):
            empty = False
            yield pa.Table.from_batches([batch])
        if empty:  # a file of no rows still has a schema
            table = parquet.schema_arrow.empty_table()
            yield table.select(columns) if columns else table


def _rows_within(metadata: pq.FileMetaData, columns: list[str] | None, max_bytes: int) -> int:
    """Rows whose ``columns`` (all: None) hold about ``max_bytes``, at the file's mean bytes per row."""
    if not metadata.num_rows:
        return 1
    size = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if columns is None or chunk.path_in_schema.split(".")[0] in columns:
                size += chunk.total_uncompressed_size
    return max(1, int(max_bytes * metadata.num_rows // max(size, 1)))


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str], attempts: int = 4) -> dict[str, bytes]:
    """Many small files at once: s3fs fetches them concurrently (O(n / its batch
    size) round trips, not n in series); the reads that failed transiently are tried again, as
    :func:`with_retries` does (at 30,000 markers, one reset in a 100,000 requests would otherwise end a
    three-day run's summary). Raises the first error left, naming its file. The paths are literal:
    ``fs.cat`` would expand ``*``, ``?`` and ``[`` as patterns (a shard named ``photo[1]`` read as ``photo1``)."""
    paths = list(paths)
    got = _each_with_retries(lambda some: cat_literal(fs, some), paths, attempts)
    return {path: _raised(path, data) for path, data in zip(paths, got)}


def _each_with_retries(fetch: Callable[[list], list], items: list, attempts: int = 4) -> list:
    """``fetch(items)``'s results (a value or the error, in order), the items whose error was transient fetched
    again with :func:`with_retries`' backoff: one batched request per round, not one per item."""
    got = fetch(items) if items else []
    for attempt in range(1, attempts):
        failed = [k for k, g in enumerate(got) if _transient(g)]
        if not failed:
            break
        clock().sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
        for k, again in zip(failed, fetch([items[k] for k in failed])):
            got[k] = again
    return got


def cat_literal(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list:
    """Each path's bytes, or the error reading it, in order; concurrent on object stores, no glob expansion."""
    if not paths:
        return []
    return fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return", **small_file_kwargs(fs))


def _raised(path: str, got):
    if isinstance(got, BaseException):
        raise OSError(f"could not read {path}: {got}") from got
    return got


FOOTER_TAIL_BYTES = 64 * 1024  # one read holds the footer of all but very wide files


def _tails(fs: fsspec.AbstractFileSystem, files: list[tuple[str, int]]) -> list:
    """The last 64 KiB of each file (or the error reading it) in one concurrent ``cat_ranges``; the reads that
    failed transiently are tried again, as :func:`read_many` does."""

    def fetch(some: list[tuple[str, int]]) -> list:
        starts = [max(0, n - FOOTER_TAIL_BYTES) for _, n in some]
        return fs.cat_ranges([p for p, _ in some], starts, [n for _, n in some], on_error="return")

    return _each_with_retries(fetch, files)


def read_footers(fs: fsspec.AbstractFileSystem, files: list[tuple[str, int]]) -> dict[str, pq.FileMetaData | str]:
    """``{path: footer metadata, or the error that kept it from being read}`` of ``(path, size)`` files:
    the last 64 KiB of each, all fetched in one concurrent ``cat_ranges`` (no HEAD
    per file, transient failures tried again); a footer wider than that costs one more read. A footer left
    unread would change a training rerun's plan (and move its resume to the next epoch)."""
    footers: dict[str, pq.FileMetaData | str] = {}
    for (path, size), tail in zip(files, _tails(fs, files)):
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
