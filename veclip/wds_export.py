"""``veclip webdataset``: a dataset with its captions -> WebDataset tar shards.

What open_clip_train (``--dataset-type webdataset``), the DataComp tooling and any webdataset loader
train on, without a converter. One tar per image shard (same stem), each sample three members::

    <key>.jpg   the image's bytes as stored (.png, .webp when they are such)
    <key>.txt   the chosen caption (``--caption``; ``--fallback`` when that one is empty)
    <key>.json  the key, URL and size, every caption column with its provenance and flags, and the
                source's own .json fields when the rows were imported from a WebDataset

A sample's key is the row's key percent-encoded (``%``, ``.`` and ``/``: distinct keys stay distinct); a row
with an empty key or a NUL in it is left out and counted. ``sizes.json`` beside the tars (open_clip_train reads
it for the sample count); the settings are recorded under ``.veclip/`` and a rerun with others is refused.
A tar is written whole (built locally, then moved into place), so a rerun skips the tars already there and
a killed run leaves no partial one. The input may be a caption output (its tables joined to their images by
key) with more caption outputs added (``--add-captions``), as for training.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from veclip import schema
from veclip.command import Command, Flag, Said
from veclip.dataset import open_dataset, read_shard_batches
from veclip.shards.layout import CURRENT, RECORDS_DIR
from veclip.storage import Location, StorageOptions, read_json, refuse_overlap, write_json

SIZES_FILE = "sizes.json"  # {tar name: samples}, open_clip_train's convention
SETTINGS_FILE = f"{RECORDS_DIR}/webdataset.json"  # the settings the tars were written with (a rerun must match)
KEY_ENCODING = "percent-v1"  # how a row's key becomes a sample's (recorded: another would mix two namings)
SKIPPED_COLUMNS = (schema.IMAGE,)  # in the sample's own member, not its .json


@dataclass(frozen=True)
class WebDatasetConfig:
    input: str = ""
    """a dataset folder or s3:// prefix, or a caption output (joined to its images)"""
    output: str = ""
    """the folder or prefix for the tars"""
    caption: str = schema.VECAP
    """the column whose text goes in <key>.txt (a list column: its first text)"""
    fallback: str = schema.ALT_TEXT
    """the column used when ``caption`` is empty; "": leave such rows out"""
    add_captions: tuple[str, ...] = ()
    """more caption outputs of the same input, joined by key"""


@dataclass
class WebDatasetSummary:
    tars_written: int = 0
    tars_skipped: int = 0  # already there from an earlier run
    samples: int = 0
    from_fallback: int = 0
    left_out: Counter = field(default_factory=Counter)  # rows with no caption to write, by why

    def render(self, config: WebDatasetConfig) -> str:
        left = ", ".join(f"{n} {why}" for why, n in self.left_out.items()) or "none"
        return (
            f"webdataset: {self.tars_written} tars written, {self.tars_skipped} already there; {self.samples} samples "
            f"({self.from_fallback} captioned from {config.fallback or '-'} where {config.caption} was empty); "
            f"left out: {left}\n  open_clip_train: --dataset-type webdataset --train-data "
            f"'{config.output}/{{...}}.tar' (sample counts in {SIZES_FILE})"
        )


def _text(value) -> str:
    if isinstance(value, list):
        value = next((v for v in value if v and v.strip()), None)
    return value.strip() if isinstance(value, str) else ""


