"""Storage behaves the same on local disk and on S3 (a moto server on 127.0.0.1)."""

import dataclasses
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MemoryPeak, veclip_cli

from veclip import parquet_files, storage
from veclip.shards import store as shard_store
from veclip.shards.layout import CURRENT, output_shard_name
from veclip.shards.marker import Failure, Marker, PoolStats
from veclip.shards.store import ShardStore
from veclip.storage import Location, StorageOptions


@pytest.fixture
def root(out_location) -> Location:
    return out_location


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"key": [f"k{i + offset}" for i in range(n)], "image": [bytes([i % 256]) * 100 for i in range(n)]})


def test_round_trip_markers_and_listing(root):
    store = ShardStore(root)
    assert store.done() == set()
    # written out of order: listing is by name, the order every rerun sees
    for name in ("b-00001.parquet", "a-00000.parquet", "c-00002.parquet"):
        store.write(Marker(name, 0, stats={"note": name}), _table(5))
    quarantine = pa.table({"key": ["bad"], "stage": ["test"], "reason": ["image_undecodable"], "detail": ["x"]})
    marker = store.write(Marker("d-00003.parquet", 0), _table(3), quarantine)
    assert marker.rows == 3 and marker.quarantined == 1 and marker.input_rows == 4
    assert store.done() == {"a-00000.parquet", "b-00001.parquet", "c-00002.parquet", "d-00003.parquet"}
    assert [p.rsplit("/", 1)[1] for p in storage.list_shards(root)] == [
        "a-00000.parquet",
        "b-00001.parquet",
        "c-00002.parquet",
        "d-00003.parquet",
    ]
    assert store.find_marker("b-00001.parquet").stats["note"] == "b-00001.parquet"
    assert store.find_marker("zzz.parquet") is None
    assert [p.rsplit("/", 1)[1] for p in store.quarantine_shards()] == ["d-00003.parquet"]
    # pyarrow reads back through the same filesystem
    back = pq.read_table(store.shards()[0], filesystem=root.fs)
    assert back.equals(_table(5))
    assert pq.read_table(store.quarantine_shards()[0], filesystem=root.fs).column("reason").to_pylist() == [
        "image_undecodable"
    ]


def test_shard_without_marker_is_not_done(root):
    """A shard written but never marked (a crash in between) is not done: a rerun redoes it."""
    parquet_files.write_parquet(root.fs, root.join("x.parquet"), _table(2))
    store = ShardStore(root)
    assert store.done() == set() and store.shards() == []
    assert [p.rsplit("/", 1)[1] for p in storage.list_shards(root)] == ["x.parquet"]


def test_rewrite_overwrites_in_place(root):
    store = ShardStore(root)
    store.write(Marker("s.parquet", 0), _table(4))
    store.write(Marker("s.parquet", 0), _table(2, offset=10))
    assert pq.read_table(root.join("s.parquet"), filesystem=root.fs).column("key").to_pylist() == ["k10", "k11"]
    assert store.find_marker("s.parquet").rows == 2
    assert not [p for p in root.fs.ls(root.path, detail=False) if p.endswith(".tmp")]


def test_missing_folder_is_a_clear_error(root):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.list_shards(root.child("nope"))


@pytest.mark.parametrize(
    "url, name",
    [
        ("s3://b/in/00042.tar", "00042.parquet"),
        ("/x/part-00001.parquet", "part-00001.parquet"),
        ("data.csv", "data.parquet"),
        ("a/b.tar.gz", "b.parquet"),
    ],
)
def test_output_shard_name(url, name):
    assert output_shard_name(url) == name


def test_resolver():
    fs, path = storage.filesystem("file:///tmp/x/")
    assert "file" in fs.protocol and path == "/tmp/x"
    fs, path = storage.filesystem("s3://bucket/prefix/", StorageOptions(endpoint_url="http://127.0.0.1:1"))
    assert path == "bucket/prefix"
    with pytest.raises(ValueError, match="unsupported storage URL"):
        storage.filesystem("gopher://x")
    with pytest.raises(ValueError, match="gs:// is not supported: an output's one-writer lease"):
        storage.filesystem("gs://bucket/prefix")


def test_endpoint_from_standard_environment(s3_bucket, monkeypatch):
    """With no explicit options, AWS_ENDPOINT_URL and the AWS credential chain apply."""
    url, options = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", options.endpoint_url)
    ShardStore(Location(url + "/env")).write(Marker("e.parquet", 0), _table(1))
    assert ShardStore(Location(url + "/env", options)).done() == {"e.parquet"}


