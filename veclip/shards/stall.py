"""The stall watch: a run that makes no progress stops, loudly, and one that makes slow progress does not.

The driver of a sharded run (:func:`veclip.shards.driver.run_stage`) streams its pools' rows through
:meth:`StallWatch.rows`; each clock it keeps is a :class:`~veclip.shards.worker.FaultConfig` field, sized
against the real durations (docs/resuming.md).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from veclip.clock import clock
from veclip.shards.progress import PoolView
from veclip.shards.worker import FaultConfig


class StageStalled(RuntimeError):
    """The pool made no progress within the stall deadline: its actors are dead, cannot be placed, or hung."""


class StallWatch:
    """No silent hang, no false stop: the driver's own loop (:meth:`rows`) looks at the pool every
    ``faults.look_seconds`` and ends the run with :class:`StageStalled` when it made no progress for the
    deadline in force (:meth:`FaultConfig.stall_deadline`): ``first_shard_seconds`` while no actor is working
    (the pool starting, a lost node being replaced), else ``stall_factor`` x the longest pause between two
    signs of progress while working, at least ``stall_seconds``. Progress is a shard's row reaching the
    driver, or anything the actors' heartbeats report (:mod:`veclip.shards.progress`): requests finished
    inside a shard, an actor appearing or starting its first shard. No signal is involved, so a driver that
    ignores or blocks SIGINT (started with ``&``, a Ray job entrypoint under bash) stops all the same."""

    def __init__(
        self,
        stage: str,
        faults: FaultConfig,
        view: Callable[[], PoolView | None] = lambda: None,
        now: Callable[[], float] | None = None,
    ):
        self.stage, self.faults, self.view = stage, faults, view
        self.clock = now or clock().monotonic
        self.last = self.clock()  # the last sign of progress
        self.longest: float | None = None  # the longest pause between two while working (None: not yet working)
        self.working = False

    def progressed(self, at: float | None = None) -> None:
        at = self.clock() if at is None else at
        if at <= self.last:
            return
        if self.working:
            self.longest = max(self.longest or 0.0, at - self.last)
        self.last = at

    def deadline(self) -> float:
        return self.faults.stall_deadline(self.longest if self.working else None)

    def check(self) -> None:
        """Look at the pool; raise :class:`StageStalled` when the deadline in force has passed."""
        view, now = self.view(), self.clock()
        if view is not None:
            if view.since_progress is not None:  # a pause that ends now is timed in the state it was spent in
                self.progressed(now - view.since_progress)
            self.working = view.working > 0
        deadline = self.deadline()
        if now - self.last > deadline:
            raise StageStalled(self._why(now - self.last, deadline))

    def _why(self, silent: float, deadline: float) -> str:
        if self.working:
            cause = (
                f"its actors are working but made no progress for {silent:.0f} s (the deadline {deadline:.0f} s: "
                "faults.stall_factor x the longest pause seen, at least faults.stall_seconds): an engine hung"
            )
        else:
            cause = (
                f"no actor of the pool is working and nothing progressed for {silent:.0f} s (the start-up "
                f"allowance, faults.first_shard_seconds = {deadline:.0f} s): the pool's actors are dead or cannot "
                "be placed (a lost node, no node with room; `ray status` shows pending demands)"
            )
        return f"{self.stage}: stopped: {cause}. What finished is kept: rerun to continue."

    def rows(self, rows: Iterator[dict]) -> Iterator[dict]:
        """The pools' rows as they come, the pool looked at in between; raises :class:`StageStalled`."""
        arrived: queue.Queue = queue.Queue()

        def pump() -> None:  # Ray Data's iterator blocks: it runs aside, the driver's loop stays free to stop
            try:
                for row in rows:
                    arrived.put((row, None))
                arrived.put((None, None))
            except BaseException as err:  # noqa: BLE001 - handed to the driver's loop, which raises it
                arrived.put((None, err))

        threading.Thread(target=pump, name="veclip-rows", daemon=True).start()
        while True:
            try:
                row, err = arrived.get(timeout=self.faults.look_seconds)
            except queue.Empty:
                self.check()
                continue
            if err is not None:
                raise err
            if row is None:
                return
            self.progressed()
            yield row
