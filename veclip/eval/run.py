"""``veclip eval``: zero-shot classification and retrieval of a model on a Parquet eval set.

The eval set is shards in the input schema plus a label column (class names,
for zero-shot) and a caption column (a string or a list of strings, for
retrieval); the sample generator's eval split is one. Class names come from
``--classes`` (a JSON file with ``classnames``) or the set's own
``_classes.json``; prompt templates from a shipped set (``generic``,
``imagenet``) or a JSON file. The model is an exported folder (open_clip
``local-dir:``), a training run or checkpoint folder, or an open_clip name
with ``--pretrained``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from veclip import schema
from veclip.config import load_named_json
from veclip.dataset import Dataset, open_dataset, read_shard_batches
from veclip.eval.embed import EmbedSpec, embed_local, embed_ray, encode_texts
from veclip.eval.metrics import class_embeddings, retrieval, zero_shot
from veclip.eval.model import load_model
from veclip.storage import Location, StorageOptions, refuse_overlap, write_json


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""  # an exported folder, a training run or checkpoint, or an open_clip name
    input: str = ""  # eval shards: folder or s3:// prefix
    output: str | None = None  # write eval.json and eval.md here
    pretrained: str | None = None  # with an open_clip model name
    label_column: str = "label_shape"  # class-name column(s) for zero-shot, comma-separated: label_shape,label_brand
    caption_column: str = "caption"  # caption (string or list) column for retrieval
    classes: str | None = None  # JSON file with "classnames" (default: the set's _classes.json)
    templates: str = "generic"  # prompt templates: generic, imagenet, scenes, or a JSON file
    batch_size: int = 256  # images and texts per forward pass
    workers: int = 0  # 0: embed images in this process; N: over up to N Ray actors
    gpus_per_worker: float = 0.0  # GPUs per embedding actor
    cpus_per_worker: float = 1.0  # CPUs per embedding actor
    columns: schema.ColumnMap = field(
        default_factory=schema.ColumnMap
    )  # the set's column names for the contract's roles (see schema.ColumnMap)

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.label_column.split(",") if c.strip())


def load_templates(name_or_path: str) -> list[str]:
    return load_named_json(name_or_path, "veclip.eval", "zeroshot", "template set")["templates"]


def _class_names(config: EvalConfig, location: Location, column: str) -> list[str]:
    """``--classes FILE``'s names (one label column), else the set's ``_classes.json`` entry for ``column``."""
    if config.classes:
        if len(config.label_columns) > 1:
            raise ValueError(
                "eval: --classes names one column's classes; with several label columns use the set's _classes.json"
            )
        return json.loads(Path(config.classes).read_text())["classnames"]
    classes_path = location.join(schema.CLASSES_FILE)  # beside the images
    if not location.fs.exists(classes_path):
        raise FileNotFoundError(f"eval: {config.input} has no _classes.json; pass --classes FILE")
    return json.loads(location.fs.cat_file(classes_path))[column]


def _check_columns(names: list[str], path: str, config: EvalConfig) -> None:
    """A clear error if eval's columns are missing (``names``: under the contract's names)."""
    missing = [c for c in (schema.IMAGE, *config.label_columns, config.caption_column) if c not in names]
    if missing:
        raise schema.SchemaError(f"eval: {path} has no column(s) {missing}; set --label-column / --caption-column")


def _read_batches(dataset: Dataset, config: EvalConfig) -> Iterator[pa.Table]:
    """Every shard a batch of rows at a time: each batch's images are embedded and dropped before the
    next is read, so memory holds a batch of images, never the set's."""
    for shard in dataset.shards:
        for table in read_shard_batches(dataset, shard, column_map=config.columns):
            _check_columns(table.column_names, shard.path, config)
            yield table


