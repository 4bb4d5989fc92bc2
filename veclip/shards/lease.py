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
so a run that lost its lease, or whose lease is close to lapsing (its renewals
failing), stops writing at its next shard. Each record carries a token of the
write that made it (a renewal answered 412 because its answer was lost and the
client retried reads the lease back and finds its own token: kept, not lost)
and a generation, raised by each run that takes the lease: a commit checks the
generation its run took, so a writer that lost the lease cannot commit under
its successor's.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from veclip.clock import clock
from veclip.processes import pid_alive
from veclip.shards.layout import Layout, layout_of
from veclip.shards.marker import utc_now
from veclip.storage import Location, replaced_atomically


class LeaseHeld(RuntimeError):
    """Another run holds the output."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over: it must stop writing."""


class ConditionalWritesIgnored(ValueError):
    """The store accepts a create-only write over an existing object: a lease there would lock nothing."""


UNCHECKED_STORE_ENV = "VECLIP_STORE_IGNORES_CONDITIONAL_WRITES"  # 1: run without a working lease, at one's risk


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

    def honours_conditional_writes(self) -> bool:
        """Two create-only PUTs of one probe object: a store that lets the second through would make the
        lease a no-op (AWS S3, MinIO, moto refuse it; some S3-compatible stores do not)."""
        probe = _S3Cas.__new__(_S3Cas)
        probe.fs, probe.bucket, probe.key = self.fs, self.bucket, f"{self.key}.probe-{uuid.uuid4().hex}"
        probe._call("put_object", Body=b"probe", IfNoneMatch="*")
        try:
            probe._call("put_object", Body=b"probe", IfNoneMatch="*")
            return False
        except _Conflict:
            return True
        finally:
            probe.fs.call_s3("delete_object", Bucket=probe.bucket, Key=probe.key)


_HONOURING_STORES: set[tuple] = set()  # (endpoint, bucket) found to honour conditional writes in this process
RENEWALS_PER_TTL = 4  # renewed every quarter of its lifetime: three renewals can fail before it lapses
LAPSING_SHARE = 0.25  # a commit is refused once less than this share of the lifetime is left (two renewals missed)


@dataclass
class OutputLease:
    location: Location  # the output folder
    run_id: str
    ttl_seconds: float = 120.0  # FaultConfig.lease_seconds says which durations it must exceed
    layout: Layout = field(default=None, repr=False)  # the output's (found when None)
    generation: int | None = None  # the take the run holds (workers: the driver's, from RunContext)
    hint: str = (  # what a refused run can do
        "Wait for that run to finish, write to another --output, or, if it is surely gone, rerun with "
        "--take-over-lease."
    )
    _version: str | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

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
        if lease["run_id"] == self.run_id or lease["expires_at"] < clock().time():
            return True
        return lease.get("host") == socket.gethostname() and not pid_alive(lease.get("pid", 0))

    def _record(self) -> dict:
        return {
            "run_id": self.run_id,
            "generation": self.generation,
            "token": uuid.uuid4().hex,  # this write's own: a lost answer is recognised by it
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires_at": clock().time() + self.ttl_seconds,
            "ttl_seconds": self.ttl_seconds,
            "started_at": utc_now(),
        }

    def _check_store(self, cas) -> None:
        """Once per process and bucket: does the store honour conditional writes?"""
        if isinstance(cas, _S3Cas) and os.environ.get(UNCHECKED_STORE_ENV) != "1":
            where = (self.location.options.endpoint_url, cas.bucket)
            if where not in _HONOURING_STORES and cas.honours_conditional_writes():
                _HONOURING_STORES.add(where)
            if where not in _HONOURING_STORES:
                raise ConditionalWritesIgnored(
                    f"{self.location.url}: this store ignores conditional writes (a create-only PUT with "
                    "If-None-Match: * overwrote an existing object), so the output's lease would not keep a second "
                    "run out. Use a store that honours them (AWS S3, MinIO, recent Ceph), or, if you make sure "
                    f"yourself that one run writes this output, set {UNCHECKED_STORE_ENV}=1."
                )

    def acquire(self, take_over: bool = False) -> None:
        cas = self._cas
        self._check_store(cas)
        current = cas.read()
        try:
            if current is None:
                self.generation = 1
                self._version = cas.create(self._record())
            elif take_over or self._free(current[0]):
                self.generation = int(current[0].get("generation") or 0) + 1
                self._version = cas.replace(self._record(), current[1])
            else:
                held = current[0]
                raise LeaseHeld(
                    f"{self.location.url} is being written by run {held['run_id']} (pid {held.get('pid')} on "
                    f"{held.get('host')}, started {held.get('started_at')}); its lease expires in "
                    f"{held['expires_at'] - clock().time():.0f} s unless renewed (a run killed on this host frees it "
                    f"at once). {self.hint}"
                )
        except _Conflict:
            now = self.holder()
            raise LeaseHeld(
                f"{self.location.url}: another run (run {now and now['run_id']}) took the lease at the "
                "same moment; rerun later"
            ) from None
        self._renew()

    def _renew(self) -> None:
        """Renew every quarter of the lifetime until released or taken over; a failed renewal (any error: S3
        down, credentials expired) is retried with backoff, never ends the renewals."""
        every, retry = self.ttl_seconds / RENEWALS_PER_TTL, 0.0

        def step() -> float | None:
            nonlocal retry
            try:
                if not self._renew_once():
                    return None
                retry = 0.0
                return every
            except Exception as err:  # noqa: BLE001 - workers see the lease lapsing and stop committing
                retry = min(2 * retry or every / 8, every / 2)
                print(f"veclip: renewing the output's lease failed ({type(err).__name__}: {err}); retrying", flush=True)
                return retry * random.uniform(0.5, 1.0)

        clock().repeat("veclip-lease", every, step, self._stop)

    def _renew_once(self) -> bool:
        """Extend the lease if it is still this run's; False once another run took it. A renewal answered with
        a conflict reads the lease back: its own token there means the write went through (the answer was lost
        and the client's retry found the version changed by that very write)."""
        record = self._record()
        try:
            self._version = self._cas.replace(record, self._version)
        except _Conflict:
            found = self._cas.read()
            if found is not None and found[0].get("token") == record["token"]:
                self._version = found[1]
                return True
            self._stop.set()
            return False  # taken over: workers find out at their next check
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease, in the generation it took, with
        time left (workers call it before each commit: a run whose renewals keep failing stops writing before
        its lease lapses and another run may take it)."""
        current = self.holder()
        ours = current is not None and current["run_id"] == self.run_id
        if ours and self.generation is not None and current.get("generation") not in (None, self.generation):
            ours = False
        if not ours:
            raise LeaseLost(
                f"{self.location.url}: run {self.run_id} no longer holds the output "
                f"(now {current and current['run_id']}); stopping"
            )
        left, ttl = current["expires_at"] - clock().time(), current.get("ttl_seconds", self.ttl_seconds)
        if left < LAPSING_SHARE * ttl:
            raise LeaseLost(
                f"{self.location.url}: run {self.run_id}'s lease is about to lapse ({left:.0f} s left of "
                f"{ttl:.0f} s: its renewals are failing); stopping before another run may take the output"
            )

    def release(self) -> None:
        self._stop.set()
        found = self._cas.read()
        if found is not None and found[0]["run_id"] == self.run_id:
            self._cas.delete(found[1])
