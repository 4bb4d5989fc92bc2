"""The output lease is a compare-and-swap on both storages: of runs that start at once exactly one wins.

On S3 the lease relies on conditional requests (If-None-Match / If-Match); the
first test shows the local S3 server of the tests (moto) honours them, so the
race tests below prove the lock, not luck.
"""

import json
import multiprocessing
import subprocess
import sys
import time

import pytest

from veclip.shards.layout import CURRENT, RECORDS_DIR
from veclip.shards.lease import LeaseHeld, LeaseLost, OutputLease
from veclip.storage import Location


@pytest.fixture
def out(out_location) -> Location:
    return out_location


def test_the_test_s3_server_honours_conditional_writes(s3_bucket):
    url, options = s3_bucket
    fs = Location(url, options).fs
    bucket = url[len("s3://") :]
    first = fs.call_s3("put_object", Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(OSError, match="pre-condition"):
        fs.call_s3("put_object", Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    with pytest.raises(OSError, match="pre-condition"):
        fs.call_s3("put_object", Bucket=bucket, Key="k", Body=b"3", IfMatch='"not-its-etag"')
    fs.call_s3("put_object", Bucket=bucket, Key="k", Body=b"4", IfMatch=first["ETag"])
    assert fs.cat_file(f"{bucket}/k") == b"4"


def test_one_writer_and_take_over(out):
    first = OutputLease(out, "run-1", ttl_seconds=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match="being written by run run-1"):
        OutputLease(out, "run-2", ttl_seconds=60).acquire()
    first.check()
    second = OutputLease(out, "run-2", ttl_seconds=60)
    second.acquire(take_over=True)
    with pytest.raises(LeaseLost):
        first.check()  # its workers stop at their next commit
    first._renew_once()  # its renewal thread finds the lease changed and gives up, never writing over run-2's
    assert second.holder()["run_id"] == "run-2"
    first.release()  # not its lease any more: left alone
    assert second.holder()["run_id"] == "run-2"
    second.release()
    assert second.holder() is None


def test_an_expired_lease_is_taken_and_renewal_keeps_it(out):
    stale = OutputLease(out, "gone", ttl_seconds=0.01)
    stale.acquire()
    stale._stop.set()  # its driver stopped renewing
    time.sleep(0.05)
    fresh = OutputLease(out, "fresh", ttl_seconds=60)
    fresh.acquire()
    before = fresh.holder()["expires_at"]
    fresh._renew_once()
    assert fresh.holder()["run_id"] == "fresh" and fresh.holder()["expires_at"] > before
    fresh.release()


def _contend(url: str, endpoint: str | None, run_id: str, start_at: float, results) -> None:
    from veclip.storage import StorageOptions

    options = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing") if endpoint else StorageOptions()
    lease = OutputLease(Location(url, options), run_id, ttl_seconds=60)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
        results.put(run_id)
        lease._stop.set()
    except LeaseHeld:
        results.put(None)


def test_runs_that_start_together_get_one_winner(out):
    """Six processes take the lease at the same instant, three times over: exactly one wins each time."""
    endpoint = out.options.endpoint_url
    ctx = multiprocessing.get_context("spawn")
    for attempt in range(3):
        results = ctx.Queue()
        start_at = time.time() + 3.0  # after every process has imported
        procs = [
            ctx.Process(target=_contend, args=(out.url, endpoint, f"r{attempt}-{i}", start_at, results))
            for i in range(6)
        ]
        for p in procs:
            p.start()
        winners = [w for w in (results.get(timeout=60) for _ in procs) if w]
        for p in procs:
            p.join(timeout=30)
        assert len(winners) == 1, winners
        assert OutputLease(out, "x").holder()["run_id"] == winners[0]
        out.fs.rm_file(out.join(CURRENT.lease))


def test_a_lease_left_by_a_killed_driver_on_this_host_is_free_at_once(out):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import os

    out.fs.makedirs(out.join(RECORDS_DIR), exist_ok=True)
    out.fs.pipe_file(
        out.join(CURRENT.lease),
        json.dumps(
            {"run_id": "gone", "host": os.uname().nodename, "pid": int(dead.stdout), "expires_at": time.time() + 600}
        ).encode(),
    )
    lease = OutputLease(out, "next")
    lease.acquire()
    assert lease.holder()["run_id"] == "next"
    lease.release()
