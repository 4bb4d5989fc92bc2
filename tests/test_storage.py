"""Storage behaves the same on local disk and on S3 (a moto server on 127.0.0.1)."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veclip import storage
from veclip.storage import Location, ShardStore, StorageOptions


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "out"))
    url, options = request.getfixturevalue("s3_bucket")
    return Location(url + "/out", options)


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"key": [f"k{i + offset}" for i in range(n)], "image": [bytes([i % 256]) * 100 for i in range(n)]})


def test_round_trip_markers_and_listing(root):
    store = ShardStore(root)
    assert store.done() == set()
    # written out of order: listing is by name, the order every rerun sees
    for name in ("b-00001.parquet", "a-00000.parquet", "c-00002.parquet"):
        store.write(name, _table(5), stats={"note": name})
    quarantine = pa.table({"key": ["bad"], "stage": ["test"], "reason": ["image_undecodable"], "detail": ["x"]})
    marker = store.write("d-00003.parquet", _table(3), quarantine)
    assert marker["rows"] == 3 and marker["quarantined"] == 1
    assert store.done() == {"a-00000.parquet", "b-00001.parquet", "c-00002.parquet", "d-00003.parquet"}
    assert [p.rsplit("/", 1)[1] for p in storage.list_shards(root)] == [
        "a-00000.parquet", "b-00001.parquet", "c-00002.parquet", "d-00003.parquet",
    ]
    assert store.marker("b-00001.parquet")["note"] == "b-00001.parquet"
    assert store.is_done("a-00000.parquet") and not store.is_done("zzz.parquet")
    assert [p.rsplit("/", 1)[1] for p in store.quarantine_shards()] == ["d-00003.parquet"]
    # pyarrow reads back through the same filesystem
    back = pq.read_table(store.shards()[0], filesystem=root.fs)
    assert back.equals(_table(5))
    assert pq.read_table(store.quarantine_shards()[0], filesystem=root.fs).column("reason").to_pylist() == ["image_undecodable"]


def test_shard_without_marker_is_not_done(root):
    """A shard written but never marked (a crash in between) is not done: a rerun redoes it."""
    storage.write_parquet(root.fs, root.join("x.parquet"), _table(2))
    store = ShardStore(root)
    assert store.done() == set() and store.shards() == []
    assert [p.rsplit("/", 1)[1] for p in storage.list_shards(root)] == ["x.parquet"]


def test_rewrite_overwrites_in_place(root):
    store = ShardStore(root)
    store.write("s.parquet", _table(4))
    store.write("s.parquet", _table(2, offset=10))
    assert pq.read_table(root.join("s.parquet"), filesystem=root.fs).column("key").to_pylist() == ["k10", "k11"]
    assert store.marker("s.parquet")["rows"] == 2
    assert not [p for p in root.fs.ls(root.path, detail=False) if p.endswith(".tmp")]


def test_missing_folder_is_a_clear_error(root):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.list_shards(root.child("nope"))


@pytest.mark.parametrize(
    "url, name",
    [("s3://b/in/00042.tar", "00042.parquet"), ("/x/part-00001.parquet", "part-00001.parquet"), ("data.csv", "data.parquet"), ("a/b.tar.gz", "b.parquet")],
)
def test_output_shard_name(url, name):
    assert storage.output_shard_name(url) == name


def test_resolver():
    fs, path = storage.filesystem("file:///tmp/x/")
    assert "file" in fs.protocol and path == "/tmp/x"
    fs, path = storage.filesystem("s3://bucket/prefix/", StorageOptions(endpoint_url="http://127.0.0.1:1"))
    assert path == "bucket/prefix"
    with pytest.raises(ValueError, match="unsupported storage URL"):
        storage.filesystem("gopher://x")


def test_endpoint_from_standard_environment(s3_bucket, monkeypatch):
    """With no explicit options, AWS_ENDPOINT_URL and the AWS credential chain apply."""
    url, options = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", options.endpoint_url)
    ShardStore(Location(url + "/env")).write("e.parquet", _table(1))
    assert ShardStore(Location(url + "/env", options)).done() == {"e.parquet"}


def test_row_groups_are_sized_by_bytes(tmp_path):
    table = _table(100)  # ~100 bytes of image per row
    rows = storage.row_group_rows(table, target_bytes=1000)
    assert 5 <= rows <= 10
    storage.write_parquet(storage.filesystem(str(tmp_path))[0], str(tmp_path / "t.parquet"), table, target_bytes=1000)
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert meta.num_row_groups == -(-100 // rows) and meta.row_group(0).num_rows == rows


def test_guard_large_binary_widens_only_big_columns():
    table = pa.table({"key": ["a", "b"], "image": [b"x" * 600, b"y" * 600]})
    guarded = storage.guard_large_binary(table, limit=1000)
    assert guarded.schema.field("image").type == pa.large_binary()
    assert guarded.schema.field("key").type == pa.string()
    assert guarded.column("image").to_pylist() == table.column("image").to_pylist()
    assert storage.guard_large_binary(table).equals(table)


def test_ray_data_reads_through_the_same_filesystem(s3_bucket, ray_session):
    """The resolved filesystem serves Ray Data (the stages' reader) on S3 too."""
    url, options = s3_bucket
    root = Location(url + "/ray", options)
    store = ShardStore(root)
    store.write("a.parquet", _table(3))
    store.write("b.parquet", _table(4, offset=3))
    rows = ray_session.data.read_parquet(store.shards(), filesystem=root.arrow_fs).take_all()
    assert sorted(r["key"] for r in rows) == [f"k{i}" for i in range(7)]


def test_readers_use_only_finished_shards(tmp_path):
    """A rewrite output still being written (or crashed) holds shards without markers: readers skip them."""
    root = storage.Location(str(tmp_path))
    store = storage.ShardStore(root)
    for name in ("a.parquet", "b.parquet"):
        store.write(name, pa.table({"key": [name]}))
    pq.write_table(pa.table({"key": ["half"]}), tmp_path / "c.parquet")  # written, marker not yet
    pq.write_table(pa.table({"key": ["bad"]}), tmp_path / "d.parquet")
    store.record_failure("d.parquet", {"error": "x"})
    paths, skipped = storage.finished_shards(root)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.parquet", "b.parquet"]
    assert skipped == {storage.NOT_MARKED: 1, storage.RECORDED_FAILED: 1}
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"key": ["x"]}), plain / "x.parquet")
    assert storage.finished_shards(storage.Location(str(plain))) == ([str(plain / "x.parquet")], {})
