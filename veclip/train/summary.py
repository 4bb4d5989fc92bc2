"""A training run's summary (``<output>/<name>/summary.json``): every reader goes through :class:`TrainSummary`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainSummary:
    config: dict  # the run's TrainConfig as it ran (secrets redacted)
    name: str
    model: str
    caption_mode: str
    metrics: dict  # the last reported step's: step, loss, samples_seen, logit_scale, ...
    checkpoint: str | None  # the last committed checkpoint
    rows_skipped_by_reason: dict[str, int] = field(default_factory=dict)
    shards_skipped_by_reason: dict[str, int] = field(default_factory=dict)
    resumes: list[dict] = field(default_factory=list)  # each restart: its cause, step and places
    wall_seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainSummary:
        """The summary a run wrote (an older run's: its missing fields at their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def step(self) -> int:
        return (self.metrics or {}).get("step", 0)

    @property
    def samples_per_s(self) -> float:
        """Over the run's wall time, start-up and checkpoints included."""
        return (self.metrics or {}).get("samples_seen", 0) / max(self.wall_seconds, 1e-9)
