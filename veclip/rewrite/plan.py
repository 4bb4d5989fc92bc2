"""Planning a rewrite run: what is done, what is left, and whether the inputs can run.

Everything here costs O(shards / parallelism) requests, not one per shard in
series, because at 30k shards on S3 serial I/O is tens of minutes:

* the input folder is listed once (sizes come with the listing);
* done shards come from the output's marker manifest plus the markers it lacks,
  fetched concurrently (:meth:`ShardStore.markers`); their row counts come from
  their markers, checked against the input sizes in the listing;
* only the shards left to do have their Parquet footers read, as the last
  64 KiB of each file, all in one concurrent ``cat_ranges`` call.

A shard whose footer cannot be read (truncated, not Parquet) is recorded in
``_failed/`` and the others run; a column mapping or schema that fits none of
the shards left stops the run before any engine starts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from veclip import schema
from veclip.rewrite.config import RewriteConfig
from veclip.storage import PARQUET, Location, ShardStore, list_file_entries, no_shards, output_shard_name, read_footers

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
    done: dict[str, dict]  # output name -> its marker
    todo: list[InputShard] = field(default_factory=list)
    input_rows: dict[str, int] = field(default_factory=dict)  # shards done or to do
    unreadable: dict[str, str] = field(default_factory=dict)  # output name -> why its footer could not be read
    redo: list[str] = field(default_factory=list)  # done shards of another fingerprint, to write again


def list_inputs(location: Location) -> dict[str, InputShard]:
    shards = [InputShard(e["name"], int(e["size"])) for e in list_file_entries(location) if e["name"].endswith(PARQUET)]
    by_name = {s.name: s for s in shards}
    if len(by_name) != len(shards):
        raise ValueError(f"rewrite: input shards in {location.url} map to the same output name; rename them")
    return by_name


def plan_run(config: RewriteConfig, options, fingerprint: str, redo_mismatched: bool = False) -> Plan:
    source = Location(config.input, options)
    with ThreadPoolExecutor(2) as pool:  # two long paginated listings: at once, not one after the other
        listing = pool.submit(list_inputs, source)
        done = ShardStore(Location(config.output, options)).markers(save_manifest=True)  # the caller holds the lease
        inputs = listing.result()
    if not inputs:
        raise no_shards("rewrite", config.input)
    done = {n: m for n, m in done.items() if n in inputs}  # markers of shards no longer in the input are not ours to judge
    plan = Plan(inputs, done)
    mismatched = sorted(n for n, m in done.items() if m.get("fingerprint") != fingerprint)
    if mismatched and not redo_mismatched:
        other = done[mismatched[0]].get("fingerprint") or "none (written before fingerprints)"
        raise FingerprintMismatch(
            f"rewrite: {config.output} holds {len(mismatched)} shard(s) written with another configuration "
            f"(fingerprint {other}; this run's is {fingerprint}), e.g. {mismatched[0]}. Reusing them would mix two "
            "configurations in one dataset. Write to a new --output, restore the old configuration, or pass "
            "--redo-mismatched to write those shards again with this one."
        )
    plan.redo = mismatched
    for name in mismatched:
        del plan.done[name]
    for name, marker in plan.done.items():
        plan.input_rows[name] = marker.get("rows_in", marker["rows"] + marker["quarantined"])
        recorded = marker.get("input_size")
        if recorded is not None and recorded != inputs[name].size:
            raise RuntimeError(
                f"rewrite: input shard {inputs[name].path} changed after its output was written "
                f"({recorded} bytes then, {inputs[name].size} now); remove _done/{name}.json to write it again"
            )

    left = [s for n, s in inputs.items() if n not in plan.done]
    mismatch: dict[str, str] = {}
    footers = read_footers(source.fs, [(s.path, s.size) for s in left])
    for shard in left:
        footer = footers[shard.path]
        if isinstance(footer, str):
            plan.unreadable[shard.name] = f"unreadable input shard: {footer}"
            continue
        try:
            schema.check_input_schema(config.columns.apply_to_footer(footer), shard.path)
        except ValueError as err:
            mismatch[shard.name] = str(err)
            continue
        plan.todo.append(shard)
        plan.input_rows[shard.name] = footer.num_rows
    if mismatch and not plan.todo:  # a mapping or schema that fits no shard: fail fast
        raise ValueError(f"rewrite: no input shard fits the column mapping {config.columns}: {next(iter(mismatch.values()))}")
    plan.unreadable.update(mismatch)
    return plan
