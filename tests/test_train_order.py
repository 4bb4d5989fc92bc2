"""The training read order and exact batching, without Ray: pure functions of (seed, epoch, workers)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veclip.images import ImageLimits
from veclip.storage import Location
from veclip.train.captions import CaptionConfig
from veclip.train.checkpoint import Progress, WorkerProgress
from veclip.train.data import SKIP_REASONS, exact_batches, preprocess
from veclip.train.loop import resume_point
from veclip.train.order import Position, ReadUnit, read_units, window_order, worker_windows
from veclip.train.resumes import render_resume, resume_cause

UNITS = [ReadUnit(f"s{i // 3}.parquet", i % 3, 10 + i) for i in range(12)]


def test_each_epoch_deals_every_unit_to_exactly_one_worker():
    for epoch in range(3):
        dealt = [u for rank in range(3) for w in worker_windows(UNITS, 7, epoch, rank, 3, 2) for u in w]
        assert sorted(dealt, key=lambda u: (u.path, u.row_group)) == UNITS
    orders = [[u for w in worker_windows(UNITS, 7, epoch, 0, 3, 2) for u in w] for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch
    assert worker_windows(UNITS, 7, 1, 2, 3, 2) == worker_windows(UNITS, 7, 1, 2, 3, 2)  # and always the same one
    assert [len(w) for w in worker_windows(UNITS, 7, 0, 0, 3, 3)] == [3, 1]
    assert sorted(window_order(50, 1, 2, 0, 4)) == list(range(50))
    assert (
        list(window_order(50, 1, 2, 0, 4)) == list(window_order(50, 1, 2, 0, 4)) != list(window_order(50, 1, 3, 0, 4))
    )


def test_row_groups_come_from_the_footers(tmp_path):
    table = pa.table({"key": [str(i) for i in range(25)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    location = Location(str(tmp_path))
    files = [(str(tmp_path / n), (tmp_path / n).stat().st_size) for n in ("b.parquet", "a.parquet")]
    units, unreadable = read_units(location.fs, files)
    assert [(u.row_group, u.rows) for u in units] == [(0, 10), (1, 10), (2, 5)]
    assert list(unreadable) == [str(tmp_path / "b.parquet")]


def _blocks(n: int, sizes: list[int], skip_every: int = 0, epoch: int = 0):
    """A stream of n rows over window 0 of ``epoch`` cut into blocks of the given sizes; every k-th row flagged."""
    skip = np.array([(i % skip_every == 3) if skip_every else False for i in range(n)], dtype=np.int8)
    rows = {
        "image": np.arange(n).reshape(n, 1, 1, 1).astype(np.uint8),
        "tokens": np.zeros((n, 4), np.int32),
        "slot": np.zeros(n, np.int8),
        "key_hash": np.arange(n, dtype=np.int64) + 1000 * epoch,
        "skip": skip,
        "_epoch": np.full(n, epoch, np.int64),
        "_window": np.zeros(n, np.int64),
        "_offset": np.arange(n, dtype=np.int64),
    }
    start = 0
    for size in sizes:
        yield {k: v[start : start + size] for k, v in rows.items()}
        start += size


def test_exact_batches_do_not_depend_on_block_sizes():
    cut = lambda sizes: [
        (list(b.rows["key_hash"]), b.position, b.skipped) for b in exact_batches(_blocks(40, sizes, 5), 6)
    ]
    one = cut([40])
    assert one == cut([7, 1, 13, 19]) == cut([1] * 40)
    assert [len(keys) for keys, _, _ in one] == [6] * 5  # 32 usable rows: 5 full batches, the rest waits
    assert all(k % 5 != 3 for keys, _, _ in one for k in keys)
    first_keys, first_position, first_skipped = one[0]
    assert first_keys == [0, 1, 2, 4, 5, 6] and first_position == Position(0, 0, 7)
    assert first_skipped == {SKIP_REASONS[1]: 1}  # row 3, flagged, passed over and counted once
    end = one[-1][1].offset  # rows after the last batch are not passed yet: counted when they are
    assert sum(sum(s.values()) for _, _, s in one) == sum(1 for i in range(end) if i % 5 == 3)


def test_a_stream_restarted_at_a_position_continues_with_the_same_batches():
    full = [(list(b.rows["key_hash"]), b.position) for b in exact_batches(_blocks(40, [9, 9, 9, 13], 5), 6)]
    position = full[1][1]
    rest = {k: v for k, v in next(_blocks(40, [40], 5)).items()}
    tail = {k: v[position.offset :] for k, v in rest.items()}
    again = [(list(b.rows["key_hash"]), b.position) for b in exact_batches(iter([tail]), 6)]
    assert again == full[2:]


def test_a_batch_never_spans_two_epochs():
    # epoch 0's last 4 usable rows are short of a batch: left unread, and epoch 1 starts a fresh batch,
    # whether the two epochs come in separate blocks or in one (Ray Data may join blocks)
    def cut(blocks):
        return [(b.epoch, list(b.rows["key_hash"]), b.position) for b in exact_batches(iter(blocks), 6)]

    zero, one = next(_blocks(22, [22], 0, epoch=0)), next(_blocks(12, [12], 0, epoch=1))
    separate = cut([zero, one])
    joined = cut([{k: np.concatenate([zero[k], one[k]]) for k in zero}])
    assert separate == joined
    assert [(e, len(keys)) for e, keys, _ in separate] == [(0, 6), (0, 6), (0, 6), (1, 6), (1, 6)]
    assert separate[3][1] == list(range(1000, 1006)) and separate[3][2] == Position(1, 0, 6)


def test_resume_point_is_exact_only_with_the_same_worker_count():
    saved = Progress(
        step=8,
        samples_seen=512,
        workers=[
            WorkerProgress(Position(1, 2, 40), {"image_unusable": 1}),
            WorkerProgress(Position(1, 3, 5), {"no_usable_caption": 2}),
        ],
    )
    progress, mine = resume_point(saved, 1, 2, "ckpt")
    assert mine.position == Position(1, 3, 5) and progress.resumes[-1]["exact"] and progress.step == 8
    progress, mine = resume_point(saved, 0, 4, "ckpt")
    assert mine.position == Position(2) and not progress.resumes[-1]["exact"]
    assert "from 2 to 4" in progress.resumes[-1]["why"] and mine.skipped == {
        "image_unusable": 1,
        "no_usable_caption": 2,
    }
    # the same worker count over other data (shards finished since, a footer unread): not exact, and it says so
    saved.data_plan = "plan-a"
    progress, mine = resume_point(saved, 1, 2, "ckpt", "plan-a")
    assert progress.resumes[-1]["exact"] and mine.position == Position(1, 3, 5) and progress.data_plan == "plan-a"
    progress, mine = resume_point(saved, 1, 2, "ckpt", "plan-b")
    assert not progress.resumes[-1]["exact"] and "the data or its order changed" in progress.resumes[-1]["why"]
    assert mine.position == Position(2) and progress.data_plan == "plan-b"
    old = Progress.from_dict({k: v for k, v in saved.to_dict().items() if k != "data_plan"})  # before it was kept
    assert resume_point(old, 1, 2, "ckpt", "plan-b")[0].resumes[-1]["exact"]


def test_the_data_plans_fingerprint_holds_the_seed_and_the_window():
    """A rerun with another seed or window_units deals and permutes the rows differently: a checkpoint's
    positions no longer name the same rows, so the fingerprint a resume checks must change with them."""
    from veclip.schema import ColumnMap
    from veclip.train.data import DataPlan

    plan = DataPlan(None, tuple(UNITS), (), (), ColumnMap(), 4, {})
    same = plan.fingerprint(7, 2)
    assert same == DataPlan(None, tuple(UNITS), (), (), ColumnMap(), 4, {}).fingerprint(7, 2)
    assert len({same, plan.fingerprint(8, 2), plan.fingerprint(7, 3)}) == 3
    assert DataPlan(None, tuple(UNITS[:-1]), (), (), ColumnMap(), 4, {}).fingerprint(7, 2) != same


def test_a_resume_says_why_it_happened():
    """Another invocation resuming is a rerun; a checkpoint taken on a preemption notice says so; a saved
    worker's node gone is a lost node; else a worker died. Each is told in a line."""
    workers = [WorkerProgress(Position(0, 1, 2), node="n-a"), WorkerProgress(Position(0, 1, 3), node="n-b")]
    saved = Progress(step=8, samples_seen=64, workers=workers, attempt="run-1")
    saved = Progress.from_dict(saved.to_dict())  # round trip: the nodes and the attempt kept
    assert resume_cause(saved, "run-2", {"n-a", "n-b"}) == "rerun"
    assert resume_cause(saved, "run-1", {"n-a", "n-c"}) == "node lost"
    assert resume_cause(saved, "run-1", {"n-a", "n-b"}) == "worker died"
    saved.preempted = {"nodes": ["n-b"], "ranks": [1], "deadline_ms": None, "at_step": 8}
    assert resume_cause(Progress.from_dict(saved.to_dict()), "run-1", {"n-a"}) == "preempted"
    progress, _ = resume_point(saved, 1, 2, "ckpt", cause="node lost")
    assert progress.resumes[-1]["cause"] == "node lost" and progress.resumes[-1]["workers"][1]["node"] == "n-b"
    line = render_resume(progress.resumes[-1])
    assert line.startswith("restart after a lost node: resumed exactly from step 8 (ckpt): worker 0 at epoch 0")
    old = {**progress.resumes[-1]}
    del old["cause"]  # recorded before causes were
    assert render_resume(old, places=False) == "restart: resumed exactly from step 8 (ckpt)"


