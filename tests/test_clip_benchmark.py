"""``veclip eval`` on clip_benchmark's webdataset layout (made here from the sample's eval split): its own
class names and templates, its result JSON's shape, and the same figures as veclip's eval of the same
images in Parquet."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import random_tiny_clip, veclip_cli

from veclip.eval.run import EvalConfig, evaluate

TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_set(eval_split: Path, root: Path, retrieval: bool) -> list[dict]:
    """The eval split in clip_benchmark's layout, two shards; its rows."""
    rows = [r for p in sorted(eval_split.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    classnames = json.loads((eval_split / "_classes.json").read_text())["label_shape"]
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        with tarfile.open(root / "test" / f"{n}.tar", "w") as tar:
            for i, row in enumerate(part):
                _add(tar, f"s{i:06d}.jpg", row["image"])
                label = row["caption"] if retrieval else str(classnames.index(row["label_shape"]))
                _add(tar, f"s{i:06d}.{'txt' if retrieval else 'cls'}", label.encode())
    return rows


@pytest.mark.parametrize("retrieval", [False, True], ids=["classification", "retrieval"])
def test_eval_reads_clip_benchmark_sets_and_writes_its_json(sample_root, tmp_path, retrieval):
    model = random_tiny_clip(tmp_path / "model")
    make_set(sample_root / "eval", tmp_path / "wds_scenes", retrieval)
    run = veclip_cli(
        "eval", "--model", str(model), "--input", str(tmp_path / "wds_scenes"), "--out", str(tmp_path / "o")
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "o" / "clip_benchmark.json").read_text())
    assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert result["dataset"] == "wds_scenes" and result["model"] == str(model)

    # the same images and labels in veclip's own layout, the same templates: the same figures
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"templates": [t.replace("{c}", "{}") for t in TEMPLATES]}))
    ours = evaluate(EvalConfig(model=str(model), input=str(sample_root / "eval"), templates=str(templates)))
    if retrieval:
        assert result["task"] == "zeroshot_retrieval"
        assert result["metrics"] == {
            "image_retrieval_recall@5": pytest.approx(ours["retrieval"]["text_to_image_R@5"]),
            "text_retrieval_recall@5": pytest.approx(ours["retrieval"]["image_to_text_R@5"]),
        }
    else:
        figures = ours["zero_shot"]["label_shape"]
        assert result["task"] == "zeroshot_classification"
        assert result["metrics"] == {
            "acc1": pytest.approx(figures["top1"]),
            "acc5": pytest.approx(figures["top5"]),
            "mean_per_class_recall": pytest.approx(figures["mean_per_class_recall"]),
        }
        assert json.loads((tmp_path / "o" / "eval.json").read_text())["templates"] == len(TEMPLATES)
