"""``veclip status URL``: how far a sharded stage's output (rewrite, score) or a training run is, live or finished.

Read from what the stages leave in storage, listed fresh (another process
writes it): a sharded output's plan (written when a run starts), its
done markers, failure records and lease (:mod:`veclip.shards.layout`); a training run's ``run.json`` (written
when it starts), its newest checkpoint's ``progress.json`` and ``metrics.jsonl``,
and ``summary.json`` once it ends. The exit code says whether it is done.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

from veclip.command import Command, Flag
from veclip.console import eta
from veclip.rewrite.engine import WAITS
from veclip.shards.layout import is_output_folder
from veclip.shards.marker import EngineTime, engine_time
from veclip.shards.store import ShardStore
from veclip.storage import Location, StorageOptions, read_json
from veclip.train.resumes import render_resume
from veclip.train.summary import TrainSummary


@dataclass(frozen=True)
class StatusConfig:
    url: str = ""
    """a rewrite or score output, or a training run folder (<output>/<name>)"""


@dataclass
class Status:
    kind: str  # rewrite, score or train
    url: str
    done: bool
    lines: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.done else 1

    def render(self) -> str:
        head = f"{self.kind} {self.url}: {'DONE' if self.done else 'NOT DONE'}"
        return "\n".join([head, *("  " + line for line in self.lines)])


def _time_split(spent: EngineTime) -> str:
    parts = {"busy": spent.busy, **{what: spent.waits.get(why) for why, what in WAITS.items()}}
    return ", ".join(
        f"{what} {seconds / spent.actor_seconds:.0%}" for what, seconds in parts.items() if seconds is not None
    )


def output_status(location: Location) -> Status:
    fs = location.fs
    fs.invalidate_cache(location.path)  # markers and records change under us
    store = ShardStore(location)
    plan = read_json(fs, location.join(store.layout.plan)) or {}
    markers = store.markers()
    failed = {name: record for name, record in store.failures().items() if name not in markers}
    lease = read_json(fs, location.join(store.layout.lease))
    live = bool(lease and lease["expires_at"] > time.time())
    total = plan.get("shards_total", len(markers) + len(failed))
    rows_done = sum(m.input_rows for m in markers.values())
    rows_total = plan.get("rows_total")
    this_run = [m for m in markers.values() if m.run_id == plan.get("run_id")]
    finished = max((m.finished_at or 0 for m in this_run), default=0)
    seconds = (time.time() if live else finished) - plan.get("started_at", time.time())
    rate = sum(m.input_rows for m in this_run) / seconds if this_run and seconds > 0 else 0.0
    flags = Counter()
    for marker in markers.values():
        flags.update(marker.flags)
        flags.update({f"quarantined:{k}": v for k, v in marker.quarantine_reasons.items()})
    remaining = total - len(markers) - len(failed)
    lines = [
        f"shards: {len(markers)} done, {len(failed)} failed, {remaining} remaining of {total}",
        f"rows: {rows_done:,} done"
        + (f" of {rows_total:,}" if rows_total else "")
        + (f"; {rate:.1f} rows/s this run" if rate else "")
        + (f", ETA {eta(rows_total - rows_done, rate)}" if live and rows_total else ""),
        f"run: {'running (lease held by ' + lease['run_id'] + ')' if live else 'not running'}; fingerprint "
        + ", ".join(sorted({m.fingerprint or "?" for m in markers.values()} or {plan.get("fingerprint", "?")})),
    ]
    if (spent := engine_time(this_run)).busy is not None and spent.actor_seconds > 0:
        lines.append(f"engines this run: {_time_split(spent)} of their actors' time (the writing pool)")
    if flags:
        lines.append("flags: " + ", ".join(f"{reason} {n}" for reason, n in flags.most_common()))
    for name, record in sorted(failed.items())[:5]:
        lines.append(f"failed: {name}: {record.error}")
    fingerprints = {m.fingerprint for m in markers.values()}
    if len(fingerprints) > 1:
        lines.append(
            f"MIXED: {len(fingerprints)} configurations in one output ({', '.join(sorted(map(str, fingerprints)))}): "
            "a rewrite with --redo-mismatched that did not finish; rerun it to make the output one configuration"
        )
    missing = sorted(set(markers) - store.present())
    if missing:
        lines.append(
            f"MISSING: {len(missing)} marked shard(s) whose file is gone, e.g. {missing[0]}: rerun to redo them"
        )
    if plan.get("stopped") and not live:
        lines.append(f"stopped at {plan['stopped']['at']}: {plan['stopped']['why']}")
    done = not live and not failed and remaining == 0 and bool(markers) and len(fingerprints) <= 1 and not missing
    return Status(plan.get("stage", "rewrite"), location.url, done, lines)  # plans before the stage field: a rewrite's


def train_status(location: Location) -> Status:
    from veclip.train.checkpoint import METRICS_FILE, PROGRESS_FILE, RUN_FILE, RUN_SUMMARY_FILE

    fs = location.fs
    fs.invalidate_cache(location.path)
    run = read_json(fs, location.join(RUN_FILE)) or {}
    written = read_json(fs, location.join(RUN_SUMMARY_FILE))
    summary = TrainSummary.from_json(written) if written else None
    checkpoints = sorted(
        e["name"]
        for e in fs.ls(location.path, detail=True)
        if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint_")
    )
    progress, history = {}, []
    if checkpoints:
        newest = checkpoints[-1]
        progress = read_json(fs, posixpath.join(newest, PROGRESS_FILE)) or {}
        if fs.exists(posixpath.join(newest, METRICS_FILE)):
            history = [
                json.loads(line)
                for line in fs.cat_file(posixpath.join(newest, METRICS_FILE)).decode().splitlines()
                if line
            ]
    steps = run.get("steps")
    step = progress.get("step", 0)
    lines = [
        f"steps: {step:,} checkpointed"
        + (f" of {steps:,}" if steps else "")
        + f"; {progress.get('samples_seen', 0):,} samples seen"
    ]
    if history:
        last = history[-1]
        rate = last.get("samples_per_s")
        if rate:
            per_step = rate / max(1, run.get("batch_size", 1) * run.get("num_workers", 1))
            left = f", ETA {eta(steps - step, per_step)}" if steps and not summary else ""
            lines.append(f"speed: {rate:,.1f} samples/s at step {last.get('step')}{left}")
        if "loss" in last:
            lines.append(f"loss: {last['loss']:.4f} at step {last.get('step')}")
    resumes = progress.get("resumes", [])
    if resumes:
        causes = Counter(r.get("cause") or "restart" for r in resumes)
        lines.append(f"resumed {len(resumes)} time(s): " + ", ".join(f"{n} {c}" for c, n in causes.items()))
        lines += [render_resume(r, places=False) for r in resumes[-3:]]
    skipped = Counter()
    for worker in progress.get("workers", []):
        skipped.update(worker.get("skipped", {}))
    if skipped:
        lines.append("rows passed over: " + ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()))
    if run:
        lines.append(
            f"input: {run.get('input', run.get('data'))}; model {run.get('model')}; captions {run.get('caption_mode')}"
        )
    finished = summary is not None and (not steps or summary.step >= steps)
    return Status("train", location.url, finished, lines)


def status(config: StatusConfig, options: StorageOptions | None = None) -> Status:
    location = Location(config.url, options or StorageOptions())
    fs = location.fs
    if not location.exists():
        raise FileNotFoundError(f"status: no such folder: {config.url}")
    from veclip.train.checkpoint import RUN_FILE, RUN_SUMMARY_FILE

    names = {posixpath.basename(p) for p in fs.ls(location.path, detail=False, refresh=True)}
    if names & {RUN_FILE, RUN_SUMMARY_FILE} or any(n.startswith("checkpoint_") for n in names):
        return train_status(location)
    if is_output_folder(names):
        return output_status(location)
    raise ValueError(
        f"status: {config.url} is neither a rewrite or score output (no .veclip/ records) nor a training run "
        f"(no {RUN_FILE}, checkpoint_*); for a training run pass <output>/<name>"
    )


COMMAND = Command(
    "status",
    "how far a rewrite or score output or a training run is: shards/steps, rows/s, ETA, flags; exit 0 when done",
    StatusConfig,
    lambda config, options, run=None: status(config, options),
    flags=(Flag("url", "url", metavar="URL"),),
)
