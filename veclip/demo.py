"""``veclip demo``: the main job, end to end, on built-in sample data.

Today: make the sample data, validate both splits, rewrite the train split
through real vLLM with tiny random models (VeCap and LaCLIP), train a tiny
CLIP on the result with the VeCLIP 50/50 mix (2 Ray Train workers on CPU) and
export it for stock open_clip. The eval stage joins here when it lands. Rerunning is cheap: done shards are
skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from veclip.rewrite.config import build_config
from veclip.rewrite.pipeline import render_summary, run_rewrite
from veclip.sample import SampleConfig, generate
from veclip.storage import Location, StorageOptions
from veclip.train.config import build_config as build_train_config
from veclip.train.export import export
from veclip.train.trainer import render_summary as render_train_summary
from veclip.train.trainer import run_train
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
        root = Location(config.out, options)
        per_worker = max(2, min(32, config.rows // 5))  # 2 workers; small demo data still makes full batches
        train = build_train_config("tiny", None, [f"batch_size={per_worker}"], data=rewrite.output, output=root.child("train").url, name="demo-mix")
        print(render_train_summary(run_train(train, options)))
        if root.is_local:
            print(f"demo: exported to {export(root.child('train', 'demo-mix').url, root.join('model'), options)}")
    print(f"demo: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1
