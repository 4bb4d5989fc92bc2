"""One writer per output: a lease that a run takes, renews while it runs, and gives back.

The lease is ``.veclip/lease.json`` under the output. A run takes it when there is
none, or when the one there is expired, its own, or held by a process on this
host that is gone (a driver killed with ``kill -9``), and renews it every
quarter of its lifetime. Every change is a compare-and-swap, so of two runs
that start together exactly one wins, with no waiting:

* S3: a create is a PUT with ``If-None-Match: *``; a renewal or take-over is a
  PUT with ``If-Match: <the ETag read>``; the release a DELETE with ``If-Match``.
  A store that ignores these headers would let two runs in (AWS S3, MinIO and
  moto honour them; the tests check moto does).
* Local disk: a create links a finished temp file to the name (fails if it
  exists); a renewal or take-over rewrites it under an ``flock``, after checking
  the version (mtime and size) it read.

Workers check the lease before they commit a shard (:meth:`OutputLease.check`),
so a run that lost its lease stops writing at its next shard.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from veclip.processes import pid_alive
from veclip.shards.layout import Layout, layout_of
from veclip.shards.marker import utc_now
from veclip.storage import Location, replaced_atomically


class LeaseHeld(RuntimeError):
    """Another run holds the output."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over: it must stop writing."""


class _Conflict(Exception):
    """A conditional write found the lease other than expected."""


class _LocalCas:
    """Compare-and-swap of one small file on local disk; the version is (mtime_ns, size)."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[dict, str] | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return json.loads(f.read()), f"{st.st_mtime_ns}:{st.st_size}"
        except FileNotFoundError:
            return None

    def _temp(self, data: dict) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        return tmp

    @contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _version(self) -> str:
        st = os.stat(self.path)
        return f"{st.st_mtime_ns}:{st.st_size}"

    def create(self, data: dict) -> str:
        tmp = self._temp(data)
        try:
            with self._locked():
                os.link(tmp, self.path)  # atomic, and refuses an existing name
                return self._version()
        except FileExistsError as err:
            raise _Conflict from err
        finally:
            os.remove(tmp)

    def replace(self, data: dict, version: str) -> str:
        with self._locked():
            now = self.read()
            if now is None or now[1] != version:
                raise _Conflict
            with replaced_atomically(self.path) as tmp, open(tmp, "w") as f:
                json.dump(data, f)
            return self._version()

    def delete(self, version: str) -> None:
        with self._locked():
            now = self.read()
            if now is not None and now[1] == version:
                os.remove(self.path)


CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")  # 412, and 409 for two writes at once


class _S3Cas:
    """Compare-and-swap of one S3 object with conditional requests; the version is its ETag."""

    def __init__(self, location: Location, path: str):
        self.fs = location.fs
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kwargs) -> dict:
        from botocore.exceptions import ClientError

        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except OSError as err:  # s3fs translates botocore's errors; the cause keeps S3's code
            cause = err.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in CONFLICT_CODES:
                raise _Conflict from err
            raise

    def read(self) -> tuple[dict, str] | None:
        from fsspec.asyn import sync

        async def fetch():
            got = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with got["Body"] as body:
                return await body.read(), got["ETag"]

        try:
            data, etag = sync(self.fs.loop, fetch)
        except FileNotFoundError:
            return None
        return json.loads(data), etag

    def create(self, data: dict) -> str:
        return self._call("put_object", Body=json.dumps(data).encode(), IfNoneMatch="*")["ETag"]

    def replace(self, data: dict, version: str) -> str:
        return self._call("put_object", Body=json.dumps(data).encode(), IfMatch=version)["ETag"]

    def delete(self, version: str) -> None:
        try:
            self._call("delete_object", IfMatch=version)
        except (_Conflict, FileNotFoundError):
            pass


@dataclass
class OutputLease:
    location: Location  # the output folder
    run_id: str
    ttl_seconds: float = 120.0
    layout: Layout = field(default=None, repr=False)  # the output's (found when None)
    _version: str | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self):
        self.layout = self.layout or layout_of(self.location)

    @property
    def path(self) -> str:
        return self.location.join(self.layout.lease)

    @property
    def _cas(self):
        if self.location.is_local:
            return _LocalCas(self.path)
        return _S3Cas(self.location, self.path)

    def holder(self) -> dict | None:
        found = self._cas.read()
        return None if found is None else found[0]

    def _free(self, lease: dict) -> bool:
        if lease["run_id"] == self.run_id or lease["expires_at"] < time.time():
            return True
        return lease.get("host") == socket.gethostname() and not pid_alive(lease.get("pid", 0))

    def _record(self) -> dict:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires_at": time.time() + self.ttl_seconds,
            "started_at": utc_now(),
        }

    def acquire(self, take_over: bool = False) -> None:
        cas = self._cas
        current = cas.read()
        try:
            if current is None:
                self._version = cas.create(self._record())
            elif take_over or self._free(current[0]):
                self._version = cas.replace(self._record(), current[1])
            else:
                held = current[0]
                raise LeaseHeld(
                    f"{self.location.url} is being written by run {held['run_id']} (pid {held.get('pid')} on "
                    f"{held.get('host')}, started {held.get('started_at')}); its lease expires in "
                    f"{held['expires_at'] - time.time():.0f} s unless renewed. Wait for that run to finish, write to "
                    "another --output, or, if it is surely gone, rerun with --take-over-lease."
                )
        except _Conflict:
            now = self.holder()
            raise LeaseHeld(
                f"{self.location.url}: another run (run {now and now['run_id']}) took the lease at the "
                "same moment; rerun later"
            ) from None
        self._thread = threading.Thread(target=self._renew, name="veclip-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 4) and self._renew_once():
            pass

    def _renew_once(self) -> bool:
        """Extend the lease if it is still this run's; False once it was taken over."""
        try:
            self._version = self._cas.replace(self._record(), self._version)
        except _Conflict:
            self._stop.set()
            return False  # taken over: workers find out at their next check
        except OSError:
            pass  # a transient storage error: the next renewal tries again, well before expiry
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (workers call it before each commit)."""
        current = self.holder()
        if current is None or current["run_id"] != self.run_id:
            raise LeaseLost(
                f"{self.location.url}: run {self.run_id} no longer holds the output "
                f"(now {current and current['run_id']}); stopping"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        found = self._cas.read()
        if found is not None and found[0]["run_id"] == self.run_id:
            self._cas.delete(found[1])
