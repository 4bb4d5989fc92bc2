"""Training on this machine, for real: Ray Train workers (gloo on CPU) streaming from Ray Data."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from veclip.shards.layout import CURRENT
from veclip.shards.store import NOT_MARKED
from veclip.storage import Location
from veclip.train.checkpoint import load_state, metric_history, read_model
from veclip.train.config import build_config, preset
from veclip.train.export import export
from veclip.train.loop import TrainHooks
from veclip.train.model import cosine_with_warmup, create_model, param_groups, train_flops_per_sample
from veclip.train.trainer import render_summary, run_train
from veclip.world.generate import SampleConfig, generate


def quiet(*_):
    pass


def test_param_groups_and_schedule():
    model = create_model("veclip-tiny")
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.2
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"]) and all("bias" not in names[id(p)] for p in decay["params"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = cosine_with_warmup(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_the_take_off_step_is_where_the_loss_leaves_chance():
    """A CLIP sits at ln(global batch) until it starts to learn; the report names the step it left."""
    from veclip.world.report import take_off_step

    chance = np.log(64)
    flat = [{"step": s, "loss": chance + 0.01 * (-1) ** s} for s in range(1, 51)]
    falling = flat[:30] + [{"step": s, "loss": chance - 0.05 * (s - 30)} for s in range(31, 61)]
    assert take_off_step(flat, 64) is None
    assert take_off_step(falling, 64) == 31  # 10 steps from 31 average 0.275 under chance
    schedule = build_config("tiny", None, ["steps=300"], input="x", output="y")
    assert schedule.optim.warmup_for(schedule.steps) == 30 and preset("default").optim.warmup_for(300) == 500
    with pytest.raises(ValueError, match="warmup_share"):
        build_config("tiny", None, ["optim.warmup_share=1.5"], input="x", output="y")


def test_fused_adamw_takes_the_same_step():
    # the fused kernel (GPU default) is exercised on the CPU: the same update as the loop's default
    from veclip.train.config import OptimConfig
    from veclip.train.model import adamw

    models = [create_model("veclip-tiny") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    images, texts = torch.randn(4, 3, 64, 64), torch.randint(0, 100, (4, models[0].context_length))
    for model, fused in zip(models, (False, True)):
        optimizer = adamw(model, OptimConfig(lr=1e-3, fused=fused), torch.device("cpu"))
        assert optimizer.defaults["fused"] is fused
        image_features, text_features, scale = model(images, texts)[:3]
        (image_features @ text_features.T * scale).logsumexp(1).mean().backward()
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert adamw(models[0], OptimConfig(), torch.device("cpu")).defaults["fused"] is False  # auto: GPUs only


@pytest.fixture(scope="module")
def ref_data(tmp_path_factory) -> Path:
    """Sample data whose `vecap` column is the reference caption (a perfect captioner),
    plus one undecodable image and one row with no caption at all."""
    root = tmp_path_factory.mktemp("train-data")
    generate(SampleConfig(str(root / "sample"), rows=480, eval_rows=1, shards=4, image_size=64, seed=3), log=quiet)
    out = root / "enriched"
    out.mkdir()
    for path in sorted((root / "sample" / "train").glob("*.parquet")):
        table = pq.read_table(path)
        table = table.append_column("vecap", table.column("ref_caption"))
        rows = table.to_pylist()
        if path.name == "part-00000.parquet":
            rows[0]["image"] = b"junk"
            rows[1]["alt_text"], rows[1]["vecap"] = None, None
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / path.name)
    return out


@pytest.mark.slow
def test_two_workers_learn_checkpoint_and_export(ref_data, tmp_path, ray_session):
    # A tiny contrastive run sits on the chance plateau for a seed-dependent number of steps
    # (seed 0's data order: ~80 here; seeds 1 and 2: ~10); this test is about leaving it.
    config = build_config(
        "tiny",
        None,
        ["steps=60", "checkpoint_every=20", "keep_checkpoints=2", "captions.mode=vecap", "seed=1"],
        input=str(ref_data),
        output=str(tmp_path),
        name="learn",
    )
    console = []
    summary = run_train(config, log=console.append)
    run = tmp_path / "learn"
    # the driver's live progress line, from rank 0's steps (worker prints are not forwarded)
    live = [int(line.split("[step ")[1].split("/")[0]) for line in console if line.startswith("train: [step ")]
    assert live and live == sorted(live) and live[-1] <= 60, console
    history = metric_history(str(run))
    assert [m["step"] for m in history] == list(range(1, 61))
    first, last = np.mean([m["loss"] for m in history[:5]]), np.mean([m["loss"] for m in history[-5:]])
    chance = np.log(64)  # 32 per worker x 2 workers: each row's logits span the global batch
    assert last < first - 0.5 and last < chance - 0.3, (first, last)
    for key in (
        "lr",
        "logit_scale",
        "samples_per_s",
        "samples_per_s_per_worker",
        "data_wait_share",
        "train_flops_per_sample",
    ):
        assert all(m[key] is not None for m in history), key
    assert history[-1]["samples_seen"] == 60 * 32 * 2
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 2  # num_to_keep
    assert summary["metrics"]["step"] == 60 and summary["rows_skipped_by_reason"]["image_unusable"] >= 1
    assert summary["rows_skipped_by_reason"]["no_usable_caption"] >= 1
    written = json.loads((run / "summary.json").read_text())
    assert (
        written["caption_mode"] == "vecap"
        and written["config"]["steps"] == 60
        and written["config"]["captions"]["mode"] == "vecap"
    )

    # export -> stock open_clip gives the training model's embeddings
    import open_clip

    out = export(str(run), str(tmp_path / "export"))
    stock, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    trained = create_model("veclip-tiny")
    trained.load_state_dict(read_model(str(run)).weights)
    images = torch.randn(3, 3, 64, 64)
    texts = open_clip.get_tokenizer(f"local-dir:{out}")(["a red star", "two blue circles", ""])
    stock.eval(), trained.eval()
    with torch.no_grad():
        assert torch.equal(stock.encode_image(images), trained.encode_image(images))
        assert torch.equal(stock.encode_text(texts), trained.encode_text(texts))
    # eval reads a run into memory: the same model, and no exported copy left behind
    from veclip.eval.model import load_model

    before = set(Path(tempfile.gettempdir()).iterdir())
    in_memory, _, _ = load_model(str(run), None, None)
    assert set(Path(tempfile.gettempdir()).iterdir()) == before
    with torch.no_grad():
        assert torch.equal(in_memory.encode_image(images), trained.encode_image(images))


@pytest.mark.slow
def test_several_captions_per_image_decoded_on_the_device(ref_data, tmp_path, ray_session):
    # multi-positive training (AltText and VeCap of each image in the step) with JPEGs decoded by
    # the workers (torchvision's CPU decoder here; nvJPEG on a GPU), end to end on 2 Ray Train workers
    config = build_config(
        "tiny",
        None,
        ["steps=40", "checkpoint_every=40", "captions.mode=mix", "captions.per_image=2", "decode=device", "seed=1"],
        input=str(ref_data),
        output=str(tmp_path),
        name="multi",
    )
    console = []
    summary = run_train(config, log=console.append)
    assert any("x 2 captions each (multi-positive)" in line for line in console), console
    history = metric_history(str(tmp_path / "multi"))
    first, last = np.mean([m["loss"] for m in history[:5]]), np.mean([m["loss"] for m in history[-5:]])
    assert last < first - 0.3, (first, last)
    assert history[-1]["samples_seen"] == 40 * 32 * 2  # images: each with its 2 captions
    assert summary["rows_skipped_by_reason"]["image_unusable"] >= 1  # the junk image, refused in the task as before
    flops = history[-1]["train_flops_per_sample"]
    tiny = create_model("veclip-tiny")
    assert flops > train_flops_per_sample(tiny, 64, tiny.context_length)  # a second text per image
    budget = build_config("tiny", None, ["captions.per_image=4", "captions.budget_neutral=true"], input="x", output="y")
    assert budget.images_per_step == budget.batch_size // 4


@pytest.mark.slow
def test_the_mix_at_p_0_and_p_1_is_alt_text_only_and_vecap_only(ref_data, tmp_path, ray_session):
    """VeCLIP's mix with p = 0 trains exactly as AltText only, and with p = 1 exactly as VeCap only: the
    same rows in the same order, the same weights after the steps. The p = 0 run's worker is killed at step 2,
    before the first checkpoint: the group starts again from step 0 (exactly: the same weights still), and
    the restart is recorded (it once left no trace)."""
    weights = {}
    runs = (("p0", "mix p_vecap=0"), ("alttext", "alttext"), ("p1", "mix p_vecap=1"), ("vecap", "vecap"))
    for name, mode in (*runs, ("half", "mix p_vecap=0.5")):
        mode, *p = mode.split()
        extra = [f"captions.{p[0]}"] if p else []
        config = build_config(
            "tiny",
            None,
            ["steps=4", "checkpoint_every=4", "scale.num_workers=1", f"captions.mode={mode}", *extra],
            input=str(ref_data),
            output=str(tmp_path / name),
            name=name,
        )
        kill = 2 if name == "p0" else None
        hooks = TrainHooks(kill, sample_log=str(tmp_path / name / "samples"))
        summary = run_train(config, log=quiet, hooks=hooks)
        weights[name] = (read_model(str(tmp_path / name / name)).weights, summary["rows_skipped_by_reason"])
        if kill:
            [restart] = summary["resumes"]
            assert restart["from_step"] == 0 and restart["checkpoint"] is None and restart["cause"] == "worker died"
            assert "no checkpoint had been committed" in render_summary(summary)
    for mix, single in (("p0", "alttext"), ("p1", "vecap")):
        assert _trained_samples(tmp_path / mix / "samples") == _trained_samples(tmp_path / single / "samples")
        assert weights[mix][1] == weights[single][1]  # the same rows dropped for want of a caption
        for key, value in weights[single][0].items():
            torch.testing.assert_close(weights[mix][0][key], value, rtol=0, atol=0, msg=f"{mix} {key}")
    assert any(not torch.equal(weights["p0"][0][k], v) for k, v in weights["p1"][0].items())  # the captions matter
    _assert_realised_share(tmp_path / "half" / "samples", ref_data, 0.5)


def _assert_realised_share(samples: Path, data: Path, p: float) -> None:
    """The VeCap share of the captions trained with, from the sample log: p (binomial, 4 sigma) where the
    AltText is usable; always VeCap where it is not (the mix's fallback)."""
    from veclip.train.captions import CaptionConfig, key_hash

    vecap = CaptionConfig().slots.index("vecap")
    table = pa.concat_tables(pq.read_table(f, columns=["key", "alt_text"]) for f in sorted(data.glob("*.parquet")))
    usable_alt = {key_hash(k): len((a or "").split()) >= 2 for k, a in zip(*table.to_pydict().values())}
    drawn = [
        (usable_alt[h], slot == vecap)
        for line in (ln for f in sorted(samples.glob("rank-*.jsonl")) for ln in f.read_text().splitlines())
        for h, slot in zip(json.loads(line)["key_hash"], json.loads(line)["slot"])
    ]
    free = [is_vecap for usable, is_vecap in drawn if usable]
    assert abs(np.mean(free) - p) < 4 * math.sqrt(p * (1 - p) / len(free)), (np.mean(free), len(free))
    assert all(is_vecap for usable, is_vecap in drawn if not usable)


def _trained_samples(folder: Path) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """{(step, rank): (epoch, sample key hashes)}; a step trained twice (before and after a kill) keeps its
    last record."""
    out = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[(record["step"], rank)] = (record["epoch"], record["key_hash"])
    return out


@pytest.mark.slow
def test_a_killed_worker_resumes_exactly(ref_data, tmp_path, ray_session):
    """A worker process killed at step 9 (checkpoint at 8): the run goes on from the checkpoint
    and trains on the same samples, step by step, as a run that never stopped, to the same weights."""
    common = ["steps=20", "checkpoint_every=8", "captions.mode=mix"]
    runs = {}
    for name, kill_at_step in (("straight", None), ("killed", 9)):
        config = build_config("tiny", None, common, input=str(ref_data), output=str(tmp_path / name), name=name)
        runs[name] = run_train(
            config, log=quiet, hooks=TrainHooks(kill_at_step, sample_log=str(tmp_path / name / "samples"))
        )
    straight, killed = runs["straight"], runs["killed"]
    assert straight["resumes"] == [] and killed["metrics"]["step"] == 20
    [resume] = killed["resumes"]
    assert resume["exact"] and resume["from_step"] == 8 and len(resume["workers"]) == 2
    assert resume["cause"] == "worker died"  # its node is alive: the process died, not the node
    # ~240 rows per worker per epoch (two 120-row shards), 32 per batch: the 20 steps span 3 epochs
    assert {epoch for epoch, _ in _trained_samples(tmp_path / "straight" / "samples").values()} == {0, 1, 2}
    assert _trained_samples(tmp_path / "killed" / "samples") == _trained_samples(tmp_path / "straight" / "samples")
    lines = (tmp_path / "killed" / "samples" / "rank-0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 10)) + list(range(9, 21))  # step 9 ran twice
    history = metric_history(str(tmp_path / "killed" / "killed"))
    assert [m["step"] for m in history] == list(range(1, 21))
    assert killed["rows_skipped_by_reason"] == straight["rows_skipped_by_reason"]
    weights = {name: read_model(str(tmp_path / name / name)).weights for name in runs}
    for key, value in weights["straight"].items():
        torch.testing.assert_close(weights["killed"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_data_and_checkpoints_on_s3(ref_data, s3_bucket, ray_session):
    url, options = s3_bucket
    fs = Location(url, options).fs
    fs.put(str(ref_data) + "/", url[len("s3://") :] + "/data", recursive=True)
    # as a rewrite output that is still running: four shards marked done, one not yet
    for path in sorted(ref_data.glob("*.parquet")):
        fs.pipe_file(f"{url[5:]}/data/{CURRENT.done}/{path.name}.json", b"{}")
    fs.put_file(str(ref_data / "part-00001.parquet"), f"{url[5:]}/data/part-00099.parquet")
    # bf16 autocast (a GPU's default) runs here on CPU: the loop's mixed-precision path, exercised
    config = build_config(
        "tiny",
        None,
        ["steps=4", "checkpoint_every=2", "scale.num_workers=1", "precision=bf16"],
        input=url + "/data",
        output=url + "/runs",
        name="s3",
    )
    summary = run_train(config, options, log=quiet)
    assert summary["metrics"]["step"] == 4 and np.isfinite(summary["metrics"]["loss"])
    assert summary["shards_skipped_by_reason"] == {NOT_MARKED: 1}
    runs = Location(url + "/runs/s3", options)
    assert [p for p in runs.fs.ls(runs.path, detail=False) if "checkpoint_" in p]
    assert runs.fs.exists(runs.join("summary.json"))


def test_bad_config_and_data(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        build_config("tiny", None, ["batch_size=1"])
    with pytest.raises(ValueError, match="--input and --output"):
        preset("tiny").validate_for_run()


def test_a_second_train_into_a_run_folder_is_refused_with_who_holds_it(sample_root, tmp_path):
    """Training has a lease like the sharded outputs: two runs never write one run folder at once."""
    from conftest import veclip_cli

    from veclip.shards.lease import OutputLease

    held = OutputLease(Location(str(tmp_path / "runs" / "clip")), "first-run", ttl_seconds=600)
    held.acquire()
    try:
        result = veclip_cli(
            "train",
            "--input",
            str(sample_root / "train"),
            "--output",
            str(tmp_path / "runs"),
            "--name",
            "clip",
            "--preset",
            "tiny",
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "being written by run first-run" in result.stderr and "another --name" in result.stderr, result.stderr
        assert not (tmp_path / "runs" / "clip" / "run.json").exists()  # refused before anything was written
    finally:
        held.release()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_pickled_payload_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    """Checkpoints may come from a shared bucket: loading one never runs its code."""
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "payload": _Payload()}, tmp_path / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "a/b"])
def test_a_checkpoint_naming_a_path_as_its_model_is_refused(tmp_path, name):
    """The model name becomes a file name on every score and eval actor: a shared checkpoint's `../../x` wrote
    JSON outside the temp folder."""
    from veclip.train.checkpoint import MODEL_CONFIG_FILE, PROGRESS_FILE, STATE_FILE, SavedModel, read_model

    torch.save({"model": {}}, tmp_path / STATE_FILE)
    (tmp_path / MODEL_CONFIG_FILE).write_text(json.dumps({"name": name, "model_cfg": {"embed_dim": 8}}))
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match="is not a model name"):
        read_model(str(tmp_path))
    with pytest.raises(ValueError, match="is not a model name"):
        SavedModel(str(tmp_path), name, {"embed_dim": 8}, {}, 1).create()
    assert not (tmp_path.parent.parent / "escaped.json").exists()


def _wandb_records(path: Path):
    """The records of a W&B offline run file, parsed with wandb's own protobuf schema. (wandb 0.31 reads
    them in its Go core only; the framing is LevelDB's log format after a 7-byte W&B header: 32 KiB
    blocks of [crc32c, length, type] chunks, type 1 a whole record, 2-4 its first, middle, last part.)"""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, part = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length, kind) == (0, 0):  # a block's zero-filled tail
            pos += left
            continue
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def _wandb_history(folder: Path) -> tuple[set[str], list[int]]:
    """The run ids and the logged steps of every W&B offline run under ``folder`` (what ``wandb sync``
    uploads)."""
    ids, steps = set(), []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                steps.append(record.history.step.num)
    return ids, steps


@pytest.mark.slow
def test_a_run_and_its_resume_are_tracked_as_one_run_in_tensorboard_wandb_and_mlflow(ref_data, tmp_path, ray_session):
    """--report-to tensorboard,wandb,mlflow, offline: 12 steps, then a rerun with the same name to 20. Each
    tracker's own reader finds one run with every step once: TensorBoard's event reader, W&B's offline
    records, MLflow's file store."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    trackers = 'tracking.report_to=["tensorboard", "wandb", "mlflow"]'
    for steps in (12, 20):
        overrides = [f"steps={steps}", "checkpoint_every=6", "report_every=6", trackers]
        config = build_config("tiny", None, overrides, input=str(ref_data), output=str(tmp_path), name="tracked")
        run_train(config, log=quiet)
    folder = tmp_path / "tracked" / "tracking"

    events = EventMultiplexer().AddRunsFromDirectory(str(folder / "tensorboard")).Reload()
    losses = [e for run in events.Runs() for e in events.Scalars(run, "train/loss")]
    assert sorted(e.step for e in losses) == list(range(1, 21))  # both invocations, no step twice
    assert {"train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_share"} <= {
        tag for tags in events.Runs().values() for tag in tags["scalars"]
    }

    ids, steps = _wandb_history(folder)
    assert len(ids) == 1 and sorted(steps) == list(range(1, 21))  # one run id across the rerun

    record = json.loads((tmp_path / "tracked" / "tracking.json").read_text())
    client = MlflowClient(record["mlflow_uri"])  # the file store (its reader opts in as the writer did)
    history = client.get_metric_history(record["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    assert len(client.search_runs([client.get_experiment_by_name("veclip").experiment_id])) == 1
    metrics = metric_history(str(tmp_path / "tracked"))
    assert [round(m.value, 5) for m in sorted(history, key=lambda m: m.step)] == [
        round(m["loss"], 5) for m in metrics
    ]  # the figures the run itself kept
