"""`veclip import`: webdataset tars and CSV+image folders to our shards; nothing lost."""

import csv
import io
import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from veclip import schema
from veclip.images import UNDECODABLE, encode_jpeg
from veclip.ingest import ImportConfig, run_import
from veclip.shards.layout import CURRENT
from veclip.shards.store import ShardStore
from veclip.status import StatusConfig, status
from veclip.storage import Location
from veclip.validate import ValidateConfig, validate
from veclip.wds_export import add_tar_member


def quiet(*_):
    pass


def _jpeg(i: int) -> bytes:
    return encode_jpeg(Image.new("RGB", (24, 16), (i * 40 % 256, 0, 0)))


def _write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                add_tar_member(tar, f"{key}.{ext}", data)


def _meta(key, caption):
    # DataComp's and img2dataset's fields beside the ones veclip maps: kept whole in source_json
    fields = {"uid": f"uid-{key}", "status": "success", "exif": {"Make": "x"}, "original_width": 24}
    return json.dumps({"key": key, "url": f"http://img/{key}", "caption": caption, **fields}).encode()


@pytest.fixture
def tars(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    _write_tar(
        src / "00000.tar",
        {
            f"00000{i:04d}": {
                "jpg": _jpeg(i),
                "txt": f"caption {i}".encode(),
                "json": _meta(f"00000{i:04d}", f"caption {i}"),
            }
            for i in range(5)
        },
    )
    _write_tar(
        src / "00001.tar",
        {
            "000010000": {"jpg": _jpeg(1), "json": _meta("000010000", "from json")},  # caption only in json
            "000010001": {"jpg": b"not a jpeg", "txt": b"corrupt image"},
            "000010002": {"txt": b"no image at all"},
            "000010003": {"png": _jpeg(3), "txt": b"png extension"},
        },
    )
    # a truncated tar: 3 samples written, the file cut mid-way
    _write_tar(src / "00002.tar", {f"2{i}": {"jpg": _jpeg(i) * 20, "txt": b"t"} for i in range(3)})
    data = (src / "00002.tar").read_bytes()
    (src / "00002.tar").write_bytes(data[: len(data) // 2])
    return src


def _reconcile(out: Location) -> tuple[int, int]:
    markers = ShardStore(out).markers().values()
    return sum(m.rows for m in markers), sum(m.quarantined for m in markers)


def test_webdataset_import(tars, tmp_path):
    out = Location(str(tmp_path / "out"))
    summary = run_import(ImportConfig(str(tars), out.url), log=quiet)
    assert summary.shards_written == 3 and summary.shards_skipped == 0
    assert summary.quarantined["image_undecodable"] == 1
    assert summary.quarantined["missing_image"] == 1
    assert summary.quarantined["truncated_archive"] == 1
    assert sorted(ShardStore(out).done()) == ["00000.parquet", "00001.parquet", "00002.parquet"]

    first = pq.read_table(out.join("00000.parquet")).to_pylist()
    assert [r["alt_text"] for r in first] == [f"caption {i}" for i in range(5)]
    assert first[0]["url"] == "http://img/000000000" and (first[0]["width"], first[0]["height"]) == (24, 16)
    second = {r["key"]: r for r in pq.read_table(out.join("00001.parquet")).to_pylist()}
    assert second["000010000"]["alt_text"] == "from json" and "000010003" in second
    # every .json field kept, as the source wrote it; none where a sample had no .json
    kept = json.loads(first[0]["source_json"])
    assert kept["uid"] == "uid-000000000" and kept["exif"] == {"Make": "x"} and kept["original_width"] == 24
    assert second["000010003"]["source_json"] is None
    quarantine = pq.read_table(out.join(CURRENT.quarantine, "00001.parquet")).to_pylist()
    assert {(q["key"], q["stage"], q["reason"]) for q in quarantine} == {
        ("000010001", "import", "image_undecodable"),
        ("000010002", "import", "missing_image"),
    }
    # every sample of the readable tars is somewhere; the output is valid input
    rows, quarantined = _reconcile(out)
    assert rows + quarantined - 1 == 9 + len(pq.read_table(out.join("00002.parquet")))
    assert validate(ValidateConfig(out.url, images="full")).usable

    # rerun: everything done, nothing rewritten
    again = run_import(ImportConfig(str(tars), out.url), log=quiet)
    assert again.shards_written == 0 and again.shards_skipped == 3


def test_webdataset_import_resumes(tars, tmp_path):
    out = tmp_path / "out"
    run_import(ImportConfig(str(tars), str(out)), log=quiet)
    (out / CURRENT.done / "00001.parquet.json").unlink()
    logged = []
    summary = run_import(ImportConfig(str(tars), str(out)), log=logged.append)
    assert summary.shards_written == 1 and summary.shards_skipped == 2
    assert logged == [
        "import: 00001.tar -> 00001.parquet (2 rows, 2 quarantined)",
        f"import: dataset card {out}/_README.md",
    ]


@pytest.fixture
def csv_set(tmp_path):
    images = tmp_path / "set" / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(7):
        (images / f"{i}.jpg").write_bytes(_jpeg(i))
        rows.append({"filepath": f"images/{i}.jpg", "title": f"photo {i}"})
    (images / "bad.jpg").write_bytes(b"junk")
    rows += [{"filepath": "images/missing.jpg", "title": "gone"}, {"filepath": "images/bad.jpg", "title": "junk"}]
    path = tmp_path / "set" / "index.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_import(csv_set, tmp_path):
    out = Location(str(tmp_path / "out"))
    config = ImportConfig(
        str(csv_set), out.url, columns=schema.ColumnMap.parse("image=filepath,alt_text=title"), rows_per_shard=4
    )
    summary = run_import(config, log=quiet)
    assert summary.shards_written == 3 and summary.rows == 7
    assert dict(summary.quarantined) == {"missing_file": 1, "image_undecodable": 1}
    assert sorted(ShardStore(out).done()) == ["index-00000.parquet", "index-00001.parquet", "index-00002.parquet"]
    rows = [r for name in sorted(ShardStore(out).done()) for r in pq.read_table(out.join(name)).to_pylist()]
    assert [r["alt_text"] for r in rows] == [f"photo {i}" for i in range(7)]
    assert rows[0]["key"] == "index-000000000" and rows[0]["url"] == "images/0.jpg"
    assert _reconcile(out) == (7, 2)
    assert run_import(config, log=quiet).shards_skipped == 3


def test_csv_import_names_missing_columns(csv_set, tmp_path):
    with pytest.raises(schema.SchemaError, match=r"CSV has no column\(s\) \['image', 'alt_text'\].*--columns"):
        run_import(ImportConfig(str(csv_set), str(tmp_path / "out")), log=quiet)


def test_csv_import_from_s3_read_back_by_datasets_and_pandas(csv_set, s3_bucket, tmp_path, monkeypatch):
    url, options = s3_bucket
    Location(url, options).fs.put(str(csv_set.parent) + "/", Location(url + "/set", options).path, recursive=True)
    config = ImportConfig(
        url + "/set/index.csv", url + "/out", columns=schema.ColumnMap.parse("image=filepath,alt_text=title")
    )
    summary = run_import(config, options, log=quiet)
    assert summary.rows == 7 and sum(summary.quarantined.values()) == 2
    # on S3 as the card prints it: datasets takes a glob of the shards (it reads no folder URL), pandas the folder
    import datasets
    import pandas as pd

    card = Location(url + "/out", options).fs.cat_file(Location(url + "/out", options).join("_README.md")).decode()
    assert f'datasets.load_dataset("parquet", data_files="{url}/out/*.parquet")' in card
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the Hub, were it asked, refuses at once

    def fsspec_options():  # a fresh dict each time: datasets adds its own keys to the one it is given
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": options.endpoint_url}}

    loaded = datasets.load_dataset(
        "parquet",
        data_files=f"{url}/out/*.parquet",
        storage_options=fsspec_options(),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert len(loaded) == 7 and len(pd.read_parquet(f"{url}/out", storage_options=fsspec_options())) == 7


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_import(ImportConfig(str(tmp_path / "nothing.csv"), str(tmp_path / "out")), log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        run_import(ImportConfig(str(tmp_path / "empty"), str(tmp_path / "out")), log=quiet)


def test_oversized_tar_members_are_quarantined_unread(tmp_path):
    """A gzip bomb: 128 MiB of zeros in a ~128 KiB .tar.gz, declared in the member's header."""
    import tracemalloc

    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "00000.tar.gz", "w:gz") as tar:
        for name, data in [("a.jpg", _jpeg(1)), ("a.txt", b"fine"), ("b.jpg", None), ("b.txt", b"bomb")]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.size = 128 * 1024 * 1024
                tar.addfile(info, io.BytesIO(bytes(info.size)))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert (src / "00000.tar.gz").stat().st_size < 1024 * 1024
    out = Location(str(tmp_path / "out"))
    tracemalloc.start()
    summary = run_import(ImportConfig(str(src), out.url), log=quiet)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.rows == 1 and dict(summary.quarantined) == {"member_too_large": 1}
    # the 128 MiB member was never held: what remains is gzip's per-chunk output (~1000:1 on zeros)
    assert peak < 48 * 1024 * 1024, peak
    bad = pq.read_table(out.join(CURRENT.quarantine, "00000.parquet")).to_pylist()[0]
    assert bad["key"] == "b" and "b.jpg: 134217728 bytes > limit" in bad["detail"]


def test_csv_paths_stay_in_the_csv_folder(csv_set, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg(9))
    with open(csv_set, "a", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([[str(outside), "absolute"], ["../secret.jpg", "dotdot"], ["http://127.0.0.1:9/x.jpg", "url"]])
    columns = schema.ColumnMap.parse("image=filepath,alt_text=title")
    out = Location(str(tmp_path / "out"))
    summary = run_import(ImportConfig(str(csv_set), out.url, columns=columns), log=quiet)
    assert summary.rows == 7 and summary.quarantined["path_outside_source"] == 3
    allowed = run_import(
        ImportConfig(str(csv_set), str(tmp_path / "out2"), columns=columns, allow_outside_paths=True), log=quiet
    )
    assert allowed.rows == 9 and allowed.quarantined["missing_file"] == 2  # the URL's host does not answer


def test_csv_paths_through_links_or_to_non_files_are_refused(csv_set, tmp_path):
    """A link inside the CSV's folder that points out of it passed the path check (normpath, not realpath) and
    was read; a folder named like an image was fetched. Both are refused with their reason."""
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg(9))
    images = csv_set.parent / "images"
    (images / "link.jpg").symlink_to(outside)
    (images / "folder.jpg").mkdir()
    with open(csv_set, "a", newline="") as f:
        csv.writer(f).writerows([["images/link.jpg", "a link out"], ["images/folder.jpg", "a folder"]])
    columns = schema.ColumnMap.parse("image=filepath,alt_text=title")
    out = Location(str(tmp_path / "out"))
    summary = run_import(ImportConfig(str(csv_set), out.url, columns=columns), log=quiet)
    assert summary.rows == 7 and summary.quarantined["path_outside_source"] == 2, summary.quarantined
    details = {r["key"]: r["detail"] for r in pq.read_table(out.join(CURRENT.quarantine)).to_pylist()}
    assert any("is a link to" in d and "outside the CSV's folder" in d for d in details.values()), details
    assert any("is not a regular file" in d for d in details.values()), details


def test_csv_paths_are_read_literally_and_wildcards_refused(csv_set, tmp_path):
    """fsspec expands `*`, `?` and `[` in a list of paths: `photo[1].jpg` was read as photo1.jpg (or missing) and
    `**` read the whole folder. Brackets are read as written; a wildcard row is quarantined with its reason."""
    images = csv_set.parent / "images"
    (images / "photo[1].jpg").write_bytes(_jpeg(11))
    (images / "photo1.jpg").write_bytes(_jpeg(12))
    with open(csv_set, "a", newline="") as f:
        csv.writer(f).writerows([["images/photo[1].jpg", "brackets"], ["images/**", "all"], ["images/p?.jpg", "one"]])
    columns = schema.ColumnMap.parse("image=filepath,alt_text=title")
    out = Location(str(tmp_path / "out"))
    summary = run_import(ImportConfig(str(csv_set), out.url, columns=columns), log=quiet)
    assert summary.rows == 8 and summary.quarantined["path_wildcard"] == 2, summary.quarantined
    rows = {r["alt_text"]: r for r in pq.read_table(out.url).to_pylist()}
    assert rows["brackets"]["image"] == _jpeg(11)
    details = [r["detail"] for r in pq.read_table(out.join(CURRENT.quarantine)).to_pylist()]
    assert any("holds *" in d for d in details) and any("holds ?" in d for d in details), details


def test_import_pre_resizes_large_images(tmp_path):
    # --resize: a short side above it is scaled down (JPEG re-encoded, width/height updated);
    # smaller images keep their bytes
    src = tmp_path / "wds"
    src.mkdir()
    big = encode_jpeg(Image.new("RGB", (900, 600), (200, 30, 30)))
    png = io.BytesIO()
    Image.new("L", (500, 1000), 128).save(png, format="PNG")
    _write_tar(
        src / "00000.tar",
        {
            "big": {"jpg": big, "txt": b"a big one"},
            "small": {"jpg": _jpeg(1), "txt": b"small"},
            "tall": {"png": png.getvalue(), "txt": b"a tall grey png"},
        },
    )
    out = Location(str(tmp_path / "out"))
    summary = run_import(ImportConfig(str(src), out.url, resize=256), log=quiet)
    assert summary.rows == 3 and summary.resized == 2 and "2 images resized" in summary.render()
    rows = {r["key"]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert (
        (rows["big"]["width"], rows["big"]["height"]) == (384, 256) == Image.open(io.BytesIO(rows["big"]["image"])).size
    )
    assert (
        (rows["tall"]["width"], rows["tall"]["height"])
        == (256, 512)
        == Image.open(io.BytesIO(rows["tall"]["image"])).size
    )
    assert Image.open(io.BytesIO(rows["big"]["image"])).format == "JPEG" and len(rows["big"]["image"]) < len(big)
    assert rows["small"]["image"] == _jpeg(1)
    # a header that parses over truncated pixels: resizing must decode them, and quarantines the row
    _write_tar(src / "00001.tar", {"cut": {"jpg": big[: len(big) // 2], "txt": b"half a jpeg"}})
    summary = run_import(ImportConfig(str(src), out.url, resize=256), log=quiet)
    assert summary.rows == 0 and summary.quarantined == {UNDECODABLE: 1}
    with pytest.raises(ValueError, match="resize"):
        ImportConfig(str(src), out.url, resize=-1)


def test_a_transient_read_error_is_retried_never_recorded_as_loss(tars, csv_set, tmp_path, monkeypatch):
    """An S3 reset mid-tar was recorded as truncated_archive and the shard marked done; a CSV fetch error became
    missing_file. Both are now read again; only a truly truncated archive or missing file is quarantined."""

    monkeypatch.setattr("time.sleep", lambda s: None)  # the backoff (the real clock's sleep)
    real_open, resets = LocalFileSystem.open, {"00000.tar": 1}

    def flaky_open(self, path, *args, **kwargs):
        name = path.rsplit("/", 1)[-1]
        if resets.get(name):
            resets[name] -= 1
            raise ConnectionResetError("Connection reset by peer")
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "open", flaky_open)
    out = Location(str(tmp_path / "wds-out"))
    run_import(ImportConfig(str(tars), out.url), log=quiet)
    assert resets == {"00000.tar": 0} and pq.read_table(out.join("00000.parquet")).num_rows == 5
    assert not (tmp_path / "wds-out" / CURRENT.quarantine / "00000.parquet").exists()  # nothing called truncated

    real_cat, failures = LocalFileSystem.cat_ranges, [1]

    def flaky_cat(self, paths, *args, **kwargs):  # the images' batch read (literal paths, no glob)
        found = real_cat(self, paths, *args, **kwargs)
        if failures[0]:
            failures[0] -= 1
            found[0] = TimeoutError("read timed out")
        return found

    monkeypatch.setattr(LocalFileSystem, "cat_ranges", flaky_cat)
    config = ImportConfig(
        str(csv_set), str(tmp_path / "csv-out"), columns=schema.ColumnMap.parse("image=filepath,alt_text=title")
    )
    summary = run_import(config, log=quiet)
    assert (
        failures == [0]
        and summary.rows == 7
        and dict(summary.quarantined) == {"missing_file": 1, "image_undecodable": 1}
    )


def test_a_bad_csv_row_is_quarantined_with_its_reason_and_the_rest_imported(csv_set, tmp_path):
    """A field over 128 KiB or a row that is not UTF-8 aborted every rerun at the same place."""
    lines = csv_set.read_bytes().splitlines(keepends=True)
    huge = b'images/0.jpg,"' + b"x" * (200 * 1024) + b'"\r\n'
    latin = "images/1.jpg,caf\u00e9 cr\u00e8me\r\n".encode("latin-1")
    csv_set.write_bytes(b"".join([lines[0], huge, latin, *lines[1:]]))
    config = ImportConfig(
        str(csv_set), str(tmp_path / "out"), columns=schema.ColumnMap.parse("image=filepath,alt_text=title")
    )
    summary = run_import(config, log=quiet)
    assert summary.rows == 7
    assert dict(summary.quarantined) == {
        "missing_file": 1,
        "image_undecodable": 1,
        "field_too_large": 1,
        "invalid_utf8": 1,
    }


def test_import_holds_a_batch_of_images_not_the_shard(tmp_path, monkeypatch):
    """A tar or a CSV shard of 10,000 web images is ~1 GB: import reads, checks and writes it a batch
    at a time (its rows spill to a local file), so four times the images cost no more memory."""
    from conftest import MemoryPeak, noise_jpegs

    from veclip import parquet_files

    monkeypatch.setattr(
        parquet_files, "ROW_GROUP_TARGET_BYTES", 1_000_000
    )  # the writer's buffer (128 MiB in production)
    images, held, sizes = noise_jpegs(100, side=128), {}, {}
    for n in (500, 2_000):
        folder = tmp_path / f"set-{n}"
        (folder / "img").mkdir(parents=True)
        with tarfile.open(folder / "part-0.tar", "w") as tar, open(folder / "set.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "alt_text"])
            for i in range(n):
                data = images[i % 100]
                member = tarfile.TarInfo(f"{i:06d}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                (folder / "img" / f"{i}.jpg").write_bytes(data)
                writer.writerow([f"img/{i}.jpg", f"photo {i}"])
        sizes[n] = (folder / "part-0.tar").stat().st_size
        for source in (folder, folder / "set.csv"):
            out = tmp_path / f"out-{n}-{source.name}"
            config = ImportConfig(str(source), str(out), rows_per_shard=n)
            with MemoryPeak() as peak:
                assert run_import(config, log=quiet).rows == n
            held[n, source.suffix] = peak.grew
            assert pq.ParquetFile(next(out.glob("*.parquet"))).metadata.num_rows == n
    for kind in ("", ".csv"):  # 1,500 more images: ~30 MB
        assert held[2_000, kind] - held[500, kind] < (sizes[2_000] - sizes[500]) / 4, (held, sizes)


def _shard_keys(out) -> list[str]:
    return sorted(
        k for p in ShardStore(Location(str(out))).shards() for k in pq.read_table(p).column("key").to_pylist()
    )


def _load_with_datasets(out, tmp_path) -> list[str]:
    import datasets

    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    return sorted(loaded["key"])


@pytest.mark.parametrize("shards", [3, 1])
def test_hugging_face_pandas_and_pyarrow_read_an_output_as_it_is(tars, tmp_path, monkeypatch, shards):
    """`datasets.load_dataset(OUT)`, `pandas.read_parquet(OUT)` and pyarrow's dataset reader see the shards and
    nothing else: the quarantine, markers and records sit under .veclip/ (a one-shard output once read as JSON)."""
    import pandas as pd
    import pyarrow.dataset as pads

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for extra in sorted(tars.glob("*.tar"))[shards:]:
        extra.unlink()
    out = tmp_path / "out"
    run_import(ImportConfig(str(tars), str(out)), log=quiet)
    expected = _shard_keys(out)
    assert len(expected) >= 5 and (out / CURRENT.done).is_dir()
    assert _load_with_datasets(out, tmp_path) == expected
    assert sorted(pd.read_parquet(out)["key"]) == expected
    assert sorted(pads.dataset(out, format="parquet").to_table(columns=["key"])["key"].to_pylist()) == expected
    card = (out / "_README.md").read_text()
    assert "| `key` | `string` |" in card and "| `source_json` |" in card and "`veclip import`" in card
    assert f"| {shards} | {len(expected)} |" in card and f"`{CURRENT.quarantine}/`" in card


def test_an_output_in_the_legacy_layout_is_read_and_continued_as_it_is(tars, tmp_path):
    """An output begun before .veclip/ (records beside the shards under `_` names) is still read by every
    reader and continued in its own layout: nothing redone, nothing split between two layouts."""
    from veclip.shards.layout import LEGACY, RECORDS_DIR, layout_of

    out = tmp_path / "out"
    run_import(ImportConfig(str(tars), str(out)), log=quiet)
    expected = _shard_keys(out)
    for record in ("done", "quarantine"):
        (out / getattr(CURRENT, record)).rename(out / getattr(LEGACY, record))
    shutil.rmtree(out / RECORDS_DIR)
    assert layout_of(Location(str(out))) == LEGACY
    assert _shard_keys(out) == expected
    assert validate(ValidateConfig(str(out))).usable
    assert "shards: 3 done, 0 failed" in status(StatusConfig(str(out))).render()
    (out / LEGACY.done / "00001.parquet.json").unlink()
    again = run_import(ImportConfig(str(tars), str(out)), log=quiet)
    assert again.shards_written == 1 and again.shards_skipped == 2
    assert (out / LEGACY.done / "00001.parquet.json").exists() and not (out / RECORDS_DIR).exists()
    assert _shard_keys(out) == expected


def test_two_tars_that_would_make_one_shard_are_refused_before_anything_is_written(tars, tmp_path):
    """`x.tar` and `x.tar.gz` both become `x.parquet`: the second overwrote the first."""
    import shutil

    shutil.copy(tars / "00000.tar", tars / "00000.tar.gz")  # a tar under both names (tarfile reads either)
    with pytest.raises(ValueError, match="map to the same output name"):
        run_import(ImportConfig(str(tars), str(tmp_path / "out")), log=quiet)
    assert not list((tmp_path / "out").glob("*.parquet"))  # and the lease it took, given back
    assert not (tmp_path / "out" / CURRENT.lease).exists()


def test_an_import_rerun_under_another_cut_or_resize_is_refused_and_two_imports_never_share_an_output(
    csv_set, tmp_path
):
    """Another --rows-per-shard duplicated or lost rows against the shards marked under the old cut; another
    --resize was skipped silently; two imports into one output both wrote. Now: refused, naming what changed;
    one import at a time (the output's lease, as the sharded stages hold)."""
    from veclip.ingest import ImportChanged
    from veclip.shards.lease import LeaseHeld, OutputLease

    columns = schema.ColumnMap.parse("image=filepath,alt_text=title")
    out = Location(str(tmp_path / "out"))
    first = run_import(ImportConfig(str(csv_set), out.url, columns=columns, rows_per_shard=4), log=quiet)
    assert first.shards_written == 3
    for changed in ({"rows_per_shard": 3}, {"rows_per_shard": 4, "resize": 32}):
        with pytest.raises(ImportChanged, match="--rows-per-shard, --resize"):
            run_import(ImportConfig(str(csv_set), out.url, columns=columns, **changed), log=quiet)
    again = run_import(ImportConfig(str(csv_set), out.url, columns=columns, rows_per_shard=4), log=quiet)
    assert again.shards_written == 0 and again.shards_skipped == 3
    holder = OutputLease(out, "another-import")
    holder.acquire()
    try:
        with pytest.raises(LeaseHeld, match="is being written by run another-import"):
            run_import(ImportConfig(str(csv_set), out.url, columns=columns, rows_per_shard=4), log=quiet)
    finally:
        holder.release()
