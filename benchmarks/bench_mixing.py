"""Does caption enrichment help here? AltText vs VeCap vs the 50/50 mix vs LaCLIP-style rewrites.

    .venv/bin/python benchmarks/bench_mixing.py [--seeds 0 1 2] [--steps 120]

Stand-ins, labelled so in the output: the VeCap column is the sample data's
reference description (a *perfect* captioner + fuser), and the LaCLIP rewrites
are made from that reference by a deterministic paraphraser (word swaps and
reordering), not by an LLM. Same data, model (veclip-tiny), steps and batch
for every run; zero-shot and retrieval on the eval split. Prints a Markdown
table of mean ± std over seeds.
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

SWAPS = [("large", "big"), ("small", "little"), ("on the left", "to the left"), ("on the right", "to the right"),
         ("background", "backdrop"), ("in the center", "in the middle"), ("at the top", "near the top"), ("at the bottom", "near the bottom")]


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
        table = table.append_column("rewrites", pa.array([[paraphrase(r, i) for i in range(rewrites)] for r in refs], pa.list_(pa.string())))
        pq.write_table(table, dest / path.name)


def knn_probe(model_dir: str, eval_dir: Path, labels: tuple[str, ...], k: int = 10) -> dict[str, float]:
    """Leave-one-out k-NN accuracy per label column on the image embeddings alone: does the image
    tower separate the classes at all? (If it does and zero-shot does not, the text side or the
    prompts are the gap.) The images are embedded once for all labels."""
    import numpy as np

    from veclip.eval.embed import EmbedSpec, embed_local
    from veclip.eval.model import load_model

    model, preprocess, _ = load_model(model_dir, None, None)
    tables = [pq.read_table(p) for p in sorted(eval_dir.glob("*.parquet"))]
    rows = embed_local(tables, model, preprocess, EmbedSpec(model_dir, None, labels)).to_pylist()
    x = np.array([r["embedding"] for r in rows])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1)[:, :k]
    accuracy = {}
    for label in labels:
        names = sorted({r[label] for r in rows})
        y = np.array([names.index(r[label]) for r in rows])
        votes = np.array([np.bincount(y[n], minlength=len(names)).argmax() for n in neighbours])
        accuracy[label] = float((votes == y).mean())
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--modes", nargs="+", default=["alttext", "vecap", "mix", "laclip"])
    parser.add_argument("--model", default="veclip-tiny", help="veclip-tiny (16 px patches) or veclip-tiny-p8 (8 px)")
    args = parser.parse_args()

    import ray

    from veclip.eval.run import EvalConfig, evaluate
    from veclip.sample import SampleConfig, generate
    from veclip.train.config import build_config
    from veclip.train.export import export
    from veclip.train.trainer import run_train

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="veclip-mixing-"))
    generate(SampleConfig(str(tmp / "sample"), rows=args.rows, eval_rows=500, shards=4, image_size=64, seed=0), log=lambda *_: None)
    enrich(tmp / "sample" / "train", tmp / "enriched")
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for mode in args.modes:
        for seed in args.seeds:
            name = f"{mode}-{seed}"
            overrides = [f"steps={args.steps}", "batch_size=64", "scale.num_workers=1", "scale.cpus_per_worker=2", f"seed={seed}",
                         f"captions.mode={mode}", f"model={args.model}", f"checkpoint_every={args.steps}", "report_every=50", "captions.max_rewrites=3"]
            config = build_config("tiny", None, overrides, data=str(tmp / "enriched"), output=str(tmp / "runs"), name=name)
            run_train(config, log=lambda *_: None)
            model = export(str(tmp / "runs" / name), str(tmp / "models" / name))
            row = {}
            label_columns = ("label_shape", "label_color_shape")
            for label in label_columns:
                for templates in ("generic", "scenes"):
                    ev = evaluate(EvalConfig(model=str(model), data=str(tmp / "sample" / "eval"), label_column=label, templates=templates))
                    row[f"zs_{label}_{templates}"] = ev["zero_shot"][label]["top1"]
            row.update({f"knn_{label}": acc for label, acc in knn_probe(str(model), tmp / "sample" / "eval", label_columns).items()})
            r = ev["retrieval"]
            row["R@1"] = (r["image_to_text_R@1"] + r["text_to_image_R@1"]) / 2
            row["R@5"] = (r["image_to_text_R@5"] + r["text_to_image_R@5"]) / 2
            results[mode].append(row)
            print(json.dumps({"mode": mode, "seed": seed, **row}), flush=True)

    fmt = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"
    labels = {"alttext": "AltText only", "vecap": "VeCap only (reference captions)", "mix": "VeCLIP mix p=0.5 (reference captions)",
              "laclip": "LaCLIP uniform (AltText + 3 paraphrases of the reference)"}
    print(f"\n{args.rows} train rows, 64 px, {args.model}, {args.steps} steps x 64, seeds {args.seeds}; eval: 500 images, 6 shapes / 60 colour+shape classes\n")
    print("| captions | zero-shot shape top-1 (%) generic / scenes prompts | zero-shot colour+shape top-1 (%) generic / scenes | "
          "k-NN probe shape / colour+shape (%) | retrieval R@1 (%, mean of both ways) | R@5 (%) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, rows in results.items():
        col = lambda name: fmt([r[name] for r in rows])
        print(f"| {labels[mode]} | {col('zs_label_shape_generic')} / {col('zs_label_shape_scenes')} | "
              f"{col('zs_label_color_shape_generic')} / {col('zs_label_color_shape_scenes')} | "
              f"{col('knn_label_shape')} / {col('knn_label_color_shape')} | {col('R@1')} | {col('R@5')} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
