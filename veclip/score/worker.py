"""The actor of the score pool: loads the model once, then scores one whole shard per call.

Each call names an image shard of the dataset; the actor reads it with the
caption tables joined to it, scores and gates every caption
(:mod:`veclip.score.steps`), and commits the score table whole, as every
:class:`~veclip.shards.worker.ShardWorker` does. A shard already marked with
this run's fingerprint, made from the same versions of its files, is skipped.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from veclip import schema
from veclip.dataset import Dataset, read_shard_batches
from veclip.score import steps
from veclip.score.config import ScoreConfig
from veclip.shards.guard import RunContext, ShardRefused
from veclip.shards.layout import output_shard_name
from veclip.shards.marker import CAPTIONS, Marker
from veclip.shards.store import ShardStore
from veclip.shards.worker import ShardWorker
from veclip.storage import StorageOptions


def shard_columns(dataset: Dataset, config: ScoreConfig) -> list[str]:
    """The image-shard columns a worker reads (source names): key, image, and the caption columns it holds."""
    with dataset.images.fs.open(dataset.shards[0].path, "rb") as f:
        names = config.columns.apply_to_footer(pq.read_schema(f)).names
    wanted = [schema.KEY, schema.IMAGE] + [c for c in config.caption_columns if c in names]
    renames = {dst: src for src, dst in config.columns.renames().items()}
    return [renames.get(c, c) for c in wanted]


class ShardScorer(ShardWorker):
    """Ray Data actor over shard rows (:class:`~veclip.shards.worker.ShardWorker`); ``stamps``: per shard, the
    versions of the files it reads as the driver listed them."""

    stage = "score"

    def __init__(
        self,
        config: ScoreConfig,
        options: StorageOptions,
        run: RunContext,
        dataset: Dataset,
        model: str,
        weights: str,
        read: list[str],
        stamps: dict[str, list[str]],
    ):
        import torch

        from veclip.eval.model import load_model

        super().__init__(config.output, options, run, config.faults)
        self.config, self.dataset, self.read, self.stamps = config, dataset, read, stamps
        self.shards = {s.path: s for s in dataset.shards}
        self.store = ShardStore(self.output)
        self.device = torch.device(
            config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.model, self.preprocess, self.tokenizer = load_model(model, config.pretrained, options)
        self.model.to(self.device)
        self.provenance = {"model": config.model, "weights": weights, "gate": config.gate}

    def process(self, path: str, size: int) -> None:
        """Score one shard. Its files' versions were listed before they are read: a change after that
        is seen by the next run, which scores the shard again."""
        name, shard = output_shard_name(path), self.shards[path]
        marker = self.current(self.store, name)
        if marker is not None and marker.read_stamps == self.stamps[name]:
            return
        start, started_at = time.perf_counter(), time.time()
        keys, captions, cosines, errors, texts = [], [], [], [], []
        # a batch at a time: memory holds one batch's images, not the shard's (~1 GB at 10k rows)
        for part in read_shard_batches(self.dataset, shard, self.read, self.config.columns):
            part_captions = steps.caption_slots(part, self.config.caption_columns)
            part_cosines, part_errors = steps.score(
                self.model,
                self.preprocess,
                self.tokenizer,
                part.column(schema.IMAGE),
                part_captions,
                self.config.batch_size,
                self.config.image_limits,
                self.device,
            )
            captions += [dataclasses.replace(c, row=c.row + len(keys)) for c in part_captions]
            keys += part.column(schema.KEY).to_pylist()
            cosines.append(part_cosines)
            errors += part_errors
            texts.append(part.drop_columns([schema.IMAGE]))
        if why := schema.key_problems(keys):  # scores are joined by key: rows would swap them
            raise ShardRefused(f"{name}: {why}")
        cosines, table = np.concatenate(cosines), pa.concat_tables(texts)  # an empty shard still yields a batch
        flagged = steps.gate(captions, cosines, self.config.threshold, self.config.percentile)
        out = steps.score_table(keys, table, captions, cosines, flagged, self.provenance)
        if out.num_rows != table.num_rows:  # never lose a row silently
            raise RuntimeError(f"{name}: {table.num_rows} rows read, {out.num_rows} scored")
        columns = steps.column_stats(captions, cosines, flagged)
        marker = Marker(
            shard=name,
            rows=0,
            layout=CAPTIONS,
            rows_in=table.num_rows,
            started_at=started_at,
            finished_at=time.time(),
            seconds=time.perf_counter() - start,
            read_stamps=self.stamps[name],
            flags={f"{c}:{schema.LOW_CLIP_SCORE}": s["flagged"] for c, s in columns.items() if s["flagged"]},
            stats={"captions": len(captions), "columns": columns, "image_errors": sum(e is not None for e in errors)},
        )
        self.commit(self.store, marker, self.dataset.images.fs, path, size, out)
