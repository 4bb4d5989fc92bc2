"""A whole sharded run on a simulated spot fleet: days of it in minutes, with the real driver's bookkeeping.

Only four things are stand-ins (:mod:`veclip.shards.virtual` holds two): the clock (``SimClock``, virtual
time), the executor (:class:`SimExecutor`: pools of actors whose engines take ``start_minutes`` to load,
shards whose durations are drawn from a lognormal around ``shard_minutes``, nodes preempted at
``preemption_per_hour`` and replaced ``replacement_minutes`` later, actors killed on a live node at
``actor_kills_per_hour``), the engine (a shard's work is its duration) and the object store's wire
(``SimStore``: the local disk, each request taking S3's latency on the virtual clock and failing at
``s3_fault_rate``). The rest is the real code, run by :func:`veclip.shards.driver.run_stage`: the lease
(renewed on the virtual clock), the plan, the guard (durable try counts, a try lost with its node counted,
failure records), the store and its markers, the manifest, the stall watch (reading the real progress board
on the virtual clock), the reconciliation and the summary, on a real output folder.

A discrete-event loop: one thread, events in time order; a shard's work runs (really, on disk) at the moment
its try ends, a try lost with its node leaves its try count and nothing else, as a killed actor does.
"""

from __future__ import annotations

import dataclasses
import math
import random
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from veclip.clock import clock, use_clock
from veclip.shards.driver import Executor, run_stage
from veclip.shards.guard import DONE, RunContext
from veclip.shards.layout import output_shard_name
from veclip.shards.lease import LeaseLost
from veclip.shards.marker import Marker
from veclip.shards.plan import InputShard, Plan
from veclip.shards.progress import STARTING, WORKING, ProgressBoard
from veclip.shards.stage import Pool, ShardedStage
from veclip.shards.stall import StageStalled, StallWatch
from veclip.shards.store import ShardStore
from veclip.shards.summary import RunSummary
from veclip.shards.virtual import HOUR, SimClock, SimStore
from veclip.shards.worker import FaultConfig, ShardWorker
from veclip.storage import Location, StorageOptions, use_local_store


