"""Does caption enrichment help here? AltText vs VeCap vs the VeCLIP mix (and LaCLIP), with intervals.

    .venv/bin/python benchmarks/bench_mixing.py [--seeds 0 1 2 3 4] [--steps 300] [--captions pipeline|reference]
        [--modes alttext vecap mix] [--out results.json]

``--captions pipeline`` (default): the real method. The rewrite stage runs the
models trained here (``veclip models build``: a LLaVA-architecture captioner
and a Llama fuser/rewriter, served by vLLM) over the train split, writes
caption tables, and every mode trains on those joined by key. The captions'
quality against the world's truth is printed first.

``--captions reference``: stand-ins, an upper bound: VeCap is the sample data's
reference description (a *perfect* captioner + fuser) and the LaCLIP rewrites
are made from it by a deterministic paraphraser.

The protocol, fixed before the runs (issue 29):
- every mode trains with every seed on the same data, model, recipe (the demo's:
  one worker × 64, warm-up 10% of the steps, clipping at 1.0) and steps; a run's
  take-off step (``veclip.world.report.take_off_step``) and its loss at fixed steps
  are its learning curve;
- eval on the eval split with no single caption style owning the verdict: brand
  zero-shot with two prompt styles (``generic``: "a photo of a {}.", which reads
  like AltText; ``brands``: descriptive), a knowledge probe whose candidates
  differ only in the brand name (``probe_brand``, the fused captions' style), and
  retrieval R@5 with captions in the captioner's style (``caption``) and in a
  held-out style (``caption_plain``);
- the contrasts: the mix against AltText only and against VeCap only on those five
  metrics, each with a paired t interval over seeds (the same seed in both modes)
  and a paired bootstrap over eval images (hits averaged over seeds), and Holm's
  correction over the ten paired-t p-values.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SWAPS = [
    ("large", "big"),
    ("small", "little"),
    ("on the left", "to the left"),
    ("on the right", "to the right"),
    ("background", "backdrop"),
    ("in the center", "in the middle"),
    ("at the top", "near the top"),
    ("at the bottom", "near the bottom"),
]


def paraphrase(text: str, variant: int) -> str:
    """A deterministic paraphrase of a reference caption: swap words, maybe reorder the groups."""
    rng = random.Random(f"{text}:{variant}")
    out = text
    for a, b in SWAPS:
        if rng.random() < 0.5:
            out = out.replace(a, b)
    body, _, background = out.rstrip(".").partition(", on a ")
    groups = body.split(" and ")
    if len(groups) == 2 and rng.random() < 0.5:
        groups = groups[::-1]
        groups[0] = groups[0][0].upper() + groups[0][1:]
        groups[1] = groups[1][0].lower() + groups[1][1:]
    prefix = rng.choice(["", "A picture of ", "Showing "])
    body = " and ".join(groups)
    if prefix:
        body = prefix + body[0].lower() + body[1:]
    return f"{body}, on a {background}." if background else body + "."


def enrich(source: Path, dest: Path, rewrites: int = 3) -> None:
    dest.mkdir(parents=True)
    for path in sorted(source.glob("*.parquet")):
        table = pq.read_table(path)
        refs = table.column("ref_caption").to_pylist()
        table = table.append_column("vecap", pa.array(refs))
        table = table.append_column(
            "rewrites", pa.array([[paraphrase(r, i) for i in range(rewrites)] for r in refs], pa.list_(pa.string()))
        )
        pq.write_table(table, dest / path.name)


# mode -> its train overrides; the multi rows put several captions of each image in the step (loss.py)
MODES = {
    "alttext": ["captions.mode=alttext"],
    "vecap": ["captions.mode=vecap"],
    "mix": ["captions.mode=mix"],
    "laclip": ["captions.mode=laclip"],
    "multi": ["captions.mode=mix", "captions.per_image=2"],
}
# the demo's recipe over the tiny preset (its warm-up share and clipping): one worker x 64, 2 threads
RECIPE = ["batch_size=64", "scale.num_workers=1", "scale.cpus_per_worker=1", "scale.torch_threads=2"]
GLOBAL_BATCH = 64
CONTRASTS = [("mix", "alttext"), ("mix", "vecap")]  # on every metric but shape, fixed before the runs
CONTRAST_METRICS = ["brand_generic", "brand_descriptive", "brand_probe", "R5_caption", "R5_plain"]
CURVE_STEPS = (30, 60, 150, 300)  # the loss at these steps (mean of the 10 steps up to each)


def loss_at(history: list[dict], step: int) -> float | None:
    window = [m["loss"] for m in history if step - 10 < m["step"] <= step]
    return sum(window) / len(window) if window else None


def train_and_eval(mode: str, seed: int, args, data: Path, tmp: Path) -> tuple[dict, dict]:
    from veclip.eval.run import EvalConfig, evaluate
    from veclip.train.checkpoint import metric_history
    from veclip.train.config import build_config
    from veclip.train.export import export
    from veclip.train.trainer import run_samples_per_s, run_train
    from veclip.world.report import EVAL_SETTINGS, METRICS, per_image, take_off_step

    name, started_at = f"{mode}-{seed}", time.time()
    overrides = [f"steps={args.steps}", f"seed={seed}", f"model={args.model}", f"checkpoint_every={args.steps}"]
    overrides += ["report_every=50", "captions.max_rewrites=4", *RECIPE, *MODES[mode]]
    config = build_config("tiny", None, overrides, input=str(data), output=str(tmp / "runs"), name=name)
    summary = run_train(config, log=lambda *_: None)
    history = metric_history(str(tmp / "runs" / name))
    model = export(str(tmp / "runs" / name), str(tmp / "models" / name))
    ev = evaluate(EvalConfig(model=str(model), input=str(tmp / "sample" / "eval"), **EVAL_SETTINGS), keep_ranks=True)
    hits = {metric: per_image(ev["ranks"], metric) for metric in METRICS}
    row = {
        "mode": mode,
        "seed": seed,
        "take_off": take_off_step(history, GLOBAL_BATCH),
        "loss_at": {str(s): loss_at(history, s) for s in CURVE_STEPS if s <= args.steps},
        "logit_scale": history[-1]["logit_scale"],
        "samples_per_s": run_samples_per_s(summary),
        **{metric: float(h.mean()) for metric, h in hits.items()},
        # provenance: when it ran, and every logged step of its loss (take_off and loss_at recompute from it)
        "started_at": started_at,
        "ended_at": time.time(),
        "loss_history": [{k: m[k] for k in ("step", "loss", "logit_scale") if k in m} for m in history],
    }
    return row, hits


def provenance() -> dict:
    """The code the figures came from: its commit, and whether the tree had changes beside it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--porcelain").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--captions", choices=("pipeline", "reference"), default="pipeline")
    parser.add_argument("--rows", type=int, default=1000, help="train rows (the demo's 1,000)")
    parser.add_argument("--modes", nargs="+", default=["alttext", "vecap", "mix"], choices=list(MODES))
    parser.add_argument("--model", default="veclip-tiny", help="veclip-tiny (16 px patches) or veclip-tiny-p8 (8 px)")
    parser.add_argument("--out", help="write every run's figures here (JSON)")
    parser.add_argument("--tables-from", help="print the tables of a finished (or stopped) run's --out file")
    args = parser.parse_args()
    if args.tables_from:
        saved = json.loads(Path(args.tables_from).read_text())
        hits = {
            (h["mode"], h["seed"]): {k: np.array(v) for k, v in h.items() if k not in ("mode", "seed")}
            for h in saved["hits"]
        }
        done = argparse.Namespace(**saved["args"])
        done.seeds = sorted({s for _, s in hits if all((m, s) in hits for m in done.modes)})  # complete pairs
        print(render_tables([r for r in saved["runs"] if r["seed"] in done.seeds], hits, done))
        return

    import ray

    from veclip.world.generate import SampleConfig, generate

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="veclip-mixing-"))
    generate(SampleConfig(str(tmp / "sample"), rows=args.rows, eval_rows=500, shards=4, seed=0), log=lambda *_: None)
    if args.captions == "pipeline":
        from veclip.rewrite.config import build_config as rewrite_config
        from veclip.rewrite.config import ensure_models
        from veclip.rewrite.stage import run_rewrite
        from veclip.world.quality import measure, read_rows, render

        rewrite = rewrite_config(
            "trained", input=str(tmp / "sample" / "train"), output=str(tmp / "captions"), mode="both"
        )
        ensure_models(rewrite)
        summary = run_rewrite(rewrite, log=lambda *_: None)
        captions = {k: summary[k] for k in ("rows_in", "rows_out", "flags_by_reason", "quarantined_by_reason")}
        print(f"rewrite: {summary['rows_out']} rows in {summary['wall_seconds']:.0f}s", flush=True)
        print(render(measure(read_rows(rewrite.output)), f"{args.rows} train rows"), flush=True)
        data = tmp / "captions"
    else:
        enrich(tmp / "sample" / "train", tmp / "enriched")
        data, captions = tmp / "enriched", {"reference": "the world's own captions (enrich())"}
    rows, hits, started = [], {}, {"started_at": time.time(), **provenance(), "captions": captions}
    for seed in args.seeds:  # seeds outermost: a stopped run still has complete pairs
        for mode in args.modes:
            row, hits[mode, seed] = train_and_eval(mode, seed, args, data, tmp)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every run: a stopped protocol keeps what it measured (--tables-from reads it)
                per_image = [
                    {"mode": m, "seed": s, **{k: v.tolist() for k, v in h.items()}} for (m, s), h in hits.items()
                ]
                run = {**started, "ended_at": time.time()}
                Path(args.out).write_text(json.dumps({"args": vars(args), "run": run, "runs": rows, "hits": per_image}))
    print(render_tables(rows, hits, args))
    ray.shutdown()


