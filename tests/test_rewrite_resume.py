"""The rewrite on the local S3 server under real faults, with real vLLM (tiny models):
the driver killed with kill -9 and rerun, an actor and a vLLM engine killed
mid-shard, and S3 answering some requests with errors through a proxy. Every
input key must end up exactly once in the output or in quarantine."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_job_when, pids_matching, wait_for
from s3_faults import Fault, FaultProxy

from veclip.rewrite.config import build_config
from veclip.rewrite.stage import run_rewrite
from veclip.shards.layout import CURRENT
from veclip.shards.store import ShardStore
from veclip.storage import Location

pytestmark = pytest.mark.slow


def six_shards(sample_root: Path, url: str, options) -> list[str]:
    """The sample rows as 6 shards of 10 on S3; returns every key."""
    rows = [r for p in sorted((sample_root / "train").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    fs = Location(url, options).fs
    for k in range(6):
        with fs.open(f"{url[len('s3://') :]}/part-{k:05d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows[k * 10 : (k + 1) * 10]), f)
    return [r["key"] for r in rows]


def output_keys(url: str, options) -> list[str]:
    out = Location(url, options)
    store = ShardStore(out)
    keys = [
        k
        for p in store.shards()
        for k in pq.read_table(p, columns=["key"], filesystem=out.fs).column("key").to_pylist()
    ]
    return keys + [
        k
        for p in store.quarantine_shards()
        for k in pq.read_table(p, columns=["key"], filesystem=out.fs).column("key").to_pylist()
    ]


def test_driver_killed_on_s3_and_resumed(sample_root, s3_endpoint, s3_bucket, vllm_python):
    """kill -9 of the whole driver after its first shard lands; the rerun finishes and reconciles.
    (The rerun's summary used to read a stale s3fs listing and call this run's shards "not written".)"""
    url, options = s3_bucket
    keys = six_shards(sample_root, url + "/in", options)
    fs = Location(url, options).fs
    cmd = [
        str(Path(sys.executable).with_name("veclip")),
        "rewrite",
        "--preset",
        "tiny",
        "--mode",
        "laclip",
        "--input",
        url + "/in",
        "--output",
        url + "/out",
        "--s3-endpoint",
        s3_endpoint,
    ]
    env = {**os.environ, "VECLIP_VLLM_PYTHON": vllm_python}

    def first_marker():
        fs.invalidate_cache()
        return fs.exists(f"{url[5:]}/out/{CURRENT.done}") and fs.ls(f"{url[5:]}/out/{CURRENT.done}")

    kill_job_when(cmd, first_marker, "a first shard", env=env)
    fs.invalidate_cache()
    finished = len(fs.ls(f"{url[5:]}/out/{CURRENT.done}"))
    assert 1 <= finished < 6

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "60 rows in -> 60 out + 0 quarantined" in rerun.stdout
    assert finished <= int(re.search(r"(\d+) already done", rerun.stdout).group(1)) < 6
    assert sorted(output_keys(url + "/out", options)) == sorted(keys)
    assert Location(url + "/out", options).fs.exists(f"{url[5:]}/out/{CURRENT.summary}")


def test_actor_and_engine_killed_mid_shard_behind_a_faulty_s3(
    sample_root, s3_endpoint, s3_bucket, vllm_python, ray_session
):
    """An actor killed with kill -9 mid-shard, then a vLLM engine process killed mid-shard, while S3
    throttles a share of requests: Ray replaces the actor, the shards are retried, nothing is lost."""
    url, options = s3_bucket
    keys = six_shards(sample_root, url + "/in", options)
    proxy = FaultProxy(s3_endpoint).start()
    proxy.faults = [Fault(r"/", 503, probability=0.05), Fault(r"/", "reset", probability=0.02)]
    faulty = type(options)(**{**options.__dict__, "endpoint_url": proxy.url})
    # one row per engine call, so a shard spans many calls and a kill lands mid-shard
    config = build_config(
        "tiny", input=url + "/in", output=url + "/out", mode="laclip", overrides=["laclip.pool.batch_size=4"]
    )
    attempts = f"{url[5:]}/out/{CURRENT.attempts}/rewrite"
    fs = Location(url, options).fs
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(summary=run_rewrite(config, faulty, log=lambda *_: None)), daemon=True
    )
    runner.start()

    def in_progress():  # a shard whose try has begun, and the actor working on it
        fs.invalidate_cache()
        actors = pids_matching(r"ray::MapWorker\(MapBatches\(ShardRewriter\)\)")
        return fs.exists(attempts) and fs.ls(attempts) and actors

    def done_count() -> int:
        fs.invalidate_cache()
        return len(fs.ls(f"{url[5:]}/out/{CURRENT.done}")) if fs.exists(f"{url[5:]}/out/{CURRENT.done}") else 0

    actor = wait_for(in_progress, 300, "the rewriter's first shard")[0]
    done_before = done_count()
    os.kill(actor, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{actor}"), 30, "the actor to die")
    # the replacement has started its engine once it finishes a shard; then kill that engine mid-shard
    wait_for(lambda: done_count() > done_before, 300, "the replacement actor's first shard")

    def engine_mid_shard():
        engines = [
            e
            for a in pids_matching(r"ray::MapWorker\(MapBatches\(ShardRewriter\)\)")
            for e in pids_matching("VLLM::EngineCore", parent=a)
        ]
        return in_progress() and engines

    engine = wait_for(engine_mid_shard, 300, "a replacement actor's engine at work")[0]
    os.kill(engine, signal.SIGKILL)
    runner.join(600)
    proxy.stop()
    assert "summary" in result, "the run did not finish"
    summary = result["summary"]
    assert summary["failed"] == {} and summary["shards"]["done"] == 6
    assert summary["rows_out"] + summary["rows_quarantined"] == 60 == summary["rows_in"]
    assert sorted(output_keys(url + "/out", options)) == sorted(keys)
    assert len(proxy.injected) > 0
    again = run_rewrite(config, options, log=lambda *_: None)  # the rerun finds nothing left to do
    assert again["shards"]["written_this_run"] == 0 and again["shards"]["done"] == 6 and again["failed"] == {}
