"""The per-worker training loop (runs inside Ray Train workers).

Each step: a batch streams in from this worker's Ray Data shard, the caption
slot is chosen per sample for this epoch, images are normalised on the
device, and open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``
gives the contrastive loss over the global batch. Every step's metrics are
kept (and saved with each checkpoint as ``metrics.jsonl``); they go out through
``ray.train.report`` every ``report_every`` steps (a sync point); every ``checkpoint_every`` steps and at the
end rank 0 attaches a checkpoint (model, optimizer, scheduler, counters, RNG,
metric history). A restarted worker group resumes from the latest one and
stops at the same planned step count.

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
import tempfile
import time

import torch

from veclip.train.captions import choose
from veclip.train.config import TrainConfig

STATE_FILE = "state.pt"
MODEL_CONFIG_FILE = "model.json"
METRICS_FILE = "metrics.jsonl"


class InjectedFailure(RuntimeError):
    """Raised on purpose by tests (``fail_at_step``) to exercise recovery."""


def _save(directory: str, model, optimizer, scheduler, counters: dict, history: list[dict], config: TrainConfig) -> None:
    from veclip.train.model import register_configs

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "counters": counters,
        "rng": torch.get_rng_state(),
    }
    torch.save(state, os.path.join(directory, STATE_FILE))
    import open_clip

    register_configs()
    model_cfg = {"name": config.model, "model_cfg": open_clip.get_model_config(config.model)}
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_cfg, f)
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in history)


def load_state(directory: str) -> dict:
    """Our checkpoints load with ``weights_only=True``: tensors and plain data only."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(config: TrainConfig) -> None:
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss

    from veclip.train.model import cosine_with_warmup, create_model, param_groups, peak_flops, train_flops_per_sample

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    device = ray.train.torch.get_device()

    model = create_model(config.model, config.pretrained)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    flops = train_flops_per_sample(model, model.visual.image_size[0], model.context_length)
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay), lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
    )
    scheduler = cosine_with_warmup(optimizer, config.optim.warmup_steps, config.steps)
    counters = {"step": 0, "epoch": 0, "samples_seen": 0, "resumed_from_step": None}
    history: list[dict] = []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # Each rank downloads its own copy: Ray's shared `as_directory` lets one rank delete
        # the copy while another on the same node still waits for it ("... does not exist").
        with tempfile.TemporaryDirectory() as directory:
            checkpoint.to_directory(directory)
            state = load_state(directory)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            counters = {**state["counters"], "resumed_from_step": state["counters"]["step"]}
            torch.set_rng_state(state["rng"])
            with open(os.path.join(directory, METRICS_FILE)) as f:
                history = [json.loads(line) for line in f]
        counters["epoch"] += 1  # restart the data at a fresh pass

    model = ray.train.torch.prepare_model(model)  # DDP + device
    raw_model = model.module if hasattr(model, "module") else model
    if config.compile:
        model = torch.compile(model)
    mean, std = mean.to(device), std.to(device)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
    weights = config.captions.slot_weights()
    peak = peak_flops(device)
    shard = ray.train.get_dataset_shard("train")

    while counters["step"] < config.steps:
        epoch, batches = counters["epoch"], 0
        wait_start, report_seconds = time.perf_counter(), 0.0
        for batch in shard.iter_torch_batches(
            batch_size=config.batch_size, drop_last=True, prefetch_batches=config.prefetch_batches,
            local_shuffle_buffer_size=config.shuffle_buffer or None, local_shuffle_seed=config.seed + 7919 * epoch + rank,
            dtypes=None, device="cpu",
        ):
            step_start = time.perf_counter()
            batches += 1
            step = counters["step"]
            if config.fail_at_step is not None and step == config.fail_at_step and counters["resumed_from_step"] is None and rank == min(1, world - 1):
                raise InjectedFailure(f"injected failure at step {step} on rank {rank}")
            slots = choose(batch["key_hash"].numpy(), batch["present"].numpy(), batch["usable"].numpy(), weights, config.seed, epoch)
            texts = batch["tokens"][torch.arange(len(slots)), torch.from_numpy(slots)].long().to(device)
            images = (batch["image"].to(device).float() / 255.0 - mean) / std
            with autocast():
                image_features, text_features, logit_scale = model(images, texts)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                raw_model.logit_scale.clamp_(0, math.log(100))  # as open_clip does
            if device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()

            counters.update(step=step + 1, samples_seen=counters["samples_seen"] + config.batch_size * world)
            # wall time of this step since the previous one ended: data wait, reporting, compute
            step_seconds, wait_seconds = end - step_start, step_start - wait_start - report_seconds
            per_worker = config.batch_size / (end - wait_start)
            metrics = {
                "step": step + 1,
                "epoch": epoch,
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "logit_scale": float(raw_model.logit_scale.exp().detach()),
                "samples_per_s": per_worker * world,
                "samples_per_s_per_worker": per_worker,
                "data_wait_share": wait_seconds / (end - wait_start),
                "report_share": report_seconds / (end - wait_start),
                "step_seconds": step_seconds,
                "samples_seen": counters["samples_seen"],
                "mfu": flops * per_worker / peak if peak else None,
                "train_flops_per_sample": flops,
                "resumed_from_step": counters["resumed_from_step"],
            }
            history.append(metrics)
            last = counters["step"] >= config.steps
            wait_start = time.perf_counter()
            if last or counters["step"] % config.checkpoint_every == 0:
                with tempfile.TemporaryDirectory() as directory:
                    checkpoint = None
                    if rank == 0:
                        _save(directory, raw_model, optimizer, scheduler, counters, history, config)
                        checkpoint = ray.train.Checkpoint.from_directory(directory)
                    ray.train.report(metrics, checkpoint=checkpoint)
            elif counters["step"] % config.report_every == 0:
                ray.train.report(metrics)  # a sync point: costly on CPU, so not every step
            report_seconds = time.perf_counter() - wait_start
            if last:
                return
        if batches == 0:
            raise RuntimeError(
                f"train: epoch {epoch} gave worker {rank} no full batch: the data has fewer usable rows than "
                f"batch_size x workers ({config.batch_size} x {world}); lower --set batch_size or add data"
            )
        counters["epoch"] += 1

