"""The driver of a sharded run: lease, plan, pools, progress, reconciliation, summary.

:func:`run_stage` is the whole run of any :class:`ShardedStage`. It holds the
output's lease (one writer), lists the inputs and the done markers at once,
plans (:mod:`veclip.shards.plan`), records what cannot run, writes
a plan for ``veclip status``, streams the shards left through the
stage's actor pools with a progress line per shard, and at the end reconciles
every input row against the output, quarantine and failure records, loudly,
before it writes the summary and the dataset card. A rerun of a finished run plans nothing
and starts no pool.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import queue
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from veclip.clock import clock
from veclip.console import alive_nodes, eta, start_ray
from veclip.shards.card import models_in, write_card
from veclip.shards.guard import DONE, RunContext, record_failure
from veclip.shards.isolation import KILLED_THE_ENGINE
from veclip.shards.layout import CARD_FILE, layout_of, output_shard_name
from veclip.shards.lease import OutputLease
from veclip.shards.marker import Marker, utc_now
from veclip.shards.plan import InputShard, Plan
from veclip.shards.progress import PoolView, board_viewer, start_board
from veclip.shards.store import ShardStore
from veclip.shards.worker import FaultConfig
from veclip.storage import Location, StorageOptions, read_json, refuse_overlap, write_json

SUMMARY_VERSION = 2


class ReconciliationError(RuntimeError):
    """Input rows and output + quarantine rows disagree: something was lost or duplicated."""


@dataclass
class ShardCounts:
    total: int
    done: int
    written_this_run: int
    failed: int
    redone: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # input shards the reader left out, by why
    retried: int = 0  # done this run after more than one try (a try lost with its actor or node, an error)
    actors_lost: int = 0  # actor processes that died during a try this run (killed, out of memory, node lost)
    nodes_lost: int = 0  # the nodes those actors were on that Ray no longer has


@dataclass
class RunSummary:
    """What a run did, over the whole output (``.veclip/summary.json``): the stage's own figures in ``details``."""

    stage: str
    input: str
    output: str
    run_id: str
    fingerprint: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    rows_in_failed_shards: int
    shards: ShardCounts
    failed: dict[str, dict]  # shard -> input, stage, tries, error
    wall_seconds: float
    rows_per_second_this_run: float
    retried: dict[str, dict] = field(default_factory=dict)  # shard -> tries, errors of the lost tries
    pool_over_time: list[dict] = field(default_factory=list)  # the actors and nodes at work as the run went
    details: dict = field(default_factory=dict)
    version: int = SUMMARY_VERSION

    def to_json(self) -> dict:
        """One flat object: the common fields, then the stage's."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        return {**common, "shards": dataclasses.asdict(self.shards), **self.details}

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        names = {f.name for f in dataclasses.fields(cls)} - {"details", "shards"}
        return cls(
            **{k: data[k] for k in names if k in data},
            shards=ShardCounts(**data["shards"]),
            details={k: v for k, v in data.items() if k not in names | {"shards"}},
        )


class ShardedStage(ABC):
    """A stage that maps input shards to output shards exactly once: rewrite, score, the next one."""

    name = ""  # in every log line, record and summary

    def __init__(self, config, options: StorageOptions | None = None):
        self.config, self.options = config, options or StorageOptions()

    @property
    def output(self) -> Location:
        return Location(self.config.output, self.options)

    @property
    def faults(self) -> FaultConfig:
        return self.config.faults

    def input_urls(self) -> list[str]:
        """Every folder the stage reads: its output may be none of them, nor inside one."""
        return [self.config.input]

    @abstractmethod
    def fingerprint(self) -> str:
        """What decides the output's content, hashed: markers of another one are never reused."""

    @abstractmethod
    def list_inputs(self) -> dict[str, InputShard]:
        """Every input shard, by output name (one listing)."""

    @abstractmethod
    def plan(self, run: RunContext, inputs: dict[str, InputShard], markers: dict[str, Marker]) -> Plan:
        """What is done and what is left (:func:`veclip.shards.plan.plan_shards` with the stage's checks)."""

    def describe(self, plan: Plan, run: RunContext) -> str:
        """The plan line's tail: the settings a user checks before the run goes on."""
        return f"fingerprint {run.fingerprint}"

    def prepare(self, plan: Plan, run: RunContext, log) -> None:  # noqa: B027 - optional
        """Before any pool starts, with work to do (check that the workers can run)."""

    def pool_resources(self) -> dict[str, dict]:
        """Per actor pool, what it asks of the cluster (models, actors, CPUs, GPUs, accelerator type)."""
        return {}

    @abstractmethod
    def pools(self, plan: Plan, run: RunContext) -> list[Pool]:
        """The actor pools every shard goes through, in order (the last one writes the output)."""

    @abstractmethod
    def details(
        self, plan: Plan, run: RunContext, markers: dict[str, Marker], written: list[str], started_at: float
    ) -> dict:
        """The stage's own summary figures over its ``markers`` (``written``: this run's)."""


