"""Where this host's environments are: the vLLM environment's interpreter on a CPU host
(see the Makefile's ``.venv-vllm``), which the rewrite's actors and the model builds run in,
and the cache the built models live in."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_vllm_python() -> str | None:
    """The vLLM environment's interpreter on a CPU host (see the Makefile), if any,
    wherever the command runs from: ``$VECLIP_VLLM_PYTHON``, else ``.venv-vllm``
    beside the checkout this package was installed from (editable installs), else
    beside the running environment. None: the workers use the driver's Python."""
    if python := os.environ.get("VECLIP_VLLM_PYTHON"):
        return python
    here = Path(__file__).resolve().parents[1]  # the checkout, for `pip install -e .`
    for root in (here, Path(sys.prefix).parent):
        if (python := root / ".venv-vllm" / "bin" / "python").exists():
            return str(python)
    return None


def cache_dir() -> Path:
    """veclip's cache (the tiny and the trained models): ``$VECLIP_CACHE``, else ``~/.cache/veclip``."""
    return Path(os.environ.get("VECLIP_CACHE", Path.home() / ".cache" / "veclip"))
