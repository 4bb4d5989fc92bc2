"""Does the tiny CLIP train? The chance plateau and the recipe that leaves it.

    .venv/bin/python benchmarks/bench_recipe.py [--seeds 0 1 2] [--steps 300] [--recipes old new]

The demo's shape: 1,000 train rows of the sample world at 64 px, 500 eval rows,
300 steps of 64 images. Captions: AltText only, and the VeCLIP mix with the
reference description as VeCap (a perfect captioner; the recipe, not the
captions, is under test). For each recipe, mode and seed: the step at which the
loss leaves the plateau at ln 64 (``veclip.world.report.take_off_step``: the first 10
steps averaging 0.25 under it), the final loss and logit scale, zero-shot brand
and shape and retrieval R@5 on the eval split, and samples/s. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

RECIPES = {  # train overrides over the tiny preset; each a global batch of 64
    # the demo's until 2026-12: 2 workers x 32, 5 warm-up steps, no clipping
    "old": [
        "batch_size=32",
        "scale.num_workers=2",
        "optim.warmup_share=0",
        "optim.warmup_steps=5",
        "optim.grad_clip_norm=0",
    ],
    "new": [  # the demo's since 2026-12 (the tiny preset's warm-up and clipping, one worker)
        "batch_size=64",
        "scale.num_workers=1",
        "scale.cpus_per_worker=1",
        "scale.torch_threads=2",
        "optim.warmup_share=0.1",
        "optim.grad_clip_norm=1.0",
    ],
    "short-warmup": [
        "batch_size=64",
        "scale.num_workers=1",
        "scale.cpus_per_worker=1",
        "scale.torch_threads=2",
        "optim.warmup_share=0.05",
        "optim.grad_clip_norm=1.0",
    ],
}
MODES = {"alttext": ["captions.mode=alttext"], "mix": ["captions.mode=mix"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--set", action="append", default=[], help="a train override on top of every recipe")
    parser.add_argument("--rows", type=int, default=1000, help="train rows of the sample world (bench_mixing: 2000)")
    args = parser.parse_args()

    import ray
    from bench_mixing import enrich

    from veclip.eval.run import EvalConfig, evaluate
    from veclip.train.checkpoint import metric_history
    from veclip.train.config import build_config
    from veclip.train.export import export
    from veclip.train.trainer import run_samples_per_s, run_train
    from veclip.world.generate import SampleConfig, generate
    from veclip.world.report import mean_recall, take_off_step

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="veclip-recipe-"))
    generate(SampleConfig(str(tmp / "sample"), rows=args.rows, eval_rows=500, shards=4, seed=0), log=lambda *_: None)
    enrich(tmp / "sample" / "train", tmp / "enriched")
    rows = []
    for recipe in args.recipes:
        for mode in args.modes:
            for seed in args.seeds:
                name = f"{recipe}-{mode}-{seed}"
                overrides = [f"steps={args.steps}", f"checkpoint_every={args.steps}", f"seed={seed}"]
                overrides += RECIPES[recipe] + MODES[mode] + args.set
                config = build_config(
                    "tiny", None, overrides, input=str(tmp / "enriched"), output=str(tmp / "runs"), name=name
                )
                summary = run_train(config, log=lambda *_: None)
                history = metric_history(str(tmp / "runs" / name))
                model = export(str(tmp / "runs" / name), str(tmp / "models" / name))
                ev = evaluate(
                    EvalConfig(
                        model=str(model), input=str(tmp / "sample" / "eval"), label_column="label_shape,label_brand"
                    )
                )
                row = {
                    "recipe": recipe,
                    "mode": mode,
                    "seed": seed,
                    "take_off": take_off_step(history, 64),
                    "final_loss": sum(m["loss"] for m in history[-10:]) / 10,
                    "logit_scale": history[-1]["logit_scale"],
                    "shape": ev["zero_shot"]["label_shape"]["top1"],
                    "brand": ev["zero_shot"]["label_brand"]["top1"],
                    "R@5": mean_recall(ev["retrieval"], 5),
                    "samples_per_s": run_samples_per_s(summary),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{args.rows:,} train rows at 64 px, {args.steps} steps x 64 images, veclip-tiny; chance loss ln 64 = {math.log(64):.2f}\n"
    )
    print(
        "| recipe | captions | seed | left the plateau at step | final loss (last 10) | logit scale | zero-shot shape | zero-shot brand | R@5 | samples/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        off = "never" if r["take_off"] is None else str(r["take_off"])
        print(
            f"| {r['recipe']} | {r['mode']} | {r['seed']} | {off} | {r['final_loss']:.2f} | {r['logit_scale']:.1f} | "
            f"{100 * r['shape']:.1f}% | {100 * r['brand']:.1f}% | {100 * r['R@5']:.1f}% | {r['samples_per_s']:.0f} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