def test_row_groups_are_sized_by_bytes(tmp_path):
    table = _table(100)  # ~100 bytes of image per row
    rows = parquet_files.row_group_rows(table, target_bytes=1000)
    assert 5 <= rows <= 10
    parquet_files.write_parquet(
        storage.filesystem(str(tmp_path))[0], str(tmp_path / "t.parquet"), table, target_bytes=1000
    )
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert meta.num_row_groups == -(-100 // rows) and meta.row_group(0).num_rows == rows


def test_markers_written_before_the_typed_marker_still_read(root):
    """A version-1 marker (pool figures as <pool>_<count> keys, no rows_in, stage figures at the top) reads
    into the typed marker, from its file and from the manifest alike."""
    old = {
        "shard": "o.parquet",
        "rows": 4,
        "quarantined": 1,
        "written_at": "2026-11-01T00:00:00Z",
        "layout": "copy",
        "fingerprint": "f",
        "run_id": "r",
        "fuser_prompt_tokens": 40,
        "fuser_requests": 4,
        "laclip_generated_tokens": 9,
        "resized": 2,
        "flags": {"vecap:empty": 1},
    }
    storage.write_json(root.fs, root.join(CURRENT.done, "o.parquet.json"), old)
    for save in (True, False):  # the second read comes from the manifest
        marker = ShardStore(root).markers(save_manifest=save)["o.parquet"]
        assert (marker.input_rows, marker.rows_out, marker.fingerprint, marker.flags) == (5, 4, "f", {"vecap:empty": 1})
        assert marker.pools == {
            "fuser": PoolStats(requests=4, prompt_tokens=40),
            "laclip": PoolStats(generated_tokens=9),
        }
        assert marker.stats == {"resized": 2}
    assert Marker.from_json(marker.to_json()) == marker


def test_ray_data_reads_through_the_same_filesystem(s3_bucket, ray_session):
    """The resolved filesystem serves Ray Data (the stages' reader) on S3 too."""
    url, options = s3_bucket
    root = Location(url + "/ray", options)
    store = ShardStore(root)
    store.write(Marker("a.parquet", 0), _table(3))
    store.write(Marker("b.parquet", 0), _table(4, offset=3))
    rows = ray_session.data.read_parquet(store.shards(), filesystem=root.arrow_fs).take_all()
    assert sorted(r["key"] for r in rows) == [f"k{i}" for i in range(7)]


def test_readers_use_only_finished_shards(tmp_path):
    """A rewrite output still being written (or crashed) holds shards without markers: readers skip them."""
    root = storage.Location(str(tmp_path))
    store = ShardStore(root)
    for name in ("a.parquet", "b.parquet"):
        store.write(Marker(name, 0), pa.table({"key": [name]}))
    pq.write_table(pa.table({"key": ["half"]}), tmp_path / "c.parquet")  # written, marker not yet
    pq.write_table(pa.table({"key": ["bad"]}), tmp_path / "d.parquet")
    store.record_failure(Failure("d.parquet", "in/d.parquet", "test", "r", "f", 1, ["x"]))
    assert store.failures()["d.parquet"].error == "x"
    paths, skipped = shard_store.finished_shards(root)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.parquet", "b.parquet"]
    assert skipped == {shard_store.NOT_MARKED: 1, shard_store.RECORDED_FAILED: 1}
    (tmp_path / "b.parquet").unlink()  # marked, then deleted: said, never read fewer rows silently
    paths, skipped = shard_store.finished_shards(root)
    assert len(paths) == 1 and skipped[shard_store.MARKED_BUT_MISSING] == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"key": ["x"]}), plain / "x.parquet")
    assert shard_store.finished_shards(storage.Location(str(plain))) == ([str(plain / "x.parquet")], {})


