"""Validation throughput vs a bare pyarrow + PIL loop over the same shards.

    .venv/bin/python benchmarks/bench_validate.py [--rows 4000] [--image-size 256]

Both read the same Parquet shards and fully decode every image; the ratio is
what `veclip validate --images full` costs on top of decoding (schema, key and
AltText checks, reporting). Prints a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from veclip.sample import SampleConfig, generate
from veclip.validate import ValidateConfig, validate


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(SampleConfig(tmp, rows=args.rows, eval_rows=1, shards=4, image_size=args.image_size), log=lambda *_: None)
        folder = Path(tmp) / "train"
        config = ValidateConfig(str(folder), images="full")
        assert validate(config).usable and bare_loop(folder) == args.rows
        bare = best_of(lambda: bare_loop(folder), args.repeats)
        ours = best_of(lambda: validate(config), args.repeats)
    print("| benchmark | rows | image px | bare PIL loop (img/s) | veclip validate --images full (img/s) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| validate, 1 process | {args.rows} | {args.image_size} | {args.rows / bare:,.0f} | {args.rows / ours:,.0f} | {bare / ours:.2f} |")


if __name__ == "__main__":
    main()
