"""Ray Data side of training: enriched shards -> augmented images + tokenized caption slots.

CPU tasks decode each image (safely), apply open_clip's train augmentation
for the model (without the final float conversion: images travel as uint8,
4x smaller, and are normalised on the worker's device), and tokenize every
caption slot with the model's tokenizer. The caption itself is chosen on the
worker, per epoch (see :mod:`veclip.train.captions`). Rows with an unusable
image or no usable caption are dropped here and counted in a small named actor.

Shard order is reshuffled every epoch (``FileShuffleConfig``); each worker adds
a local shuffle buffer when it iterates.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from veclip import schema
from veclip.images import ImageError, ImageLimits, decode_image
from veclip.storage import Location, StorageOptions, finished_shards
from veclip.train.captions import CaptionConfig, key_hash, trainable

CAPTION_COLUMNS = (schema.ALT_TEXT, schema.VECAP, schema.VLM_CAPTION, schema.REWRITES)


def counter_name(run_name: str) -> str:
    return f"veclip-train-skips-{run_name}"


class SkipCounter:
    """Counts rows dropped before training, by reason (a Ray actor)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, reason: str, n: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


@functools.lru_cache(maxsize=4)
def _augment_and_tokenizer(model_name: str):
    """open_clip's train transform minus ToTensor/Normalize, and the model's tokenizer."""
    import open_clip

    from veclip.train.model import register_configs

    register_configs()
    _, train_transform, _ = open_clip.create_model_and_transforms(model_name, load_weights=False)
    keep = [t for t in train_transform.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    return keep, open_clip.get_tokenizer(model_name)


def _slot_texts(batch: pa.Table, captions: CaptionConfig) -> list[list[str | None]]:
    """Per slot, the text of every row (None where absent)."""
    n = batch.num_rows
    column = lambda name: batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    rewrites = column(schema.REWRITES)
    out = [column(schema.ALT_TEXT), column(schema.VECAP), column(schema.VLM_CAPTION)]
    for i in range(captions.max_rewrites):
        out.append([r[i] if r is not None and i < len(r) else None for r in rewrites])
    return out


def preprocess(batch: pa.Table, model_name: str, captions: CaptionConfig, limits: ImageLimits, counter: str | None) -> dict:
    augment, tokenizer = _augment_and_tokenizer(model_name)
    slots = _slot_texts(batch, captions)
    present = np.array([[t is not None for t in slot] for slot in slots]).T
    usable = np.array([[t is not None and len(t.split()) >= captions.min_words for t in slot] for slot in slots]).T
    keep = trainable(usable, captions.slot_weights())
    images, kept = [], []
    image_column = batch.column(schema.IMAGE)
    bad_images = 0
    for i in range(batch.num_rows):
        if not keep[i]:
            continue
        try:
            image = decode_image(image_column[i].as_py(), limits)
        except ImageError:
            bad_images += 1
            continue
        for transform in augment:
            image = transform(image)
        images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        kept.append(i)
    if counter and (bad_images or (~keep).sum()):
        import ray

        handle = ray.get_actor(counter)
        if bad_images:
            handle.add.remote("image_unusable", bad_images)
        if (~keep).sum():
            handle.add.remote("no_usable_caption", int((~keep).sum()))
    context = tokenizer.context_length
    tokens = np.zeros((len(kept), len(slots), context), dtype=np.int32)
    for s, texts in enumerate(slots):
        rows = [j for j, i in enumerate(kept) if texts[i] is not None]
        if rows:
            tokens[rows, s] = tokenizer([texts[kept[j]] for j in rows]).numpy()
    keys = batch.column(schema.KEY).to_pylist()
    return {
        "image": np.stack(images) if images else np.zeros((0, 3, 1, 1), np.uint8),
        "tokens": tokens,
        "present": present[kept],
        "usable": usable[kept],
        "key_hash": np.array([key_hash(keys[i]) for i in kept], dtype=np.int64),
    }


def read_columns(location: Location, paths: list[str], columns: schema.ColumnMap) -> list[str]:
    """The source columns to read: key, image and whichever caption columns exist."""
    import pyarrow.parquet as pq

    with location.fs.open(paths[0], "rb") as f:
        mapped = columns.apply(pq.read_schema(f).empty_table()).schema
    schema.check_input_schema(mapped, paths[0])
    names = mapped.names
    wanted = [schema.KEY, schema.IMAGE] + [c for c in CAPTION_COLUMNS if c in names]
    renames = {dst: src for src, dst in columns.renames().items()}
    return [renames.get(c, c) for c in wanted]


def build_dataset(url: str, options: StorageOptions, columns: schema.ColumnMap, model_name: str, captions: CaptionConfig,
                  limits: ImageLimits, seed: int, counter: str | None, batch_rows: int = 256, num_cpus: float = 1.0,
                  log=print):
    """The training stream and ``{why skipped: shards}`` for shards left out (see :func:`finished_shards`)."""
    import ray

    location = Location(url, options)
    paths, skipped = finished_shards(location)
    if skipped:
        log(f"train: using {len(paths)} finished shards of {url}; skipped " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    if not paths:
        raise FileNotFoundError(f"train: no finished .parquet shards in {url}")
    source_columns = read_columns(location, paths, columns)
    ds = ray.data.read_parquet(
        paths,
        filesystem=location.arrow_fs,
        shuffle=ray.data.FileShuffleConfig(seed=seed),  # a new shard order every epoch
    ).select_columns(source_columns)  # pushed down into the Parquet reader
    renames = columns.renames()
    if renames:
        ds = ds.map_batches(lambda t: columns.apply(t), batch_format="pyarrow")
    return ds.map_batches(
        preprocess,
        batch_format="pyarrow",
        batch_size=batch_rows,
        num_cpus=num_cpus,
        fn_kwargs=dict(model_name=model_name, captions=captions, limits=limits, counter=counter),
    ), skipped