@pytest.fixture(scope="module")
def sample_table(tmp_path_factory):
    from veclip.world.generate import SampleConfig, generate

    root = tmp_path_factory.mktemp("order")
    generate(SampleConfig(str(root), rows=40, eval_rows=1, shards=1, image_size=64, seed=1), log=lambda *_: None)
    return pq.read_table(next((root / "train").glob("*.parquet")))


def _with_positions(table: pa.Table, epoch: int) -> pa.Table:
    table = table.append_column("_epoch", pa.array(np.full(table.num_rows, epoch, np.int64)))
    for name in ("_window", "_offset"):
        table = table.append_column(name, pa.array(np.zeros(table.num_rows, np.int64)))
    return table


def test_augmentation_is_a_pure_function_of_seed_epoch_and_key(sample_table):
    rows = sample_table.slice(0, 8)
    out = lambda table, epoch: preprocess(
        _with_positions(table, epoch), "veclip-tiny", CaptionConfig("alttext"), ImageLimits(), 0
    )

    a, b = out(rows, 0), out(rows.take([7, 6, 5, 4, 3, 2, 1, 0]), 0)
    assert np.array_equal(a["image"], b["image"][::-1])  # per key, whatever the batch order
    assert not np.array_equal(a["image"], out(rows, 1)["image"])  # a different crop the next epoch


