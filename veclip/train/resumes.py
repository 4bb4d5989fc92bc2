"""Why a training run resumed, and how each resume is told (the summary, the console, ``veclip status``).

Each resume is recorded in the checkpoint's ``progress.json`` (:func:`veclip.train.loop.resume_point`):
the step and checkpoint it went on from, whether the data order stayed exact, each worker's place and
node, and its cause (the keys of :data:`TOLD`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from veclip.train.checkpoint import Progress

# how each cause reads in a line; "" : a resume recorded before causes were
TOLD = {
    "rerun": "rerun",
    "preempted": "restart after a preemption notice",
    "node lost": "restart after a lost node",
    "worker died": "restart after a worker died",
    "": "restart",
}


def render_resume(resume: dict, places: bool = True) -> str:
    """One line for a resume record: its cause, whether exact, the checkpoint and (``places``) each worker's place."""
    how = "exactly" if resume["exact"] else f"not exactly ({resume['why']})"
    where = resume["checkpoint"] or "no checkpoint had been committed: from the start"
    line = f"{TOLD[resume.get('cause', '')]}: resumed {how} from step {resume['from_step']} ({where})"
    if not places or not resume["workers"]:
        return line
    where = [(i, w["position"]) for i, w in enumerate(resume["workers"])]
    return (
        line
        + ": "
        + "; ".join(f"worker {i} at epoch {p['epoch']} window {p['window']} row {p['offset']}" for i, p in where)
    )


def resume_cause(saved: Progress, attempt: str | None, alive_nodes: set[str]) -> str:
    """Why a worker group starts from ``saved``: the command run again ("rerun"), a just-in-time checkpoint
    on a preemption notice ("preempted"), a node of the group gone ("node lost"), else "worker died"."""
    if saved.attempt != attempt:
        return "rerun"
    if saved.preempted:
        return "preempted"
    if any(w.node and w.node not in alive_nodes for w in saved.workers):
        return "node lost"
    return "worker died"
