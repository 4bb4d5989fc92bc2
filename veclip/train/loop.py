"""The per-worker training loop (runs inside Ray Train workers).

Each step: this worker's next batch comes from its exact, ordered stream
(:mod:`veclip.train.data`), the caption slot is chosen per sample for this
epoch, images are normalised on the device, and open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)`` gives the contrastive loss
over the global batch. Every step's metrics are kept (saved with each
checkpoint); they go out through ``ray.train.report`` every ``report_every``
steps (a sync point). Every ``checkpoint_every`` steps and at the end all
ranks report one checkpoint (:mod:`veclip.train.checkpoint`): the model and
optimizer, each worker's place in its epoch, and each worker's RNG.

Resume is exact: a restarted worker group (or a rerun with the same name)
loads the latest checkpoint and every worker reads on from its recorded place,
so the run trains on the same batches, in the same order, as one that never
stopped. A checkpoint from a different worker count resumes at the next epoch
instead, and the summary says so.

No gradient accumulation: the contrastive loss couples every pair in the
batch, so summing gradients of small batches is not the same objective. The
global batch is ``batch_size x num_workers`` instead (open_clip's accum_freq
feature caching would be the way to add it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from veclip.console import alive_nodes
from veclip.metrics import publish_step
from veclip.train import checkpoint as ckpt
from veclip.train.augment import decode_on_device, device_crop_for
from veclip.train.checkpoint import Progress, WorkerProgress
from veclip.train.config import TrainConfig
from veclip.train.data import (
    Batch,
    DataPlan,
    StreamSpec,
    epochs_to_read,
    exact_batches,
    worker_stream,
)
from veclip.train.order import Position
from veclip.train.resumes import render_resume, resume_cause


@dataclass(frozen=True)
class TrainHooks:
    """Test and audit hooks, outside the run's config (``run_train(..., hooks=...)``)."""

    kill_at_step: int | None = None  # the rank-1 (or 0) worker process kills itself (SIGKILL) once, before this step
    sample_log: str | None = None  # a local folder: each worker logs every step's sample keys and caption slots

    def before_step(self, step: int, rank: int, world: int, resumed: bool) -> None:
        if self.kill_at_step == step and not resumed and rank == min(1, world - 1):
            os.kill(os.getpid(), signal.SIGKILL)  # as a lost node or an OOM kill would

    def after_step(self, step: int, epoch: int, rank: int, key_hashes, slots) -> None:
        """``slots``: per sample, the caption slot(s) it trained with (indices into ``CaptionConfig.slots``)."""
        if self.sample_log:
            os.makedirs(self.sample_log, exist_ok=True)
            record = {"step": step, "epoch": epoch, "key_hash": [int(k) for k in key_hashes], "slot": slots.tolist()}
            with open(os.path.join(self.sample_log, f"rank-{rank}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


def resume_point(
    saved: Progress, rank: int, world: int, path: str, data_plan: str | None = None, cause: str = ""
) -> tuple[Progress, WorkerProgress]:
    """The progress to go on from (with this resume and its ``cause`` recorded) and this worker's part of it.
    Exact when the worker count and the data plan (``data_plan``: the fingerprint of the read units) are the
    checkpoint's."""
    record = {
        "from_step": saved.step,
        "checkpoint": path,
        "cause": cause,
        "workers": [w.to_dict() for w in saved.workers],
    }
    plan_changed = data_plan is not None and saved.data_plan is not None and saved.data_plan != data_plan
    if len(saved.workers) == world and not plan_changed:
        resumed = Progress(saved.step, saved.samples_seen, saved.resumes + [{**record, "exact": True}], [], data_plan)
        return resumed, saved.workers[rank]
    # Another worker count, or other data (shards finished or left out since), deals the rows differently:
    # go on at the next epoch. The rows skipped so far are kept on rank 0.
    epoch = max((w.position.epoch for w in saved.workers), default=-1) + 1
    why = (
        f"the worker count changed from {len(saved.workers)} to {world}"
        if len(saved.workers) != world
        else "the data or its order changed since the checkpoint (other shards finished, a footer unread, another "
        "seed or window_units)"
    ) + f": resumed at the start of epoch {epoch}"
    mine = WorkerProgress(Position(epoch), saved.rows_skipped() if rank == 0 else {})
    resumed = Progress(
        saved.step, saved.samples_seen, saved.resumes + [{**record, "exact": False, "why": why}], [], data_plan
    )
    return resumed, mine


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


STREAM_END = 2**62  # the "epoch" of a stream that has ended


def _epoch_range(epoch: int, world: int, device: torch.device) -> tuple[int, int]:
    """The lowest and highest next-batch epoch over the workers (one all-reduce)."""
    if world == 1:
        return epoch, epoch
    import torch.distributed as dist

    both = torch.tensor([-epoch, epoch], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -int(both[0]), int(both[1])


def _next_common(batches, world: int, device: torch.device) -> Batch | None:
    """Every worker's next batch, all of one epoch; None for all when a worker's stream has ended.

    The workers must take the same steps, so an epoch ends for all when the first runs out of it:
    the others pass over the rest of theirs (a few row groups' worth, a different few each epoch).
    Every stream covers the same epochs, so one that has ended has ended the last of them.
    """
    batch = next(batches, None)
    while True:
        low, high = _epoch_range(batch.epoch if batch else STREAM_END, world, device)
        if high == STREAM_END:
            return None
        if low == high:
            return batch
        while batch is not None and batch.epoch < high:
            batch = next(batches, None)


@dataclass
class _Worker:
    """One Ray Train worker's training state: what each step and checkpoint reads and updates."""

    config: TrainConfig
    hooks: TrainHooks
    board: object  # the driver's live progress line (veclip.train.live), or None
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped (and compiled) once prepared
    raw_model: torch.nn.Module  # the open_clip model itself: its state is what is saved
    optimizer: torch.optim.Optimizer
    scheduler: object
    flops: float  # training FLOPs per sample
    mean: torch.Tensor
    std: torch.Tensor
    progress: Progress = field(default_factory=Progress)
    me: WorkerProgress = field(default_factory=WorkerProgress)
    history: list = field(default_factory=list)
    resumed_from: int | None = None
    loss_fn: object = None
    autocast: object = contextlib.nullcontext
    peak: float | None = None
    device_crop: object = None

    @property
    def per_step(self) -> int:
        return self.config.images_per_step


def _build(config: TrainConfig, hooks: TrainHooks, board) -> _Worker:
    """The model, its optimizer and schedule, on this worker (seeded per rank)."""
    import ray.train
    import ray.train.torch

    from veclip.train.model import adamw, cosine_with_warmup, create_model, train_flops_per_sample

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    torch.set_num_threads(
        config.scale.torch_threads or max(1, int(config.scale.cpus_per_worker))
    )  # Ray would give it 1
    device = ray.train.torch.get_device()
    model = create_model(config.model, config.pretrained)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    flops = train_flops_per_sample(model, model.visual.image_size[0], model.context_length, config.captions.per_image)
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    optimizer = adamw(model, config.optim, device)
    scheduler = cosine_with_warmup(optimizer, config.optim.warmup_for(config.steps), config.steps)
    return _Worker(config, hooks, board, rank, world, device, model, model, optimizer, scheduler, flops, mean, std)


def _restarted_from_the_start(w: _Worker) -> None:
    """A group restarted before Ray committed any checkpoint goes on from step 0: recorded as every restart is
    (it reaches the summary with the next checkpoint), with its cause."""
    import ray

    lost = ray.get(w.board.nodes_seen.remote()) - alive_nodes()
    record = {"from_step": 0, "checkpoint": None, "cause": "node lost" if lost else "worker died", "exact": True}
    w.progress.resumes.append({**record, "workers": []})
    w.resumed_from = 0
    print(f"train: worker {w.rank} restarts from step 0 ({record['cause']}; no checkpoint had been committed)")
    if w.rank == 0:
        w.board.say.remote(f"train: {render_resume(w.progress.resumes[-1])}")


def _resume(w: _Worker) -> None:
    """Load the latest checkpoint Ray Train hands this worker, if any: weights, optimizer, history, place, RNG."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    earlier = 0
    if w.board is not None:
        earlier = ray.get(w.board.joined.remote(w.rank, ray.get_runtime_context().get_node_id()))
    if not checkpoint:
        if earlier:
            _restarted_from_the_start(w)
        return
    # Each rank downloads its own copy: Ray's shared `as_directory` lets one rank delete
    # the copy while another on the same node still waits for it ("... does not exist").
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.to_directory(directory)
        state = ckpt.load_state(directory)
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        w.history = ckpt.load_history(directory)
        saved, attempt = ckpt.load_progress(directory), w.progress.attempt
        cause = resume_cause(saved, attempt, alive_nodes())
        w.progress, w.me = resume_point(saved, w.rank, w.world, checkpoint.path, w.progress.data_plan, cause)
        w.progress.attempt = attempt
        rng = ckpt.load_rng(directory, w.rank)
    if rng is not None and w.progress.resumes[-1]["exact"]:
        ckpt.set_rng_state(rng, w.device)
    w.resumed_from = w.progress.step
    resume = w.progress.resumes[-1]
    print(
        f"train: worker {w.rank} resumes ({resume['cause']}) at step {w.progress.step}, epoch "
        f"{w.me.position.epoch}, window {w.me.position.window}, row {w.me.position.offset} "
        f"({'exact' if resume['exact'] else resume['why']})"
    )
    if w.rank == 0 and w.board is not None and resume["cause"] != "rerun":
        w.board.say.remote(f"train: {render_resume(resume)}")


def _prepare(w: _Worker) -> None:
    """DDP and the device; precision, the loss over the global batch, the device's peak FLOPs."""
    import ray.train.torch
    from open_clip.loss import ClipLoss

    from veclip.train.loss import MultiPositiveClipLoss
    from veclip.train.model import peak_flops

    config = w.config
    w.model = ray.train.torch.prepare_model(w.model)  # DDP + device
    w.raw_model = w.model.module if hasattr(w.model, "module") else w.model
    if config.compile:
        w.model = torch.compile(w.model)
    w.mean, w.std = w.mean.to(w.device), w.std.to(w.device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and w.device.type == "cuda")
    if use_bf16:
        w.autocast = lambda: torch.autocast(w.device.type, dtype=torch.bfloat16)
    gathered = dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=w.rank, world_size=w.world)
    k = config.captions.per_image
    w.loss_fn = MultiPositiveClipLoss(k, **gathered) if k > 1 else ClipLoss(**gathered)
    w.peak = peak_flops(w.device)
    w.device_crop = device_crop_for(config.model) if config.decode == "device" else None


def _stream_spec(config: TrainConfig) -> StreamSpec:
    return StreamSpec(
        config.model,
        config.captions,
        config.image_limits,
        config.seed,
        config.window_units,
        config.scale.preprocess_cpus,
        config.prefetch_batches,
        config.decode,
    )


def _optimize(w: _Worker, batch: Batch) -> torch.Tensor:
    """One optimizer step on the batch; its loss."""
    rows = batch.rows
    # each row's caption(s) for this epoch, chosen in the stream; K per image: image-major, as the loss expects
    texts = torch.from_numpy(rows["tokens"]).long().to(w.device).flatten(0, -2)
    images = torch.from_numpy(rows["image"]).to(w.device)
    if w.device_crop is not None:  # the JPEGs the stream left encoded (decode=device)
        decode_on_device(images, rows["jpeg"], rows["box"], np.flatnonzero(rows["on_device"]), w.device_crop)
    images = (images.float() / 255.0 - w.mean) / w.std
    with w.autocast():
        image_features, text_features, logit_scale = w.model(images, texts)[:3]
        loss = w.loss_fn(image_features, text_features, logit_scale)
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if w.config.optim.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), w.config.optim.grad_clip_norm)
    w.optimizer.step()
    w.scheduler.step()
    with torch.no_grad():
        w.raw_model.logit_scale.clamp_(0, math.log(100))  # as open_clip does
    if w.device.type == "cuda":
        torch.cuda.synchronize()
    return loss


