"""``veclip demo``: the main job, end to end, on built-in sample data.

Sample data -> validate -> rewrite (VeCap + LaCLIP through real vLLM, tiny
random models, written as caption tables beside the images) -> validate the
tables against their inputs -> ``gallery.html`` (``veclip show``) -> train (joined by key) a tiny CLIP with the VeCLIP 50/50 mix on 2 Ray Train
workers -> export for stock open_clip -> evaluate (zero-shot, retrieval) ->
``report.md`` with plots. Rerunning is cheap: every stage skips what is done
(training resumes from its last checkpoint, which is the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from veclip.eval.run import EvalConfig, evaluate
from veclip.report import write_report
from veclip.rewrite.config import build_config as build_rewrite_config
from veclip.rewrite.pipeline import render_summary as render_rewrite_summary
from veclip.rewrite.pipeline import run_rewrite
from veclip.sample import SampleConfig, generate
from veclip.show import ShowConfig, show
from veclip.storage import Location, StorageOptions
from veclip.train.config import build_config as build_train_config
from veclip.train.checkpoint import metric_history
from veclip.train.export import export
from veclip.train.trainer import render_summary as render_train_summary
from veclip.train.trainer import run_train
from veclip.validate import ValidateConfig, validate


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"  # a local folder: data, outputs, the model and report.md
    rows: int = 400  # a few minutes end to end on 2 cores
    eval_rows: int = 500  # eval rows of sample data
    shards: int = 4  # shards per split
    seed: int = 0  # the sample data's seed


def run_demo(config: DemoConfig, options: StorageOptions | None = None) -> int:
    """Returns a process exit code: 0 when every step succeeded."""
    options = options or StorageOptions()
    root = Location(config.out, options)
    if not root.is_local:
        raise ValueError("demo: --out must be a local folder (the report and the exported model are local files)")
    data = root.child("data")
    timings: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        timings[name] = time.perf_counter() - last
        last = time.perf_counter()

    generate(SampleConfig(data.url, config.rows, config.eval_rows, config.shards, config.seed), options)
    lap("sample data")
    for split in ("train", "eval"):
        report = validate(ValidateConfig(data.child(split).url, images="full"), options)
        print(report.render())
        if not report.usable:
            print("demo: FAILED: the sample data did not validate")
            return 1
    lap("validate")

    # caption tables beside the sample images (the layout for scale): training joins them back by key
    rewrite = build_rewrite_config("tiny", input=data.child("train").url, output=root.child("captions").url, mode="both", layout="captions")
    rewrite_summary = run_rewrite(rewrite, options)
    print(render_rewrite_summary(rewrite_summary))
    if rewrite_summary["failed"]:
        print("demo: FAILED: some rewrite shards kept failing (above); rerun `veclip demo` to retry them")
        return 1
    lap("rewrite (vLLM, tiny random models)")
    report = validate(ValidateConfig(rewrite.output, images="none"), options)  # each caption table against its input
    print(report.render())
    if not report.usable:
        print("demo: FAILED: the caption tables do not line up with their inputs")
        return 1
    print(show(ShowConfig(rewrite.output, rows=24, html=root.join("gallery.html")), options))  # the captions beside their images

    per_worker = max(2, min(32, config.rows // 5))  # 2 workers; small demo data still makes full batches
    train = build_train_config("tiny", None, [f"batch_size={per_worker}"], data=rewrite.output, output=root.child("train").url, name="demo-mix")
    train_summary = run_train(train, options)
    print(render_train_summary(train_summary))
    lap("train (Ray Train, 2 CPU workers)")

    model = export(root.child("train", "demo-mix").url, root.join("model"), options)
    evaluation = evaluate(EvalConfig(model=str(model), data=data.child("eval").url, out=root.child("eval").url,
                                     label_column="label_shape,label_brand"), options)  # what the images show; what only AltText names
    lap("export + eval")
    timings["total"] = time.perf_counter() - start

    history = metric_history(root.child("train", "demo-mix").url, options)
    report = write_report(Path(root.path), rewrite_summary, train_summary, history, evaluation, timings)
    print(report.read_text())
    print(f"demo: done in {timings['total']:.1f}s; report: {report}")
    return 0