def test_only_the_chosen_caption_is_tokenized(sample_table):
    import open_clip

    from veclip.train.model import register_configs

    register_configs()
    tokenizer = open_clip.get_tokenizer("veclip-tiny")
    rows = sample_table.slice(0, 24)
    rows = rows.append_column("vecap", pa.array([f"a visual caption number {i}" for i in range(rows.num_rows)]))
    captions = CaptionConfig("mix")
    chosen = {}
    for epoch in (0, 1):
        out = preprocess(_with_positions(rows, epoch), "veclip-tiny", captions, ImageLimits(), 0)
        texts = captions.slot_texts(
            lambda name: rows.column(name).to_pylist() if name in rows.column_names else [None] * rows.num_rows
        )
        trained = np.flatnonzero(out["skip"] == 0)
        assert out["tokens"].shape == (rows.num_rows, tokenizer.context_length)  # one caption per row, not one per slot
        assert np.array_equal(out["tokens"][trained], tokenizer([texts[out["slot"][i]][i] for i in trained]).numpy())
        chosen[epoch] = out["slot"][trained]
    assert set(chosen[0]) == {captions.slots.index("alt_text"), captions.slots.index("vecap")}
    assert not np.array_equal(chosen[0], chosen[1])  # drawn again each epoch


def test_the_decode_transform_is_open_clips_without_building_the_model():
    # built from the model's config (milliseconds), not by creating the model (seconds per decode process)
    import open_clip

    from veclip.train.augment import augment_and_tokenizer

    for name in ("veclip-tiny", "ViT-B-16"):
        augment, size, _ = augment_and_tokenizer(name)
        _, reference, _ = open_clip.create_model_and_transforms(name, load_weights=False)
        kept = [t for t in reference.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
        assert repr(augment) == repr(kept) and size == ((64, 64) if name == "veclip-tiny" else (224, 224))


def test_the_resized_crop_draws_torchvisions_parameters(monkeypatch):
    import math
    import random

    from PIL import Image
    from torchvision.transforms import RandomResizedCrop, functional

    from veclip.train.augment import resized_crop

    boxes = []
    monkeypatch.setattr(
        functional, "resized_crop", lambda image, top, left, h, w, *_, **__: boxes.append((top, left, h, w))
    )
    crop = RandomResizedCrop(32, scale=(0.5, 1.0))
    for seed in range(300):
        resized_crop(crop, Image.new("RGB", (80, 60)), random.Random(seed))
    for top, left, h, w in boxes:  # inside the image, area and aspect within the transform's ranges
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.5 * 4800 * 0.97 <= h * w <= 4800 and 3 / 4 * 0.93 <= w / h <= 4 / 3 * 1.07
    assert len(set(boxes)) > 250  # drawn afresh per seed...
    again = []
    monkeypatch.setattr(
        functional, "resized_crop", lambda image, top, left, h, w, *_, **__: again.append((top, left, h, w))
    )
    for seed in range(300):
        resized_crop(crop, Image.new("RGB", (80, 60)), random.Random(seed))
    assert again == boxes  # ...and the same for the same seed
    resized_crop(crop, Image.new("RGB", (200, 4)), random.Random(0))  # no crop fits: torchvision's central fallback
    assert again[-1] == (0, (200 - round(4 * 4 / 3)) // 2, 4, round(4 * 4 / 3)) and math.isfinite(again[-1][2])


def test_device_decode_matches_the_cpu_path_and_refuses_what_it_refuses(sample_table):
    # decode=device: the task proves each JPEG decodes and draws its crop box; the worker decodes
    # (here torchvision's CPU decoder stands in for nvJPEG) and crops. Other formats decode in the task.
    import io

    import torch
    from PIL import Image

    from veclip.images import encode_jpeg
    from veclip.train.augment import decode_on_device, device_crop_for

    rows = sample_table.slice(0, 12).to_pylist()
    big = Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 60).convert("RGB")
    png = io.BytesIO()
    big.save(png, format="PNG")
    rows[0]["image"] = encode_jpeg(big)  # another size than the sample's
    rows[1]["image"] = png.getvalue()
    rows[2]["image"] = rows[3]["image"][: len(rows[3]["image"]) // 2]  # truncated: its header still parses
    for row in rows:
        row["alt_text"] = "a small picture of shapes on a plain background"  # every row trainable but for its image
    table = _with_positions(pa.Table.from_pylist(rows, schema=sample_table.schema), 3)
    args = ("veclip-tiny", CaptionConfig("alttext"), ImageLimits(), 0)
    cpu, device = preprocess(table, *args), preprocess(table, *args, decode="device")

    assert np.array_equal(cpu["skip"], device["skip"]) and device["skip"][2] == SKIP_REASONS.index("image_unusable")
    assert np.array_equal(cpu["tokens"], device["tokens"])
    assert device["on_device"][1] == 0 and np.array_equal(
        device["image"][1], cpu["image"][1]
    )  # the PNG: decoded in the task
    on_device = np.flatnonzero(device["on_device"])
    assert (
        set(on_device) == set(range(12)) - {1, 2}
        and not device["skip"][on_device].any()
        and not device["image"][on_device].any()
    )
    images = torch.from_numpy(device["image"])
    decode_on_device(images, device["jpeg"], device["box"], on_device, device_crop_for("veclip-tiny"))
    # the same crops, resized by torch instead of PIL: within a few levels per pixel
    difference = (images[on_device].float() - torch.from_numpy(cpu["image"][on_device]).float()).abs()
    assert difference.mean() < 3 and np.array_equal(
        images[~np.isin(np.arange(12), on_device)].numpy(), cpu["image"][~np.isin(np.arange(12), on_device)]
    )


def test_k_captions_per_image_are_tokenized_image_major(sample_table):
    import open_clip

    from veclip.train.model import register_configs

    register_configs()
    tokenizer = open_clip.get_tokenizer("veclip-tiny")
    rows = sample_table.slice(0, 16)
    rows = rows.append_column("vecap", pa.array([f"a visual caption number {i}" for i in range(rows.num_rows)]))
    captions = CaptionConfig("mix", per_image=2)
    out = preprocess(_with_positions(rows, 0), "veclip-tiny", captions, ImageLimits(), 0)
    texts = captions.slot_texts(
        lambda name: rows.column(name).to_pylist() if name in rows.column_names else [None] * rows.num_rows
    )
    trained = np.flatnonzero(out["skip"] == 0)
    assert out["tokens"].shape == (16, 2, tokenizer.context_length) and out["slot"].shape == (16, 2)
    both = 0
    for i in trained:  # both captions of the mix where both are usable (else the usable one twice), in the row's order
        usable = [s for s in (0, 1) if texts[s][i] and len(texts[s][i].split()) >= captions.min_words]
        assert sorted(out["slot"][i]) == (usable if len(usable) == 2 else usable * 2)
        both += len(usable) == 2
        assert np.array_equal(out["tokens"][i], tokenizer([texts[s][i] for s in out["slot"][i]]).numpy())
    assert both >= 8
    batch = next(exact_batches(iter([out]), len(trained)))
    assert batch.rows["tokens"].shape == (len(trained), 2, tokenizer.context_length)


def test_a_dataset_in_one_file_of_one_row_group_trains_on_any_worker_count(sample_root, tmp_path):
    """1,797 handwritten digits in one file, as pandas writes it, once failed on 2 workers ("1 row groups
    for 2 workers"). The row group is cut into row ranges: every row is read exactly once per epoch over
    the workers, the same rows for the same (seed, epoch, rank), and the units are the row groups whenever
    there are enough of them (so checkpoints written before resume exactly)."""
    from veclip.schema import ColumnMap
    from veclip.storage import StorageOptions
    from veclip.train.data import plan_data, read_window
    from veclip.train.order import split_units

    table = pa.concat_tables([pq.read_table(p) for p in sorted((sample_root / "train").glob("*.parquet"))])
    (tmp_path / "one").mkdir()
    pq.write_table(table, tmp_path / "one" / "digits.parquet")  # one row group
    assert pq.ParquetFile(tmp_path / "one" / "digits.parquet").metadata.num_row_groups == 1
    for workers in (2, 3, 8):
        plan = plan_data(str(tmp_path / "one"), StorageOptions(), ColumnMap(), workers, log=lambda *_: None)
        assert len(plan.units) >= workers and sum(u.rows for u in plan.units) == table.num_rows
        keys = []
        for rank in range(workers):
            for window in range(len(worker_windows(list(plan.units), 0, 0, rank, workers, 8))):
                batch = {"epoch": np.zeros(1, np.int64), "window": np.full(1, window, np.int64)}
                keys += [
                    k for t in read_window(batch, plan, Position(), rank, workers, 0, 8) for k in t["key"].to_pylist()
                ]
        assert sorted(keys) == sorted(table.column("key").to_pylist())  # every row once
    assert split_units(UNITS, 3) == UNITS  # enough row groups: the units are unchanged


def test_a_row_group_bigger_than_a_unit_is_read_as_row_ranges(sample_root, tmp_path, monkeypatch):
    """A 10,000-row shard as pyarrow writes it is one ~1 GB row group, and a window holds its units: a group
    over twice the unit size is cut into ranges of about that size, each read streaming its group, every
    row once; groups as veclip writes them (one unit's size) stay whole."""
    from veclip.schema import ColumnMap
    from veclip.storage import StorageOptions
    from veclip.train import order
    from veclip.train.data import plan_data, read_window

    table = pa.concat_tables([pq.read_table(p) for p in sorted((sample_root / "train").glob("*.parquet"))])
    (tmp_path / "one").mkdir()
    pq.write_table(table, tmp_path / "one" / "big.parquet")  # one row group
    group_bytes = pq.ParquetFile(tmp_path / "one" / "big.parquet").metadata.row_group(0).total_byte_size
    plan = plan_data(str(tmp_path / "one"), StorageOptions(), ColumnMap(), 1, log=lambda *_: None)
    assert len(plan.units) == 1  # under twice the unit size: whole
    monkeypatch.setattr(order, "UNIT_BYTES", group_bytes // 6)
    plan = plan_data(str(tmp_path / "one"), StorageOptions(), ColumnMap(), 1, log=lambda *_: None)
    assert len(plan.units) == 7 and {u.row_group for u in plan.units} == {0}
    keys = []
    for window in range(len(worker_windows(list(plan.units), 0, 0, 0, 1, 2))):
        batch = {"epoch": np.zeros(1, np.int64), "window": np.full(1, window, np.int64)}
        keys += [k for t in read_window(batch, plan, Position(), 0, 1, 0, 2) for k in t["key"].to_pylist()]
    assert sorted(keys) == sorted(table.column("key").to_pylist())


def test_a_transient_read_error_is_retried_not_fatal(sample_root, tmp_path, monkeypatch):
    """A reset that outlived s3fs's retries once restarted the whole worker group; a window's read is retried."""
    from veclip import storage
    from veclip.schema import ColumnMap
    from veclip.storage import StorageOptions
    from veclip.train.data import plan_data, read_window

    plan = plan_data(str(sample_root / "train"), StorageOptions(), ColumnMap(), 1, log=lambda *_: None)
    real, failures = pq.ParquetFile, [2]

    def flaky(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise ConnectionResetError("Connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", flaky)
    monkeypatch.setattr("time.sleep", lambda s: None)  # the backoff (the real clock's sleep)
    batch = {"epoch": np.zeros(1, np.int64), "window": np.zeros(1, np.int64)}
    rows = sum(t.num_rows for t in read_window(batch, plan, Position(), 0, 1, 0, 8))
    assert rows == sum(u.rows for u in plan.units) and failures == [0]
    with pytest.raises(FileNotFoundError):  # not transient: raised at once
        storage.with_retries(lambda: open(tmp_path / "nope"), "reading nope")