def render_tables(rows: list[dict], hits: dict, args) -> str:
    from veclip.world.report import METRICS
    from veclip.world.stats import holm, paired_bootstrap, paired_t

    what = "the trained models' captions" if args.captions == "pipeline" else "reference captions, stand-ins"
    out = [
        f"\n{args.rows} train rows, {args.model}, {args.steps} steps x {GLOBAL_BATCH} (one worker), "
        f"seeds {args.seeds}; VeCap: {what}; eval: 500 images (brand metrics: the branded ones)\n",
        "| captions | left the plateau at step | "
        + " | ".join(f"loss at {s}" for s in CURVE_STEPS if s <= args.steps)
        + " | "
        + " | ".join(METRICS[m][0] for m in METRICS)
        + " |",
        "| --- " * (2 + len([s for s in CURVE_STEPS if s <= args.steps]) + len(METRICS)) + "|",
    ]
    for mode in args.modes:
        runs = [r for r in rows if r["mode"] == mode]
        offs = [r["take_off"] for r in runs]
        curve = [f"{statistics.mean(r['loss_at'][str(s)] for r in runs):.2f}" for s in CURVE_STEPS if s <= args.steps]
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in runs]
            half = statistics.stdev(values) / math.sqrt(len(values)) * _t975(len(values) - 1) if len(values) > 1 else 0
            cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * half:.1f}")
        off = ", ".join("never" if o is None else str(o) for o in offs)
        out.append(f"| {mode} | {off} | " + " | ".join(curve + cells) + " |")
    out += [
        "",
        "Cells: mean over seeds ± the 95% t half-width. Contrasts (percentage points), fixed before the runs; "
        "Holm over the paired-t p-values:",
        "",
        "| contrast | metric | paired t over seeds [95%] | p | Holm | bootstrap over images [95%] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    tests = []
    for a, b in CONTRASTS:
        if a not in args.modes or b not in args.modes:
            continue
        for metric in CONTRAST_METRICS:
            value = lambda mode, metric=metric: [
                r[metric] for s in args.seeds for r in rows if (r["mode"], r["seed"]) == (mode, s)
            ]
            t = paired_t(value(a), value(b))
            pooled = lambda mode, metric=metric: np.mean([hits[mode, s][metric] for s in args.seeds], axis=0)
            tests.append((f"{a} - {b}", metric, t, paired_bootstrap(pooled(a), pooled(b))))
    verdicts = holm([t.p for _, _, t, _ in tests])
    for (name, metric, t, boot), rejected in zip(tests, verdicts):
        verdict = "differs" if rejected else "not shown"
        out.append(f"| {name} | {METRICS[metric][0]} | {t} | {t.p:.3f} | {verdict} | {boot} |")
    return "\n".join(out)


def _t975(df: int) -> float:
    from veclip.world.stats import t_quantile

    return t_quantile(0.975, df)


if __name__ == "__main__":
    main()
