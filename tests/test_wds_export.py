"""``veclip webdataset``: tars that webdataset reads and open_clip_train trains on (the real packages on
the reading side), every caption and its provenance in each sample's .json, a rerun that skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import veclip_cli

from veclip.world.generate import SampleConfig, generate


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """Sample shards with a rewrite's columns in them (copy layout): a VeCap (empty on some rows, where the
    export falls back to the AltText), its provenance, and LaCLIP rewrites."""
    root = tmp_path_factory.mktemp("wds")
    generate(SampleConfig(str(root / "sample"), rows=96, eval_rows=1, shards=2, image_size=64), log=lambda *_: None)
    data = root / "data"
    data.mkdir()
    for path in sorted((root / "sample" / "train").glob("*.parquet")):
        table = pq.read_table(path)
        refs = table.column("ref_caption").to_pylist()
        vecap = [None if i % 8 == 0 else ref for i, ref in enumerate(refs)]
        table = table.append_column("vecap", pa.array(vecap, pa.string()))
        table = table.append_column("vecap_provenance", pa.array(["fuser:tiny"] * len(refs), pa.string()))
        table = table.append_column("rewrites", pa.array([[f"a photo: {r}"] for r in refs]))
        pq.write_table(table, data / path.name)
    return data


def test_export_writes_what_webdataset_reads_and_a_rerun_skips(captioned, tmp_path, monkeypatch):
    import webdataset as wds

    out = tmp_path / "tars"
    first = veclip_cli("webdataset", "--input", str(captioned), "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert "2 tars written, 0 already there" in first.stdout, first.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == ["part-00000.tar", "part-00001.tar"]
    rows = [r for p in sorted(captioned.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    usable = [r for r in rows if (r["vecap"] or r["alt_text"] or "").strip()]
    assert sum(sizes.values()) == len(usable)

    samples = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False))
    assert len(samples) == len(usable)
    by_key = {r["key"]: r for r in rows}
    for sample in samples:
        meta = json.loads(sample["json"])
        row = by_key[meta["key"]]
        assert sample["jpg"] == row["image"]
        assert sample["txt"].decode() == (row["vecap"] or row["alt_text"]).strip()
        assert meta["vecap_provenance"] == "fuser:tiny" and meta["rewrites"] == row["rewrites"]
        assert meta["alt_text"] == row["alt_text"] and meta["url"] == row["url"]
    # Hugging Face's webdataset reader takes the folder as it is too
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["__key__"]) == sorted(s["__key__"] for s in samples) and "txt" in loaded.column_names

    again = veclip_cli("webdataset", "--input", str(captioned), "--output", str(out))
    assert "0 tars written, 2 already there" in again.stdout, again.stdout


def test_open_clip_train_trains_on_the_export(captioned, tmp_path):
    """open_clip's own trainer, reading the export as its users do (--dataset-type webdataset)."""
    out = tmp_path / "tars"
    assert veclip_cli("webdataset", "--input", str(captioned), "--output", str(out)).returncode == 0
    trainer = (
        "import sys; from veclip.train.model import register_configs; register_configs(); "
        "from open_clip_train.main import main; main(sys.argv[1:])"
    )
    args = ["--train-data", f"{out}/part-{{00000..00001}}.tar", "--dataset-type", "webdataset"]
    args += ["--train-num-samples", "64", "--batch-size", "16", "--epochs", "1", "--workers", "1"]
    args += ["--model", "veclip-tiny", "--device", "cpu", "--precision", "fp32", "--warmup", "1"]
    args += ["--logs", str(tmp_path / "logs"), "--name", "wds", "--log-every-n-steps", "1", "--report-to", ""]
    run = subprocess.run(
        [sys.executable, "-c", trainer, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "2"},
    )
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-4000:]
    assert "Train Epoch: 0" in console and "Loss:" in console, console[-4000:]
    assert list((tmp_path / "logs" / "wds" / "checkpoints").glob("epoch_1.pt")), console[-2000:]


def test_keys_stay_distinct_and_unusable_ones_are_left_out_with_their_reason(captioned, tmp_path):
    """``a/b``, ``a_b`` and ``a.b`` were one sample key (the tar held three samples under one name and sizes.json
    said three); an empty key made a member called ``.jpg``; a NUL cut a member's name. And a rerun with another
    caption column is refused rather than mixing two captionings under one sizes.json."""
    import webdataset as wds

    source = tmp_path / "in"
    source.mkdir()
    table = pq.read_table(sorted(captioned.glob("*.parquet"))[0]).slice(1, 6)  # rows with a VeCap
    keys = ["a/b", "a_b", "a.b", "a%2Eb", "", "x\0y"]
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys)), source / "p.parquet")
    out = tmp_path / "tars"
    result = veclip_cli("webdataset", "--input", str(source), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "1 empty key" in result.stdout and "1 key with a NUL character" in result.stdout, result.stdout
    samples = list(wds.WebDataset(str(out / "p.tar"), shardshuffle=False))
    assert sorted(json.loads(s["json"])["key"] for s in samples) == sorted(keys[:4])
    assert len({s["__key__"] for s in samples}) == 4 and json.loads((out / "sizes.json").read_text()) == {"p.tar": 4}
    other = veclip_cli("webdataset", "--input", str(source), "--output", str(out), "--caption", "alt_text")
    assert other.returncode != 0 and "other settings (caption: 'vecap' then, 'alt_text' now)" in other.stderr
