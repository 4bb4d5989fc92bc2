"""Metrics on hand-made embeddings with known answers."""

import dataclasses

import numpy as np
import pytest

from veclip.eval.metrics import class_embeddings, retrieval, zero_shot

E = np.eye(4)


def test_zero_shot_exact():
    images = np.array([[1, 0.1, 0, 0], [0, 1, 0.5, 0], [0, 0.9, 1, 0], [0.2, 0.3, 0.4, 1]])
    labels = np.array([0, 2, 2, 3])  # image 1 is closest to class 1 but labelled 2: a top-1 miss, top-2 hit
    got = zero_shot(images, E, labels, ks=(1, 2, 5))
    assert got == {"top1": 0.75, "top2": 1.0, "top5": 1.0}


def test_zero_shot_ties_break_by_class_index():
    images = np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    # both classes 0 and 1 score the same: class 0 ranks first
    assert zero_shot(images, E, np.array([0, 1]), ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_zero_shot_one_class():
    assert zero_shot(np.random.default_rng(0).normal(size=(5, 3)), np.ones((1, 3)), np.zeros(5, int)) == {
        "top1": 1.0,
        "top5": 1.0,
    }


def test_prompt_ensembling():
    templates = np.array([[[2, 0], [0, 1]], [[0, 3], [0, 1]]], dtype=float)  # [classes, templates, dim]
    got = class_embeddings(templates)
    np.testing.assert_allclose(got, [[np.sqrt(0.5), np.sqrt(0.5)], [0, 1]])


def test_retrieval_exact_with_several_captions_per_image():
    images = np.eye(3)
    texts = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.2, 1], [0.8, 0.6, 0]])
    text_image = np.array([0, 0, 1, 2, 2])  # the last caption of image 2 points at images 0/1: a miss
    got = retrieval(images, texts, text_image, ks=(1, 2, 5))
    assert got["text_to_image_R@1"] == pytest.approx(4 / 5)
    assert got["text_to_image_R@2"] == pytest.approx(4 / 5)  # image 2 is third for the last caption
    assert got["text_to_image_R@5"] == 1.0
    # image 0 -> text 0 (its own); image 1 -> text 2 (own); image 2 -> text 3 (own)
    assert got["image_to_text_R@1"] == 1.0


def test_retrieval_in_chunks_is_retrieval_whole(monkeypatch):
    """The similarity matrix is made a chunk of rows at a time (10,000 images: 400 MB whole): the same
    recalls, ties and several captions per image included."""
    from veclip.eval import metrics

    rng = np.random.default_rng(0)
    images = rng.integers(-2, 3, (50, 4)).astype(np.float32)  # small integers: ties happen
    texts = rng.integers(-2, 3, (80, 4)).astype(np.float32)
    text_image = rng.integers(0, 45, 80)  # some images have several captions, some none
    whole = retrieval(images, texts, text_image)
    monkeypatch.setattr(metrics, "RETRIEVAL_CHUNK", 7)
    assert retrieval(images, texts, text_image) == whole


def test_retrieval_miss_and_ties():
    images = np.array([[1.0, 0], [1.0, 0]])
    texts = np.array([[1.0, 0], [1.0, 0]])  # everything ties: index order decides
    got = retrieval(images, texts, np.array([1, 0]), ks=(1, 2))
    # text 0 belongs to image 1, but image 0 ranks first: a miss; text 1 -> image 0: a hit.
    # image 0's caption is text 1, ranked after text 0: a miss; image 1's is text 0: a hit.
    assert got == {
        "image_to_text_R@1": 0.5,
        "text_to_image_R@1": 0.5,
        "image_to_text_R@2": 1.0,
        "text_to_image_R@2": 1.0,
    }