def _step_metrics(
    w: _Worker, epoch: int, loss: torch.Tensor, wait_start: float, step_start: float, end: float, report_seconds: float
) -> dict:
    """The step's figures: wall time since the previous step ended is data wait, reporting and compute."""
    step_seconds, wait_seconds = end - step_start, step_start - wait_start - report_seconds
    per_worker = w.per_step / (end - wait_start)
    return {
        "step": w.progress.step,
        "epoch": epoch,
        "loss": float(loss.detach()),
        "lr": w.scheduler.get_last_lr()[0],
        "logit_scale": float(w.raw_model.logit_scale.exp().detach()),
        "samples_per_s": per_worker * w.world,
        "samples_per_s_per_worker": per_worker,
        "data_wait_share": wait_seconds / (end - wait_start),
        "report_share": report_seconds / (end - wait_start),
        "step_seconds": step_seconds,
        "samples_seen": w.progress.samples_seen,
        "mfu": w.flops * per_worker / w.peak if w.peak else None,
        "train_flops_per_sample": w.flops,
        "resumed_from_step": w.resumed_from,
        "time": time.time(),  # the step's end, wall clock: throughput over any span of steps
    }


def _checkpoint(w: _Worker, metrics: dict) -> None:
    """All ranks report one checkpoint, and wait until Ray has committed it."""
    import ray
    import ray.train

    node = ray.get_runtime_context().get_node_id()
    gathered = _gather({**w.me.to_dict(), "node": node}, w.world)
    w.progress.workers = [WorkerProgress.from_dict(d) for d in gathered]
    with tempfile.TemporaryDirectory() as directory:
        ckpt.save(
            directory,
            w.rank,
            w.device,
            model=w.raw_model,
            optimizer=w.optimizer,
            scheduler=w.scheduler,
            progress=w.progress,
            history=w.history,
            model_name=w.config.model,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    # Until Ray's controller has committed it, a worker lost now would restart the
    # group from an older checkpoint: wait, so "saved at step N" means resumable at N.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _preemption_notice(w: _Worker) -> bool:
    """Whether a node of this worker group has just been told it will be preempted (a spot notice, a drain):
    asked of Ray Train every ``scale.preemption_check_every`` steps (a barrier: every rank asks), heeded once."""
    import ray.train

    every = w.config.scale.preemption_check_every
    if not every or w.progress.step % every or w.progress.preempted is not None:
        return False
    info = ray.train.get_preemption_info()
    if info is None:
        return False
    w.progress.preempted = {
        "nodes": info.preempted_node_ids,
        "ranks": info.preempted_ranks,
        "deadline_ms": info.deadline_ms,
        "at_step": w.progress.step,
    }
    return True


def _tell_preemption(w: _Worker) -> None:
    """Rank 0 tells the console the notice and the checkpoint it has committed for it."""
    notice = w.progress.preempted
    if w.rank == 0 and w.board is not None:
        left = f", {notice['deadline_ms'] / 1000 - time.time():.0f} s before it goes" if notice["deadline_ms"] else ""
        nodes = ", ".join(n[:8] + "…" for n in notice["nodes"])
        w.board.say.remote(
            f"train: node {nodes} (ranks {notice['ranks']}) is being preempted{left}: checkpoint saved at step "
            f"{notice['at_step']}; the worker group restarts from it when the node goes"
        )


def _report(w: _Worker, metrics: dict, now: bool = False) -> None:
    """A checkpoint every ``checkpoint_every`` steps, at the end and when ``now`` (all ranks), else metrics every
    ``report_every``."""
    import ray.train

    config = w.config
    if now or w.progress.step >= config.steps or w.progress.step % config.checkpoint_every == 0:
        _checkpoint(w, metrics)
    elif w.progress.step % config.report_every == 0:
        ray.train.report(metrics)  # a sync point: costly on CPU, so not every step


def _train_stream(w: _Worker, batches) -> int:
    """Train on the stream's batches until it ends or the run is done; the steps taken."""
    stream_steps = 0
    wait_start, report_seconds = time.perf_counter(), 0.0
    while w.progress.step < w.config.steps:
        batch = _next_common(batches, w.world, w.device)
        if batch is None:
            break
        step_start = time.perf_counter()
        step, epoch = w.progress.step, batch.epoch
        w.hooks.before_step(step, w.rank, w.world, w.resumed_from is not None)
        loss = _optimize(w, batch)
        end = time.perf_counter()

        stream_steps += 1
        w.progress.step, w.progress.samples_seen = step + 1, w.progress.samples_seen + w.per_step * w.world
        w.me.position = batch.position
        for reason, n in batch.skipped.items():
            w.me.skipped[reason] = w.me.skipped.get(reason, 0) + n
        w.hooks.after_step(w.progress.step, epoch, w.rank, batch.rows["key_hash"], batch.rows["slot"])
        metrics = _step_metrics(w, epoch, loss, wait_start, step_start, end, report_seconds)
        w.history.append(metrics)
        publish_step(w.config.name, w.rank, metrics, w.per_step)
        if w.rank == 0 and w.board is not None:
            w.board.post.remote(metrics)
        wait_start = time.perf_counter()
        if _preemption_notice(w):
            _report(w, metrics, now=True)
            _tell_preemption(w)
        else:
            _report(w, metrics)
        report_seconds = time.perf_counter() - wait_start
    return stream_steps


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: build, resume, then train stream after stream until ``steps``."""
    import ray

    config: TrainConfig = loop_config["config"]
    plan: DataPlan = ray.get(loop_config["plan"])
    w = _build(config, loop_config.get("hooks") or TrainHooks(), loop_config.get("board"))
    spec = _stream_spec(config)
    w.progress.data_plan = plan.fingerprint(spec.seed, spec.window_units)  # saved with every checkpoint; checked
    w.progress.attempt = loop_config.get("attempt")  # a resume by another invocation is a rerun
    _resume(w)
    _prepare(w)
    while w.progress.step < config.steps:
        start = w.me.position
        epochs = epochs_to_read(plan, spec, w.per_step, config.steps - w.progress.step, w.world)
        stream = worker_stream(plan, spec, start, w.rank, w.world, epochs)
        blocks = (
            stream.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=config.prefetch_batches)
            if stream
            else iter(())
        )
        stream_steps = _train_stream(w, exact_batches(blocks, w.per_step))
        if w.progress.step >= config.steps:
            return
        if stream_steps == 0 and start == Position(start.epoch):
            raise RuntimeError(
                f"train: epoch {start.epoch} gave the workers no full batch: the data has fewer usable rows than "
                f"batch_size x workers ({w.per_step} x {w.world}); lower --set batch_size or add data"
            )
        w.me.position = Position(start.epoch + epochs)  # the stream's epochs are all read
