"""The actor of the score pool: loads the model once, then scores one whole shard per call.

Each Ray Data row names a shard of the dataset (its images and the caption
tables joined to them). The actor reads the shard with its captions, scores
and gates every caption (:mod:`veclip.score.steps`), writes the score table
whole and marks it done, under the same :class:`~veclip.rewrite.faults.ShardGuard`
as the rewrite: retried on errors, recorded in ``_failed/`` when it keeps
failing, a try counted before it starts so a killed actor's shard is not
retried forever. A shard already marked with this run's fingerprint is skipped,
so a restarted actor or a rerun never writes a shard twice.
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq

from veclip import schema
from veclip.dataset import Dataset, Shard, read_shard
from veclip.rewrite.faults import FAILED, RunContext, ShardGuard, current_actor
from veclip.score import steps
from veclip.score.config import ScoreConfig
from veclip.storage import Location, ShardStore, StorageOptions, output_shard_name

STAGE = "score"


def shard_columns(dataset: Dataset, config: ScoreConfig) -> list[str]:
    """The image-shard columns a worker reads (source names): key, image, and the caption columns it holds."""
    with dataset.images.fs.open(dataset.shards[0].path, "rb") as f:
        names = config.columns.apply_to_footer(pq.read_schema(f)).names
    wanted = [schema.KEY, schema.IMAGE] + [c for c in config.caption_columns if c in names]
    renames = {dst: src for src, dst in config.columns.renames().items()}
    return [renames.get(c, c) for c in wanted]


class ShardScorer:
    """Ray Data actor: ``{"shard": index into dataset.shards, "status": "", "read": the versions of the files the
    shard reads, as the driver listed them (JSON)}`` -> the same with its status."""

    def __init__(self, config: ScoreConfig, options: StorageOptions, run: RunContext, dataset: Dataset, model: str,
                 weights: str, read: list[str]):
        import torch

        from veclip.eval.model import load_model

        self.config, self.run, self.dataset, self.read = config, run, dataset, read
        self.output = Location(config.output, options)
        self.store = ShardStore(self.output)
        faults = config.faults
        self.guard = ShardGuard(self.output, run, STAGE, faults.max_attempts, faults.backoff_seconds)
        self.device = torch.device(config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.preprocess, self.tokenizer = load_model(model, config.pretrained, options)
        self.model.to(self.device)
        self.provenance = {"model": config.model, "weights": weights, "gate": config.gate}

    def __call__(self, batch: dict) -> dict:
        statuses = []
        for index, status, read in zip(batch["shard"], batch["status"], batch["read"]):
            shard = self.dataset.shards[int(index)]
            if status != FAILED:
                status = self.guard.run_shard(output_shard_name(shard.path), shard.path, lambda: self.process(shard, json.loads(read)))
            statuses.append(status)
        return {**batch, "status": statuses}

    def process(self, shard: Shard, read_stamps: list[str]) -> None:
        """Score one shard; ``read_stamps``: its files' versions when planned (listed before they are read:
        a change after that is seen by the next run, which scores the shard again)."""
        name = output_shard_name(shard.path)
        marker = self.store.find_marker(name)
        if marker is not None and marker.get("fingerprint") == self.run.fingerprint and marker.get("read_stamps") == read_stamps:
            return
        start, started_at = time.perf_counter(), time.time()
        table = read_shard(self.dataset, shard, self.read, self.config.columns)
        keys = table.column(schema.KEY).to_pylist()
        captions = steps.caption_slots(table, self.config.caption_columns)
        cosines, errors = steps.score(self.model, self.preprocess, self.tokenizer, table.column(schema.IMAGE).to_pylist(), captions,
                                      self.config.batch_size, self.config.image_limits, self.device)
        flagged = steps.gate(captions, cosines, self.config.threshold, self.config.percentile)
        out = steps.score_table(keys, table, captions, cosines, flagged, self.provenance)
        if out.num_rows != table.num_rows:  # never lose a row silently
            raise RuntimeError(f"{name}: {table.num_rows} rows read, {out.num_rows} scored")
        fs, columns = self.dataset.images.fs, steps.column_stats(captions, cosines, flagged)
        stats = {
            "layout": "captions", "rows_in": table.num_rows, "captions": len(captions), "columns": columns,
            "flags": {f"{c}:{schema.LOW_CLIP_SCORE}": s["flagged"] for c, s in columns.items() if s["flagged"]},  # for veclip status
            "image_errors": sum(e is not None for e in errors), "seconds": time.perf_counter() - start,
            "actor": current_actor(),
            "started_at": started_at, "finished_at": time.time(), "fingerprint": self.run.fingerprint, "run_id": self.run.run_id,
            "input": shard.path, "input_url": fs.unstrip_protocol(shard.path), "input_size": shard.size, "read_stamps": read_stamps,
        }
        self.guard.lease.check()  # this run still holds the output
        self.store.write(name, out, None, stats)
