"""Experiment tracking: ``veclip train --report-to tensorboard,wandb,mlflow``.

The driver logs every training step rank 0 posts (:mod:`veclip.train.live`): loss, learning rate,
logit scale, samples/s, data wait and step time, under ``train/``. Each tracker works offline here
(TensorBoard event files, W&B offline mode unless ``WANDB_MODE`` says otherwise, an MLflow file store
unless ``MLFLOW_TRACKING_URI`` does) and a resumed run, by a restart or a rerun with the same name,
continues the same tracked run: W&B's run id is derived from the run folder, MLflow's is kept in
``tracking.json`` in the run folder, TensorBoard's logdir is the run's. A step a restarted worker
group trains again (an exact resume: the same batches, the same figures) is not logged twice.

Files go to ``<run folder>/tracking/`` on local storage; for a run on S3 they are written under
``tracking.local_dir`` (default ``~/.cache/veclip/tracking/<name>``) and copied to the run folder at
the end.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from veclip.config import scrub
from veclip.storage import Location, read_json, write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
METRICS = ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_share", "step_seconds", "mfu")
TRACKING_DIR = "tracking"  # in the run folder
TRACKING_FILE = "tracking.json"  # in the run folder: the MLflow run id a rerun continues


@dataclass(frozen=True)
class TrackingConfig:
    report_to: tuple[str, ...] = ()
    """any of tensorboard, wandb, mlflow"""
    project: str = "veclip"
    """the W&B project and the MLflow experiment"""
    local_dir: str = ""
    """tracker files for a run on S3, before they are copied; "": ~/.cache/veclip/tracking/<name>"""

    def __post_init__(self):
        unknown = sorted(set(self.report_to) - set(TRACKERS))
        if unknown:
            raise ValueError(f"train: --report-to takes {', '.join(TRACKERS)}; not {', '.join(unknown)}")


def step_metrics(metrics: dict) -> dict[str, float]:
    return {f"train/{k}": float(metrics[k]) for k in METRICS if metrics.get(k) is not None}


class Trackers:
    """The run's trackers, opened by the driver: ``log(metrics)`` per step, ``close()`` at the end."""

    def __init__(self, tracking: TrackingConfig, run: Location, name: str, config: dict):
        self.tracking, self.run, self.last_step = tracking, run, 0
        self.remote = not run.is_local
        default = Path.home() / ".cache" / "veclip" / "tracking" / name
        self.dir = Path(tracking.local_dir or default) if self.remote else Path(run.path) / TRACKING_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writers = [_OPEN[kind](self, name, config) for kind in tracking.report_to]

    def log(self, metrics: dict) -> None:
        step = metrics["step"]
        if step <= self.last_step:
            return  # trained again after a restart from an earlier checkpoint: logged already
        self.last_step = step
        values = step_metrics(metrics)
        for writer in self.writers:
            writer.log(values, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.remote and self.writers:
            self.run.fs.put(str(self.dir), self.run.join(TRACKING_DIR), recursive=True)


class _TensorBoard:
    def __init__(self, trackers: Trackers, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trackers.dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def run_id(run: Location) -> str:
    """One id per run folder: a rerun with the same name and output continues the same tracked run."""
    return hashlib.sha256(run.url.encode()).hexdigest()[:16]


class _WandB:
    def __init__(self, trackers: Trackers, name: str, config: dict):
        import wandb

        from veclip.console import verbose

        if not verbose():  # its banner and end-of-run summary: the trainer's own lines say as much
            os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=trackers.tracking.project,
            name=name,
            id=run_id(trackers.run),
            resume="allow",
            dir=str(trackers.dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, trackers: Trackers, name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store: offline, no server, nothing but files (MLflow 3 asks to opt in to it)
            uri = (trackers.dir / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.record = MlflowClient(uri), trackers.run.join(TRACKING_FILE)
        saved = read_json(trackers.run.fs, self.record) or {}
        if saved.get("mlflow_run_id"):
            self.run_id = saved["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(trackers.tracking.project)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(trackers.tracking.project)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            # the URI often carries credentials (https://user:token@host): the record keeps it without them
            record = {**saved, "mlflow_run_id": self.run_id, "mlflow_uri": scrub(uri, ())}
            write_json(trackers.run.fs, self.record, record)
            for key, value in _flat(config).items():
                self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
