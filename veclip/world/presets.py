"""The sample world's rewrite presets, registered with the rewrite (entry point ``veclip.rewrite_presets``).

* ``tiny``: tiny random models (:mod:`veclip.world.tiny`) on CPU, LLaVA's architecture as the captioner;
  :func:`tiny_captioner` swaps in another tiny architecture (Qwen2-VL, BLIP-2).
* ``trained`` / ``trained-quick``: a small LLaVA + Llama trained here on the sample world
  (:mod:`veclip.world.build`), on CPU.

The models are built when a run needs them (:func:`build_models`), never when a config is made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from veclip.environments import cache_dir, default_vllm_python
from veclip.rewrite.config import (
    LACLIP_SAMPLING,
    QWEN_VL_PIXELS,
    RewriteConfig,
    SamplingConfig,
    cpu_stage,
    register_model_builder,
    register_preset,
)
from veclip.world import build as trained
from veclip.world import tiny

TINY_CAPTIONERS = ("llava", "qwen2_vl", "vlm")
TRAINED_PRESETS = {"trained": "full", "trained-quick": "quick"}  # preset -> the build scale of its models


def tiny_models_dir() -> Path:
    return cache_dir() / "tiny-models"


def tiny_preset() -> RewriteConfig:
    models = tiny.model_paths(tiny_models_dir())
    return RewriteConfig(
        captioner=cpu_stage(models["llava"], "captioner-v1", SamplingConfig(temperature=1.0, max_tokens=16)),
        fuser=cpu_stage(models["llm"], "fusion-v1", SamplingConfig(temperature=0.7, max_tokens=32)),
        laclip=cpu_stage(models["llm"], "laclip-v1", dataclasses.replace(LACLIP_SAMPLING, max_tokens=24)),
        max_image_side=128,
    )


def trained_preset(scale: str) -> RewriteConfig:
    models = trained.model_paths(trained.models_dir(trained.ModelsConfig(scale=scale)))
    return RewriteConfig(  # greedy captions and fusion; LaCLIP samples as the paper does
        captioner=cpu_stage(models["captioner"], "captioner-v1", SamplingConfig(max_tokens=64)),
        fuser=cpu_stage(models["llm"], "fusion-small-v1", SamplingConfig(max_tokens=80)),
        laclip=cpu_stage(models["llm"], "laclip-v1", dataclasses.replace(LACLIP_SAMPLING, max_tokens=64)),
        max_image_side=128,
    )


def tiny_captioner(name: str) -> dict:
    """``--set`` fields that make the tiny preset caption with another tiny architecture."""
    if name not in TINY_CAPTIONERS:
        raise ValueError(f"no tiny captioner {name!r}: use one of {TINY_CAPTIONERS}")
    fields = {"captioner.engine.model": tiny.model_paths(tiny_models_dir())[name]}
    if name == "vlm":  # BLIP-2 has no chat template: a plain prompt with the image
        fields |= {
            "captioner.engine.prompt_format": "template",
            "captioner.engine.prompt_template": "Question: {instruction} Answer:",
        }
    if name == "qwen2_vl":
        fields["captioner.engine.mm_processor_kwargs"] = QWEN_VL_PIXELS
    return fields


def build_models(config: RewriteConfig) -> None:
    """Build the tiny or the trained models if ``config`` uses them and they are not built yet."""
    roles = ([config.captioner, config.fuser] if config.uses_captioner else []) + (
        [config.laclip] if config.uses_laclip else []
    )
    used = {stage.engine.model for stage in roles}  # a LaCLIP-only run builds no VLM
    if used & set(tiny.model_paths(tiny_models_dir()).values()):
        tiny.ensure_built(tiny_models_dir(), default_vllm_python())
    for scale in set(TRAINED_PRESETS.values()):
        models = trained.ModelsConfig(scale=scale)
        if used & set(trained.model_paths(trained.models_dir(models)).values()):
            trained.ensure_built(models)


def register() -> None:
    register_preset("tiny", tiny_preset)
    for name, scale in TRAINED_PRESETS.items():
        register_preset(name, lambda scale=scale: trained_preset(scale))
    register_model_builder(build_models)
