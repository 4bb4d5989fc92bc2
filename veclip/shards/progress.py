"""Progress inside shards, from the actors to the driver's stall watch.

A production shard takes minutes (4-11 on an H100, 20-70 on an L40S) and an engine minutes to load, so
"a shard finished" is far too coarse a sign of life. Every shard worker runs a :class:`Heartbeat`: a
thread that tells the run's :class:`ProgressBoard` (one Ray actor on the driver's node, named after the
run) every ``FaultConfig.heartbeat_seconds`` what it is doing (starting, or working on N shards) and a
running count of work done (requests its engine finished, shards finished). The board keeps, on its own
clock, when each actor was last heard and when any count last moved; the driver reads a
:class:`PoolView` of it each time it looks (:class:`veclip.shards.stall.StallWatch`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

STARTING, WORKING = "starting", "working"  # an actor's phase: its constructor (engine loading), then shards


def board_name(run_id: str) -> str:
    return f"veclip-progress-{run_id}"


@dataclass(frozen=True)
class PoolView:
    """What the board knows, in seconds on its own clock (so no two hosts' clocks are compared)."""

    since_progress: float | None  # since any actor's count moved or an actor appeared or changed phase
    working: int  # actors heard lately with a shard in flight (past their start-up)
    heard: int  # actors heard lately, whatever they do


@dataclass
class _Actor:
    heard: float
    moved: float
    phase: str
    in_flight: int
    count: int


class ProgressBoard:
    """The run's progress board (a Ray actor with no CPU, placed on the driver's node)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock, self.actors, self.moved = clock, {}, None

    def report(self, actor: str, phase: str, in_flight: int, count: int) -> None:
        now, old = self.clock(), self.actors.get(actor)
        moved = old is None or (phase, count) != (old.phase, old.count)
        self.actors[actor] = _Actor(now, now if moved else old.moved, phase, in_flight, count)
        if moved:
            self.moved = now

    def view(self, expiry: float) -> PoolView:
        """``expiry``: an actor not heard for this long is gone (lost with its node, or killed)."""
        now = self.clock()
        heard = [a for a in self.actors.values() if now - a.heard <= expiry]
        return PoolView(
            since_progress=None if self.moved is None else now - self.moved,
            working=sum(a.phase == WORKING and a.in_flight > 0 for a in heard),
            heard=len(heard),
        )


def start_board(run_id: str):
    """The run's board, on this (the driver's) node: it lives and dies with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(ProgressBoard).options(name=board_name(run_id), num_cpus=0, scheduling_strategy=here)
    return actor.remote()


def board_viewer(board, expiry: float, timeout: float) -> Callable[[], PoolView | None]:
    """The driver's look at the board: None when it does not answer in time (the deadline in force holds)."""
    import ray

    def look() -> PoolView | None:
        try:
            return ray.get(board.view.remote(expiry), timeout=timeout)
        except Exception:  # noqa: BLE001 - a slow or restarting board is no evidence either way
            return None

    return look


class Heartbeat:
    """In each shard worker: its phase, its shards in flight and its running count of work, told to the run's
    board every ``every`` seconds from a thread of its own (it beats while the engine loads, too)."""

    def __init__(self, run_id: str, every: float, count: Callable[[], int]):
        self.run_id, self.every, self.count = run_id, every, count
        self.phase, self.in_flight = STARTING, 0
        self._lock = threading.Lock()
        threading.Thread(target=self._beat, name="veclip-heartbeat", daemon=True).start()

    @contextmanager
    def shard(self):
        """Around one shard's work: the actor is working while any shard is in flight."""
        with self._lock:
            self.phase, self.in_flight = WORKING, self.in_flight + 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _beat(self) -> None:
        import ray

        board, actor = None, ray.get_runtime_context().get_actor_id() or "driver"
        while True:
            try:
                board = board or ray.get_actor(board_name(self.run_id))
                board.report.remote(actor, self.phase, self.in_flight, self.count())
            except Exception:  # noqa: BLE001 - no board (yet, or any more): the driver's deadlines hold
                board = None
            time.sleep(self.every)
