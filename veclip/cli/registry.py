"""The commands ``veclip`` runs, by name: each declared beside its stage (:class:`veclip.command.Command`)."""

from __future__ import annotations

import functools
import importlib

from veclip.cli.flags import checked_command_args, parse_command_args
from veclip.command import Command, Said

# Each command's name and where it is declared, in the order ``veclip --help`` and docs/stages.md list them.
# Each module is light to import (no torch, Ray or vLLM: a stage's run imports those when it runs), and a
# command line imports only the one it names.
DECLARED = {
    "sample": "veclip.world.generate:COMMAND",
    "validate": "veclip.validate:COMMAND",
    "import": "veclip.ingest:COMMAND",
    "webdataset": "veclip.wds_export:COMMAND",
    "rewrite": "veclip.rewrite.config:COMMAND",
    "plan": "veclip.plan:COMMAND",
    "train": "veclip.train.config:COMMAND",
    "score": "veclip.score.config:COMMAND",
    "export": "veclip.train.config:EXPORT_COMMAND",
    "eval": "veclip.eval.config:COMMAND",
    "show": "veclip.show:COMMAND",
    "status": "veclip.status:COMMAND",
    "models": "veclip.world.build:COMMAND",
    "pipeline": "veclip.pipeline:COMMAND",
    "demo": "veclip.world.demo:COMMAND",
}


@functools.cache
def command(name: str) -> Command:
    if name not in DECLARED:
        raise ValueError(f"no command {name!r}; commands: {sorted(DECLARED)}")
    module, _, attribute = DECLARED[name].partition(":")
    declared = getattr(importlib.import_module(module), attribute)
    if declared.name != name:
        raise RuntimeError(f"{DECLARED[name]} declares {declared.name!r}, not {name!r}")
    return declared


def commands() -> dict[str, Command]:
    """Every command (each module imported: for --help, the command reference and submit's choices)."""
    return {name: command(name) for name in DECLARED}


def submittable() -> frozenset[str]:
    return frozenset(name for name, c in commands().items() if c.submittable)


def parsed_args(name: str, argv: list[str]):
    """A command's config from its arguments, as ``veclip NAME ARGS`` builds it (no I/O, no models)."""
    return parse_command_args(command(name), argv)


def checked_args(name: str, argv: list[str]):
    """A command's config from its arguments, validated as before a run: what ``veclip submit`` and a
    pipeline's steps are checked with before anything starts."""
    return checked_command_args(command(name), argv)


def run_checked_pipeline(config, options=None, log=print) -> int:
    """A pipeline whose every step is first parsed, built and validated by its command, as ``veclip pipeline``
    runs it."""
    from veclip.pipeline import run_pipeline

    return run_pipeline(config, options, log, check=checked_args, submittable=submittable())


def run_pipeline_command(config, options, run=None) -> Said:
    return Said("", run_checked_pipeline(config, options))
