"""The output layout of a sharded stage: every file and folder name, defined here once.

::

    <output>/<name>.parquet              a shard, written whole (its name follows from its input's)
    <output>/_quarantine/<name>.parquet  its refused rows, with their reasons (only when there are any)
    <output>/_done/<name>.parquet.json   its done marker (:class:`~veclip.shards.marker.Marker`), written last
    <output>/_failed/<name>.parquet.json a shard that kept failing: its error (gone once it is done)
    <output>/_markers.jsonl              the markers gathered so far: a rerun reads one file, not 30k
    <output>/_work/attempts/<stage>/...  each try counted before it starts (a killed actor's try included)
    <output>/_work/<stage>/...           a stage's intermediate shards (the rewrite's visual captions)
    <output>/_lease.json                 the one writer's lease
    <output>/_plan.json                  what the current run set out to do (``veclip status`` reads it)
    <output>/_summary.json               the last run's summary

Names starting with ``_`` or ``.`` are never shards: readers list past them.
"""

from __future__ import annotations

import posixpath

from veclip.storage import PARQUET

DONE_DIR = "_done"
QUARANTINE_DIR = "_quarantine"
FAILED_DIR = "_failed"
WORK_DIR = "_work"
ATTEMPTS_DIR = f"{WORK_DIR}/attempts"
MANIFEST_FILE = "_markers.jsonl"
LEASE_FILE = "_lease.json"
PLAN_FILE = "_plan.json"
SUMMARY_FILE = "_summary.json"
RECORD_SUFFIX = ".json"  # a marker or failure record: the shard's name plus this

INPUT_SUFFIXES = (PARQUET, ".tar.gz", ".tgz", ".tar", ".csv")


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


def work_dir(stage: str) -> str:
    """A stage's intermediate shards, under the output (a sharded layout of their own)."""
    return f"{WORK_DIR}/{stage}"


def is_output_folder(names: set[str]) -> bool:
    """Whether a folder's entries are a sharded stage's output (rather than plain input)."""
    return bool(names & {PLAN_FILE, DONE_DIR, FAILED_DIR, LEASE_FILE})
