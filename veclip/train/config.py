"""Typed configuration of the training stage, with presets; overrides as for rewrite."""

from __future__ import annotations

from dataclasses import dataclass, field

from veclip.command import Command, DryRun, Flag, comma_list
from veclip.config import build
from veclip.dataset import Acceptance
from veclip.images import ImageLimits
from veclip.schema import ColumnMap
from veclip.train.captions import CaptionConfig
from veclip.train.tracking import TrackingConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.2
    """AdamW decay, not on gains, biases and the logit scale"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.98
    """AdamW beta2"""
    eps: float = 1e-6
    """AdamW epsilon"""
    warmup_steps: int = 500
    """linear warm-up, then cosine decay to 0"""
    warmup_share: float = 0.0
    """when > 0: the warm-up is this share of the run's steps (instead of warmup_steps)"""
    grad_clip_norm: float = 0.0
    """clip the gradients' global norm to this (0: off), as open_clip's --grad-clip-norm"""

    def __post_init__(self):
        if not 0.0 <= self.warmup_share < 1.0 or self.grad_clip_norm < 0:
            raise ValueError("train: optim.warmup_share must be in [0, 1) and optim.grad_clip_norm >= 0")

    def warmup_for(self, steps: int) -> int:
        """The warm-up steps of a run of ``steps``."""
        return max(1, round(self.warmup_share * steps)) if self.warmup_share > 0 else self.warmup_steps

    fused: bool | None = None
    """fused AdamW kernel (one kernel for all parameters); None: on GPUs only"""


@dataclass(frozen=True)
class ScaleConfig:
    """Ray Train workers. On CPU keep ``cpus_per_worker`` fractional so Ray Data's
    decode tasks still get CPUs."""

    num_workers: int = 8
    """Ray Train workers (one GPU each with use_gpu)"""
    use_gpu: bool = True
    """train on GPUs (NCCL); false: CPU (gloo)"""
    cpus_per_worker: float = 8.0
    """CPUs per train worker"""
    torch_threads: int = 0
    """the worker's torch threads; 0: the whole CPUs it holds (at least 1)"""
    max_failures: int = 3
    """worker-group restarts from the latest checkpoint before the run fails"""
    max_preemption_failures: int = -1
    """restarts after a node drained for preemption (counted apart); -1: no limit"""
    preemption_check_every: int = 1
    """steps between asking Ray Train for a preemption notice (a barrier); 0: never"""
    preprocess_cpus: float = 1.0
    """per Ray Data decode/augment task"""
    accelerator_type: str | None = None
    """e.g. "H100": train only on that node type"""


