"""Ray Train wiring: a ``TorchTrainer`` over the Ray Data pipeline, resumable by name.

Resume is Ray Train V2's: rerunning with the same ``RunConfig(name,
storage_path)`` picks up the latest checkpoint, and ``FailureConfig`` restarts
a failed worker group from it. The run summary (last metrics, rows dropped
before training by reason, the checkpoint path) is returned and written to
``<output>/<name>/summary.json``.
"""

from __future__ import annotations

import json
import time

from veclip.storage import Location, StorageOptions
from veclip.train.config import TrainConfig
from veclip.train.data import SkipCounter, build_dataset, counter_name
from veclip.train.loop import train_loop


def run_train(config: TrainConfig, options: StorageOptions | None = None, log=print) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    options = options or StorageOptions()
    config.validate_for_run()
    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    counter = ray.remote(SkipCounter).options(name=counter_name(config.name), get_if_exists=True).remote()
    dataset, shards_skipped = build_dataset(
        config.data, options, config.columns, config.model, config.captions, config.image_limits, config.seed,
        counter_name(config.name), num_cpus=config.scale.preprocess_cpus, log=log,
    )
    if config.materialize_data:
        dataset = dataset.materialize()
    output = Location(config.output, options)
    scale = config.scale
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers, use_gpu=scale.use_gpu, resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})},
            accelerator_type=scale.accelerator_type,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=output.path,
            storage_filesystem=output.arrow_fs,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
    )
    log(f"train: {config.model} on {scale.num_workers} workers, {config.steps} steps of {config.batch_size}/worker, captions {config.captions.mode}")
    result = trainer.fit()
    if result.error:
        raise result.error
    skipped = ray.get(counter.get.remote())
    ray.kill(counter)
    summary = {
        "name": config.name,
        "model": config.model,
        "caption_mode": config.captions.mode,
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "rows_skipped_by_reason": skipped,
        "shards_skipped_by_reason": shards_skipped,
        "wall_seconds": time.perf_counter() - start,
    }
    summary_path = output.join(config.name, "summary.json")
    output.fs.pipe_file(summary_path, json.dumps(summary, indent=1, default=str).encode())
    return summary


def render_summary(summary: dict) -> str:
    m = summary["metrics"] or {}
    skipped = ", ".join(f"{n} {r}" for r, n in summary["rows_skipped_by_reason"].items()) or "none"
    return (
        f"train ({summary['model']}, captions {summary['caption_mode']}): step {m.get('step')} loss {m.get('loss', float('nan')):.4f} "
        f"logit scale {m.get('logit_scale', float('nan')):.2f}, {m.get('samples_per_s', 0):.1f} samples/s, "
        f"data wait {m.get('data_wait_share', 0):.0%}; rows skipped: {skipped}; {summary['wall_seconds']:.1f}s\n"
        f"  checkpoint: {summary['checkpoint']}"
        + "".join(f"\n  shards skipped: {n} ({why})" for why, n in summary.get("shards_skipped_by_reason", {}).items())
    )
