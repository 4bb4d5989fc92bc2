"""The output lease is a compare-and-swap on both storages: of runs that start at once exactly one wins.

On S3 the lease relies on conditional requests (If-None-Match / If-Match); the
first test shows the local S3 server of the tests (moto) honours them, so the
race tests below prove the lock, not luck.
"""

import dataclasses
import json
import multiprocessing
import subprocess
import sys
import time

import pytest
from s3_faults import Fault, FaultProxy

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
        time.sleep(3)  # the winner runs on: a lease held by a process gone from this host is free to take
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


def test_a_renewal_whose_answer_is_lost_keeps_the_lease(s3_endpoint, s3_bucket):
    """S3 applies the renewal PUT, its answer is lost, the client retries it and gets 412 (the ETag changed by
    its own write): the lease reads back its own token and goes on renewing, never concluding it lost."""
    url, options = s3_bucket
    proxy = FaultProxy(s3_endpoint).start()
    try:
        out = Location(url + "/out", dataclasses.replace(options, endpoint_url=proxy.url))
        lease = OutputLease(out, "run-1", ttl_seconds=60)
        lease.acquire()
        lease._stop.set()  # renewals by hand below
        proxy.faults = [Fault(r"lease\.json", "answer-lost", methods=("PUT",), times=1)]
        assert lease._renew_once()
        assert proxy.injected, "the fault was never hit"
        assert lease._renew_once()  # and the version it adopted is the current one
        lease.check()
        assert lease.holder()["run_id"] == "run-1"
    finally:
        proxy.stop()


def test_renewal_errors_of_any_kind_are_retried_and_a_lapsing_lease_stops_commits(out, monkeypatch):
    """A credentials refresh failing is no OSError: the renewal thread retries it, it does not die. While the
    renewals fail the lease runs down: commits are refused before it lapses and another run may take it."""
    lease = OutputLease(out, "run-1", ttl_seconds=2.0)
    lease.acquire()
    worker_view = OutputLease(out, "run-1", generation=lease.generation)
    worker_view.check()
    calls = []

    def failing(*args):
        calls.append(time.monotonic())
        raise RuntimeError("credentials refresh failed")

    monkeypatch.setattr(type(lease._cas), "replace", failing)
    time.sleep(1.8)
    assert len(calls) >= 2 and not lease._stop.is_set()  # retried, still renewing
    with pytest.raises(LeaseLost, match="about to lapse"):
        worker_view.check()
    monkeypatch.undo()
    time.sleep(1.0)  # the next retry succeeds: commits go on
    worker_view.check()
    lease.release()


def test_a_commit_checks_the_generation_its_run_took(out):
    """Fencing: a writer holding an older take of the lease is refused, also under the same run id."""
    first = OutputLease(out, "run-1", ttl_seconds=60)
    first.acquire()
    first._stop.set()
    again = OutputLease(out, "run-1", ttl_seconds=60)
    again.acquire()  # its own run id: free to it, a new generation
    assert again.generation == first.generation + 1
    with pytest.raises(LeaseLost):
        OutputLease(out, "run-1", generation=first.generation).check()
    OutputLease(out, "run-1", generation=again.generation).check()
    again.release()


def test_a_store_that_ignores_conditional_writes_is_refused_at_start(s3_bucket, monkeypatch):
    from veclip.shards import lease as lease_module

    url, options = s3_bucket
    out = Location(url + "/out", options)
    real = lease_module._S3Cas._call

    def ignoring(self, method, **kwargs):  # a store that drops If-None-Match
        kwargs.pop("IfNoneMatch", None)
        return real(self, method, **kwargs)

    monkeypatch.setattr(lease_module._S3Cas, "_call", ignoring)
    with pytest.raises(lease_module.ConditionalWritesIgnored, match=lease_module.UNCHECKED_STORE_ENV):
        OutputLease(out, "run-1").acquire()
    monkeypatch.setenv(lease_module.UNCHECKED_STORE_ENV, "1")
    lease = OutputLease(out, "run-1")
    lease.acquire()
    lease.release()
    assert not [p for p in out.fs.find(url[len("s3://") :]) if "probe" in p]  # no probe left behind
