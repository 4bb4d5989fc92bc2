"""``veclip eval``'s config and command (light to import: the model and the metrics load when it runs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from veclip import schema
from veclip.command import Command, Flag


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""
    """an exported folder, a training run or checkpoint, or an open_clip name"""
    input: str = ""
    """eval shards: folder or s3:// prefix"""
    output: str | None = None
    """write eval.json and eval.md here"""
    pretrained: str | None = None
    """with an open_clip model name"""
    label_column: str = "label_shape"
    """class-name column(s) for zero-shot, comma-separated: label_shape,label_brand"""
    caption_column: str = "caption"
    """caption (string or list) column(s) for retrieval, comma-separated"""
    choice_column: str = ""
    """multiple-choice column(s): a list of texts per image, the right one first"""
    classes: str | None = None
    """JSON file with "classnames" (default: the set's _classes.json)"""
    templates: str = "generic"
    """prompt template set(s), comma-separated: generic, imagenet, scenes, brands, files"""
    batch_size: int = 256
    """images and texts per forward pass"""
    workers: int = 0
    """0: embed images in this process; N: over up to N Ray actors"""
    gpus_per_worker: float = 0.0
    """GPUs per embedding actor"""
    cpus_per_worker: float = 1.0
    """CPUs per embedding actor"""
    columns: schema.ColumnMap = field(default_factory=schema.ColumnMap)
    """the set's column names for the contract's roles (see schema.ColumnMap)"""

    @property
    def label_columns(self) -> tuple[str, ...]:
        return comma_names(self.label_column)

    @property
    def caption_columns(self) -> tuple[str, ...]:
        return comma_names(self.caption_column)

    @property
    def choice_columns(self) -> tuple[str, ...]:
        return comma_names(self.choice_column)

    @property
    def carried(self) -> tuple[str, ...]:
        """The columns each embedded row keeps beside its embedding."""
        return (*self.label_columns, *self.caption_columns, *self.choice_columns)


def comma_names(value: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in value.split(",") if c.strip())


COMMAND = Command(
    "eval",
    "zero-shot classification and image<->text retrieval on a Parquet eval set",
    EvalConfig,
    "veclip.eval.run:run_command",
    flags=(
        Flag("model", required=True, metavar="MODEL"),
        Flag("input", aliases=("--data",), required=True, metavar="URL"),
        Flag("output", aliases=("--out",), metavar="URL"),
        "pretrained",
        "label_column",
        "caption_column",
        "choice_column",
        "classes",
        "templates",
        "workers",
        "gpus_per_worker",
        "cpus_per_worker",
        "batch_size",
        "columns",
    ),
    submittable=True,
)
