"""No vLLM engine outlives the actor that started it.

vLLM runs its engine core in child processes. When the actor's process is
killed (its driver or pod killed, ``kill -9``, an OOM kill), those children are
re-parented to init and can run on, holding gigabytes (a GPU's memory on a GPU
node) and starving the replacement actor. :func:`start_reaper` starts a small
watcher in a session of its own: when the actor's process is gone it kills the
engine processes it was given (and their children), then exits; it also exits
when the engine processes end by themselves.

    python -m veclip.rewrite.reaper ACTOR_PID ENGINE_PID [ENGINE_PID ...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _tree(pids: list[int]) -> list[int]:
    """``pids`` and their live descendants (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def watch(actor: int, engines: list[int]) -> None:
    while any(_alive(p) for p in engines):
        if not _alive(actor):
            for pid in _tree(engines):
                try:
                    os.kill(pid, signal.SIGKILL)  # the engine ignores SIGTERM once its parent is gone
                except ProcessLookupError:
                    pass
            return
        time.sleep(POLL_SECONDS)


def start_reaper(engines: list[int]) -> subprocess.Popen | None:
    """Watch this process: when it is gone, kill ``engines``. None when there is nothing to watch."""
    if not engines:
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "veclip.rewrite.reaper", str(os.getpid()), *map(str, engines)],
        start_new_session=True,  # survives the kill of the actor's process group
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
