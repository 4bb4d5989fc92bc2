"""The caption gate (veclip score): the rules on hand-made scores, the cosines against open_clip,
the stage on a local Ray cluster (exactly-once, joined by training), and a killed driver resumed."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_tiny_clip, veclip_cli
from processes import kill_job_when

from veclip import schema
from veclip.dataset import open_dataset, read_shard
from veclip.score import steps
from veclip.score.config import build_config
from veclip.score.stage import FingerprintMismatch, run_score
from veclip.shards.layout import CARD_FILE, CURRENT
from veclip.shards.marker import Marker
from veclip.shards.store import ShardStore
from veclip.shards.summary import ShardCounts
from veclip.storage import Location
from veclip.train.captions import CaptionConfig, gated
from veclip.train.data import SKIP_REASONS, preprocess

LOW = schema.LOW_CLIP_SCORE


def _captions(rows: list[dict], columns=("alt_text", "vecap", "rewrites")) -> tuple[pa.Table, list[steps.Caption]]:
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("alt_text", pa.string()), ("vecap", pa.string()), ("rewrites", pa.list_(pa.string()))])
    )
    return table, steps.caption_slots(table, columns)


def test_caption_slots_name_each_caption_as_training_does():
    table, captions = _captions(
        [
            {"alt_text": "a cat", "vecap": None, "rewrites": ["x y", "", "z w"]},
            {"alt_text": "  ", "vecap": "a red star", "rewrites": None},
        ]
    )
    assert [(c.row, c.slot, c.text) for c in captions] == [
        (0, "alt_text", "a cat"),
        (1, "vecap", "a red star"),
        (0, "rewrites.0", "x y"),
        (0, "rewrites.2", "z w"),
    ]
    assert [c.column for c in captions] == ["alt_text", "vecap", "rewrites", "rewrites"]
    assert steps.caption_slots(table, ("vecap",)) == [captions[1]]


def test_the_gate_by_threshold_and_by_shard_percentile():
    captions = [steps.Caption(i, slot, "t") for i, slot in enumerate(["alt_text"] * 4 + ["vecap"] * 4)]
    cosines = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, np.nan, 0.8], np.float32)
    assert steps.gate(captions, cosines, None, None).tolist() == [False] * 8
    assert steps.gate(captions, cosines, 0.25, None).tolist() == [True, True] + [False] * 6
    # per column: the lowest quarter of alt_text (0.1) and of vecap's scored values (0.5); NaN is never flagged
    assert steps.gate(captions, cosines, None, 25).tolist() == [True, False, False, False, True, False, False, False]
    assert steps.gate(captions, cosines, 0.15, 50).tolist() == [True, True, False, False, True, False, False, False]


def test_the_score_table_keeps_rows_in_order_and_rewrites_at_their_index():
    table, captions = _captions(
        [
            {"alt_text": "a cat", "vecap": "a black cat", "rewrites": ["x y", "", "z w"]},
            {"alt_text": None, "vecap": None, "rewrites": None},
        ]
    )
    cosines = np.arange(len(captions), dtype=np.float32) / 10
    flagged = np.array([c.slot in ("vecap", "rewrites.2") for c in captions])
    out = steps.score_table(
        ["k0", "k1"], table, captions, cosines, flagged, {"model": "m", "weights": "w", "gate": "g"}
    )
    assert out.schema == schema.SCORE_SCHEMA
    rows = out.to_pylist()
    assert [r["key"] for r in rows] == ["k0", "k1"]
    scores = rows[0][schema.CLIP_SCORES]
    assert scores["alt_text"] == pytest.approx(0.0) and scores["vecap"] == pytest.approx(0.1)
    assert (
        scores["rewrites"][1] is None
        and scores["rewrites"][0] == pytest.approx(0.2)
        and scores["rewrites"][2] == pytest.approx(0.3)
    )
    assert rows[0][schema.REWRITE_FLAGS] == [f"vecap:{LOW}", f"rewrites.2:{LOW}"]
    assert rows[1][schema.CLIP_SCORES] == {"alt_text": None, "vecap": None, "vlm_caption": None, "rewrites": None}
    assert rows[1][schema.REWRITE_FLAGS] == [] and rows[1]["clip_scores_provenance"]["gate"] == "g"


def test_training_treats_gated_slots_as_unusable(sample_root):
    slots = CaptionConfig(max_rewrites=2).slots
    assert gated([[f"vecap:{LOW}", "vecap:entities_lost", f"rewrites.1:{LOW}"], None], slots).tolist() == [
        [False, True, False, False, True],
        [False] * 5,
    ]
    rows = pq.read_table(sorted((sample_root / "train").glob("*.parquet"))[0]).slice(0, 3)
    batch = pa.table(
        {
            "key": rows.column("key"),
            "image": rows.column("image"),
            "alt_text": rows.column("alt_text"),
            "vecap": pa.array(["a red star on a blue ground"] * 3),
            "rewrite_flags": pa.array(
                [[f"vecap:{LOW}"], [], [f"vecap:{LOW}", f"alt_text:{LOW}"]], pa.list_(pa.string())
            ),
            "_epoch": pa.array([0] * 3, pa.int64()),
            "_window": pa.array([0] * 3, pa.int64()),
            "_offset": pa.array([0, 1, 2], pa.int64()),
        }
    )
    from veclip.images import ImageLimits

    nothing = SKIP_REASONS.index("no_usable_caption")
    out = preprocess(batch, "veclip-tiny", CaptionConfig(mode="vecap"), ImageLimits(), seed=0)
    assert (
        out["skip"].tolist() == [nothing, 0, nothing] and out["slot"][1] == 1
    )  # VeCap only: a gated one leaves nothing
    # where the mode has the AltText, a gated VeCap falls back to it; with both gated nothing is left
    almost_vecap = CaptionConfig(mode="weighted", weights={"vecap": 1000, "alt_text": 1})
    out = preprocess(batch, "veclip-tiny", almost_vecap, ImageLimits(), seed=0)
    assert out["slot"].tolist()[:2] == [0, 1] and out["skip"].tolist() == [0, 0, nothing]
    # a row without a key (it crashed every restart) is passed over with its reason
    keyless = batch.set_column(0, "key", pa.array([None, *batch.column("key").to_pylist()[1:]], pa.string()))
    out = preprocess(keyless, "veclip-tiny", almost_vecap, ImageLimits(), seed=0)
    assert out["skip"].tolist() == [SKIP_REASONS.index("null_key"), 0, nothing]


def test_the_scores_are_the_models_cosines(sample_root, tmp_path):
    import torch

    from veclip.eval.model import load_model

    model, preprocess_image, tokenizer = load_model(str(random_tiny_clip(tmp_path / "model")), None, None)
    rows = pq.read_table(sorted((sample_root / "train").glob("*.parquet"))[0]).slice(0, 4)
    images = rows.column("image").to_pylist()
    images[2] = b"not an image"
    table, captions = _captions(
        [{"alt_text": a, "vecap": f"{a} again", "rewrites": None} for a in rows.column("alt_text").to_pylist()]
    )
    cosines, errors = steps.score(model, preprocess_image, tokenizer, images, captions, batch_size=3)
    assert errors[2] == "image_undecodable" and errors.count(None) == 3
    with torch.no_grad():
        for caption, cosine in zip(captions, cosines):
            if caption.row == 2:
                assert np.isnan(cosine)
                continue
            from veclip.images import decode_image

            image = model.encode_image(preprocess_image(decode_image(images[caption.row]))[None])
            text = model.encode_text(tokenizer([caption.text]))
            assert cosine == pytest.approx(torch.nn.functional.cosine_similarity(image, text).item(), abs=1e-5)


@pytest.fixture(scope="module")
def enriched(sample_root, tmp_path_factory) -> Path:
    """The sample's train split with captions in it (copy layout): VeCap is the reference caption, two rewrites."""
    out = tmp_path_factory.mktemp("enriched")
    for path in sorted((sample_root / "train").glob("*.parquet")):
        table = pq.read_table(path)
        table = table.append_column("vecap", table.column("ref_caption"))
        table = table.append_column(
            "rewrites", pa.array([[f"{a} photo", f"picture of {a}"] for a in table.column("alt_text").to_pylist()])
        )
        pq.write_table(table, out / path.name)
    return out