@dataclass(frozen=True)
class Pool:
    """One autoscaling pool of shard workers: one shard per call (the unit of work); an actor may work on
    ``in_flight`` shards at once, on threads. ``resources``: what each actor asks of the cluster (Ray's
    ``num_cpus``, ``num_gpus``, ``accelerator_type``, ``runtime_env``)."""

    name: str
    actor: type  # a ShardWorker
    kwargs: dict
    min_actors: int
    max_actors: int
    in_flight: int = 1
    resources: dict = field(default_factory=dict)


class Executor(Protocol):
    """Runs the shards to do through a stage's pools; yields each shard's row (``shard``, ``status``) as its
    last pool is done with it, and stops the run (:class:`StageStalled`) when the pools make no progress."""

    def rows(self, stage: ShardedStage, plan: Plan, run: RunContext, log) -> Iterator[dict]: ...


class RayExecutor:
    """Production: Ray Data's autoscaling actor pools, streamed, under the stall watch."""

    def rows(self, stage: ShardedStage, plan: Plan, run: RunContext, log) -> Iterator[dict]:
        import ray

        start_ray(log)
        batch = shard_rows(plan)
        ds = ray.data.from_items(
            [dict(zip(batch, row)) for row in zip(*batch.values())], override_num_blocks=len(plan.todo)
        )
        for pool in stage.pools(plan, run):
            ds = _map_pool(ds, pool)
        faults = stage.faults
        board = start_board(run.run_id)
        try:
            watch = StallWatch(stage.name, faults, board_viewer(board, faults.heard_within, faults.look_seconds))
            yield from watch.rows(ds.iter_rows())
        except StageStalled:
            for name in ("ray", "ray.data"):  # the stopped executor's threads complain as Ray shuts down: noise
                logging.getLogger(name).setLevel(logging.CRITICAL)
            raise
        finally:
            ray.kill(board)


def _map_pool(ds, pool: Pool):
    from ray.data import ActorPoolStrategy

    threads = (
        {"max_concurrent_calls_per_actor": pool.in_flight, "enable_true_multi_threading": True}
        if pool.in_flight > 1
        else {}
    )
    return ds.map_batches(
        pool.actor,
        fn_constructor_kwargs=pool.kwargs,
        batch_size=1,
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors, **threads),
        **pool.resources,
    )


def run_stage(
    stage: ShardedStage, log=print, *, take_over_lease: bool = False, executor: Executor | None = None
) -> dict:
    """Work on every input shard not yet done; returns (and writes) the run summary.

    Shards that keep failing are recorded and listed in ``summary["failed"]``
    (the CLI exits non-zero); rerunning the same command retries exactly them.
    """
    stage.options = stage.options.resolved()  # the store the driver plans against is the one its actors use
    refuse_overlap(stage.name, stage.config.output, stage.input_urls(), stage.options)
    start, started_at = clock().monotonic(), clock().time()
    run_id, out = uuid.uuid4().hex[:12], stage.output
    lease = OutputLease(out, run_id, stage.faults.lease_seconds)
    lease.acquire(take_over=take_over_lease)
    run = RunContext(run_id=run_id, fingerprint=stage.fingerprint(), lease_generation=lease.generation)
    try:
        plan = plan_stage(stage, run)
        record_plan(stage, plan, run, started_at)
        left_out = "".join(f", {n} left out ({why})" for why, n in plan.left_out.items())
        redo = f", {len(plan.redo)} to redo" if plan.redo else ""
        log(
            f"{stage.name}: {len(plan.inputs)} shards, {len(plan.done)} already done, {len(plan.todo)} to do{redo}, "
            f"{len(plan.unreadable)} unreadable{left_out} ({stage.describe(plan, run)})"
        )
        if plan.todo:
            stage.prepare(plan, run, log)
            try:
                _run_pools(stage, plan, run, log, executor or RayExecutor())
            except StageStalled as err:
                record_stop(stage, str(err))
                raise
        summary = summarize(stage, plan, run, clock().monotonic() - start, started_at)
        out.fs.pipe_file(out.join(lease.layout.summary), json.dumps(summary, indent=1).encode())
        if plan.todo or plan.unreadable or not out.fs.exists(out.join(CARD_FILE)):  # else the output is as it was
            write_card(out, stage.name, stage.config.input, models_in(summary), log)
        return summary
    finally:
        lease.release()


