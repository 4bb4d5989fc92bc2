"""docs/design.md's new stage, a perceptual hash as a caption output, runs as printed on Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ray_address_file_kept

from veclip.shards.layout import CURRENT

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _example() -> str:
    text = DESIGN.read_text()
    start = text.index("is one module:")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.slow
def test_the_documented_new_stage_runs_exactly_once(sample_root, tmp_path):
    code = _example()
    assert 'summary = run_stage(Hash(HashConfig(input="s3://b/in", output="s3://b/phash")))' in code
    # the bucket URLs mapped onto local folders; a line to see the summary
    code = code.replace("s3://b/in", str(sample_root / "train")).replace("s3://b/phash", str(tmp_path / "phash"))
    script = tmp_path / "hash_stage.py"
    script.write_text(code + "print('rows', summary['rows_in'], summary['rows_out'])\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with ray_address_file_kept():
        runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)]
        runs.append(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env))
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rows 60 60" in runs[0].stdout and "3 to do" in runs[0].stdout, runs[0].stdout
    assert "3 already done, 0 to do" in runs[1].stdout, runs[1].stdout  # the rerun does nothing
    hashes = pq.read_table(tmp_path / "phash").to_pylist()
    assert len(hashes) == 60 and all(re.fullmatch(r"[0-9a-f]{16}", r["phash"]) for r in hashes)
    assert (tmp_path / "phash" / CURRENT.summary).exists()
