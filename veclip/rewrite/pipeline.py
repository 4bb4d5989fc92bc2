"""The rewrite stage on Ray Data: shards -> captioner pool -> rewriter pool -> enriched shards.

Ray Data streams input shard paths through one or two autoscaling actor pools
(``ActorPoolStrategy(min, max)``), each actor holding a vLLM engine under its
own ``runtime_env`` (on a CPU host: the vLLM environment's interpreter). Work
already marked done is subtracted first, so a rerun only does what is left,
and a rerun of a finished run starts no engine at all. At the end every input
row is reconciled against the output and quarantine counts, loudly.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow.parquet as pq

from veclip import schema
from veclip.rewrite.config import PoolConfig, RewriteConfig, StageConfig, to_dict
from veclip.rewrite.workers import CAPTIONS_DIR, ShardCaptioner, ShardRewriter
from veclip.storage import Location, ShardStore, StorageOptions, list_shards, output_shard_name

SUMMARY_FILE = "_summary.json"


class ReconciliationError(RuntimeError):
    """Input rows and output + quarantine rows disagree: something was lost or duplicated."""


def _remote_args(pool: PoolConfig, stage: StageConfig) -> dict:
    runtime_env: dict = {"env_vars": {k: str(v) for k, v in stage.engine.env.items()}}
    if pool.python:
        runtime_env["py_executable"] = pool.python
    args = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "runtime_env": runtime_env}
    return {**args, "accelerator_type": pool.accelerator_type} if pool.accelerator_type else args


def _map_pool(ds, actor_cls, stage: StageConfig, config: RewriteConfig, options: StorageOptions):
    from ray.data import ActorPoolStrategy

    pool = stage.pool
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs={"config": config, "options": options},
        batch_size=1,  # one shard per call: the shard is the unit of work
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        **_remote_args(pool, stage),
    )


def _check_inputs(location: Location, paths: list[str], config: RewriteConfig) -> dict[str, int]:
    """Rows per input shard; every shard's schema checked before any engine starts."""
    counts = {}
    for path in paths:
        with location.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema.check_input_schema(config.columns.apply(parquet.schema_arrow.empty_table()).schema, path)
            counts[output_shard_name(path)] = parquet.metadata.num_rows
    if len(counts) != len(paths):
        raise ValueError(f"rewrite: input shards in {config.input} map to the same output name; rename them")
    return counts


def summarize(config: RewriteConfig, options: StorageOptions, input_rows: dict[str, int], wall_seconds: float, written: list[str],
              started_at: float | None = None) -> dict:
    """The run summary over the whole output; raises if any row is unaccounted for."""
    out = Location(config.output, options)
    markers = {m["shard"]: m for m in ShardStore(out).markers()}
    captions = {m["shard"]: m for m in ShardStore(out.child(CAPTIONS_DIR)).markers()} if config.uses_captioner else {}
    missing = sorted(set(input_rows) - set(markers))
    problems = [f"{name}: not written" for name in missing]
    for name, marker in markers.items():
        accounted = marker["rows"] + marker["quarantined"]
        if name in input_rows and accounted != input_rows[name]:
            problems.append(f"{name}: {input_rows[name]} input rows but {marker['rows']} out + {marker['quarantined']} quarantined")
    if problems:
        raise ReconciliationError("rewrite: rows unaccounted for: " + "; ".join(problems))

    def pool_stats(prefix: str, source: dict) -> dict:
        total = Counter()
        for marker in source.values():
            total.update({k[len(prefix) + 1 :]: v for k, v in marker.items() if k.startswith(prefix + "_")})
        seconds = total.get("engine_seconds", 0.0) or 1e-9
        return {
            **dict(total),
            "prompt_tokens_per_s": total.get("prompt_tokens", 0) / seconds,
            "generated_tokens_per_s": total.get("generated_tokens", 0) / seconds,
        }

    def pool_actors(source: dict) -> dict:
        """How many actors did this run's shards, and when each started its first one (s after the run began)."""
        first: dict[str, float] = {}
        for name in written:
            marker = source.get(name, {})
            if "actor" in marker:
                first[marker["actor"]] = min(first.get(marker["actor"], marker["started_at"]), marker["started_at"])
        return {"actors": len(first), "actor_first_shard_s": sorted(t - (started_at or 0.0) for t in first.values())}

    quarantined, flags = Counter(), Counter()
    for marker in markers.values():
        quarantined.update(marker.get("quarantine_reasons", {}))
        flags.update(marker.get("flags", {}))
    rows_in = sum(input_rows.values())
    pools = {}
    if config.uses_captioner:
        pools["captioner"] = {**pool_stats("captioner", captions), **pool_actors(captions)}
        pools["fuser"] = {**pool_stats("fuser", markers), **pool_actors(markers)}
    if config.uses_laclip:
        pools["laclip"] = {**pool_stats("laclip", markers), **pool_actors(markers)}
    return {
        "input": config.input,
        "output": config.output,
        "mode": config.mode,
        "rows_in": rows_in,
        "rows_out": sum(m["rows"] for m in markers.values()),
        "rows_quarantined": sum(m["quarantined"] for m in markers.values()),
        "quarantined_by_reason": dict(quarantined),
        "flags_by_reason": dict(flags),
        "shards": {"total": len(input_rows), "written_this_run": len(written)},
        "wall_seconds": wall_seconds,
        "rows_per_second_this_run": sum(input_rows[n] for n in written) / wall_seconds,
        "stage_seconds": {
            "caption": sum(m.get("seconds", 0.0) for m in captions.values()),
            "rewrite": sum(m.get("seconds", 0.0) for m in markers.values()),
        },
        "pools": pools,
        "config": to_dict(config),
    }


