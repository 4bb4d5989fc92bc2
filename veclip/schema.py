"""The data contract: the Arrow schemas every stage reads and writes.

Three tables, one place:

* **input** — what users bring: ``key`` (unique string), ``image`` (encoded
  JPEG/PNG/WebP bytes), ``alt_text`` (the web caption, may be null or empty),
  optional ``url``/``width``/``height``; any other column rides along untouched.
* **enriched** — the rewrite stage's output: the input columns plus
  ``vlm_caption``, ``vecap`` and ``rewrites``, each with a provenance struct
  (model, prompt version, engine) so mixed runs stay traceable.
* **clip scores** — the caption gate's output (``veclip score``): per row the
  image–text cosine of each caption slot, with its provenance, and a
  ``<slot>:low_clip_score`` flag on the slots under the gate, which training
  treats as unusable.
* **quarantine** — rows a stage refused: ``key``, ``stage``, ``reason`` (a short
  code), ``detail`` (a human sentence) and the original row's columns.

Users' corpora rarely use our names (img2dataset writes ``jpg``/``caption``),
so every stage takes a :class:`ColumnMap` and renames on read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

KEY = "key"
IMAGE = "image"
ALT_TEXT = "alt_text"
URL = "url"
WIDTH = "width"
HEIGHT = "height"

VLM_CAPTION = "vlm_caption"
VECAP = "vecap"
REWRITES = "rewrites"
CLASSES_FILE = "_classes.json"  # beside an eval set: its class names per label column
REWRITE_FLAGS = "rewrite_flags"  # why a generated column is null or shorter, e.g. "vecap:entities_lost"
CLIP_SCORES = "clip_scores"  # the caption gate's image-text cosine per caption slot (veclip score)
LOW_CLIP_SCORE = "low_clip_score"  # the gate's flag reason: "<slot>:low_clip_score" makes the slot unusable in training

# Where a generated caption came from; one struct column per generated column.
PROVENANCE = pa.struct(
    [
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("engine", pa.string()),
    ]
)


def provenance_column(name: str) -> str:
    """``vecap`` -> ``vecap_provenance``."""
    return f"{name}_provenance"


REQUIRED_INPUT_FIELDS = (
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(IMAGE, pa.binary(), nullable=False),
    pa.field(ALT_TEXT, pa.string()),
)
OPTIONAL_INPUT_FIELDS = (
    pa.field(URL, pa.string()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
)
INPUT_SCHEMA = pa.schema(REQUIRED_INPUT_FIELDS + OPTIONAL_INPUT_FIELDS)
# `veclip import` of a WebDataset keeps each sample's .json whole (DataComp's uid, img2dataset's status,
# sizes, EXIF...): every field, typed as the source wrote it, beside the contract's columns
SOURCE_JSON = "source_json"
IMPORT_SCHEMA = INPUT_SCHEMA.append(pa.field(SOURCE_JSON, pa.string()))

GENERATED_FIELDS = (
    pa.field(VLM_CAPTION, pa.string()),
    pa.field(provenance_column(VLM_CAPTION), PROVENANCE),
    pa.field(VECAP, pa.string()),
    pa.field(provenance_column(VECAP), PROVENANCE),
    pa.field(REWRITES, pa.list_(pa.string())),
    pa.field(provenance_column(REWRITES), PROVENANCE),
    pa.field(REWRITE_FLAGS, pa.list_(pa.string())),
)
ENRICHED_SCHEMA = pa.schema(REQUIRED_INPUT_FIELDS + OPTIONAL_INPUT_FIELDS + GENERATED_FIELDS)


def key_problems(keys: list, shown: int = 3) -> str | None:
    """What is wrong with a shard's keys (nulls, duplicates: rows would swap captions when joined by key),
    naming rows; None when every key is present and unique."""
    nulls = [i for i, k in enumerate(keys) if k is None]
    first: dict = {}
    duplicates = []
    for i, k in enumerate(keys):
        if k is not None and first.setdefault(k, i) != i:
            duplicates.append((k, first[k], i))
    problems = [f"{len(nulls)} null key(s) at rows {nulls[:shown]}"] if nulls else []
    problems += (
        [
            f"{len(duplicates)} duplicate key(s), e.g. "
            + "; ".join(f"{k!r} at rows {a} and {b}" for k, a, b in duplicates[:shown])
        ]
        if duplicates
        else []
    )
    return (
        ", ".join(problems) + ": keys must be present and unique in a shard (veclip validate reports them)"
        if problems
        else None
    )


# The caption slots, defined once: training chooses among them, the gate scores and flags them, by these names.
# What each contract column holds, in a sentence (the dataset card's schema table)
COLUMN_MEANINGS = {
    KEY: "the row's unique id; caption tables join to their images by it",
    IMAGE: "the encoded image (JPEG, PNG or WebP bytes)",
    ALT_TEXT: "the web caption as crawled (may be null or empty)",
    URL: "where the image was fetched from",
    WIDTH: "image width in pixels",
    HEIGHT: "image height in pixels",
    SOURCE_JSON: "the WebDataset sample's .json, whole, as the source wrote it",
    VLM_CAPTION: "the VLM's description of the image (VeCLIP's first step)",
    VECAP: "the VeCLIP caption: the VLM caption fused with the alt-text by an LLM",
    REWRITES: "LaCLIP rewrites of the alt-text by an LLM, in order",
    REWRITE_FLAGS: "why a generated caption is null or unusable, as <slot>:<reason>",
    CLIP_SCORES: "the image-text cosine of each caption slot (veclip score)",
}

SINGLE_CAPTION_COLUMNS = (ALT_TEXT, VECAP, VLM_CAPTION)  # one caption each: one slot per column
CAPTION_COLUMNS = (*SINGLE_CAPTION_COLUMNS, REWRITES)  # REWRITES: one slot per rewrite, "rewrites.<i>", in order
GENERATED_CAPTION_COLUMNS = (VLM_CAPTION, VECAP, REWRITES)  # the ones a rewrite writes

# A score table: one row per input row, in order (a caption table: joined by key like the rewrite's),
# a score per caption slot.
SCORE_FIELDS = (
    pa.field(KEY, pa.string()),
    pa.field(
        CLIP_SCORES,
        pa.struct(
            [pa.field(s, pa.float32()) for s in SINGLE_CAPTION_COLUMNS] + [pa.field(REWRITES, pa.list_(pa.float32()))]
        ),
    ),
    pa.field(
        provenance_column(CLIP_SCORES),
        pa.struct(
            [
                pa.field("model", pa.string()),  # as given: an exported folder, a run or checkpoint, an open_clip name
                pa.field(
                    "weights", pa.string()
                ),  # which weights exactly: a checkpoint folder, a weights file's digest, a tag
                pa.field(
                    "gate", pa.string()
                ),  # the rule that flagged, e.g. "cosine < 0.2 or under the shard's 10th percentile"
            ]
        ),
    ),
    pa.field(REWRITE_FLAGS, pa.list_(pa.string())),
)
SCORE_SCHEMA = pa.schema(SCORE_FIELDS)

QUARANTINE_FIELDS = (
    pa.field(KEY, pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
)
QUARANTINE_SCHEMA = pa.schema(QUARANTINE_FIELDS)


class SchemaError(ValueError):
    """A table does not follow the data contract; the message says what to fix."""


# Physical types we accept for each logical type (large_* variants appear when
# a column passes 2 GB in one chunk, and in files written by other tools).
_COMPATIBLE = {
    pa.string(): (pa.string(), pa.large_string()),
    pa.binary(): (pa.binary(), pa.large_binary()),
    pa.int32(): (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32()),
}


def _type_ok(expected: pa.DataType, found: pa.DataType) -> bool:
    return found in _COMPATIBLE.get(expected, (expected,))


def input_schema_problems(schema: pa.Schema) -> list[str]:
    """Every way ``schema`` breaks the input contract, as sentences (empty if none)."""
    problems = []
    for want in REQUIRED_INPUT_FIELDS:
        if want.name not in schema.names:
            problems.append(
                f"missing required column '{want.name}' ({want.type}); found columns "
                f"{schema.names}. If your data names it differently, pass a column "
                f"mapping such as --columns {want.name}=<your column>"
            )
    for want in REQUIRED_INPUT_FIELDS + OPTIONAL_INPUT_FIELDS:
        if want.name in schema.names:
            found = schema.field(want.name).type
            if not _type_ok(want.type, found):
                problems.append(f"column '{want.name}' has type {found}, expected {want.type}")
    return problems


def check_input_schema(schema: pa.Schema, where: str = "table") -> None:
    problems = input_schema_problems(schema)
    if problems:
        raise SchemaError(f"{where}: " + "; ".join(problems))


@dataclass(frozen=True)
class ColumnMap:
    """Which of the user's columns plays each role, e.g. ``image=jpg,alt_text=caption``.

    A role left unset is expected under its own name.
    """

    key: str = KEY
    image: str = IMAGE
    alt_text: str = ALT_TEXT
    url: str = URL
    width: str = WIDTH
    height: str = HEIGHT

    @classmethod
    def parse(cls, spec: str | None) -> ColumnMap:
        """Parse ``role=column,role=column``; an empty spec is the identity."""
        if not spec:
            return cls()
        roles = {f.name for f in fields(cls)}
        mapping = {}
        for item in spec.split(","):
            role, sep, column = (part.strip() for part in item.partition("="))
            if not sep or not role or not column:
                raise ValueError(f"bad column mapping item {item!r}: expected role=column, e.g. image=jpg")
            if role not in roles:
                raise ValueError(f"unknown role {role!r} in column mapping; roles are {sorted(roles)}")
            mapping[role] = column
        return cls(**mapping)

    def renames(self) -> dict[str, str]:
        """Source column -> contract column, for the roles that differ."""
        return {getattr(self, f.name): f.name for f in fields(self) if getattr(self, f.name) != f.name}

    def source_columns(self, roles: list[str]) -> list[str]:
        return [getattr(self, role) for role in roles]

    def apply(self, table: pa.Table) -> pa.Table:
        """Rename the user's columns to the contract's names; other columns are kept."""
        renames = {src: dst for src, dst in self.renames().items() if src in table.column_names}
        clashes = [dst for src, dst in renames.items() if dst in table.column_names and dst not in renames]
        if clashes:
            raise SchemaError(
                f"column mapping would rename onto existing column(s) {clashes}; drop or rename those columns first"
            )
        return table.rename_columns([renames.get(name, name) for name in table.column_names])

    def apply_to_footer(self, footer: pa.Schema | pq.FileMetaData) -> pa.Schema:
        """A shard's schema (from its footer: no data read) under the contract's names. A mapping that names
        a column the shard does not have is refused: it would read the wrong column or none."""
        arrow = footer.schema.to_arrow_schema() if isinstance(footer, pq.FileMetaData) else footer
        missing = [f"{dst}={src}" for src, dst in self.renames().items() if src not in arrow.names]
        if missing:
            raise SchemaError(
                f"the column mapping {','.join(missing)} names no column of this shard (its columns: "
                f"{', '.join(arrow.names)}); fix --columns"
            )
        return self.apply(arrow.empty_table()).schema

    def __str__(self) -> str:
        return ",".join(f"{dst}={src}" for src, dst in self.renames().items()) or "(identity)"


def quarantine_table(rows: list[dict], stage: str, original_schema: pa.Schema | None = None) -> pa.Table:
    """Build a quarantine table from dicts holding ``key``, ``reason``, ``detail`` and original columns."""
    extra = [f for f in (original_schema or pa.schema([])) if f.name not in QUARANTINE_SCHEMA.names]
    schema = pa.schema(list(QUARANTINE_FIELDS) + [f.with_nullable(True) for f in extra])
    rows = [{**row, "stage": stage} for row in rows]
    return pa.Table.from_pylist(rows, schema=schema)
