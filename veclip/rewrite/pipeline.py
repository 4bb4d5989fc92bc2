"""The rewrite stage on Ray Data: shards -> captioner pool -> rewriter pool -> enriched shards.

Ray Data streams input shard paths through one or two autoscaling actor pools
(``ActorPoolStrategy(min, max)``), each actor holding a vLLM engine under its
own ``runtime_env`` (on a CPU host: the vLLM environment's interpreter). A run
holds the output's lease (one writer), plans with a few concurrent requests
(:mod:`veclip.rewrite.plan`), and subtracts work already marked done with its
fingerprint, so a rerun only does what is left and a rerun of a finished run
starts no engine at all. Shards that keep failing are recorded, not fatal
(:mod:`veclip.rewrite.faults`). At the end every input row is reconciled
against the output, quarantine and failed-shard records, loudly.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from veclip.console import eta, start_ray
from veclip.config import SECRET_NAME, redact
from veclip.lease import OutputLease
from veclip.rewrite.config import PoolConfig, RewriteConfig, StageConfig, ensure_models, fingerprint, to_dict
from veclip.rewrite.faults import DONE, RunContext, record_failure
from veclip.rewrite.plan import Plan, plan_run
from veclip.rewrite.workers import CAPTIONS_DIR, ShardCaptioner, ShardRewriter
from veclip.status import PLAN_FILE
from veclip.storage import Location, ShardStore, StorageOptions, output_shard_name, write_json

SUMMARY_FILE = "_summary.json"


class EngineUnavailable(ValueError):
    """A pool's interpreter cannot import vllm (or does not exist)."""


class ReconciliationError(RuntimeError):
    """Input rows and output + quarantine rows disagree: something was lost or duplicated."""


def _remote_args(pool: PoolConfig, stage: StageConfig) -> dict:
    # Secret-named variables stay out of the runtime_env (which Ray's dashboard and state API show):
    # the engine sets them in its own process from the config (VLLMEngine).
    runtime_env: dict = {"env_vars": {k: str(v) for k, v in stage.engine.env.items() if not SECRET_NAME.search(k)}}
    if pool.python:
        runtime_env["py_executable"] = pool.python
    args = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "runtime_env": runtime_env}
    return {**args, "accelerator_type": pool.accelerator_type} if pool.accelerator_type else args


def _map_pool(ds, actor_cls, stage: StageConfig, config: RewriteConfig, options: StorageOptions, run: RunContext):
    from ray.data import ActorPoolStrategy

    pool = stage.pool
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs={"config": config, "options": options, "run": run},
        batch_size=1,  # one shard per call: the shard is the unit of work
        # Several shards per actor at once, on threads: one engine is fed by all of them (VLLMEngine._feed),
        # so reading, decoding and writing overlap generation and a shard's tail never drains the engine.
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                  max_concurrent_calls_per_actor=pool.shards_in_flight, enable_true_multi_threading=True),
        **_remote_args(pool, stage),
    )


def _can_import_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine_python(config: RewriteConfig, timeout_s: float = 900) -> None:
    """Before any pool starts: can each pool's interpreter import vllm? Otherwise
    Ray would restart the failing actors forever ("No module named 'vllm'")."""
    import ray

    fix = ("On a CPU host, `make env` creates the vLLM environment (.venv-vllm) and veclip finds it from any folder; "
           "or point to one with VECLIP_VLLM_PYTHON=/path/to/python or --set <pool>.pool.python=/path/to/python. "
           "On a cluster, run the pools in an image or runtime_env that has vllm.")
    stages = [config.captioner, config.fuser] if config.uses_captioner else []
    stages += [config.laclip] if config.uses_laclip and not config.uses_captioner else []
    for stage in stages:
        python = stage.pool.python
        if python:
            if not Path(python).exists():
                raise EngineUnavailable(f"rewrite: the pool interpreter {python} does not exist. {fix}")
            found = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"])
            ok = found.returncode == 0
        else:  # the workers run the driver's environment, wherever Ray places them: ask one
            start_ray()
            probe = ray.remote(_can_import_vllm).options(**_remote_args(stage.pool, stage))
            ok = ray.get(probe.remote(), timeout=timeout_s)
        if not ok:
            raise EngineUnavailable(f"rewrite: the rewrite workers' Python ({python or sys.executable}) cannot import vllm. {fix}")