@dataclass(frozen=True)
class SimPool:
    """One pool of a simulated run: its actors (one GPU node each), a shard's mean minutes on one actor, and
    how long an engine takes to load on a fresh node."""

    name: str
    actors: int
    shard_minutes: float
    start_minutes: float = 5.0
    spread: float = 0.25  # a shard's duration: lognormal with this sigma around shard_minutes
    gpus: float = 1.0  # billed per actor (an engine over tensor_parallel_size GPUs)

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
class Fleet:
    """The simulated fleet's faults (``veclip simulate``, ``veclip plan --simulate``)."""

    preemption_per_hour: float = 0.10
    """each node's chance an hour"""
    replacement_minutes: float = 10.0
    """a lost node's replacement"""
    drain_notice_seconds: float = 0.0
    """notice before a preemption"""
    never_replaced: bool = False
    """lost nodes never come back (a hung pool)"""
    actor_kills_per_hour: float = 0.0
    """each actor's process killed"""
    s3_latency_ms: float = 0.0
    """a store request's mean latency"""
    s3_fault_rate: float = 0.0
    """a store request's chance to fail after retries"""
    seeds: int = 3
    """simulated runs, one per seed"""

    def sim_fields(self) -> dict:
        """As :class:`SimConfig`'s fields (the seeds are runs, not a field)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "seeds"}


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
    actor_kills_per_hour: float = 0.0  # per actor: its process killed on a live node (OOM, a crash); Ray restarts it
    s3_latency_ms: float = 0.0  # mean of a store request's latency (exponential)
    s3_fault_rate: float = 0.0  # a store request's chance to fail after the client's own retries
    poison: tuple[str, ...] = ()  # shards whose work always fails (recorded as failed)
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)


# --- the stand-in stage: the real store, markers and commit; a shard's output is its rows (a few KB) ---------


class SimWorker(ShardWorker):
    """A pool's worker: the last pool writes the shard (its rows) and its marker through the real commit;
    earlier pools only run under the guard. ``started_at`` is set by the executor (the try's virtual start)."""

    stage = "simulate"

    def __init__(
        self, output: str, options: StorageOptions, run: RunContext, faults: FaultConfig, last: bool, poison, pool=""
    ):
        # the last pool's tries are the stage's (its summary counts them); an earlier pool's are its own, as the
        # rewrite's captioner ("caption") keeps apart from its writer ("rewrite")
        self.stage = SimStage.name if last else f"{SimStage.name}-{pool}"
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
            Pool(
                p.name,
                SimWorker,
                {**kwargs, "last": k == len(pools) - 1, "poison": self.sim.poison, "pool": p.name},
                1,
                p.actors,
            )
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
    actor_kills: int = 0
    nodes: list = field(default_factory=list)  # [up_at, down_at, GPUs] of every node

    def billed_hours(self, end: float) -> float:
        return sum(((down or end) - up) * gpus for up, down, gpus in self.nodes) / HOUR


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

        def new_worker(actor: _Actor) -> SimWorker:
            worker = pools[actor.pool].actor(**pools[actor.pool].kwargs)
            worker.guard.where = lambda: {"node": actor.name, "actor": actor.name}  # one actor per node
            worker.guard.node_alive = lambda node: node not in gone
            return worker

        def start_node(k: int) -> None:
            now, spec = clock.now, specs[k]
            actor = _Actor(k, None, now, now + spec.start_minutes * 60, f"{spec.name}-{len(actors)}")
            actor.worker, actor.node = new_worker(actor), len(self.stats.nodes)
            actors.append(actor)
            self.stats.nodes.append([now, None, spec.gpus])
            clock.at(actor.ready_at, lambda: feed(actor))
            at_rate(self.config.preemption_per_hour, lambda: notice(actor))
            at_rate(self.config.actor_kills_per_hour, lambda: kill(actor))

        def at_rate(per_hour: float, action: Callable[[], None]) -> None:
            if per_hour > 0:
                clock.at(clock.now + self.random.expovariate(per_hour / HOUR), action)

        def feed(actor: _Actor) -> None:
            if actor.down_at is not None or actor.leaving or actor.in_flight or clock.now < actor.ready_at:
                return
            queue = queues[actor.pool]
            if not queue:
                return
            row, spec = queue.popleft(), specs[actor.pool]
            minutes = spec.shard_minutes * math.exp(self.random.gauss(-(spec.spread**2) / 2, spec.spread))
            end = clock.now + minutes * 60
            try_ = actor.in_flight[row["shard"]] = (row, clock.now, end)
            clock.at(end, lambda: finish(actor, row["shard"], try_))

        def finish(actor: _Actor, shard: str, try_: tuple) -> None:
            if actor.down_at is not None or actor.in_flight.get(shard) is not try_:
                return  # lost with its node or its process
            row, began, _ = try_
            actor.worker.started_at = began
            batch = {"shard": [row["shard"]], "size": [row["size"]], "status": [row["status"]]}
            result, blocked = clock.charged(lambda: actor.worker(batch))
            out = {**row, "status": result["status"][0]}
            if blocked:  # its store requests and backoff: the actor is busy until they end
                clock.at(clock.now + blocked, lambda: hand_on(actor, shard, try_, out))
            else:
                hand_on(actor, shard, try_, out)

        def hand_on(actor: _Actor, shard: str, try_: tuple, out: dict) -> None:
            if actor.down_at is not None or actor.in_flight.get(shard) is not try_:
                return  # lost while it committed: what it wrote stays, as a real actor's does
            del actor.in_flight[shard]
            began = try_[1]
            actor.done += 1
            self.stats.useful_seconds += (clock.now - began) * specs[actor.pool].gpus
            if actor.pool + 1 < len(pools) and out["status"] == DONE:
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
            drop_tries(actor)
            if not self.config.never_replaced:
                clock.at(clock.now + self.config.replacement_minutes * 60, lambda: start_node(actor.pool))

        def kill(actor: _Actor) -> None:
            """The actor's process dies on a live node: its try is lost (and charged: the node is alive); Ray
            restarts the actor, whose engine loads again."""
            if actor.down_at is not None:
                return
            self.stats.actor_kills += 1
            drop_tries(actor)
            actor.worker = new_worker(actor)
            actor.ready_at = clock.now + specs[actor.pool].start_minutes * 60
            clock.at(actor.ready_at, lambda: feed(actor))
            at_rate(self.config.actor_kills_per_hour, lambda: kill(actor))

        def drop_tries(actor: _Actor) -> None:
            for path, (row, began, _) in actor.in_flight.items():
                name = output_shard_name(path)
                clock.charged(lambda: actor.worker.guard._begin(name))  # noqa: B023 - called at once; counted, then lost
                self.stats.tries_lost += 1
                self.stats.lost_seconds += (clock.now - began) * specs[actor.pool].gpus
                queues[actor.pool].appendleft(row)
            actor.in_flight.clear()
            wake(actor.pool)

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
    tries_lost: int  # tries lost with their node or their process, and redone
    preemptions: int
    actor_kills: int
    s3_requests: int
    s3_faults: int  # requests failed (after the client's retries) that the real code had to absorb
    stopped: str | None  # the stall watch's line, if it stopped the run
    crashed: str | None  # the error that ended the driver, if one did (a rerun resumes: a finding all the same)
    lease_lapses: int
    driver_cpu_seconds: float
    driver_peak_mib: float

    def render(self) -> str:
        head = f"STOPPED: {self.stopped}" if self.stopped else f"CRASHED: {self.crashed}"
        head = "finished" if self.finished else head
        return (
            f"seed {self.seed}: {head}; {self.hours:.1f} h, {self.gpu_hours:,.0f} GPU-h billed, goodput "
            f"{self.goodput:.1%}, ${self.usd:,.0f}; {self.shards_done} shards done, {self.shards_failed} failed, "
            f"{self.tries_lost} tries lost to {self.preemptions} preemptions and {self.actor_kills} actor kills, "
            f"redone; {self.s3_faults} S3 faults in {self.s3_requests:,} requests; lease lapses {self.lease_lapses}; "
            f"the driver: {self.driver_cpu_seconds:.0f} s CPU, {self.driver_peak_mib:.0f} MiB peak"
        )


def simulate(config: SimConfig, output: str, log=lambda *_: None, progress=None) -> SimResult:
    """One simulated run into ``output`` (a fresh local folder): the real driver on a virtual clock."""
    virtual = SimClock(start=time.time())
    executor = SimExecutor(config, virtual, progress)
    stage = SimStage(config, output)
    store = SimStore(config.s3_latency_ms, config.s3_fault_rate, config.seed)
    cpu = time.process_time()
    summary, lapses, crashed = None, 0, None
    with use_clock(virtual), use_local_store(store):
        try:
            summary = RunSummary.from_json(run_stage(stage, log, executor=executor))
        except StageStalled:
            pass
        except LeaseLost:  # the lease lapsed mid-run (its renewals on the virtual clock failed)
            lapses += 1
        except Exception as err:  # noqa: BLE001 - the driver ended on an error: the run's result says which
            crashed = f"{type(err).__name__}: {err}"
    end = virtual.now
    billed = executor.stats.billed_hours(end)
    return SimResult(
        seed=config.seed,
        finished=summary is not None,
        hours=(end - virtual.start) / HOUR,
        gpu_hours=billed,
        goodput=executor.stats.useful_seconds / HOUR / billed if billed else 0.0,
        usd=billed * config.gpu_hour_usd,
        shards_done=summary.shards.done if summary else len(ShardStore(Location(output)).done()),
        shards_failed=summary.shards.failed if summary else 0,
        tries_lost=executor.stats.tries_lost,
        preemptions=executor.stats.preemptions,
        actor_kills=executor.stats.actor_kills,
        s3_requests=store.requests,
        s3_faults=store.faults,
        stopped=executor.stalled,
        crashed=crashed,
        lease_lapses=lapses,
        driver_cpu_seconds=time.process_time() - cpu,
        driver_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def simulate_seeds(config: SimConfig, seeds: int, log=print) -> list[SimResult]:
    """``seeds`` runs of ``config`` (seeds 0, 1, ...), each in a temporary folder, a progress bar and its line
    logged as it ends."""
    import tempfile

    runs = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory(prefix="veclip-sim-") as out:
            runs.append(simulate(replace(config, seed=seed), out, progress=progress_bar(f"seed {seed}")))
        log(runs[-1].render())
    return runs


def progress_bar(what: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if done == total or done % max(1, total // 50) == 0:
            filled = 30 * done // total
            end = "\n" if done == total else ""
            print(f"\r  {what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} shards", end=end, flush=True)

    return show


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
            f"{config.replacement_minutes:g} min; actor kills {config.actor_kills_per_hour:g}/h per actor; "
            f"${config.gpu_hour_usd:.2f}/GPU-h. min / median / max:",
            f"  finish      {spread([r.hours for r in runs], '.1f')} h",
            f"  GPU-hours   {spread([r.gpu_hours for r in runs], ',.0f')}",
            f"  goodput     {spread([r.goodput for r in runs], '.1%')}",
            f"  cost        ${spread([r.usd for r in runs], ',.0f')}",
            f"  redone      {spread([r.tries_lost for r in runs], 'd')} tries lost with their node or process",
            f"  S3 faults   {spread([r.s3_faults for r in runs], 'd')} absorbed ({config.s3_fault_rate:g} a request, "
            f"{config.s3_latency_ms:g} ms mean latency)",
            f"  stops       {sum(r.stopped is not None for r in runs)} of {len(runs)} runs stopped by the stall watch; "
            f"{sum(r.crashed is not None for r in runs)} crashed; lease lapses {sum(r.lease_lapses for r in runs)}",
        ]
    )
