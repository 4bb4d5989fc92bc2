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

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from veclip.metrics import publish_shard
from veclip.shards.guard import FAILED, RunContext, ShardGuard, running_on
from veclip.shards.layout import output_shard_name
from veclip.shards.marker import Marker
from veclip.shards.store import ShardStore
from veclip.storage import Location, StorageOptions


@dataclass(frozen=True)
class FaultConfig:
    """How a run survives faults (not part of the fingerprint: they change no output)."""

    max_attempts: int = 3  # tries per shard and run, crashes of the actor's process included
    backoff_seconds: float = 2.0  # before the 2nd try; doubled for each next one, with jitter
    lease_seconds: float = 120.0  # one writer per output: the lease lapses this long after its run stops renewing
    # No silent hang (the pool's actors dead or unplaceable): the run stops, non-zero with its work kept, when
    # no shard finishes for first_shard_seconds before the first one (engines loading, nodes starting), then
    # for stall_factor x the longest wait between two finished shards so far, at least stall_seconds
    first_shard_seconds: float = 3600.0  # no silent hang: the longest wait for the first finished shard
    stall_factor: float = 10.0  # no silent hang: this many times the longest wait between finished shards ...
    stall_seconds: float = 900.0  # ... and at least this long, before the run stops

    def stall_deadline(self, longest_gap: float | None) -> float:
        """Seconds without a finished shard after which the run stops."""
        if longest_gap is None:
            return self.first_shard_seconds
        return max(self.stall_seconds, self.stall_factor * longest_gap)


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

    def __call__(self, batch: dict) -> dict:
        statuses = []
        for path, size, status in zip(batch["shard"], batch["size"], batch["status"]):
            if status != FAILED:  # a shard the previous pool gave up on is already recorded
                work = functools.partial(self.process, path, int(size))
                status = self.guard.run_shard(output_shard_name(path), path, work)
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
