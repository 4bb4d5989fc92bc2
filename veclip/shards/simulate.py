"""A whole sharded run on a simulated spot fleet: days of it in minutes, with the real driver's bookkeeping.

Only three things are stand-ins: the clock (:class:`SimClock`, virtual time), the executor
(:class:`SimExecutor`: pools of actors whose engines take ``start_minutes`` to load, shards whose durations
are drawn from a lognormal around ``shard_minutes``, nodes preempted at ``preemption_per_hour`` and replaced
``replacement_minutes`` later) and the engine (a shard's work is its duration). The rest is the real code,
run by :func:`veclip.shards.driver.run_stage`: the lease (renewed on the virtual clock), the plan, the guard
(durable try counts, a try lost with its node counted, failure records), the store and its markers, the
manifest, the stall watch (reading the real progress board on the virtual clock), the reconciliation and the
summary, on a real output folder.

A discrete-event loop: one thread, events in time order; a shard's work runs (really, on disk) at the moment
its try ends, a try lost with its node leaves its try count and nothing else, as a killed actor does.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from veclip.shards.clock import Clock, clock, use_clock
from veclip.shards.driver import Executor, Pool, ShardedStage, StageStalled, StallWatch, run_stage
from veclip.shards.guard import DONE, RunContext
from veclip.shards.layout import output_shard_name
from veclip.shards.lease import LeaseLost
from veclip.shards.marker import Marker
from veclip.shards.plan import InputShard, Plan
from veclip.shards.progress import STARTING, WORKING, ProgressBoard
from veclip.shards.store import ShardStore
from veclip.shards.worker import FaultConfig, ShardWorker
from veclip.storage import Location, StorageOptions

HOUR = 3600.0


class SimClock(Clock):
    """Virtual time: events run in time order; ``sleep`` (the guard's backoff) costs no virtual time (it is
    inside the try's drawn duration)."""

    def __init__(self, start: float):
        self.now, self.start = start, start
        self.events: list = []
        self.seq = itertools.count()

    def monotonic(self) -> float:
        return self.now - self.start

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        pass

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.seq), action))

    def repeat(self, name: str, first: float, step: Callable[[], float | None], stop: threading.Event) -> None:
        def fire() -> None:
            if stop.is_set():
                return
            wait = step()
            if wait is not None and not stop.is_set():
                self.at(self.now + wait, fire)

        self.at(self.now + first, fire)

    def next_event(self) -> Callable[[], None] | None:
        if not self.events:
            return None
        when, _, action = heapq.heappop(self.events)
        self.now = max(self.now, when)
        return action


@dataclass(frozen=True)
class SimPool:
    """One pool of a simulated run: its actors (one GPU node each), a shard's mean minutes on one actor, and
    how long an engine takes to load on a fresh node."""

    name: str
    actors: int
    shard_minutes: float
    start_minutes: float = 5.0
    spread: float = 0.25  # a shard's duration: lognormal with this sigma around shard_minutes

    @classmethod
    def parse(cls, text: str) -> SimPool:
        """``NAME:ACTORS:SHARD_MINUTES[:START_MINUTES]``, e.g. ``captioner:64:8:5``."""
        parts, form = text.split(":"), "expected NAME:ACTORS:SHARD_MINUTES[:START_MINUTES], e.g. captioner:64:8:5"
        try:
            if len(parts) not in (3, 4):
                raise ValueError(f"{len(parts)} parts")
            return cls(parts[0], int(parts[1]), *(float(p) for p in parts[2:]))
        except ValueError as err:
            raise ValueError(f"--pool {text!r}: {form} ({err})") from None


@dataclass(frozen=True)
class SimConfig:
    shards: int = 2000
    rows_per_shard: int = 10_000
    pools: tuple[SimPool, ...] = (SimPool("captioner", 16, 8.0), SimPool("fuser", 4, 2.0))
    preemption_per_hour: float = 0.10  # per node
    replacement_minutes: float = 10.0  # from a node's loss to its replacement's start (then the engine loads)
    drain_notice_seconds: float = 0.0  # Ray's drain notice before a preemption (0: none; the try in flight is lost)
    never_replaced: bool = False  # a preempted node never comes back (a hung pool)
    gpu_hour_usd: float = 4.0  # an H100 [assumed], as docs/scaling.md
    poison: tuple[str, ...] = ()  # shards whose work always fails (recorded as failed)
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)


