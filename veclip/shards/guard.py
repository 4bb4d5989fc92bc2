"""Faults stay inside their shard: retries with backoff, a durable try count, failure records.

Every sharded stage runs each shard under a :class:`ShardGuard`.

A shard's work is retried in the actor with exponential backoff (S3 throttling
or a reset that outlived s3fs's own retries, a poison row). A try that kills
the process (``kill -9``, out of memory, a segfault) cannot be caught, so each
try is counted in ``.veclip/work/attempts/<shard>.json`` *before* it starts: when Ray
replaces the actor and retries the shard, the new actor sees how many tries
this run already spent. A vLLM engine that died makes the actor exit on
purpose, so Ray replaces it with a fresh engine. After ``max_attempts`` tries
the shard is recorded under ``.veclip/failed/`` with its error and the run goes on;
a rerun (a new run id) retries exactly the shards not done. An engine's death is
charged to no shard: :mod:`veclip.shards.isolation` finds the rows that cause it.
"""

from __future__ import annotations

import os
import random
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from veclip.clock import clock
from veclip.config import scrub
from veclip.shards.isolation import ISOLATE_AFTER, MAX_ENGINE_DEATHS, Exclusive, Isolation, narrowed
from veclip.shards.layout import RECORD_SUFFIX
from veclip.shards.lease import LeaseLost, OutputLease
from veclip.shards.marker import Failure
from veclip.shards.store import ShardStore
from veclip.storage import Location, read_json, write_json

DONE, FAILED = "done", "failed"  # what became of a shard: the status a pool passes to the next one


BOOKKEEPING_TRIES = 3  # a record's write, retried (backoff_seconds, doubled): over a throttled bucket's pause


class ShardRefused(ValueError):
    """The shard's own data cannot be processed (its keys, say): recorded as failed at once, not retried."""


@dataclass(frozen=True)
class RunContext:
    """What every actor knows of the run it works for."""

    run_id: str
    fingerprint: str
    lease_generation: int | None = None  # the take of the output's lease the run holds: commits check it


def running_on() -> dict:
    """The Ray node and actor this runs in ("local" outside Ray)."""
    import ray

    if not ray.is_initialized():
        return {"node": "local", "actor": "local"}
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "actor": context.get_actor_id() or "local"}


def node_alive(node: str) -> bool:
    """Whether Ray still has ``node`` (a try's node, from :func:`running_on`); outside Ray, yes."""
    import ray

    if node == "local" or not ray.is_initialized():
        return True
    from veclip.console import alive_nodes

    return node in alive_nodes()


# A shard's tries lost to preempted nodes are counted apart from max_attempts, up to this bound (a shard that
# takes its node down with it, an OOM kill of the whole node, must still end)
MAX_TRIES_LOST_WITH_NODES = 10


def record_failure(
    store: ShardStore, name: str, input_path: str, stage: str, run: RunContext, tries: int, errors: list[str]
) -> None:
    """``.veclip/failed/<name>.json``: what a rerun and a person need to know of a shard that kept failing."""
    store.record_failure(Failure(name, input_path, stage, run.run_id, run.fingerprint, tries, errors))


def engine_died(err: BaseException) -> bool:
    """This actor's engine can never answer again (vLLM's EngineDeadError, or an error that says it is
    fatal to the actor: a dead or hung engine feeder)."""
    return getattr(err, "fatal_to_actor", False) or any(cls.__name__ == "EngineDeadError" for cls in type(err).__mro__)


