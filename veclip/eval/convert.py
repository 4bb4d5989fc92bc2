"""Converters that turn common evaluation sets into our eval Parquet layout.

* **class folders** (ImageNet val after the usual re-foldering, or any
  ``ROOT/<class>/<image>``): one row per image with ``label`` = the folder name
  (or its human name from ``--class-names``, a JSON list in sorted-folder
  order, as ImageNet's synset -> name list), and ``caption`` = "a photo of a
  <label>." so retrieval also runs; ``_classes.json`` lists the labels.
* **COCO-style captions JSON** (``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``caption``; the Karpathy test split is
  such a file): one row per image with all its captions in ``caption`` (a list).

Unreadable images are reported and left out, never silently: the summary says
how many and which.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from veclip import schema
from veclip.images import IMAGE_EXTENSIONS, ImageError, open_image
from veclip.shards.marker import Marker
from veclip.shards.store import ShardStore
from veclip.storage import BATCH_ROWS, Location, StorageOptions, write_json


def write_eval_set(
    rows: Iterable[dict],
    out: str,
    options: StorageOptions,
    rows_per_shard: int,
    caption_type: pa.DataType,
    classes: dict | None,
) -> int:
    """``rows`` (read as they come) as shards of ``rows_per_shard``, each streamed a batch at a time: memory
    holds a row group's worth, never the set (ImageNet's validation images are 6.4 GB)."""
    table_schema = pa.schema(
        list(schema.INPUT_SCHEMA) + [pa.field("label", pa.string()), pa.field("caption", caption_type)]
    )
    store, rows, written = ShardStore(Location(out, options)), iter(rows), 0
    for k in itertools.count():
        shard = itertools.islice(rows, rows_per_shard)
        batches = iter(lambda shard=shard: list(itertools.islice(shard, BATCH_ROWS)), [])
        first = next(batches, None)
        if first is None:
            break
        tables = (pa.Table.from_pylist(b, schema=table_schema) for b in itertools.chain([first], batches))
        written += store.write(Marker(f"part-{k:05d}.parquet", 0), tables).rows
    if classes is not None:
        location = store.location
        write_json(location.fs, location.join(schema.CLASSES_FILE), classes)
    return written


def _image_row(key: str, path: Path) -> tuple[dict | None, str | None]:
    data = path.read_bytes()
    try:
        width, height = open_image(data).size
    except ImageError as err:
        return None, f"{path}: {err.reason}"
    return {
        schema.KEY: key,
        schema.IMAGE: data,
        schema.ALT_TEXT: None,
        schema.WIDTH: width,
        schema.HEIGHT: height,
    }, None


def from_class_folders(
    root: str,
    out: str,
    class_names: str | None = None,
    rows_per_shard: int = 10_000,
    options: StorageOptions | None = None,
) -> dict:
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"convert: no class folders in {root}")
    names = json.loads(Path(class_names).read_text()) if class_names else [f.name for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"convert: {len(names)} class names for {len(folders)} folders in {root}")
    bad = []

    def rows():
        for folder, name in zip(folders, names):
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
                row, problem = _image_row(f"{folder.name}/{path.name}", path)
                if problem:
                    bad.append(problem)
                    continue
                yield {**row, "label": name, "caption": f"a photo of a {name}."}

    written = write_eval_set(rows(), out, options or StorageOptions(), rows_per_shard, pa.string(), {"label": names})
    return {"rows": written, "classes": len(names), "skipped": bad}


def from_coco(
    captions_json: str, images_dir: str, out: str, rows_per_shard: int = 10_000, options: StorageOptions | None = None
) -> dict:
    data = json.loads(Path(captions_json).read_text())
    captions = defaultdict(list)
    for annotation in data["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    bad, counted = [], [0]

    def rows():
        for image in data["images"]:
            path = Path(images_dir) / image["file_name"]
            if not path.exists():
                bad.append(f"{path}: missing_file")
                continue
            if not captions[image["id"]]:
                bad.append(f"{path}: no captions")
                continue
            row, problem = _image_row(str(image["id"]), path)
            if problem:
                bad.append(problem)
                continue
            counted[0] += len(captions[image["id"]])
            yield {**row, "label": None, "caption": captions[image["id"]]}

    written = write_eval_set(rows(), out, options or StorageOptions(), rows_per_shard, pa.list_(pa.string()), None)
    return {"rows": written, "captions": counted[0], "skipped": bad}
