"""Image embeddings for eval: in this process, or over a Ray Data actor pool for large sets.

Both paths share :func:`embed_images`, so they give the same numbers. The Ray
path reads the shards with Ray Data and streams them through up to ``workers``
actors, each holding one copy of the model (a GPU each with ``gpus_per_worker``);
rows come back with their labels and captions, so alignment never depends on
arrival order. Text embeddings stay on the driver: class prompts and captions
are small next to the images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from veclip import schema
from veclip.images import ImageError, ImageLimits, decode_image

DECODE_THREADS = min(8, os.cpu_count() or 1)  # images decoded at once per embedding process


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedding worker needs: the model, the columns to carry, the batch size."""

    model: str
    pretrained: str | None
    carry: tuple[str, ...]  # label and caption columns, passed through with each row
    batch_size: int = 256


def embed_images(
    model, preprocess, images, batch_size: int, limits: ImageLimits = ImageLimits(), device=None
) -> tuple[np.ndarray, list[str | None]]:
    """Embeddings of the images that decode (on ``device``, default the CPU), and each image's decode error
    (None when it decoded). ``images``: image bytes, a list or a pyarrow array. Memory stays bounded by the
    batch: a batch is decoded (on threads: decoding releases the GIL), embedded and dropped before the next,
    never a whole shard of decoded tensors at once (~6 GB at 10k rows and 224 px)."""
    import torch

    def decode(data) -> tuple[object, str | None]:
        try:
            return preprocess(decode_image(data, limits)), None
        except ImageError as e:
            return None, e.reason

    out, errors = [], []
    with ThreadPoolExecutor(DECODE_THREADS) as pool, torch.no_grad():
        for start in range(0, len(images), batch_size):
            part = images[start : start + batch_size]
            decoded = list(pool.map(decode, part.to_pylist() if hasattr(part, "to_pylist") else part))
            errors += [error for _, error in decoded]
            tensors = [tensor for tensor, error in decoded if error is None]
            if tensors:
                out.append(model.encode_image(torch.stack(tensors).to(device)).float().cpu().numpy())
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), errors


def encode_texts(model, tokenizer, texts: list[str], batch_size: int, device=None) -> np.ndarray:
    """Text embeddings, ``batch_size`` texts per forward pass (on ``device``, default the CPU)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _embedded_table(table: pa.Table, embeddings: np.ndarray, errors: list[str | None], carry) -> pa.Table:
    """Every row: key, carried columns, the embedding (null where the image failed) and the error reason."""
    rows = iter(embeddings.tolist())
    vectors = [None if e else next(rows) for e in errors]
    return (
        table.select([schema.KEY, *carry])
        .append_column("embedding", pa.array(vectors, pa.list_(pa.float32())))
        .append_column("error", pa.array(errors, pa.string()))
    )


class ImageEmbedder:
    """Ray Data actor: loads the model once, embeds each batch of rows."""

    def __init__(self, spec: EmbedSpec, options):
        from veclip.eval.model import load_model

        self.spec = spec
        self.model, self.preprocess, _ = load_model(spec.model, spec.pretrained, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        embeddings, errors = embed_images(self.model, self.preprocess, batch.column(schema.IMAGE), self.spec.batch_size)
        return _embedded_table(batch, embeddings, errors, self.spec.carry)


def embed_local(tables: Iterable[pa.Table], model, preprocess, spec: EmbedSpec) -> pa.Table:
    """Rows with embeddings (or errors), computed in this process (``tables``: a stream of batches)."""
    parts = []
    for table in tables:
        embeddings, errors = embed_images(model, preprocess, table.column(schema.IMAGE), spec.batch_size)
        parts.append(_embedded_table(table, embeddings, errors, spec.carry))
    return pa.concat_tables(parts)


def _read_shards(batch: dict, dataset, columns: schema.ColumnMap) -> Iterator[pa.Table]:
    """The shards' rows (captions joined), a batch at a time: a Ray task per shard, which Ray retries on
    another node when its node is lost (Ray Data's own Parquet reader runs its footer reads on an actor
    that is not restarted: a lost node failed the whole eval)."""
    from veclip.dataset import read_shard_batches

    for i in batch["shard"].tolist():
        yield from read_shard_batches(dataset, dataset.shards[i], column_map=columns)


def embed_ray(
    dataset,
    columns: schema.ColumnMap,
    spec: EmbedSpec,
    options,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
) -> pa.Table:
    """Rows with embeddings (or errors), computed by up to ``workers`` Ray actors, in key order.
    ``dataset``: a :class:`veclip.dataset.Dataset`; caption tables are joined shard by shard."""
    import ray
    from ray.data import ActorPoolStrategy

    from veclip.console import start_ray

    start_ray()
    # a task per shard reads it and joins its caption tables (checked)
    ds = ray.data.from_items(
        [{"shard": i} for i in range(len(dataset.shards))], override_num_blocks=len(dataset.shards)
    )
    ds = ds.map_batches(
        _read_shards, batch_size=1, batch_format="numpy", fn_kwargs=dict(dataset=dataset, columns=columns)
    )
    ds = ds.map_batches(
        ImageEmbedder,
        fn_constructor_args=(spec, options),
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(schema.KEY)
