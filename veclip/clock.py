"""The shard engine's one clock: real time in production, virtual time in a simulation.

Everything in :mod:`veclip.shards` that reads or waits on time (the driver's timings, the stall watch, the
lease's expiry and its renewals, the guard's and storage's retry backoff, the markers' times) asks
:func:`clock`, so a simulated run (:mod:`veclip.shards.simulate`) drives the real bookkeeping through days in
minutes by swapping it (:func:`use_clock`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Clock:
    """Real time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def repeat(self, name: str, first: float, step: Callable[[], float | None], stop: threading.Event) -> None:
        """Call ``step`` after ``first`` seconds, then after each wait it returns (None: no more), until
        ``stop`` is set: on a thread of its own here, as events in a simulation."""

        def loop() -> None:
            wait = first
            while wait is not None and not stop.wait(wait):
                wait = step()

        threading.Thread(target=loop, name=name, daemon=True).start()


_current: Clock = Clock()


def clock() -> Clock:
    return _current


@contextmanager
def use_clock(replacement: Clock) -> Iterator[Clock]:
    global _current
    before, _current = _current, replacement
    try:
        yield replacement
    finally:
        _current = before
