"""A sharded run's summary (``.veclip/summary.json``): every input row reconciled, then the run's figures.

:func:`summarize` is the end of :func:`veclip.shards.driver.run_stage`: it checks that every input row is in
the output, its quarantine or a shard recorded as failed (or raises :class:`ReconciliationError`), and adds
what the run met on its way (shards retried, actors and nodes lost, engine deaths, the pool over time). The
``render_*`` functions print the lines every stage shares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from veclip.console import alive_nodes
from veclip.shards.guard import RunContext
from veclip.shards.isolation import KILLED_THE_ENGINE
from veclip.shards.marker import Marker
from veclip.shards.plan import Plan
from veclip.shards.stage import ShardedStage
from veclip.shards.store import ShardStore

SUMMARY_VERSION = 2


class ReconciliationError(RuntimeError):
    """Input rows and output + quarantine rows disagree: something was lost or duplicated."""


@dataclass
class ShardCounts:
    total: int
    done: int
    written_this_run: int
    failed: int
    redone: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # input shards the reader left out, by why
    retried: int = 0  # done this run after more than one try (a try lost with its actor or node, an error)
    actors_lost: int = 0  # actor processes that died during a try this run (killed, out of memory, node lost)
    nodes_lost: int = 0  # the nodes those actors were on that Ray no longer has


@dataclass
class RunSummary:
    """What a run did, over the whole output (``.veclip/summary.json``). A stage's own figures are the fields of
    its subclass (:attr:`ShardedStage.summary_type`), or ``details`` for a stage without one; every reader of a
    summary goes through :meth:`from_json` of its type."""

    stage: str
    input: str
    output: str
    run_id: str
    fingerprint: str
    rows_in: int
    rows_out: int
    rows_quarantined: int
    rows_in_failed_shards: int
    shards: ShardCounts
    failed: dict[str, dict]  # shard -> input, stage, tries, error
    wall_seconds: float
    rows_per_second_this_run: float
    retried: dict[str, dict] = field(default_factory=dict)  # shard -> tries, errors of the lost tries
    pool_over_time: list[dict] = field(default_factory=list)  # the actors and nodes at work as the run went
    config: dict = field(default_factory=dict)  # the stage's config as it ran (secrets redacted)
    fingerprint_fields: dict = field(default_factory=dict)  # what its fingerprint is made of
    details: dict = field(default_factory=dict)  # a stage's figures that its summary type does not name
    version: int = SUMMARY_VERSION

    def to_json(self) -> dict:
        """One flat object: the common fields, then the stage's."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        return {**common, "shards": dataclasses.asdict(self.shards), **self.details}

    @classmethod
    def from_json(cls, data: dict):
        """The summary a run wrote (a summary of an older version: its missing fields at their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"details", "shards"}
        return cls(
            **{k: data[k] for k in names if k in data},
            shards=ShardCounts(**data["shards"]),
            details={k: v for k, v in data.items() if k not in names | {"shards"}},
        )

    @property
    def models(self) -> dict[str, str]:
        """Every model its configuration names, by where (``captioner.engine.model``, ``model``)."""
        return dict(_find_models(self.config, ""))


def _find_models(config: dict, prefix: str):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _find_models(value, f"{prefix}{key}.")
        elif key == "model" and value:
            yield prefix + key, value


def summarize(stage: ShardedStage, plan: Plan, run: RunContext, wall_seconds: float, started_at: float = 0.0) -> dict:
    """The run summary over the whole output; raises if any row is unaccounted for.

    A shard is done (marked with this run's fingerprint, rows reconciled),
    failed (recorded with its error), or lost: that raises.
    """
    store = ShardStore(stage.output)
    # Nothing ran (a no-op rerun): the plan's markers are current, the lease kept other writers out.
    listed = store.markers(save_manifest=True) if plan.todo else plan.done
    markers = {
        n: m
        for n, m in listed.items()
        if n in plan.inputs and n not in plan.unreadable and m.fingerprint == run.fingerprint
    }
    failed = {n: f for n, f in store.failures().items() if n in plan.inputs and n not in markers}
    problems = [f"{name}: not written" for name in sorted(set(plan.inputs) - set(markers) - set(failed))]
    for name, m in markers.items():
        if name in plan.rows and m.rows_out + m.quarantined != plan.rows[name]:
            problems.append(f"{name}: {plan.rows[name]} input rows but {m.rows} out + {m.quarantined} quarantined")
    if problems:
        raise ReconciliationError(f"{stage.name}: rows unaccounted for: " + "; ".join(problems))
    written = sorted(n for n, m in markers.items() if m.run_id == run.run_id)
    retried = store.retried(stage.name, run.run_id) if plan.todo else {}
    own = stage.details(plan, run, markers, written, started_at)
    kind = stage.summary_type or RunSummary
    named = {f.name for f in dataclasses.fields(kind)}
    return kind(
        stage=stage.name,
        input=stage.config.input,
        output=stage.config.output,
        run_id=run.run_id,
        fingerprint=run.fingerprint,
        rows_in=sum(plan.rows.get(n, 0) for n in markers),
        rows_out=sum(m.rows_out for m in markers.values()),
        rows_quarantined=sum(m.quarantined for m in markers.values()),
        rows_in_failed_shards=sum(plan.rows.get(n, 0) for n in failed),
        shards=ShardCounts(
            len(plan.inputs),
            len(markers),
            len(written),
            len(failed),
            len(plan.redo),
            dict(plan.left_out),
            len(retried),
            *_losses(retried),
        ),
        retried=retried,
        pool_over_time=pool_over_time([markers[n] for n in written]),
        failed={n: f.brief() for n, f in sorted(failed.items())},
        wall_seconds=wall_seconds,
        rows_per_second_this_run=sum(plan.rows.get(n, 0) for n in written) / wall_seconds,
        **{k: v for k, v in own.items() if k in named},
        details={k: v for k, v in own.items() if k not in named},
    ).to_json()


def pool_over_time(markers: list[Marker], points: int = 12) -> list[dict]:
    """How many actors (and on how many nodes) were writing shards at ``points`` even moments of this run:
    the pool growing as the autoscaler adds nodes, or shrinking as they go, read from the markers' times.
    (With two pools, the one that writes the shards.)"""
    spans = [(m.started_at, m.finished_at, m.actor, m.node) for m in markers if m.started_at and m.finished_at]
    if not spans:
        return []
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    timeline = []
    for k in range(points):
        at = first + (last - first) * (k + 0.5) / points
        busy = [(actor, node) for start, end, actor, node in spans if start <= at < end]
        timeline.append({"at_s": round(at - first, 1), "actors": len(set(busy)), "nodes": len({n for _, n in busy})})
    return timeline


def render_pool(summary: RunSummary) -> list[str]:
    """The pool's size over the run, in a line, when it changed."""
    timeline = summary.pool_over_time
    actors = [t["actors"] for t in timeline]
    if len(set(actors)) <= 1:
        return []
    return [
        f"  pool over the run: {' '.join(map(str, actors))} actor(s) writing shards at even moments "
        f"(up to {max(actors)}, on up to {max(t['nodes'] for t in timeline)} node(s))"
    ]


def _losses(retried: dict[str, dict]) -> tuple[int, int]:
    """The actors lost during this run's tries, and how many of their nodes Ray no longer has."""
    lost = {(where["node"], where["actor"]) for record in retried.values() for where in record["lost"]}
    nodes = {node for node, _ in lost}
    if nodes and nodes != {"local"}:
        import ray

        nodes -= alive_nodes() if ray.is_initialized() else nodes
    else:
        nodes = set()
    return len(lost), len(nodes)


def render_faults(summary: RunSummary) -> list[str]:
    """The summary lines of the shards retried (a try lost with its actor or node) and of those that kept
    failing: every stage prints them the same way."""
    lines = []
    if summary.retried:
        name, first = next(iter(summary.retried.items()))
        lines.append(
            f"  retried {len(summary.retried)} shard(s) whose earlier try was lost or failed, all done now "
            f"(e.g. {name}: {first['tries']} tries; {(first['errors'] or ['its process died'])[-1][:160]})"
        )
    counts = summary.shards
    deaths = {n: r for n, r in summary.retried.items() if r.get("engine_deaths")}
    if deaths:
        poison = sum(len(r.get("poison", [])) for r in deaths.values())
        lines.append(
            f"  {len(deaths)} shard(s) lost tries with their engine ({sum(r['engine_deaths'] for r in deaths.values())}"
            f" in all, charged to none); {poison} request(s) found to kill it alone, their rows marked "
            f"{KILLED_THE_ENGINE}"
        )
    if counts.actors_lost:
        lines.append(
            f"  {counts.actors_lost} actor(s) died mid-shard and were restarted by Ray"
            + (f", {counts.nodes_lost} of their node(s) lost" if counts.nodes_lost else "")
        )
    if not summary.failed:
        return lines
    return lines + [
        f"FAILED: {len(summary.failed)} shard(s) kept failing (`veclip status {summary.output}` shows their "
        "errors). Rerun the same command to retry exactly these:",
        *(
            f"  {name}  [{f['stage']}, {f['tries']} tries]  {(f['error'] or '')[:200]}"
            for name, f in summary.failed.items()
        ),
    ]
