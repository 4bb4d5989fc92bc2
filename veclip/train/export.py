"""``veclip export``: a training checkpoint -> a folder stock open_clip loads.

The folder holds ``open_clip_config.json`` (the model config) and
``open_clip_model.safetensors`` (the weights), the layout open_clip's
``local-dir:`` schema reads::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/export")

For a model open_clip knows by name the weights file alone also works:
``create_model_and_transforms("ViT-B-16", pretrained="/path/to/export/open_clip_model.safetensors")``.
"""

from __future__ import annotations

import json
from pathlib import Path

from veclip.command import Said
from veclip.storage import StorageOptions
from veclip.train.checkpoint import read_model

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def export(checkpoint: str, out: str, options: StorageOptions | None = None) -> Path:
    """Write the model of ``checkpoint`` (or of a run's latest checkpoint) to ``out``."""
    from safetensors.torch import save_file

    saved = read_model(checkpoint, options)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in saved.weights.items()}, str(target / WEIGHTS_FILE))
    config = {
        "model_cfg": saved.config,
        "preprocess_cfg": {},
        "veclip": {"model_name": saved.name, "checkpoint": saved.checkpoint, "step": saved.step},
    }
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return target


def run_command(config, options: StorageOptions, run=None) -> Said:
    """``veclip export`` (config: :class:`veclip.train.config.ExportConfig`)."""
    out = export(config.checkpoint, config.output, options)
    return Said(f"export: wrote {out}; load it with open_clip.create_model_and_transforms('local-dir:{out}')")
