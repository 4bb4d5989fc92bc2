"""Output layouts, same data, one script: the copying layout against caption tables.

    .venv/bin/python benchmarks/bench_layout.py [--rows 4000] [--image-size 256]

1. Rewrite (LaCLIP mode, in-process, one actor's loop): bytes written and wall
   seconds per 1,000 rows for ``layout=copy`` and ``layout=captions``. The engine
   is a stand-in that answers at once: generation costs the same in both layouts,
   so what is timed is what the layout changes (reading the shard, building and
   writing the output).
2. Training ingest (one process): rows/s of read + join + preprocess (decode,
   augment, tokenize) over every row, from the copied output against the caption
   tables joined to their inputs, alternating, ``--rounds`` times; and of the
   read (+ join) alone, whose difference is the join's own cost per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class InstantEngine:
    name = "instant"

    def generate(self, requests, sampling):
        from veclip.rewrite.engine import Completion

        return [Completion("a photo of a small red star on a striped wall", 10, 12) for _ in requests]


def rewrite(source: str, out: str, layout: str) -> tuple[float, int]:
    from veclip.rewrite.config import fingerprint, preset
    from veclip.rewrite.stage import plan_run
    from veclip.rewrite.workers import ShardRewriter
    from veclip.shards.driver import shard_rows
    from veclip.shards.guard import RunContext
    from veclip.shards.layout import CURRENT
    from veclip.shards.lease import OutputLease
    from veclip.storage import Location, StorageOptions

    config = dataclasses.replace(preset("default"), input=source, output=out, mode="laclip", layout=layout)
    options, run = StorageOptions(), RunContext("bench", fingerprint(config)[0])
    lease = OutputLease(Location(out, options), run.run_id)
    lease.acquire()
    try:
        plan = plan_run(config, options, run.fingerprint, False)
        worker = ShardRewriter(config, options, run, engine=InstantEngine())
        start = time.perf_counter()
        statuses = worker(shard_rows(plan))["status"]
        seconds = time.perf_counter() - start
    finally:
        lease.release()
    assert set(statuses) == {"done"}, statuses
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    written = sum(p.stat().st_size for p in files if not str(p.relative_to(out)).startswith(CURRENT.work))
    return seconds, written


def ingest(url: str, decode: bool = True) -> tuple[float, int]:
    """Seconds and rows of one pass: read + join (+ preprocess when ``decode``)."""
    from veclip.images import ImageLimits
    from veclip.schema import ColumnMap
    from veclip.storage import StorageOptions
    from veclip.train.augment import augment_and_tokenizer
    from veclip.train.captions import CaptionConfig
    from veclip.train.data import plan_data, preprocess, read_window
    from veclip.train.order import Position, worker_windows

    plan = plan_data(url, StorageOptions(), ColumnMap(), 1, log=lambda *_: None)
    windows = worker_windows(list(plan.units), 0, 0, 0, 1, 8)
    augment_and_tokenizer("veclip-tiny")
    start, rows = time.perf_counter(), 0
    for w in range(len(windows)):
        for chunk in read_window({"epoch": np.array([0]), "window": np.array([w])}, plan, Position(), 0, 1, 0, 8):
            rows += (
                len(preprocess(chunk, "veclip-tiny", CaptionConfig("laclip"), ImageLimits(), 0)["skip"])
                if decode
                else chunk.num_rows
            )
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    from veclip.world.generate import SampleConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(
            SampleConfig(tmp + "/sample", rows=args.rows, eval_rows=1, shards=8, image_size=args.image_size),
            log=lambda *_: None,
        )
        source = tmp + "/sample/train"
        input_bytes = sum(p.stat().st_size for p in Path(source).glob("*.parquet"))
        results = {layout: rewrite(source, f"{tmp}/{layout}", layout) for layout in ("copy", "captions")}
        ingest(f"{tmp}/copy")  # warm the page cache and the tokenizer
        rates, reads, paired = {"copy": [], "captions": []}, {"copy": [], "captions": []}, []
        for _ in range(args.rounds):  # interleaved; one pass varies by +-6% here, so ratios are paired per round
            for layout in ("copy", "captions"):
                seconds, rows = ingest(f"{tmp}/{layout}")
                rates[layout].append(rows / seconds)
                seconds, rows = ingest(f"{tmp}/{layout}", decode=False)
                reads[layout].append(rows / seconds)
            paired.append(rates["captions"][-1] / rates["copy"][-1])
        rates = {k: statistics.median(v) for k, v in rates.items()}
        reads = {k: statistics.median(v) for k, v in reads.items()}

    per_k = 1000 / args.rows
    print(f"Input: {args.rows} rows of {args.image_size}px JPEG in 8 shards, {input_bytes / 1e6:.1f} MB.\n")
    print(
        "| rewrite output layout (LaCLIP mode, instant stand-in engine) | bytes written per 1,000 rows | wall s per 1,000 rows |"
    )
    print("| --- | --- | --- |")
    for layout, (seconds, written) in results.items():
        print(f"| {layout} | {written * per_k / 1e6:,.2f} MB | {seconds * per_k:.3f} |")
    ratio = results["captions"][1] / results["copy"][1]
    print(
        f"\ncaption tables write {ratio:.1%} of the copying layout's bytes, in {results['captions'][0] / results['copy'][0]:.0%} of its time.\n"
    )
    print(
        f"| training ingest, 1 process, median of {args.rounds} | read (+ join) rows/s | + decode, augment, tokenize rows/s |"
    )
    print("| --- | --- | --- |")
    print(f"| copied shards | {reads['copy']:,.0f} | {rates['copy']:,.0f} |")
    print(f"| caption tables joined to their inputs by key | {reads['captions']:,.0f} | {rates['captions']:,.0f} |")
    join_us = (1 / reads["captions"] - 1 / reads["copy"]) * 1e6
    share = join_us / (1e6 / rates["copy"])
    paired = sorted(paired)
    print(
        f"\nthe join costs {join_us:.1f} us per row, {share:.2%} of a row's ingest ({1e6 / rates['copy']:.0f} us); "
        f"end to end, joined / copied per round: median {statistics.median(paired):.3f}, "
        f"middle half {paired[len(paired) // 4]:.3f}-{paired[(3 * len(paired)) // 4]:.3f}, range {paired[0]:.3f}-{paired[-1]:.3f}"
    )


if __name__ == "__main__":
    main()
