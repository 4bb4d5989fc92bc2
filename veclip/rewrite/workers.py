"""The actor classes of the rewrite pools; one call handles one whole shard.

Each Ray Data row is an input shard path (the RayGen pattern): the actor
reads the shard, generates for all its rows, cleans, writes its output whole
and marks it done. An actor runs ``pool.shards_in_flight`` such calls at once
on threads, all feeding its one engine (:class:`~veclip.rewrite.engine.VLLMEngine`),
so one shard's I/O overlaps another's generation. A restarted actor or a rerun skips shards
already marked with this run's fingerprint, so work is never lost or
duplicated. Each shard runs under a :class:`~veclip.rewrite.faults.ShardGuard`:
retried on errors, recorded in ``_failed/`` when it keeps failing, while the
actor goes on with the next; a row's ``status`` tells the next pool.

* :class:`ShardCaptioner` (VLM): image -> ``vlm_caption``; writes a work
  shard under ``<output>/_work/captions/`` and decides which images are unusable.
* :class:`ShardRewriter` (LLM): AltText + visual caption -> ``vecap`` and/or
  AltText -> ``rewrites``; writes the enriched shard and its quarantine.

Runs inside the vLLM environment: no torchvision, no open_clip.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from veclip import schema
from veclip.metrics import publish_shard
from veclip.config import secret_values
from veclip.rewrite import steps
from veclip.rewrite.config import RewriteConfig
from veclip.rewrite.engine import Engine, VLLMEngine
from veclip.rewrite.faults import FAILED, RunContext, ShardGuard, current_actor
from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt
from veclip.rewrite.steps import CAPTION_WORK_SCHEMA, Meter
from veclip.storage import Location, ShardStore, StorageOptions, output_shard_name

CAPTIONS_DIR = "_work/captions"


def read_input_shard(path: str, config: RewriteConfig, options: StorageOptions, columns: list[str] | None = None) -> pa.Table:
    fs = Location(config.input, options).fs
    source = None if columns is None else config.columns.source_columns(columns)
    return config.columns.apply(pq.read_table(path, columns=source, filesystem=fs))


def _busy_seconds(engine: Engine) -> float | None:
    return getattr(engine, "busy_seconds", None)  # VLLMEngine counts them; a test's stub may not


def _work_stamp(started_at: float, engine: Engine, busy_from: float | None) -> dict:
    """Which actor did a shard and when, and the actor's engine busy seconds (a running count)
    then and now, so the run summary can show the pool scaling and each engine's busy share."""
    return {"actor": current_actor(), "started_at": started_at, "finished_at": time.time(),
            "engine_busy_from": busy_from, "engine_busy_to": _busy_seconds(engine)}


class _ShardWorker(ABC):
    """What both pools share: run identity, the guard, and the done check."""

    stage = ""

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext):
        self.config, self.options, self.run = config, options, run
        self.output = Location(config.output, options)
        faults = config.faults
        secrets = frozenset(secret_values(dataclasses.asdict(config)))
        self.guard = ShardGuard(self.output, run, self.stage, faults.max_attempts, faults.backoff_seconds, secrets)

    def __call__(self, batch: dict) -> dict:
        statuses = []
        for path, status in zip(batch["shard"], batch["status"]):
            if status != FAILED:  # a shard the previous pool gave up on is already recorded
                status = self.guard.run_shard(output_shard_name(path), path, lambda: self.process(path))
            statuses.append(status)
        return {**batch, "status": statuses}

    @abstractmethod
    def process(self, path: str) -> None:
        """Write the output for one input shard (skipping it when already done)."""

    def marker_here(self, store: ShardStore, name: str) -> dict | None:
        """The shard's done marker, if a run of this configuration wrote it (another fingerprint's is redone)."""
        marker = store.find_marker(name)
        return marker if marker is not None and marker.get("fingerprint") == self.run.fingerprint else None

    def commit(self, store: ShardStore, name: str, path: str, table: pa.Table, quarantine: pa.Table | None, stats: dict) -> None:
        """Write the shard whole, with who wrote it and from what, if this run still holds the output."""
        self.guard.lease.check()
        fs = Location(self.config.input, self.options).fs
        stats = {**stats, "fingerprint": self.run.fingerprint, "run_id": self.run.run_id, "input": path,
                 "input_url": fs.unstrip_protocol(path), "input_size": fs.size(path)}
        store.write(name, table, quarantine, stats)
        publish_shard(self.stage, stats)


class ShardCaptioner(_ShardWorker):
    """VeCLIP step 1: the VLM describes each image, never seeing the AltText."""

    stage = "caption"

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext, engine: Engine | None = None):
        super().__init__(config, options, run)
        self.prompt = CaptionerPrompt.load(config.captioner.prompts)
        self.engine = engine or VLLMEngine(config.captioner.engine, multimodal=True)
        self.store = ShardStore(self.output.child(CAPTIONS_DIR))
        self.decoder = ThreadPoolExecutor(4)  # JPEG decode releases the GIL

    def process(self, path: str) -> None:
        name = output_shard_name(path)
        if self.marker_here(self.store, name):
            return
        start, started_at, busy_from, meter = time.perf_counter(), time.time(), _busy_seconds(self.engine), Meter()
        table = read_input_shard(path, self.config, self.options, ["key", "image"])
        keys, images = table.column("key").to_pylist(), table.column("image")
        rows = []
        for part in steps.chunks(len(keys), self.config.captioner.pool.batch_size):  # decoded a batch at a time
            decoded = list(self.decoder.map(lambda i: steps.decode_for_captioner(images[i].as_py(), self.config), part))
            rows += steps.caption(self.config, self.engine, self.prompt, keys[part.start : part.stop], decoded, meter)
        stats = {"rows_in": len(keys), "seconds": time.perf_counter() - start, "engine": self.engine.name, **meter.stats("captioner"),
                 **_work_stamp(started_at, self.engine, busy_from)}
        self.commit(self.store, name, path, pa.Table.from_pylist(rows, schema=CAPTION_WORK_SCHEMA), None, stats)