def image_extension(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


KEY_ESCAPES = {"%": "%25", ".": "%2E", "/": "%2F"}  # "%" first: the encoding is injective


def member_key(key: str) -> str:
    """A webdataset key: no dot (a sample's extension starts at the first one) and no slash, percent-encoded so
    that distinct keys stay distinct (``a/b``, ``a_b`` and ``a.b`` are three samples)."""
    return "".join(KEY_ESCAPES.get(c, c) for c in key)


def unusable_key(key) -> str | None:
    """Why a row's key cannot name a sample (None: it can): an empty key would make a member called ``.jpg``,
    a NUL ends a tar member's name."""
    if key is None or str(key) == "":
        return "empty key"
    return "key with a NUL character" if "\0" in str(key) else None


def sample_json(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in SKIPPED_COLUMNS and k != schema.SOURCE_JSON}
    if row.get(schema.SOURCE_JSON):
        try:
            out["source"] = json.loads(row[schema.SOURCE_JSON])
        except ValueError:
            out["source"] = row[schema.SOURCE_JSON]
    return out


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """``data`` as the member ``name`` (WebDataset's samples are members sharing a key)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(rows, path: str, config: WebDatasetConfig, summary: WebDatasetSummary) -> int:
    """The shard's rows (batches of dicts) as one local tar; the samples written."""
    written = 0
    with tarfile.open(path, "w") as tar:
        for batch in rows:
            for row in batch:
                text = _text(row.get(config.caption))
                if not text and config.fallback:
                    text = _text(row.get(config.fallback))
                    summary.from_fallback += bool(text)
                if not text:
                    summary.left_out[f"no {config.caption} or {config.fallback or 'fallback'}"] += 1
                    continue
                if not row.get(schema.IMAGE):
                    summary.left_out["no image"] += 1
                    continue
                if why := unusable_key(row.get(schema.KEY)):
                    summary.left_out[why] += 1
                    continue
                key = member_key(str(row[schema.KEY]))
                add_tar_member(tar, f"{key}.{image_extension(row[schema.IMAGE])}", row[schema.IMAGE])
                add_tar_member(tar, f"{key}.txt", text.encode())
                add_tar_member(tar, f"{key}.json", json.dumps(sample_json(row), default=str).encode())
                written += 1
    return written


def export_webdataset(config: WebDatasetConfig, options: StorageOptions | None = None, log=print) -> WebDatasetSummary:
    options = options or StorageOptions()
    refuse_overlap("webdataset", config.output, [config.input, *config.add_captions], options)
    dataset = open_dataset(config.input, options, config.add_captions, stage="webdataset")
    out = Location(config.output, options)
    _hold_settings(out, config)
    sizes_path = out.join(SIZES_FILE)
    sizes = read_json(out.fs, sizes_path) or {}
    summary = WebDatasetSummary()
    for n, shard in enumerate(dataset.shards, 1):
        name = posixpath.basename(shard.path).rsplit(".", 1)[0] + ".tar"
        if name in sizes and out.fs.exists(out.join(name)):
            summary.tars_skipped += 1
            continue
        with tempfile.TemporaryDirectory(prefix="veclip-wds-") as tmp:
            local = posixpath.join(tmp, name)
            batches = (b.to_pylist() for b in read_shard_batches(dataset, shard))
            count = write_tar(batches, local, config, summary)
            work = out.join(CURRENT.work_dir("webdataset"), name)
            out.fs.makedirs(posixpath.dirname(work), exist_ok=True)  # a local folder; nothing on S3
            out.fs.put_file(local, work)
            out.fs.mv(work, out.join(name))  # whole, or not at all
        sizes[name] = count
        write_json(out.fs, sizes_path, sizes)  # after each tar: a killed run's tars are counted
        summary.tars_written += 1
        summary.samples += count
        log(f"webdataset: [{n}/{len(dataset.shards)}] {name}: {count} samples")
    return summary


def _hold_settings(out: Location, config: WebDatasetConfig) -> None:
    """Record what the tars are written with; refuse a rerun with other settings (its tars would mix two
    captions, or two key namings, under one sizes.json)."""
    settings = {
        "caption": config.caption,
        "fallback": config.fallback,
        "add_captions": list(config.add_captions),
        "key_encoding": KEY_ENCODING,
    }
    path = out.join(SETTINGS_FILE)
    held = read_json(out.fs, path)
    if held is None and out.fs.exists(out.join(SIZES_FILE)):
        held = {"key_encoding": "underscores (before percent-v1)"}  # tars from before settings were recorded
    if held is not None and held != settings:
        changed = ", ".join(f"{k}: {held.get(k)!r} then, {v!r} now" for k, v in settings.items() if held.get(k) != v)
        raise ValueError(
            f"webdataset: {config.output} holds tars written with other settings ({changed}); export to a new "
            "output, or remove this one to write it again"
        )
    if held is None:
        out.fs.makedirs(out.join(RECORDS_DIR), exist_ok=True)  # a local folder; nothing on S3
        write_json(out.fs, path, settings)


COMMAND = Command(
    "webdataset",
    "write a dataset and its captions as WebDataset tars (image, .txt caption, .json of every caption)",
    WebDatasetConfig,
    lambda config, options, run=None: Said(export_webdataset(config, options).render(config)),
    flags=(
        Flag("input", required=True, metavar="URL"),
        Flag("output", aliases=("--out",), required=True, metavar="URL"),
        "caption",
        "fallback",
        Flag("add_captions", metavar="URL"),
    ),
)
