"""Good data passes; each kind of bad data gives its own clear error naming shard and row."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veclip.schema import ColumnMap
from veclip.validate import ValidateConfig, validate


def _rewrite(path, change):
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _set(table, column, row, value):
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(
        i, table.schema.field(column).with_nullable(True), pa.array(values, table.schema.field(column).type)
    )


def _kinds(report):
    return {p.kind for p in report.problems}


def test_good_data_passes(sample_root):
    report = validate(ValidateConfig(str(sample_root / "train"), images="full"))
    assert report.usable and report.problems == []
    totals = report.totals
    assert totals.rows == 60 and totals.images_checked == 60 and totals.bad_images == 0
    assert 0 < totals.empty_alt_text < 60
    text = report.render()
    assert "OK: usable (60 rows in 3 shards)" in text and "part-00002.parquet" in text


def test_sampled_image_check(sample_root):
    report = validate(ValidateConfig(str(sample_root / "train"), images="sample", sample_per_shard=4))
    assert report.totals.images_checked == 12
    assert validate(ValidateConfig(str(sample_root / "train"), images="none")).totals.images_checked == 0


def test_missing_column(train_copy):
    _rewrite(train_copy / "part-00001.parquet", lambda t: t.drop_columns(["alt_text"]))
    report = validate(ValidateConfig(str(train_copy)))
    assert not report.usable and _kinds(report) == {"schema"}
    [problem] = report.problems
    assert problem.shard == "part-00001.parquet" and "missing required column 'alt_text'" in problem.message


def test_wrong_type(train_copy):
    _rewrite(
        train_copy / "part-00000.parquet",
        lambda t: t.set_column(1, "image", pa.array([f"img{i}.jpg" for i in range(t.num_rows)])),
    )
    report = validate(ValidateConfig(str(train_copy)))
    assert not report.usable
    assert "column 'image' has type string, expected binary" in report.render()


def test_null_key(train_copy):
    _rewrite(train_copy / "part-00002.parquet", lambda t: _set(t, "key", 5, None))
    report = validate(ValidateConfig(str(train_copy)))
    assert not report.usable and _kinds(report) == {"null_key"}
    assert "[null_key] part-00002.parquet row 5" in report.render()


def test_duplicate_key_across_shards(train_copy):
    first_key = pq.read_table(train_copy / "part-00000.parquet").column("key")[0].as_py()
    _rewrite(train_copy / "part-00002.parquet", lambda t: _set(t, "key", 3, first_key))
    report = validate(ValidateConfig(str(train_copy)))
    assert not report.usable and _kinds(report) == {"duplicate_key"}
    assert f"part-00002.parquet row 3 (key '{first_key}'): key also used at part-00000.parquet row 0" in report.render()


def test_corrupt_image_bytes(train_copy):
    _rewrite(train_copy / "part-00001.parquet", lambda t: _set(t, "image", 7, b"\xff\xd8\xff garbage"))
    report = validate(ValidateConfig(str(train_copy), images="full"))
    assert not report.usable and _kinds(report) == {"bad_image"}
    [problem] = report.problems
    assert (problem.shard, problem.row, problem.key) == ("part-00001.parquet", 7, "train-00000027")
    assert "image_undecodable" in str(problem)
    # a tolerance lets a mostly-good dataset through, with the problem still listed
    tolerant = validate(ValidateConfig(str(train_copy), images="full", max_bad_image_share=0.05))
    assert tolerant.usable and tolerant.problems


def test_non_parquet_file(train_copy):
    (train_copy / "part-00003.parquet").write_text("key,image\nnot,parquet\n")
    (train_copy / "README.txt").write_text("notes")
    report = validate(ValidateConfig(str(train_copy)))
    assert not report.usable and _kinds(report) == {"unreadable"}
    text = report.render()
    assert (
        "part-00003.parquet row" not in text and "[unreadable] part-00003.parquet: not a readable Parquet file" in text
    )
    assert "ignored non-Parquet file README.txt" in text


def test_folder_without_shards(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    report = validate(ValidateConfig(str(tmp_path)))
    assert not report.usable and "convert them with `veclip import`" in report.render()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        validate(ValidateConfig(str(tmp_path / "missing")))


def test_column_mapping_reads_img2dataset_names(tmp_path, sample_root):
    table = pq.read_table(sample_root / "train" / "part-00000.parquet")
    img2dataset = table.rename_columns(["key", "jpg", "caption", "url", "width", "height", *table.column_names[6:]])
    pq.write_table(img2dataset, tmp_path / "00000.parquet")
    assert not validate(ValidateConfig(str(tmp_path))).usable
    report = validate(
        ValidateConfig(str(tmp_path), columns=ColumnMap.parse("image=jpg,alt_text=caption"), images="full")
    )
    assert report.usable and report.totals.images_checked == table.num_rows


def test_validate_on_s3(s3_bucket, sample_root):
    from veclip.storage import Location

    url, options = s3_bucket
    root = Location(url + "/train", options)
    root.fs.put(str(sample_root / "train") + "/", root.path, recursive=True)
    report = validate(ValidateConfig(root.url, images="full"), options)
    assert report.usable and report.totals.rows == 60


def test_bad_config():
    with pytest.raises(ValueError, match="images must be one of"):
        ValidateConfig("x", images="some")


def test_duplicate_keys_found_beyond_the_memory_bound(train_copy):
    """60 keys, room for 10 in memory: keys are spilled in 6 partitions and the duplicate is still found."""
    first_key = pq.read_table(train_copy / "part-00000.parquet").column("key")[4].as_py()
    _rewrite(train_copy / "part-00002.parquet", lambda t: _set(t, "key", 9, first_key))
    report = validate(ValidateConfig(str(train_copy), images="none", max_keys_in_memory=10))
    assert report.key_partitions == 6
    assert _kinds(report) == {"duplicate_key"} and report.totals.duplicate_keys == 1
    assert f"part-00002.parquet row 9 (key '{first_key}'): key also used at part-00000.parquet row 4" in report.render()


def test_sample_reads_the_images_of_one_row_group_per_shard(tmp_path, sample_root, monkeypatch):
    """Shards of 4 row groups: the sample decodes rows of one group and reads no other group's images."""
    for path in sorted((sample_root / "train").glob("*.parquet")):
        pq.write_table(pq.read_table(path), tmp_path / path.name, row_group_size=5)
    read = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kwargs):
        read.append((row_groups, columns))
        return real(self, batch_size=batch_size, row_groups=row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    report = validate(ValidateConfig(str(tmp_path), images="sample", sample_per_shard=4))
    assert report.usable and report.totals.images_checked == 12
    assert [len(groups) for groups, _ in read] == [1, 1, 1] and all(columns == ["image"] for _, columns in read)
    # --images full still reads every group
    full = validate(ValidateConfig(str(tmp_path), images="full"))
    assert full.totals.images_checked == 60
