"""Finding the rows that kill an engine, and charging no one else for them.

A request can kill its engine (an image vLLM's processor crashes on, a prompt
that trips a kernel bug): every shard then in flight on that actor loses its
try, and a plain retry dies the same way. So an engine death is not a try
charged against ``max_attempts``: every shard in flight is credited one
``engine_deaths`` instead (the cause cannot be told apart while shards share
the engine). A shard that was in flight at :data:`ISOLATE_AFTER` deaths runs
*isolated*: alone on its actor, its requests sent a range at a time, each
range recorded durably before it runs. The next death then names its range:
the range is split :data:`SPLIT` ways on the next try, and a single request
that kills the engine is a poison request, answered with
:data:`KILLED_THE_ENGINE` without running (its row quarantined or flagged with
that reason, as a request vLLM refuses) while the shard's other rows are done.
Requests are numbered in the order a shard's work sends them, which the same
run repeats exactly. A shard whose engine died :data:`MAX_ENGINE_DEATHS` times
is recorded as failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

KILLED_THE_ENGINE = "killed_the_engine"  # the reason a poison request's row carries
ISOLATE_AFTER = 2  # engine deaths with a shard in flight before it runs isolated
SPLIT = 8  # a range the engine died on is tried in this many parts: ~log8(requests) more deaths per poison row
MAX_ENGINE_DEATHS = 30  # then the shard fails: three poison rows in a 40,000-request shard still end


@dataclass
class Isolation:
    """A shard's isolated try: what earlier deaths told (from its try record), and how to tell the next one."""

    suspect: list[list[int]] = field(default_factory=list)  # [lo, hi) request ranges an engine died on
    poison: set[int] = field(default_factory=set)  # requests that killed the engine alone
    note: Callable[[int, int], None] = lambda lo, hi: None  # durably records the range about to run
    sent: int = 0  # requests numbered so far in this try

    @classmethod
    def from_record(cls, record: dict, note: Callable[[int, int], None]) -> Isolation:
        return cls([list(r) for r in record.get("suspect", [])], set(record.get("poison", [])), note)

    def ranges(self, n: int) -> Iterator[range]:
        """The next ``n`` requests (numbered on from :attr:`sent`) as the ranges to run one after another,
        poison ones left out, each noted before it is yielded."""
        lo, self.sent = self.sent, self.sent + n
        for part in segments(lo, self.sent, self.suspect):
            for run in _without(part, self.poison):
                self.note(run.start, run.stop)
                yield run


def segments(lo: int, hi: int, suspect: list[list[int]]) -> list[range]:
    """``[lo, hi)`` cut into ranges: each stretch outside the suspect ranges whole, each suspect one in
    :data:`SPLIT` parts (a death in a part narrows it on the next try)."""
    cuts, at = [], lo
    for s_lo, s_hi in sorted(suspect):
        s_lo, s_hi = max(s_lo, lo), min(s_hi, hi)
        if s_lo >= s_hi:
            continue
        if at < s_lo:
            cuts.append(range(at, s_lo))
        step = -(-(s_hi - s_lo) // SPLIT)
        cuts += [range(a, min(a + step, s_hi)) for a in range(s_lo, s_hi, step)]
        at = max(at, s_hi)
    if at < hi:
        cuts.append(range(at, hi))
    return cuts


def _without(part: range, poison: set[int]) -> Iterator[range]:
    start = part.start
    for i in part:
        if i in poison:
            if start < i:
                yield range(start, i)
            start = i + 1
    if start < part.stop:
        yield range(start, part.stop)


def narrowed(record: dict) -> dict:
    """The try record after an engine died during an isolated try: the range it was running becomes a suspect
    (or poison, when it was one request); what ran before it in that try ran clean, so the suspect ranges keep
    only their parts after it."""
    probe = record.pop("probe", None)
    if probe is None:
        return record
    lo, hi = probe
    later = [[max(a, hi), b] for a, b in record.get("suspect", []) if b > hi]
    if hi - lo == 1:
        return {**record, "suspect": later, "poison": sorted({*record.get("poison", []), lo})}
    return {**record, "suspect": [[lo, hi], *later]}


class Exclusive:
    """Shards share an actor's engine; an isolated one runs alone (a readers-writer lock, writers first)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        self._enter(alone)
        try:
            yield
        finally:
            self._exit(alone)

    def _enter(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._waiting_alone += 1
                self._cond.wait_for(lambda: not self._alone and self._shared == 0)
                self._waiting_alone -= 1
                self._alone = True
            else:
                self._cond.wait_for(lambda: not self._alone and self._waiting_alone == 0)
                self._shared += 1

    def _exit(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._alone = False
            else:
                self._shared -= 1
            self._cond.notify_all()
