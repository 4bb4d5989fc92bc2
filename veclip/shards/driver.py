"""The driver of a sharded run: lease, plan, pools, progress, then the summary.

:func:`run_stage` is the whole run of any :class:`ShardedStage`. It holds the
output's lease (one writer), lists the inputs and the done markers at once,
plans (:mod:`veclip.shards.plan`), records what cannot run, writes
a plan for ``veclip status``, streams the shards left through the
stage's actor pools with a progress line per shard, and at the end reconciles
every input row against the output, quarantine and failure records, loudly,
before it writes the summary (:mod:`veclip.shards.summary`) and the dataset card. The
stall watch (:mod:`veclip.shards.stall`) stops a run whose pools make no progress. A rerun
of a finished run plans nothing and starts no pool.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from veclip.clock import clock
from veclip.command import Said, ShardedRun
from veclip.console import eta, start_ray
from veclip.shards.card import write_card
from veclip.shards.guard import DONE, RunContext, record_failure
from veclip.shards.layout import CARD_FILE, layout_of, output_shard_name
from veclip.shards.lease import OutputLease
from veclip.shards.marker import utc_now
from veclip.shards.plan import Plan
from veclip.shards.progress import board_viewer, start_board
from veclip.shards.stage import Pool, ShardedStage
from veclip.shards.stall import StageStalled, StallWatch
from veclip.shards.store import ShardStore
from veclip.shards.summary import RunSummary, summarize
from veclip.storage import read_json, refuse_overlap, write_json


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
            write_card(out, stage.name, stage.config.input, RunSummary.from_json(summary).models, log)
        return summary
    finally:
        lease.release()


def run_command(stage: ShardedStage, run: ShardedRun, render: Callable[[dict], str]) -> Said:
    """A sharded stage's command (``veclip rewrite``, ``veclip score``): the dry run's plan, or the run's summary
    as ``render`` prints it (exit 1 when a shard failed)."""
    stage.config.validate_for_run()
    if run.dry_run:
        return Said(render_dry_run(dry_run(stage)))
    summary = run_stage(stage, take_over_lease=run.take_over_lease)
    return Said(render(summary), 1 if RunSummary.from_json(summary).failed else 0)


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
