"""The model eval and score run: an exported folder, a training run or checkpoint (read into memory),
or an open_clip name with its pretrained weights; :func:`resolve_model` names its weights exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

from veclip.storage import Location, StorageOptions
from veclip.train.export import CONFIG_FILE, WEIGHTS_FILE


def is_exported(spec: str) -> bool:
    """A folder `veclip export` wrote (open_clip's ``local-dir:`` layout)."""
    return Path(spec).is_dir() and (Path(spec) / CONFIG_FILE).exists()


def is_run(spec: str) -> bool:
    """A training run or one of its checkpoints, local or on S3."""
    return not is_exported(spec) and (spec.startswith("s3://") or Path(spec).is_dir())


HF_HUB = "hf-hub:"  # open_clip's schema for a model repo on the Hugging Face Hub (config and weights)


def hub_revision(repo: str) -> str:
    """The commit of the repo's main branch the driver sees (its config fetched, or read from the local
    Hugging Face cache with ``HF_HUB_OFFLINE=1``): the weights' identity in the stage's fingerprint."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, "open_clip_config.json")).parent.name


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def resolve_model(spec: str, pretrained: str | None, options: StorageOptions) -> tuple[str, str]:
    """``(what the actors load, which weights exactly)``: a run folder resolves to its latest checkpoint
    (it may move on while a stage runs), an exported folder and a local weights file are named by their
    digest, a Hub repo by the commit the driver sees, which the actors then load (``hf-hub:org/repo@commit``:
    its main branch may move while a stage runs)."""
    from veclip.train.checkpoint import latest

    if is_exported(spec):
        return spec, _digest(Path(spec) / WEIGHTS_FILE)
    if is_run(spec):
        checkpoint = latest(Location(spec, options)).url
        return checkpoint, checkpoint
    if spec.startswith(HF_HUB):  # config and weights from the Hub: pretrained by definition
        pinned = f"{spec}@{hub_revision(spec[len(HF_HUB) :])}"
        return pinned, pinned
    if pretrained and Path(pretrained).is_file():  # a weights file here: replaced in place, it is other weights
        return spec, f"{spec}:{pretrained}@{_digest(Path(pretrained))}"
    if not pretrained:
        raise ValueError(
            f"{spec!r} is an open_clip model name without --pretrained: its weights would be random, "
            "and different in every actor. Name a pretrained tag or weights file, an exported folder, a training run "
            "or a Hub repo (hf-hub:org/repo)."
        )
    return spec, f"{spec}:{pretrained}"


def load_model(spec: str, pretrained: str | None, options: StorageOptions | None):
    """``(model, preprocess, tokenizer)`` in eval mode on CPU."""
    import open_clip

    from veclip.train.checkpoint import read_model
    from veclip.train.model import register_configs

    register_configs()
    if is_exported(spec):
        spec = f"local-dir:{spec}"
    elif is_run(spec):
        return read_model(spec, options).create()
    elif spec.startswith(HF_HUB) and "@" in spec:  # pinned by resolve_model: that commit, not today's main
        from huggingface_hub import snapshot_download

        repo, revision = spec[len(HF_HUB) :].split("@", 1)
        spec = f"local-dir:{snapshot_download(repo, revision=revision)}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)
