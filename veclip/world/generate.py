"""``veclip sample``: a train and an eval split of rendered scenes, in the input schema.

Every row is a function of ``(seed, split, index)`` alone, so the data do not
depend on the shard count. Columns beyond the contract:

* ``ref_caption`` — the visual facts in words (a perfect captioner's output),
  ``ref_facts`` (the same as JSON) and ``ref_alt_kind`` (which kind of AltText
  was drawn). **For benchmarks only; pipelines must never read ``ref_*``.**
* eval split only: ``label_shape``, ``label_color_shape`` and ``label_brand``
  (zero-shot class names; ``label_brand`` is null for scenes of no brand),
  ``caption`` (the retrieval caption, equal to ``ref_caption``: the captioner's
  style), ``caption_plain`` (the same facts in a held-out style) and
  ``probe_brand`` (branded scenes: the fused caption's style, once per brand,
  the true brand first; the texts differ only in the name: a knowledge probe).

Layout: ``<out>/train/part-NNNNN.parquet``, ``<out>/eval/part-NNNNN.parquet``
(each with ``_done`` markers), ``<out>/eval/_classes.json`` and
``<out>/_sample.json`` (the config that made it).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

import pyarrow as pa

from veclip import schema
from veclip.command import Command, Flag, Said
from veclip.images import encode_jpeg
from veclip.shards.marker import Marker
from veclip.shards.store import ShardStore
from veclip.storage import Location, StorageOptions, write_json
from veclip.world.alt_text import alt_text
from veclip.world.scene import (
    BRAND_STYLES,
    COLORS,
    SHAPES,
    Scene,
    describe,
    describe_plainly,
    random_brand,
    random_scene,
    render,
)

SPLITS = ("train", "eval")
WORLD_VERSION = 3  # 2: brands with a visual identity that only the AltText names; 3: place-only brand
# texts (a draw fixed), eval captions in a held-out style and a brand probe

SAMPLE_SCHEMA = pa.schema(
    list(schema.INPUT_SCHEMA)
    + [pa.field("ref_caption", pa.string()), pa.field("ref_facts", pa.string()), pa.field("ref_alt_kind", pa.string())]
)
EVAL_SCHEMA = pa.schema(
    list(SAMPLE_SCHEMA)
    + [
        pa.field("label_shape", pa.string()),
        pa.field("label_color_shape", pa.string()),
        pa.field("label_brand", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("caption_plain", pa.string()),
        pa.field("probe_brand", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class SampleConfig:
    output: str = ""
    """output folder or s3:// prefix"""
    rows: int = 2000
    """train rows"""
    eval_rows: int = 500
    """eval rows (a separate split, with labels and captions)"""
    shards: int = 4
    """per split"""
    seed: int = 0
    """everything drawn from it: scenes, AltText, shard split"""
    image_size: int = 128
    """image side in pixels"""
    jpeg_quality: int = 90
    """JPEG quality of the written images"""

    def __post_init__(self):
        for name in ("rows", "eval_rows", "shards", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sample: {name} must be >= 1, got {getattr(self, name)}")
        if not 16 <= self.image_size <= 4096:
            raise ValueError(f"sample: image_size must be in [16, 4096], got {self.image_size}")

    def split_rows(self, split: str) -> int:
        return self.rows if split == "train" else self.eval_rows


def make_row(split: str, index: int, config: SampleConfig) -> dict:
    rng = random.Random(f"{config.seed}:{split}:{index}")
    brand = random_brand(random.Random(f"{config.seed}:{split}:{index}:brand"))
    scene = random_scene(rng, max_groups=2 if split == "train" else 1, brand=brand)
    image = render(scene, config.image_size, rng)
    text, kind = alt_text(scene, rng)
    caption = describe(scene)
    row = {
        schema.KEY: f"{split}-{index:08d}",
        schema.IMAGE: encode_jpeg(image, config.jpeg_quality),
        schema.ALT_TEXT: text,
        schema.URL: f"https://cdn.example.com/{split}/{index:08d}.jpg",
        schema.WIDTH: config.image_size,
        schema.HEIGHT: config.image_size,
        "ref_caption": caption,
        "ref_facts": json.dumps(scene.to_dict()),
        "ref_alt_kind": kind,
    }
    if split == "eval":
        group = scene.groups[0]
        row.update(
            label_shape=group.shape,
            label_color_shape=f"{group.color} {group.shape}",
            label_brand=scene.brand,
            caption=caption,
            caption_plain=describe_plainly(scene),
            probe_brand=brand_probe(scene, caption),
        )
    return row


def brand_probe(scene: Scene, caption: str) -> list[str] | None:
    """A branded scene's caption in the fused style once per brand, the true one first (None: no brand)."""
    if not scene.brand:
        return None
    brands = [scene.brand] + [b for b in BRAND_STYLES if b != scene.brand]
    return [f"A print by {b}: {caption[0].lower()}{caption[1:]}" for b in brands]


def shard_ranges(rows: int, shards: int) -> list[range]:
    """Split ``rows`` row indices into ``shards`` contiguous, near-equal ranges."""
    shards = min(shards, rows)
    bounds = [rows * k // shards for k in range(shards + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(shards)]


def class_names() -> dict[str, list[str]]:
    return {
        "label_shape": list(SHAPES),
        "label_color_shape": [f"{color} {shape}" for color in COLORS for shape in SHAPES],
        "label_brand": list(BRAND_STYLES),
    }


def _check_same_config(root: Location, config: SampleConfig) -> None:
    """Refuse to mix shards made with different settings in one folder."""
    path = root.join("_sample.json")
    wanted = {k: v for k, v in asdict(config).items() if k != "out"} | {"world": WORLD_VERSION}
    if root.fs.exists(path):
        found = json.loads(root.fs.cat_file(path))
        if found != wanted:
            raise ValueError(
                f"{root.url} already holds sample data made with {found}, not {wanted}; "
                "choose another --out or delete that folder"
            )
    else:
        root.fs.makedirs(root.path, exist_ok=True)
        write_json(root.fs, path, wanted)


def generate(config: SampleConfig, options: StorageOptions | None = None, log=print) -> dict[str, int]:
    """Write both splits (skipping shards already done); returns rows per split."""
    root = Location(config.output, options or StorageOptions())
    _check_same_config(root, config)
    written = {}
    for split in SPLITS:
        store = ShardStore(root.child(split))
        done = store.done()
        table_schema = EVAL_SCHEMA if split == "eval" else SAMPLE_SCHEMA
        ranges = shard_ranges(config.split_rows(split), config.shards)
        for k, indices in enumerate(ranges):
            name = f"part-{k:05d}.parquet"
            if name in done:
                continue
            rows = [make_row(split, i, config) for i in indices]
            store.write(Marker(name, 0), pa.Table.from_pylist(rows, schema=table_schema))
            log(f"sample: wrote {split}/{name} ({len(rows)} rows)")
        if split == "eval":
            write_json(store.location.fs, store.location.join(schema.CLASSES_FILE), class_names())
        written[split] = config.split_rows(split)
    return written


def run_sample(config: SampleConfig, options: StorageOptions, run=None) -> Said:
    written = generate(config, options)
    return Said(f"sample: {written['train']} train + {written['eval']} eval rows in {config.output}")


COMMAND = Command(
    "sample",
    "write rendered sample data (train + eval splits)",
    SampleConfig,
    run_sample,
    flags=(
        Flag("output", aliases=("--out",), required=True, metavar="URL"),
        "rows",
        "eval_rows",
        "shards",
        "seed",
        "image_size",
    ),
)