def _record_unreadable(store: ShardStore, plan: Plan, run: RunContext) -> None:
    for name, why in plan.unreadable.items():
        record_failure(store, name, plan.inputs[name].path, "plan", run, 1, [why])


def _rows_out(marker: dict) -> int:
    """A done shard's rows with captions: a caption table keeps its quarantined rows (null, flagged); a copy does not."""
    return marker["rows"] - (marker["quarantined"] if marker.get("layout", "copy") == "captions" else 0)


def summarize(config: RewriteConfig, options: StorageOptions | None, plan: Plan, wall_seconds: float, run: RunContext,
              started_at: float | None = None) -> dict:
    """The run summary over the whole output; raises if any row is unaccounted for.

    A shard is done (marked with this run's fingerprint, rows reconciled),
    failed (recorded under ``_failed/`` with its error), or lost: that raises.
    """
    out = Location(config.output, options or StorageOptions())
    store = ShardStore(out)
    # Nothing ran (a no-op rerun): the plan's markers are current, the lease kept other writers out.
    listed = store.markers(save_manifest=True) if plan.todo else plan.done
    markers = {n: m for n, m in listed.items() if n in plan.inputs and m.get("fingerprint") == run.fingerprint}
    captions = ShardStore(out.child(CAPTIONS_DIR)).markers(save_manifest=True) if config.uses_captioner else {}
    failed = {n: f for n, f in store.failures().items() if n in plan.inputs and n not in markers}
    problems = [f"{name}: not written" for name in sorted(set(plan.inputs) - set(markers) - set(failed))]
    for name, marker in markers.items():
        accounted = _rows_out(marker) + marker["quarantined"]
        if name in plan.input_rows and accounted != plan.input_rows[name]:
            problems.append(f"{name}: {plan.input_rows[name]} input rows but {marker['rows']} out + {marker['quarantined']} quarantined")
    if problems:
        raise ReconciliationError("rewrite: rows unaccounted for: " + "; ".join(problems))
    written = sorted(n for n, m in markers.items() if m.get("run_id") == run.run_id)

    def pool_stats(prefix: str, source: dict) -> dict:
        """Token and request counts over every done shard; rates over this run's (its engines' busy time)."""
        def totals(markers) -> Counter:
            total = Counter()
            for marker in markers:
                total.update({k[len(prefix) + 1 :]: v for k, v in marker.items() if k.startswith(prefix + "_")})
            return total

        total, this_run = totals(source.values()), totals(source[n] for n in written if n in source)
        actors = pool_actors(source, prefix)
        seconds = actors["engine_busy_seconds"] or 1e-9
        return {
            **dict(total),
            **actors,
            "prompt_tokens_per_s": this_run.get("prompt_tokens", 0) / seconds,
            "generated_tokens_per_s": this_run.get("generated_tokens", 0) / seconds,
        }

    def pool_actors(source: dict, pool: str) -> dict:
        """How many actors did this run's shards, when each started its first one (s after the run
        began), and the engine's busy share: the seconds each actor's engine had requests in it
        over the actor's wall seconds from its first shard's start to its last one's end (without
        that count, a stub engine's: the shards' seconds waiting for it)."""
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        busy_from: dict[str, float] = {}
        busy_to: dict[str, float] = {}
        waited = 0.0
        for name in written:
            marker = source.get(name, {})
            if "actor" not in marker:
                continue
            actor = marker["actor"]
            first[actor] = min(first.get(actor, marker["started_at"]), marker["started_at"])
            last[actor] = max(last.get(actor, 0.0), marker.get("finished_at", marker["started_at"]))
            waited += marker.get(f"{pool}_engine_seconds", 0.0)
            if marker.get("engine_busy_to") is not None:
                busy_from[actor] = min(busy_from.get(actor, marker["engine_busy_from"]), marker["engine_busy_from"])
                busy_to[actor] = max(busy_to.get(actor, 0.0), marker["engine_busy_to"])
        wall = sum(last[a] - first[a] for a in first)
        busy = sum(busy_to[a] - busy_from[a] for a in busy_to) if busy_to else waited
        return {"actors": len(first), "actor_first_shard_s": sorted(t - (started_at or 0.0) for t in first.values()),
                "actor_seconds": wall, "engine_busy_seconds": busy, "engine_busy_share": busy / wall if wall > 0 else None}

    quarantined, flags = Counter(), Counter()
    for marker in markers.values():
        quarantined.update(marker.get("quarantine_reasons", {}))
        flags.update(marker.get("flags", {}))
    pools = {}
    if config.uses_captioner:
        pools["captioner"] = pool_stats("captioner", captions)
        pools["fuser"] = pool_stats("fuser", markers)
    if config.uses_laclip:
        pools["laclip"] = pool_stats("laclip", markers)
    return redact({  # engine env may hold tokens: they never reach the summary
        "input": config.input,
        "output": config.output,
        "mode": config.mode,
        "run_id": run.run_id,
        "fingerprint": run.fingerprint,
        "rows_in": sum(plan.input_rows.get(n, 0) for n in markers),
        "rows_out": sum(_rows_out(m) for m in markers.values()),
        "layout": config.layout,
        "rows_quarantined": sum(m["quarantined"] for m in markers.values()),
        "rows_in_failed_shards": sum(plan.input_rows.get(n, 0) for n in failed),
        "quarantined_by_reason": dict(quarantined),
        "flags_by_reason": dict(flags),
        "shards": {"total": len(plan.inputs), "done": len(markers), "written_this_run": len(written), "failed": len(failed),
                   "redone": len(plan.redo)},
        "failed": {n: {k: f.get(k) for k in ("input", "stage", "tries", "error")} for n, f in sorted(failed.items())},
        "wall_seconds": wall_seconds,
        "rows_per_second_this_run": sum(plan.input_rows[n] for n in written) / wall_seconds,
        "stage_seconds": {
            "caption": sum(m.get("seconds", 0.0) for m in captions.values()),
            "rewrite": sum(m.get("seconds", 0.0) for m in markers.values()),
        },
        "pools": pools,
        "config": to_dict(config),
        "fingerprint_fields": fingerprint(config)[1],
    })