def test_score_exactly_once_and_training_reads_the_gate(enriched, tmp_path, ray_session):
    enriched = Path(shutil.copytree(enriched, tmp_path / "data"))  # changed below
    model = str(random_tiny_clip(tmp_path / "model"))
    out = str(tmp_path / "scores")
    config = build_config("cpu", None, ["percentile=50"], input=str(enriched), output=out, model=model)
    console = []
    summary = run_score(config, log=console.append)
    assert summary["rows"] == 60 and summary["shards"] == dataclasses.asdict(ShardCounts(3, 3, 3, 0))
    assert any(re.match(r"score: \[3/3 shards, 60/60 rows", line) for line in console), console
    alts = sum(
        bool((a or "").strip())
        for p in enriched.glob("*.parquet")
        for a in pq.read_table(p).column("alt_text").to_pylist()
    )
    for column, n in {"alt_text": alts, "vecap": 60, "rewrites": 120}.items():
        stats = summary["columns"][column]
        assert stats["scored"] == n and 0.4 <= stats["flagged_share"] <= 0.5, (
            column,
            stats,
        )  # the lower half of each shard
    markers = ShardStore(Location(out)).markers()
    assert {m.fingerprint for m in markers.values()} == {summary["fingerprint"]} and len(markers) == 3
    # what made it, as a rewrite's summary says it: the config, and the fields its fingerprint hashes
    assert summary["config"]["model"] == model and summary["fingerprint_fields"]["threshold"] == config.threshold
    # the card's join, as it prints it, gives every image of a shard its scores
    card = (Path(out) / CARD_FILE).read_text()
    assert "## Joining the captions to their images" in card and 'images.merge(captions, on="key")' in card
    first = next(iter(markers.values()))
    images = pd.read_parquet(first.input_url)
    rows = images.merge(pd.read_parquet(Path(out, first.shard)), on="key")
    assert len(rows) == len(images) == first.rows_in and rows["clip_scores"].notna().all()

    from veclip.status import StatusConfig, status

    report = status(StatusConfig(out))
    assert report.done and report.kind == "score" and f"vecap:{LOW} " in report.render()
    # a rerun writes nothing and reports the same; another gate is refused in the same output
    again = run_score(config, log=lambda *_: None)
    assert again["shards"]["written_this_run"] == 0 and again["columns"] == summary["columns"]
    assert {n: m.run_id for n, m in ShardStore(Location(out)).markers().items()} == {
        n: m.run_id for n, m in markers.items()
    }
    with pytest.raises(FingerprintMismatch, match="another configuration"):
        run_score(
            build_config("cpu", None, ["percentile=10"], input=str(enriched), output=out, model=model),
            log=lambda *_: None,
        )

    # the score tables are a caption output of the same images: training joins them by key
    dataset = open_dataset(str(enriched), add_captions=(out,))
    table = read_shard(dataset, dataset.shards[0])
    assert table.column("key").equals(pq.read_table(dataset.shards[0].path).column("key"))
    flags = table.column(schema.REWRITE_FLAGS).to_pylist()
    assert sum(f"vecap:{LOW}" in f for f in flags) == pytest.approx(10, abs=1)
    scores = table.column(schema.CLIP_SCORES).to_pylist()
    low = [s["vecap"] for s, f in zip(scores, flags) if f"vecap:{LOW}" in f]
    high = [s["vecap"] for s, f in zip(scores, flags) if f"vecap:{LOW}" not in f]
    assert max(low) < min(high)
    from veclip.show import ShowConfig, show

    shown = show(ShowConfig(str(enriched), rows=1, where=f"vecap:{LOW}", add_captions=(out,)), dataset.options)
    assert f"vecap:{LOW}" in shown and re.search(
        r"clip_scores +(alt_text -?0\.\d{3}, )?vecap -?0\.\d{3}, rewrites\.0", shown
    ), shown
    from veclip.train.data import plan_data

    plan = plan_data(str(enriched), dataset.options, schema.ColumnMap(), 1, (out,), log=lambda *_: None)
    assert schema.REWRITE_FLAGS in plan.caption_columns

    # captions changed after they were scored (a rewrite redone in place): that shard is scored again, only it
    changed = enriched / "part-00001.parquet"
    vecap_scores = lambda: [
        s["vecap"] for s in pq.read_table(Path(out) / changed.name).column(schema.CLIP_SCORES).to_pylist()
    ]
    before, untouched = vecap_scores(), (Path(out) / "part-00000.parquet").read_bytes()
    table = pq.read_table(changed)
    pq.write_table(
        table.set_column(
            table.column_names.index("vecap"), "vecap", pa.array(["a caption written later"] * table.num_rows)
        ),
        changed,
    )
    console = []
    again = run_score(config, log=console.append)
    assert again["shards"]["written_this_run"] == 1 and any(
        "1 shard(s) whose images or captions changed" in line for line in console
    )
    assert (
        all(a != b for a, b in zip(before, vecap_scores()))
        and (Path(out) / "part-00000.parquet").read_bytes() == untouched
    )
    assert run_score(config, log=lambda *_: None)["shards"]["written_this_run"] == 0


