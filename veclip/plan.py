"""``veclip plan``: what a rewrite of the whole input will ask, before launch.

It samples rows of the user's real input, runs the rewrite on them with the chosen preset (its real
tokenizers, chat templates, prompts and engines: the counts are the pipeline's own, from each pool's
markers), and projects per pool onto every row of the input (counted from the shards' footers):
requests, prompt and generated tokens, GPU-hours and dollars per GPU type.

The rates are a calibration run's (``--calibration``: a rewrite output from the GPUs you consider;
requests per second of engine time, per GPU) when given, else the documented estimates of
docs/scaling.md, labelled so. Prices are assumed round numbers unless ``--price GPU=DOLLARS``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from veclip.command import Command, Flag, Said, leaf_fields
from veclip.rewrite.config import RewriteConfig, build_from, preset
from veclip.shards.layout import layout_of
from veclip.shards.simulate import Fleet, SimConfig
from veclip.storage import Location, StorageOptions, list_shards, streaming_parquet

# [estimate] docs/scaling.md "Throughput per stage": requests/s per H100 (low, high); L40S at 0.3-0.4x
ESTIMATED_RATES = {"captioner": (15.0, 40.0), "fuser": (100.0, 150.0), "laclip": (100.0, 150.0)}
GPU_SPEED = {"H100": (1.0, 1.0), "L40S": (0.3, 0.4)}  # [estimate] relative to an H100
PRICES = {"H100": 4.0, "L40S": 1.9}  # [assumed] dollars per GPU-hour (docs/scaling.md)
TEMPORARY = "temporary"  # the plan config's output when the measuring run goes to a temporary folder


@dataclass
class PoolPlan:
    role: str
    per_row: dict[str, float]  # requests, prompt_tokens, generated_tokens per input row (measured)
    totals: dict[str, float]  # the same over the whole input
    rates: dict[str, tuple[float, float]]  # GPU -> requests/s per GPU (low, high)
    source: str  # where the rates come from

    def gpu_hours(self, gpu: str) -> tuple[float, float]:
        low, high = self.rates[gpu]
        return self.totals["requests"] / high / 3600, self.totals["requests"] / low / 3600


def sample_rows(config: RewriteConfig, options: StorageOptions, rows: int, folder: Path) -> tuple[int, int]:
    """Up to ``rows`` rows spread over the input's shards (the first rows of up to ``rows`` shards), written as
    one shard in ``folder``; (rows taken, shards read)."""
    source = Location(config.input, options)
    shards = list_shards(source)
    if not shards:
        raise FileNotFoundError(f"plan: no Parquet shards in {config.input}")
    take = shards[: min(len(shards), rows)]
    each = math.ceil(rows / len(take))
    tables = []
    for path in take:
        with source.fs.open(path, "rb") as f:
            batch = next(streaming_parquet(f).iter_batches(batch_size=each), None)  # the first pages, not a group
        if batch is not None:
            tables.append(pa.Table.from_batches([batch]))
    table = pa.concat_tables(tables, promote_options="permissive").slice(0, rows)
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return table.num_rows, len(take)


def calibrated_rates(url: str, options: StorageOptions) -> tuple[dict[str, dict[str, tuple[float, float]]], str]:
    """Per pool, requests/s per GPU from a rewrite output's summary: requests over engine-busy seconds, per
    engine, divided by the GPUs an engine holds. Keyed by the pool's accelerator type (or "GPU")."""
    from veclip.rewrite.stage import RewriteSummary

    location = Location(url, options)
    summary = RewriteSummary.from_json(json.loads(location.fs.cat_file(location.join(layout_of(location).summary))))
    rates = {}
    for role, pool in summary.pools.items():
        if not pool.get("engine_busy_seconds") or not pool.get("requests"):
            continue
        stage = summary.config[role]  # as the run recorded its config
        gpus = max(stage["pool"]["num_gpus"], 1e-9) * stage["engine"]["tensor_parallel_size"]
        rate = pool["requests"] / pool["engine_busy_seconds"] / gpus  # busy seconds: summed over the engines
        gpu = stage["pool"].get("accelerator_type") or "GPU"
        rates[role] = {gpu: (rate, rate)}
    return rates, f"[calibrated] {url} ({summary.rows_in} rows)"