class ShardGuard:
    """Runs one shard's work under the retry policy and records what became of it."""

    def __init__(
        self,
        output: Location,
        run: RunContext,
        stage: str,
        max_attempts: int,
        backoff_seconds: float,
        secrets: frozenset[str] = frozenset(),
    ):
        self.output, self.run, self.stage = output, run, stage
        self.secrets = secrets  # values never written into a record (an engine's token quoted in an error)
        self.max_attempts, self.backoff_seconds = max_attempts, backoff_seconds
        self.store = ShardStore(output)
        self.lease = OutputLease(output, run.run_id, generation=run.lease_generation)
        self.where, self.node_alive = running_on, node_alive  # Ray's view (a simulation gives its own)
        self.exclusive = Exclusive()  # the shards this actor works on at once share its engine; an isolated one not
        self._in_flight: dict[str, dict] = {}  # shard -> its try record, while its work runs here
        self._waiting: dict[str, dict] = {}  # ... and while it waits for an isolated shard to finish
        self._finishing: dict[str, dict] = {}  # ... and once written, until its try record says so
        self._books = threading.Lock()  # a try's begin, and an engine death's records of every try here
        self._local = threading.local()

    def isolation(self) -> Isolation | None:
        """How the shard this thread works on sends its requests, when it runs isolated (else None)."""
        return getattr(self._local, "isolation", None)

    def _attempts_path(self, name: str) -> str:
        return self.output.join(self.store.layout.attempts, self.stage, name + RECORD_SUFFIX)

    def _begin(self, name: str) -> dict:
        """Count one more try of ``name`` in this run, durably, before it starts, with where it runs. The
        previous try, if it neither finished nor recorded an error, died with its process: its place is
        kept in ``lost`` (the summary counts the actors and nodes lost). A try lost with its node (a spot
        preemption) is no fault of the shard's: it is counted in ``preempted``, outside ``max_attempts`` (at
        10% preemption an hour, ~2 of 30,000 ten-minute shards lost three tries to preemptions alone)."""
        fs, path = self.output.fs, self._attempts_path(name)
        previous = self._durably(f"read {name}'s try count", read_json, fs, path)
        if previous is None or previous["run_id"] != self.run.run_id:
            previous = {"run_id": self.run.run_id, "tries": 0, "errors": []}
        if previous.get("done"):  # written already, its result lost with its actor: Ray runs it again
            return previous
        died = previous["on"] if previous.get("on") and not previous.get("ended") else None
        preempted = previous.get("preempted", 0) + (died is not None and not self.node_alive(died["node"]))
        lost = previous.get("lost", []) + ([died] if died else [])
        previous.pop("probe", None)  # an earlier isolated try's range: this try notes its own
        record = {**previous, "tries": previous["tries"] + 1, "on": self.where(), "ended": False, "lost": lost}
        self._durably(f"count {name}'s try", write_json, fs, path, record | {"preempted": preempted})
        return record | {"preempted": preempted}

    def _durably(self, what: str, call: Callable, *args):
        """A record's read or write (the try count, a failure record), retried; if it still fails, said and
        passed over: the records are advisory, and one S3 error that outlived s3fs's retries must not abort
        the Ray Data job and every shard in flight with it. ``call(*args)``'s result, or None."""
        for attempt in range(BOOKKEEPING_TRIES):
            try:
                return call(*args)
            except Exception as err:  # noqa: BLE001 - any storage error: the shard's work matters more
                if attempt == BOOKKEEPING_TRIES - 1:
                    print(f"veclip: could not {what} ({type(err).__name__}: {err}); going on without it", flush=True)
                    return None
                clock().sleep(self.backoff_seconds * 2**attempt * random.uniform(0.5, 1.5))

    def _charged(self, record: dict) -> int:
        """The tries that count against ``max_attempts``: those not lost with their node or their engine."""
        return record["tries"] - record.get("preempted", 0) - record.get("engine_deaths", 0)

    def _exhausted(self, record: dict) -> bool:
        return (
            self._charged(record) > self.max_attempts
            or record.get("preempted", 0) > MAX_TRIES_LOST_WITH_NODES
            or record.get("engine_deaths", 0) >= MAX_ENGINE_DEATHS
        )

    def _fail(self, name: str, input_path: str, record: dict) -> str:
        errors = record["errors"] or ["the process died during the try (killed, out of memory, or a crash)"]
        tries = record["tries"] - self._exhausted(record)  # the try begun only to be refused is none
        self._durably(
            f"record {name} as failed",
            record_failure,
            self.store,
            name,
            input_path,
            self.stage,
            self.run,
            tries,
            errors,
        )
        return FAILED

    def run_shard(self, name: str, input_path: str, work: Callable[[], None]) -> str:
        """``work()`` writes the shard; returns :data:`DONE` or :data:`FAILED` (recorded)."""
        while True:
            with self._books:  # an engine's death, recorded meanwhile, sees this try begun and waiting
                record = self._begin(name)
                if record.get("done"):
                    return DONE  # (no try counted: the shard's marker is there)
                self._waiting[name] = record
            if self._exhausted(record):  # earlier tries of this run died with their process
                self._waiting.pop(name)
                return self._fail(name, input_path, record)
            try:
                self._try(name, record, work)
                self._done(name, record)
                return DONE
            except LeaseLost:
                raise  # another run owns the output now: stop, record nothing
            except ShardRefused as err:
                record["errors"] = [*record["errors"], scrub(f"{type(err).__name__}: {err}", self.secrets)[:2000]]
                return self._fail(name, input_path, record)
            except Exception as err:
                message = scrub(f"{type(err).__name__}: {err}", self.secrets)[:2000]
                if engine_died(err):
                    self._die_with_engine(name, record, message)
                record["errors"] = [*record["errors"], message][-self.max_attempts :]
                record["ended"] = True  # an error, caught: not a try lost with its process
                path = self._attempts_path(name)
                self._durably(f"note {name}'s error", write_json, self.output.fs, path, record)
                if self._charged(record) >= self.max_attempts:
                    return self._fail(name, input_path, record)
                clock().sleep(self.backoff_seconds * 2 ** (record["tries"] - 1) * random.uniform(0.5, 1.5))

    def _done(self, name: str, record: dict) -> None:
        """The try record of a shard just written: kept, marked done, when it took more than one try (the summary
        counts the shards retried), else removed. An engine death recorded meanwhile waits for it."""
        path = self._attempts_path(name)
        with self._books:
            self._finishing.pop(name, None)
            if record["tries"] > 1:
                done = {**record, "done": True, "ended": True}  # ended: a later try of it in this run sees no death
                self._durably(f"note {name}'s tries", write_json, self.output.fs, path, done)
            else:
                self._durably(f"clear {name}'s try count", self.output.fs.rm_file, path)

    def _try(self, name: str, record: dict, work: Callable[[], None]) -> None:
        """One try of ``work()``: beside the actor's other shards, or alone once its engine died with it in
        flight :data:`ISOLATE_AFTER` times (:mod:`veclip.shards.isolation`)."""
        isolated = record.get("engine_deaths", 0) >= ISOLATE_AFTER
        with self.exclusive.hold(alone=isolated):
            self._in_flight[name] = self._waiting.pop(name)
            self._local.isolation = Isolation.from_record(record, self._noting(name, record)) if isolated else None
            try:
                work()
            except BaseException as err:
                if not engine_died(err):  # (a shard its engine died under stays, for the death's records)
                    self._in_flight.pop(name, None)
                raise
            else:
                self._finishing[name] = self._in_flight.pop(name)
            finally:
                self._local.isolation = None

    def _noting(self, name: str, record: dict) -> Callable[[int, int], None]:
        """An isolated try's note of the request range about to run, in its try record, durably."""

        def note(lo: int, hi: int) -> None:
            record["probe"] = [lo, hi]
            self._durably(
                f"note {name}'s requests {lo}..{hi}", write_json, self.output.fs, self._attempts_path(name), record
            )

        return note

    def _die_with_engine(self, name: str, record: dict, message: str) -> None:
        """This actor's engine is gone for good: credit every shard in flight here one engine death (not a try
        against max_attempts: which one's request killed it cannot be told while they share it; an isolated
        try's noted range can), then exit, so Ray starts a fresh actor and retries them there."""
        self._books.acquire()  # never given back: the process exits (another thread that saw the death waits here)
        self._in_flight.setdefault(name, record)
        for shard, in_flight in list(self._in_flight.items()):
            why = message if shard == name else f"the engine died while this shard shared it ({message[:300]})"
            died = narrowed(in_flight)
            died |= {"engine_deaths": died.get("engine_deaths", 0) + 1, "ended": True}
            died["errors"] = [*died["errors"], why][-self.max_attempts :]
            self._durably(f"note {shard}'s engine death", write_json, self.output.fs, self._attempts_path(shard), died)
        # a shard waiting to begin, or written but not yet returned (Ray runs it again: it finds its marker), has
        # its try given back
        for shard, waiting in list(self._waiting.items()) + list(self._finishing.items()):
            given_back = {**waiting, "tries": waiting["tries"] - 1, "ended": True}
            self._durably(
                f"give back {shard}'s try", write_json, self.output.fs, self._attempts_path(shard), given_back
            )
        traceback.print_exc()
        os._exit(1)
