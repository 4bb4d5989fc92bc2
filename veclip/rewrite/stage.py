"""The rewrite stage on Ray Data: shards -> captioner pool -> rewriter pool -> enriched shards.

Ray Data streams input shard paths through one or two autoscaling actor pools
(``ActorPoolStrategy(min, max)``), each actor holding a vLLM engine under its
own ``runtime_env`` (on a CPU host: the vLLM environment's interpreter). The
run itself (lease, plan, progress, reconciliation, summary) is the shard
engine's (:func:`veclip.shards.driver.run_stage`); this module adds what is the
rewrite's: its inputs and their schema check, its pools, its engine check and
its summary figures.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from veclip import schema
from veclip.command import Said, ShardedRun
from veclip.config import SECRET_NAME, redact, to_dict
from veclip.console import start_ray
from veclip.rewrite.config import PoolConfig, RewriteConfig, StageConfig, ensure_models, fingerprint
from veclip.rewrite.engine import WAITS
from veclip.rewrite.standin import is_stand_in
from veclip.rewrite.workers import ShardCaptioner, ShardRewriter, caption_store
from veclip.shards.driver import dry_run, plan_stage, pool_ask, run_stage
from veclip.shards.driver import run_command as run_sharded_command
from veclip.shards.guard import RunContext
from veclip.shards.layout import layout_of
from veclip.shards.marker import Marker, PoolStats, engine_time
from veclip.shards.plan import InputShard, Plan, ShardChanged, by_name, plan_shards
from veclip.shards.stage import Pool, ShardedStage
from veclip.shards.summary import RunSummary, render_faults, render_pool
from veclip.storage import PARQUET, Location, StorageOptions, list_file_entries, no_shards


class EngineUnavailable(ValueError):
    """A pool's interpreter cannot import vllm (or does not exist)."""


def _remote_args(pool: PoolConfig, stage: StageConfig) -> dict:
    # Secret-named variables stay out of the runtime_env (which Ray's dashboard and state API show):
    # the engine sets them in its own process from the config (VLLMEngine).
    runtime_env: dict = {"env_vars": {k: str(v) for k, v in stage.engine.env.items() if not SECRET_NAME.search(k)}}
    if pool.python:
        runtime_env["py_executable"] = pool.python
    args = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "runtime_env": runtime_env}
    return {**args, "accelerator_type": pool.accelerator_type} if pool.accelerator_type else args