@dataclass(frozen=True)
class TrainConfig:
    input: str = ""
    """folder or s3:// prefix of shards, or a caption output (joined to its input's images by key)"""
    add_captions: tuple[str, ...] = ()
    """More caption outputs of the same input, joined by key beside data's: URL, or URL#vecap=vlm_caption,rewrites to
    pick and rename columns (see veclip.dataset.CaptionSource)"""
    accept: Acceptance = field(default_factory=Acceptance)
    """of an output not whole: what to train on (else refused)"""
    output: str = ""
    """run storage: <output>/<name>/checkpoint_*"""
    name: str = "veclip-train"
    """run name: rerun with the same name and output to resume"""
    model: str = "ViT-B-16"
    """open_clip model name, or veclip-tiny"""
    pretrained: str | None = None
    """a local weights file or an open_clip pretrained tag"""
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    """which caption each sample trains with"""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """the data's column names for the contract's roles (see schema.ColumnMap)"""
    batch_size: int = 256
    """per worker; the contrastive batch is batch_size x num_workers"""
    steps: int = 10_000
    """optimizer steps in the run"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer and schedule"""
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    """workers and resources"""
    checkpoint_every: int = 1000
    """steps between checkpoints (and at the end)"""
    report_every: int = 100
    """ray.train.report is a sync point (0.2-0.6 s on CPU); every step's metrics are kept regardless"""
    keep_checkpoints: int = 3
    """newest checkpoints kept in the run folder"""
    precision: str = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16"""
    grad_checkpointing: bool = False
    """recompute activations in backward: less memory, more compute"""
    compile: bool = False
    """torch.compile the model"""
    decode: str = "cpu"
    """Where JPEGs are decoded: "cpu" (the preprocess tasks) or "device" (the train worker's, batched: nvJPEG on a
    GPU). Device decoding frees the CPUs for corpora that are not pre-resized."""
    window_units: int = 8
    """Each worker shuffles its rows within windows of this many row groups (the rows of a window are held in memory
    at once; see veclip/train/order.py)."""
    prefetch_batches: int = 2
    """blocks each worker's stream reads ahead"""
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    """bytes and pixels an image may have"""
    seed: int = 0
    """data order, augmentation, caption choice and init derive from it"""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """TensorBoard, W&B, MLflow (--report-to)"""

    def __post_init__(self):
        if self.batch_size < 2 or self.steps < 1:
            raise ValueError("train: batch_size must be >= 2 and steps >= 1")
        if self.seed < 0 or self.window_units < 1:
            raise ValueError("train: seed must be >= 0 and window_units >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train: precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.decode not in ("cpu", "device"):
            raise ValueError(f"train: decode must be cpu or device, got {self.decode!r}")

    @property
    def images_per_step(self) -> int:
        """Per worker: ``batch_size``, or ``batch_size / per_image`` when the text budget is kept (budget_neutral)."""
        if self.captions.budget_neutral:
            return max(2, self.batch_size // self.captions.per_image)
        return self.batch_size

    def validate_for_run(self) -> None:
        if not self.input or not self.output:
            raise ValueError("train: --input and --output are required")


def preset(name: str) -> TrainConfig:
    """``default``: ViT-B-16 on 8 GPU workers. ``tiny``: an 8M-parameter CLIP on 2 CPU workers."""
    if name == "default":
        return TrainConfig()
    if name == "tiny":
        return TrainConfig(
            model="veclip-tiny",
            batch_size=32,
            steps=60,
            # warm-up as a share of the run and clipping: with 5 warm-up steps and no clipping the tiny CLIP
            # sat at chance loss (ln 64) until step 60-140 of 300 (benchmarks/bench_recipe.py)
            optim=OptimConfig(lr=1e-3, weight_decay=0.1, warmup_share=0.1, grad_clip_norm=1.0),
            scale=ScaleConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5, max_failures=1, preprocess_cpus=0.5),
            checkpoint_every=20,
            window_units=2,
        )
    raise ValueError(f"unknown preset {name!r}: use 'default' or 'tiny'")


def build_config(
    preset_name: str = "default", config_file: str | None = None, overrides: list[str] = (), **fields
) -> TrainConfig:
    """Preset, then the config file, then top-level fields, then ``--set`` overrides."""
    return build(preset(preset_name), config_file, fields, overrides)


COMMAND = Command(
    "train",
    "train CLIP with Ray Train on (enriched) shards",
    TrainConfig,
    "veclip.train.trainer:run_command",
    flags=(
        Flag("input", aliases=("--data",), required=True, metavar="URL"),
        Flag("output", required=True, metavar="URL"),
        "model",
        "name",
        Flag("add_captions", metavar="URL[#COLUMNS]"),
        Flag("captions.mode", "--caption-mode"),
        Flag("tracking.report_to", "--report-to", metavar="TRACKERS", parse=comma_list),
        "columns",
    ),
    options=DryRun,
    presets=preset,
    preset_help="default: ViT-B-16 on 8 GPU workers; tiny: 8M-param CLIP on 2 CPU workers",
    submittable=True,
    set_example="steps=2000, captions.p_vecap=0.3, scale.num_workers=4",
)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = ""
    """a checkpoint folder, or a run folder (its latest checkpoint is used)"""
    output: str = ""
    """local output folder"""


EXPORT_COMMAND = Command(
    "export",
    "write a checkpoint as a folder stock open_clip loads",
    ExportConfig,
    "veclip.train.export:run_command",
    flags=(
        Flag("checkpoint", required=True, metavar="CHECKPOINT"),
        Flag("output", aliases=("--out",), required=True, metavar="DIR"),
    ),
)
