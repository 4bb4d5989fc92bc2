"""Real processes for fault tests: find them, wait on them, and kill a job with everything it started.

A driver killed with ``kill -9`` leaves Ray's agents (DashboardAgent, RuntimeEnvAgent) behind, so
:func:`kill_job_when` kills the job's process group and then, by PID, every process it had started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from veclip.processes import process_tree


def pids_matching(pattern: str, parent: int | None = None) -> list[int]:
    """Live processes whose command line matches ``pattern`` (and whose parent is ``parent``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if re.search(pattern, cmdline) and (parent is None or ppid == parent):
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    return [p for p in process_tree([pid]) if p != pid]


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_job_when(
    cmd: list[str], ready, what: str, timeout: float = 300, env: dict | None = None, spare: str | None = None
) -> list[int]:
    """Start ``cmd`` in a session of its own, wait until ``ready()`` (the job must still be running), then
    kill -9 its process group and every process it had started, except those whose command line matches
    ``spare`` (the vLLM engines and their reapers: what must go by itself); returns the spared PIDs."""
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    spared: list[int] = []
    try:

        def running_and_ready():
            assert job.poll() is None, "the job ended before it could be killed"
            return ready()

        wait_for(running_and_ready, timeout, what)
    finally:
        started = descendants(job.pid)
        spared = [pid for pid in started if spare and re.search(spare, cmdline(pid))]
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        kill_all([pid for pid in started if pid not in spared])
    return spared


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
