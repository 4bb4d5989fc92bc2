"""The commands ``veclip`` runs, by name: each declared beside its stage (:class:`veclip.command.Command`)."""

from __future__ import annotations

import functools
import importlib

from veclip.cli.flags import checked_command_args, parse_command_args
from veclip.command import Command, Said

# In the order ``veclip --help`` and docs/stages.md list them; each module is light to import (no torch,
# Ray or vLLM: a stage's run imports those when it runs).
DECLARED = (
    "veclip.world.generate:COMMAND",
    "veclip.validate:COMMAND",
    "veclip.ingest:COMMAND",
    "veclip.wds_export:COMMAND",
    "veclip.rewrite.config:COMMAND",
    "veclip.plan:COMMAND",
    "veclip.train.config:COMMAND",
    "veclip.score.config:COMMAND",
    "veclip.train.config:EXPORT_COMMAND",
    "veclip.eval.config:COMMAND",
    "veclip.show:COMMAND",
    "veclip.status:COMMAND",
    "veclip.world.build:COMMAND",
    "veclip.pipeline:COMMAND",
    "veclip.world.demo:COMMAND",
)


@functools.cache
def commands() -> dict[str, Command]:
    found = {}
    for target in DECLARED:
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        found[command.name] = command
    return found


def command(name: str) -> Command:
    if name not in commands():
        raise ValueError(f"no command {name!r}; commands: {sorted(commands())}")
    return commands()[name]


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
