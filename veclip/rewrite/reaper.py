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

from veclip.processes import pid_alive, process_tree

POLL_SECONDS = 1.0


def watch(actor: int, engines: list[int]) -> None:
    while any(pid_alive(p) for p in engines):
        if not pid_alive(actor):
            for pid in process_tree(engines):
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
