"""The actor classes of the rewrite pools; one call handles one whole shard.

Each actor is a :class:`~veclip.shards.worker.ShardWorker` (the guard, the done
check, the commit): it reads a shard, generates for all its rows, cleans,
writes its output whole and marks it done. An actor runs
``pool.shards_in_flight`` such calls at once on threads, all feeding its one
engine (:class:`~veclip.rewrite.engine.VLLMEngine`), so one shard's I/O
overlaps another's generation.

* :class:`ShardCaptioner` (VLM): image -> ``vlm_caption``; writes a work
  shard under ``<output>/.veclip/work/captions/`` and decides which images are unusable.
* :class:`ShardRewriter` (LLM): AltText + visual caption -> ``vecap`` and/or
  AltText -> ``rewrites``; writes the enriched shard and its quarantine.

Runs inside the vLLM environment: no torchvision, no open_clip.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from veclip import schema
from veclip.config import secret_values
from veclip.rewrite import steps
from veclip.rewrite.config import EngineConfig, RewriteConfig
from veclip.rewrite.engine import Engine, VLLMEngine, isolated
from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt
from veclip.rewrite.standin import StandInEngine, is_stand_in
from veclip.rewrite.steps import CAPTION_WORK_SCHEMA, Meter
from veclip.shards.guard import RunContext, ShardRefused
from veclip.shards.layout import layout_of, output_shard_name
from veclip.shards.marker import Marker
from veclip.shards.store import ShardStore
from veclip.shards.worker import ShardWorker
from veclip.storage import Location, StorageOptions, read_batches, read_table


def caption_store(output: Location) -> ShardStore:
    """The visual captions' own sharded output, in the rewrite output's work folder."""
    return ShardStore(output.child(layout_of(output).work_dir("captions")))


CAPTIONER_BATCH_BYTES = 256 << 20  # encoded images a captioner batch holds at most (1,024 web photos of ~250 KB)


def input_batches(
    path: str,
    config: RewriteConfig,
    options: StorageOptions,
    columns: list[str] | None = None,
    rows: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[pa.Table]:
    """The input shard ``rows`` at a time (fewer where they would hold over ``max_bytes``), the user's columns
    renamed: memory holds one batch's images, never the shard's (~1 GB at 10,000 rows)."""
    source = None if columns is None else config.columns.source_columns(columns)
    for batch in read_batches(Location(config.input, options).fs, path, source, rows=rows, max_bytes=max_bytes):
        yield config.columns.apply(batch)


def read_input_columns(path: str, config: RewriteConfig, options: StorageOptions, columns: list[str]) -> pa.Table:
    """Small columns of the whole shard (keys, AltText), the keys checked: rows are joined by key, and
    a duplicate or null one would swap captions between rows."""
    fs = Location(config.input, options).fs
    table = config.columns.apply(read_table(fs, path, config.columns.source_columns(columns)))
    if why := schema.key_problems(table.column(schema.KEY).to_pylist()):
        raise ShardRefused(f"{output_shard_name(path)}: {why}")
    return table


def build_engine(config: EngineConfig, multimodal: bool = False) -> Engine:
    """The pool's engine: vLLM, or the stand-in for a GPU that tests at real durations use
    (:mod:`veclip.rewrite.standin`)."""
    return StandInEngine(config.model) if is_stand_in(config.model) else VLLMEngine(config, multimodal)


class _RewriteWorker(ShardWorker):
    """What both pools share: the config, the input's filesystem, and the marker's timing."""

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext):
        super().__init__(
            config.output, options, run, config.faults, frozenset(secret_values(dataclasses.asdict(config)))
        )
        self.config = config
        self.input_fs = Location(config.input, options).fs

    def engine_counts(self) -> tuple[float | None, dict[str, float]]:
        """The actor's engine's running counts: busy seconds, and seconds without a step by why (VLLMEngine's)."""
        counts = getattr(self.engine, "time_counts", None)
        return counts() if counts else (getattr(self.engine, "busy_seconds", None), {})  # a stand-in's, a stub's

    def new_marker(self, name: str, started_at: float, counts_from: tuple[float | None, dict[str, float]]) -> Marker:
        """Which actor did a shard and when, and its engine's running counts then (``counts_from``) and now,
        so the run summary can show the pool scaling and how each engine spent its time."""
        (busy_from, waits_from), (busy_to, waits_to) = counts_from, self.engine_counts()
        return Marker(
            shard=name,
            rows=0,
            started_at=started_at,
            finished_at=time.time(),
            engine=self.engine.name,
            engine_busy_from=busy_from,
            engine_busy_to=busy_to,
            engine_waits_from=waits_from,
            engine_waits_to=waits_to,
        )


class ShardCaptioner(_RewriteWorker):
    """VeCLIP step 1: the VLM describes each image, never seeing the AltText."""

    stage = "caption"

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext, engine: Engine | None = None):
        super().__init__(config, options, run)
        self.prompt = CaptionerPrompt.load(config.captioner.prompts)
        self.engine = engine or build_engine(config.captioner.engine, multimodal=True)
        self.store = caption_store(self.output)
        self.decoder = ThreadPoolExecutor(4)  # JPEG decode releases the GIL
        self.decode = functools.partial(steps.decode_for_captioner, config=config)

    def process(self, path: str, size: int) -> None:
        name = output_shard_name(path)
        if self.current(self.store, name):
            return
        start, started_at, counts_from, meter = time.perf_counter(), time.time(), self.engine_counts(), Meter()
        rows_in = read_input_columns(path, self.config, self.options, ["key"]).num_rows
        rows, batch_rows = [], self.config.captioner.pool.batch_size  # decoded and submitted a batch at a time
        batches = input_batches(path, self.config, self.options, ["key", "image"], batch_rows, CAPTIONER_BATCH_BYTES)
        engine = isolated(self.engine, self.guard.isolation())
        for batch in batches:  # at most batch_size rows, and CAPTIONER_BATCH_BYTES of images (12 MB photos too)
            rows += self._caption(engine, batch, meter)
        marker = self.new_marker(name, started_at, counts_from)
        marker.rows_in, marker.seconds, marker.pools = (
            rows_in,
            time.perf_counter() - start,
            {"captioner": meter.stats},
        )
        self.commit(
            self.store, marker, self.input_fs, path, size, pa.Table.from_pylist(rows, schema=CAPTION_WORK_SCHEMA)
        )

    def _caption(self, engine: Engine, batch: pa.Table, meter: Meter) -> list[dict]:
        """One batch's caption rows; its decoded images (~0.5 GB at 1,024 rows) are gone when this returns,
        before the next batch's are made."""
        decoded = list(self.decoder.map(self.decode, batch.column("image").to_pylist()))
        return steps.caption(self.config, engine, self.prompt, batch.column("key").to_pylist(), decoded, meter)


