"""One writer per output: a lease that a run takes, renews while it runs, and gives back.

The lease is a small JSON file, ``_lease.json``, under the output. A run takes
it when it is free, expired, or held by a process on this host that is gone
(a driver killed with ``kill -9``), and renews it every quarter of its
lifetime. Object stores have no atomic create in s3fs, so taking it is
write, wait, read back: of two runs that start together only the last
writer reads back its own lease. Workers check the lease before they commit a
shard (:meth:`OutputLease.check`), so a run that lost its lease stops
writing at its next shard.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

from veclip.storage import Location, read_json, write_json

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another run holds the output."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over: it must stop writing."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OutputLease:
    location: Location  # the output folder
    run_id: str
    ttl_seconds: float = 120.0
    settle_seconds: float = 1.0  # between writing the lease and reading it back
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.location.join(LEASE_FILE)

    def holder(self) -> dict | None:
        return read_json(self.location.fs, self.path)

    def _free(self, lease: dict | None) -> bool:
        if lease is None or lease["run_id"] == self.run_id or lease["expires_at"] < time.time():
            return True
        return lease["host"] == socket.gethostname() and not _pid_alive(lease["pid"])

    def acquire(self, take_over: bool = False) -> None:
        current = self.holder()
        if not (take_over or self._free(current)):
            raise LeaseHeld(
                f"{self.location.url} is being written by run {current['run_id']} (pid {current['pid']} on {current['host']}, "
                f"started {current['started_at']}); its lease expires in {current['expires_at'] - time.time():.0f} s unless renewed. "
                "Wait for that run to finish, write to another --output, or, if it is surely gone, rerun with --take-over-lease."
            )
        self._write()
        time.sleep(self.settle_seconds)
        if (now := self.holder()) is None or now["run_id"] != self.run_id:
            raise LeaseHeld(f"{self.location.url}: another run (run {now and now['run_id']}) took the lease at the same moment; rerun later")
        self._thread = threading.Thread(target=self._renew, name="veclip-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        lease = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "expires_at": time.time() + self.ttl_seconds}
        write_json(self.location.fs, self.path, {**lease, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 4):
            try:
                if (current := self.holder()) is not None and current["run_id"] != self.run_id:
                    return  # taken over: workers find out at their next check
                self._write()
            except OSError:
                pass  # a transient storage error: the next renewal tries again, well before expiry

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (workers call it before each commit)."""
        current = self.holder()
        if current is None or current["run_id"] != self.run_id:
            raise LeaseLost(f"{self.location.url}: run {self.run_id} no longer holds the output (now {current and current['run_id']}); stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if (current := self.holder()) is not None and current["run_id"] == self.run_id:
            self.location.fs.rm_file(self.path)
