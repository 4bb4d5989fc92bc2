"""``veclip demo``: the demo pipeline (``pipelines/demo.yaml``) on built-in sample data, then its report.

The pipeline: sample data -> validate -> the captioner and LLM trained here on
the sample world (``veclip models build``; built once, then cached) -> rewrite
(VeCap and LaCLIP through real vLLM, written as caption tables beside the
images) -> validate the tables against their inputs -> per caption mode
(AltText only, then the VeCLIP mix) train a tiny CLIP on a Ray Train worker,
export it for stock open_clip and evaluate it (zero-shot on shapes and on brands
with two prompt styles, a brand probe, retrieval with captions in two styles)
-> the caption gate (``veclip score`` with the mix CLIP, the lowest tenth per
column flagged) -> ``gallery.html`` (``veclip show``). Then, from
what the steps wrote: caption quality against the world's truth and
``report.md`` / ``report.html`` with the modes side by side and plots.
Rerunning is cheap: the pipeline resumes at its first unfinished step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from veclip.command import Command, Flag, Said
from veclip.pipeline import PipelineConfig, run_pipeline, step_seconds
from veclip.shards.layout import CURRENT
from veclip.storage import Location, StorageOptions, read_json
from veclip.world.build import ModelsConfig
from veclip.world.build import ensure_built as ensure_models
from veclip.world.presets import TRAINED_PRESETS
from veclip.world.quality import measure, read_rows
from veclip.world.quality import render as render_quality
from veclip.world.report import comparison, write_report

MODES = ("alttext", "mix")  # the demo pipeline's CLIPs, the baseline first


@dataclass(frozen=True)
class DemoConfig:
    output: str = "runs/demo"
    """a local folder: data, outputs, the models and the report"""
    rows: int = 1000
    """train rows of sample data"""
    eval_rows: int = 500
    """eval rows of sample data"""
    shards: int = 4
    """shards per split"""
    seed: int = 0
    """the sample data's seed"""
    steps: int = 300
    """CLIP training steps per caption mode"""
    models: Literal["full", "quick"] = "full"
    """the captioner and LLM: trained here at this scale (full: built once, ~10 min; quick: tests)"""


def pipeline_config(config: DemoConfig, root: Location) -> PipelineConfig:
    preset = next(name for name, scale in TRAINED_PRESETS.items() if scale == config.models)
    # one worker of 64 (the recipe bench_mixing measured); small demo data (tests) still makes full batches
    per_worker = max(2, min(64, config.rows // 5))
    values = {
        "rows": config.rows,
        "eval_rows": config.eval_rows,
        "shards": config.shards,
        "seed": config.seed,
        "models": config.models,
        "rewrite_preset": preset,
        "steps": config.steps,
        "batch": per_worker,
    }
    return PipelineConfig("demo", root.child("data").url, root.url, tuple(f"{k}={v}" for k, v in values.items()))


def _ranks(root: Location, mode: str) -> dict:
    """The eval's per-image ranks (none from an eval made before they were written: its metrics are left out)."""
    from veclip.eval.run import RANKS_FILE

    path = root.join("eval", mode, RANKS_FILE)
    return read_json(root.fs, path) if root.fs.exists(path) else {}


def run_demo(config: DemoConfig, options: StorageOptions | None = None) -> int:
    """Returns a process exit code: 0 when every step succeeded."""
    from veclip.train.checkpoint import RUN_SUMMARY_FILE, metric_history

    options = options or StorageOptions()
    root = Location(config.output, options)
    if not root.is_local:
        raise ValueError("demo: --output must be a local folder (the report and the exported models are local files)")
    start = time.perf_counter()
    code = run_pipeline(pipeline_config(config, root), options)
    if code != 0:
        print("demo: FAILED at the step above; rerun `veclip demo` to resume from it")
        return code
    captions = root.child("captions")
    quality = measure(read_rows(captions.url, options))
    print(render_quality(quality, "the demo's train split"))
    runs = {
        mode: {
            "train": read_json(root.fs, root.join("train", f"demo-{mode}", RUN_SUMMARY_FILE)),
            "eval": read_json(root.fs, root.join("eval", mode, "eval.json")),
            "ranks": _ranks(root, mode),
            "history": metric_history(root.child("train", f"demo-{mode}").url, options),
        }
        for mode in MODES
    }
    timings = {**step_seconds(root.url, options), "total (this run)": time.perf_counter() - start}
    models = ensure_models(ModelsConfig(scale=config.models), log=lambda *_: None)  # built by its step: the record
    rewrite, gate = (read_json(root.fs, root.join(name, CURRENT.summary)) for name in ("captions", "scores"))
    report = write_report(Path(root.path), rewrite, quality, models, runs, timings, gate)
    print(comparison(runs))
    print(f"demo: done in {time.perf_counter() - start:.0f}s; report: {report} (and report.html)")
    return 0


COMMAND = Command(
    "demo",
    "the demo pipeline on built-in sample data (local), then its report",
    DemoConfig,
    lambda config, options, run=None: Said("", run_demo(config, options)),  # it prints as it goes
    flags=(Flag("output", aliases=("--out",), metavar="URL"), "rows", "seed", "steps", "models"),
)