# --- the stand-in stage: the real store, markers and commit; a shard's output is its rows (a few KB) ---------


class SimWorker(ShardWorker):
    """A pool's worker: the last pool writes the shard (its rows) and its marker through the real commit;
    earlier pools only run under the guard. ``started_at`` is set by the executor (the try's virtual start)."""

    stage = "simulate"

    def __init__(self, output: str, options: StorageOptions, run: RunContext, faults: FaultConfig, last: bool, poison):
        super().__init__(output, options, run, faults)
        self.store, self.last, self.poison = ShardStore(self.output), last, frozenset(poison)
        self.started_at: float | None = None

    def process(self, path: str, size: int) -> None:
        name = output_shard_name(path)
        if name in self.poison:
            raise RuntimeError(f"{name}: a poison shard")
        if not self.last or self.current(self.store, name):
            return
        now = clock().time()
        marker = Marker(shard=name, rows=0, rows_in=size, started_at=self.started_at or now, finished_at=now)
        marker.seconds = now - marker.started_at
        rows = pa.DictionaryArray.from_arrays(pa.array(np.zeros(size, dtype=np.int32)), pa.array([name]))
        self.commit(self.store, marker, self.output.fs, path, size, pa.table({"shard": rows}))  # a few KB


class SimStage(ShardedStage):
    """``config.shards`` input shards of ``rows_per_shard`` rows (named, never read: their size is their rows)."""

    name = "simulate"

    def __init__(self, config: SimConfig, output: str, options: StorageOptions | None = None):
        self.sim = config
        super().__init__(_StageConfig(output, config.faults), options)

    def fingerprint(self) -> str:
        return f"sim-{self.sim.rows_per_shard}"

    def list_inputs(self) -> dict[str, InputShard]:
        shards = (InputShard(f"sim/in/part-{k:06d}.parquet", self.sim.rows_per_shard) for k in range(self.sim.shards))
        return {s.name: s for s in shards}

    def plan(self, run: RunContext, inputs: dict[str, InputShard], markers: dict[str, Marker]) -> Plan:
        done = {n: m for n, m in markers.items() if n in inputs and m.fingerprint == run.fingerprint}
        todo = [s for n, s in inputs.items() if n not in done]
        return Plan(inputs, done, todo, rows={n: s.size for n, s in inputs.items()})

    def pools(self, plan: Plan, run: RunContext) -> list[Pool]:
        pools = self.sim.pools
        kwargs = {"output": self.config.output, "options": self.options, "run": run, "faults": self.faults}
        return [
            Pool(p.name, SimWorker, {**kwargs, "last": k == len(pools) - 1, "poison": self.sim.poison}, 1, p.actors)
            for k, p in enumerate(pools)
        ]

    def details(self, plan, run, markers, written, started_at) -> dict:
        return {}


@dataclass(frozen=True)
class _StageConfig:
    output: str
    faults: FaultConfig
    input: str = "simulated"


# --- the simulated fleet ---------------------------------------------------------------------------------------


@dataclass
class _Actor:
    pool: int
    worker: SimWorker
    up_at: float  # the node's start (billed from here)
    ready_at: float  # the engine loaded
    name: str
    down_at: float | None = None
    leaving: bool = False  # a drain notice came: no new shard
    in_flight: dict = field(default_factory=dict)  # shard path -> (row, try start, try end)
    done: int = 0  # shards finished (the heartbeat's count)
    node: int = -1  # its entry in FleetStats.nodes


@dataclass
class FleetStats:
    useful_seconds: float = 0.0  # GPU seconds of tries that finished
    lost_seconds: float = 0.0  # GPU seconds of tries lost with their node
    tries_lost: int = 0
    preemptions: int = 0
    nodes: list = field(default_factory=list)  # (up_at, down_at) of every node

    def billed_hours(self, end: float) -> float:
        return sum(((down or end) - up) for up, down in self.nodes) / HOUR


