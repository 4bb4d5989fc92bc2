"""clip_benchmark's webdataset layout in, its result JSON out: figures comparable with published ones.

The layout (``clip_benchmark.datasets.builder.build_wds_dataset``, what its ``wds_*`` datasets on the
Hugging Face Hub hold)::

    DIR/test/nshards.txt                        N
    DIR/test/0.tar ... DIR/test/<N-1>.tar       KEY.webp|png|jpg|jpeg, and KEY.cls (class index) or
                                                KEY.txt (captions, one per line) for retrieval
    DIR/classnames.txt                          one class name per line
    DIR/zeroshot_classification_templates.txt   one template per line, the class as {c}
    DIR/dataset_type.txt                        "retrieval"; absent: classification

``veclip eval --input DIR`` reads it (:func:`convert`: to the eval Parquet layout in a temporary folder,
the set's own class names and templates used; :mod:`veclip.eval.run` evaluates it) and writes
clip_benchmark's result JSON (:func:`result`: ``{"dataset", "model", "pretrained", "task", "metrics",
"language"}``) beside ``eval.json``.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections import defaultdict

import pyarrow as pa

from veclip.eval.convert import write_eval_set
from veclip.images import ImageError, open_image
from veclip.storage import Location, StorageOptions

SPLIT = "test"
RESULT_FILE = "clip_benchmark.json"  # beside eval.json
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
LABEL, CAPTION = "label", "caption"  # the converted set's columns


def is_clip_benchmark(location: Location) -> bool:
    return location.fs.exists(location.join(SPLIT, "nshards.txt"))


def _text(location: Location, *parts: str) -> str | None:
    path = location.join(*parts)
    return location.fs.cat_file(path).decode() if location.fs.exists(path) else None


def _samples(location: Location, shards: int):
    """``(key, {extension: bytes})`` of every sample, shard by shard."""
    for n in range(shards):
        with location.fs.open(location.join(SPLIT, f"{n}.tar"), "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            grouped: dict[str, dict[str, bytes]] = defaultdict(dict)
            for member in tar:
                if member.isfile():
                    key, _, ext = posixpath.basename(member.name).partition(".")
                    grouped[f"{n}/{key}"][ext.lower()] = tar.extractfile(member).read()
            yield from grouped.items()


def convert(location: Location, out: str, options: StorageOptions) -> dict:
    """The set as eval Parquet in ``out`` (``_classes.json`` and ``templates.json`` beside); what it is."""
    retrieval = (_text(location, "dataset_type.txt") or "").strip().lower() == "retrieval"
    classnames = [c.strip() for c in (_text(location, "classnames.txt") or "").splitlines() if c.strip()]
    templates = [t.strip() for t in (_text(location, "zeroshot_classification_templates.txt") or "").splitlines()]
    rows, skipped = [], []
    for key, files in _samples(location, int(_text(location, SPLIT, "nshards.txt").strip())):
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        try:
            width, height = open_image(image).size if image else (None, None)
        except ImageError as err:
            skipped.append(f"{key}: {err.reason}")
            continue
        row = {"key": key, "image": image, "alt_text": None, "width": width, "height": height}
        if retrieval:
            row[LABEL], row[CAPTION] = None, files.get("txt", b"").decode().splitlines()
        else:
            row[LABEL], row[CAPTION] = classnames[int(files["cls"].decode().strip())], []
        rows.append(row)
    write_eval_set(rows, out, options, 10_000, pa.list_(pa.string()), None if retrieval else {LABEL: classnames})
    templates_file = None
    if templates and not retrieval:
        templates_file = posixpath.join(out, "templates.json")
        with open(templates_file, "w") as f:  # clip_benchmark's {c} is veclip's positional {}
            json.dump({"templates": [t.replace("{c}", "{}") for t in templates if t]}, f)
    task = "zeroshot_retrieval" if retrieval else "zeroshot_classification"
    return {"task": task, "rows": len(rows), "skipped": skipped, "templates": templates_file}


def result(results: dict, config, dataset: str, task: str) -> dict:
    """clip_benchmark's result JSON for veclip's eval ``results``."""
    if task == "zeroshot_retrieval":
        figures = results["retrieval_by_caption"][CAPTION]
        metrics = {
            "image_retrieval_recall@5": figures["text_to_image_R@5"],  # a caption finds its image
            "text_retrieval_recall@5": figures["image_to_text_R@5"],  # an image finds its caption
        }
    else:
        figures = results["zero_shot"][LABEL]
        metrics = {"acc1": figures["top1"], "acc5": figures["top5"]}
        metrics["mean_per_class_recall"] = figures["mean_per_class_recall"]
    return {
        "dataset": dataset,
        "model": config.model,
        "pretrained": config.pretrained,
        "task": task,
        "metrics": metrics,
        "language": "en",
    }
