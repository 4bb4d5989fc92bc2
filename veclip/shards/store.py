"""An output dataset of whole shards, their quarantines, done markers and failure records.

The shard is the unit of work: a shard is written whole (temp file, then rename
or one upload) and only then marked done. A rerun lists the markers and skips
those shards, so a killed job neither loses nor duplicates rows. Every listing
here is fresh: actors in other processes write markers while the driver
watches, and s3fs would otherwise answer from a stale cache. Local disk and S3
behave the same. The names are :mod:`veclip.shards.layout`'s.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from veclip.parquet_files import write_parquet
from veclip.shards.layout import RECORD_SUFFIX, layout_of
from veclip.shards.marker import CAPTIONS, Failure, Marker
from veclip.storage import (
    PARQUET,
    Location,
    fresh_listing,
    list_file_entries,
    list_shards,
    read_footers,
    read_json,
    read_many,
    small_file_kwargs,
    version_stamp,
    with_retries,
    write_bytes,
    write_json,
)

SHARD_MARK_KEY = b"veclip.shard"  # in every shard's footer: the file is veclip's (the marker says it is whole)
SHARD_MARK = {SHARD_MARK_KEY: b"1"}


class ForeignFiles(ValueError):
    """The output holds files, named as shards the run would write, that no veclip run wrote."""


STAMP = "_listed_version"  # the marker's listing stamp, kept in the manifest only
NOT_MARKED = "no done marker (still being written, or its writer stopped)"
RECORDED_FAILED = "recorded as failed"
MARKED_BUT_MISSING = "marked done but its file is gone (a lifecycle rule, a manual rm): rerun the stage to redo it"


class ShardStore:
    """The shards under one output folder (:mod:`veclip.shards.layout`)."""

    def __init__(self, location: Location):
        self.location = location
        self.layout = layout_of(location)

    def write(self, marker: Marker, table: pa.Table | Iterable[pa.Table], quarantine: pa.Table | None = None) -> Marker:
        """Write the shard (a table, or a stream of them) and its quarantine whole, then its marker (rows
        counted as written).

        A shard written again (another configuration, changed inputs) loses its old marker first, so a
        crash in between leaves a shard that is not done, never an old marker describing new content,
        and an old quarantine the new write does not replace is removed."""
        fs, name = self.location.fs, marker.shard
        self._remove(self._marker_path(name))
        marker.rows = write_parquet(fs, self.location.join(name), table, metadata=SHARD_MARK)
        marker.quarantined = 0 if quarantine is None else quarantine.num_rows
        if marker.quarantined:
            write_parquet(fs, self.location.join(self.layout.quarantine, name), quarantine)
        else:
            self._remove(self.location.join(self.layout.quarantine, name))
        write_json(fs, self._marker_path(name), marker.to_json())
        self.clear_failure(name)
        return marker

    def _marker_path(self, name: str) -> str:
        return self.location.join(self.layout.done, name + RECORD_SUFFIX)

    def _failure_path(self, name: str) -> str:
        return self.location.join(self.layout.failed, name + RECORD_SUFFIX)

    def _listed(self, folder: str) -> dict[str, dict]:
        """``{name: listing entry}`` of the records in a subfolder, listed fresh."""
        entries = fresh_listing(self.location.fs, self.location.join(folder))
        named = ((posixpath.basename(e["name"]), e) for e in entries if e["type"] == "file")
        return {n[: -len(RECORD_SUFFIX)]: e for n, e in named if n.endswith(RECORD_SUFFIX)}

    def done(self) -> set[str]:
        """Names of the shards written whole."""
        return set(self._listed(self.layout.done))

    def find_marker(self, name: str) -> Marker | None:
        """The shard's done marker, or None when it is not done (read fresh: an actor checks before it works)."""
        data = read_json(self.location.fs, self._marker_path(name))
        return None if data is None else Marker.from_json(data)

    def markers(self, save_manifest: bool = False) -> dict[str, Marker]:
        """``{name: marker}`` of every done shard: one listing, the manifest, and
        only the markers the manifest lacks (or holds an older version of),
        fetched concurrently. ``save_manifest`` (the output's one writer only)
        folds what was fetched into the manifest for the next reader."""
        listed = self._listed(self.layout.done)
        manifest = self._manifest()
        known = {n: m for n, m in manifest.items() if n in listed and m.get(STAMP) == version_stamp(listed[n])}
        missing = sorted(set(listed) - set(known))
        fetched = read_many(self.location.fs, [self._marker_path(n) for n in missing])
        for name in missing:
            data = json.loads(fetched[self._marker_path(name)])  # "{}" once stood in for a marker: still done
            known[name] = {"shard": name, "rows": 0, **data, STAMP: version_stamp(listed[name])}
        if save_manifest and (missing or len(known) != len(manifest)):
            lines = (json.dumps(known[n], sort_keys=True) for n in sorted(known))
            write_bytes(self.location.fs, self.location.join(self.layout.manifest), ("\n".join(lines) + "\n").encode())
        return {n: Marker.from_json({k: v for k, v in m.items() if k != STAMP}) for n, m in sorted(known.items())}

    def _manifest(self) -> dict[str, dict]:
        fs = self.location.fs
        try:
            path = self.location.join(self.layout.manifest)
            text = with_retries(lambda: fs.cat_file(path, **small_file_kwargs(fs)), f"read {path}").decode()
        except FileNotFoundError:
            return {}
        return {m["shard"]: m for m in map(json.loads, text.splitlines()) if m}

    def shards(self) -> list[str]:
        """Paths of the shards marked done, in name order (stray files are ignored)."""
        return [self.location.join(name) for name in sorted(self.done())]

    def quarantine_shards(self) -> list[str]:
        folder = self.location.child(self.layout.quarantine)
        return list_shards(folder) if self.location.fs.isdir(folder.path) else []

    # Shards that kept failing: recorded so the run can finish the rest, and a rerun retries exactly them.
    def record_failure(self, failure: Failure) -> None:
        write_json(self.location.fs, self._failure_path(failure.shard), failure.to_json())

    def clear_failure(self, name: str) -> None:
        self._remove(self._failure_path(name))

    def present(self) -> set[str]:
        """Names of the shard files in the open now (one fresh listing; none when the folder is not there)."""
        try:
            entries = list_file_entries(self.location)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(e["name"]) for e in entries if e["name"].endswith(PARQUET)}

    def tried(self) -> set[str]:
        """Names of the shards a try of any stage was counted for and not yet cleared (one listing)."""
        folder = self.location.join(self.layout.attempts)
        try:
            found = self.location.fs.find(folder)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(p)[: -len(RECORD_SUFFIX)] for p in found if p.endswith(RECORD_SUFFIX)}

    def refuse_foreign(self, names: set[str], present: set[str], marked: set[str]) -> None:
        """Refuse to write over files no veclip run wrote: of ``names`` (the shards about to be written), those
        in the open (``present``) with no marker, no try counted and no veclip mark in their footer. A try that
        died between its shard and its marker, a marker removed by hand: the file is the stage's own."""
        unmarked = sorted((names & present) - marked - self.tried())
        fs = self.location.fs
        footers = read_footers(fs, [(p, fs.size(p)) for p in map(self.location.join, unmarked)]) if unmarked else {}
        foreign = [
            name
            for name, footer in zip(unmarked, footers.values())
            if isinstance(footer, str) or SHARD_MARK_KEY not in (footer.metadata or {})
        ]
        if foreign:
            raise ForeignFiles(
                f"{len(foreign)} file(s) in {self.location.url} that no veclip run wrote (no done marker, no try "
                f"recorded), e.g. {', '.join(foreign[:3])}: a run would overwrite them. Move them out of the output, "
                "or write to another output"
            )

    def forget(self, name: str) -> None:
        """Drop a marker that describes nothing (its shard file is gone): the shard is not done."""
        self._remove(self._marker_path(name))

    def _remove(self, path: str) -> None:
        try:
            self.location.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def failed(self) -> set[str]:
        """Names of the shards recorded as failed."""
        return set(self._listed(self.layout.failed))

    def retried(self, stage: str, run_id: str) -> dict[str, dict]:
        """``{name: {"tries", "errors", "lost"}}`` of the shards ``run_id`` finished after more than one try (a try
        lost with its actor or node, or an error retried): the guard keeps their attempt records."""
        folder = f"{self.layout.attempts}/{stage}"
        paths = [self.location.join(folder, n + RECORD_SUFFIX) for n in sorted(self._listed(folder))]
        records = {p: json.loads(data) for p, data in read_many(self.location.fs, paths).items()}
        return {
            posixpath.basename(p)[: -len(RECORD_SUFFIX)]: {
                "tries": r["tries"],
                "errors": r["errors"],
                "lost": r.get("lost", []),  # where each try that died with its process ran (node, actor)
                "engine_deaths": r.get("engine_deaths", 0),  # tries lost with their engine, charged to none
                "poison": r.get("poison", []),  # the requests found to kill the engine (isolation)
            }
            for p, r in records.items()
            if r.get("done") and r.get("run_id") == run_id
        }

    def failures(self) -> dict[str, Failure]:
        """``{name: failure record}`` of shards recorded as failed and not done since."""
        paths = [self._failure_path(n) for n in sorted(self.failed())]
        records = (Failure.from_json(json.loads(data)) for data in read_many(self.location.fs, paths).values())
        return {record.shard: record for record in records}


