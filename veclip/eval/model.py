"""The model eval runs: an exported folder, a training run or checkpoint (read into memory), or an open_clip name."""

from __future__ import annotations

from pathlib import Path

from veclip.storage import StorageOptions

EXPORTED_CONFIG = "open_clip_config.json"  # what `veclip export` writes beside the weights


def load_model(spec: str, pretrained: str | None, options: StorageOptions | None):
    """``(model, preprocess, tokenizer)`` in eval mode on CPU."""
    import open_clip

    from veclip.train.checkpoint import read_model
    from veclip.train.model import register_configs

    register_configs()
    if Path(spec).is_dir() and (Path(spec) / EXPORTED_CONFIG).exists():
        spec = f"local-dir:{spec}"
    elif spec.startswith("s3://") or Path(spec).is_dir():  # a training run or one of its checkpoints
        return read_model(spec, options).create()
    model, _, preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)
