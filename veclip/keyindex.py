"""Duplicate keys across a whole dataset with bounded memory.

300M keys do not fit in a dict. Keys are hash-partitioned as they are read:
each partition's ``(key, shard, row)`` triples are spilled to a local Arrow
file, and at the end one partition at a time is loaded and sorted, so memory
holds about ``total keys / partitions`` keys. A key's duplicates all land in
the same partition, so nothing is missed. With one partition nothing is
spilled.
"""

from __future__ import annotations

import math
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int32()), ("row", pa.int64())])


@dataclass(frozen=True)
class Duplicate:
    key: str
    shard: int  # the later occurrence
    row: int
    first_shard: int  # the first occurrence, in (shard, row) order
    first_row: int


class KeyIndex:
    """Add each shard's keys in order with :meth:`add`, then :meth:`duplicates`."""

    def __init__(self, expected_keys: int, max_keys_in_memory: int = 20_000_000):
        self.partitions = max(1, math.ceil(expected_keys / max_keys_in_memory))
        self._dir = tempfile.TemporaryDirectory(prefix="veclip-keys-") if self.partitions > 1 else None
        self._writers: list = []
        self._memory: list[pa.RecordBatch] = []
        if self._dir:
            for p in range(self.partitions):
                sink = pa.OSFile(str(Path(self._dir.name) / f"{p}.arrow"), "wb")
                self._writers.append((sink, pa.ipc.new_stream(sink, _SCHEMA)))

    def add(self, shard: int, keys: pa.Array) -> None:
        """The non-null keys of one shard, with their row numbers."""
        rows = np.arange(len(keys), dtype=np.int64)
        valid = ~np.asarray(keys.is_null())
        keys, rows = pc.filter(keys, pa.array(valid)).cast(pa.string()), rows[valid]
        batch = pa.record_batch([keys, pa.array(np.full(len(rows), shard, np.int32)), pa.array(rows)], schema=_SCHEMA)
        if not self._dir:
            self._memory.append(batch)
            return
        # crc32 is stable across processes (Python's hash() is not); one pass per shard
        part = np.fromiter((zlib.crc32(k.encode()) % self.partitions for k in keys.to_pylist()), np.int64, len(rows))
        for p, (_, writer) in enumerate(self._writers):
            chosen = part == p
            if chosen.any():
                writer.write_batch(batch.filter(pa.array(chosen)))

    def _partitions(self):
        if not self._dir:
            yield pa.Table.from_batches(self._memory, schema=_SCHEMA)
            return
        for sink, writer in self._writers:
            writer.close()
            sink.close()
        for p in range(self.partitions):
            with pa.memory_map(str(Path(self._dir.name) / f"{p}.arrow")) as source:
                yield pa.ipc.open_stream(source).read_all()

    def duplicates(self) -> list[Duplicate]:
        """Every later occurrence of a key, with its first, in (shard, row) order."""
        found = []
        for table in self._partitions():
            if table.num_rows < 2:
                continue
            table = table.sort_by([("key", "ascending"), ("shard", "ascending"), ("row", "ascending")])
            keys = table.column("key").combine_chunks()
            shards, rows = table.column("shard").to_numpy(), table.column("row").to_numpy()
            same = np.concatenate(
                [[False], pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False)]
            )
            index = np.arange(len(keys))
            first = np.maximum.accumulate(np.where(same, 0, index))  # where each run of one key starts
            for i in np.flatnonzero(same):
                found.append(
                    Duplicate(keys[i].as_py(), int(shards[i]), int(rows[i]), int(shards[first[i]]), int(rows[first[i]]))
                )
        if self._dir:
            self._dir.cleanup()
        return sorted(found, key=lambda d: (d.shard, d.row))
