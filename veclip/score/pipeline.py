"""``veclip score``, the caption gate: every caption's image-text score, over a Ray Data actor pool.

The input is what training reads (shards with captions, or caption outputs
joined to their images by key: :func:`veclip.dataset.open_dataset`); the
output is a caption output of the same images: one score table per image
shard, every row in order, with each caption slot's cosine under the model,
its provenance and a ``<slot>:low_clip_score`` flag where the gate says no.
Training reads it with ``--add-captions`` and treats flagged slots as
unusable (:func:`veclip.train.captions.gated`).

Exactly-once as the rewrite: one run holds the output's lease, shards marked
done with this run's fingerprint are skipped, shards that keep failing are
recorded under ``_failed/`` and retried by a rerun, a shard whose images or
captions changed since it was scored is scored again, and at the end every row
of every shard is reconciled against the output, loudly.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from veclip.console import eta, start_ray
from veclip.dataset import Dataset, open_dataset
from veclip.eval.model import EXPORTED_CONFIG
from veclip.lease import OutputLease
from veclip.rewrite.faults import DONE, RunContext, record_failure
from veclip.rewrite.pipeline import SUMMARY_FILE, ReconciliationError
from veclip.score.config import ScoreConfig, fingerprint
from veclip.score.worker import STAGE, ShardScorer, shard_columns
from veclip.status import PLAN_FILE
from veclip.storage import (Location, ShardStore, StorageOptions, list_file_entries, output_shard_name, read_footers, version_stamp,
                            write_json)


class FingerprintMismatch(ValueError):
    """The output holds score tables of another configuration."""


@dataclass
class Plan:
    dataset: Dataset
    rows: dict[str, int]  # shard name -> rows (done or to do)
    done: dict[str, dict]  # shard name -> its marker
    todo: list[int] = field(default_factory=list)  # indices into dataset.shards
    unreadable: dict[str, str] = field(default_factory=dict)  # shard name -> why its footer could not be read
    stamps: dict[str, list[str]] = field(default_factory=dict)  # shard name -> versions of the files it reads (read_stamps)
    changed: list[str] = field(default_factory=list)  # done shards whose images or captions changed since: scored again


def resolve_model(config: ScoreConfig, options: StorageOptions) -> tuple[str, str]:
    """``(what the actors load, which weights exactly)``: a run folder resolves to its latest checkpoint
    (it may move on while this runs), an exported folder is named by its weights' digest."""
    from veclip.train.checkpoint import latest
    from veclip.train.export import WEIGHTS_FILE

    spec = config.model
    if Path(spec).is_dir() and (Path(spec) / EXPORTED_CONFIG).exists():
        digest = hashlib.sha256()
        with open(Path(spec) / WEIGHTS_FILE, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return spec, f"sha256:{digest.hexdigest()[:16]}"
    if spec.startswith("s3://") or Path(spec).is_dir():
        checkpoint = latest(Location(spec, options)).url
        return checkpoint, checkpoint
    if not config.pretrained:
        raise ValueError(f"score: {spec!r} is an open_clip model name without --pretrained: its weights would be random, "
                         "and different in every actor. Name a pretrained tag or weights file, an exported folder or a training run.")
    return spec, f"{spec}:{config.pretrained}"


def plan_score(config: ScoreConfig, options: StorageOptions, run: RunContext) -> Plan:
    dataset = open_dataset(config.input, options, tuple(config.add_captions), stage="score")
    names = {output_shard_name(s.path): i for i, s in enumerate(dataset.shards)}
    if len(names) != len(dataset.shards):
        raise ValueError(f"score: image shards of {dataset.images_url} map to the same output name; rename them")
    done = {n: m for n, m in ShardStore(Location(config.output, options)).markers(save_manifest=True).items() if n in names}
    mismatched = sorted(n for n, m in done.items() if m.get("fingerprint") != run.fingerprint)
    if mismatched:
        raise FingerprintMismatch(
            f"score: {config.output} holds {len(mismatched)} score table(s) of another configuration (model, weights, "
            f"columns, gate or input; fingerprint {done[mismatched[0]].get('fingerprint')}, this run's is {run.fingerprint}), "
            f"e.g. {mismatched[0]}. Write to a new --output, or restore the old configuration.")
    stamps = read_stamps(dataset)
    changed = sorted(n for n, m in done.items() if m.get("read_stamps") != stamps[n])
    plan = Plan(dataset, {n: m["rows"] for n, m in done.items() if n not in changed},
                {n: m for n, m in done.items() if n not in changed}, stamps=stamps, changed=changed)
    left = [i for n, i in names.items() if n not in plan.done]
    footers = read_footers(dataset.images.fs, [(dataset.shards[i].path, dataset.shards[i].size) for i in left])
    for i in left:
        name, footer = output_shard_name(dataset.shards[i].path), footers[dataset.shards[i].path]
        if isinstance(footer, str):
            plan.unreadable[name] = f"unreadable image shard: {footer}"
        else:
            plan.todo.append(i)
            plan.rows[name] = footer.num_rows
    return plan


def read_stamps(dataset: Dataset) -> dict[str, list[str]]:
    """Per shard name, the version (ETag, or mtime and size) of its image shard and of each caption
    table it reads, from one fresh listing per folder: a score table is current only while they hold."""
    listed = {}
    for url in (dataset.images_url, *(s.url for s in dataset.sources)):
        listed |= {e["name"]: version_stamp(e) for e in list_file_entries(Location(url, dataset.options))}
    return {output_shard_name(s.path): [listed.get(p, "") for p in (s.path, *s.captions)] for s in dataset.shards}


def run_score(config: ScoreConfig, options: StorageOptions | None = None, log=print, *, take_over_lease: bool = False) -> dict:
    """Score every shard not yet done; returns (and writes) the run summary. Shards that keep failing
    are listed in ``summary["failed"]`` (the CLI exits non-zero); rerunning retries exactly them."""
    options = options or StorageOptions()
    config.validate_for_run()
    start, started_at = time.perf_counter(), time.time()
    model, weights = resolve_model(config, options)
    run = RunContext(run_id=uuid.uuid4().hex[:12], fingerprint=fingerprint(config, weights)[0])
    out = Location(config.output, options)
    lease = OutputLease(out, run.run_id, config.faults.lease_seconds)
    lease.acquire(take_over=take_over_lease)
    try:
        plan = plan_score(config, options, run)
        store = ShardStore(out)
        for name, why in plan.unreadable.items():
            record_failure(store, name, shard_path(plan, name), "plan", run, 1, [why])
        skipped = "".join(f", {n} left out ({why})" for why, n in plan.dataset.skipped.items())
        if plan.changed:
            log(f"score: {len(plan.changed)} shard(s) whose images or captions changed since they were scored, e.g. "
                f"{plan.changed[0]}: scoring them again")
        log(f"score: {len(plan.dataset.shards)} shards, {len(plan.done)} already done, {len(plan.todo)} to do, "
            f"{len(plan.unreadable)} unreadable{skipped} (model {config.model}, gate: {config.gate}, fingerprint {run.fingerprint})")
        write_json(out.fs, out.join(PLAN_FILE), {  # what this run set out to do, for veclip status while it runs
            "stage": STAGE, "run_id": run.run_id, "fingerprint": run.fingerprint, "started_at": started_at, "input": config.input,
            "shards_total": len(plan.dataset.shards), "rows_total": sum(plan.rows.values()), "shards_todo": len(plan.todo)})
        if plan.todo:
            _score_shards(config, options, run, plan, model, weights, log)
        summary = summarize(config, options, plan, run, weights, time.perf_counter() - start)
        out.fs.pipe_file(out.join(SUMMARY_FILE), json.dumps(summary, indent=1).encode())
        return summary
    finally:
        lease.release()


def _score_shards(config: ScoreConfig, options: StorageOptions, run: RunContext, plan: Plan, model: str, weights: str, log) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    start_ray(log)
    pool = config.pool
    resources = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus} | (
        {"accelerator_type": pool.accelerator_type} if pool.accelerator_type else {})
    ds = ray.data.from_items([{"shard": i, "status": "", "read": json.dumps(plan.stamps[output_shard_name(plan.dataset.shards[i].path)])}
                              for i in plan.todo], override_num_blocks=len(plan.todo))
    ds = ds.map_batches(
        ShardScorer, batch_size=1,  # one shard per call: the shard is the unit of work and of exactly-once
        fn_constructor_kwargs={"config": config, "options": options, "run": run, "dataset": plan.dataset, "model": model,
                               "weights": weights, "read": shard_columns(plan.dataset, config)},
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors), **resources)
    rows = [plan.rows[output_shard_name(plan.dataset.shards[i].path)] for i in plan.todo]
    total, done, began = sum(rows), 0, time.perf_counter()
    for n, row in enumerate(ds.iter_rows(), 1):
        name = output_shard_name(plan.dataset.shards[int(row["shard"])].path)
        done += plan.rows[name]
        rate = done / max(time.perf_counter() - began, 1e-9)  # model loading included: the ETA errs long
        left = f", ETA {eta(total - done, rate)}" if done < total else ""
        note = "" if row["status"] == DONE else f" (see {config.output}/_failed/{name}.json)"
        log(f"score: [{n}/{len(plan.todo)} shards, {done}/{total} rows, {rate:.1f} rows/s{left}] {row['status']} {name}{note}")