def test_score_on_s3_reruns_as_a_no_op(enriched, tmp_path, s3_bucket, ray_session):
    """On S3 the versions of what a shard read are ETags from fresh listings: a rerun finds them unchanged."""
    url, options = s3_bucket
    fs = Location(url, options).fs
    for path in sorted(enriched.glob("*.parquet")):
        fs.put_file(str(path), f"{url[5:]}/in/{path.name}")
    config = build_config(
        "cpu",
        None,
        ["threshold=0.0"],
        input=url + "/in",
        output=url + "/scores",
        model=str(random_tiny_clip(tmp_path / "m")),
    )
    first = run_score(config, options, log=lambda *_: None)
    assert first["shards"]["written_this_run"] == 3 and first["rows"] == 60
    assert run_score(config, options, log=lambda *_: None)["shards"]["written_this_run"] == 0
    dataset = open_dataset(url + "/in", options, add_captions=(url + "/scores",))
    assert read_shard(dataset, dataset.shards[2]).column(schema.CLIP_SCORES).null_count == 0


def test_score_refuses_random_weights_and_records_an_unreadable_shard(enriched, tmp_path, ray_session):
    with pytest.raises(ValueError, match="weights would be random"):
        run_score(build_config("cpu", None, [], input=str(enriched), output=str(tmp_path / "o"), model="veclip-tiny"))
    data = Path(tmp_path / "data")
    data.mkdir()
    for path in sorted(enriched.glob("*.parquet")):
        (data / path.name).write_bytes(path.read_bytes())
    (data / "part-00001.parquet").write_bytes(b"PAR1 truncated")
    model = str(random_tiny_clip(tmp_path / "model"))
    config = build_config("cpu", None, [], input=str(data), output=str(tmp_path / "scores"), model=model)
    summary = run_score(config, log=lambda *_: None)
    assert summary["shards"]["done"] == 2 and list(summary["failed"]) == ["part-00001.parquet"]
    assert summary["failed"]["part-00001.parquet"]["stage"] == "plan" and summary["gate"] == "none (scores only)"
    assert all(s["flagged"] == 0 for s in summary["columns"].values())