def plan_rewrite(
    config: RewriteConfig,
    options: StorageOptions | None = None,
    rows: int = 64,
    calibration: str | None = None,
    prices: dict[str, float] | None = None,
    log=print,
) -> dict:
    """The plan (see the module doc): the measuring run on ``rows`` sampled rows, projected. The measuring
    run is kept in ``config.output`` (``sample/`` and ``rewrite/``) unless that is :data:`TEMPORARY`."""
    from veclip.rewrite.stage import RewriteSummary, dry_run_rewrite, run_rewrite

    options = options or StorageOptions()
    prices = {**PRICES, **(prices or {})}
    with tempfile.TemporaryDirectory(prefix="veclip-plan-") as tmp:
        work = Path(tmp if config.output in ("", TEMPORARY) else config.output)
        whole = dry_run_rewrite(dataclasses.replace(config, output=str(work / "rewrite")), options)
        taken, shards_read = sample_rows(config, options, rows, work / "sample")
        log(f"plan: measuring on {taken} rows sampled from {shards_read} shard(s) of {config.input}")
        measured = RewriteSummary.from_json(
            run_rewrite(dataclasses.replace(config, input=str(work / "sample"), output=str(work / "rewrite")), log=log)
        )
    if calibration:
        rates, source = calibrated_rates(calibration, options)
    else:
        rates, source = {}, "[estimate] docs/scaling.md (H100; L40S at 0.3-0.4x)"
    pools = []
    for role, pool in measured.pools.items():
        per_row = {k: pool[k] / max(measured.rows_in, 1) for k in ("requests", "prompt_tokens", "generated_tokens")}
        totals = {k: v * whole["rows_total"] for k, v in per_row.items()}
        if role in rates:
            pool_rates, pool_source = rates[role], source
        else:
            low, high = ESTIMATED_RATES[role]
            pool_rates = {gpu: (low * s_low, high * s_high) for gpu, (s_low, s_high) in GPU_SPEED.items()}
            pool_source = "[estimate] docs/scaling.md (H100; L40S at 0.3-0.4x)"
        pools.append(PoolPlan(role, per_row, totals, pool_rates, pool_source))
    return {
        "input": config.input,
        "mode": config.mode,
        "rows_total": whole["rows_total"],
        "shards_total": whole["shards_total"],
        "sampled_rows": measured.rows_in,
        "prices": prices,
        "pools": [dataclasses.asdict(p) | {"gpu_hours": {g: p.gpu_hours(g) for g in p.rates}} for p in pools],
    }


def _number(x: float) -> str:
    """Three significant figures, thousands separated: a plan for 3k rows and one for 300M both read."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _span(low: float, high: float, money: bool = False) -> str:
    fmt = (lambda x: "$" + _number(x)) if money else _number
    return fmt(low) if math.isclose(low, high) else f"{fmt(low)}–{fmt(high)}"


def render_plan(plan: dict) -> str:
    lines = [
        f"plan: rewrite (mode {plan['mode']}) of {plan['rows_total']:,} rows in {plan['shards_total']:,} shards "
        f"(counted from the footers); per row as measured on {plan['sampled_rows']} sampled rows",
        f"  {'pool':<10} {'requests/row':>12} {'prompt tok/row':>15} {'gen tok/row':>12} {'requests':>14} "
        f"{'prompt tokens':>16} {'gen tokens':>15}",
    ]
    for p in plan["pools"]:
        r, t = p["per_row"], p["totals"]
        lines.append(
            f"  {p['role']:<10} {r['requests']:>12.2f} {r['prompt_tokens']:>15.1f} {r['generated_tokens']:>12.1f} "
            f"{t['requests']:>14,.0f} {t['prompt_tokens']:>16,.0f} {t['generated_tokens']:>15,.0f}"
        )
    totals: dict[str, list[float]] = {}
    for p in plan["pools"]:
        for gpu, (low, high) in p["gpu_hours"].items():
            price = plan["prices"].get(gpu)
            cost = f", {_span(low * price, high * price, money=True)} at ${price}/GPU-h" if price else ""
            rate_low, rate_high = p["rates"][gpu]
            lines.append(
                f"  {p['role']:<10} {gpu:<5} {_span(rate_low, rate_high)} requests/s per GPU -> "
                f"{_span(low, high)} GPU-hours{cost}  {p['source']}"
            )
            sums = totals.setdefault(gpu, [0.0, 0.0])
            sums[0], sums[1] = sums[0] + low, sums[1] + high
    for gpu, (low, high) in totals.items():
        price = plan["prices"].get(gpu)
        cost = f", {_span(low * price, high * price, money=True)}" if price else ""
        lines.append(f"  total on {gpu}: {_span(low, high)} GPU-hours{cost}")
    lines.append("  prices: [assumed] unless given with --price GPU=DOLLARS; calibrate rates with --calibration URL")
    return "\n".join(lines)


def simulated_runs(
    plan: dict, config: RewriteConfig, gpu: str, start_minutes: float, fleet: dict
) -> list[tuple[str, SimConfig]]:
    """The run the plan projects, as simulations (:mod:`veclip.shards.simulate`): the rewrite's pools at their
    ``max_actors``, the input's shards at its mean rows, a shard's minutes on one actor from those rows times
    each role's requests per row over its rate on ``gpu`` (per GPU, times the actor's GPUs); once at the rates'
    fast end and once at their slow end when they differ. ``(label, config)`` pairs."""
    from veclip.shards.simulate import SimPool

    known = [p for p in plan["pools"] if gpu in p["rates"]]
    if len(known) < len(plan["pools"]):
        have = sorted({g for p in plan["pools"] for g in p["rates"]})
        raise ValueError(f"plan --simulate: no rate on {gpu} for every pool (rates known for {', '.join(have)})")
    if gpu not in plan["prices"]:
        raise ValueError(f"plan --simulate: no price for {gpu}: give one with --price {gpu}=DOLLARS")
    rows_per_shard = math.ceil(plan["rows_total"] / max(plan["shards_total"], 1))
    ends = [("fast", 1), ("slow", 0)] if any(p["rates"][gpu][0] != p["rates"][gpu][1] for p in known) else [("", 1)]
    runs = []
    for end, index in ends:
        minutes: dict[str, float] = {}  # per pool: a shard's engine minutes on one GPU
        for p in known:
            pool = "fuser" if p["role"] == "laclip" and config.uses_captioner else p["role"]  # "both": one LLM pool
            rate = p["rates"][gpu][index]
            minutes[pool] = minutes.get(pool, 0.0) + p["per_row"]["requests"] * rows_per_shard / rate / 60
        pools = []
        for name, engine_minutes in minutes.items():
            stage = getattr(config, name)
            gpus = max(stage.pool.num_gpus, 1.0) * stage.engine.tensor_parallel_size
            pools.append(SimPool(name, stage.pool.max_actors, engine_minutes / gpus, start_minutes, gpus=gpus))
        sim = SimConfig(
            shards=plan["shards_total"],
            rows_per_shard=rows_per_shard,
            pools=tuple(pools),
            gpu_hour_usd=plan["prices"][gpu],
            **fleet.sim_fields(),
        )
        rates = "; ".join(f"{p['role']} {p['rates'][gpu][index]:.3g} requests/s per {gpu} {p['source']}" for p in known)
        label = f"{end + ' end of the ' if end else ''}rates: {rates}"
        runs.append((label, sim))
    return runs


@dataclass(frozen=True)
class PlanRun:
    """``veclip plan``'s run options."""

    rows: int = 64
    """rows sampled from the input and rewritten to measure"""
    calibration: str | None = None
    """a rewrite output on the GPUs you consider: its rates"""
    price: tuple[str, ...] = ()
    """dollars per GPU-hour, one GPU each (default H100=4.0, L40S=1.9)"""
    simulate: bool = False
    """then simulate the whole run on spot nodes (the pools at max_actors, shards timed from the plan's rates):
    finish time, goodput, cost, shards redone"""
    gpu: str = "H100"
    """--simulate: the GPU whose rates and price it uses"""
    engine_start_minutes: float = 5.0
    """--simulate: an engine's load time"""
    fleet: Fleet = field(default_factory=Fleet)
    """--simulate: the fleet's faults"""


