"""One shard's rewrite, step by step: pure functions of its rows, the config and an engine.

    images checked ──> quarantine (bad images)        (split)
    image ──> visual caption                          (caption: the VLM, never sees AltText)
    AltText + visual caption ──> VeCap                (fuse: the LLM, names kept)
    AltText ──> rewrites                              (rewrite: LaCLIP, in-context exemplars)
    rows + generated columns + flags ──> enriched     (assemble)

No storage and no Ray here: the actors in :mod:`veclip.rewrite.workers` read a
shard, call these and write the result, and tests drive them with a stub
engine. Every generation goes through a :class:`Meter` for the run summary;
every caption that is refused leaves a ``role:reason`` flag on its row.
"""

from __future__ import annotations

import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from veclip import schema
from veclip.images import ImageError, decode_image, open_image
from veclip.rewrite import cleaning
from veclip.rewrite.config import CleaningConfig, RewriteConfig, StageConfig
from veclip.rewrite.engine import Completion, Engine, Request
from veclip.rewrite.prompts import CaptionerPrompt, FusionPrompt, LaClipPrompt, request_seed
from veclip.shards.isolation import KILLED_THE_ENGINE
from veclip.shards.marker import PoolStats

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


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class Meter:
    """Token and time counts of one shard's generation (a marker's :class:`PoolStats`)."""

    def __init__(self):
        self.stats = PoolStats()

    def run(self, engine: Engine, requests: list[Request], stage: StageConfig) -> list[Completion]:
        start = time.perf_counter()
        out = engine.generate(requests, stage.sampling) if requests else []
        self.stats = self.stats.add(
            PoolStats(
                len(requests),
                sum(c.prompt_tokens for c in out),
                sum(c.generated_tokens for c in out),
                time.perf_counter() - start,
            )
        )
        return out


def clean(completion: Completion, limits: CleaningConfig) -> tuple[str | None, str | None]:
    """Every output here is one caption: keep its first non-empty line, then clean it."""
    if completion.error:
        return None, completion.error
    first_line = next((line for line in completion.text.splitlines() if line.strip()), "")
    return cleaning.clean(first_line, limits.max_words, limits.min_words)


# --- images ----------------------------------------------------------------------------------------


def decode_for_captioner(data: bytes | None, config: RewriteConfig):
    """The image, fully decoded and fit within ``max_image_side``, or the ImageError that refused it."""
    try:
        image = decode_image(data, config.image_limits)
        image.thumbnail((config.max_image_side, config.max_image_side))
        return image
    except ImageError as err:
        return err


def header_errors(keys: list[str], images: list[bytes | None], config: RewriteConfig) -> dict[str, tuple[str, str]]:
    """Per key, why its image is refused (headers and limits only: no VLM will decode it)."""
    errors = {}
    for key, data in zip(keys, images):
        try:
            open_image(data, config.image_limits)
        except ImageError as err:
            errors[key] = (err.reason, err.detail)
    return errors


def split(table: pa.Table, errors: dict[str, tuple[str, str]]) -> tuple[pa.Table, pa.Table]:
    """The rows to rewrite, and the quarantine of the others with their reasons."""
    refused = pa.array([k in errors for k in table.column(schema.KEY).to_pylist()], pa.bool_())
    rows = table.filter(refused).to_pylist()
    quarantine = schema.quarantine_table(
        [{**row, "reason": errors[row[schema.KEY]][0], "detail": errors[row[schema.KEY]][1]} for row in rows],
        STAGE,
        table.schema,
    )
    return table.filter(pa.compute.invert(refused)), quarantine


# --- the generation steps --------------------------------------------------------------------------


def caption(
    config: RewriteConfig, engine: Engine, prompt: CaptionerPrompt, keys: list[str], images: list, meter: Meter
) -> list[dict]:
    """Per row (CAPTION_WORK_SCHEMA): the visual caption and its flags, or the image's error.
    ``images``: decoded images or the ImageErrors that refused them."""
    settings = config.captioner.engine

    def request(key, image) -> Request:
        seed = request_seed(config.seed, key)
        if settings.prompt_format == "chat":
            return Request(messages=[{"role": "user", "content": prompt.instruction}], image=image, seed=seed)
        return Request(prompt=settings.prompt_template.format(instruction=prompt.instruction), image=image, seed=seed)

    good = [i for i, image in enumerate(images) if not isinstance(image, ImageError)]
    completions = dict(zip(good, meter.run(engine, [request(keys[i], images[i]) for i in good], config.captioner)))
    rows = []
    for i, (key, image) in enumerate(zip(keys, images)):
        row = {"key": key, "vlm_caption": None, "flags": []}
        if isinstance(image, ImageError):
            row.update(image_error=image.reason, image_error_detail=image.detail)
        elif completions[i].error == KILLED_THE_ENGINE:  # the image, not its caption: the row is quarantined
            row.update(image_error=KILLED_THE_ENGINE, image_error_detail="the captioner's engine died on it, alone")
        else:
            text, reason = clean(completions[i], config.cleaning)
            row.update(vlm_caption=text, flags=[f"vlm_caption:{reason}"] if reason else [])
        rows.append(row)
    return rows


