"""Clocks at the user's durations (issue 39): shards of minutes, engines that load for minutes, nodes replaced
in a quarter of an hour. The watch's decisions on a virtual clock (hours in microseconds), then the real driver,
Ray Data pools and a stand-in engine that sleeps per request (a GPU's wall time, no CPU), every clock scaled
down together: stall_seconds 3, a shard ~10 s, first_shard_seconds 20."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veclip.shards.layout import CURRENT
from veclip.shards.progress import STARTING, WORKING, PoolView, ProgressBoard
from veclip.shards.stall import StageStalled, StallWatch
from veclip.shards.store import ShardStore
from veclip.shards.worker import FaultConfig
from veclip.storage import Location

MINUTE = 60.0
PRODUCTION = FaultConfig()  # the defaults, at their real durations


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Pool:
    """Actors on a board sharing the clock: each reports as its heartbeat would."""

    def __init__(self, clock: Clock):
        self.clock, self.board, self.counts = clock, ProgressBoard(clock), {}

    def beat(self, actor: str, phase: str = WORKING, in_flight: int = 1, done: int = 0) -> None:
        self.counts[actor] = self.counts.get(actor, 0) + done
        self.board.report(actor, phase, in_flight, self.counts[actor])

    def watch(self, faults: FaultConfig = PRODUCTION) -> StallWatch:
        return StallWatch("rewrite", faults, lambda: self.board.view(faults.heard_within), self.clock)


def run_for(clock: Clock, watch: StallWatch, seconds: float, every: float, beat=lambda: None) -> None:
    """``seconds`` of virtual time: the actors beat and the driver looks every ``every`` seconds."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += every
        beat()
        watch.check()


def test_one_actor_whose_shards_take_20_minutes_is_never_stopped():
    """The old false stop: one captioner, 20-minute shards (an L40S), the deadline 900 s after the first
    shard. Requests finishing inside each shard are progress: a day of it runs through."""
    clock = Clock()
    pool = Pool(clock)
    watch = pool.watch()
    run_for(clock, watch, 8 * MINUTE, 30, lambda: pool.beat("a", STARTING, 0))  # a 7B engine loading
    run_for(clock, watch, 24 * 60 * MINUTE, 30, lambda: pool.beat("a", done=3))  # a request every 10 s
    assert watch.working and watch.deadline() == PRODUCTION.stall_seconds


def test_a_hung_engine_is_stopped_within_the_deadline():
    clock = Clock()
    pool = Pool(clock)
    watch = pool.watch()
    run_for(clock, watch, 30 * MINUTE, 30, lambda: pool.beat("a", done=3))
    hung_at = clock.now
    with pytest.raises(StageStalled, match="working but made no progress"):
        run_for(clock, watch, 60 * MINUTE, 30, lambda: pool.beat("a"))  # alive, a shard in flight, nothing done
    assert PRODUCTION.stall_seconds < clock.now - hung_at <= PRODUCTION.stall_seconds + 2 * 30


def test_a_spot_node_replaced_in_15_minutes_with_an_engine_loading_10_more_is_waited_for():
    clock = Clock()
    pool = Pool(clock)
    watch = pool.watch()
    run_for(clock, watch, 60 * MINUTE, 30, lambda: pool.beat("a", done=3))
    run_for(clock, watch, 15 * MINUTE, 30)  # the node is gone: nothing heard
    assert not watch.working and watch.deadline() == PRODUCTION.first_shard_seconds
    run_for(clock, watch, 10 * MINUTE, 30, lambda: pool.beat("b", STARTING, 0))  # its replacement loads
    run_for(clock, watch, 60 * MINUTE, 30, lambda: pool.beat("b", done=3))


def test_a_pool_that_is_never_placed_is_stopped_after_the_start_up_allowance():
    clock = Clock()
    watch = Pool(clock).watch()
    with pytest.raises(StageStalled, match="no actor of the pool is working"):
        run_for(clock, watch, 2 * PRODUCTION.first_shard_seconds, 30)
    assert clock.now == pytest.approx(PRODUCTION.first_shard_seconds + 30)


def test_an_engine_that_never_finishes_loading_is_stopped_after_the_start_up_allowance():
    clock = Clock()
    pool = Pool(clock)
    watch = pool.watch()
    with pytest.raises(StageStalled, match="no actor of the pool is working"):
        run_for(clock, watch, 2 * PRODUCTION.first_shard_seconds, 30, lambda: pool.beat("a", STARTING, 0))


def test_waves_of_actors_and_a_slow_board_are_no_stall():
    """Eight actors finishing shards in waves 25 minutes apart, their requests counted inside; the board
    unanswered for minutes at a time (the deadline in force holds)."""
    clock = Clock()
    pool = Pool(clock)
    answers = iter([True, True, False, False, False, False] * 10_000)
    faults = PRODUCTION
    watch = StallWatch(
        "rewrite", faults, lambda: pool.board.view(faults.heard_within) if next(answers) else None, clock
    )
    run_for(clock, watch, 10 * 60 * MINUTE, 30, lambda: [pool.beat(f"a{k}", done=1) for k in range(8)])


