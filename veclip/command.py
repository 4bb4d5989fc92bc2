"""A command, declared once beside its stage: its config class, presets, the fields it takes as flags, its run
options and how it runs. The command line (:mod:`veclip.cli`), ``veclip submit``, a pipeline's checks,
``--dry-run`` and docs/stages.md's command block are all derived from this declaration: a flag's type and
choices from its field's annotation (``Literal[...]`` for a choice), its help from the field's documentation,
its default from the preset.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Result(Protocol):
    """What a command's run returns: the lines it prints and its exit code."""

    exit_code: int

    def render(self) -> str: ...


@dataclass(frozen=True)
class Said:
    """A result that is its lines (a command whose work returns nothing more to read)."""

    text: str
    exit_code: int = 0

    def render(self) -> str:
        return self.text


@dataclass(frozen=True)
class Flag:
    """A config (or run option) field taken as a flag."""

    field: str  # dotted, e.g. captions.mode
    name: str = ""  # "--caption-mode"; a bare word is positional; "": --<the field's last part, dashed>
    aliases: tuple[str, ...] = ()  # older spellings that still work, e.g. --out
    required: bool = False
    metavar: str | None = None  # the value's placeholder (default: the field's last part, upper case)
    parse: Callable[[str], Any] | None = None  # the flag's text -> the field's value, e.g. a comma list
    help: str = ""  # only where the command reads the field otherwise than its documentation says

    @property
    def spelling(self) -> str:
        return self.name or "--" + self.field.rpartition(".")[2].replace("_", "-")

    @property
    def positional(self) -> bool:
        return not self.spelling.startswith("-")


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b`` -> ``("a", "b")``: a tuple field typed as one comma-separated flag."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: type  # the config dataclass it builds
    run: Callable | str  # (config, StorageOptions, run options) -> Result; "module:function" where heavy
    flags: tuple[Flag | str, ...] | None = None  # the fields taken as flags (None: every top-level field)
    options: type | None = None  # its run options, a dataclass: each field a flag, none in the config
    run_flags: tuple[Flag | str, ...] | None = None  # how the run options are spelled (None: each as --field)
    presets: Callable[[str], Any] | None = None  # name -> config (None: only the class's defaults)
    preset_help: str = ""
    # (preset, config file, fields, overrides) -> config, for a build that does more than layer them
    builder: Callable | None = None
    submittable: bool = False  # runs as a Ray job (veclip submit, a pipeline's --submit)
    set_example: str = ""

    def preset(self, name: str = "default"):
        if self.presets:
            return self.presets(name)
        if name != "default":
            raise ValueError(f"unknown preset {name!r}: veclip {self.name} has only its defaults")
        return self.config()

    @property
    def flag_list(self) -> tuple[Flag, ...]:
        names = self.flags if self.flags is not None else [f.name for f in dataclasses.fields(self.config)]
        return tuple(f if isinstance(f, Flag) else Flag(f) for f in names)

    @property
    def option_flags(self) -> tuple[Flag, ...]:
        if not self.options:
            return ()
        names = self.run_flags if self.run_flags is not None else leaf_fields(self.options)
        return tuple(f if isinstance(f, Flag) else Flag(f) for f in names)

    @property
    def configurable(self) -> bool:
        """Whether --config and --set apply: it has presets, or fields no flag sets."""
        flagged = {flag.field for flag in self.flag_list}
        return self.presets is not None or any(key not in flagged for key in leaf_fields(self.config))

    def runner(self) -> Callable:
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


def leaf_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of a config class's fields, nested dataclasses opened (a column mapping is one field)."""
    from veclip.schema import ColumnMap

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and hint is not ColumnMap:
            out += leaf_fields(hint, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def field_type(cls: type, dotted: str) -> tuple[Any, str]:
    """A dotted field's annotation and documentation."""
    from veclip.config import field_docs

    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    docs = (field_docs(klass).get(leaf) for klass in cls.__mro__ if dataclasses.is_dataclass(klass))
    return typing.get_type_hints(cls)[leaf], next((doc for doc in docs if doc), "")


@dataclass(frozen=True)
class DryRun:
    """The run option of a command that can show its plan instead of running."""

    dry_run: bool = False
    """validate and print the plan (shards, rows, fingerprint, what a rerun skips, pools or workers and their
    resources); start nothing, write nothing"""


@dataclass(frozen=True)
class ShardedRun(DryRun):
    """Every sharded stage's run options (rewrite, score), spelled in :data:`SHARDED_RUN_FLAGS`' order."""

    redo_mismatched: bool = False
    """write again the shards an earlier run wrote with another configuration (fingerprint) into this output"""
    take_over_lease: bool = False
    """take the output from another run's lease (only when that run is surely gone)"""


SHARDED_RUN_FLAGS = ("redo_mismatched", "take_over_lease", "dry_run")
