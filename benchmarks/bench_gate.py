"""Does the caption gate (veclip score) catch captions of the wrong image, and what does it do to training?

    .venv/bin/python benchmarks/bench_gate.py [--rows 2000] [--corrupt 0.2] [--seeds 0 1 2] [--no-training]

No stand-ins for the captions: two draws of the sample world (seed 0: the data
to gate, with its eval split; seed 1: the scorer's own data) are rewritten by
the models trained here (``--preset trained``, VeCap: the LLaVA-architecture
captioner and the Llama fuser through vLLM), written as caption tables.

1. The scorer: a tiny CLIP trained (VeCap only) on the seed-1 world, exported;
   it never sees the rows it scores.
2. Corruption: a share of the seed-0 rows get the VeCap of another corrupted
   row (a derangement: every one is wrong), keys kept, so only the images can
   tell.
3. ``veclip score`` (the real stage: Ray Data pool, caption tables) scores the
   corrupted output with the scorer, gated at the per-shard percentile equal
   to the corruption share; precision and recall of its ``vecap`` flags against
   the rows corrupted, and of other rules recomputed from the stored cosines
   with the same gate function; ROC AUC.
4. Unless ``--no-training``: VeCap-only training on the corrupted captions,
   without and with the gate (``--add-captions`` the score output: flagged
   VeCaps are unusable, so their rows drop out), and on the clean captions;
   zero-shot and retrieval on the eval split, per seed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def corrupt(source: Path, dest: Path, share: float, seed: int = 0) -> set[str]:
    """A copy of a caption output where ``share`` of the rows with a VeCap carry another such row's VeCap."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)  # markers and manifest too: still a caption output of the same images
    tables = {p: pq.read_table(p) for p in sorted(dest.glob("*.parquet"))}
    rows = [(p, i) for p, t in tables.items() for i, v in enumerate(t.column("vecap").to_pylist()) if v]
    rng = random.Random(seed)
    chosen = rng.sample(rows, int(share * len(rows)))
    vecaps = {p: t.column("vecap").to_pylist() for p, t in tables.items()}
    texts = [vecaps[p][i] for p, i in chosen]
    shift = [texts[(n + 1) % len(texts)] for n in range(len(texts))]  # each gets the next one's: none keeps its own
    keys = set()
    for (p, i), text in zip(chosen, shift):
        vecaps[p][i] = text
        keys.add(tables[p].column("key")[i].as_py())
    for p, t in tables.items():
        pq.write_table(t.set_column(t.column_names.index("vecap"), "vecap", pa.array(vecaps[p], pa.string())), p)
    return keys


def roc_auc(bad: np.ndarray, good: np.ndarray) -> float:
    """P(a corrupted caption scores lower than a clean one): the gate's ranking quality, free of any threshold."""
    ranks = np.concatenate([bad, good]).argsort().argsort() + 1.0
    return float((ranks[len(bad) :].sum() - len(good) * (len(good) + 1) / 2) / (len(bad) * len(good)))


def rewrite(world: Path, out: Path, log) -> None:
    from veclip.rewrite.config import build_config, ensure_models
    from veclip.rewrite.stage import run_rewrite

    config = build_config("trained", input=str(world / "train"), output=str(out), mode="vecap")
    ensure_models(config)
    summary = run_rewrite(config, log=lambda *_: None)
    log(f"rewrite {world.name}: {summary['rows_out']} rows in {summary['wall_seconds']:.0f}s")


