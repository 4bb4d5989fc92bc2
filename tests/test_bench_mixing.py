"""The mixing protocol (benchmarks/bench_mixing.py) end to end at a toy size, so it cannot rot between runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.long
def test_the_protocol_prints_paired_intervals_and_holm(tmp_path):
    out = tmp_path / "runs.json"
    cmd = [sys.executable, "bench_mixing.py", "--captions", "reference", "--seeds", "0", "1", "--steps", "4"]
    cmd += ["--rows", "160", "--out", str(out)]
    from conftest import ray_address_file_kept

    with ray_address_file_kept():  # its own local Ray writes the last-cluster file
        result = subprocess.run(
            cmd,
            cwd=ROOT / "benchmarks",
            capture_output=True,
            text=True,
            timeout=900,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # its own local cluster
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads(out.read_text())
    runs = saved["runs"]
    # provenance: the commit, the protocol's times, each run's times and its whole logged loss curve
    assert len(saved["run"]["commit"]) == 40 and saved["run"]["started_at"] <= saved["run"]["ended_at"]
    assert all(r["started_at"] < r["ended_at"] and [m["step"] for m in r["loss_history"]] for r in runs)
    assert sorted((r["mode"], r["seed"]) for r in runs) == [(m, s) for m in ("alttext", "mix", "vecap") for s in (0, 1)]
    assert all(0 <= r["brand_probe"] <= 1 and 0 <= r["R5_plain"] <= 1 for r in runs)
    contrasts = [line for line in result.stdout.splitlines() if line.startswith("| mix - ")]
    assert len(contrasts) == 10  # 2 contrasts x 5 metrics, fixed before the runs
    assert all(line.count("[") == 2 and ("| differs |" in line or "| not shown |" in line) for line in contrasts)