def dry_run(stage: ShardedStage) -> dict:
    """What :func:`run_stage` would do now: its plan (one listing of the inputs, the markers, the footers
    of shards not yet done) and its pools, with no lease taken, nothing written, no Ray and no engine."""
    refuse_overlap(stage.name, stage.config.output, stage.input_urls(), stage.options)
    run = RunContext(run_id="dry-run", fingerprint=stage.fingerprint())
    plan = plan_stage(stage, run, forget=False)
    return {
        "stage": stage.name,
        "input": stage.config.input,
        "output": stage.config.output,
        "fingerprint": run.fingerprint,
        "settings": stage.describe(plan, run),
        "shards_total": len(plan.inputs),
        "rows_total": sum(plan.rows.values()),
        "shards_done": len(plan.done),  # a rerun skips these
        "shards_todo": len(plan.todo),
        "rows_todo": sum(plan.rows.get(s.name, 0) for s in plan.todo),
        "shards_redo": list(plan.redo),
        "shards_unreadable": dict(plan.unreadable),
        "shards_left_out": dict(plan.left_out),
        "pools": stage.pool_resources(),
    }


def pool_ask(model: str, pool) -> dict:
    """What an actor pool asks of the cluster, for a dry run's plan (``pool``: a stage's pool config)."""
    ask = {"model": model, "actors": f"{pool.min_actors}-{pool.max_actors}", "cpus_each": pool.num_cpus}
    ask["gpus_each"] = pool.num_gpus
    return ask | ({"accelerator_type": pool.accelerator_type} if pool.accelerator_type else {})


def render_dry_run(report: dict) -> str:
    lines = [
        f"{report['stage']} --dry-run: nothing was started or written",
        f"  {report['input']} -> {report['output']}",
        f"  {report['settings']}",
        f"  {report['shards_total']} shards ({report['rows_total']} rows): {report['shards_done']} done (a run skips "
        f"them), {report['shards_todo']} to do ({report['rows_todo']} rows)"
        + (f", {len(report['shards_redo'])} of them to redo" if report["shards_redo"] else ""),
    ]
    lines += [f"  unreadable: {name}: {why}" for name, why in report["shards_unreadable"].items()]
    lines += [f"  left out: {n} ({why})" for why, n in report["shards_left_out"].items()]
    for name, pool in report["pools"].items():
        lines.append(f"  pool {name}: " + ", ".join(f"{k} {v}" for k, v in pool.items()))
    return "\n".join(lines)


def plan_stage(stage: ShardedStage, run: RunContext, forget: bool = True) -> Plan:
    """The stage's plan from one listing of its inputs, of the output's markers and of its shards, made at once
    (the caller holds the lease: it is the one writer, and folds the markers into the manifest). A marker whose
    shard file is gone (a lifecycle rule, a manual ``rm``) is not trusted: the shard is redone, its marker
    dropped first (``forget``; a dry run drops nothing)."""
    store = ShardStore(stage.output)
    with ThreadPoolExecutor(3) as pool:  # long paginated listings: at once, not one after the other
        inputs, present = pool.submit(stage.list_inputs), pool.submit(store.present)
        markers = store.markers(save_manifest=forget)
        gone = sorted(n for n in markers if n not in present.result())
        for name in gone if forget else ():
            store.forget(name)
        plan = stage.plan(run, inputs.result(), {n: m for n, m in markers.items() if n not in gone})
    store.refuse_foreign({s.name for s in plan.todo}, present.result(), set(markers) - set(gone))
    plan.redo += [n for n in gone if n in plan.inputs and n not in plan.redo]
    return plan


