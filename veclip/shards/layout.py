"""The output layout of a sharded stage: every file and folder name, defined here once.

::

    <output>/<name>.parquet                     a shard, written whole (its name follows from its input's)
    <output>/_README.md                         the dataset card (:mod:`veclip.shards.card`), after each run
    <output>/.veclip/quarantine/<name>.parquet  its refused rows, with their reasons (only when there are any)
    <output>/.veclip/done/<name>.parquet.json   its done marker (:class:`~veclip.shards.marker.Marker`), written last
    <output>/.veclip/failed/<name>.parquet.json a shard that kept failing: its error (gone once it is done)
    <output>/.veclip/markers.jsonl              the markers gathered so far: a rerun reads one file, not 30k
    <output>/.veclip/work/attempts/<stage>/...  each try counted before it starts (a killed actor's try included)
    <output>/.veclip/work/<stage>/...           a stage's intermediate shards (the rewrite's visual captions)
    <output>/.veclip/lease.json                 the one writer's lease
    <output>/.veclip/plan.json                  what the current run set out to do (``veclip status`` reads it)
    <output>/.veclip/summary.json               the last run's summary

Only shards sit in the open: Hugging Face ``datasets`` skips ``.``-prefixed folders, pyarrow's dataset reader
(and pandas) ``.``- and ``_``-prefixed names, and so do veclip's readers. The card is ``_README.md``, not
``README.md``: pyarrow would read a ``README.md`` as a shard. Outputs begun before records moved under
``.veclip/`` keep them beside the shards under ``_`` names (:data:`LEGACY`): they are read, and continued, as
they are.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from veclip.storage import PARQUET, Location

RECORDS_DIR = ".veclip"  # every record of the runs, out of the way of the shards' readers
CARD_FILE = "_README.md"
RECORD_SUFFIX = ".json"  # a marker or failure record: the shard's name plus this

INPUT_SUFFIXES = (PARQUET, ".tar.gz", ".tgz", ".tar", ".csv")


@dataclass(frozen=True)
class Layout:
    """Where an output keeps its records (paths relative to the output)."""

    done: str  # the done markers
    quarantine: str  # the refused rows
    failed: str  # the failure records
    work: str  # attempts and intermediate shards
    manifest: str  # the markers gathered
    lease: str  # the one writer's lease
    plan: str  # the current run's plan
    summary: str  # the last run's summary

    @property
    def attempts(self) -> str:
        return f"{self.work}/attempts"

    def work_dir(self, stage: str) -> str:
        """A stage's intermediate shards, under the output (a sharded layout of their own)."""
        return f"{self.work}/{stage}"


_NAMES = ("done", "quarantine", "failed", "work", "markers.jsonl", "lease.json", "plan.json", "summary.json")
CURRENT = Layout(*(f"{RECORDS_DIR}/{name}" for name in _NAMES))
LEGACY = Layout(*(f"_{name}" for name in _NAMES))


def layout_of(location: Location) -> Layout:
    """The output's layout: :data:`LEGACY` for an output begun before ``.veclip/`` (its ``_`` records and no
    ``.veclip/``), else :data:`CURRENT`. The two never meet in one output, so a stale listing cannot mislead."""
    fs = location.fs
    if fs.exists(location.join(RECORDS_DIR)):
        return CURRENT
    legacy = any(fs.exists(location.join(name)) for name in (LEGACY.plan, LEGACY.done, LEGACY.lease))
    return LEGACY if legacy else CURRENT


def output_shard_name(input_path: str) -> str:
    """The output shard for an input shard: same stem, ``.parquet``.

    ``s3://b/in/00042.tar`` -> ``00042.parquet``; the same input always maps to
    the same output, so reruns overwrite rather than duplicate.
    """
    stem = posixpath.basename(input_path.rstrip("/"))
    for ext in INPUT_SUFFIXES:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return stem + PARQUET


def is_output_folder(names: set[str]) -> bool:
    """Whether a folder's entries are a sharded stage's output (rather than plain input)."""
    return bool(names & {RECORDS_DIR, LEGACY.plan, LEGACY.done, LEGACY.failed, LEGACY.lease})
