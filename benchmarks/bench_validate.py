"""Validation throughput vs a bare pyarrow + PIL loop over the same shards.

    .venv/bin/python benchmarks/bench_validate.py [--rows 4000] [--image-size 256]
    .venv/bin/python benchmarks/bench_validate.py --scale [--shards 100] [--rows-per-shard 1000]

Default: both read the same Parquet shards and fully decode every image; the
ratio is what `veclip validate --images full` costs on top of decoding
(schema, key and AltText checks, reporting).

``--scale``: many shards of many rows in 8 row groups each (a noise JPEG
plus 4 KB of random bytes per row, ~10 KB): rows/s of `validate --images sample` against reading
only the footers (the floor of any check), and against the sample drawn from
every row group (what it read before: the whole image column). Prints
Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from veclip.validate import ValidateConfig, validate
from veclip.world.generate import SampleConfig, generate


def bare_loop(folder: Path) -> int:
    n = 0
    for path in sorted(folder.glob("*.parquet")):
        for data in pq.read_table(path, columns=["image"]).column("image").to_pylist():
            Image.open(io.BytesIO(data)).convert("RGB")
            n += 1
    return n


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def noise_jpeg(side: int = 96) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def scale(shards: int, rows_per_shard: int, repeats: int) -> None:
    import numpy as np
    import pyarrow as pa

    from veclip.storage import Location, fresh_listing, read_footers

    image, rng = noise_jpeg(), np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(shards):
            keys = [f"s{s:05d}-{r:06d}" for r in range(rows_per_shard)]
            # each row's bytes differ (random bytes after the JPEG's end, which decoders ignore), so
            # Parquet cannot compress the column away: ~10 KB of image per row on disk, as stored
            tails = rng.integers(0, 256, (rows_per_shard, 4096), dtype=np.uint8)
            images = pa.array([image + tails[r].tobytes() for r in range(rows_per_shard)], pa.binary())
            table = pa.table({"key": keys, "image": images, "alt_text": keys})
            pq.write_table(table, f"{tmp}/part-{s:05d}.parquet", row_group_size=rows_per_shard // 8)
        location = Location(tmp)
        rows = shards * rows_per_shard

        def footers():
            entries = fresh_listing(location.fs, location.path)
            return read_footers(location.fs, [(e["name"], e["size"]) for e in entries])

        sample = ValidateConfig(tmp, images="sample")
        every_group = ValidateConfig(tmp, images="sample", sample_row_groups=8)
        assert validate(sample).usable and validate(every_group).usable
        floor = best_of(footers, repeats)
        ours = best_of(lambda: validate(sample), repeats)
        before = best_of(lambda: validate(every_group), repeats)
        size_mb = sum(e["size"] for e in fresh_listing(location.fs, location.path)) / 1e6
    print("| data | rows/s | ratio to footers only |")
    print("| --- | --- | --- |")
    print(
        f"| footers only (the floor), {shards} shards x {rows_per_shard} rows, {size_mb:,.0f} MB | {rows / floor:,.0f} | 1.00 |"
    )
    print(f"| validate --images sample (32 rows from 1 of 8 row groups) | {rows / ours:,.0f} | {floor / ours:.2f} |")
    print(
        f"| validate --images sample, drawn from all 8 row groups (the old read) | {rows / before:,.0f} | {floor / before:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.scale:
        scale(args.shards, args.rows_per_shard, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(
            SampleConfig(tmp, rows=args.rows, eval_rows=1, shards=4, image_size=args.image_size), log=lambda *_: None
        )
        folder = Path(tmp) / "train"
        config = ValidateConfig(str(folder), images="full")
        assert validate(config).usable and bare_loop(folder) == args.rows
        bare = best_of(lambda: bare_loop(folder), args.repeats)
        ours = best_of(lambda: validate(config), args.repeats)
    print("| benchmark | rows | image px | bare PIL loop (img/s) | veclip validate --images full (img/s) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| validate, 1 process | {args.rows} | {args.image_size} | {args.rows / bare:,.0f} | {args.rows / ours:,.0f} | {bare / ours:.2f} |"
    )


if __name__ == "__main__":
    main()
