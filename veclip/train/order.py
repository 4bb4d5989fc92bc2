"""The order training reads its rows in: a pure function of (seed, epoch, worker count).

Read units are the Parquet row groups of the finished shards (known from their
footers, read once by the driver), a group bigger than twice ``UNIT_BYTES`` cut
into row ranges of about that size (a 10,000-row shard as pyarrow or pandas
write it is one ~1 GB group, and a window holds its units); where there are fewer row groups than
workers (a dataset in one file of one row group, as pandas writes it), each
group is cut into row ranges (:func:`split_units`), so any dataset trains on any
worker count. Every epoch the units are permuted by
``(seed, epoch)`` and dealt round-robin to the workers; each worker reads its
units in windows of ``window_units`` and takes each window's rows in an order
permuted by ``(seed, epoch, rank, window)``. A worker's place in its epoch is
therefore just a :class:`Position` (window, offset): a checkpoint records it and
a resumed worker starts reading exactly there, so it trains on the rows an
uninterrupted run would have trained on next.

An epoch ends for all workers when the first one runs out of rows (they must
take the same number of steps); with many units per worker that leaves at most
a few row groups' worth unread per epoch, a different few each epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from veclip.parquet_files import ROW_GROUP_TARGET_BYTES
from veclip.storage import read_footers

UNREADABLE_FOOTER = "unreadable Parquet footer"
UNIT_BYTES = ROW_GROUP_TARGET_BYTES  # veclip writes row groups of this size: each is one unit


@dataclass(frozen=True)
class ReadUnit:
    path: str
    row_group: int
    rows: int  # rows of the unit: the row group's, or a range of them
    first_row: int = 0  # of the unit, in its shard
    captions: tuple[
        str, ...
    ] = ()  # caption tables whose rows first_row.. are this row group's, in order (veclip.dataset)
    offset: int = 0  # a row range: its first row within the row group (0: the group from its start)


@dataclass(frozen=True)
class Position:
    """The next row a worker reads: row ``offset`` of window ``window`` (permuted order) in ``epoch``."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def read_units(
    fs, files: list[tuple[str, int]], captions: dict[str, tuple[str, ...]] | None = None
) -> tuple[list[ReadUnit], dict[str, str]]:
    """The row groups of ``(path, size)`` shards, in (path, row group) order, and
    ``{path: error}`` for shards whose footer can't be read (left out).
    ``captions``: each shard's caption tables, for caption outputs."""
    footers = read_footers(fs, files)
    units, unreadable = [], {}
    for path, _ in sorted(files):
        footer = footers[path]
        if isinstance(footer, str):
            unreadable[path] = footer
            continue
        first = 0
        for g in range(footer.num_row_groups):
            group = footer.row_group(g)
            if group.num_rows:
                unit = ReadUnit(path, g, group.num_rows, first, (captions or {}).get(path, ()))
                parts = math.ceil(group.total_byte_size / UNIT_BYTES) if group.total_byte_size > 2 * UNIT_BYTES else 1
                units += _row_ranges(unit, parts)
            first += group.num_rows
    return units, unreadable


def _row_ranges(unit: ReadUnit, parts: int) -> list[ReadUnit]:
    """``unit`` cut into ``parts`` row ranges of (nearly) equal size."""
    bounds = np.linspace(0, unit.rows, min(parts, unit.rows) + 1).astype(int)
    return [
        replace(unit, rows=int(end - start), first_row=unit.first_row + int(start), offset=unit.offset + int(start))
        for start, end in zip(bounds[:-1], bounds[1:])
    ]


def split_units(units: list[ReadUnit], workers: int) -> list[ReadUnit]:
    """``units`` as they are when every worker gets one; else each row group cut into the same number of
    row ranges, enough for every worker (a deterministic function of the footers and the worker count)."""
    if len(units) >= workers or not units:
        return units
    parts = -(-workers // len(units))
    return [r for unit in units for r in _row_ranges(unit, parts)]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


def worker_windows(
    units: list[ReadUnit], seed: int, epoch: int, rank: int, world: int, window_units: int
) -> list[list[ReadUnit]]:
    """This worker's units for ``epoch``, grouped into the windows it reads in turn."""
    order = _rng(seed, epoch, 0).permutation(len(units))
    mine = [units[i] for i in order[rank::world]]
    return [mine[i : i + window_units] for i in range(0, len(mine), window_units)]


def window_order(rows: int, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    """The order in which a window's rows (its units' rows, concatenated) are trained on."""
    return _rng(seed, epoch, 1, rank, window).permutation(rows)
