"""Ray Data side of training: finished shards -> each worker's exact stream of batches.

The driver plans once (:func:`plan_data`): the finished shards, their row
groups (see :mod:`veclip.train.order`) and the columns to read. Each worker
then builds one Ray Data stream over many epochs from its position
(:func:`worker_stream`), so the pipeline reads and decodes the next epoch
while this one trains and never restarts or drains between passes. One task
per (epoch, window) reads the window's row groups and emits its rows in the
window's permuted order; CPU tasks choose each row's caption (a pure function
of (seed, epoch, key), :mod:`veclip.train.captions`) and tokenize only that
one, decode each image (safely) and apply open_clip's train augmentation for
the model with a seed that is a pure function of (seed, epoch, key). Images
travel as uint8 (4x smaller than float) and are normalised on the worker's
device; with ``decode="device"`` a JPEG travels as its bytes and crop box and
the worker decodes it (:func:`decode_on_device`). With ``per_image`` K > 1 a
row carries K captions' tokens. ``preserve_order`` keeps the rows in that order, so
:func:`exact_batches` cuts the same batches every time, never across an epoch.

Rows with an unusable image or no usable caption are not dropped in the tasks
but flagged (``skip``): the worker passes over them in order and counts them
in its checkpointed state, so each is counted once per pass even across
restarts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from veclip import schema
from veclip.dataset import Acceptance, Dataset, Shard, join_captions, open_dataset
from veclip.images import ImageError, ImageLimits, check_jpeg, decode_loaded, open_image
from veclip.storage import BATCH_ROWS, Location, StorageOptions, no_shards, streaming_parquet, with_retries
from veclip.train.augment import augment_and_tokenizer, crop_box, crop_for_device, resized_crop
from veclip.train.captions import (
    CaptionConfig,
    choose,
    choose_several,
    gated,
    key_hash,
    row_seeds,
    trainable,
)
from veclip.train.order import (
    UNREADABLE_FOOTER,
    Position,
    ReadUnit,
    read_units,
    split_units,
    window_order,
    worker_windows,
)

CAPTION_COLUMNS = schema.CAPTION_COLUMNS  # what the caption slots are read from
READ_COLUMNS = (*CAPTION_COLUMNS, schema.REWRITE_FLAGS)  # and the flags, for the caption gate's (veclip score)
CHUNK_ROWS = 256  # rows per block a window's read task emits, and per preprocess task
SKIP_REASONS = ("", "image_unusable", "no_usable_caption", "null_key")  # index = the ``skip`` code
MAX_STREAM_WINDOWS = 2048  # (epoch, window) items per stream: bounds its plan; a longer run starts another


@dataclass(frozen=True)
class DataPlan:
    """What every worker needs to read its part of any epoch (built once by the driver)."""

    dataset: Dataset  # the image shards and the caption tables joined to them
    units: tuple[ReadUnit, ...]
    source_columns: tuple[str, ...]  # read from the image shards
    caption_columns: tuple[str, ...]  # read from the caption tables
    columns: schema.ColumnMap
    shards: int
    shards_skipped: dict[str, int]

    def fingerprint(self, seed: int, window_units: int) -> str:
        """Which rows each unit holds, in order, and the seed and window that deal and permute them: a
        checkpoint's positions mean the same rows only under it."""
        units = [
            (u.path.rsplit("/", 1)[-1], u.row_group, u.rows, u.first_row, u.offset, u.captions) for u in self.units
        ]
        order = {"units": units, "seed": seed, "window_units": window_units}
        return hashlib.sha256(json.dumps(order, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StreamSpec:
    """How the rows are turned into training samples (from the train config)."""

    model: str
    captions: CaptionConfig
    limits: ImageLimits
    seed: int
    window_units: int
    preprocess_cpus: float
    prefetch_batches: int
    decode: str = "cpu"  # or "device": JPEGs decode on the train worker's device


def plan_data(
    url: str,
    options: StorageOptions,
    columns: schema.ColumnMap,
    workers: int,
    add_captions: tuple[str, ...] = (),
    log=print,
    accept: Acceptance = Acceptance(),
) -> DataPlan:
    """Finished shards and their row groups; for a caption output (``rewrite --layout captions``)
    and for ``add_captions``, the row groups are the input's, each paired with its caption tables."""
    dataset = open_dataset(url, options, add_captions, stage="train", accept=accept)
    skipped = dict(dataset.skipped)
    by_path = {shard.path: shard.captions for shard in dataset.shards}
    units, unreadable = read_units(dataset.images.fs, [(s.path, s.size) for s in dataset.shards], by_path)
    if unreadable:
        skipped[UNREADABLE_FOOTER] = len(unreadable)
        path, error = next(iter(unreadable.items()))
        log(f"train: {len(unreadable)} shard(s) with an unreadable footer left out, e.g. {path}: {error}")
    shards = len(dataset.shards) - len(unreadable)
    for source in dataset.sources:
        log(
            f"train: captions {sorted(c for c in source.columns.values() if c in CAPTION_COLUMNS)} from {source.url}, "
            f"joined by key to their images in {dataset.images_url}"
        )
    if skipped:
        log(
            f"train: using {shards} finished shards of {url}; skipped "
            + ", ".join(f"{n} ({why})" for why, n in skipped.items())
        )
    if not units:
        raise no_shards("train", url, "finished .parquet shards with rows")
    units = split_units(units, workers)  # fewer row groups than workers: row ranges
    if len(units) < workers:
        raise ValueError(
            f"train: {sum(u.rows for u in units)} rows in {shards} shards for {workers} workers: fewer rows than "
            "workers; use fewer workers or add data"
        )
    caption_columns = tuple(c for c in READ_COLUMNS if c in dataset.caption_columns)
    return DataPlan(
        dataset,
        tuple(units),
        tuple(read_columns(dataset.images, units[0].path, columns)),
        caption_columns,
        columns,
        shards,
        skipped,
    )


def read_columns(location: Location, path: str, columns: schema.ColumnMap) -> list[str]:
    """The source columns to read: key, image and whichever caption columns exist."""
    import pyarrow.parquet as pq

    with location.fs.open(path, "rb") as f:
        footer = pq.read_schema(f)
    try:
        mapped = columns.apply_to_footer(footer)
    except schema.SchemaError as err:
        raise schema.SchemaError(f"train: {path}: {err}") from None
    schema.check_input_schema(mapped, path)
    names = mapped.names
    wanted = [schema.KEY, schema.IMAGE] + [c for c in READ_COLUMNS if c in names]
    renames = {dst: src for src, dst in columns.renames().items()}
    return [renames.get(c, c) for c in wanted]


def _rows(batches, offset: int, rows: int) -> pa.Table:
    """Rows ``offset`` .. ``offset + rows`` of a row group's batches: a row range streams its group up to
    its end, never holding the whole group."""
    parts, seen = [], 0
    for batch in batches:
        start, stop = max(offset - seen, 0), min(offset + rows - seen, batch.num_rows)
        if stop > start:
            parts.append(pa.Table.from_batches([batch.slice(start, stop - start)]))
        seen += batch.num_rows
        if seen >= offset + rows:
            break
    if seen < offset + rows:
        raise ValueError(f"the row group has {seen} rows, its footer said at least {offset + rows}: was it rewritten?")
    return pa.concat_tables(parts)


def read_window(
    batch: dict, plan: DataPlan, start: Position, rank: int, world: int, seed: int, window_units: int
) -> Iterator[pa.Table]:
    """Each (epoch, window) item's rows in the window's permuted order (from ``start.offset`` in the first),
    in chunks."""

    dataset = plan.dataset

    def read(unit: ReadUnit) -> pa.Table:
        with dataset.images.fs.open(unit.path, "rb") as f:
            parquet = streaming_parquet(f)
            wanted = [c for c in plan.source_columns if c in parquet.schema_arrow.names]
            batches = parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[unit.row_group], columns=wanted)
            table = plan.columns.apply(_rows(batches, unit.offset, unit.rows))
        if unit.captions:
            table = join_captions(
                table, Shard(unit.path, 0, unit.captions), unit.first_row, dataset, plan.caption_columns
            )
        return table

    for epoch, window in zip(batch["epoch"].tolist(), batch["window"].tolist()):
        units = worker_windows(list(plan.units), seed, epoch, rank, world, window_units)[window]
        # an S3 error that outlived s3fs's own retries would otherwise restart the whole worker group
        tables = [with_retries(lambda unit=unit: read(unit), f"reading {unit.path}") for unit in units]
        table = pa.concat_tables(tables, promote_options="default")
        order = window_order(table.num_rows, seed, epoch, rank, window)
        first = start.offset if (epoch, window) == (start.epoch, start.window) else 0
        for offset in range(first, len(order), CHUNK_ROWS):
            chunk = table.take(order[offset : offset + CHUNK_ROWS])
            n = chunk.num_rows
            for name, values in (
                ("_epoch", np.full(n, epoch)),
                ("_window", np.full(n, window)),
                ("_offset", np.arange(offset, offset + n)),
            ):
                chunk = chunk.append_column(name, pa.array(values.astype(np.int64)))
            yield chunk


def preprocess(
    batch: pa.Table, model_name: str, captions: CaptionConfig, limits: ImageLimits, seed: int, decode: str = "cpu"
) -> dict:
    """Decoded, augmented images and each row's chosen caption, tokenized; unusable rows flagged in ``skip``.
    With ``decode="device"`` a JPEG is only proven decodable here and travels as its bytes with its crop
    box (``jpeg``, ``box``, ``on_device``), for :func:`decode_on_device` on the worker; other formats decode here."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    augment, (height, width), tokenizer = augment_and_tokenizer(model_name)
    device_crop = crop_for_device(augment) if decode == "device" else None
    n = batch.num_rows
    epochs = batch.column("_epoch").to_numpy()
    slots = captions.slot_texts(
        lambda name: batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    )
    present = np.array([[t is not None for t in slot] for slot in slots], dtype=bool).reshape(len(slots), n).T
    usable = (
        np.array([[t is not None and len(t.split()) >= captions.min_words for t in slot] for slot in slots], dtype=bool)
        .reshape(len(slots), n)
        .T
    )
    if schema.REWRITE_FLAGS in batch.column_names:  # slots the caption gate flagged
        usable &= ~gated(batch.column(schema.REWRITE_FLAGS).to_pylist(), captions.slots)
    weights = captions.slot_weights()
    skip = np.where(trainable(usable, weights), 0, SKIP_REASONS.index("no_usable_caption")).astype(np.int8)
    keys = batch.column(schema.KEY).to_pylist()
    hashes = np.array([key_hash(k) if k is not None else 0 for k in keys], dtype=np.int64)
    skip[[i for i, k in enumerate(keys) if k is None]] = SKIP_REASONS.index(
        "null_key"
    )  # no key: nothing to join or seed by
    k = captions.per_image
    chosen, seeds = np.zeros((n, k), np.int64), np.zeros(n, np.int64)
    for epoch in np.unique(epochs):  # one, unless Ray Data joined two windows' chunks
        rows = epochs == epoch
        if k == 1:
            chosen[rows, 0] = choose(hashes[rows], present[rows], usable[rows], weights, seed, int(epoch))
        else:
            chosen[rows] = choose_several(hashes[rows], usable[rows], weights, seed, int(epoch), k)
        seeds[rows] = row_seeds(hashes[rows], seed, int(epoch))
    images = np.zeros((n, 3, height, width), dtype=np.uint8)
    jpegs, boxes, on_device = np.full(n, b"", dtype=object), np.zeros((n, 4), np.int32), np.zeros(n, np.int8)
    image_column = batch.column(schema.IMAGE)
    for i in np.flatnonzero(skip == 0):
        data = image_column[i].as_py()
        try:
            image = open_image(data, limits)
            if device_crop is not None and image.format == "JPEG":
                boxes[i] = crop_box(
                    device_crop, *image.size, random.Random(int(seeds[i]))
                )  # the full size, before draft
                check_jpeg(image)
                jpegs[i], on_device[i] = data, 1
                continue
            image = decode_loaded(image)
        except ImageError:
            skip[i] = SKIP_REASONS.index("image_unusable")
            continue
        # the augmentation is a pure function of (seed, epoch, key); seeding only the CPU
        # generator costs ~1 us, torch.manual_seed (every device) ~70 us
        torch.random.default_generator.manual_seed(int(seeds[i]))
        draw = random.Random(int(seeds[i]))
        for transform in augment:
            image = (
                resized_crop(transform, image, draw) if isinstance(transform, RandomResizedCrop) else transform(image)
            )
        images[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    tokens = np.zeros((n, k, tokenizer.context_length), dtype=np.int32)
    rows = np.flatnonzero(skip == 0)
    if len(rows):  # only the captions each row trains on this epoch
        texts = tokenizer([slots[slot][i] for i in rows for slot in chosen[i]]).numpy()
        tokens[rows] = texts.reshape(len(rows), k, -1)
    if k == 1:
        tokens, chosen = tokens[:, 0], chosen[:, 0]
    positions = {name: batch.column(name).to_numpy() for name in ("_epoch", "_window", "_offset")}
    device = {"jpeg": jpegs, "box": boxes, "on_device": on_device} if device_crop is not None else {}
    return {
        "image": images,
        "tokens": tokens,
        "slot": chosen.astype(np.int8),
        "key_hash": hashes,
        "skip": skip,
        **positions,
        **device,
    }


def epochs_to_read(plan: DataPlan, spec: StreamSpec, batch_size: int, steps_left: int, world: int) -> int:
    """The epochs one stream covers, the same on every worker: enough for the rest of the run with room
    for rows passed over, in whole epochs of at most ``MAX_STREAM_WINDOWS`` windows (a longer run starts another)."""
    rows_per_worker = sum(u.rows for u in plan.units) / world
    needed = math.ceil(steps_left * batch_size * 1.25 / max(rows_per_worker, 1.0)) + 1
    windows = math.ceil(math.ceil(len(plan.units) / world) / spec.window_units)  # the most any worker has
    return max(1, min(needed, MAX_STREAM_WINDOWS // windows))


def worker_stream(plan: DataPlan, spec: StreamSpec, position: Position, rank: int, world: int, epochs: int):
    """This worker's rows from ``position`` on through ``epochs`` epochs, in order: one Ray Dataset
    (None when none are left), so the next epoch is read ahead while this one trains."""
    import ray
    from ray.data import DataContext

    from veclip.console import verbose

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # the order is the contract
    context.enable_progress_bars = verbose()  # a bar per worker's stream would flood the job's console
    windows = len(
        worker_windows(list(plan.units), spec.seed, 0, rank, world, spec.window_units)
    )  # the same every epoch
    items = [
        {"epoch": e, "window": w}
        for e in range(position.epoch, position.epoch + epochs)
        for w in range(position.window if e == position.epoch else 0, windows)
    ]
    if not items:
        return None
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            # Reading is I/O-bound, and a CPU request unlike preprocess's keeps Ray Data from fusing the
            # two: a window's chunks are then preprocessed by many tasks at once, not one after another.
            read_window,
            batch_size=1,
            batch_format="numpy",
            num_cpus=spec.preprocess_cpus / 4,
            fn_kwargs=dict(
                plan=plan, start=position, rank=rank, world=world, seed=spec.seed, window_units=spec.window_units
            ),
        )
        .map_batches(
            preprocess,
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=spec.preprocess_cpus,
            fn_kwargs=dict(
                model_name=spec.model, captions=spec.captions, limits=spec.limits, seed=spec.seed, decode=spec.decode
            ),
        )
    )


@dataclass
class Batch:
    """``size`` trainable rows of one epoch, where the stream stands after them, and the rows passed over on the way."""

    rows: dict[str, np.ndarray]
    epoch: int
    position: Position
    skipped: dict[str, int]


def exact_batches(blocks: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[Batch]:
    """Cut a worker's ordered stream into batches of ``size`` trainable rows, independent of block sizes;
    a batch never spans two epochs (an epoch's last rows short of a batch are left unread)."""
    parts: list[tuple[dict, np.ndarray, int, int]] = []  # (block, rows taken, first row passed, end)
    have, epoch = 0, None
    for block in _one_epoch_each(blocks):
        if block["_epoch"][0] != epoch:
            parts, have, epoch = [], 0, int(block["_epoch"][0])
        keep = np.flatnonzero(block["skip"] == 0)
        start = 0
        while True:
            take = keep[keep >= start][: size - have]
            if have + len(take) < size:
                parts.append((block, take, start, len(block["skip"])))
                have += len(take)
                break
            end = int(take[-1]) + 1
            parts.append((block, take, start, end))
            yield _assemble(parts, epoch)
            parts, have, start = [], 0, end


def _one_epoch_each(blocks: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The blocks, split where the epoch changes (rows are in order, so each epoch's are contiguous);
    empty ones dropped."""
    for block in blocks:
        epochs = block["_epoch"]
        cuts = [0, *(np.flatnonzero(np.diff(epochs)) + 1), len(epochs)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                yield block if (a, b) == (0, len(epochs)) else {k: v[a:b] for k, v in block.items()}


def _assemble(parts: list[tuple[dict, np.ndarray, int, int]], epoch: int) -> Batch:
    names = ("image", "tokens", "slot", "key_hash", *(("jpeg", "box", "on_device") if "jpeg" in parts[0][0] else ()))
    rows = {name: np.concatenate([block[name][take] for block, take, _, _ in parts]) for name in names}
    codes = np.concatenate([block["skip"][start:end] for block, _, start, end in parts])
    skipped = {reason: int((codes == i).sum()) for i, reason in enumerate(SKIP_REASONS) if i and (codes == i).any()}
    block, take, _, _ = parts[-1]
    last = int(take[-1])
    return Batch(rows, epoch, Position(epoch, int(block["_window"][last]), int(block["_offset"][last]) + 1), skipped)
