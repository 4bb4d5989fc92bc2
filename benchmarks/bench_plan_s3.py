"""Driver-side cost of a rewrite at many shards on the local S3 server (moto, 127.0.0.1).

    .venv/bin/python benchmarks/bench_plan_s3.py [--shards 30000] [--serial-sample 1500]

Makes ``--shards`` tiny input shards (one row each) and, for the reruns, the
done markers a finished run's workers would have written (the benchmark writes
them; no engine runs). Times, each against one bare fresh ``ls`` of the input
prefix (the floor: any plan must list the inputs):

* planning a first run: list + every footer (concurrent tail reads);
* a no-op rerun (``run_rewrite`` end to end: lease, plan, summary) before a
  marker manifest exists (every marker fetched concurrently, manifest written);
* a no-op rerun with the manifest (the steady state of a resumed job);
* the old driver path (each footer opened and each marker read in series) on
  ``--serial-sample`` shards, scaled linearly to ``--shards`` (labelled so).

Prints Markdown rows for BENCHMARKS.md. Loopback S3 has ~0.1-1 ms latency; a
real bucket has ~10-50 ms, so serial paths cost far more there and the
concurrent ones about the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from veclip.rewrite.config import fingerprint, preset
from veclip.rewrite.stage import list_inputs, plan_run, run_rewrite
from veclip.shards.layout import CURRENT
from veclip.storage import Location, StorageOptions, fresh_listing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def shard_bytes(k: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"key": [f"k{k:08d}"], "image": [b"\xff\xd8 not decoded here"], "alt_text": [f"row {k}"]}), buffer
    )
    return buffer.getvalue()


def make_shards(fs, bucket: str, n: int) -> None:
    for start in range(0, n, 2000):  # s3fs uploads each batch concurrently
        fs.pipe({f"{bucket}/in/part-{k:06d}.parquet": shard_bytes(k) for k in range(start, min(n, start + 2000))})


def make_markers(fs, bucket: str, config, options) -> None:
    """What a finished run's workers leave: one done marker per shard, with this config's fingerprint."""
    digest = fingerprint(config)[0]
    inputs = list_inputs(Location(config.input, options))
    markers = {
        f"{bucket}/out/{CURRENT.done}/{name}.json": json.dumps(
            {
                "shard": name,
                "rows": 1,
                "quarantined": 0,
                "rows_in": 1,
                "fingerprint": digest,
                "run_id": "bench",
                "input": shard.path,
                "input_size": shard.size,
                "written_at": "2026-11-23T00:00:00Z",
            }
        ).encode()
        for name, shard in inputs.items()
    }
    items = list(markers.items())
    for start in range(0, len(items), 2000):
        fs.pipe(dict(items[start : start + 2000]))


def old_driver(fs, bucket: str, paths: list[str], marker_paths: list[str]) -> None:
    """Before: every input footer opened, then every marker read, one after another."""
    for path in paths:
        with fs.open(path, "rb") as f:
            _ = pq.ParquetFile(f).metadata.num_rows
    for path in marker_paths:
        json.loads(fs.cat_file(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=30_000)
    parser.add_argument("--serial-sample", type=int, default=1_500)
    args = parser.parse_args()

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    port = free_port()
    # moto in its own process, as a bucket is: in this one it would share the driver's GIL
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    options = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", key="testing", secret="testing")
    bucket = "bench-plan"
    fs = Location(f"s3://{bucket}", options).fs
    fs.mkdir(bucket)
    made, _ = timed(lambda: make_shards(fs, bucket, args.shards))
    print(f"made {args.shards} input shards in {made:.0f} s")
    config = dataclasses.replace(
        preset("default"), input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", mode="laclip"
    )

    bare, listed = timed(lambda: fresh_listing(fs, f"{bucket}/in"))
    assert len(listed) == args.shards
    first_plan, plan = timed(lambda: plan_run(config, options, fingerprint(config)[0]))
    assert len(plan.todo) == args.shards

    made, _ = timed(lambda: make_markers(fs, bucket, config, options))
    print(f"wrote {args.shards} done markers in {made:.0f} s")
    quiet = lambda *_: None  # noqa: E731
    cold, summary = timed(lambda: run_rewrite(config, options, log=quiet))
    assert summary["shards"]["done"] == args.shards and summary["shards"]["written_this_run"] == 0
    warm, summary = timed(lambda: run_rewrite(config, options, log=quiet))
    assert summary["shards"]["done"] == args.shards

    sample = sorted(p["name"] for p in listed)[: args.serial_sample]
    markers = [f"{bucket}/out/{CURRENT.done}/{p.rsplit('/', 1)[1]}.json" for p in sample]
    serial, _ = timed(lambda: old_driver(fs, bucket, sample, markers))
    serial_scaled = serial * args.shards / len(sample)
    server.terminate()

    per10k = 10_000 / args.shards
    print(f"\n| step ({args.shards:,} shards, local moto S3) | seconds | s per 10k shards | ratio to one bare ls |")
    print("| --- | --- | --- | --- |")
    print(f"| bare fresh `ls` of the input prefix | {bare:.1f} | {bare * per10k:.1f} | 1.0 |")
    print(
        f"| plan a first run (list + all footers, concurrent) | {first_plan:.1f} | {first_plan * per10k:.1f} | {first_plan / bare:.1f} |"
    )
    print(
        f"| no-op rerun, no manifest yet (lease, plan, all markers concurrent, summary) | {cold:.1f} | {cold * per10k:.1f} | {cold / bare:.1f} |"
    )
    print(f"| no-op rerun with the marker manifest | {warm:.1f} | {warm * per10k:.1f} | {warm / bare:.1f} |")
    print(
        f"| old driver: footers + markers in series (measured on {len(sample):,}, scaled) | {serial_scaled:.1f} | {serial_scaled * per10k:.1f} | {serial_scaled / bare:.1f} |"
    )


if __name__ == "__main__":
    main()
