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
import posixpath
import tempfile
from pathlib import Path

from veclip.storage import Location, StorageOptions
from veclip.train.checkpoint import METRICS_FILE, MODEL_CONFIG_FILE, PROGRESS_FILE, STATE_FILE, load_progress, load_state

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def latest_checkpoint(location: Location) -> Location:
    """``location`` itself if it is a checkpoint, else its newest ``checkpoint_*`` folder."""
    if location.fs.exists(location.join(STATE_FILE)):
        return location
    if not location.fs.isdir(location.path):
        raise FileNotFoundError(f"export: no checkpoint or run folder at {location.url}")
    entries = location.fs.ls(location.path, detail=True)
    names = sorted(posixpath.basename(e["name"]) for e in entries if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint_"))
    if not names:
        raise FileNotFoundError(f"export: {location.url} holds no checkpoint_* folder")
    return location.child(names[-1])


def export(checkpoint: str, out: str, options: StorageOptions | None = None) -> Path:
    from safetensors.torch import save_file

    source = latest_checkpoint(Location(checkpoint, options or StorageOptions()))
    with tempfile.TemporaryDirectory() as tmp:
        for name in (STATE_FILE, MODEL_CONFIG_FILE, PROGRESS_FILE):
            source.fs.get_file(source.join(name), str(Path(tmp) / name))
        state, step = load_state(tmp), load_progress(tmp).step
        model_info = json.loads((Path(tmp) / MODEL_CONFIG_FILE).read_text())
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(weights, str(target / WEIGHTS_FILE))
    config = {"model_cfg": model_info["model_cfg"], "preprocess_cfg": {}, "veclip": {"model_name": model_info["name"], "checkpoint": source.url, "step": step}}
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return target


def metric_history(run: str, options: StorageOptions | None = None) -> list[dict]:
    """Every step's metrics, from the run's latest checkpoint."""
    checkpoint = latest_checkpoint(Location(run, options or StorageOptions()))
    text = checkpoint.fs.cat_file(checkpoint.join(METRICS_FILE)).decode()
    return [json.loads(line) for line in text.splitlines() if line]