def train(data: str, output: Path, name: str, steps: int, seed: int, add: tuple[str, ...] = ()) -> Path:
    from veclip.train.config import build_config
    from veclip.train.export import export
    from veclip.train.trainer import run_train

    overrides = [
        f"steps={steps}",
        "batch_size=32",
        f"seed={seed}",
        "captions.mode=vecap",
        f"checkpoint_every={steps}",
        "report_every=50",
    ]
    summary = run_train(
        build_config("tiny", None, overrides, input=data, output=str(output), name=name, add_captions=add),
        log=lambda *_: None,
    )
    print(json.dumps({"run": name, "rows_skipped": summary.get("rows_skipped_by_reason")}), flush=True)
    return export(str(output / name), str(output.parent / "models" / name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--corrupt", type=float, default=0.2, help="share of the rows whose VeCap is another image's")
    parser.add_argument("--scorer-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the with/without-gate runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-training", action="store_true", help="only the gate's precision and recall")
    parser.add_argument("--work", help="a folder to keep the data, captions and runs in (a rerun skips what is done)")
    args = parser.parse_args()

    import ray

    from veclip.eval.run import EvalConfig, evaluate
    from veclip.score import steps
    from veclip.score.config import build_config
    from veclip.score.stage import render_summary, run_score
    from veclip.world.generate import SampleConfig, generate
    from veclip.world.report import mean_recall

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(args.work or tempfile.mkdtemp(prefix="veclip-gate-"))
    log = lambda text: print(text, flush=True)
    for seed in (0, 1):
        generate(
            SampleConfig(
                str(tmp / f"world-{seed}"), rows=args.rows, eval_rows=500 if seed == 0 else 1, shards=4, seed=seed
            ),
            log=lambda *_: None,
        )
        rewrite(tmp / f"world-{seed}", tmp / f"captions-{seed}", log)
    scorer = train(str(tmp / "captions-1"), tmp / "runs", "scorer", args.scorer_steps, seed=1)
    bad_keys = corrupt(tmp / "captions-0", tmp / "corrupted", args.corrupt)

    percentile = 100 * args.corrupt
    config = build_config(
        "cpu",
        None,
        [f"percentile={percentile:g}", 'caption_columns=["vecap","alt_text"]'],
        input=str(tmp / "corrupted"),
        output=str(tmp / "scores"),
        model=str(scorer),
    )
    summary = run_score(config, log=lambda *_: None)
    log(render_summary(summary))

    scores = pa.concat_tables([pq.read_table(p) for p in sorted((tmp / "scores").glob("*.parquet"))])
    keys = scores.column("key").to_pylist()
    vecap = np.array(
        [s["vecap"] if s["vecap"] is not None else np.nan for s in scores.column("clip_scores").to_pylist()], np.float32
    )
    flagged = np.array(["vecap:low_clip_score" in f for f in scores.column("rewrite_flags").to_pylist()])
    bad = np.array([k in bad_keys for k in keys])
    scored = ~np.isnan(vecap)

    def pr(flags: np.ndarray) -> tuple[float, float]:
        hit = (flags & bad & scored).sum()
        return hit / max(flags[scored].sum(), 1), hit / max((bad & scored).sum(), 1)

    print(
        f"\n{scored.sum()} VeCaps scored, {(bad & scored).sum()} of them another image's ({args.corrupt:.0%}); scorer: veclip-tiny, "
        f"VeCap only, {args.scorer_steps} steps on the seed-1 world's captions; ROC AUC {roc_auc(vecap[bad & scored], vecap[~bad & scored]):.3f}\n"
    )
    print("| gate | flagged | precision | recall |\n| --- | --- | --- | --- |")
    precision, recall = pr(flagged)
    print(f"| the run's: {summary['gate']} | {flagged[scored].sum()} | {precision:.2f} | {recall:.2f} |")
    captions = [steps.Caption(i, "vecap", "") for i in range(len(keys))]
    rules = [(None, p) for p in (5, 10, 30)] + [(float(np.percentile(vecap[scored], q)), None) for q in (10, 20)]
    for threshold, pct in rules:
        rule = steps.gate(captions, vecap, threshold, pct)
        precision, recall = pr(rule)
        name = f"percentile {pct} per shard" if pct else f"cosine < {threshold:.3f}"
        print(f"| {name} | {rule[scored].sum()} | {precision:.2f} | {recall:.2f} |")
    if args.no_training:
        ray.shutdown()
        return

    labels = ("label_shape", "label_color_shape", "label_brand")
    runs = {
        "corrupted, no gate": (str(tmp / "corrupted"), ()),
        "corrupted, gated": (str(tmp / "corrupted"), (str(tmp / "scores"),)),
        "clean": (str(tmp / "captions-0"), ()),
    }
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in args.seeds:
        for name, (data, add) in runs.items():
            model = train(
                data, tmp / "runs", f"{name.replace(', ', '-').replace(' ', '-')}-{seed}", args.steps, seed, add
            )
            ev = evaluate(
                EvalConfig(model=str(model), input=str(tmp / "world-0" / "eval"), label_column=",".join(labels))
            )
            row = {f"zs_{label}": ev["zero_shot"][label]["top1"] for label in labels} | {
                f"R@{k}": mean_recall(ev["retrieval"], k) for k in (1, 5)
            }
            results[name].append(row)
            log(json.dumps({"run": name, "seed": seed, **row}))
    fmt = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"
    print(
        f"\nVeCap-only training, veclip-tiny, {args.steps} steps x 64, seeds {args.seeds}; eval: 500 images of the seed-0 world\n"
    )
    print(
        "| VeCap captions | zero-shot shape (%) | colour+shape (%) | brand (%) | R@1 (%) | R@5 (%) |\n| --- | --- | --- | --- | --- | --- |"
    )
    for name, rows in results.items():
        col = lambda key, rows=rows: fmt([r[key] for r in rows])
        print(
            f"| {name} | {col('zs_label_shape')} | {col('zs_label_color_shape')} | {col('zs_label_brand')} | {col('R@1')} | {col('R@5')} |"
        )
    for name, rows in results.items():
        print(f"per seed R@5 {name}: " + " / ".join(f"{100 * r['R@5']:.1f}" for r in rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
