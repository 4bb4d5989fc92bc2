"""The actor base of every sharded stage's pools: one call handles one whole input shard.

Each Ray Data row names an input shard (``{"shard": path, "size": bytes,
"status": ""}``, the RayGen pattern); the actor works on it under the
:class:`~veclip.shards.guard.ShardGuard` (retried on errors, recorded in
failure record when it keeps failing) and passes the row on with its status, so
a next pool skips a shard the previous one gave up on. A stage subclasses
:class:`ShardWorker` and writes :meth:`~ShardWorker.process`; a restarted actor
or a rerun skips shards already marked with this run's fingerprint
(:meth:`~ShardWorker.current`), and :meth:`~ShardWorker.commit` writes a shard
whole, stamped with the run, if the run still holds the output.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from veclip.metrics import publish_shard
from veclip.shards.guard import FAILED, RunContext, ShardGuard, running_on
from veclip.shards.layout import output_shard_name
from veclip.shards.marker import Marker
from veclip.shards.progress import Heartbeat
from veclip.shards.store import ShardStore
from veclip.storage import Location, StorageOptions


@dataclass(frozen=True)
class FaultConfig:
    """How a run survives faults (not part of the fingerprint: they change no output)."""

    max_attempts: int = 3
    """tries per shard and run, crashes of the actor's process included"""
    backoff_seconds: float = 2.0
    """before the 2nd try, doubled after (jittered): over S3 SlowDown's pause"""
    lease_seconds: float = 120.0
    """the output's lease lapses this long after renewals stop: over an S3 outage to ride out"""
    first_shard_seconds: float = 3600.0
    """no actor working: stop after this (over a node replacement + an engine load)"""
    stall_factor: float = 10.0
    """actors working: stop after this x the longest pause in progress seen ..."""
    stall_seconds: float = 900.0
    """... and at least this (over an engine's longest step; a shard's length is moot)"""

    def stall_deadline(self, longest_gap: float | None) -> float:
        """Seconds without progress after which the run stops: ``longest_gap`` None while no actor works."""
        if longest_gap is None:
            return self.first_shard_seconds
        return max(self.stall_seconds, self.stall_factor * longest_gap)

    @property
    def heartbeat_seconds(self) -> float:
        """How often an actor tells its progress: a tenth of stall_seconds, at most 30 s (one small actor call)."""
        return min(30.0, self.stall_seconds / 10)

    @property
    def heard_within(self) -> float:
        """An actor not heard for this long is gone: three missed beats, well inside stall_seconds, so a lost
        actor turns the pool to "starting" (first_shard_seconds) before the working deadline can pass."""
        return 3 * self.heartbeat_seconds

    @property
    def look_seconds(self) -> float:
        """How often the driver looks at the pool: a quarter of stall_seconds, at most 5 s."""
        return min(5.0, self.stall_seconds / 4)


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()


class ShardWorker(ABC):
    """Run identity, the guard, the done check and the commit; a stage adds :meth:`process`."""

    stage = ""  # names the tries' folder and the failure records

    def __init__(
        self,
        output: str,
        options: StorageOptions,
        run: RunContext,
        faults: FaultConfig,
        secrets: frozenset[str] = frozenset(),
    ):
        self.run, self.options = run, options
        self.output = Location(output, options)
        self.guard = ShardGuard(self.output, run, self.stage, faults.max_attempts, faults.backoff_seconds, secrets)
        self.shards_finished = 0
        self.heartbeat = Heartbeat(run.run_id, faults.heartbeat_seconds, self.progress) if _in_ray() else None

    def progress(self) -> int:
        """A running count of work done, for the stall watch: shards, and requests if the worker has an engine
        that counts them (a shard takes minutes; a request, seconds)."""
        return self.shards_finished + getattr(getattr(self, "engine", None), "completed", 0)

    def __call__(self, batch: dict) -> dict:
        statuses = []
        for path, size, status in zip(batch["shard"], batch["size"], batch["status"]):
            if status != FAILED:  # a shard the previous pool gave up on is already recorded
                work = functools.partial(self.process, path, int(size))
                with self.heartbeat.shard() if self.heartbeat else contextlib.nullcontext():
                    status = self.guard.run_shard(output_shard_name(path), path, work)
                self.shards_finished += 1
            statuses.append(status)
        return {**batch, "status": statuses}

    @abstractmethod
    def process(self, path: str, size: int) -> None:
        """Write the output for one input shard (skipping it when :meth:`current`)."""

    def current(self, store: ShardStore, name: str) -> Marker | None:
        """The shard's done marker, if a run of this configuration wrote it (another fingerprint's is redone)."""
        marker = store.find_marker(name)
        return marker if marker is not None and marker.fingerprint == self.run.fingerprint else None

    def commit(
        self,
        store: ShardStore,
        marker: Marker,
        input_fs,
        path: str,
        size: int,
        table: pa.Table | Iterable[pa.Table],
        quarantine: pa.Table | None = None,
    ) -> None:
        """Write the shard whole, with who wrote it and from what, if this run still holds the output."""
        self.guard.lease.check()
        marker.fingerprint, marker.run_id = self.run.fingerprint, self.run.run_id
        where = running_on()
        marker.actor, marker.node = where["actor"], where["node"]
        marker.input, marker.input_url, marker.input_size = path, input_fs.unstrip_protocol(path), size
        store.write(marker, table, quarantine)
        publish_shard(self.stage, marker)