def summarize(config: ScoreConfig, options: StorageOptions, plan: Plan, run: RunContext, weights: str, wall_seconds: float) -> dict:
    """The run summary over the whole output; raises if any row of a planned shard is unaccounted for."""
    store = ShardStore(Location(config.output, options))
    # nothing ran (a no-op rerun): the plan's markers are current, the lease kept other writers out
    listed = store.markers(save_manifest=True) if plan.todo else plan.done
    markers = {n: m for n, m in listed.items() if n in plan.rows or n in plan.unreadable}
    markers = {n: m for n, m in markers.items() if m.get("fingerprint") == run.fingerprint}
    failed = {n: f for n, f in store.failures().items() if n not in markers and (n in plan.rows or n in plan.unreadable)}
    problems = [f"{n}: not written" for n in sorted(set(plan.rows) - set(markers) - set(failed))]
    problems += [f"{n}: {plan.rows[n]} rows in, {m['rows']} scored" for n, m in markers.items() if m["rows"] != plan.rows.get(n)]
    if problems:
        raise ReconciliationError("score: rows unaccounted for: " + "; ".join(problems))
    written = [m for m in markers.values() if m.get("run_id") == run.run_id]
    columns: dict[str, Counter] = {}
    for marker in markers.values():
        for column, stats in marker.get("columns", {}).items():
            columns.setdefault(column, Counter()).update({k: v for k, v in stats.items() if k != "median"})
    medians = {c: sorted(m["columns"][c]["median"] for m in markers.values() if c in m.get("columns", {})) for c in columns}
    seconds_this_run = sum(m["seconds"] for m in written)
    return {
        "input": config.input, "add_captions": list(config.add_captions), "output": config.output,
        "model": config.model, "weights": weights, "gate": config.gate, "run_id": run.run_id, "fingerprint": run.fingerprint,
        "rows": sum(m["rows"] for m in markers.values()),
        "image_errors": sum(m.get("image_errors", 0) for m in markers.values()),
        "columns": {c: {"scored": s["scored"], "mean": s["sum"] / s["scored"], "flagged": s["flagged"],
                        "flagged_share": s["flagged"] / s["scored"],
                        "shard_median_range": [medians[c][0], medians[c][-1]]} for c, s in sorted(columns.items())},
        "shards": {"total": len(plan.dataset.shards), "done": len(markers), "written_this_run": len(written), "failed": len(failed),
                   "left_out": dict(plan.dataset.skipped)},
        "failed": {n: {k: f.get(k) for k in ("input", "stage", "tries", "error")} for n, f in sorted(failed.items())},
        "wall_seconds": wall_seconds,
        "rows_per_second_this_run": sum(m["rows"] for m in written) / wall_seconds,
        "captions_per_actor_second": sum(m["captions"] for m in written) / seconds_this_run if seconds_this_run else None,
        "actors_this_run": len({m.get("actor") for m in written}),
    }


