"""``veclip demo``: the main job, end to end, on built-in sample data.

Today: make the sample data, validate both splits, and rewrite the train
split through real vLLM with tiny random models (VeCap and LaCLIP). The train
and eval stages join here as they land. Rerunning is cheap: done shards are
skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from veclip.rewrite.config import build_config
from veclip.rewrite.pipeline import render_summary, run_rewrite
from veclip.sample import SampleConfig, generate
from veclip.storage import Location, StorageOptions
from veclip.validate import ValidateConfig, validate


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    rows: int = 2000
    eval_rows: int = 500
    shards: int = 4
    seed: int = 0


def run_demo(config: DemoConfig, options: StorageOptions | None = None) -> int:
    """Returns a process exit code: 0 when every step succeeded."""
    options = options or StorageOptions()
    data = Location(config.out, options).child("data")
    start = time.perf_counter()
    generate(SampleConfig(data.url, config.rows, config.eval_rows, config.shards, config.seed), options)
    print(f"demo: sample data ready in {data.url} ({time.perf_counter() - start:.1f}s)")
    ok = True
    for split in ("train", "eval"):
        report = validate(ValidateConfig(data.child(split).url, images="full"), options)
        print(report.render())
        ok &= report.usable
    if ok:
        rewrite = build_config("tiny", input=data.child("train").url, output=Location(config.out, options).child("enriched").url, mode="both")
        print(render_summary(run_rewrite(rewrite, options)))
        print("demo: the rewrite used tiny RANDOM models (their captions are gibberish, so most are flagged);")
        print("      a real run uses e.g. llava-hf/llava-1.5-7b-hf and meta-llama/Meta-Llama-3-8B-Instruct on GPUs (--preset default).")
    print(f"demo: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1