class ShardRewriter(_ShardWorker):
    """VeCLIP step 2 (fusion into a VeCap) and/or LaCLIP rewrites, then the enriched shard.

    In ``both`` mode one LLM serves fusion and rewrites in this pool (the config
    requires the two roles to name the same engine and pool, see
    :meth:`RewriteConfig.validate_for_run`): never a hidden second engine.
    """

    stage = "rewrite"

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext, engine: Engine | None = None):
        super().__init__(config, options, run)
        self.fusion = FusionPrompt.load(config.fuser.prompts) if config.uses_captioner else None
        self.captioner_version = CaptionerPrompt.load(config.captioner.prompts).version if config.uses_captioner else None
        self.laclip = LaClipPrompt.load(config.laclip.prompts) if config.uses_laclip else None
        self.engine = engine or VLLMEngine((config.fuser if config.uses_captioner else config.laclip).engine)
        self.store = ShardStore(self.output)
        self.captions = ShardStore(self.output.child(CAPTIONS_DIR))

    def process(self, path: str) -> None:
        name = output_shard_name(path)
        if self.marker_here(self.store, name):
            return
        start, started_at, busy_from, fuse_meter, laclip_meter = time.perf_counter(), time.time(), _busy_seconds(self.engine), Meter(), Meter()
        table = read_input_shard(path, self.config, self.options)
        rows_in, input_keys = table.num_rows, table.column("key").to_pylist()
        visual, errors, captioner_engine = self._image_checks(table, name)
        table, quarantine = steps.split(table, errors)
        keys, alts = table.column("key").to_pylist(), table.column("alt_text").to_pylist()
        flags = steps.alt_text_flags(alts, self.config)
        generated = {}
        if self.fusion:
            captions = [visual.get(k, (None, [])) for k in keys]
            flags = [caption_flags + row_flags for (_, caption_flags), row_flags in zip(captions, flags)]
            texts = [c[0] for c in captions]
            vecaps = steps.fuse(self.config, self.engine, self.fusion, keys, alts, texts, flags, fuse_meter)
            generated[schema.VLM_CAPTION] = (texts, steps.provenance(self.config.captioner.engine.model, self.captioner_version, captioner_engine))
            generated[schema.VECAP] = (vecaps, steps.provenance(self.config.fuser.engine.model, self.fusion.version, self.engine.name))
        if self.laclip:
            rewrites = steps.rewrite(self.config, self.engine, self.laclip, keys, alts, flags, laclip_meter)
            generated[schema.REWRITES] = (rewrites, steps.provenance(self.config.laclip.engine.model, self.laclip.version, self.engine.name))
        if self.config.layout == "captions":  # every input row, in order: training joins it back by key
            out = steps.caption_table(input_keys, table, generated, flags, errors)
            expected = rows_in
        else:
            out, expected = steps.assemble(table, generated, flags), rows_in - quarantine.num_rows
        stats = {
            "layout": self.config.layout,
            "rows_in": rows_in,
            "seconds": time.perf_counter() - start,
            "engine": self.engine.name,
            "flags": steps.count(f for row in flags for f in row),
            "quarantine_reasons": steps.count(reason for reason, _ in errors.values()),
            **fuse_meter.stats("fuser"),
            **laclip_meter.stats("laclip"),
            **_work_stamp(started_at, self.engine, busy_from),
        }
        if out.num_rows != expected:  # never lose a row silently
            raise RuntimeError(f"{name}: {rows_in} rows in, {out.num_rows} written ({self.config.layout} layout) + {quarantine.num_rows} quarantined")
        self.commit(self.store, name, path, out, quarantine, stats)

    def _image_checks(self, table: pa.Table, name: str) -> tuple[dict, dict, str | None]:
        """Per key: (visual caption, its flags); per refused key: (reason, detail); the captioner's engine."""
        keys = table.column("key").to_pylist()
        if not self.config.uses_captioner:
            return {}, steps.header_errors(keys, table.column("image").to_pylist(), self.config), None
        marker = self.marker_here(self.captions, name)
        if marker is None:
            raise RuntimeError(f"captions for {name} are missing: the captioner pool did not finish it")
        work = pq.read_table(self.captions.location.join(name), filesystem=self.captions.location.fs).to_pylist()
        visual = {r["key"]: (r["vlm_caption"], list(r["flags"])) for r in work}
        errors = {r["key"]: (r["image_error"], r["image_error_detail"]) for r in work if r["image_error"]}
        return visual, errors, marker.get("engine")