def run_rewrite(config: RewriteConfig, options: StorageOptions | None = None, log=print) -> dict:
    """Rewrite every input shard not yet done; returns (and writes) the run summary."""
    options = options or StorageOptions()
    config.validate_for_run()
    start, started_at = time.perf_counter(), time.time()
    source = Location(config.input, options)
    shards = list_shards(source)
    if not shards:
        raise FileNotFoundError(f"rewrite: no .parquet shards in {config.input}")
    input_rows = _check_inputs(source, shards, config)
    done = ShardStore(Location(config.output, options)).done()
    todo = [p for p in shards if output_shard_name(p) not in done]
    log(f"rewrite: {len(shards)} shards, {len(shards) - len(todo)} already done, {len(todo)} to do (mode {config.mode})")
    if todo:
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=True)
        ds = ray.data.from_items([{"shard": p} for p in todo], override_num_blocks=len(todo))
        if config.uses_captioner:
            ds = _map_pool(ds, ShardCaptioner, config.captioner, config, options)
        ds = _map_pool(ds, ShardRewriter, config.fuser if config.uses_captioner else config.laclip, config, options)
        for row in ds.iter_rows():
            log(f"rewrite: done {row['shard']}")
    summary = summarize(config, options, input_rows, time.perf_counter() - start, [output_shard_name(p) for p in todo], started_at)
    out = Location(config.output, options)
    out.fs.pipe_file(out.join(SUMMARY_FILE), json.dumps(summary, indent=1).encode())
    return summary


def render_summary(summary: dict) -> str:
    lines = [
        f"rewrite ({summary['mode']}): {summary['rows_in']} rows in -> {summary['rows_out']} out + "
        f"{summary['rows_quarantined']} quarantined; {summary['shards']['written_this_run']} shards written this run "
        f"in {summary['wall_seconds']:.1f}s ({summary['rows_per_second_this_run']:.1f} rows/s)",
    ]
    lines += [f"  quarantined {n:>6}  {reason}" for reason, n in sorted(summary["quarantined_by_reason"].items())]
    lines += [f"  flagged     {n:>6}  {flag}" for flag, n in sorted(summary["flags_by_reason"].items())]
    for name, pool in summary["pools"].items():
        lines.append(
            f"  pool {name:<9} {pool.get('requests', 0):>7} requests  {pool.get('prompt_tokens_per_s', 0):9.1f} prompt tok/s  "
            f"{pool.get('generated_tokens_per_s', 0):8.1f} generated tok/s  {pool.get('engine_seconds', 0):7.1f}s in engine"
        )
        if pool.get("actors"):
            starts = ", ".join(f"{t:.0f}" for t in pool["actor_first_shard_s"])
            lines.append(f"  pool {name:<9} {pool['actors']} actor(s); each started its first shard at {starts} s")
    return "\n".join(lines)
