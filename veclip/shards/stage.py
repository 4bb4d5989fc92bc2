"""What a sharded stage is: a config with its fingerprint, its plan, its actor pools and its summary figures.

``rewrite`` and ``score`` subclass :class:`ShardedStage`; :func:`veclip.shards.driver.run_stage` runs any of
them, exactly once per input shard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from veclip.shards.guard import RunContext
from veclip.shards.marker import Marker
from veclip.shards.plan import InputShard, Plan
from veclip.shards.worker import FaultConfig
from veclip.storage import Location, StorageOptions


class ShardedStage(ABC):
    """A stage that maps input shards to output shards exactly once: rewrite, score, the next one."""

    name = ""  # in every log line, record and summary
    # the run summary's type: a subclass of veclip.shards.summary.RunSummary naming the stage's own figures
    # (details()); None: RunSummary itself, the figures kept in its details
    summary_type: type | None = None

    def __init__(self, config, options: StorageOptions | None = None):
        self.config, self.options = config, options or StorageOptions()

    @property
    def output(self) -> Location:
        return Location(self.config.output, self.options)

    @property
    def faults(self) -> FaultConfig:
        return self.config.faults

    def input_urls(self) -> list[str]:
        """Every folder the stage reads: its output may be none of them, nor inside one."""
        return [self.config.input]

    @abstractmethod
    def fingerprint(self) -> str:
        """What decides the output's content, hashed: markers of another one are never reused."""

    @abstractmethod
    def list_inputs(self) -> dict[str, InputShard]:
        """Every input shard, by output name (one listing)."""

    @abstractmethod
    def plan(self, run: RunContext, inputs: dict[str, InputShard], markers: dict[str, Marker]) -> Plan:
        """What is done and what is left (:func:`veclip.shards.plan.plan_shards` with the stage's checks)."""

    def describe(self, plan: Plan, run: RunContext) -> str:
        """The plan line's tail: the settings a user checks before the run goes on."""
        return f"fingerprint {run.fingerprint}"

    def prepare(self, plan: Plan, run: RunContext, log) -> None:  # noqa: B027 - optional
        """Before any pool starts, with work to do (check that the workers can run)."""

    def pool_resources(self) -> dict[str, dict]:
        """Per actor pool, what it asks of the cluster (models, actors, CPUs, GPUs, accelerator type)."""
        return {}

    @abstractmethod
    def pools(self, plan: Plan, run: RunContext) -> list[Pool]:
        """The actor pools every shard goes through, in order (the last one writes the output)."""

    @abstractmethod
    def details(
        self, plan: Plan, run: RunContext, markers: dict[str, Marker], written: list[str], started_at: float
    ) -> dict:
        """The stage's own summary figures over its ``markers`` (``written``: this run's)."""


@dataclass(frozen=True)
class Pool:
    """One autoscaling pool of shard workers: one shard per call (the unit of work); an actor may work on
    ``in_flight`` shards at once, on threads. ``resources``: what each actor asks of the cluster (Ray's
    ``num_cpus``, ``num_gpus``, ``accelerator_type``, ``runtime_env``)."""

    name: str
    actor: type  # a ShardWorker
    kwargs: dict
    min_actors: int
    max_actors: int
    in_flight: int = 1
    resources: dict = field(default_factory=dict)
