"""Ray Train wiring: a ``TorchTrainer`` over the Ray Data pipeline, resumable by name.

Resume is Ray Train V2's: rerunning with the same ``RunConfig(name,
storage_path)`` picks up the latest checkpoint, and ``FailureConfig`` restarts
a failed worker group from it; the loop makes it exact (see
:mod:`veclip.train.loop`). The run summary (last metrics, rows passed over by
reason, shards left out, the resumes and where each went on from, the
checkpoint path) is returned and written to ``<output>/<name>/summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from veclip.command import DryRun, Said
from veclip.config import redact
from veclip.console import start_ray
from veclip.shards.lease import OutputLease
from veclip.storage import Location, StorageOptions, refuse_overlap, write_json
from veclip.train.checkpoint import PROGRESS_FILE, RUN_FILE, RUN_SUMMARY_FILE, Progress, latest
from veclip.train.config import TrainConfig
from veclip.train.data import plan_data
from veclip.train.live import LiveProgress
from veclip.train.loop import TrainHooks, train_loop
from veclip.train.resumes import render_resume
from veclip.train.summary import TrainSummary
from veclip.train.tracking import Trackers


def run_train(
    config: TrainConfig, options: StorageOptions | None = None, log=print, hooks: TrainHooks | None = None
) -> dict:
    options = options or StorageOptions()
    config.validate_for_run()
    refuse_overlap("train", config.output, [config.input, *config.add_captions], options)
    lease = OutputLease(Location(config.output, options).child(config.name), uuid.uuid4().hex[:12], hint=WAIT_HINT)
    lease.acquire()  # one run writes a run folder: a second `veclip train` into it is refused, told who holds it
    try:
        return _run_train(config, options, log, hooks)
    finally:
        lease.release()


WAIT_HINT = "Wait for that run to finish, or train under another --name."


def _run_train(config: TrainConfig, options: StorageOptions, log, hooks: TrainHooks | None) -> dict:
    start_ray(log)
    start = time.perf_counter()
    plan = plan_data(
        config.input, options, config.columns, config.scale.num_workers, config.add_captions, log, config.accept
    )
    output = Location(config.output, options)
    scale = config.scale
    write_json(
        output.fs,
        output.join(config.name, RUN_FILE),
        {  # for `veclip status` while it runs
            "steps": config.steps,
            "batch_size": config.images_per_step,
            "num_workers": scale.num_workers,
            "model": config.model,
            "input": config.input,
            "caption_mode": config.captions.mode,
            "started_at": time.time(),
        },
    )
    k = config.captions.per_image
    several = f" x {k} captions each (multi-positive)" if k > 1 else ""
    log(
        f"train: {config.model} on {scale.num_workers} workers, {config.steps} steps of {config.images_per_step} "
        f"images/worker{several}, "
        f"captions {config.captions.mode}; {len(plan.units)} row groups in {plan.shards} shards"
    )
    trackers = Trackers(config.tracking, output.child(config.name), config.name, redact(dataclasses.asdict(config)))
    try:
        with LiveProgress(config.steps, config.images_per_step * scale.num_workers, log, on_step=trackers.log) as board:
            result = _trainer(config, plan, output, hooks, board).fit()
    finally:
        trackers.close()
    if result.error:
        raise result.error
    progress = _read_progress(result.checkpoint)
    summary = TrainSummary(
        config=redact(dataclasses.asdict(config)),
        name=config.name,
        model=config.model,
        caption_mode=config.captions.mode,
        metrics=result.metrics,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        rows_skipped_by_reason=progress.rows_skipped() if progress else {},
        shards_skipped_by_reason=plan.shards_skipped,
        resumes=progress.resumes if progress else [],
        wall_seconds=time.perf_counter() - start,
    ).to_json()
    write_json(output.fs, output.join(config.name, RUN_SUMMARY_FILE), summary)
    return summary


def dry_run_train(config: TrainConfig, options: StorageOptions | None = None) -> dict:
    """What ``run_train`` would do now: the same validation and data plan (footers only), the workers it
    asks for and the checkpoint it would resume from, with no Ray and nothing written."""
    options = options or StorageOptions()
    config.validate_for_run()
    refuse_overlap("train", config.output, [config.input, *config.add_captions], options)
    plan = plan_data(
        config.input, options, config.columns, config.scale.num_workers, config.add_captions, print, config.accept
    )
    run = Location(config.output, options).child(config.name)
    try:
        checkpoint = latest(run)
        progress = Progress.from_dict(json.loads(checkpoint.fs.cat_file(checkpoint.join(PROGRESS_FILE))))
        resume = f"step {progress.step} of {config.steps} ({checkpoint.url})"
    except FileNotFoundError:
        resume = None
    rows = sum(u.rows for u in plan.units)
    scale, per_step = config.scale, config.images_per_step * config.scale.num_workers
    return {
        "stage": "train",
        "run": run.url,
        "model": config.model,
        "captions": config.captions.mode,
        "steps": config.steps,
        "global_batch": per_step,
        "shards": plan.shards,
        "read_units": len(plan.units),
        "rows": rows,
        "epochs": round(config.steps * per_step / max(rows, 1), 2),
        "shards_skipped": plan.shards_skipped,
        "workers": {
            "count": scale.num_workers,
            "gpus_each": 1 if scale.use_gpu else 0,
            "cpus_each": scale.cpus_per_worker,
            **({"accelerator_type": scale.accelerator_type} if scale.accelerator_type else {}),
        },
        "resumes_from": resume,
    }


def render_dry_run(report: dict) -> str:
    workers = ", ".join(f"{k} {v}" for k, v in report["workers"].items())
    return "\n".join(
        [
            "train --dry-run: nothing was started or written",
            f"  {report['model']}, captions {report['captions']}, {report['steps']} steps x {report['global_batch']} "
            f"images: {report['epochs']} epochs of {report['rows']} rows ({report['shards']} shards, "
            f"{report['read_units']} read units)",
            f"  workers: {workers}",
            f"  run {report['run']}: "
            + (f"resumes from {report['resumes_from']}" if report["resumes_from"] else "starts from step 0"),
            *[f"  shards skipped: {n} ({why})" for why, n in report["shards_skipped"].items()],
        ]
    )


def _trainer(config: TrainConfig, plan, output: Location, hooks: TrainHooks | None, board):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scale = config.scale
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config,
            "plan": ray.put(plan),
            "hooks": hooks,
            "board": board,
            "attempt": uuid.uuid4().hex[:12],  # this invocation: a resume by another one is a rerun
        },
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})},
            accelerator_type=scale.accelerator_type,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=output.path,
            storage_filesystem=output.arrow_fs,
            # a node drained for preemption (spot) counts apart from real failures (Ray's default: no limit)
            failure_config=FailureConfig(
                max_failures=scale.max_failures, max_preemption_failures=scale.max_preemption_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
    )


def _read_progress(checkpoint) -> Progress | None:
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{PROGRESS_FILE}") as f:
        return Progress.from_dict(json.loads(f.read()))


def run_command(config: TrainConfig, options: StorageOptions, run: DryRun) -> Said:
    """``veclip train``: the dry run's plan, or the run's summary."""
    if run.dry_run:
        return Said(render_dry_run(dry_run_train(config, options)))
    return Said(render_summary(run_train(config, options)))


def run_samples_per_s(written: dict) -> float:
    """Wall-clock throughput of the whole run, start-up and every pass's first wait included."""
    return TrainSummary.from_json(written).samples_per_s


def render_summary(written: dict) -> str:
    """The printed summary of a training run's summary.json."""
    summary = TrainSummary.from_json(written)
    m = summary.metrics or {}
    skipped = ", ".join(f"{n} {r}" for r, n in summary.rows_skipped_by_reason.items()) or "none"
    return (
        f"train ({summary.model}, captions {summary.caption_mode}): step {m.get('step')} loss "
        f"{m.get('loss', float('nan')):.4f} "
        f"logit scale {m.get('logit_scale', float('nan')):.2f}; {summary.samples_per_s:.0f} samples/s over the run "
        f"(last step {m.get('samples_per_s', 0):.0f}, data wait {m.get('data_wait_share', 0):.0%}); rows skipped: "
        f"{skipped}; {summary.wall_seconds:.1f}s\n"
        f"  checkpoint: {summary.checkpoint}"
        + "".join(f"\n  shards skipped: {n} ({why})" for why, n in summary.shards_skipped_by_reason.items())
        + "".join(f"\n  {render_resume(r)}" for r in summary.resumes)
    )
