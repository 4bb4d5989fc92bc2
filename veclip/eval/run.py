"""``veclip eval``: zero-shot classification and retrieval of a model on a Parquet eval set.

The eval set is shards in the input schema plus a label column (class names,
for zero-shot) and a caption column (a string or a list of strings, for
retrieval); the sample generator's eval split is one. Class names come from
``--classes`` (a JSON file with ``classnames``) or the set's own
``_classes.json``; prompt templates from shipped sets (``generic``,
``imagenet``, ``scenes``, ``brands``) or JSON files. Several caption columns and
template sets are each scored on their own, so that no one caption style owns
the verdict; a choice column (a list of texts per image, the right one first)
scores multiple choice among the image's own candidates, e.g. a knowledge probe
whose candidates differ only in a name. The model is an exported folder (open_clip
``local-dir:``), a training run or checkpoint folder, or an open_clip name
with ``--pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from veclip import schema
from veclip.command import Said
from veclip.config import load_named_json
from veclip.dataset import Dataset, open_dataset, read_shard_batches
from veclip.eval import clip_benchmark
from veclip.eval.config import EvalConfig, comma_names
from veclip.eval.embed import EmbedSpec, embed_local, embed_ray, encode_texts
from veclip.eval.metrics import (
    choice_ranks,
    class_embeddings,
    mean_per_class_recall,
    recall_at,
    retrieval_ranks,
    top_k,
    zero_shot_ranks,
)
from veclip.eval.model import load_model
from veclip.storage import Location, StorageOptions, refuse_overlap, write_json

RANKS_FILE = "ranks.json"


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
    missing = [c for c in (schema.IMAGE, *config.carried) if c not in names]
    if missing:
        raise schema.SchemaError(
            f"eval: {path} has no column(s) {missing}; set --label-column / --caption-column / --choice-column"
        )


def _read_batches(dataset: Dataset, config: EvalConfig) -> Iterator[pa.Table]:
    """Every shard a batch of rows at a time: each batch's images are embedded and dropped before the
    next is read, so memory holds a batch of images, never the set's."""
    for shard in dataset.shards:
        for table in read_shard_batches(dataset, shard, column_map=config.columns):
            _check_columns(table.column_names, shard.path, config)
            yield table


def evaluate(config: EvalConfig, options: StorageOptions | None = None, keep_ranks: bool = False) -> dict:
    """Zero-shot, retrieval and multiple choice on a set of shards, or on a caption output joined to its
    images (e.g. ``--caption-column vecap`` to retrieve with generated captions). ``zero_shot`` and
    ``retrieval`` are the first template set's and caption column's; ``*_by`` holds each one's.
    ``keep_ranks``: also each image's and caption's rank (``ranks``, as ``ranks.json`` beside ``eval.json``),
    for paired statistics: ``zero_shot/<templates>/<label column>``, ``retrieval/<caption column>/<way>`` and
    ``choice/<column>``, each over the images (retrieval text->image: the captions) in the set's order."""
    options = options or StorageOptions()
    if config.output:
        refuse_overlap("eval", config.output, [config.input], options)
    if clip_benchmark.is_clip_benchmark(Location(config.input, options)):  # its layout: converted, its JSON too
        return _evaluate_clip_benchmark(config, options, keep_ranks)
    dataset = open_dataset(config.input, options, stage="eval")
    location = dataset.images
    model, preprocess, tokenizer = load_model(config.model, config.pretrained, options)
    spec = EmbedSpec(config.model, config.pretrained, config.carried, config.batch_size)
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

    ranks: dict[str, np.ndarray] = {}
    zs_by, classnames = {}, {}
    template_sets = comma_names(config.templates)
    for column in config.label_columns:
        rows = [i for i, r in enumerate(kept) if r[column] is not None]
        if rows:
            classnames[column] = _class_names(config, location, column)
    templates = {name: load_templates(name) for name in template_sets}  # each set read once
    for name in template_sets:
        zs_by[name] = {}
        for column, names in classnames.items():
            rows, column_ranks = _zero_shot(
                kept, image_embeddings, column, names, templates[name], model, tokenizer, config
            )
            ranks[f"zero_shot/{name}/{column}"] = column_ranks
            labels = [kept[i][column] for i in rows]
            zs_by[name][column] = {
                **top_k(column_ranks),
                "mean_per_class_recall": mean_per_class_recall(column_ranks, labels),
                "classes": len(names),
                "images": len(rows),
            }
    rt_by = {}
    for column in config.caption_columns:
        texts, text_image = _captions(kept, column)
        i2t, t2i = retrieval_ranks(
            image_embeddings, encode_texts(model, tokenizer, texts, config.batch_size), text_image
        )
        ranks[f"retrieval/{column}/image_to_text"], ranks[f"retrieval/{column}/text_to_image"] = i2t, t2i
        rt_by[column] = recall_at(i2t, t2i) | {"captions": len(texts), "images": len(set(text_image))}
    choice = {}
    for column in config.choice_columns:
        rows = [i for i, r in enumerate(kept) if r[column]]
        if rows:
            candidates = [kept[i][column] for i in rows]
            width = len(candidates[0])
            if any(len(c) != width for c in candidates):
                raise ValueError(f"eval: {column} must hold the same number of candidates for every image")
            embedded_texts = encode_texts(model, tokenizer, [t for c in candidates for t in c], config.batch_size)
            ranks[f"choice/{column}"] = choice_ranks(
                image_embeddings[rows], embedded_texts.reshape(len(rows), width, -1)
            )
            choice[column] = {**top_k(ranks[f"choice/{column}"], (1,)), "candidates": width, "images": len(rows)}
    first_captions = rt_by[config.caption_columns[0]] if config.caption_columns else {}
    results = {
        "model": config.model,
        "input": config.input,
        "images": len(kept),
        "images_skipped": sum(skipped.values()),
        "images_skipped_by_reason": dict(skipped),
        "captions": first_captions.get("captions", 0),
        "images_without_caption": len(kept) - first_captions.get("images", 0),
        "classes": sum(len(c) for c in classnames.values()),
        "templates": len(templates[template_sets[0]]) if classnames else 0,
        "zero_shot": zs_by[template_sets[0]] if template_sets else {},
        "retrieval": {k: v for k, v in first_captions.items() if "@" in k},
        "zero_shot_by_templates": zs_by,
        "retrieval_by_caption": rt_by,
        "choice": choice,
    }
    ranks = {name: np.asarray(r).tolist() for name, r in ranks.items()}
    if config.output:
        out = Location(config.output, options)
        write_json(out.fs, out.join("eval.json"), results)
        write_json(out.fs, out.join(RANKS_FILE), ranks)  # per image and caption: for paired statistics
        out.fs.pipe_file(out.join("eval.md"), render_markdown(results).encode())
    return results | {"ranks": ranks} if keep_ranks else results