def test_the_deadline_grows_with_the_longest_pause_between_signs_of_progress():
    """An engine whose steps take 3 minutes (a long batch on a slow card): stall_factor x 3 min."""
    clock = Clock()
    pool = Pool(clock)
    watch = pool.watch()
    step = 3 * MINUTE

    def every_third_minute():
        pool.beat("a", done=int(clock.now % step == 0))

    run_for(clock, watch, 10 * 60 * MINUTE, 30, every_third_minute)
    assert watch.deadline() == pytest.approx(PRODUCTION.stall_factor * step)


def test_the_board_forgets_actors_not_heard_and_counts_only_working_ones():
    clock = Clock()
    board = ProgressBoard(clock)
    board.report("a", STARTING, 0, 0)
    board.report("b", WORKING, 2, 5)
    clock.now = 10
    board.report("b", WORKING, 2, 5)  # heard, nothing done: no progress
    assert board.view(expiry=90) == PoolView(since_progress=10, working=1, heard=2)
    clock.now = 95
    assert board.view(expiry=90) == PoolView(since_progress=95, working=1, heard=1)
    clock.now = 200
    assert board.view(expiry=90) == PoolView(since_progress=200, working=0, heard=0)


# --- the real driver, Ray Data's pools and a stand-in engine, every clock scaled down together ---------------

STALL, FIRST = 3, 30  # stall_seconds, first_shard_seconds: 900 s and 3600 s scaled down ~100-300x
SCALED = ["--set", f"faults.stall_seconds={STALL}", "--set", f"faults.first_shard_seconds={FIRST}"]


def _rewrite(source: str, output: str, engine: str, *extra: str) -> list[str]:
    """A LaCLIP rewrite on the stand-in engine, one actor working on one shard at a time."""
    cmd = [str(Path(sys.executable).with_name("veclip")), "rewrite", "--input", source, "--output", output]
    cmd += ["--preset", "tiny", "--mode", "laclip", "--set", f"laclip.engine.model=stand-in:{engine}"]
    cmd += ["--set", "laclip.pool.python=", "--set", "laclip.pool.shards_in_flight=1", *SCALED, *extra]
    return cmd


@pytest.mark.slow
def test_one_actor_whose_every_shard_takes_3x_stall_seconds_finishes(sample_root, s3_bucket):
    """The old false stop (one actor, shards longer than stall_seconds: stopped after its first shard), on the
    local S3 server: each 20-row shard is ~73 requests of 0.15 s, ~11 s, against a stall deadline of 3 s."""
    from test_rewrite_faults import put_tree

    url, options = s3_bucket
    put_tree(sample_root / "train", url + "/in", options)
    cmd = _rewrite(url + "/in", url + "/out", "latency=0.15", "--s3-endpoint", options.endpoint_url)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(Location(url + "/out", options).fs.cat_file(f"{url}/out/{CURRENT.summary}"))
    assert summary["shards"]["done"] == 3 and summary["rows_in"] == 60, summary
    seconds = [m.seconds for m in ShardStore(Location(url + "/out", options)).markers().values()]
    assert min(seconds) > 3 * STALL, seconds  # the shards really outlasted the deadline


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ignored", "blocked"])
def test_a_hung_engine_stops_the_run_within_its_deadline_whatever_the_driver_does_with_sigint(
    sample_root, tmp_path, launch
):
    """An engine that stops answering mid-shard: the run stops within its deadline, exit 2, its lease given
    back and why recorded, with SIGINT ignored (launched with `&` from a script under `trap '' INT`) or blocked
    (the signal mask of a Ray job entrypoint under bash)."""
    out = tmp_path / "out"
    cmd = _rewrite(str(sample_root / "train"), str(out), "latency=0.05,hang_after=100")
    if launch == "ignored":
        script = f"trap '' INT\n{shlex.join(cmd)} &\nwait $!\n"
        argv = ["bash", "-c", script]
    else:
        blocked = "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}); "
        argv = [sys.executable, "-c", blocked + "os.execv(sys.argv[1], sys.argv[1:])", *cmd]
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "working but made no progress" in result.stderr and "rerun to continue" in result.stderr, result.stderr
    assert time.monotonic() - began < FIRST + 60  # Ray's start, a shard, the deadline: not forever
    plan = json.loads((out / CURRENT.plan).read_text())
    assert "an engine hung" in plan["stopped"]["why"]
    assert not (out / CURRENT.lease).exists()  # given back: a rerun may start at once
    status = subprocess.run(
        [str(Path(sys.executable).with_name("veclip")), "status", str(out)], capture_output=True, text=True
    )
    assert "stopped at" in status.stdout, status.stdout
