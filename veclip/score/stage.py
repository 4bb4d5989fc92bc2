"""``veclip score``, the caption gate: every caption's image-text score, over a Ray Data actor pool.

The input is what training reads (shards with captions, or caption outputs
joined to their images by key: :func:`veclip.dataset.open_dataset`); the
output is a caption output of the same images: one score table per image
shard, every row in order, with each caption slot's cosine under the model,
its provenance and a ``<slot>:low_clip_score`` flag where the gate says no.
Training reads it with ``--add-captions`` and treats flagged slots as
unusable (:func:`veclip.train.captions.gated`).

Exactly-once as every sharded stage (:mod:`veclip.shards`); what is the
score's: a shard whose images or captions changed since it was scored (their
versions are in its marker) is scored again, and only it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from veclip.command import Said, ShardedRun
from veclip.config import to_dict
from veclip.dataset import Dataset, open_dataset
from veclip.eval.model import resolve_model
from veclip.score.config import ScoreConfig, fingerprint
from veclip.score.worker import ShardScorer, shard_columns
from veclip.shards.driver import dry_run, pool_ask, run_stage
from veclip.shards.driver import run_command as run_sharded_command
from veclip.shards.guard import RunContext
from veclip.shards.marker import Marker
from veclip.shards.plan import FingerprintMismatch, InputShard, Plan, by_name, plan_shards
from veclip.shards.stage import Pool, ShardedStage
from veclip.shards.summary import RunSummary, render_faults, render_pool
from veclip.storage import Location, StorageOptions, list_file_entries, version_stamp

__all__ = ["FingerprintMismatch", "Score", "render_summary", "run_score"]


def read_stamps(dataset: Dataset) -> dict[str, list[str]]:
    """Per shard name, the version (ETag, or mtime and size) of its image shard and of each caption
    table it reads, from one fresh listing per folder: a score table is current only while they hold."""
    listed = {}
    for url in (dataset.images_url, *(s.url for s in dataset.sources)):
        listed |= {e["name"]: version_stamp(e) for e in list_file_entries(Location(url, dataset.options))}
    return {InputShard(s.path, s.size).name: [listed.get(p, "") for p in (s.path, *s.captions)] for s in dataset.shards}


@dataclass
class ScoreSummary(RunSummary):
    """A score run's summary: the shard engine's, then the gate's own figures."""

    add_captions: list[str] = field(default_factory=list)
    model: str = ""
    weights: str | None = None  # the weights the model loaded
    gate: str = ""  # the rule in words
    rows: int = 0
    image_errors: int = 0  # rows whose image does not decode: not scored
    columns: dict[str, dict] = field(default_factory=dict)  # per caption column: scored, mean, flagged, medians
    captions_per_actor_second: float | None = None
    actors_this_run: int = 0


