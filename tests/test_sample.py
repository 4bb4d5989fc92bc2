import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from veclip import schema
from veclip.images import decode_image
from veclip.shards.layout import CURRENT
from veclip.shards.store import ShardStore
from veclip.storage import Location, list_shards
from veclip.world.generate import (
    EVAL_SCHEMA,
    SAMPLE_SCHEMA,
    SampleConfig,
    class_names,
    generate,
    make_row,
    shard_ranges,
)


def _read(folder) -> list[dict]:
    return [row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def quiet(*_):
    pass


def test_layout_schema_and_images(sample_root):
    for split, n, table_schema in (("train", 60, SAMPLE_SCHEMA), ("eval", 20, EVAL_SCHEMA)):
        files = sorted((sample_root / split).glob("*.parquet"))
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        for path in files:
            found = pq.read_schema(path)
            assert found.equals(table_schema, check_metadata=False)
            schema.check_input_schema(found, path.name)
        rows = _read(sample_root / split)
        assert len(rows) == n and len({r["key"] for r in rows}) == n
        for row in rows:
            assert decode_image(row["image"]).size == (64, 64)
        assert ShardStore(Location(str(sample_root / split))).done() == {f.name for f in files}
    assert json.loads((sample_root / "eval" / "_classes.json").read_text()) == class_names()


def test_deterministic_by_seed_and_independent_of_sharding(sample_root, tmp_path):
    again = SampleConfig(str(tmp_path / "again"), rows=60, eval_rows=20, shards=2, seed=7, image_size=64)
    generate(again, log=quiet)
    assert _read(sample_root / "train") == _read(tmp_path / "again" / "train")
    other = make_row("train", 3, SampleConfig("unused", seed=8, image_size=64))
    assert other["image"] != _read(sample_root / "train")[3]["image"]


def test_eval_labels_match_the_facts(sample_root):
    names = class_names()
    for row in _read(sample_root / "eval"):
        group = json.loads(row["ref_facts"])["groups"][0]
        assert row["label_shape"] == group["shape"] and row["label_shape"] in names["label_shape"]
        assert row["label_color_shape"] == f"{group['color']} {group['shape']}" in names["label_color_shape"]
        assert row["caption"] == row["ref_caption"] and group["color"] in row["caption"]
        assert row["label_brand"] == json.loads(row["ref_facts"])["brand"] and row["label_brand"] in names[
            "label_brand"
        ] + [None]


def test_brands_have_a_visual_identity_that_only_the_alt_text_names():
    """VeCLIP's premise, in the sample world: the image shows a brand's frame and emblem,
    the visual description says what they look like, and only the AltText knows the name."""
    from veclip.world.scene import BRAND_STYLES

    config = SampleConfig("unused", image_size=32)
    rows = [make_row("eval", i, config) for i in range(400)]
    branded = [r for r in rows if r["label_brand"]]
    assert 0.25 < len(branded) / len(rows) < 0.45 and {r["label_brand"] for r in branded} == set(BRAND_STYLES)
    for row in branded:
        frame, emblem = BRAND_STYLES[row["label_brand"]]
        assert f"in a {frame} frame with a white {emblem} emblem" in row["ref_caption"]
        assert row["label_brand"] not in row["ref_caption"]  # a captioner can't know the name
    named = sum(r["label_brand"] in (r["alt_text"] or "") for r in branded)
    assert named / len(branded) > 0.65
    assert not any("frame" in r["ref_caption"] for r in rows if not r["label_brand"])


def test_alt_text_is_web_like():
    """Mostly noise, sometimes empty or null, rarely the visual facts."""
    config = SampleConfig("unused", image_size=32)
    rows = [make_row("train", i, config) for i in range(600)]
    kinds = Counter(r["ref_alt_kind"] for r in rows)
    assert set(kinds) == {"empty", "filename", "seo", "brand", "partial", "wrong", "facts"}
    assert kinds["facts"] / len(rows) < 0.2
    empties = [r["alt_text"] for r in rows if r["ref_alt_kind"] == "empty"]
    assert None in empties and "" in empties
    with_facts = sum(r["ref_caption"][:-1].lower() in (r["alt_text"] or "").lower() for r in rows)
    assert with_facts == kinds["facts"]


def test_unbranded_brand_text_may_name_only_a_place():
    """A scene of no brand gets "Souvenir from {place}" a quarter of the time; a branded scene's
    brand text always names its own brand (world 3 fixed a draw that ruled the place text out)."""
    import random

    from veclip.world.alt_text import _brand

    rng = random.Random(0)
    unbranded = Counter(_brand(rng).startswith("Souvenir from") for _ in range(2000))
    assert 0.2 < unbranded[True] / 2000 < 0.3
    assert all("Acme" in _brand(rng, "Acme") for _ in range(200))


def test_resumes_only_missing_shards(tmp_path):
    config = SampleConfig(str(tmp_path), rows=30, eval_rows=6, shards=3, image_size=32)
    generate(config, log=quiet)
    (tmp_path / "train" / CURRENT.done / "part-00001.parquet.json").unlink()
    logged = []
    generate(config, log=logged.append)
    assert logged == ["sample: wrote train/part-00001.parquet (10 rows)"]


def test_refuses_to_mix_configs(tmp_path):
    generate(SampleConfig(str(tmp_path), rows=10, eval_rows=2, shards=1, image_size=32), log=quiet)
    with pytest.raises(ValueError, match="already holds sample data"):
        generate(SampleConfig(str(tmp_path), rows=10, eval_rows=2, shards=1, image_size=32, seed=1), log=quiet)


def test_bad_config():
    with pytest.raises(ValueError, match="rows must be >= 1"):
        SampleConfig("x", rows=0)
    with pytest.raises(ValueError, match="image_size"):
        SampleConfig("x", image_size=8)


def test_shard_ranges_cover_every_row_once():
    assert [len(r) for r in shard_ranges(10, 3)] == [3, 3, 4]
    assert shard_ranges(2, 5) == [range(0, 1), range(1, 2)]


def test_sample_on_s3(s3_bucket):
    url, options = s3_bucket
    generate(SampleConfig(url + "/sample", rows=8, eval_rows=4, shards=2, image_size=32), options, log=quiet)

    shards = list_shards(Location(url + "/sample/train", options))
    assert len(shards) == 2