def evaluate(config: EvalConfig, options: StorageOptions | None = None) -> dict:
    """Zero-shot and retrieval on a set of shards, or on a caption output joined to its images
    (e.g. ``--caption-column vecap`` to retrieve with generated captions)."""
    options = options or StorageOptions()
    if config.output:
        refuse_overlap("eval", config.output, [config.input], options)
    dataset = open_dataset(config.input, options, stage="eval")
    location = dataset.images
    model, preprocess, tokenizer = load_model(config.model, config.pretrained, options)
    spec = EmbedSpec(config.model, config.pretrained, (*config.label_columns, config.caption_column), config.batch_size)
    if config.workers > 0:
        first = dataset.shards[0].path
        with location.fs.open(first, "rb") as f:  # a clear schema error before any actor starts (footer only)
            names = config.columns.apply(pq.read_schema(f).empty_table()).column_names + list(dataset.caption_columns)
        _check_columns(names, first, config)
        embedded = embed_ray(
            dataset, config.columns, spec, options, config.workers, config.gpus_per_worker, config.cpus_per_worker
        )
    else:
        embedded = embed_local(_read_batches(dataset, config), model, preprocess, spec)
    errors = embedded.column("error").to_pylist()
    skipped = Counter(e for e in errors if e)
    kept = embedded.filter(pc.is_null(embedded.column("error"))).to_pylist()
    image_embeddings = np.array([r["embedding"] for r in kept], np.float32)

    # zero-shot per label column: class names x templates, averaged per class, on the rows with a label
    zs, classnames, templates = {}, {}, load_templates(config.templates)
    for column in config.label_columns:
        rows = [i for i, r in enumerate(kept) if r[column] is not None]
        if not rows:
            continue
        classnames[column] = _class_names(config, location, column)
        prompts = [t.format(c) for c in classnames[column] for t in templates]
        per_class = encode_texts(model, tokenizer, prompts, config.batch_size).reshape(
            len(classnames[column]), len(templates), -1
        )
        index = {name: i for i, name in enumerate(classnames[column])}
        unknown = sorted({kept[i][column] for i in rows} - set(index))
        if unknown:
            raise ValueError(f"eval: {column} labels {unknown[:5]} are not among the {len(index)} class names")
        labels = np.array([index[kept[i][column]] for i in rows])
        scores = zero_shot(image_embeddings[rows], class_embeddings(per_class), labels)
        zs[column] = {**scores, "classes": len(index), "images": len(rows)}

    # retrieval: one or several captions per image
    texts, text_image = [], []
    for i, row in enumerate(kept):
        captions = row[config.caption_column]
        for caption in captions if isinstance(captions, list) else [captions]:
            if caption and caption.strip():  # a generated caption the rewrite refused is null: nothing to match
                texts.append(caption)
                text_image.append(i)
    rt = retrieval(image_embeddings, encode_texts(model, tokenizer, texts, config.batch_size), np.array(text_image))

    results = {
        "model": config.model,
        "data": config.input,
        "images": len(kept),
        "images_skipped": sum(skipped.values()),
        "images_skipped_by_reason": dict(skipped),
        "captions": len(texts),
        "images_without_caption": len(kept) - len(set(text_image)),
        "classes": sum(len(c) for c in classnames.values()),
        "templates": len(templates) if classnames else 0,
        "zero_shot": zs,
        "retrieval": rt,
    }
    if config.output:
        out = Location(config.output, options)
        write_json(out.fs, out.join("eval.json"), results)
        out.fs.pipe_file(out.join("eval.md"), render_markdown(results).encode())
    return results


def render_markdown(results: dict) -> str:
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"{results['images']} images ({results['images_skipped']} skipped), {results['captions']} captions, "
        f"{results['classes']} classes x {results['templates']} templates, from `{results['data']}`.",
        "",
    ]
    if results["zero_shot"]:
        lines += ["| zero-shot | top-1 | top-5 | classes | images |", "| --- | --- | --- | --- | --- |"]
    for column, scores in results["zero_shot"].items():
        lines.append(
            f"| {column} | {scores['top1']:.1%} | {scores['top5']:.1%} | {scores.get('classes', '')} | "
            f"{scores.get('images', '')} |"
        )
    r = results["retrieval"]
    lines += [
        "",
        "| retrieval | R@1 | R@5 | R@10 |",
        "| --- | --- | --- | --- |",
        f"| image -> text | {r['image_to_text_R@1']:.1%} | {r['image_to_text_R@5']:.1%} | "
        f"{r['image_to_text_R@10']:.1%} |",
        f"| text -> image | {r['text_to_image_R@1']:.1%} | {r['text_to_image_R@5']:.1%} | "
        f"{r['text_to_image_R@10']:.1%} |",
    ]
    return "\n".join(lines) + "\n"