class Score(ShardedStage):
    """Each caption slot's cosine with its image under one open_clip model, and the gate's flags."""

    name = "score"
    summary_type = ScoreSummary

    def __init__(self, config: ScoreConfig, options: StorageOptions | None = None, redo_mismatched: bool = False):
        super().__init__(config, options)
        self.model, self.weights = resolve_model(config.model, config.pretrained, self.options)
        self.redo_mismatched = redo_mismatched
        self.dataset: Dataset | None = None
        self.stamps: dict[str, list[str]] = {}

    def input_urls(self) -> list[str]:
        """The caption tables and the images folder they join to (known once the input is opened): scores
        written over the images would replace every image shard with a score table."""
        dataset = self.dataset or open_dataset(
            self.config.input, self.options, tuple(self.config.add_captions), stage="score"
        )
        return [self.config.input, *self.config.add_captions, dataset.images_url]

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.weights)[0]

    def list_inputs(self) -> dict[str, InputShard]:
        self.dataset = open_dataset(self.config.input, self.options, tuple(self.config.add_captions), stage="score")
        self.stamps = read_stamps(self.dataset)
        return by_name("score", [InputShard(s.path, s.size) for s in self.dataset.shards], self.dataset.images_url)

    def plan(self, run: RunContext, inputs: dict[str, InputShard], markers: dict[str, Marker]) -> Plan:
        plan = plan_shards(
            "score",
            self.config.output,
            inputs,
            markers,
            run.fingerprint,
            self.dataset.images.fs,
            redo_mismatched=self.redo_mismatched,
            stale=lambda name, marker: marker.read_stamps != self.stamps[name],
            what="image shard",
        )
        plan.left_out = dict(self.dataset.skipped)
        return plan

    def describe(self, plan: Plan, run: RunContext) -> str:
        changed = (
            (
                f"; {len(plan.redo)} shard(s) whose images or captions changed since they were scored, e.g. "
                f"{plan.redo[0]}: scoring them again"
            )
            if plan.redo
            else ""
        )
        return f"model {self.config.model}, gate: {self.config.gate}, fingerprint {run.fingerprint}{changed}"

    def pool_resources(self) -> dict[str, dict]:
        return {"scorer": pool_ask(self.config.model, self.config.pool)}

    def pools(self, plan: Plan, run: RunContext) -> list[Pool]:
        pool = self.config.pool
        resources = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus} | (
            {"accelerator_type": pool.accelerator_type} if pool.accelerator_type else {}
        )
        kwargs = {
            "config": self.config,
            "options": self.options,
            "run": run,
            "dataset": self.dataset,
            "model": self.model,
            "weights": self.weights,
            "read": shard_columns(self.dataset, self.config),
            "stamps": self.stamps,
        }
        return [Pool("scorer", ShardScorer, kwargs, pool.min_actors, pool.max_actors, resources=resources)]

    def details(
        self, plan: Plan, run: RunContext, markers: dict[str, Marker], written: list[str], started_at: float
    ) -> dict:
        columns: dict[str, Counter] = {}
        for marker in markers.values():
            for column, stats in marker.stats.get("columns", {}).items():
                columns.setdefault(column, Counter()).update({k: v for k, v in stats.items() if k != "median"})
        medians = {
            c: sorted(m.stats["columns"][c]["median"] for m in markers.values() if c in m.stats.get("columns", {}))
            for c in columns
        }
        this_run = [markers[n] for n in written]
        seconds = sum(m.seconds for m in this_run)
        return {
            "config": to_dict(self.config),  # as the rewrite's summary: what made it, and what decides its rows
            "fingerprint_fields": fingerprint(self.config, self.weights)[1],
            "add_captions": list(self.config.add_captions),
            "model": self.config.model,
            "weights": self.weights,
            "gate": self.config.gate,
            "rows": sum(m.rows for m in markers.values()),
            "image_errors": sum(m.stats.get("image_errors", 0) for m in markers.values()),
            "columns": {
                c: {
                    "scored": s["scored"],
                    "mean": s["sum"] / s["scored"],
                    "flagged": s["flagged"],
                    "flagged_share": s["flagged"] / s["scored"],
                    "shard_median_range": [medians[c][0], medians[c][-1]],
                }
                for c, s in sorted(columns.items())
            },
            "captions_per_actor_second": sum(m.stats.get("captions", 0) for m in this_run) / seconds
            if seconds
            else None,
            "actors_this_run": len({m.actor for m in this_run}),
        }


def run_score(
    config: ScoreConfig,
    options: StorageOptions | None = None,
    log=print,
    *,
    take_over_lease: bool = False,
    redo_mismatched: bool = False,
) -> dict:
    """Score every shard not yet done; returns (and writes) the run summary. Shards that keep failing
    are listed in ``summary["failed"]`` (the CLI exits non-zero); rerunning retries exactly them."""
    config.validate_for_run()
    stage = Score(config, options, redo_mismatched)
    return run_stage(stage, log, take_over_lease=take_over_lease)


def dry_run_score(config: ScoreConfig, options: StorageOptions | None = None, redo_mismatched: bool = False) -> dict:
    """What ``run_score`` would do now (:func:`veclip.shards.driver.dry_run`), after the same validation."""
    config.validate_for_run()
    return dry_run(Score(config, options, redo_mismatched))


def run_command(config: ScoreConfig, options: StorageOptions, run: ShardedRun) -> Said:
    """``veclip score``."""
    return run_sharded_command(Score(config, options, run.redo_mismatched), run, render_summary)


def render_summary(written: dict) -> str:
    """The printed summary of a score run's summary.json."""
    summary = ScoreSummary.from_json(written)
    lines = [
        f"score: {summary.rows} rows in {summary.shards.done} shards scored by {summary.model} "
        f"({summary.weights}); {summary.shards.written_this_run} shards written this run in "
        f"{summary.wall_seconds:.1f}s "
        f"({summary.rows_per_second_this_run:.1f} rows/s, {summary.actors_this_run} actor(s))",
        f"  gate: {summary.gate}",
    ]
    for column, s in summary.columns.items():
        low, high = s["shard_median_range"]
        lines.append(
            f"  {column:<12} {s['scored']:>7} captions  mean cosine {s['mean']:.3f}  shard medians "
            f"{low:.3f}..{high:.3f}  "
            f"flagged {s['flagged']:>6} ({s['flagged_share']:.1%})"
        )
    if summary.image_errors:
        lines.append(
            f"  {summary.image_errors} rows have an image that does not decode: not scored (training passes over them)"
        )
    lines += [f"  left out   {n:>6} shards ({why})" for why, n in summary.shards.left_out.items()]
    lines += render_pool(summary) + render_faults(summary)
    sources = " ".join(f"--add-captions {url}" for url in [*summary.add_captions, summary.output])
    lines.append(f"  train with the gate: veclip train --input {summary.input} {sources} ...")
    return "\n".join(lines)