def plan_config(preset_name: str, config_file: str | None, fields: dict, overrides) -> RewriteConfig:
    """The rewrite's config as ``veclip rewrite`` builds it; its output is where the measuring run goes (a
    temporary folder unless ``--scratch``)."""
    config = build_from(preset_name, config_file, fields, overrides)
    return config if config.output else dataclasses.replace(config, output=TEMPORARY)


def run_plan(config: RewriteConfig, options: StorageOptions, run: PlanRun) -> Said:
    from veclip.shards.simulate import render_runs, simulate_seeds

    prices = {gpu: float(dollars) for gpu, _, dollars in (p.partition("=") for p in run.price)}
    plan = plan_rewrite(config, options, run.rows, run.calibration, prices)
    lines, finished = [render_plan(plan)], True
    for label, sim in (
        simulated_runs(plan, config, run.gpu, run.engine_start_minutes, run.fleet) if run.simulate else ()
    ):
        print("\n".join(lines), flush=True)  # the plan first: a simulation takes a while
        runs = simulate_seeds(sim, run.fleet.seeds)
        lines = [f"plan --simulate: {label}", render_runs(sim, runs)]
        finished &= all(r.finished for r in runs)
    return Said("\n".join(lines), 0 if finished else 2)


COMMAND = Command(
    "plan",
    "before a rewrite: measure sampled rows with the preset's own models, project requests, tokens, GPU-hours and cost",
    RewriteConfig,
    run_plan,
    flags=(
        Flag("input", required=True, metavar="URL"),
        "mode",
        "columns",
        Flag("output", "--scratch", metavar="DIR", help="keep the measuring run here (default: a temporary folder)"),
    ),
    options=PlanRun,
    run_flags=(
        "rows",
        Flag("calibration", metavar="URL"),
        Flag("price", metavar="GPU=DOLLARS"),
        "simulate",
        "gpu",
        "engine_start_minutes",
        *leaf_fields(Fleet, "fleet."),
    ),
    presets=preset,
    preset_help="the rewrite's",
    builder=plan_config,
)