def shard_rows(plan: Plan) -> dict[str, list]:
    """The shards to do as the pools' rows, column by column (a batch the workers take as it is)."""
    return {"shard": [s.path for s in plan.todo], "size": [s.size for s in plan.todo], "status": [""] * len(plan.todo)}


def record_plan(stage: ShardedStage, plan: Plan, run: RunContext, started_at: float) -> None:
    """The shards that cannot run, recorded as failed; what this run set out to do, for
    ``veclip status`` while it runs."""
    out, store = stage.output, ShardStore(stage.output)
    for name, why in plan.unreadable.items():
        record_failure(store, name, plan.inputs[name].path, "plan", run, 1, [why])
    write_json(
        out.fs,
        out.join(store.layout.plan),
        {
            "stage": stage.name,
            "run_id": run.run_id,
            "fingerprint": run.fingerprint,
            "started_at": started_at,
            "input": stage.config.input,
            "shards_total": len(plan.inputs),
            "rows_total": sum(plan.rows.values()),
            "shards_todo": len(plan.todo),
        },
    )


def record_stop(stage: ShardedStage, why: str) -> None:
    """Why the run stopped, in its plan record (``veclip status`` shows it), before the lease is given back."""
    out = stage.output
    path = out.join(layout_of(out).plan)
    plan = read_json(out.fs, path) or {}
    write_json(out.fs, path, {**plan, "stopped": {"at": utc_now(), "why": why}})


def _run_pools(stage: ShardedStage, plan: Plan, run: RunContext, log, executor: Executor) -> None:
    rows = {s.path: plan.rows.get(s.name, 0) for s in plan.todo}
    total, done, began = sum(rows.values()), 0, clock().monotonic()
    for n, row in enumerate(executor.rows(stage, plan, run, log), 1):
        done += rows.get(row["shard"], 0)
        _log_progress(stage, row, n, len(plan.todo), done, total, began, log)


def _log_progress(stage: ShardedStage, row: dict, n: int, todo: int, done: int, total: int, began: float, log) -> None:
    name = output_shard_name(row["shard"])
    failed = f"{stage.config.output.rstrip('/')}/{layout_of(stage.output).failed}/{name}.json"
    note = "" if row["status"] == DONE else f" (see {failed})"
    rate = done / max(clock().monotonic() - began, 1e-9)  # workers' start-up included: the ETA errs long
    left = f", ETA {eta(total - done, rate)}" if rate and done < total else ""
    log(
        f"{stage.name}: [{n}/{todo} shards, {done}/{total} rows, {rate:.1f} rows/s{left}] {row['status']} "
        f"{posixpath.basename(row['shard'])}{note}"
    )


class StageStalled(RuntimeError):
    """The pool made no progress within the stall deadline: its actors are dead, cannot be placed, or hung."""