class ShardRewriter(_RewriteWorker):
    """VeCLIP step 2 (fusion into a VeCap) and/or LaCLIP rewrites, then the enriched shard.

    In ``both`` mode one LLM serves fusion and rewrites in this pool (the config
    requires the two roles to name the same engine and pool, see
    :meth:`RewriteConfig.validate_for_run`): never a hidden second engine.
    """

    stage = "rewrite"

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext, engine: Engine | None = None):
        super().__init__(config, options, run)
        self.fusion = FusionPrompt.load(config.fuser.prompts) if config.uses_captioner else None
        self.captioner_version = (
            CaptionerPrompt.load(config.captioner.prompts).version if config.uses_captioner else None
        )
        self.laclip = LaClipPrompt.load(config.laclip.prompts) if config.uses_laclip else None
        self.engine = engine or build_engine((config.fuser if config.uses_captioner else config.laclip).engine)
        self.store = ShardStore(self.output)
        self.captions = caption_store(self.output)

    def process(self, path: str, size: int) -> None:
        name = output_shard_name(path)
        if self.current(self.store, name):
            return
        start, started_at, counts_from = time.perf_counter(), time.time(), self.engine_counts()
        fuse_meter, laclip_meter = Meter(), Meter()
        text = read_input_columns(path, self.config, self.options, ["key", "alt_text"])
        rows_in, input_keys = text.num_rows, text.column("key").to_pylist()
        visual, errors, captioner_engine = self._captions(name) if self.config.uses_captioner else ({}, None, None)
        errors, quarantine = self._refused(path, errors)
        kept, _ = steps.split(text, errors)
        keys, alts = kept.column("key").to_pylist(), kept.column("alt_text").to_pylist()
        flags = steps.alt_text_flags(alts, self.config)
        generated, engine = {}, isolated(self.engine, self.guard.isolation())
        if self.fusion:
            captions = [visual.get(k, (None, [])) for k in keys]
            flags = [caption_flags + row_flags for (_, caption_flags), row_flags in zip(captions, flags)]
            texts = [c[0] for c in captions]
            vecaps = steps.fuse(self.config, engine, self.fusion, keys, alts, texts, flags, fuse_meter)
            generated[schema.VLM_CAPTION] = (
                texts,
                steps.provenance(self.config.captioner.engine.model, self.captioner_version, captioner_engine),
            )
            generated[schema.VECAP] = (
                vecaps,
                steps.provenance(self.config.fuser.engine.model, self.fusion.version, self.engine.name),
            )
        if self.laclip:
            rewrites = steps.rewrite(self.config, engine, self.laclip, keys, alts, flags, laclip_meter)
            generated[schema.REWRITES] = (
                rewrites,
                steps.provenance(self.config.laclip.engine.model, self.laclip.version, self.engine.name),
            )
        if self.config.layout == "captions":  # every input row, in order: training joins it back by key
            out = steps.caption_table(input_keys, kept, generated, flags, errors)
        else:
            out = self._enriched(path, name, keys, generated, flags, errors)
        marker = self.new_marker(name, started_at, counts_from)
        marker.layout, marker.rows_in, marker.seconds = self.config.layout, rows_in, time.perf_counter() - start
        marker.flags = dict(Counter(f for row in flags for f in row))
        marker.quarantine_reasons = dict(Counter(reason for reason, _ in errors.values()))
        marker.pools = {"fuser": fuse_meter.stats} if self.fusion else {}
        marker.pools |= {"laclip": laclip_meter.stats} if self.laclip else {}
        self.commit(self.store, marker, self.input_fs, path, size, out, quarantine)

    def _enriched(self, path: str, name: str, keys: list, generated: dict, flags: list, errors: dict):
        """The enriched shard a batch at a time: each input batch's kept rows and their generated columns."""
        done = 0
        for batch in input_batches(path, self.config, self.options):
            kept, _ = steps.split(batch, errors)
            n = kept.num_rows
            if kept.column("key").to_pylist() != keys[done : done + n]:  # never pair rows with another row's captions
                raise RuntimeError(f"{name}: the input changed while it was read (rows {done}..{done + n})")
            yield steps.assemble(
                kept, {k: (v[done : done + n], o) for k, (v, o) in generated.items()}, flags[done : done + n]
            )
            done += n
        if done != len(keys):  # never lose a row silently
            raise RuntimeError(f"{name}: {len(keys)} rows to write, {done} read back from the input")

    def _refused(self, path: str, errors: dict | None) -> tuple[dict, pa.Table | None]:
        """Per refused key (reason, detail), and the refused rows whole (images included, to look at),
        in one pass over the shard, none when the captioner refused no image. ``errors`` None (LaCLIP: no
        VLM decodes the images): found in the same pass from the images' headers and limits."""
        if errors == {}:
            return {}, None
        found, refused = dict(errors or {}), []
        for batch in input_batches(path, self.config, self.options):
            if errors is None:
                keys, images = batch.column("key").to_pylist(), batch.column("image").to_pylist()
                found |= steps.header_errors(keys, images, self.config)
            refused.append(steps.split(batch, found)[1])
        return found, (pa.concat_tables(refused) if found else None)

    def _captions(self, name: str) -> tuple[dict, dict, str | None]:
        """Per key: (visual caption, its flags); per key whose image the captioner refused: (reason,
        detail); the captioner's engine."""
        marker = self.current(self.captions, name)
        if marker is None:
            raise RuntimeError(f"captions for {name} are missing: the captioner pool did not finish it")
        work = read_table(self.captions.location.fs, self.captions.location.join(name)).to_pylist()
        visual = {r["key"]: (r["vlm_caption"], list(r["flags"])) for r in work}
        errors = {r["key"]: (r["image_error"], r["image_error_detail"]) for r in work if r["image_error"]}
        return visual, errors, marker.engine