# --- reading an output -------------------------------------------------------------------------


def finished_shard_entries(location: Location) -> tuple[list[dict], dict[str, int]]:
    """The listing entries (name, size) of the shards a reader may use, and
    ``{why skipped: count}`` for the others.

    A folder with done markers is a stage's output: only marked shards are
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
    if missing := len(done) - len(kept):  # never read fewer rows silently: said with the other skips
        skipped[MARKED_BUT_MISSING] = missing
    return kept, skipped


def finished_shards(location: Location) -> tuple[list[str], dict[str, int]]:
    """The paths of :func:`finished_shard_entries`."""
    entries, skipped = finished_shard_entries(location)
    return [e["name"] for e in entries], skipped


@dataclass(frozen=True)
class CaptionTables:
    """A caption-layout output (``rewrite --layout captions``, ``score``): its caption tables, each
    with the input shard it belongs to (from the markers, which record the input)."""

    inputs_url: str  # the folder of the input shards
    inputs: dict[str, tuple[str, int]]  # caption table path -> (input shard path, input size)


def caption_tables(
    location: Location, entries: list[dict], markers: dict[str, Marker] | None = None
) -> CaptionTables | None:
    """The caption tables among ``entries`` (finished shards) of ``location``; None for whole shards.
    ``markers``: the output's, when the caller has read them already."""
    if markers is None:
        markers = ShardStore(location).markers() if entries else {}
    layouts = {markers[n].layout if n in markers else "copy" for n in (posixpath.basename(e["name"]) for e in entries)}
    if layouts != {CAPTIONS}:
        if len(layouts) > 1:
            raise ValueError(f"{location.url} mixes output layouts {sorted(layouts)}: rewrite it into one layout")
        return None
    marked = {e["name"]: markers[posixpath.basename(e["name"])] for e in entries}
    inputs_url = posixpath.dirname(next(iter(marked.values())).input_url)
    fs = Location(inputs_url, location.options).fs
    return CaptionTables(
        inputs_url, {path: (fs._strip_protocol(m.input_url), int(m.input_size)) for path, m in marked.items()}
    )