def _evaluate_clip_benchmark(config: EvalConfig, options: StorageOptions, keep_ranks: bool) -> dict:
    """:func:`evaluate` on a set in clip_benchmark's layout (:mod:`veclip.eval.clip_benchmark`): converted to
    Parquet in a temporary folder, evaluated with its own class names and templates, and clip_benchmark's
    JSON written beside ours."""
    with tempfile.TemporaryDirectory(prefix="veclip-clip-benchmark-") as tmp:
        info = clip_benchmark.convert(Location(config.input, options), tmp, options)
        retrieval = info["task"] == "zeroshot_retrieval"
        converted = dataclasses.replace(
            config,
            input=tmp,
            output=None,
            label_column="" if retrieval else clip_benchmark.LABEL,
            caption_column=clip_benchmark.CAPTION if retrieval else "",
            classes=None,
            templates=info["templates"] or config.templates,
        )
        results = evaluate(converted, options, keep_ranks=True)
    results = {**results, "input": config.input, "clip_benchmark_task": info["task"]}
    ranks = results.pop("ranks")
    if config.output:
        out = Location(config.output, options)
        name = posixpath.basename(config.input.rstrip("/"))
        write_json(
            out.fs, out.join(clip_benchmark.RESULT_FILE), clip_benchmark.result(results, config, name, info["task"])
        )
        write_json(out.fs, out.join("eval.json"), results)
        write_json(out.fs, out.join(RANKS_FILE), ranks)
        out.fs.pipe_file(out.join("eval.md"), render_markdown(results).encode())
    return results | {"ranks": ranks} if keep_ranks else results


def _zero_shot(kept, image_embeddings, column, names, templates, model, tokenizer, config):
    """(the rows with a label, their label ranks): class names x templates, averaged per class."""
    rows = [i for i, r in enumerate(kept) if r[column] is not None]
    prompts = [t.format(c) for c in names for t in templates]
    per_class = encode_texts(model, tokenizer, prompts, config.batch_size).reshape(len(names), len(templates), -1)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({kept[i][column] for i in rows} - set(index))
    if unknown:
        raise ValueError(f"eval: {column} labels {unknown[:5]} are not among the {len(index)} class names")
    labels = np.array([index[kept[i][column]] for i in rows])
    return rows, zero_shot_ranks(image_embeddings[rows], class_embeddings(per_class), labels)


def _captions(kept, column) -> tuple[list[str], list[int]]:
    """Retrieval's texts and, per text, its image: one or several captions per image."""
    texts, text_image = [], []
    for i, row in enumerate(kept):
        captions = row[column]
        for caption in captions if isinstance(captions, list) else [captions]:
            if caption and caption.strip():  # a generated caption the rewrite refused is null: nothing to match
                texts.append(caption)
                text_image.append(i)
    return texts, text_image


def render_markdown(results: dict) -> str:
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        f"{results['images']} images ({results['images_skipped']} skipped), {results['captions']} captions, "
        f"{results['classes']} classes x {results['templates']} templates, from `{results['input']}`.",
        "",
    ]
    by_templates = results.get("zero_shot_by_templates") or {"": results["zero_shot"]}
    if any(by_templates.values()):
        lines += [
            "| zero-shot | templates | top-1 | top-5 | classes | images |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    for templates, columns in by_templates.items():
        for column, scores in columns.items():
            lines.append(
                f"| {column} | {templates} | {scores['top1']:.1%} | {scores['top5']:.1%} | "
                f"{scores.get('classes', '')} | {scores.get('images', '')} |"
            )
    if results.get("choice"):
        lines += ["", "| multiple choice | top-1 | candidates | images |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {column} | {c['top1']:.1%} | {c['candidates']} | {c['images']} |"
            for column, c in results["choice"].items()
        ]
    retrieval = results.get("retrieval_by_caption") or ({"": results["retrieval"]} if results["retrieval"] else {})
    if retrieval:  # none when no caption column was asked for (a classification set)
        lines += ["", "| retrieval | captions | R@1 | R@5 | R@10 |", "| --- | --- | --- | --- | --- |"]
    for column, r in retrieval.items():
        for way, name in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(
                f"| {name} | {column} | {r[f'{way}_R@1']:.1%} | {r[f'{way}_R@5']:.1%} | {r[f'{way}_R@10']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def run_command(config: EvalConfig, options: StorageOptions, run=None) -> Said:
    """``veclip eval``: the metrics as Markdown."""
    return Said(render_markdown(evaluate(config, options)))