def test_an_output_equal_to_or_inside_an_input_is_refused_by_every_stage_that_writes(sample_root, tmp_path):
    """--output = --input once turned every image shard into a caption table of the same name; nothing is
    written now, by any stage, and the message says why."""
    from conftest import veclip_cli

    data = tmp_path / "data"
    shutil.copytree(sample_root / "train", data)
    contents = lambda: {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    before = contents()
    commands = {
        "rewrite": ["rewrite", "--input", str(data), "--output", str(data), "--mode", "laclip", "--preset", "tiny"],
        "score": ["score", "--input", str(data), "--output", str(data / "scores"), "--model", "x", "--pretrained", "y"],
        "train": ["train", "--input", str(data), "--output", str(data / "runs"), "--preset", "tiny"],
        "eval": ["eval", "--model", "x", "--input", str(data), "--output", str(data)],
        "import": ["import", str(data), "--output", str(data / "shards"), "--format", "webdataset"],
    }
    for stage, argv in commands.items():
        result = veclip_cli(*argv)
        refused = "inside the input" in result.stderr or "is the input" in result.stderr
        assert result.returncode != 0 and refused, (
            stage,
            result.stderr[-2000:],
        )
    assert contents() == before  # not a byte changed, nothing added
    # a sibling is fine, and so is a prefix that only shares the name's start
    storage.refuse_overlap("rewrite", str(tmp_path / "data-captions"), [str(data)])
    with pytest.raises(storage.OutputOverlapsInput, match="is the input"):
        storage.refuse_overlap("score", str(data) + "/", [str(tmp_path / "x"), f"{data}#vecap"])


def test_a_shard_written_again_never_leaves_a_marker_that_lies(root, monkeypatch):
    """Redoing a done shard (another configuration, changed inputs) once overwrote the shard before its
    marker: a crash between left the old marker describing new content, and an old quarantine stayed."""
    store = ShardStore(root)
    quarantine = pa.table({"key": ["bad"], "stage": ["test"], "reason": ["image_undecodable"], "detail": ["x"]})
    store.write(Marker("s.parquet", 0, fingerprint="old"), _table(3), quarantine)

    def crash(*args, **kwargs):
        raise OSError("the node went away")

    monkeypatch.setattr("veclip.shards.store.write_parquet", crash)
    with pytest.raises(OSError):
        store.write(Marker("s.parquet", 0, fingerprint="new"), _table(2, offset=10))
    assert store.find_marker("s.parquet") is None and "s.parquet" not in store.markers()  # not done: redone next run
    monkeypatch.undo()
    store.write(Marker("s.parquet", 0, fingerprint="new"), _table(2, offset=10))
    assert store.find_marker("s.parquet").fingerprint == "new" and store.quarantine_shards() == []


def test_small_files_are_written_atomically_on_local_disk(tmp_path, monkeypatch):
    """A crash mid-write leaves the old file whole, never half a marker (a temp file and a rename)."""
    fs = storage.filesystem(str(tmp_path))[0]
    storage.write_json(fs, str(tmp_path / "m.json"), {"rows": 1})
    real = storage.os.replace
    monkeypatch.setattr(storage.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        storage.write_json(fs, str(tmp_path / "m.json"), {"rows": 2})
    monkeypatch.setattr(storage.os, "replace", real)
    assert storage.read_json(fs, str(tmp_path / "m.json")) == {"rows": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind


def test_a_one_row_group_shard_is_read_and_written_a_batch_at_a_time(tmp_path):
    """A shard as pyarrow, pandas or img2dataset write it is one row group: reading it a row group at a
    time (or with pyarrow's default pre-buffering) would hold it whole. Streamed, memory holds a batch
    (and a row group being written): four times the rows cost no more memory."""
    fs, held = storage.filesystem(str(tmp_path))[0], {}
    for n in (5_000, 20_000):
        table = pa.table({"key": [f"k{i}" for i in range(n)], "image": [os.urandom(3_000) for _ in range(n)]})
        # pyarrow's default: one row group, in pages of 1,024 values (the most a reader must hold at once)
        pq.write_table(table, tmp_path / "one.parquet", use_dictionary=["key"])
        assert pq.ParquetFile(tmp_path / "one.parquet").num_row_groups == 1
        with MemoryPeak() as peak:
            rows = sum(t.num_rows for t in storage.read_batches(fs, str(tmp_path / "one.parquet"), ["image"]))
        assert rows == n
        held[n] = peak.grew
    assert held[20_000] < 1.3 * held[5_000], held  # a row group at a time: 4x (15 MB -> 60 MB)

    batches = storage.read_batches(fs, str(tmp_path / "one.parquet"))
    assert parquet_files.write_parquet(fs, str(tmp_path / "out.parquet"), batches, target_bytes=6_000_000) == 20_000
    written = pq.ParquetFile(tmp_path / "out.parquet")
    assert written.read().equals(table) and 8 <= written.num_row_groups <= 12  # ~2 MB row groups
    assert not written.metadata.row_group(0).column(1).has_dictionary_page  # images are never dictionary-encoded

    def failing():
        yield table.slice(0, 10)
        raise OSError("the input went away")

    with pytest.raises(OSError, match="went away"):
        parquet_files.write_parquet(fs, str(tmp_path / "out.parquet"), failing())
    assert pq.read_table(tmp_path / "out.parquet").equals(table)  # the old file stands, no temp file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "out.parquet"]
    empty = pq.ParquetFile(tmp_path / "one.parquet").schema_arrow.empty_table()
    pq.write_table(empty, tmp_path / "empty.parquet")
    assert [t.num_rows for t in storage.read_batches(fs, str(tmp_path / "empty.parquet"))] == [0]


def test_outputs_that_reach_an_input_through_a_link_or_a_join_are_refused(sample_root, tmp_path):
    """`score --input CAPTIONS --output IMAGES` (the folder the caption tables join to) would replace every image
    shard with a score table; an output reached through a symlink passed the path comparison."""
    from test_rewrite_faults import laclip_config, run_local

    images = tmp_path / "images"
    shutil.copytree(sample_root / "train", images)
    config = dataclasses.replace(laclip_config(images, tmp_path / "captions"), layout="captions")
    run_local(config)
    before = sorted((p.name, p.stat().st_size) for p in images.iterdir())
    result = veclip_cli(
        "score", "--input", str(tmp_path / "captions"), "--output", str(images), "--model", "x", "--pretrained", "y"
    )
    assert result.returncode == 2 and "is the input" in result.stderr, result.stderr
    (tmp_path / "link").symlink_to(images)
    with pytest.raises(storage.OutputOverlapsInput, match="is inside the input"):
        storage.refuse_overlap("rewrite", str(tmp_path / "link" / "out"), [str(images)])
    assert sorted((p.name, p.stat().st_size) for p in images.iterdir()) == before


def test_many_files_are_read_by_their_literal_names_on_both_storages(out_location):
    """fsspec's cat expands `*`, `?` and `[`: a file named `photo[1].jpg` was read as `photo1.jpg` (or missed),
    a name `**` read the whole folder, a marker of `x[1].parquet` raised KeyError in markers()."""
    fs = out_location.fs
    names = {"photo[1].jpg": b"bracket", "photo1.jpg": b"plain", "a*b.json": b"star", "q?.txt": b"question"}
    fs.makedirs(out_location.path, exist_ok=True)
    for name, data in names.items():
        fs.pipe_file(out_location.join(name), data)
    paths = [out_location.join(n) for n in names]
    assert storage.read_many(fs, paths) == dict(zip(paths, names.values()))
    store = shard_store.ShardStore(out_location)
    store.write(Marker("x[1].parquet", 0), _table(2))
    assert set(store.markers()) == {"x[1].parquet"}


def test_the_driver_hands_its_actors_the_endpoint_it_planned_against(tmp_path, monkeypatch):
    """AWS_ENDPOINT_URL set in the driver's shell only: actors on other nodes read and wrote the default AWS
    endpoint. The driver resolves endpoint and region once, and the pools' options carry them."""
    from veclip.clock import use_clock
    from veclip.shards.driver import run_stage
    from veclip.shards.simulate import SimConfig, SimExecutor, SimPool, SimStage
    from veclip.shards.virtual import SimClock

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage.StorageOptions().resolved() == storage.StorageOptions(
        endpoint_url="http://127.0.0.1:1", region="eu-west-3"
    )
    assert storage.StorageOptions(endpoint_url="http://mine").resolved().endpoint_url == "http://mine"
    stage = SimStage(SimConfig(shards=2, pools=(SimPool("p", 1, 1.0, 0.0),), preemption_per_hour=0), str(tmp_path))
    with use_clock(clock := SimClock(0.0)):
        run_stage(stage, lambda *_: None, executor=SimExecutor(stage.sim, clock))
    [pool] = stage.pools(None, None)
    assert pool.kwargs["options"].endpoint_url == "http://127.0.0.1:1"  # what each actor is built with
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.StorageOptions().resolved().endpoint_url is None


def test_a_file_no_run_wrote_is_never_overwritten(tmp_path):
    """An output holding a file named as a shard the run would write (a user's own, another tool's) that carries
    no marker, no counted try and no veclip mark in its footer: the run refuses it, naming it. A file a killed
    try of this stage left (its try counted, no marker yet), or one whose marker was removed by hand (as
    ShardChanged tells the user to do), is the stage's own and is written again."""
    from veclip.shards.driver import dry_run, run_stage
    from veclip.shards.guard import RunContext, ShardGuard
    from veclip.shards.simulate import SimConfig, SimExecutor, SimPool, SimStage
    from veclip.shards.store import ForeignFiles

    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"mine": [1, 2, 3]}), out / "part-000001.parquet")
    config = SimConfig(shards=3, rows_per_shard=5, pools=(SimPool("only", 1, 1.0, 0.0),), preemption_per_hour=0.0)
    with pytest.raises(ForeignFiles, match=r"1 file\(s\) in .* that no veclip run wrote .* part-000001.parquet"):
        dry_run(SimStage(config, str(out)))
    assert pq.read_table(out / "part-000001.parquet").column_names == ["mine"]

    # the same file after a try of this stage was counted for it (the try died before its marker): rewritten
    ShardGuard(Location(str(out)), RunContext("earlier", "f"), "simulate", 3, 0.0)._begin("part-000001.parquet")
    from veclip.clock import use_clock
    from veclip.shards.virtual import SimClock

    virtual = SimClock(start=1e9)
    with use_clock(virtual):
        summary = run_stage(SimStage(config, str(out)), lambda *_: None, executor=SimExecutor(config, virtual))
    assert summary["shards"]["done"] == 3 and pq.read_table(out / "part-000001.parquet").column_names == ["shard"]
    (out / CURRENT.done / "part-000002.parquet.json").unlink()  # a marker removed by hand: no try counted
    with use_clock(virtual):
        summary = run_stage(SimStage(config, str(out)), lambda *_: None, executor=SimExecutor(config, virtual))
    assert summary["shards"]["written_this_run"] == 1