class StallWatch:
    """No silent hang, no false stop: the driver's own loop (:meth:`rows`) looks at the pool every
    ``faults.look_seconds`` and ends the run with :class:`StageStalled` when it made no progress for the
    deadline in force (:meth:`FaultConfig.stall_deadline`): ``first_shard_seconds`` while no actor is working
    (the pool starting, a lost node being replaced), else ``stall_factor`` x the longest pause between two
    signs of progress while working, at least ``stall_seconds``. Progress is a shard's row reaching the
    driver, or anything the actors' heartbeats report (:mod:`veclip.shards.progress`): requests finished
    inside a shard, an actor appearing or starting its first shard. No signal is involved, so a driver that
    ignores or blocks SIGINT (started with ``&``, a Ray job entrypoint under bash) stops all the same."""

    def __init__(
        self,
        stage: str,
        faults: FaultConfig,
        view: Callable[[], PoolView | None] = lambda: None,
        now: Callable[[], float] | None = None,
    ):
        self.stage, self.faults, self.view = stage, faults, view
        self.clock = now or clock().monotonic
        self.last = self.clock()  # the last sign of progress
        self.longest: float | None = None  # the longest pause between two while working (None: not yet working)
        self.working = False

    def progressed(self, at: float | None = None) -> None:
        at = self.clock() if at is None else at
        if at <= self.last:
            return
        if self.working:
            self.longest = max(self.longest or 0.0, at - self.last)
        self.last = at

    def deadline(self) -> float:
        return self.faults.stall_deadline(self.longest if self.working else None)

    def check(self) -> None:
        """Look at the pool; raise :class:`StageStalled` when the deadline in force has passed."""
        view, now = self.view(), self.clock()
        if view is not None:
            if view.since_progress is not None:  # a pause that ends now is timed in the state it was spent in
                self.progressed(now - view.since_progress)
            self.working = view.working > 0
        deadline = self.deadline()
        if now - self.last > deadline:
            raise StageStalled(self._why(now - self.last, deadline))

    def _why(self, silent: float, deadline: float) -> str:
        if self.working:
            cause = (
                f"its actors are working but made no progress for {silent:.0f} s (the deadline {deadline:.0f} s: "
                "faults.stall_factor x the longest pause seen, at least faults.stall_seconds): an engine hung"
            )
        else:
            cause = (
                f"no actor of the pool is working and nothing progressed for {silent:.0f} s (the start-up "
                f"allowance, faults.first_shard_seconds = {deadline:.0f} s): the pool's actors are dead or cannot "
                "be placed (a lost node, no node with room; `ray status` shows pending demands)"
            )
        return f"{self.stage}: stopped: {cause}. What finished is kept: rerun to continue."

    def rows(self, rows: Iterator[dict]) -> Iterator[dict]:
        """The pools' rows as they come, the pool looked at in between; raises :class:`StageStalled`."""
        arrived: queue.Queue = queue.Queue()

        def pump() -> None:  # Ray Data's iterator blocks: it runs aside, the driver's loop stays free to stop
            try:
                for row in rows:
                    arrived.put((row, None))
                arrived.put((None, None))
            except BaseException as err:  # noqa: BLE001 - handed to the driver's loop, which raises it
                arrived.put((None, err))

        threading.Thread(target=pump, name="veclip-rows", daemon=True).start()
        while True:
            try:
                row, err = arrived.get(timeout=self.faults.look_seconds)
            except queue.Empty:
                self.check()
                continue
            if err is not None:
                raise err
            if row is None:
                return
            self.progressed()
            yield row


def summarize(stage: ShardedStage, plan: Plan, run: RunContext, wall_seconds: float, started_at: float = 0.0) -> dict:
    """The run summary over the whole output; raises if any row is unaccounted for.

    A shard is done (marked with this run's fingerprint, rows reconciled),
    failed (recorded with its error), or lost: that raises.
    """
    store = ShardStore(stage.output)
    # Nothing ran (a no-op rerun): the plan's markers are current, the lease kept other writers out.
    listed = store.markers(save_manifest=True) if plan.todo else plan.done
    markers = {
        n: m
        for n, m in listed.items()
        if n in plan.inputs and n not in plan.unreadable and m.fingerprint == run.fingerprint
    }
    failed = {n: f for n, f in store.failures().items() if n in plan.inputs and n not in markers}
    problems = [f"{name}: not written" for name in sorted(set(plan.inputs) - set(markers) - set(failed))]
    for name, m in markers.items():
        if name in plan.rows and m.rows_out + m.quarantined != plan.rows[name]:
            problems.append(f"{name}: {plan.rows[name]} input rows but {m.rows} out + {m.quarantined} quarantined")
    if problems:
        raise ReconciliationError(f"{stage.name}: rows unaccounted for: " + "; ".join(problems))
    written = sorted(n for n, m in markers.items() if m.run_id == run.run_id)
    retried = store.retried(stage.name, run.run_id) if plan.todo else {}
    return RunSummary(
        stage=stage.name,
        input=stage.config.input,
        output=stage.config.output,
        run_id=run.run_id,
        fingerprint=run.fingerprint,
        rows_in=sum(plan.rows.get(n, 0) for n in markers),
        rows_out=sum(m.rows_out for m in markers.values()),
        rows_quarantined=sum(m.quarantined for m in markers.values()),
        rows_in_failed_shards=sum(plan.rows.get(n, 0) for n in failed),
        shards=ShardCounts(
            len(plan.inputs),
            len(markers),
            len(written),
            len(failed),
            len(plan.redo),
            dict(plan.left_out),
            len(retried),
            *_losses(retried),
        ),
        retried=retried,
        pool_over_time=pool_over_time([markers[n] for n in written]),
        failed={n: f.brief() for n, f in sorted(failed.items())},
        wall_seconds=wall_seconds,
        rows_per_second_this_run=sum(plan.rows.get(n, 0) for n in written) / wall_seconds,
        details=stage.details(plan, run, markers, written, started_at),
    ).to_json()