def test_eval_cli_on_the_sample_eval_split(sample_root, tmp_path):
    """A random tiny CLIP, exported, evaluated through the CLI: files written, numbers sane."""
    import json

    from conftest import veclip_cli

    model_dir = _random_tiny_export(tmp_path / "model")
    result = veclip_cli(
        "eval",
        "--model",
        str(model_dir),
        "--data",
        str(sample_root / "eval"),
        "--out",
        str(tmp_path / "eval"),
        "--label-column",
        "label_shape,label_brand",
        "--caption-column",
        "caption,caption_plain",
        "--choice-column",
        "probe_brand",
        "--templates",
        "generic,brands",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "| label_shape |" in result.stdout
        and "| label_brand |" in result.stdout
        and "| image -> text |" in result.stdout
    )
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["images"] == 20 and results["classes"] == 6 + 7 and results["templates"] == 6
    brands = results["zero_shot"]["label_brand"]  # on the branded images only
    assert brands["classes"] == 7 and 0 < brands["images"] < 20 and results["zero_shot"]["label_shape"]["images"] == 20
    assert 0 <= results["zero_shot"]["label_shape"]["top1"] <= results["zero_shot"]["label_shape"]["top5"] <= 1
    assert results["retrieval"]["text_to_image_R@10"] >= results["retrieval"]["text_to_image_R@1"]
    assert (tmp_path / "eval" / "eval.md").read_text().startswith("# Evaluation")
    # no one style owns the verdict: each template set and caption column scored on its own
    assert results["zero_shot"] == results["zero_shot_by_templates"]["generic"]
    assert results["zero_shot_by_templates"]["brands"]["label_brand"]["images"] == brands["images"]
    assert set(results["retrieval_by_caption"]) == {"caption", "caption_plain"}
    assert results["retrieval_by_caption"]["caption_plain"]["captions"] == 20
    probe = results["choice"]["probe_brand"]  # the brand's name among texts that differ only in it
    assert probe["candidates"] == 7 and probe["images"] == brands["images"] and 0 <= probe["top1"] <= 1
    assert "| probe_brand |" in result.stdout and "| caption_plain |" in result.stdout
    ranks = json.loads((tmp_path / "eval" / "ranks.json").read_text())  # per image, for paired statistics
    assert len(ranks["choice/probe_brand"]) == probe["images"] and len(ranks["retrieval/caption/text_to_image"]) == 20
    assert (
        np.mean(np.array(ranks["zero_shot/brands/label_brand"]) < 1)
        == results["zero_shot_by_templates"]["brands"]["label_brand"]["top1"]
    )
    bad = veclip_cli("eval", "--model", str(model_dir), "--data", str(sample_root / "eval"), "--label-column", "nope")
    assert bad.returncode == 2 and "no column(s) ['nope']" in bad.stderr


def test_converters_feed_eval(tmp_path):
    import json

    from conftest import veclip_cli
    from PIL import Image

    from veclip.eval.convert import from_class_folders

    for name, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "val" / name / f"{i}.jpg")
    (tmp_path / "val" / "n02" / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "names.json").write_text(json.dumps(["red thing", "blue thing"]))
    summary = from_class_folders(str(tmp_path / "val"), str(tmp_path / "imagenet"), str(tmp_path / "names.json"))
    assert summary["rows"] == 6 and summary["classes"] == 2 and len(summary["skipped"]) == 1
    assert json.loads((tmp_path / "imagenet" / "_classes.json").read_text()) == {"label": ["red thing", "blue thing"]}

    coco = {
        "images": [
            {"id": 1, "file_name": "n01/0.jpg"},
            {"id": 2, "file_name": "n02/0.jpg"},
            {"id": 3, "file_name": "gone.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a red card"},
            {"image_id": 1, "caption": "red "},
            {"image_id": 2, "caption": "blue"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    result = veclip_cli(
        "convert-eval",
        "coco",
        str(tmp_path / "captions.json"),
        "--images",
        str(tmp_path / "val"),
        "--out",
        str(tmp_path / "coco"),
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 rows" in result.stdout and "gone.jpg: missing_file" in result.stdout

    from veclip.eval.run import EvalConfig, evaluate

    model_dir = _random_tiny_export(tmp_path / "model")
    folders = evaluate(EvalConfig(model=str(model_dir), input=str(tmp_path / "imagenet"), label_column="label"))
    assert folders["images"] == 6 and folders["classes"] == 2 and folders["zero_shot"]["label"]["top5"] == 1.0
    captions = evaluate(EvalConfig(model=str(model_dir), input=str(tmp_path / "coco"), label_column="label"))
    assert captions["zero_shot"] == {} and captions["captions"] == 3 and captions["images"] == 2


def test_eval_over_ray_actors_matches_in_process(sample_root, tmp_path, ray_session):
    """Embedding over a 2-actor pool gives the in-process numbers; a corrupt image is counted by reason."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from veclip.eval.run import EvalConfig, evaluate

    data = tmp_path / "eval"
    shutil.copytree(sample_root / "eval", data)
    first = sorted(data.glob("*.parquet"))[0]
    table = pq.read_table(first)
    images = table.column("image").to_pylist()
    images[0] = b"not a jpeg"
    pq.write_table(
        table.set_column(
            table.column_names.index("image"), "image", pa.array(images, table.schema.field("image").type)
        ),
        first,
    )

    model_dir = _random_tiny_export(tmp_path / "model")
    local = evaluate(EvalConfig(model=str(model_dir), input=str(data), batch_size=4))
    spread = evaluate(EvalConfig(model=str(model_dir), input=str(data), batch_size=4, workers=2, cpus_per_worker=0.5))
    assert local["images"] == spread["images"] == 19
    assert local["images_skipped_by_reason"] == spread["images_skipped_by_reason"] == {"image_undecodable": 1}
    from veclip.schema import SchemaError

    with pytest.raises(
        SchemaError, match=r"no column\(s\) \['nope'\]"
    ):  # checked from the footer, before any actor starts
        evaluate(EvalConfig(model=str(model_dir), input=str(data), workers=2, label_column="nope"))
    assert spread["zero_shot"]["label_shape"] == pytest.approx(local["zero_shot"]["label_shape"]) and spread[
        "retrieval"
    ] == pytest.approx(local["retrieval"])


def test_eval_on_a_caption_output_retrieves_with_its_generated_captions(tmp_path, ray_session):
    """Images from the input, captions from the caption tables: in process and over actors alike."""
    from test_rewrite_steps import _rewrite_in_process

    from veclip.eval.run import EvalConfig, evaluate

    _rewrite_in_process(tmp_path, split="eval", layout="captions")  # the first image is broken
    model_dir = _random_tiny_export(tmp_path / "model")
    config = EvalConfig(model=str(model_dir), input=str(tmp_path / "out"), caption_column="vecap", batch_size=4)
    local = evaluate(config)
    spread = evaluate(dataclasses.replace(config, workers=2, cpus_per_worker=0.5))
    assert local["images"] == spread["images"] == 11 and local["images_skipped_by_reason"] == {"image_undecodable": 1}
    assert local["captions"] == 11 and local["zero_shot"]["label_shape"] == pytest.approx(
        spread["zero_shot"]["label_shape"]
    )
    assert local["retrieval"] == pytest.approx(spread["retrieval"])


def test_eval_embeds_a_batch_of_rows_at_a_time(sample_root, tmp_path, monkeypatch):
    """The eval set in one file of one row group: images are read, embedded and dropped a batch at a
    time (once every shard was read whole first), with the same numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from veclip import storage
    from veclip.eval import embed
    from veclip.eval.run import EvalConfig, evaluate

    (tmp_path / "one").mkdir()
    table = pa.concat_tables([pq.read_table(p) for p in sorted((sample_root / "eval").glob("*.parquet"))])
    pq.write_table(table, tmp_path / "one" / "eval.parquet")
    (tmp_path / "one" / "_classes.json").write_bytes((sample_root / "eval" / "_classes.json").read_bytes())
    config = EvalConfig(model=str(_random_tiny_export(tmp_path / "model")), input=str(tmp_path / "one"), batch_size=4)
    whole = evaluate(config)
    seen, real = [], embed.embed_images
    monkeypatch.setattr(
        embed,
        "embed_images",
        lambda model, pre, images, *a, **k: seen.append(len(images)) or real(model, pre, images, *a, **k),
    )
    monkeypatch.setattr(storage, "BATCH_ROWS", 6)
    batched = evaluate(config)
    assert seen == [6, 6, 6, 2] and batched["retrieval"] == pytest.approx(whole["retrieval"])
    assert batched["zero_shot"]["label_shape"] == pytest.approx(whole["zero_shot"]["label_shape"])


def _random_tiny_export(model_dir):
    import json

    import open_clip
    from safetensors.torch import save_file

    from veclip.train.model import create_model

    model_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in create_model("veclip-tiny").state_dict().items()},
        str(model_dir / "open_clip_model.safetensors"),
    )
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("veclip-tiny"), "preprocess_cfg": {}})
    )
    return model_dir