def _can_import_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine_python(config: RewriteConfig, timeout_s: float = 900) -> None:
    """Before any pool starts: can each pool's interpreter import vllm? Otherwise
    Ray would restart the failing actors forever ("No module named 'vllm'")."""
    import ray

    fix = (
        "On a CPU host, `make env` creates the vLLM environment (.venv-vllm) and veclip finds it from any folder; "
        "or point to one with VECLIP_VLLM_PYTHON=/path/to/python or --set <pool>.pool.python=/path/to/python. "
        "On a cluster, run the pools in an image or runtime_env that has vllm."
    )
    stages = [config.captioner, config.fuser] if config.uses_captioner else []
    stages += [config.laclip] if config.uses_laclip and not config.uses_captioner else []
    for stage in (s for s in stages if not is_stand_in(s.engine.model)):  # a stand-in needs no vLLM
        python = stage.pool.python
        if python:
            if not Path(python).exists():
                raise EngineUnavailable(f"rewrite: the pool interpreter {python} does not exist. {fix}")
            found = subprocess.run(
                [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
            )
            ok = found.returncode == 0
        else:  # the workers run the driver's environment, wherever Ray places them: ask one
            start_ray()
            probe = ray.remote(_can_import_vllm).options(**_remote_args(stage.pool, stage))
            ok = ray.get(probe.remote(), timeout=timeout_s)
        if not ok:
            raise EngineUnavailable(
                f"rewrite: the rewrite workers' Python ({python or sys.executable}) cannot import vllm. {fix}"
            )


def list_inputs(location: Location) -> dict[str, InputShard]:
    shards = [InputShard(e["name"], int(e["size"])) for e in list_file_entries(location) if e["name"].endswith(PARQUET)]
    return by_name("rewrite", shards, location.url)


@dataclass
class RewriteSummary(RunSummary):
    """A rewrite's run summary: the shard engine's, then the rewrite's own figures."""

    mode: str = ""
    layout: str = ""
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    flags_by_reason: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # caption, rewrite: the shards' seconds
    pools: dict[str, dict] = field(default_factory=dict)  # per role: requests, tokens, rates, engine time (pool_stats)


class Rewrite(ShardedStage):
    """VeCLIP (caption, then fuse) and/or LaCLIP (rewrite) over every input shard."""

    name = "rewrite"
    summary_type = RewriteSummary

    def __init__(self, config: RewriteConfig, options: StorageOptions | None = None, redo_mismatched: bool = False):
        super().__init__(config, options)
        self.redo_mismatched = redo_mismatched

    def fingerprint(self) -> str:
        return fingerprint(self.config)[0]

    def list_inputs(self) -> dict[str, InputShard]:
        inputs = list_inputs(Location(self.config.input, self.options))
        if not inputs:
            raise no_shards("rewrite", self.config.input)
        return inputs

    def plan(self, run: RunContext, inputs: dict[str, InputShard], markers: dict[str, Marker]) -> Plan:
        config = self.config

        def changed(name: str, marker: Marker) -> bool:
            if marker.input_size is not None and marker.input_size != inputs[name].size:
                raise ShardChanged(
                    f"input shard {inputs[name].path} changed after its output was written "
                    f"({marker.input_size} bytes then, {inputs[name].size} now); its output is kept as it was: "
                    f"remove {layout_of(self.output).done}/{name}.json to write it again"
                )
            return False

        def fits(footer, shard: InputShard) -> None:
            schema.check_input_schema(config.columns.apply_to_footer(footer), shard.path)

        return plan_shards(
            "rewrite",
            config.output,
            inputs,
            markers,
            run.fingerprint,
            Location(config.input, self.options).fs,
            redo_mismatched=self.redo_mismatched,
            stale=changed,
            check=fits,
            fits=f"the column mapping {config.columns}",
        )

    def describe(self, plan: Plan, run: RunContext) -> str:
        return f"mode {self.config.mode}, fingerprint {run.fingerprint}"

    def pool_resources(self) -> dict[str, dict]:
        config = self.config
        if not config.uses_captioner:
            return {"laclip": pool_ask(config.laclip.engine.model, config.laclip.pool)}
        fuser = "fuser (fusion and LaCLIP)" if config.mode == "both" else "fuser"
        return {
            "captioner": pool_ask(config.captioner.engine.model, config.captioner.pool),
            fuser: pool_ask(config.fuser.engine.model, config.fuser.pool),
        }

    def prepare(self, plan: Plan, run: RunContext, log) -> None:
        ensure_models(self.config)  # the registered presets' models (the sample world's), built on first use
        check_engine_python(self.config)

    def pools(self, plan: Plan, run: RunContext) -> list[Pool]:
        config = self.config
        stages = [("captioner", ShardCaptioner, config.captioner)] if config.uses_captioner else []
        last = ("fuser", config.fuser) if config.uses_captioner else ("laclip", config.laclip)
        stages.append((last[0], ShardRewriter, last[1]))
        return [
            Pool(
                name,
                actor,
                {"config": config, "options": self.options, "run": run},
                min_actors=stage.pool.min_actors,
                max_actors=stage.pool.max_actors,
                # several shards per actor at once, on threads: one engine is fed by all of them (VLLMEngine),
                # so reading, decoding and writing overlap generation and a shard's tail never drains the engine
                in_flight=stage.pool.shards_in_flight,
                resources=_remote_args(stage.pool, stage),
            )
            for name, actor, stage in stages
        ]

    def details(
        self, plan: Plan, run: RunContext, markers: dict[str, Marker], written: list[str], started_at: float
    ) -> dict:
        config = self.config
        captions = caption_store(self.output).markers(save_manifest=True) if config.uses_captioner else {}
        quarantined, flags = Counter(), Counter()
        for marker in markers.values():
            quarantined.update(marker.quarantine_reasons)
            flags.update(marker.flags)
        roles = ["captioner", "fuser"] if config.uses_captioner else []
        roles += ["laclip"] if config.uses_laclip else []
        pools = {
            role: pool_stats(role, captions if role == "captioner" else markers, written, started_at) for role in roles
        }
        return redact(
            {  # engine env may hold tokens: they never reach the summary
                "mode": config.mode,
                "layout": config.layout,
                "quarantined_by_reason": dict(quarantined),
                "flags_by_reason": dict(flags),
                "stage_seconds": {
                    "caption": sum(m.seconds for m in captions.values()),
                    "rewrite": sum(m.seconds for m in markers.values()),
                },
                "pools": pools,
                "config": to_dict(config),
                "fingerprint_fields": fingerprint(config)[1],
            }
        )


def pool_stats(role: str, markers: dict[str, Marker], written: list[str], started_at: float) -> dict:
    """Token and request counts over every done shard; rates over this run's (its engines' busy time);
    how many actors did this run's shards, when each started its first one (s after the run began),
    and how the engines spent their actors' wall seconds (first shard's start to last one's end): in steps
    (the busy share; without that count, a stub engine's: the shards' seconds waiting for it), preparing
    inputs, and with nothing queued."""
    total, this_run = PoolStats(), PoolStats()
    for name, marker in markers.items():
        counts = marker.pools.get(role, PoolStats())
        total = total.add(counts)
        this_run = this_run.add(counts) if name in written else this_run
    spent = engine_time([markers[n] for n in written if n in markers])
    wall, busy = spent.actor_seconds, this_run.engine_seconds if spent.busy is None else spent.busy
    seconds = busy or 1e-9
    return {
        **vars(total),
        "actors": len(spent.first_starts),
        "actor_first_shard_s": sorted(t - started_at for t in spent.first_starts),
        "actor_seconds": wall,
        "engine_busy_seconds": busy,
        "engine_busy_share": busy / wall if wall > 0 else None,
        # the feeder's time outside a step: preparing inputs, and nothing queued (the GPU idle)
        **{f"engine_{why}_seconds": waited for why, waited in spent.waits.items()},
        **{f"engine_{why}_share": waited / wall for why, waited in spent.waits.items() if wall > 0},
        "prompt_tokens_per_s": this_run.prompt_tokens / seconds,
        "generated_tokens_per_s": this_run.generated_tokens / seconds,
    }


def plan_run(
    config: RewriteConfig, options: StorageOptions | None, fingerprint: str, redo_mismatched: bool = False
) -> Plan:
    """The rewrite's plan alone (tests, benchmarks): what a run of ``config`` would do now."""
    return plan_stage(Rewrite(config, options, redo_mismatched), RunContext("plan", fingerprint))


def run_rewrite(
    config: RewriteConfig,
    options: StorageOptions | None = None,
    log=print,
    *,
    redo_mismatched: bool = False,
    take_over_lease: bool = False,
) -> dict:
    """Rewrite every input shard not yet done; returns (and writes) the run summary.

    Shards that keep failing are recorded and listed in ``summary["failed"]``
    (the CLI exits non-zero); rerunning the same command retries exactly them.
    """
    config.validate_for_run()
    return run_stage(Rewrite(config, options, redo_mismatched), log, take_over_lease=take_over_lease)


def dry_run_rewrite(
    config: RewriteConfig, options: StorageOptions | None = None, redo_mismatched: bool = False
) -> dict:
    """What ``run_rewrite`` would do now (:func:`veclip.shards.driver.dry_run`), after the same validation."""
    config.validate_for_run()
    return dry_run(Rewrite(config, options, redo_mismatched))


def run_command(config: RewriteConfig, options: StorageOptions, run: ShardedRun) -> Said:
    """``veclip rewrite``."""
    return run_sharded_command(Rewrite(config, options, run.redo_mismatched), run, render_summary)


def render_summary(written: dict) -> str:
    """The printed summary of a rewrite's summary.json."""
    summary = RewriteSummary.from_json(written)
    lines = [
        f"rewrite ({summary.mode}): {summary.rows_in} rows in -> {summary.rows_out} out + "
        f"{summary.rows_quarantined} quarantined; {summary.shards.written_this_run} shards written this run "
        f"in {summary.wall_seconds:.1f}s ({summary.rows_per_second_this_run:.1f} rows/s)",
    ]
    if summary.shards.redone:
        lines.append(f"  redone      {summary.shards.redone:>6}  shards of another fingerprint (--redo-mismatched)")
    lines += [f"  quarantined {n:>6}  {reason}" for reason, n in sorted(summary.quarantined_by_reason.items())]
    lines += [f"  flagged     {n:>6}  {flag}" for flag, n in sorted(summary.flags_by_reason.items())]
    for name, pool in summary.pools.items():
        lines.append(
            f"  pool {name:<9} {pool.get('requests', 0):>7} requests  {pool.get('prompt_tokens_per_s', 0):9.1f} "
            "prompt tok/s  "
            f"{pool.get('generated_tokens_per_s', 0):8.1f} generated tok/s  "
            f"{pool.get('engine_busy_seconds', 0):7.1f}s engine busy"
        )
        if pool.get("actors"):
            starts = ", ".join(f"{t:.0f}" for t in pool["actor_first_shard_s"])
            busy = (
                f"; engine busy {pool['engine_busy_share']:.0%} of their time since"
                + "".join(
                    f", {what} {pool[f'engine_{why}_share']:.0%}"
                    for why, what in WAITS.items()
                    if f"engine_{why}_share" in pool
                )
                if pool.get("engine_busy_share") is not None
                else ""
            )
            lines.append(
                f"  pool {name:<9} {pool['actors']} actor(s); each started its first shard at {starts} s{busy}"
            )
    if summary.failed and summary.rows_in_failed_shards:
        lines.append(f"  {summary.rows_in_failed_shards} rows in the failed shards with a readable footer")
    return "\n".join(lines + render_pool(summary) + render_faults(summary))
