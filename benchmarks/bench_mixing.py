"""Does caption enrichment help here? AltText vs VeCap vs the 50/50 mix vs LaCLIP rewrites.

    .venv/bin/python benchmarks/bench_mixing.py [--seeds 0 1 2] [--steps 400] [--captions pipeline|reference]

``--captions pipeline`` (default): the real method. The rewrite stage runs the
models trained here (``veclip models build``: a LLaVA-architecture captioner
and a Llama fuser/rewriter, served by vLLM) over the train split, writes
caption tables, and every mode trains on those joined by key. The captions'
quality against the world's truth is printed first.

``--captions reference``: stand-ins, an upper bound: VeCap is the sample data's
reference description (a *perfect* captioner + fuser) and the LaCLIP rewrites
are made from it by a deterministic paraphraser.

Same data, model, steps and batch for every run; zero-shot (shape, colour+shape,
brand) and retrieval on the eval split. Prints a Markdown table of mean ± std
over seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

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
    "multi-neutral": ["captions.mode=mix", "captions.per_image=2", "captions.budget_neutral=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--captions", choices=("pipeline", "reference"), default="pipeline")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["alttext", "vecap", "mix", "laclip", "multi", "multi-neutral"],
        choices=list(MODES),
    )
    parser.add_argument("--model", default="veclip-tiny", help="veclip-tiny (16 px patches) or veclip-tiny-p8 (8 px)")
    args = parser.parse_args()

    import ray

    from veclip.eval.run import EvalConfig, evaluate
    from veclip.report import mean_recall
    from veclip.train.config import build_config
    from veclip.train.export import export
    from veclip.train.trainer import run_train
    from veclip.world.generate import SampleConfig, generate

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="veclip-mixing-"))
    generate(SampleConfig(str(tmp / "sample"), rows=args.rows, eval_rows=500, shards=4, seed=0), log=lambda *_: None)
    if args.captions == "pipeline":
        from veclip.rewrite.config import build_config as rewrite_config
        from veclip.rewrite.config import ensure_models
        from veclip.rewrite.pipeline import run_rewrite
        from veclip.world.quality import measure, read_rows, render

        rewrite = rewrite_config(
            "trained", input=str(tmp / "sample" / "train"), output=str(tmp / "captions"), mode="both"
        )
        ensure_models(rewrite)
        summary = run_rewrite(rewrite, log=lambda *_: None)
        print(f"rewrite: {summary['rows_out']} rows in {summary['wall_seconds']:.0f}s", flush=True)
        print(render(measure(read_rows(rewrite.output)), f"{args.rows} train rows"), flush=True)
        data = tmp / "captions"
    else:
        enrich(tmp / "sample" / "train", tmp / "enriched")
        data = tmp / "enriched"
    labels_zs = ("label_shape", "label_color_shape", "label_brand")
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for mode in args.modes:
        for seed in args.seeds:
            name = f"{mode}-{seed}"
            # the tiny preset's scale, as the demo: 2 workers x 0.5 CPU, 32 rows each per step (64 a step)
            overrides = [
                f"steps={args.steps}",
                "batch_size=32",
                f"seed={seed}",
                *MODES[mode],
                f"model={args.model}",
                f"checkpoint_every={args.steps}",
                "report_every=50",
                "captions.max_rewrites=4",
            ]
            config = build_config("tiny", None, overrides, input=str(data), output=str(tmp / "runs"), name=name)
            run_train(config, log=lambda *_: None)
            model = export(str(tmp / "runs" / name), str(tmp / "models" / name))
            ev = evaluate(
                EvalConfig(model=str(model), input=str(tmp / "sample" / "eval"), label_column=",".join(labels_zs))
            )
            row = {f"zs_{label}": ev["zero_shot"][label]["top1"] for label in labels_zs}
            row.update({f"R@{k}": mean_recall(ev["retrieval"], k) for k in (1, 5)})
            results[mode].append(row)
            print(json.dumps({"mode": mode, "seed": seed, **row}), flush=True)

    fmt = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"
    what = "the trained models' captions" if args.captions == "pipeline" else "reference captions, stand-ins"
    names = {
        "alttext": "AltText only",
        "vecap": f"VeCap only ({what})",
        "mix": f"VeCLIP mix p=0.5 ({what})",
        "laclip": "LaCLIP uniform (AltText + 4 rewrites)"
        if args.captions == "pipeline"
        else "LaCLIP uniform (AltText + 3 paraphrases of the reference)",
        "multi": f"multi-positive: AltText and VeCap of each image, 64 images x 2 texts a step ({what})",
        "multi-neutral": f"multi-positive, budget-neutral: 32 images x 2 texts a step ({what})",
    }
    print(
        f"\n{args.rows} train rows, {args.model}, {args.steps} steps x 64 (2 workers), seeds {args.seeds}; eval: 500 images\n"
    )
    print(
        "| captions | zero-shot shape top-1 (%) | zero-shot colour+shape top-1 (%) | zero-shot brand top-1 (%) | R@1 (%, mean of both ways) | R@5 (%) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, rows in results.items():
        col = lambda name, rows=rows: fmt([r[name] for r in rows])
        print(
            f"| {names[mode]} | {col('zs_label_shape')} | {col('zs_label_color_shape')} | {col('zs_label_brand')} | {col('R@1')} | {col('R@5')} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
