"""The two stand-ins a simulated run's real code runs on: virtual time and an object store's wire.

:mod:`veclip.shards.simulate` runs the real driver, guard, store and stall watch under :class:`SimClock`
(``veclip.clock.use_clock``) and over :class:`SimStore` (``veclip.storage.use_local_store``).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fsspec.implementations.local import LocalFileSystem

from veclip.clock import Clock, clock

HOUR = 3600.0


class SimClock(Clock):
    """Virtual time: events run in time order. ``sleep`` (a backoff, a store request's latency) is time the
    caller is blocked: an actor's, while the executor runs its shard (:meth:`charged`), delays that actor; the
    driver's moves the clock on."""

    def __init__(self, start: float):
        self.now, self.start = start, start
        self.events: list = []
        self.seq = itertools.count()
        self.blocked: float | None = None  # an actor's blocked seconds, while its shard's work runs

    def monotonic(self) -> float:
        return self.now - self.start

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if self.blocked is None:
            self.now += seconds
        else:
            self.blocked += seconds

    def charged(self, work: Callable[[], object]) -> tuple[object, float]:
        """``work()``'s result and the seconds it was blocked (charged to the actor that ran it)."""
        self.blocked = 0.0
        try:
            return work(), self.blocked
        finally:
            self.blocked = None

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.seq), action))

    def repeat(self, name: str, first: float, step: Callable[[], float | None], stop: threading.Event) -> None:
        def fire() -> None:
            if stop.is_set():
                return
            wait = step()
            if wait is not None and not stop.is_set():
                self.at(self.now + wait, fire)

        self.at(self.now + first, fire)

    def next_event(self) -> Callable[[], None] | None:
        if not self.events:
            return None
        when, _, action = heapq.heappop(self.events)
        self.now = max(self.now, when)
        return action


class SimStore(LocalFileSystem):
    """The local disk with an object store's wire: every request (an open, a listing page of 1,000 keys, a
    stat, a delete, a move) blocks for an exponential latency on the simulation's clock and fails at
    ``fault_rate`` with the transient error of a request that outlived s3fs's own retries. Requests run one
    after another (s3fs overlaps a many-file read): the driver's planning reads are over-, not
    under-estimated."""

    cachable = False  # one per simulated run: its counters and its random draws are the run's

    def __init__(self, latency_ms: float, fault_rate: float, seed: int):
        super().__init__()
        self.latency, self.fault_rate = latency_ms / 1000, fault_rate
        self.random = random.Random(seed)
        self.requests = self.faults = 0
        self._inside = False  # a request's own inner calls (a listing's stats) are not requests

    @contextmanager
    def _request(self, what: str, path, count: int = 1) -> Iterator[None]:
        if self._inside:
            yield
            return
        for _ in range(count):
            self.requests += 1
            if self.latency:
                clock().sleep(self.random.expovariate(1 / self.latency))
            if self.fault_rate and self.random.random() < self.fault_rate:
                self.faults += 1
                raise ConnectionResetError(f"simulated S3 fault on {what} {path}: connection reset after the retries")
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def _open(self, path, mode="rb", *args, **kwargs):
        with self._request("open", path):
            return super()._open(path, mode, *args, **kwargs)

    def ls(self, path, detail=False, **kwargs):
        with self._request("list", path):
            entries = super().ls(path, detail, **kwargs)
        with self._request("list", path, count=len(entries) // 1000):  # further pages
            return entries

    def info(self, path, **kwargs):
        with self._request("stat", path):
            return super().info(path, **kwargs)

    def rm_file(self, path):
        with self._request("delete", path):
            return super().rm_file(path)

    def mv(self, path1, path2, recursive: bool = True, **kwargs):
        with self._request("move", path1):
            return super().mv(path1, path2, recursive=recursive, **kwargs)
