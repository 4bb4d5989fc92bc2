"""``veclip eval`` on clip_benchmark's webdataset layout (made here from the sample's eval split): its own
class names and templates, its result JSON's shape, and the same figures as veclip's eval of the same
images in Parquet."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import random_tiny_clip, veclip_cli

from veclip.eval.run import EvalConfig, evaluate
from veclip.wds_export import add_tar_member

TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]

# clip_benchmark's own CLI, with veclip-tiny registered in open_clip. Its accuracy() calls float() on a
# one-element array, which NumPy 2.4 refuses: the same computation stands in for it, nothing else does.
CLIP_BENCHMARK = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zc
from veclip.train.model import register_configs

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

zc.accuracy = accuracy
register_configs()
from clip_benchmark.cli import main
sys.exit(main())
"""


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
                add_tar_member(tar, f"s{i:06d}.jpg", row["image"])
                label = row["caption"] if retrieval else str(classnames.index(row["label_shape"]))
                add_tar_member(tar, f"s{i:06d}.{'txt' if retrieval else 'cls'}", label.encode())
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


@pytest.mark.parametrize("retrieval", [False, True], ids=["classification", "retrieval"])
def test_clip_benchmark_itself_gets_the_same_figures_on_the_same_set(sample_root, tmp_path, retrieval):
    """The published numbers' own tool, run on the set and model veclip eval was given: the same metrics."""
    model = random_tiny_clip(tmp_path / "model")
    make_set(sample_root / "eval", tmp_path / "scenes", retrieval)
    ours = veclip_cli("eval", "--model", str(model), "--input", str(tmp_path / "scenes"), "--out", str(tmp_path / "o"))
    assert ours.returncode == 0, ours.stderr[-2000:]
    task = "zeroshot_retrieval" if retrieval else "zeroshot_classification"
    theirs = subprocess.run(
        [sys.executable, "-c", CLIP_BENCHMARK, "eval", "--dataset", "wds/scenes", "--task", task]
        + ["--dataset_root", str(tmp_path / "scenes"), "--model", f"local-dir:{model}", "--pretrained", ""]
        + ["--output", str(tmp_path / "theirs.json"), "--batch_size", "8", "--num_workers", "0", "--no_amp"]
        + ["--recall_k", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    expected = json.loads((tmp_path / "theirs.json").read_text())
    result = json.loads((tmp_path / "o" / "clip_benchmark.json").read_text())
    assert set(result) == set(expected) and result["task"] == expected["task"] == task
    assert result["metrics"] == pytest.approx(expected["metrics"])
