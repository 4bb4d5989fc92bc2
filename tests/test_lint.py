"""The code is kept as ruff (configured in pyproject.toml) wants it: lint clean and formatted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TREES = ["veclip", "tests", "benchmarks", "pipelines"]


def _ruff() -> str:
    found = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(found).exists():
        pytest.fail("ruff is missing: `make env` installs it (the dev extra)")
    return found


def test_lint_is_clean():
    result = subprocess.run([_ruff(), "check", *TREES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_code_is_formatted():
    result = subprocess.run([_ruff(), "format", "--check", *TREES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "run `ruff format`:\n" + result.stdout[-4000:]
