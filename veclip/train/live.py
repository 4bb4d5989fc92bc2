"""The driver's live progress line while Ray Train's workers train.

Worker prints are not forwarded to the console (:mod:`veclip.console`), and
``trainer.fit()`` blocks until the run ends, so rank 0 posts each step's
metrics to a small actor (a fire-and-forget call per step) and a thread of the
driver prints a line at each tenth of the run, or after ``quiet_s`` seconds
without one (long runs), with the rate measured on the driver's clock: data
waits, checkpoints and restarts included, so the ETA errs honest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from veclip.console import eta


class _Board:
    """Holds rank 0's latest step metrics (a Ray actor with no CPU)."""

    def __init__(self):
        self._latest: dict | None = None
        self._notes: list[str] = []
        self._steps: list[dict] = []
        self._starts: dict[int, int] = {}  # rank -> worker starts in this invocation
        self._nodes: set[str] = set()  # every node a worker started on

    def joined(self, rank: int, node: str) -> int:
        """A worker of a (re)started group: how often this rank started before in this invocation."""
        self._nodes.add(node)
        earlier = self._starts.get(rank, 0)
        self._starts[rank] = earlier + 1
        return earlier

    def nodes_seen(self) -> set[str]:
        return set(self._nodes)

    def post(self, metrics: dict) -> None:
        self._latest = metrics
        self._steps.append(metrics)

    def say(self, line: str) -> None:
        """A line for the user's console now (a preemption notice, a restart)."""
        self._notes.append(line)

    def latest(self) -> tuple[dict | None, list[str], list[dict]]:
        """The latest metrics, and the lines said and the steps posted since the last call."""
        notes, steps, self._notes, self._steps = self._notes, self._steps, [], []
        return self._latest, notes, steps


@dataclass
class LiveProgress:
    """``with LiveProgress(steps, samples_per_step, log) as board:`` pass ``board`` to rank 0."""

    steps: int
    samples_per_step: int
    log: object = print
    marks: int = 10  # a line at each 1/marks of the run
    quiet_s: float = 120.0  # and one at least this often
    poll_s: float = 1.0
    on_step: object = None  # called with every step's metrics rank 0 posts (the trackers), on the driver

    def __enter__(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: the board counts the restarts a lost worker node causes, so it must outlive one.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(num_cpus=0, scheduling_strategy=here)(_Board).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="veclip-train-progress", daemon=True)
        self._thread.start()
        return self.board

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        try:  # the steps posted since the last poll
            self._take(*ray.get(self.board.latest.remote(), timeout=10)[1:])
        except Exception:  # noqa: BLE001 - the board is gone with a failed run: nothing more to take
            pass
        ray.kill(self.board)

    def _take(self, notes: list[str], steps: list[dict]) -> None:
        for note in notes:
            self.log(note)
        if self.on_step is not None:
            for metrics in steps:
                self.on_step(metrics)

    def line(self, metrics: dict, first: tuple[float, int], now: float) -> str:
        step = metrics["step"]
        steps_per_s = (step - first[1]) / max(now - first[0], 1e-9)
        left = f", ETA {eta(self.steps - step, steps_per_s)}" if steps_per_s > 0 and step < self.steps else ""
        return (
            f"train: [step {step}/{self.steps} ({step / self.steps:.0%}), {steps_per_s * self.samples_per_step:.0f} "
            "samples/s"
            f"{left}] loss {metrics['loss']:.4f}, data wait {metrics['data_wait_share']:.0%} (last step)"
        )

    def _watch(self) -> None:
        import ray

        first, next_mark, last_line = None, 1, time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                metrics, notes, steps = ray.get(self.board.latest.remote(), timeout=10)
            except Exception:  # the driver is shutting down, or the actor is busy: try again
                continue
            self._take(notes, steps)
            if not metrics:
                continue
            now = time.monotonic()
            if first is None:  # the rate counts from the first step seen: start-up is not training
                first = (now, metrics["step"])
                continue
            done = metrics["step"] * self.marks // self.steps
            if done >= next_mark or now - last_line >= self.quiet_s:
                self.log(self.line(metrics, first, now))
                next_mark, last_line = done + 1, now
