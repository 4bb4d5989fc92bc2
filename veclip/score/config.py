"""Typed configuration of the caption gate (``veclip score``), with presets; overrides as for rewrite."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from veclip import schema
from veclip.command import SHARDED_RUN_FLAGS, Command, Flag, ShardedRun
from veclip.config import build
from veclip.images import ImageLimits
from veclip.schema import ColumnMap
from veclip.shards.worker import FaultConfig


@dataclass(frozen=True)
class ScorePool:
    """The Ray Data actor pool: each actor holds one copy of the model."""

    min_actors: int = 1
    """actors kept while the stage runs"""
    max_actors: int = 8
    """Ray Data scales the pool up to this with the backlog"""
    num_gpus: float = 1.0
    """per actor"""
    num_cpus: float = 1.0
    """per actor (it decodes its shard's images)"""
    accelerator_type: str | None = None
    """e.g. "L4": keep the pool on that node type"""


@dataclass(frozen=True)
class ScoreConfig:
    input: str = ""
    """the rows to score: shards with captions (copy layout), or a caption output (joined to its images by key)"""
    add_captions: tuple[str, ...] = ()
    """more caption outputs of the same input, joined by key beside input's (as for veclip train --add-captions)"""
    output: str = ""
    """folder or s3:// prefix for the score tables (a caption output: add it to training with --add-captions)"""
    model: str = ""
    """an exported folder, a training run or checkpoint, or an open_clip name (with pretrained)"""
    pretrained: str | None = None
    """with an open_clip model name: a pretrained tag or a weights file"""
    caption_columns: tuple[str, ...] = schema.CAPTION_COLUMNS
    """caption columns to score (and gate); rewrites: each rewrite"""
    threshold: float | None = None
    """Flag a caption whose cosine with its image is under this (absolute; e.g. LAION-5B dropped pairs under 0.28
    with OpenAI's ViT-B/32, LAION-400M under 0.3); None: no absolute threshold"""
    percentile: float | None = None
    """Flag the captions under this percentile of their column's scores in their shard (0-100, e.g. 10: the lowest
    tenth); None: no percentile rule. With neither rule the stage only scores."""
    batch_size: int = 256
    """images (and texts) per forward pass"""
    device: str = "auto"
    """auto: cuda when the actor has a GPU, else cpu"""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """the input's column names for the contract's roles (see schema.ColumnMap)"""
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    """bytes and pixels an image may have"""
    pool: ScorePool = field(default_factory=ScorePool)
    """the actors that score"""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """retries, backoff and the output lease"""

    def __post_init__(self):
        unknown = sorted(set(self.caption_columns) - set(schema.CAPTION_COLUMNS))
        if unknown or not self.caption_columns:
            raise ValueError(
                f"score: caption_columns must be among {schema.CAPTION_COLUMNS}, got {list(self.caption_columns)}"
            )
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise ValueError(f"score: percentile must be within (0, 100), got {self.percentile}")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"score: threshold is a cosine, within [-1, 1]; got {self.threshold}")
        if not (1 <= self.pool.min_actors <= self.pool.max_actors) or self.batch_size < 1:
            raise ValueError(
                f"score: needs 1 <= pool.min_actors <= pool.max_actors and batch_size >= 1, got {self.pool}"
            )

    @property
    def gate(self) -> str:
        """The rule in words (it goes into every row's provenance)."""
        rules = ([f"cosine < {self.threshold:g}"] if self.threshold is not None else []) + (
            [f"under the {self.percentile:g}th percentile of its column in its shard"]
            if self.percentile is not None
            else []
        )
        return " or ".join(rules) or "none (scores only)"

    def validate_for_run(self) -> None:
        if not self.input or not self.output or not self.model:
            raise ValueError("score: --input, --output and --model are required")


def preset(name: str) -> ScoreConfig:
    """``default``: GPU actors, up to 8. ``cpu``: one CPU actor holding a quarter CPU (tests, the demo, laptops)."""
    if name == "default":
        return ScoreConfig()
    if name == "cpu":
        return ScoreConfig(batch_size=64, pool=ScorePool(min_actors=1, max_actors=1, num_gpus=0, num_cpus=0.5))
    raise ValueError(f"unknown preset {name!r}: use 'default' or 'cpu'")


def build_config(
    preset_name: str = "default", config_file: str | None = None, overrides: list[str] = (), **fields
) -> ScoreConfig:
    """Preset, then the config file, then top-level fields, then ``--set`` overrides."""
    return build(preset(preset_name), config_file, fields, overrides)


def fingerprint(config: ScoreConfig, weights: str) -> tuple[str, dict]:
    """What decides the output's content: the rows scored (input and caption sources), the model's
    weights (resolved: ``weights``), the columns, the gate and the image limits. Pools, batch size,
    device and fault settings change no row."""
    fields = {
        "input": config.input,
        "add_captions": list(config.add_captions),
        "model": config.model,
        "pretrained": config.pretrained,
        "weights": weights,
        "caption_columns": list(config.caption_columns),
        "columns": str(config.columns),
        "threshold": config.threshold,
        "percentile": config.percentile,
        "image_limits": dataclasses.asdict(config.image_limits),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields


COMMAND = Command(
    "score",
    "the caption gate: score every caption against its image with a CLIP model and flag the low ones",
    ScoreConfig,
    "veclip.score.stage:run_command",
    flags=(
        Flag("input", required=True, metavar="URL"),
        Flag("add_captions", metavar="URL[#COLUMNS]"),
        Flag("output", required=True, metavar="URL"),
        Flag("model", required=True, metavar="MODEL"),
        "pretrained",
        "threshold",
        "percentile",
        "columns",
    ),
    options=ShardedRun,
    run_flags=SHARDED_RUN_FLAGS,
    presets=preset,
    preset_help="default: GPU actors (up to 8); cpu: one CPU actor",
    submittable=True,
    set_example='pool.max_actors=16 or caption_columns=["vecap"]',
)