def pool_over_time(markers: list[Marker], points: int = 12) -> list[dict]:
    """How many actors (and on how many nodes) were writing shards at ``points`` even moments of this run:
    the pool growing as the autoscaler adds nodes, or shrinking as they go, read from the markers' times.
    (With two pools, the one that writes the shards.)"""
    spans = [(m.started_at, m.finished_at, m.actor, m.node) for m in markers if m.started_at and m.finished_at]
    if not spans:
        return []
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    timeline = []
    for k in range(points):
        at = first + (last - first) * (k + 0.5) / points
        busy = [(actor, node) for start, end, actor, node in spans if start <= at < end]
        timeline.append({"at_s": round(at - first, 1), "actors": len(set(busy)), "nodes": len({n for _, n in busy})})
    return timeline


def render_pool(summary: dict) -> list[str]:
    """The pool's size over the run, in a line, when it changed."""
    timeline = summary.get("pool_over_time") or []
    actors = [t["actors"] for t in timeline]
    if len(set(actors)) <= 1:
        return []
    return [
        f"  pool over the run: {' '.join(map(str, actors))} actor(s) writing shards at even moments "
        f"(up to {max(actors)}, on up to {max(t['nodes'] for t in timeline)} node(s))"
    ]


def _losses(retried: dict[str, dict]) -> tuple[int, int]:
    """The actors lost during this run's tries, and how many of their nodes Ray no longer has."""
    lost = {(where["node"], where["actor"]) for record in retried.values() for where in record["lost"]}
    nodes = {node for node, _ in lost}
    if nodes and nodes != {"local"}:
        import ray

        nodes -= alive_nodes() if ray.is_initialized() else nodes
    else:
        nodes = set()
    return len(lost), len(nodes)


def render_faults(summary: dict) -> list[str]:
    """The summary lines of the shards retried (a try lost with its actor or node) and of those that kept
    failing: every stage prints them the same way."""
    lines = []
    if summary.get("retried"):
        name, first = next(iter(summary["retried"].items()))
        lines.append(
            f"  retried {len(summary['retried'])} shard(s) whose earlier try was lost or failed, all done now "
            f"(e.g. {name}: {first['tries']} tries; {(first['errors'] or ['its process died'])[-1][:160]})"
        )
    counts = summary["shards"]
    deaths = {n: r for n, r in summary.get("retried", {}).items() if r.get("engine_deaths")}
    if deaths:
        poison = sum(len(r.get("poison", [])) for r in deaths.values())
        lines.append(
            f"  {len(deaths)} shard(s) lost tries with their engine ({sum(r['engine_deaths'] for r in deaths.values())}"
            f" in all, charged to none); {poison} request(s) found to kill it alone, their rows marked "
            f"{KILLED_THE_ENGINE}"
        )
    if counts.get("actors_lost"):
        lines.append(
            f"  {counts['actors_lost']} actor(s) died mid-shard and were restarted by Ray"
            + (f", {counts['nodes_lost']} of their node(s) lost" if counts.get("nodes_lost") else "")
        )
    if not summary["failed"]:
        return lines
    return lines + [
        f"FAILED: {len(summary['failed'])} shard(s) kept failing (`veclip status {summary['output']}` shows their "
        "errors). Rerun the same command to retry exactly these:",
        *(
            f"  {name}  [{f['stage']}, {f['tries']} tries]  {(f['error'] or '')[:200]}"
            for name, f in summary["failed"].items()
        ),
    ]
