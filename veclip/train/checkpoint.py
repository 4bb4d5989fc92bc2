"""A training checkpoint: what each file holds, how it is written and read back.

    state.pt        model, optimizer, scheduler (rank 0; tensors only, loaded with weights_only=True)
    model.json      the open_clip model name and config (for export)
    progress.json   step, samples seen, the resumes so far, and per worker its
                    place in the epoch and the rows it passed over (rank 0)
    metrics.jsonl   every step's metrics so far (rank 0)
    rng-<rank>.pt   each worker's CPU and device RNG state (every rank)

Every rank reports its own files into the same checkpoint folder (Ray Train
gives all ranks one folder name), so nothing is funnelled through rank 0 but
the small ``progress.json``. A run folder holds ``checkpoint_*`` folders; readers
(:func:`latest`, :func:`read_model`, :func:`metric_history`) take either, on any
storage, and read into memory.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field

import torch

from veclip.storage import Location, StorageOptions
from veclip.train.order import Position

STATE_FILE = "state.pt"
MODEL_CONFIG_FILE = "model.json"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
# the run folder's own files, beside its checkpoint_* folders
RUN_FILE = "run.json"  # the run's config, written when it starts (veclip status reads it)
RUN_SUMMARY_FILE = "summary.json"  # the run's summary, written when it ends


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


@dataclass
class WorkerProgress:
    """One worker's place in its epoch, the rows it has passed over (by reason), all epochs, and the Ray node
    it ran on when saved (a resume tells a lost node from a worker that died)."""

    position: Position = field(default_factory=Position)
    skipped: dict[str, int] = field(default_factory=dict)
    node: str = ""  # Ray node id (hex); "" before it was kept

    def to_dict(self) -> dict:
        return {"position": self.position.to_dict(), "skipped": self.skipped, "node": self.node}

    @classmethod
    def from_dict(cls, d: dict) -> WorkerProgress:
        return cls(Position(**d["position"]), dict(d["skipped"]), d.get("node", ""))


@dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0
    resumes: list[dict] = field(default_factory=list)
    workers: list[WorkerProgress] = field(default_factory=list)
    data_plan: str | None = None  # the read order's fingerprint (DataPlan.fingerprint); None: before it was kept
    attempt: str | None = None  # the `veclip train` invocation that saved it: another one resuming is a rerun
    preempted: dict | None = None  # the preemption notice this worker group had when saved (nodes, ranks, deadline)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "resumes": self.resumes,
            "workers": [w.to_dict() for w in self.workers],
            "data_plan": self.data_plan,
            "attempt": self.attempt,
            "preempted": self.preempted,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        workers = [WorkerProgress.from_dict(w) for w in d["workers"]]
        return cls(
            d["step"],
            d["samples_seen"],
            list(d["resumes"]),
            workers,
            d.get("data_plan"),
            d.get("attempt"),
            d.get("preempted"),
        )

    def rows_skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for worker in self.workers:
            for reason, n in worker.skipped.items():
                total[reason] = total.get(reason, 0) + n
        return total


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["device"] is not None:
        torch.cuda.set_rng_state(state["device"], device)


def save(
    directory: str,
    rank: int,
    device: torch.device,
    *,
    model=None,
    optimizer=None,
    scheduler=None,
    progress: Progress | None = None,
    history: list[dict] = (),
    model_name: str = "",
) -> None:
    """This rank's files; rank 0 passes the model, optimizer, scheduler, progress and history as well."""
    torch.save(rng_state(device), os.path.join(directory, rng_file(rank)))
    if rank != 0:
        return
    import open_clip

    from veclip.train.model import register_configs

    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        os.path.join(directory, STATE_FILE),
    )
    register_configs()
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump({"name": model_name, "model_cfg": open_clip.get_model_config(model_name)}, f)
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
        json.dump(progress.to_dict(), f, indent=1)
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in history)


def load_state(directory: str) -> dict:
    """Our checkpoints load with ``weights_only=True``: tensors and plain data only."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def load_rng(directory: str, rank: int) -> dict | None:
    path = os.path.join(directory, rng_file(rank))
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None


def load_progress(directory: str) -> Progress | None:
    path = os.path.join(directory, PROGRESS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return Progress.from_dict(json.load(f))


def load_history(directory: str) -> list[dict]:
    with open(os.path.join(directory, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- reading checkpoints where they are stored -------------------------------------------------


def latest(location: Location) -> Location:
    """``location`` itself if it is a checkpoint, else its run's newest ``checkpoint_*`` folder."""
    if location.fs.exists(location.join(STATE_FILE)):
        return location
    if not location.fs.isdir(location.path):
        raise FileNotFoundError(f"no checkpoint or training run folder at {location.url}")
    names = sorted(
        posixpath.basename(e["name"])
        for e in location.fs.ls(location.path, detail=True)
        if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint_")
    )
    if not names:
        raise FileNotFoundError(f"{location.url} holds no checkpoint_* folder")
    return location.child(names[-1])


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # an open_clip model name; no path in it


@dataclass(frozen=True)
class SavedModel:
    """A checkpoint's model: open_clip name and config, weights, and the step it was saved at."""

    checkpoint: str
    name: str
    config: dict
    weights: dict
    step: int

    def create(self):
        """The open_clip model with these weights, its eval preprocessing and tokenizer (CPU, eval mode)."""
        import tempfile

        import open_clip

        from veclip.train.model import register_configs

        register_configs()
        if not MODEL_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"{self.checkpoint}: the model name {self.name!r} is not a model name")
        if self.name not in open_clip.list_models():  # a config this installation does not ship
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, f"{self.name}.json"), "w") as f:
                    json.dump(self.config, f)
                open_clip.add_model_config(folder)
        model, _, preprocess = open_clip.create_model_and_transforms(self.name, load_weights=False)
        model.load_state_dict(self.weights)
        return model.eval(), preprocess, open_clip.get_tokenizer(self.name)


def read_model(url: str, options: StorageOptions | None = None) -> SavedModel:
    """The model of a checkpoint, or of a run's latest one, read into memory."""
    source = latest(Location(url, options or StorageOptions()))
    state = torch.load(io.BytesIO(source.fs.cat_file(source.join(STATE_FILE))), map_location="cpu", weights_only=True)
    info = json.loads(source.fs.cat_file(source.join(MODEL_CONFIG_FILE)))
    if not isinstance(info.get("name"), str) or not MODEL_NAME.fullmatch(info["name"]):
        # the name becomes a file name on every score and eval actor: `../../x` or `/etc/x` would write there
        raise ValueError(f"{source.url}: the checkpoint's model name {info.get('name')!r} is not a model name")
    progress = Progress.from_dict(json.loads(source.fs.cat_file(source.join(PROGRESS_FILE))))
    return SavedModel(source.url, info["name"], info["model_cfg"], state["model"], progress.step)


def metric_history(run: str, options: StorageOptions | None = None) -> list[dict]:
    """Every step's metrics, from the run's latest checkpoint."""
    checkpoint = latest(Location(run, options or StorageOptions()))
    text = checkpoint.fs.cat_file(checkpoint.join(METRICS_FILE)).decode()
    return [json.loads(line) for line in text.splitlines() if line]
