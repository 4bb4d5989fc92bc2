"""Local processes, from /proc (Linux): is one alive, and which processes descend from some.

Used where a process must be judged gone without being its parent: a lease left by a
driver killed on this host (:mod:`veclip.shards.lease`), the vLLM engines of a killed
actor (:mod:`veclip.rewrite.reaper`).
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc to ask: os.kill said it exists


def process_tree(pids: list[int]) -> list[int]:
    """``pids`` and every process descending from them (from /proc; just ``pids`` where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out