def alt_text_flags(alts: list[str | None], config: RewriteConfig) -> list[list[str]]:
    """A fresh flag list per row, noting AltText cut before prompting."""
    limit = config.cleaning.max_alt_text_chars
    return [[f"alt_text:{cleaning.ALT_TEXT_TRUNCATED}"] if alt and len(alt) > limit else [] for alt in alts]


def fuse(
    config: RewriteConfig,
    engine: Engine,
    prompt: FusionPrompt,
    keys: list[str],
    alts: list,
    visual: list,
    flags: list[list[str]],
    meter: Meter,
) -> list[str | None]:
    """VeCap per row: AltText and visual caption fused, keeping the AltText's names (else refused)."""
    stage, limits = config.fuser, config.cleaning
    vecaps: list[str | None] = [None] * len(keys)
    for i, v in enumerate(visual):
        if not v:
            flags[i].append("vecap:no_visual_caption")
    rows = [i for i, v in enumerate(visual) if v]
    requests = [
        Request(
            messages=prompt.messages(alts[i], visual[i], limits.max_alt_text_chars),
            seed=request_seed(config.seed, keys[i]),
        )
        for i in rows
    ]
    for i, completion in zip(rows, meter.run(engine, requests, stage)):  # the whole shard in one submission
        text, reason = clean(completion, limits)
        if text and cleaning.lost_entities(alts[i], text):
            text, reason = None, cleaning.ENTITIES_LOST
        vecaps[i] = text
        if reason:
            flags[i].append(f"vecap:{reason}")
    return vecaps


def rewrite(
    config: RewriteConfig,
    engine: Engine,
    prompt: LaClipPrompt,
    keys: list[str],
    alts: list,
    flags: list[list[str]],
    meter: Meter,
) -> list[list[str]]:
    """LaCLIP: up to ``num_rewrites`` rewrites of each row's AltText."""
    stage, limits = config.laclip, config.cleaning
    rewrites: list[list[str]] = [[] for _ in keys]
    jobs = []  # (row, prompt text, seed)
    for i, (key, alt) in enumerate(zip(keys, alts)):
        if not (alt or "").strip():
            flags[i].append("rewrites:empty_alt_text")
            continue
        for n, text in enumerate(
            prompt.prompts(key, alt, config.num_rewrites, config.shots, config.seed, limits.max_alt_text_chars)
        ):
            jobs.append((i, text, request_seed(config.seed, key, n + 1)))
    for (i, _, _), completion in zip(jobs, meter.run(engine, [Request(prompt=p, seed=s) for _, p, s in jobs], stage)):
        text, reason = clean(completion, limits)
        if text:
            rewrites[i].append(text)
        else:
            flags[i].append(f"rewrites:{reason}")
    return rewrites


def provenance(model: str, prompt_version: str, engine_name: str) -> dict:
    return {"model": model, "prompt_version": prompt_version, "engine": engine_name}


def caption_table(
    keys: list[str],
    kept: pa.Table,
    generated: dict[str, tuple[list, dict | None]],
    flags: list[list[str]],
    errors: dict[str, tuple[str, str]],
) -> pa.Table:
    """The caption-table layout: one row per input row (``keys``, in order), the columns this
    run generated (only those: another run's can be joined beside them) for the ``kept`` rows,
    and for a refused row nulls and its ``image:<reason>`` flag."""
    index = {key: i for i, key in enumerate(kept.column(schema.KEY).to_pylist())}
    every = {
        name: ([values[index[k]] if k in index else None for k in keys], origin)
        for name, (values, origin) in generated.items()
    }
    every_flags = [flags[index[k]] if k in index else [f"image:{errors[k][0]}"] for k in keys]
    return assemble(pa.table({schema.KEY: pa.array(keys, pa.string())}), every, every_flags, every_column=False)


def assemble(
    table: pa.Table, generated: dict[str, tuple[list, dict | None]], flags: list[list[str]], every_column: bool = True
) -> pa.Table:
    """The enriched shard: the input rows, every generated column (null where this run made
    none; left out unless ``every_column``) with its provenance, and the flags."""
    n = table.num_rows
    for f in schema.GENERATED_FIELDS:
        if (
            f.name.endswith("_provenance")
            or f.name == schema.REWRITE_FLAGS
            or not (every_column or f.name in generated)
        ):
            continue
        values, origin = generated.get(f.name, ([None] * n, None))
        table = table.append_column(f, pa.array(values, f.type))
        origin_field = schema.ENRICHED_SCHEMA.field(schema.provenance_column(f.name))
        table = table.append_column(origin_field, pa.array([origin] * n, origin_field.type))
    return table.append_column(
        schema.ENRICHED_SCHEMA.field(schema.REWRITE_FLAGS), pa.array(flags, pa.list_(pa.string()))
    )