class SimExecutor(Executor):
    """The pools on simulated spot nodes: one actor per node, ``in_flight`` 1, shards taken in order, a shard lost
    with its node retried first."""

    def __init__(self, config: SimConfig, clock: SimClock, progress: Callable[[int, int], None] | None = None):
        self.config, self.clock, self.progress = config, clock, progress
        self.random = random.Random(config.seed)
        self.stats = FleetStats()
        self.stalled: str | None = None

    def rows(self, stage: ShardedStage, plan: Plan, run: RunContext, log) -> Iterator[dict]:
        pools, specs = stage.pools(plan, run), self.config.pools
        queues = [deque() for _ in pools]
        queues[0].extend({"shard": s.path, "size": s.size, "status": ""} for s in plan.todo)
        actors: list[_Actor] = []
        gone: set[str] = set()  # the nodes lost (Ray's view of them, for the guard)
        finished: list[dict] = []
        clock, faults = self.clock, stage.faults
        board = ProgressBoard(clock.monotonic)
        watch = StallWatch(stage.name, faults, lambda: board.view(faults.heard_within), clock.monotonic)

        def start_node(k: int) -> None:
            now, spec = clock.now, specs[k]
            worker = pools[k].actor(**pools[k].kwargs)
            actor = _Actor(k, worker, now, now + spec.start_minutes * 60, f"{spec.name}-{len(actors)}")
            worker.guard.where = lambda: {"node": actor.name, "actor": actor.name}  # one actor per node
            worker.guard.node_alive = lambda node: node not in gone
            actor.node = len(self.stats.nodes)
            actors.append(actor)
            self.stats.nodes.append([now, None])
            clock.at(actor.ready_at, lambda: feed(actor))
            if self.config.preemption_per_hour > 0:
                clock.at(now + self.random.expovariate(self.config.preemption_per_hour / HOUR), lambda: notice(actor))

        def feed(actor: _Actor) -> None:
            if actor.down_at is not None or actor.leaving or actor.in_flight or clock.now < actor.ready_at:
                return
            queue = queues[actor.pool]
            if not queue:
                return
            row, spec = queue.popleft(), specs[actor.pool]
            minutes = spec.shard_minutes * math.exp(self.random.gauss(-(spec.spread**2) / 2, spec.spread))
            end = clock.now + minutes * 60
            actor.in_flight[row["shard"]] = (row, clock.now, end)
            clock.at(end, lambda: finish(actor, row["shard"]))

        def finish(actor: _Actor, shard: str) -> None:
            if actor.down_at is not None or shard not in actor.in_flight:
                return
            row, began, _ = actor.in_flight.pop(shard)
            actor.worker.started_at = began
            status = actor.worker({"shard": [row["shard"]], "size": [row["size"]], "status": [row["status"]]})[
                "status"
            ][0]
            actor.done += 1
            self.stats.useful_seconds += clock.now - began
            out = {**row, "status": status}
            if actor.pool + 1 < len(pools) and status == DONE:
                queues[actor.pool + 1].append(out)
                wake(actor.pool + 1)
            else:
                finished.append(out)
            feed(actor)

        def wake(k: int) -> None:
            for actor in actors:
                if actor.pool == k:
                    feed(actor)

        def notice(actor: _Actor) -> None:
            if actor.down_at is not None:
                return
            self.stats.preemptions += 1
            actor.leaving = True
            clock.at(clock.now + self.config.drain_notice_seconds, lambda: lose(actor))

        def lose(actor: _Actor) -> None:
            actor.down_at = clock.now
            gone.add(actor.name)
            self.stats.nodes[actor.node][1] = clock.now
            for path, (row, began, _) in actor.in_flight.items():
                actor.worker.guard._begin(output_shard_name(path))  # the try, counted, then lost with its node
                self.stats.tries_lost += 1
                self.stats.lost_seconds += clock.now - began
                queues[actor.pool].appendleft(row)
            actor.in_flight.clear()
            wake(actor.pool)
            if not self.config.never_replaced:
                clock.at(clock.now + self.config.replacement_minutes * 60, lambda: start_node(actor.pool))

        def look() -> None:
            for actor in actors:
                if actor.down_at is None:
                    phase = WORKING if clock.now >= actor.ready_at else STARTING
                    count = actor.done + int(sum(clock.now - began for _, began, _ in actor.in_flight.values()) // 10)
                    board.report(actor.name, phase, len(actor.in_flight), count)
            watch.check()  # raises StageStalled, as the real driver's loop does
            clock.at(clock.now + faults.heartbeat_seconds, look)

        for k, spec in enumerate(specs):
            for _ in range(spec.actors):
                start_node(k)
        clock.at(clock.now + faults.heartbeat_seconds, look)
        total, yielded = len(plan.todo), 0
        while yielded < total:
            action = clock.next_event()
            if action is None:
                raise RuntimeError("simulate: no event left with shards unfinished")
            try:
                action()
            except StageStalled as err:
                self.stalled = str(err)
                raise
            while finished:
                yielded += 1
                watch.progressed()
                if self.progress:
                    self.progress(yielded, total)
                yield finished.pop(0)
        for actor in actors:
            if actor.down_at is None:
                actor.down_at = clock.now
                self.stats.nodes[actor.node][1] = clock.now


# --- a run, and its report ------------------------------------------------------------------------------------


@dataclass
class SimResult:
    seed: int
    finished: bool
    hours: float  # virtual: the run's start to its summary
    gpu_hours: float
    goodput: float  # GPU time of finished tries / GPU time billed
    usd: float
    shards_done: int
    shards_failed: int
    tries_lost: int  # shards redone after their node was lost
    preemptions: int
    stopped: str | None  # the stall watch's line, if it stopped the run
    lease_lapses: int
    driver_cpu_seconds: float
    driver_peak_mib: float

    def render(self) -> str:
        head = "finished" if self.finished else f"STOPPED: {self.stopped}"
        return (
            f"seed {self.seed}: {head}; {self.hours:.1f} h, {self.gpu_hours:,.0f} GPU-h billed, goodput "
            f"{self.goodput:.1%}, ${self.usd:,.0f}; {self.shards_done} shards done, {self.shards_failed} failed, "
            f"{self.tries_lost} tries lost to {self.preemptions} preemptions and redone; lease lapses "
            f"{self.lease_lapses}; the driver: {self.driver_cpu_seconds:.0f} s CPU, {self.driver_peak_mib:.0f} MiB peak"
        )


def simulate(config: SimConfig, output: str, log=lambda *_: None, progress=None) -> SimResult:
    """One simulated run into ``output`` (a fresh local folder): the real driver on a virtual clock."""
    import resource
    import time

    virtual = SimClock(start=time.time())
    executor = SimExecutor(config, virtual, progress)
    stage = SimStage(config, output)
    cpu = time.process_time()
    summary, lapses = None, 0
    with use_clock(virtual):
        try:
            summary = run_stage(stage, log, executor=executor)
        except StageStalled:
            pass
        except LeaseLost:  # the lease lapsed mid-run (its renewals on the virtual clock failed)
            lapses += 1
    end = virtual.now
    billed = executor.stats.billed_hours(end)
    return SimResult(
        seed=config.seed,
        finished=summary is not None,
        hours=(end - virtual.start) / HOUR,
        gpu_hours=billed,
        goodput=executor.stats.useful_seconds / HOUR / billed if billed else 0.0,
        usd=billed * config.gpu_hour_usd,
        shards_done=summary["shards"]["done"] if summary else len(ShardStore(Location(output)).done()),
        shards_failed=summary["shards"]["failed"] if summary else 0,
        tries_lost=executor.stats.tries_lost,
        preemptions=executor.stats.preemptions,
        stopped=executor.stalled,
        lease_lapses=lapses,
        driver_cpu_seconds=time.process_time() - cpu,
        driver_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def render_runs(config: SimConfig, runs: list[SimResult]) -> str:
    """The runs as a distribution (min / median / max over the seeds), labelled as simulated from its inputs."""

    def spread(values: list[float], fmt: str) -> str:
        values = sorted(values)
        return " / ".join(format(v, fmt) for v in (values[0], values[len(values) // 2], values[-1]))

    pools = ", ".join(
        f"{p.name} {p.actors} x {p.shard_minutes:g} min/shard (+{p.start_minutes:g} min start)" for p in config.pools
    )
    return "\n".join(
        [
            f"SIMULATED (not measured) over {len(runs)} seed(s): {config.shards:,} shards of {config.rows_per_shard:,} "
            f"rows; {pools}; preemption {config.preemption_per_hour:.0%}/h per node, replaced after "
            f"{config.replacement_minutes:g} min; ${config.gpu_hour_usd:.2f}/GPU-h. min / median / max:",
            f"  finish      {spread([r.hours for r in runs], '.1f')} h",
            f"  GPU-hours   {spread([r.gpu_hours for r in runs], ',.0f')}",
            f"  goodput     {spread([r.goodput for r in runs], '.1%')}",
            f"  cost        ${spread([r.usd for r in runs], ',.0f')}",
            f"  redone      {spread([r.tries_lost for r in runs], 'd')} tries lost with their node",
            f"  stops       {sum(not r.finished for r in runs)} of {len(runs)} runs stopped by the stall watch; "
            f"lease lapses {sum(r.lease_lapses for r in runs)}",
        ]
    )
