"""No vLLM engine outlives the actor that started it, from the engine's first moment.

vLLM runs its engine core in child processes. When the actor's process is
killed (its driver or pod killed, ``kill -9``, an OOM kill), those children are
re-parented to init and run on, holding gigabytes (~90% of a GPU's memory on a
GPU node) and starving the replacement actor, whose engine then fails vLLM's
memory check in a loop. Engine start-up takes minutes on a GPU (download, load,
profiling, CUDA graphs), so the watch must begin before ``vllm.LLM()`` does:

* :func:`start_reaper` starts, before the engine, a small watcher in a session
  of its own. While the actor lives it notes the actor's descendants (every
  ``POLL_SECONDS``); when the actor is gone it kills the last ones noted (and
  their children), then exits. An engine process started in the last poll
  before the kill is the one it can miss: :func:`reap_orphaned_engines` covers it.
* :func:`reap_orphaned_engines`, called by an actor before it starts its engine,
  kills engine processes orphaned earlier (parent init, the same
  ``CUDA_VISIBLE_DEVICES``): whatever a dead actor on this device left.

    python -m veclip.rewrite.reaper ACTOR_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from veclip.processes import pid_alive, process_tree

POLL_SECONDS = 1.0  # well inside an engine's start-up (20 s on CPU, minutes on a GPU) and a child's first step
ENGINE_TITLE = "VLLM::"  # vLLM names its engine processes VLLM::EngineCore, VLLM::Worker...


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # an engine ignores SIGTERM once its parent is gone
        except ProcessLookupError:
            pass


def watch(actor: int) -> None:
    me, noted = os.getpid(), []
    while pid_alive(actor):
        noted = [p for p in process_tree([actor]) if p not in (actor, me)]
        time.sleep(POLL_SECONDS)
    _kill(process_tree(noted))


def start_reaper() -> subprocess.Popen:
    """Watch this process's descendants from now on: when it is gone, they are killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "veclip.rewrite.reaper", str(os.getpid())],
        start_new_session=True,  # survives the kill of the actor's process group
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _devices(pid: int) -> bytes | None:
    for entry in _read(pid, "environ").split(b"\0"):
        if entry.startswith(b"CUDA_VISIBLE_DEVICES="):
            return entry.split(b"=", 1)[1]
    return None


def orphaned_engines(devices: str) -> list[int]:
    """Engine processes whose parent is init and which see the GPUs ``devices``."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        stat = _read(pid, "stat")
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) < 2 or fields[1] != b"1" or not _read(pid, "cmdline").startswith(ENGINE_TITLE.encode()):
            continue
        if _devices(pid) == devices.encode():
            found.append(pid)
    return found


def reap_orphaned_engines(log=print) -> list[int]:
    """Before an actor on a GPU starts its engine: kill the engines that died actors left on its devices."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not devices:
        return []  # no GPU assigned: an engine on CPU holds no device to free, and no device tells whose it is
    orphans = orphaned_engines(devices)
    if orphans:
        log(f"veclip: killing {len(orphans)} engine process(es) orphaned on GPU {devices}: {orphans}")
        _kill(process_tree(orphans))
    return orphans


if __name__ == "__main__":
    watch(int(sys.argv[1]))
