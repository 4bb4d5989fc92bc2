"""A command's flags, derived from its declaration (:class:`veclip.command.Command`), and its config built
from them: a preset, then ``--config FILE``, then the flags, then ``--set KEY=VALUE`` (no I/O, no models)."""

from __future__ import annotations

import argparse
import types
import typing

from veclip import schema
from veclip.command import Command, Flag, field_type
from veclip.config import build, describe
from veclip.storage import StorageOptions

OPTION = "option__"  # the argparse dest of a run option, apart from the config's fields


def storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (defaults: the standard AWS chain, AWS_ENDPOINT_URL)")
    group.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    group.add_argument("--s3-region", help="S3 region")
    group.add_argument("--s3-anon", action="store_true", help="anonymous access (public buckets)")


def storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.s3_endpoint, region=args.s3_region, anon=args.s3_anon)


def _column_map(spec: str) -> schema.ColumnMap:
    try:
        return schema.ColumnMap.parse(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _shown(value) -> str:
    """A preset's value as the help shows it; empty when there is nothing to show."""
    if value in (None, "", False, ()) or isinstance(value, schema.ColumnMap):
        return ""
    return f" (default {','.join(map(str, value)) if isinstance(value, tuple) else value})"


def add_field_flag(parser, flag: Flag, cls: type, default, dest: str) -> None:
    """One flag from its field: type and choices from the annotation, help from its documentation."""
    hint, doc = field_type(cls, flag.field)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict = {"help": (flag.help or doc) + _shown(default)}
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = typing.get_args(hint)
    elif hint is bool:
        kwargs.update(action="store_true", default=None)
    elif flag.parse:
        kwargs.update(type=flag.parse, metavar=flag.metavar or flag.field.rpartition(".")[2].upper())
    elif typing.get_origin(hint) is tuple:
        kwargs.update(action="append", metavar=flag.metavar or "VALUE")
    elif hint is schema.ColumnMap:
        kwargs.update(type=_column_map, metavar=flag.metavar or "COLUMNS")
    else:
        short = {int: "N", float: "X"}.get(hint, flag.field.rpartition(".")[2].upper().replace("_", "-"))
        kwargs.update(type=hint if hint in (int, float) else str, metavar=flag.metavar or short)
    if flag.positional:
        kwargs.pop("default", None)
        parser.add_argument(dest, **kwargs)
    else:
        parser.add_argument(flag.spelling, *flag.aliases, dest=dest, required=flag.required, **kwargs)


def _config_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    group = parser.add_argument_group(f"configuration (every field: veclip config show {command.name})")
    if command.presets:
        group.add_argument("--preset", default="default", metavar="P", help=command.preset_help)
    if command.configurable:
        group.add_argument("--config", metavar="FILE", help="a JSON/YAML file of config fields")
        example = f", e.g. {command.set_example}" if command.set_example else ""
        group.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a field{example} (repeatable)"
        )
    group.add_argument(
        "--verbose", action="store_true", help="print Ray's worker output, Ray Data's progress and vLLM's logs here too"
    )


def add_command_parser(sub, command: Command) -> argparse.ArgumentParser:
    parser = sub.add_parser(command.name, help=command.help, description=command.help)
    defaults = dict((key, value) for key, value, _ in describe(command.preset()))
    flags = [(flag, command.config, defaults.get(flag.field), _dest(flag)) for flag in command.flag_list]
    if command.options:
        options = dict((key, value) for key, value, _ in describe(command.options()))
        flags += [(flag, command.options, options[flag.field], OPTION + _dest(flag)) for flag in command.option_flags]
    for flag, cls, default, dest in sorted(flags, key=lambda item: not item[0].positional):  # positionals first
        add_field_flag(parser, flag, cls, default, dest)
    _config_flags(parser, command)
    storage_flags(parser)
    return parser


def _dest(flag: Flag) -> str:
    return flag.field.replace(".", "__")


def command_config(command: Command, args: argparse.Namespace):
    """The command's config from parsed flags."""
    fields = {flag.field: getattr(args, _dest(flag)) for flag in command.flag_list}
    preset, config_file = getattr(args, "preset", "default"), getattr(args, "config", None)
    overrides = getattr(args, "set", [])
    if command.builder:
        return command.builder(preset, config_file, fields, overrides)
    return build(command.preset(preset), config_file, fields, overrides)


def command_options(command: Command, args: argparse.Namespace):
    """The run options from parsed flags (a flag not given: the option's default)."""
    if not command.options:
        return None
    return build(
        command.options(),
        None,
        {f.field: getattr(args, OPTION + _dest(f)) for f in command.option_flags},
    )


def parse_command_args(command: Command, argv: list[str]):
    """A command's config from its arguments, as ``veclip NAME`` would build it."""
    parser = argparse.ArgumentParser(prog=f"veclip {command.name}")
    add_command_parser(parser.add_subparsers(dest="command", required=True), command)
    args, extra = parser.parse_known_args([command.name, *argv])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}{field_hint(command, extra)}")
    return command_config(command, args)


def checked_command_args(command: Command, argv: list[str]):
    """:func:`parse_command_args`, then the config's own validation before a run (a model not set, pools that
    disagree, an output over its input): what ``veclip submit`` and a pipeline refuse before anything starts."""
    config = parse_command_args(command, argv)
    if hasattr(config, "validate_for_run"):
        config.validate_for_run()
    output, inputs = getattr(config, "output", None), [getattr(config, "input", None)]
    if output and any(inputs):  # an output over its input: refused here, before a job reaches the cluster
        from veclip.storage import refuse_overlap

        refuse_overlap(command.name, output, [*inputs, *getattr(config, "add_captions", ())])
    return config


def field_hint(command: Command | None, unknown: list[str]) -> str:
    """For an unknown flag that names a config field (``--steps 100``, ``--lr=1e-4``): how to set it."""
    if command is None:
        return ""
    try:
        keys = [key for key, _, _ in describe(command.preset())]
    except Exception:  # a preset that cannot be built here: no hint rather than a second error
        return ""
    hints = []
    for i, word in enumerate(unknown):
        if not word.startswith("--"):
            continue
        flag, _, value = word[2:].partition("=")
        value = value or (unknown[i + 1] if i + 1 < len(unknown) and not unknown[i + 1].startswith("--") else "...")
        name = flag.replace("-", "_")
        matches = [k for k in keys if k == name or k.endswith("." + name)]
        if matches:
            hints.append(f"--{flag} is a config field: use --set {matches[0]}={value}")
    return "; " + "; ".join(hints) if hints else ""
