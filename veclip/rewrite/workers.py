"""The actor classes of the rewrite pools; one call handles one whole shard.

Each Ray Data row is an input shard path (the RayGen pattern): the actor
reads the shard, generates for all its rows in micro-batches, cleans, writes
its output whole and marks it done. A restarted actor or a rerun skips shards
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
from veclip.config import secret_values
from veclip.images import ImageError, decode_image, open_image
from veclip.rewrite import cleaning
from veclip.rewrite.config import RewriteConfig, StageConfig
from veclip.rewrite.engine import Engine, Request, VLLMEngine
from veclip.rewrite.faults import FAILED, RunContext, ShardGuard
from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt, request_seed
from veclip.storage import DONE_DIR, Location, ShardStore, StorageOptions, output_shard_name, read_json

CAPTIONS_DIR = "_work/captions"
STAGE = "rewrite"
CAPTION_WORK_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("vlm_caption", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("image_error", pa.string()),
        ("image_error_detail", pa.string()),
    ]
)


def read_input_shard(path: str, config: RewriteConfig, options: StorageOptions, columns: list[str] | None = None) -> pa.Table:
    fs = Location(config.input, options).fs
    source = None if columns is None else config.columns.source_columns(columns)
    return config.columns.apply(pq.read_table(path, columns=source, filesystem=fs))


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class _Meter:
    """Token and time counts of one shard's generation, for the run summary."""

    def __init__(self):
        self.prompt_tokens = self.generated_tokens = self.requests = 0
        self.engine_seconds = 0.0

    def run(self, engine: Engine, requests: list[Request], stage: StageConfig):
        start = time.perf_counter()
        out = engine.generate(requests, stage.sampling) if requests else []
        self.engine_seconds += time.perf_counter() - start
        self.requests += len(requests)
        self.prompt_tokens += sum(c.prompt_tokens for c in out)
        self.generated_tokens += sum(c.generated_tokens for c in out)
        return out

    def stats(self, prefix: str) -> dict:
        return {f"{prefix}_{k}": v for k, v in vars(self).items()}


def _work_stamp(started_at: float) -> dict:
    """Which actor did a shard and when, so the run summary can show the pool scaling."""
    import ray

    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return {"actor": actor or "local", "started_at": started_at, "finished_at": time.time()}


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

    def done_here(self, store: ShardStore, name: str) -> bool:
        """Marked done by a run of this configuration (another fingerprint's shard is redone)."""
        marker = read_json(store.location.fs, store.location.join(DONE_DIR, name + ".json"))
        return marker is not None and marker.get("fingerprint") == self.run.fingerprint

    def commit(self, store: ShardStore, name: str, path: str, table: pa.Table, quarantine: pa.Table | None, stats: dict) -> None:
        """Write the shard whole, with who wrote it and from what, if this run still holds the output."""
        self.guard.lease.check()
        fs = Location(self.config.input, self.options).fs
        stats = {**stats, "fingerprint": self.run.fingerprint, "run_id": self.run.run_id, "input": path, "input_size": fs.size(path)}
        store.write(name, table, quarantine, stats)


def _clean(completion, limits) -> tuple[str | None, str | None]:
    """Every output here is one caption: keep its first non-empty line, then clean it."""
    if completion.error:
        return None, completion.error
    first_line = next((line for line in completion.text.splitlines() if line.strip()), "")
    return cleaning.clean(first_line, limits.max_words, limits.min_words)