def render_summary(summary: dict) -> str:
    lines = [f"score: {summary['rows']} rows in {summary['shards']['done']} shards scored by {summary['model']} "
             f"({summary['weights']}); {summary['shards']['written_this_run']} shards written this run in {summary['wall_seconds']:.1f}s "
             f"({summary['rows_per_second_this_run']:.1f} rows/s, {summary['actors_this_run']} actor(s))",
             f"  gate: {summary['gate']}"]
    for column, s in summary["columns"].items():
        low, high = s["shard_median_range"]
        lines.append(f"  {column:<12} {s['scored']:>7} captions  mean cosine {s['mean']:.3f}  shard medians {low:.3f}..{high:.3f}  "
                     f"flagged {s['flagged']:>6} ({s['flagged_share']:.1%})")
    if summary["image_errors"]:
        lines.append(f"  {summary['image_errors']} rows have an image that does not decode: not scored (training passes over them)")
    lines += [f"  left out   {n:>6} shards ({why})" for why, n in summary["shards"]["left_out"].items()]
    if summary["failed"]:
        lines.append(f"FAILED: {len(summary['failed'])} shard(s) kept failing; their errors are in {summary['output']}/_failed/. "
                     "Rerun the same command to retry exactly these:")
        lines += [f"  {name}  [{f['stage']}, {f['tries']} tries]  {(f['error'] or '')[:200]}" for name, f in summary["failed"].items()]
    sources = " ".join(f"--add-captions {url}" for url in [*summary["add_captions"], summary["output"]])
    lines.append(f"  train with the gate: veclip train --input {summary['input']} {sources} ...")
    return "\n".join(lines)


def shard_path(plan: Plan, name: str) -> str:
    return next(s.path for s in plan.dataset.shards if output_shard_name(s.path) == name)
