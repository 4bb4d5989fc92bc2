"""Planning a sharded run: what is done, what is left, and whether the inputs can run.

Everything here costs O(shards / parallelism) requests, not one per shard in
series, because at 30k shards on S3 serial I/O is tens of minutes:

* the inputs come from one listing (sizes come with it), the caller's;
* done shards come from the output's marker manifest plus the markers it lacks,
  fetched concurrently (:meth:`ShardStore.markers`); their row counts come from
  their markers;
* only the shards left to do have their Parquet footers read, as the last
  64 KiB of each file, all in one concurrent ``cat_ranges`` call.

A shard whose footer cannot be read (truncated, not Parquet) is recorded in
failure records and the others run; a check that fits none of the shards left
(a column mapping, a schema) stops the run before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from veclip.shards.layout import output_shard_name
from veclip.shards.marker import Marker
from veclip.storage import read_footers


class ShardChanged(ValueError):
    """A done shard's input changed since its output was written: reported, the rest of the run planned."""


class FingerprintMismatch(ValueError):
    """The output holds shards written with another configuration."""


@dataclass(frozen=True)
class InputShard:
    path: str
    size: int

    @property
    def name(self) -> str:
        return output_shard_name(self.path)


@dataclass
class Plan:
    inputs: dict[str, InputShard]  # every input shard, by output name
    done: dict[str, Marker]  # output name -> its marker, for the shards that need no work
    todo: list[InputShard] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # input rows of the shards done or to do
    unreadable: dict[str, str] = field(default_factory=dict)  # output name -> why it cannot run
    redo: list[str] = field(default_factory=list)  # done shards written again (another configuration, changed inputs)
    left_out: dict[str, int] = field(default_factory=dict)  # input shards the reader left out, by why


def by_name(stage: str, shards: list[InputShard], url: str) -> dict[str, InputShard]:
    """Input shards by their output name; two inputs that map to one output are refused."""
    named: dict[str, InputShard] = {}
    for shard in shards:
        if (other := named.setdefault(shard.name, shard)) is not shard:
            raise ValueError(
                f"{stage}: input shards in {url} map to the same output name {shard.name} ({other.path} and "
                f"{shard.path}): one would overwrite the other; rename one"
            )
    return named


def plan_shards(
    stage: str,
    output_url: str,
    inputs: dict[str, InputShard],
    markers: dict[str, Marker],
    fingerprint: str,
    fs: fsspec.AbstractFileSystem,
    *,
    redo_mismatched: bool = False,
    stale: Callable[[str, Marker], bool] = lambda name, marker: False,
    check: Callable[[pq.FileMetaData, InputShard], None] | None = None,
    what: str = "input shard",
    fits: str = "the stage's checks",
) -> Plan:
    """The plan over ``inputs`` given the output's ``markers`` (read under the lease).

    A marker of another ``fingerprint`` is refused (``redo_mismatched``: written again);
    ``stale(name, marker)`` says a done shard's inputs changed (written again), or raises
    :class:`ShardChanged` (the shard is reported, its output left as it is, the rest planned);
    ``check(footer, shard)`` raises ValueError for a shard that cannot run.
    """
    done = {
        n: m for n, m in markers.items() if n in inputs
    }  # markers of shards no longer in the input are not ours to judge
    mismatched = sorted(n for n, m in done.items() if m.fingerprint != fingerprint)
    if mismatched and not redo_mismatched:
        other = done[mismatched[0]].fingerprint or "none (written before fingerprints)"
        raise FingerprintMismatch(
            f"{stage}: {output_url} holds {len(mismatched)} shard(s) written with another configuration "
            f"(fingerprint {other}; this run's is {fingerprint}), e.g. {mismatched[0]}. Reusing them would mix two "
            "configurations in one dataset. Write to a new --output, restore the old configuration, or pass "
            "--redo-mismatched to write those shards again with this one."
        )
    changed, refused = [], {}
    for name, marker in sorted(done.items()):
        try:
            if name not in mismatched and stale(name, marker):
                changed.append(name)
        except ShardChanged as err:
            refused[name] = str(err)
    kept = {n: m for n, m in done.items() if n not in mismatched and n not in changed and n not in refused}
    plan = Plan(inputs, kept, redo=mismatched + changed, unreadable=dict(refused))
    plan.rows = {n: m.input_rows for n, m in plan.done.items()}
    left = [s for n, s in inputs.items() if n not in plan.done and n not in refused]
    misfits: dict[str, str] = {}
    footers = read_footers(fs, [(s.path, s.size) for s in left])
    for shard in left:
        footer = footers[shard.path]
        if isinstance(footer, str):
            plan.unreadable[shard.name] = f"unreadable {what}: {footer}"
            continue
        try:
            if check:
                check(footer, shard)
        except ValueError as err:
            misfits[shard.name] = str(err)
            continue
        plan.todo.append(shard)
        plan.rows[shard.name] = footer.num_rows
    if misfits and not plan.todo:  # a mapping or schema that fits no shard: fail fast
        raise ValueError(f"{stage}: no {what} fits {fits}: {next(iter(misfits.values()))}")
    plan.unreadable.update(misfits)
    return plan
