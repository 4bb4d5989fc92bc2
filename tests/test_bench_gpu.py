"""The prepared GPU check (benchmarks/bench_gpu.py) run on CPU with the tiny model, so it cannot rot
before a device is lent; what it measures on a GPU is in BENCHMARKS.md."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--models", "veclip-tiny"]
    cmd += ["--batches", "4", "8", "--steps", "1", "--images", "6", "--compile", "off", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # from another folder
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    train = report["train"]
    assert {(r["captions_per_image"], r["batch"]) for r in train} == {(1, 4), (1, 8), (2, 4), (2, 8)}
    assert all(r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] is None for r in train)  # no peak on a CPU
    assert report["decode"]["images"] == 6 and report["decode"]["device_images_per_s"] > 0
    assert report["decode"]["cpu_images_per_s"] > 0 and report["score"]["images_per_s"] > 0
    assert (tmp_path / "gpu.md").read_text().startswith("# GPU check")