def test_multiple_choice_ranks_each_images_own_candidates():
    from veclip.eval.metrics import choice_ranks

    images = np.eye(3)[:2]  # image 0 points along x, image 1 along y
    candidates = np.array([[[1, 0, 0], [0, 1, 0]], [[1, 0, 0], [0, 1, 0]]], dtype=float)  # right one first
    assert choice_ranks(images, candidates).tolist() == [0, 1]


def test_retrieval_leaves_out_images_without_a_caption():
    """A generated caption the rewrite refused is null: the image is not counted as a miss image -> text."""
    images = np.eye(3, dtype=np.float32)
    texts = np.eye(3, dtype=np.float32)[[0, 2]]  # image 1 has no caption
    out = retrieval(images, texts, np.array([0, 2]), ks=(1,))
    assert out["image_to_text_R@1"] == 1.0 and out["text_to_image_R@1"] == 1.0


def test_converting_an_eval_set_streams_it_into_shards(tmp_path, monkeypatch):
    """The converters held the whole set (ImageNet's 6.4 GB of validation images) in a list, then in a table;
    they now stream it: memory holds a batch and a row group (here 4 MiB), whatever the set's size."""
    import pyarrow.parquet as pq
    from conftest import MemoryPeak, noise_jpegs

    from veclip import parquet_files
    from veclip.eval.convert import from_class_folders

    images = noise_jpegs(500, side=128)  # ~20 KB each, incompressible
    for k in range(10):
        folder = tmp_path / "val" / f"n{k:02d}"
        folder.mkdir(parents=True)
        for i, data in enumerate(images):
            (folder / f"{i}.jpg").write_bytes(data)
    total = 10 * sum(map(len, images))
    monkeypatch.setattr(parquet_files, "ROW_GROUP_TARGET_BYTES", 4 * 1024 * 1024)
    with MemoryPeak() as peak:
        summary = from_class_folders(str(tmp_path / "val"), str(tmp_path / "out"), rows_per_shard=2000)
    assert summary["rows"] == 5000 and pq.read_metadata(tmp_path / "out" / "part-00002.parquet").num_rows == 1000
    # a batch, a row group and the imports' own ~40 MB, against 2.4x the set (240 MB) before
    assert total > 90 * 1024 * 1024 and peak.grew < 0.75 * total, (peak.grew, total)
