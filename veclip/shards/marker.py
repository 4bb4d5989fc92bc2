"""The records a sharded stage leaves per shard: the done marker and the failure record.

Both are typed here and stored as flat JSON objects. Markers written before
this module existed (version 1: a rewrite's pool figures as ``<pool>_<count>``
keys, no ``rows_in``) still read: :meth:`Marker.from_json` is the one place
that knows the old spellings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from veclip.clock import clock

MARKER_VERSION = 2
COPY, CAPTIONS = "copy", "captions"  # output layouts: whole rows with their images, or caption tables joined by key


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock().time()))


@dataclass
class PoolStats:
    """One engine pool's work on a shard (the rewrite's captioner, fuser, laclip)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    engine_seconds: float = 0.0  # the time this shard waited for the engine (other shards may share it)

    def add(self, other: PoolStats) -> PoolStats:
        return PoolStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class Marker:
    """A shard written whole: what it holds, who wrote it, from what, and its figures."""

    shard: str  # the output shard's name
    rows: int  # rows in the shard's file
    quarantined: int = 0  # rows in its quarantine file
    rows_in: int | None = None  # input rows (None: rows + quarantined, as markers before it)
    layout: str = COPY  # a caption table keeps its quarantined rows (null, flagged): see rows_out
    written_at: str = field(default_factory=utc_now)
    fingerprint: str | None = None  # the writing run's configuration
    run_id: str | None = None
    input: str | None = None  # the input shard's path
    input_url: str | None = None
    input_size: int | None = None
    actor: str | None = None  # the Ray actor that wrote it ("local" outside one)
    node: str | None = None  # the Ray node that actor ran on ("local" outside Ray)
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0
    engine: str | None = None
    engine_busy_from: float | None = None  # the actor's engine busy seconds (a running count) at the start
    engine_busy_to: float | None = None  # ... and at the end
    # its feeder's seconds outside a step, by why (preparing inputs, nothing queued), at the start
    engine_waits_from: dict[str, float] = field(default_factory=dict)
    engine_waits_to: dict[str, float] = field(default_factory=dict)  # ... and at the end
    flags: dict[str, int] = field(default_factory=dict)  # generated captions refused or gated, by reason
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    pools: dict[str, PoolStats] = field(default_factory=dict)
    read_stamps: list[str] | None = None  # versions of the files the shard was made from (score)
    stats: dict = field(default_factory=dict)  # the stage's own figures (score: per column)
    version: int = MARKER_VERSION

    @property
    def input_rows(self) -> int:
        return self.rows_in if self.rows_in is not None else self.rows + self.quarantined

    @property
    def rows_out(self) -> int:
        """Rows with captions: a caption table keeps its quarantined rows (null, flagged); a copy does not."""
        return self.rows - (self.quarantined if self.layout == CAPTIONS else 0)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None and v != {} or k in ("rows", "quarantined")}

    @classmethod
    def from_json(cls, data: dict) -> Marker:
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        pools = {name: PoolStats(**counts) for name, counts in data.pop("pools", {}).items()}
        for key in [k for k in data if k not in known]:  # version 1: "<pool>_<count>" keys, stage figures at the top
            pool, _, count = key.partition("_")
            if pool in ("captioner", "fuser", "laclip") and count in PoolStats.__dataclass_fields__:
                setattr(pools.setdefault(pool, PoolStats()), count, data.pop(key))
        stats = {**{k: data.pop(k) for k in [k for k in data if k not in known]}, **data.pop("stats", {})}
        return cls(**data, pools=pools, stats=stats)


@dataclass
class Failure:
    """``.veclip/failed/<shard>.json``: what a rerun and a person need to know of a shard that kept failing."""

    shard: str
    input: str
    stage: str
    run_id: str
    fingerprint: str
    tries: int
    errors: list[str]
    failed_at: str = field(default_factory=utc_now)

    @property
    def error(self) -> str:
        return self.errors[-1] if self.errors else ""

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "error": self.error}

    @classmethod
    def from_json(cls, data: dict) -> Failure:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def brief(self) -> dict:
        """What a run summary lists of it."""
        return {"input": self.input, "stage": self.stage, "tries": self.tries, "error": self.error}


BUSY = "busy"  # an engine's running count of seconds in steps, beside its waits


@dataclass
class EngineTime:
    """How a pool's actors spent a run, from the markers they wrote (:func:`engine_time`)."""

    first_starts: list[float]  # each actor's first shard's start
    actor_seconds: float  # summed over the actors: their first shard's start to their last one's end
    busy: float | None  # their engines' seconds in steps (None: the engines count none)
    waits: dict[str, float]  # ... and outside one, by why (preparing inputs, nothing queued)


def engine_time(markers: list[Marker]) -> EngineTime:
    """Per actor, its engine's running counts at its first shard's start and its last one's end."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    start: dict[tuple[str, str], float] = {}  # (actor, count) -> its lowest reading
    end: dict[tuple[str, str], float] = {}  # ... and its highest
    for m in markers:
        if m.actor is None or m.started_at is None:
            continue
        first[m.actor] = min(first.get(m.actor, m.started_at), m.started_at)
        last[m.actor] = max(last.get(m.actor, 0.0), m.finished_at or m.started_at)
        counts = [(why, m.engine_waits_from.get(why, 0.0), to) for why, to in m.engine_waits_to.items()]
        if m.engine_busy_to is not None:
            counts.append((BUSY, m.engine_busy_from or 0.0, m.engine_busy_to))
        for count, at_start, at_end in counts:
            start[m.actor, count] = min(start.get((m.actor, count), at_start), at_start)
            end[m.actor, count] = max(end.get((m.actor, count), 0.0), at_end)
    spent: dict[str, float] = {}
    for (actor, count), at_end in end.items():
        spent[count] = spent.get(count, 0.0) + at_end - start[actor, count]
    busy = spent.pop(BUSY, None)
    return EngineTime(list(first.values()), sum(last[a] - first[a] for a in first), busy, spent)