def run_rewrite(config: RewriteConfig, options: StorageOptions | None = None, log=print, *,
                redo_mismatched: bool = False, take_over_lease: bool = False) -> dict:
    """Rewrite every input shard not yet done; returns (and writes) the run summary.

    Shards that keep failing are recorded and listed in ``summary["failed"]``
    (the CLI exits non-zero); rerunning the same command retries exactly them.
    """
    options = options or StorageOptions()
    config.validate_for_run()
    ensure_models(config)
    start, started_at = time.perf_counter(), time.time()
    run = RunContext(run_id=uuid.uuid4().hex[:12], fingerprint=fingerprint(config)[0])
    out = Location(config.output, options)
    lease = OutputLease(out, run.run_id, config.faults.lease_seconds)
    lease.acquire(take_over=take_over_lease)
    try:
        plan = plan_run(config, options, run.fingerprint, redo_mismatched)
        _record_unreadable(ShardStore(out), plan, run)
        write_plan(out, config, run, plan, started_at)
        log(f"rewrite: {len(plan.inputs)} shards, {len(plan.done)} already done, {len(plan.todo)} to do, "
            f"{len(plan.unreadable)} unreadable (mode {config.mode}, fingerprint {run.fingerprint})")
        if plan.todo:
            _rewrite_shards(config, options, run, plan, log)
        summary = summarize(config, options, plan, time.perf_counter() - start, run, started_at)
        out.fs.pipe_file(out.join(SUMMARY_FILE), json.dumps(summary, indent=1).encode())
        return summary
    finally:
        lease.release()


