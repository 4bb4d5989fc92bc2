"""``veclip demo``: the main job, end to end, on built-in sample data.

Today it makes the sample data and validates both splits; the rewrite, train
and eval stages join here as they land. Rerunning is cheap: done shards are
skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
    print(f"demo: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1
