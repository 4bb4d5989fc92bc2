"""A stand-in engine for a GPU: answers after a per-request latency spent sleeping, not computing.

A test at the user's durations needs shards that take longer than the stall watch's deadlines without a GPU
and without costing the 2-core test machine CPU: ``--set laclip.engine.model=stand-in:latency=0.5`` (any
pool) makes each request take half a second of wall time. Its options, ``,``-separated:

* ``latency=S``: seconds per request, answered one after another (a shard of N requests takes N x S);
* ``start=S``: seconds the engine takes to "load" (a 7B engine: minutes);
* ``hang_after=N``: after N requests, never answer again (a hung GPU, a stuck collective);
* ``die_on=WORD``: a request whose prompt holds WORD kills the engine: that call and every later one raise
  :class:`~veclip.rewrite.engine.EngineGone` (a poison row, an image vLLM's processor crashes on).

Its captions are fixed text; the pool needs no vLLM.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from veclip.rewrite.engine import Completion, EngineGone

PREFIX = "stand-in:"
CAPTION = "a red star on a striped wall"


def is_stand_in(model: str) -> bool:
    return model.startswith(PREFIX)


@dataclass(frozen=True)
class StandInSpec:
    latency: float = 0.0
    start: float = 0.0
    hang_after: int = -1  # -1: never
    die_on: str = ""  # "": never

    @classmethod
    def parse(cls, model: str) -> StandInSpec:
        options = [o for o in model[len(PREFIX) :].split(",") if o]
        try:
            pairs = dict(o.split("=", 1) for o in options)
            return cls(**{k: _TYPES.get(k, float)(v) for k, v in pairs.items() if k in cls.__annotations__})
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"stand-in engine {model!r}: expected {PREFIX}latency=S,start=S,hang_after=N,die_on=WORD"
            ) from err


_TYPES = {"hang_after": int, "die_on": str}


class StandInEngine:
    """Sleeps ``latency`` per request; the shards an actor works on at once share it, as they share a GPU."""

    def __init__(self, model: str):
        self.spec = StandInSpec.parse(model)
        self.name = model
        self.completed = 0  # requests finished: the stall watch's sign of progress
        self.busy_seconds = 0.0
        self._lock = threading.Lock()
        self._dead: EngineGone | None = None
        time.sleep(self.spec.start)

    def generate(self, requests: list, sampling) -> list[Completion]:
        for request in requests:
            with self._lock:
                if self.spec.die_on and self.spec.die_on in (request.prompt or str(request.messages)):
                    self._dead = self._dead or EngineGone(f"the stand-in engine died on a request ({self.spec.die_on})")
                if self._dead is not None:
                    raise self._dead
                if 0 <= self.spec.hang_after <= self.completed:
                    threading.Event().wait()  # hung for good: only the stall watch ends this
                time.sleep(self.spec.latency)
                self.busy_seconds += self.spec.latency
                self.completed += 1
        return [Completion(CAPTION, 8, 6) for _ in requests]