@pytest.mark.slow
def test_a_killed_driver_is_resumed_without_writing_a_shard_twice(sample_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((sample_root / "train").glob("*.parquet"))])
    for k in range(12):
        pq.write_table(rows.slice(k * 5, 5), data / f"part-{k:05d}.parquet")
    model, out = str(random_tiny_clip(tmp_path / "model")), tmp_path / "scores"
    cmd = [
        str(Path(sys.executable).with_name("veclip")),
        "score",
        "--preset",
        "cpu",
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        model,
        "--percentile",
        "20",
        "--set",
        "batch_size=1",
    ]
    kill_job_when(
        cmd, lambda: list((out / CURRENT.done).glob("*.json")) if (out / CURRENT.done).exists() else [], "a first shard"
    )
    before = {p.name: json.loads(p.read_text())["run_id"] for p in (out / CURRENT.done).glob("*.json")}
    assert 1 <= len(before) < 12

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert len(before) <= int(re.search(r"(\d+) already done", rerun.stdout).group(1)) < 12
    after = {p.name: json.loads(p.read_text())["run_id"] for p in (out / CURRENT.done).glob("*.json")}
    assert len(after) == 12 and all(after[n] == run_id for n, run_id in before.items())  # never written twice
    keys = [k for p in sorted(out.glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    assert keys == rows.column("key").to_pylist()
    assert "60 rows in 12 shards" in rerun.stdout


def test_images_are_decoded_a_batch_at_a_time_never_a_whole_shard(sample_root):
    """At 10k rows of 224 px a shard's decoded tensors are ~6 GB: decoding runs a batch ahead of the model,
    no further, and a bad image in a batch costs only its own row."""
    import torch

    from veclip.eval.embed import embed_images

    table = pq.read_table(sample_root / "train" / "part-00000.parquet")
    images = pa.chunked_array([pa.array([b"junk", *table.column("image").to_pylist()[1:]], pa.binary())])
    live, peak = [0], [0]

    def preprocess(image):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return torch.zeros(3, 8, 8)

    class Model:
        def encode_image(self, batch):
            live[0] -= len(batch)  # embedded: the batch's tensors are dropped
            return torch.ones(len(batch), 4)

    embedded, errors = embed_images(Model(), preprocess, images, batch_size=4)
    assert peak[0] <= 4 and embedded.shape == (len(images) - 1, 4)
    assert errors[0] is not None and errors[1:] == [None] * (len(images) - 1)


def test_score_takes_a_hub_model_without_pretrained(enriched, tmp_path):
    """``--model hf-hub:org/repo`` (open_clip's Hub schema: config and weights from the repo) is scored
    without ``--pretrained``; the repo's commit is the weights' identity. Offline: the repo is laid out
    in a Hugging Face cache here, as a download leaves it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--veclip--tiny-clip"
    random_tiny_clip(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["score", "--preset", "cpu", "--input", str(enriched), "--output", str(tmp_path / "scores")]
    result = veclip_cli(*args, "--model", "hf-hub:veclip/tiny-clip", "--percentile", "50", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "scores" / CURRENT.summary).read_text())
    assert summary["weights"] == f"hf-hub:veclip/tiny-clip@{sha}" and summary["rows"] == 60
    refused = veclip_cli(*args[:-1], str(tmp_path / "o2"), "--model", "ViT-B-32")
    assert refused.returncode == 2 and "hf-hub:org/repo" in refused.stderr


def test_actors_load_the_hub_commit_the_driver_pinned_and_local_weights_are_digested(tmp_path, monkeypatch):
    """The fingerprint named the commit the driver saw while actors loaded ``main`` when they started: a push in
    between scored with other weights under the same fingerprint. The actors now load the pinned commit. A
    local ``--pretrained`` file replaced in place changes the weights' identity."""
    from safetensors.torch import load_file, save_file

    from veclip.eval.model import load_model, resolve_model
    from veclip.storage import StorageOptions

    repo = tmp_path / "hub" / "models--veclip--tiny-clip"
    first, second = "a" * 40, "b" * 40
    random_tiny_clip(repo / "snapshots" / first)
    shutil.copytree(repo / "snapshots" / first, repo / "snapshots" / second)
    weights = repo / "snapshots" / second / "open_clip_model.safetensors"
    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))  # a push: other weights
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    load, weights_id = resolve_model("hf-hub:veclip/tiny-clip", None, StorageOptions())
    assert load == weights_id == f"hf-hub:veclip/tiny-clip@{first}"
    (repo / "refs" / "main").write_text(second)  # main moves on while the stage runs
    model, _, _ = load_model(load, None, None)
    expected = load_file(str(repo / "snapshots" / first / "open_clip_model.safetensors"))
    name, value = next(iter(model.state_dict().items()))
    assert (value == expected[name]).all()

    local = tmp_path / "w.safetensors"
    shutil.copy(repo / "snapshots" / first / "open_clip_model.safetensors", local)
    before = resolve_model("veclip-tiny", str(local), StorageOptions())[1]
    shutil.copy(weights, local)
    assert resolve_model("veclip-tiny", str(local), StorageOptions())[1] != before


def test_a_changed_gate_is_refused_with_a_flag_score_has(enriched, tmp_path):
    """`veclip score` refused an output scored under another configuration with "pass --redo-mismatched", a flag
    score did not have. It has it now: refused without it, planned to redo with it."""
    model = str(random_tiny_clip(tmp_path / "model"))
    out = tmp_path / "scores"
    store = ShardStore(Location(str(out)))
    for path in sorted(enriched.glob("*.parquet")):  # an earlier run's tables, under another gate
        store.write(Marker(path.name, 0, fingerprint="another-gate"), pa.table({"key": ["x"]}))
    args = ["score", "--preset", "cpu", "--input", str(enriched), "--output", str(out), "--model", model]
    refused = veclip_cli(*args, "--percentile", "10", "--dry-run")
    assert refused.returncode != 0 and "--redo-mismatched" in refused.stderr, refused.stderr
    redo = veclip_cli(*args, "--percentile", "10", "--dry-run", "--redo-mismatched")
    assert redo.returncode == 0, redo.stderr
    assert "3 to do (60 rows), 3 of them to redo" in redo.stdout, redo.stdout