def write_plan(out: Location, config: RewriteConfig, run: RunContext, plan: Plan, started_at: float) -> None:
    """What this run set out to do, for `veclip status` while it runs."""
    write_json(out.fs, out.join(PLAN_FILE), {
        "run_id": run.run_id, "fingerprint": run.fingerprint, "started_at": started_at, "input": config.input,
        "shards_total": len(plan.inputs), "rows_total": sum(plan.input_rows.values()), "shards_todo": len(plan.todo)})


def _rewrite_shards(config: RewriteConfig, options: StorageOptions, run: RunContext, plan: Plan, log) -> None:
    import ray

    check_engine_python(config)
    start_ray(log)
    ds = ray.data.from_items([{"shard": s.path, "status": ""} for s in plan.todo], override_num_blocks=len(plan.todo))
    if config.uses_captioner:
        ds = _map_pool(ds, ShardCaptioner, config.captioner, config, options, run)
    ds = _map_pool(ds, ShardRewriter, config.fuser if config.uses_captioner else config.laclip, config, options, run)
    rows = {s.path: plan.input_rows.get(output_shard_name(s.path), 0) for s in plan.todo}
    total, done, start = sum(rows.values()), 0, time.perf_counter()
    for n, row in enumerate(ds.iter_rows(), 1):
        note = "" if row["status"] == DONE else f" (see {config.output}/_failed/{output_shard_name(row['shard'])}.json)"
        done += rows.get(row["shard"], 0)
        rate = done / max(time.perf_counter() - start, 1e-9)  # engine start-up included: the ETA errs long
        left = f", ETA {eta(total - done, rate)}" if rate and done < total else ""
        log(f"rewrite: [{n}/{len(plan.todo)} shards, {done}/{total} rows, {rate:.1f} rows/s{left}] {row['status']} "
            f"{posixpath.basename(row['shard'])}{note}")


def render_summary(summary: dict) -> str:
    lines = [
        f"rewrite ({summary['mode']}): {summary['rows_in']} rows in -> {summary['rows_out']} out + "
        f"{summary['rows_quarantined']} quarantined; {summary['shards']['written_this_run']} shards written this run "
        f"in {summary['wall_seconds']:.1f}s ({summary['rows_per_second_this_run']:.1f} rows/s)",
    ]
    if summary["shards"]["redone"]:
        lines.append(f"  redone      {summary['shards']['redone']:>6}  shards of another fingerprint (--redo-mismatched)")
    lines += [f"  quarantined {n:>6}  {reason}" for reason, n in sorted(summary["quarantined_by_reason"].items())]
    lines += [f"  flagged     {n:>6}  {flag}" for flag, n in sorted(summary["flags_by_reason"].items())]
    for name, pool in summary["pools"].items():
        lines.append(
            f"  pool {name:<9} {pool.get('requests', 0):>7} requests  {pool.get('prompt_tokens_per_s', 0):9.1f} prompt tok/s  "
            f"{pool.get('generated_tokens_per_s', 0):8.1f} generated tok/s  {pool.get('engine_busy_seconds', 0):7.1f}s engine busy"
        )
        if pool.get("actors"):
            starts = ", ".join(f"{t:.0f}" for t in pool["actor_first_shard_s"])
            busy = f"; engine busy {pool['engine_busy_share']:.0%} of their time since" if pool.get("engine_busy_share") is not None else ""
            lines.append(f"  pool {name:<9} {pool['actors']} actor(s); each started its first shard at {starts} s{busy}")
    if summary["failed"]:
        rows = f" ({summary['rows_in_failed_shards']} rows in those with a readable footer)" if summary["rows_in_failed_shards"] else ""
        lines.append(f"FAILED: {len(summary['failed'])} shard(s){rows} kept failing; "
                     f"their errors are in {summary['output']}/_failed/. Rerun the same command to retry exactly these:")
        lines += [f"  {name}  [{f['stage']}, {f['tries']} tries]  {f['error'][:200]}" for name, f in summary["failed"].items()]
    return "\n".join(lines)
