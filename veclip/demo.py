"""``veclip demo``: the main job, end to end, on built-in sample data.

Sample data -> validate -> the captioner and LLM trained here on the sample
world (``veclip models build``; built once, then cached) -> rewrite (VeCap and
LaCLIP through real vLLM, written as caption tables beside the images) ->
validate the tables against their inputs -> caption quality against the world's
truth -> per caption mode (AltText only, then the VeCLIP mix) train a tiny CLIP
on 2 Ray Train workers (images joined with their captions by key), export it
for stock open_clip and evaluate it (zero-shot on shapes and brands, retrieval)
-> the caption gate (``veclip score`` with the last CLIP: each caption's
image-text score, the lowest tenth per column flagged) -> ``gallery.html``
(``veclip show``: captions, scores and flags beside their images) ->
``report.md`` / ``report.html`` with the modes side by side and plots. Rerunning is cheap: every stage skips what is
done (training resumes from its last checkpoint, which is the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from veclip.eval.run import EvalConfig, evaluate
from veclip.report import MODE_NAMES, comparison, write_report
from veclip.rewrite.config import build_config as build_rewrite_config
from veclip.rewrite.pipeline import render_summary as render_rewrite_summary
from veclip.rewrite.pipeline import run_rewrite
from veclip.score.config import build_config as build_score_config
from veclip.score.pipeline import render_summary as render_score_summary
from veclip.score.pipeline import run_score
from veclip.show import ShowConfig, show
from veclip.storage import Location, StorageOptions
from veclip.train.checkpoint import metric_history
from veclip.train.config import build_config as build_train_config
from veclip.train.export import export
from veclip.train.trainer import render_summary as render_train_summary
from veclip.train.trainer import run_train
from veclip.validate import ValidateConfig, validate
from veclip.world.build import ModelsConfig
from veclip.world.build import ensure_built as ensure_models
from veclip.world.build import render as render_models
from veclip.world.generate import SampleConfig, generate
from veclip.world.presets import TRAINED_PRESETS
from veclip.world.quality import measure, read_rows
from veclip.world.quality import render as render_quality


@dataclass(frozen=True)
class DemoConfig:
    output: str = "runs/demo"  # a local folder: data, outputs, the models and the report
    rows: int = 1000  # train rows of sample data
    eval_rows: int = 500  # eval rows of sample data
    shards: int = 4  # shards per split
    seed: int = 0  # the sample data's seed
    steps: int = 300  # CLIP training steps per caption mode
    modes: tuple[str, ...] = ("alttext", "mix")  # caption modes trained side by side: the baseline first
    models: str = "full"  # the captioner and LLM: trained here at this scale (full: built once, ~10 min; quick: tests)


def run_demo(config: DemoConfig, options: StorageOptions | None = None) -> int:
    """Returns a process exit code: 0 when every step succeeded."""
    options = options or StorageOptions()
    root = Location(config.output, options)
    if not root.is_local:
        raise ValueError("demo: --out must be a local folder (the report and the exported models are local files)")
    data = root.child("data")
    timings: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        timings[name] = time.perf_counter() - last
        last = time.perf_counter()

    generate(
        SampleConfig(data.url, config.rows, config.eval_rows, config.shards, config.seed), options, log=lambda *_: None
    )
    for split in ("train", "eval"):
        report = validate(ValidateConfig(data.child(split).url, images="full"), options)
        print(report.render())
        if not report.usable:
            print("demo: FAILED: the sample data did not validate")
            return 1
    lap("sample data + validate")

    models = ensure_models(ModelsConfig(scale=config.models))
    print(render_models(models))
    lap("models (built once, then cached)")

    # caption tables beside the sample images (the layout for scale): training joins them back by key
    preset = next(name for name, scale in TRAINED_PRESETS.items() if scale == config.models)
    rewrite = build_rewrite_config(
        preset, input=data.child("train").url, output=root.child("captions").url, mode="both", layout="captions"
    )
    rewrite_summary = run_rewrite(rewrite, options)
    print(render_rewrite_summary(rewrite_summary))
    if rewrite_summary["failed"]:
        print("demo: FAILED: some rewrite shards kept failing (above); rerun `veclip demo` to retry them")
        return 1
    lap("rewrite (vLLM: captioner, fuser, LaCLIP)")
    report = validate(ValidateConfig(rewrite.output, images="none"), options)  # each caption table against its input
    print(report.render())
    if not report.usable:
        print("demo: FAILED: the caption tables do not line up with their inputs")
        return 1
    quality = measure(read_rows(rewrite.output, options))
    print(render_quality(quality, "the demo's train split"))

    per_worker = max(2, min(32, config.rows // 5))  # 2 workers; small demo data still makes full batches
    runs = {}
    for mode in config.modes:
        name = f"demo-{mode}"
        overrides = [
            f"batch_size={per_worker}",
            f"steps={config.steps}",
            f"captions.mode={mode}",
            f"checkpoint_every={config.steps}",
        ]
        train = build_train_config(
            "tiny", None, overrides, input=rewrite.output, output=root.child("train").url, name=name
        )
        summary = run_train(train, options)
        print(render_train_summary(summary))
        model = export(root.child("train", name).url, root.join("models", mode), options)
        evaluation = evaluate(
            EvalConfig(
                model=str(model),
                input=data.child("eval").url,
                output=root.child("eval", mode).url,
                label_column="label_shape,label_brand",
            ),
            options,
        )  # what the images show; what only AltText names
        runs[mode] = {
            "train": summary,
            "eval": evaluation,
            "history": metric_history(root.child("train", name).url, options),
        }
        lap(f"train + eval: {MODE_NAMES.get(mode, mode)} (Ray Train, 2 CPU workers)")
    # the caption gate: every caption scored against its image by the last CLIP trained here
    gate = run_score(
        build_score_config(
            "cpu",
            None,
            ["percentile=10"],
            input=rewrite.output,
            output=root.child("scores").url,
            model=root.join("models", config.modes[-1]),
        ),
        options,
    )
    print(render_score_summary(gate))
    lap("caption gate (veclip score)")
    # the captions beside their images, with their scores and flags
    print(
        show(
            ShowConfig(rewrite.output, rows=24, html=root.join("gallery.html"), add_captions=(gate["output"],)), options
        )
    )
    timings["total"] = time.perf_counter() - start

    report = write_report(Path(root.path), rewrite_summary, quality, models, runs, timings, gate)
    print(comparison(runs))
    print(f"demo: done in {timings['total']:.0f}s; report: {report} (and report.html)")
    return 0