def _provenance(engine: Engine, model: str, version: str) -> dict:
    return {"model": model, "prompt_version": version, "engine": engine.name}


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
        self.caption_shard(path)

    def _decode(self, data: bytes | None):
        try:
            image = decode_image(data, self.config.image_limits)
            image.thumbnail((self.config.max_image_side, self.config.max_image_side))
            return image
        except ImageError as err:
            return err

    def _request(self, key: str, image) -> Request:
        engine = self.config.captioner.engine
        seed = request_seed(self.config.seed, key)
        if engine.prompt_format == "chat":
            return Request(messages=[{"role": "user", "content": self.prompt.instruction}], image=image, seed=seed)
        return Request(prompt=engine.prompt_template.format(instruction=self.prompt.instruction), image=image, seed=seed)

    def caption_shard(self, path: str) -> None:
        name = output_shard_name(path)
        if self.done_here(self.store, name):
            return
        start, started_at, meter = time.perf_counter(), time.time(), _Meter()
        table = read_input_shard(path, self.config, self.options, ["key", "image"])
        keys, images = table.column("key").to_pylist(), table.column("image")
        rows = []
        for part in chunks(len(keys), self.config.captioner.pool.batch_size):
            decoded = list(self.decoder.map(self._decode, (images[i].as_py() for i in part)))
            good = [(i, img) for i, img in zip(part, decoded) if not isinstance(img, ImageError)]
            outputs = meter.run(self.engine, [self._request(keys[i], img) for i, img in good], self.config.captioner)
            captions = dict(zip((i for i, _ in good), outputs))
            for i, img in zip(part, decoded):
                row = {"key": keys[i], "vlm_caption": None, "flags": []}
                if isinstance(img, ImageError):
                    row.update(image_error=img.reason, image_error_detail=img.detail)
                else:
                    text, reason = _clean(captions[i], self.config.cleaning)
                    row.update(vlm_caption=text, flags=[f"vlm_caption:{reason}"] if reason else [])
                rows.append(row)
        stats = {"rows_in": len(keys), "seconds": time.perf_counter() - start, "engine": self.engine.name, **meter.stats("captioner"),
                 **_work_stamp(started_at)}
        self.commit(self.store, name, path, pa.Table.from_pylist(rows, schema=CAPTION_WORK_SCHEMA), None, stats)