def test_readers_refuse_an_output_missing_shards_or_mixing_configurations_unless_told(tmp_path):
    """A marker whose shard was deleted, or an output a crashed --redo-mismatched left holding two configurations:
    training (every reader) trained on fewer rows, or a mix, and said nothing. Now refused, naming the way out;
    told which configuration to take (or to take what is there), it reads that and counts the rest."""
    from veclip.dataset import Acceptance, UnsoundOutput, open_dataset
    from veclip.train.config import TrainConfig

    store = ShardStore(storage.Location(str(tmp_path)))
    for k, fingerprint in enumerate(["new", "new", "old"]):
        store.write(Marker(f"s{k}.parquet", 0, fingerprint=fingerprint), pa.table({"key": [str(k)], "image": [b"x"]}))
    with pytest.raises(UnsoundOutput, match=r"2 configurations \(new \(2 shards\), old \(1 shards\)\)"):
        open_dataset(str(tmp_path))
    taken = open_dataset(str(tmp_path), accept=Acceptance(fingerprint="new"))
    assert [s.path.rsplit("/", 1)[1] for s in taken.shards] == ["s0.parquet", "s1.parquet"]
    assert taken.skipped == {"another configuration than new": 1}
    with pytest.raises(UnsoundOutput, match="'newer' is none of them"):
        open_dataset(str(tmp_path), accept=Acceptance(fingerprint="newer"))

    (tmp_path / "s2.parquet").unlink()  # the odd one out, and then one of the others, deleted
    (tmp_path / "s1.parquet").unlink()
    with pytest.raises(UnsoundOutput, match=r"2 shard\(s\) marked done whose file is gone"):
        open_dataset(str(tmp_path), accept=Acceptance(fingerprint="new"))
    rest = open_dataset(str(tmp_path), accept=Acceptance(fingerprint="new", missing_shards=True))
    assert len(rest.shards) == 1 and rest.skipped[shard_store.MARKED_BUT_MISSING] == 2
    assert TrainConfig(accept=Acceptance(missing_shards=True)).accept.missing_shards  # --set accept.missing_shards=true


def test_batches_are_bounded_by_bytes_as_well_as_rows(tmp_path):
    """The captioner read ``pool.batch_size`` rows (1,024) whatever their bytes: 12 MB photos made a 12 GB batch.
    A reader given ``max_bytes`` takes fewer rows, at the file's mean bytes per row of the columns it reads."""
    import numpy as np

    from veclip.rewrite.workers import CAPTIONER_BATCH_BYTES

    images = [np.random.default_rng(k).bytes(100_000) for k in range(60)]
    pq.write_table(pa.table({"key": [str(k) for k in range(60)], "image": images}), tmp_path / "p.parquet")
    fs = storage.Location(str(tmp_path)).fs
    path = str(tmp_path / "p.parquet")
    assert [len(b) for b in storage.read_batches(fs, path, ["key", "image"], rows=1024, max_bytes=1_000_000)] == [
        9
    ] * 6 + [6]
    assert [len(b) for b in storage.read_batches(fs, path, ["key"], rows=1024, max_bytes=1_000_000)] == [60]
    assert [len(b) for b in storage.read_batches(fs, path, rows=25)] == [25, 25, 10]
    assert CAPTIONER_BATCH_BYTES >= 64 << 20  # a batch of ordinary web photos stays whole