class ShardRewriter(_ShardWorker):
    """VeCLIP step 2 (fusion into a VeCap) and/or LaCLIP rewrites, then the enriched shard."""

    stage = "rewrite"

    def __init__(self, config: RewriteConfig, options: StorageOptions, run: RunContext, engine: Engine | None = None):
        super().__init__(config, options, run)
        self.fusion = FusionPrompt.load(config.fuser.prompts) if config.uses_captioner else None
        self.captioner_version = CaptionerPrompt.load(config.captioner.prompts).version if config.uses_captioner else None
        self.laclip = LaClipPrompt.load(config.laclip.prompts) if config.uses_laclip else None
        # One LLM serves both roles (the default); a different LaCLIP model gets its own engine.
        main = config.fuser if config.uses_captioner else config.laclip
        self.engine = engine or VLLMEngine(main.engine)
        same = not (config.uses_captioner and config.uses_laclip) or config.laclip.engine == config.fuser.engine
        self.laclip_engine = self.engine if (engine or same) else VLLMEngine(config.laclip.engine)
        self.store = ShardStore(self.output)
        self.captions = ShardStore(self.output.child(CAPTIONS_DIR))

    def process(self, path: str) -> None:
        self.rewrite_shard(path)

    def _image_checks(self, table: pa.Table, name: str) -> tuple[dict, dict]:
        """Per key: (vlm_caption, flags) and (image error reason, detail)."""
        if self.config.uses_captioner:
            if not self.done_here(self.captions, name):
                raise RuntimeError(f"captions for {name} are missing: the captioner pool did not finish it")
            work = pq.read_table(self.captions.location.join(name), filesystem=self.captions.location.fs).to_pylist()
            captions = {r["key"]: (r["vlm_caption"], r["flags"]) for r in work}
            errors = {r["key"]: (r["image_error"], r["image_error_detail"]) for r in work if r["image_error"]}
            return captions, errors
        errors = {}
        for key, data in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            try:
                open_image(data, self.config.image_limits)
            except ImageError as err:
                errors[key] = (err.reason, err.detail)
        return {}, errors

    def rewrite_shard(self, path: str) -> None:
        name = output_shard_name(path)
        if self.done_here(self.store, name):
            return
        start, started_at, fuse_meter, laclip_meter = time.perf_counter(), time.time(), _Meter(), _Meter()
        table = read_input_shard(path, self.config, self.options)
        captions, errors = self._image_checks(table, name)
        keys = table.column("key").to_pylist()
        bad = [i for i, k in enumerate(keys) if k in errors]
        good = [i for i, k in enumerate(keys) if k not in errors]
        quarantine_rows = [{**table.slice(i, 1).to_pylist()[0], "reason": errors[keys[i]][0], "detail": errors[keys[i]][1]} for i in bad]
        quarantine = schema.quarantine_table(quarantine_rows, STAGE, table.schema)
        table = table.take(good)
        keys = table.column("key").to_pylist()
        alts = table.column("alt_text").to_pylist()
        flags = [list(captions.get(k, (None, []))[1]) for k in keys]
        max_chars = self.config.cleaning.max_alt_text_chars
        for i, alt in enumerate(alts):
            if alt and len(alt) > max_chars:
                flags[i].append(f"alt_text:{cleaning.ALT_TEXT_TRUNCATED}")

        visual = [captions.get(k, (None, []))[0] for k in keys]
        vecaps = self._fuse(keys, alts, visual, flags, fuse_meter) if self.fusion else [None] * len(keys)
        rewrites = self._rewrite(keys, alts, flags, laclip_meter) if self.laclip else [None] * len(keys)

        out = self._enriched(table, visual, vecaps, rewrites, flags)
        stats = {
            "rows_in": len(keys) + len(bad),
            "seconds": time.perf_counter() - start,
            "engine": self.engine.name,
            "flags": _count(f for row in flags for f in row),
            "quarantine_reasons": _count(errors[k][0] for k in errors),
            **fuse_meter.stats("fuser"),
            **laclip_meter.stats("laclip"),
            **_work_stamp(started_at),
        }
        if out.num_rows + quarantine.num_rows != stats["rows_in"]:  # never lose a row silently
            raise RuntimeError(f"{name}: {stats['rows_in']} rows in, {out.num_rows} out + {quarantine.num_rows} quarantined")
        self.commit(self.store, name, path, out, quarantine, stats)

    def _fuse(self, keys, alts, visual, flags, meter: _Meter) -> list[str | None]:
        stage, limits = self.config.fuser, self.config.cleaning
        todo = [i for i, v in enumerate(visual) if v]
        vecaps: list[str | None] = [None] * len(keys)
        for i, v in enumerate(visual):
            if not v:
                flags[i].append("vecap:no_visual_caption")
        for part in chunks(len(todo), stage.pool.batch_size):
            rows = [todo[j] for j in part]
            requests = [
                Request(messages=self.fusion.messages(alts[i], visual[i], limits.max_alt_text_chars), seed=request_seed(self.config.seed, keys[i]))
                for i in rows
            ]
            for i, completion in zip(rows, meter.run(self.engine, requests, stage)):
                text, reason = _clean(completion, limits)
                if text and cleaning.lost_entities(alts[i], text):
                    text, reason = None, cleaning.ENTITIES_LOST
                vecaps[i] = text
                if reason:
                    flags[i].append(f"vecap:{reason}")
        return vecaps

    def _rewrite(self, keys, alts, flags, meter: _Meter) -> list[list[str]]:
        config, stage, limits = self.config, self.config.laclip, self.config.cleaning
        rewrites: list[list[str]] = [[] for _ in keys]
        jobs = []  # (row, prompt, seed)
        for i, (key, alt) in enumerate(zip(keys, alts)):
            if not (alt or "").strip():
                flags[i].append("rewrites:empty_alt_text")
                continue
            for n, prompt in enumerate(self.laclip.prompts(key, alt, config.num_rewrites, config.shots, config.seed, limits.max_alt_text_chars)):
                jobs.append((i, prompt, request_seed(config.seed, key, n + 1)))
        for part in chunks(len(jobs), stage.pool.batch_size):
            batch = [jobs[j] for j in part]
            outputs = meter.run(self.laclip_engine, [Request(prompt=p, seed=s) for _, p, s in batch], stage)
            for (i, _, _), completion in zip(batch, outputs):
                text, reason = _clean(completion, limits)
                if text:
                    rewrites[i].append(text)
                else:
                    flags[i].append(f"rewrites:{reason}")
        return rewrites

    def _enriched(self, table: pa.Table, visual, vecaps, rewrites, flags) -> pa.Table:
        config = self.config
        columns = {}
        if config.uses_captioner:
            columns[schema.VLM_CAPTION] = (visual, _provenance(self.engine, config.captioner.engine.model, self.captioner_version))
            columns[schema.VECAP] = (vecaps, _provenance(self.engine, config.fuser.engine.model, self.fusion.version))
        if config.uses_laclip:
            columns[schema.REWRITES] = (rewrites, _provenance(self.laclip_engine, config.laclip.engine.model, self.laclip.version))
        n = table.num_rows
        for f in schema.GENERATED_FIELDS:
            if f.name.endswith("_provenance") or f.name == schema.REWRITE_FLAGS:
                continue
            values, provenance = columns.get(f.name, ([None] * n, None))
            table = table.append_column(f, pa.array(values, f.type))
            prov_field = schema.ENRICHED_SCHEMA.field(schema.provenance_column(f.name))
            table = table.append_column(prov_field, pa.array([provenance] * n, prov_field.type))
        return table.append_column(schema.ENRICHED_SCHEMA.field(schema.REWRITE_FLAGS), pa.array(flags, pa.list_(pa.string())))


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
