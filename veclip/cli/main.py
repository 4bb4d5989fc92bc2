"""The ``veclip`` command: the commands the registry names (:mod:`veclip.cli.registry`), plus ``config
show``, ``convert-eval``, ``submit``, ``simulate`` and ``jobs``.

No logic lives here beyond exit codes and messages: each command builds its typed config and runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from veclip.cli.flags import (
    add_command_parser,
    add_field_flag,
    command_config,
    command_options,
    field_hint,
    storage,
    storage_flags,
)
from veclip.cli.registry import DECLARED, command, submittable
from veclip.command import Flag


def cmd_command(args: argparse.Namespace) -> int:
    declared = command(args.command)
    result = declared.runner()(command_config(declared, args), storage(args), command_options(declared, args))
    if text := result.render():
        print(text)
    return result.exit_code


def cmd_config_show(args: argparse.Namespace) -> int:
    from veclip.config import describe

    declared = command(args.stage)
    rows = describe(declared.preset(args.preset))
    width = max(len(key) for key, _, _ in rows)
    print(f"# veclip {declared.name} --preset {args.preset}: every field, for --set KEY=VALUE or a --config file")
    for key, value, doc in rows:
        print(f"{key:<{width}}  = {value!r}" + (f"\n{'':<{width}}    {doc}" if doc else ""))
    return 0


def cmd_convert_eval(args: argparse.Namespace) -> int:
    from veclip.eval import convert

    if args.format == "folders":
        converted = convert.from_class_folders(args.source, args.out, args.class_names, options=storage(args))
    else:
        if not args.images:
            raise ValueError("convert-eval coco: --images DIR is required")
        converted = convert.from_coco(args.source, args.images, args.out, options=storage(args))
    for problem in converted["skipped"]:
        print(f"skipped: {problem}")
    print(f"convert-eval: wrote {converted['rows']} rows to {args.out} ({len(converted['skipped'])} skipped)")
    return 0


def _env_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def cmd_submit(args: argparse.Namespace) -> int:
    from veclip import job_client
    from veclip.cli import jobs

    stage_args = [a for a in args.stage_args if a != "--"]
    config = jobs.SubmitConfig(
        stage=args.stage,
        stage_args=tuple(stage_args),
        address=args.address,
        python=args.python,
        env=dict(args.env),
        ship_code=args.ship_code,
        working_dir=args.working_dir,
        runtime_env_file=args.runtime_env,
        job_id=args.job_id,
        secrets=tuple(args.secret),
    )
    job_id = jobs.submit(config)
    print(f"submit: job {job_id} ({args.stage}); follow it with: veclip jobs logs {job_id} --follow", flush=True)
    if args.no_wait:
        return 0
    try:
        if args.follow:
            job_client.follow_logs(args.address, job_id)
        status = job_client.wait(args.address, job_id)
    except KeyboardInterrupt:
        print(
            f"\nsubmit: stopped waiting; job {job_id} goes on (veclip jobs stop {job_id} to stop it)", file=sys.stderr
        )
        return 130
    print(f"submit: job {job_id} {status}")
    if status != "SUCCEEDED" and not args.follow:  # say why without a second command
        tail = job_client.client(args.address).get_job_logs(job_id).splitlines()[-20:]
        print("submit: the job's last log lines:\n" + "\n".join(tail), file=sys.stderr)
    return job_client.exit_code(status)


def cmd_jobs(args: argparse.Namespace) -> int:
    from veclip import job_client

    client = job_client.client(args.address)
    if args.action == "list":
        for info in client.list_jobs():
            print(
                f"{info.submission_id}\t{info.status}\t"
                f"{(info.metadata or {}).get('veclip_stage', '-')}\t{info.entrypoint}"
            )
        return 0
    if not args.job_id:
        raise ValueError(f"jobs {args.action}: a job id is required")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0 if str(info.status) != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            job_client.follow_logs(args.address, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from veclip.shards.simulate import Fleet, SimConfig, SimPool, render_runs, simulate_seeds

    pools = tuple(SimPool.parse(p) for p in args.pool) or SimConfig.pools
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Fleet)}
    fleet = dataclasses.replace(Fleet(), **{k: v for k, v in given.items() if v is not None})
    config = SimConfig(
        shards=args.shards,
        rows_per_shard=args.rows_per_shard,
        pools=pools,
        gpu_hour_usd=args.gpu_hour_usd,
        **fleet.sim_fields(),
    )
    runs = simulate_seeds(config, fleet.seeds)
    print(render_runs(config, runs))
    return 0 if all(r.finished for r in runs) else 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``only``: a declared command's name, the parser of that command alone (a
    command line imports only the module that declares its command)."""
    parser = argparse.ArgumentParser(prog="veclip", description="Better CLIP from noisy web image-text data.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name in [only] if only in DECLARED else DECLARED:
        add_command_parser(sub, command(name)).set_defaults(func=cmd_command)
    if only in DECLARED:
        return parser

    p = sub.add_parser("config", help="print a stage's config: every field, its value and what it does")
    p.add_argument("action", choices=("show",))
    p.add_argument("stage", choices=tuple(DECLARED))
    p.add_argument(
        "--preset", default="default", help="the preset to start from (default, or tiny for rewrite and train)"
    )
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "convert-eval", help="convert class folders (ImageNet-style) or a COCO captions JSON into an eval set"
    )
    p.add_argument("format", choices=("folders", "coco"))
    p.add_argument("source", help="folders: ROOT with one folder per class; coco: the captions JSON")
    p.add_argument("--images", help="coco: the folder of the images")
    p.add_argument("--class-names", help="folders: JSON list of human class names, in sorted-folder order")
    p.add_argument("--output", "--out", dest="out", metavar="URL", required=True, help="output folder or s3:// prefix")
    storage_flags(p)
    p.set_defaults(func=cmd_convert_eval)

    address_help = "the cluster's dashboard URL, e.g. http://head:8265 (default: RAY_ADDRESS)"
    p = sub.add_parser(
        "submit",
        help="run a stage as a Ray job on a cluster: veclip submit rewrite --address URL [rewrite flags]",
        description="Submit a stage as a Ray job. Flags not listed here are the stage's own (see veclip STAGE --help); "
        "its paths are read on the cluster, so use s3:// URLs.",
    )
    p.add_argument("stage", choices=tuple(name for name in DECLARED if name in submittable()))
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument(
        "--no-wait", action="store_true", help="return after submitting (default: wait and exit with the job's status)"
    )
    p.add_argument(
        "--python", default="python", help="the driver's interpreter on the cluster (default python, the head's PATH)"
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the job (repeatable)",
    )
    p.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="send this environment's NAME (a token, a key) to every process of the job, outside the job's "
        "visible metadata (repeatable); secret-named --env values are refused",
    )
    p.add_argument(
        "--ship-code",
        action="store_true",
        help="upload this machine's veclip package instead of using the installed one",
    )
    p.add_argument("--working-dir", help="a local folder to upload as the job's working directory")
    p.add_argument("--runtime-env", help="a JSON/YAML file of further runtime_env fields")
    p.add_argument("--job-id", help="the submission id (default: Ray picks one)")
    p.set_defaults(func=cmd_submit, stage_args=[])

    p = sub.add_parser(
        "simulate",
        help="a whole sharded run on a simulated spot fleet (the real driver's bookkeeping on a virtual clock): "
        "finish time, GPU-hours, goodput, cost, shards redone",
    )
    p.add_argument("--shards", type=int, default=2000, help="input shards (default 2000)")
    p.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per shard (default 10000)")
    p.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME:ACTORS:SHARD_MINUTES[:START_MINUTES]",
        help="a pool, in order (repeatable; default captioner:16:8 then fuser:4:2, engines loading 5 min)",
    )
    fleet_flags(p)
    p.add_argument("--gpu-hour-usd", type=float, default=4.0, help="price of a GPU-hour (default 4.00, an H100)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("jobs", help="status, logs, stop or list of Ray jobs on a cluster")
    p.add_argument("action", choices=("status", "logs", "stop", "list"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)
    return parser


COMMON_GROUPS = ("object storage",)  # said once under the reference, not on every line


def _flag(action: argparse.Action) -> str:
    short = {int: "N", float: "X"}.get(action.type, action.dest.upper().replace("_", "-"))
    value = "|".join(map(str, action.choices)) if action.choices else (action.metavar or short)
    if not action.option_strings:
        return f"[{value}]" if action.nargs == "?" else value
    flag = next(
        o for o in action.option_strings if o.startswith("--")
    )  # the first long spelling; later ones are aliases
    text = flag if action.nargs == 0 else f"{flag} {value}"
    return text if action.required else f"[{text}{' ...' if isinstance(action, argparse._AppendAction) else ''}]"


def command_reference() -> str:
    """One line per command, from the parser itself (docs/stages.md's "Commands" block is this, checked by a test)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    width = max(map(len, sub.choices))
    lines = []
    for name, parser in sub.choices.items():
        common = {
            id(a)
            for g in parser._action_groups
            if g.title and g.title.startswith(COMMON_GROUPS)
            for a in g._group_actions
        }
        flags = [_flag(a) for a in parser._actions if not isinstance(a, argparse._HelpAction) and id(a) not in common]
        lines.append(f"veclip {name:<{width}} {' '.join(flags)}".rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words and words[0] in DECLARED else None)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "submit":
        named = command(args.command) if args.command in DECLARED else None
        parser.error(f"unrecognized arguments: {' '.join(extra)}{field_hint(named, extra)}")
    if extra:
        args.stage_args = extra  # the stage's own flags, checked by the stage's parser before submitting
    from veclip.cli.jobs import load_job_secrets
    from veclip.console import VERBOSE_ENV
    from veclip.shards.lease import LeaseHeld
    from veclip.shards.stall import StageStalled

    load_job_secrets()
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # Ray jobs and workers inherit it
    try:
        return args.func(args)
    except Exception as err:
        # bad config, input, address, credentials or environment, or a busy output: one line that says
        # what and how to fix it, not a traceback (--verbose shows it)
        from veclip.storage import explain_storage_error

        message = explain_storage_error(err, _storage_options(args))
        if message is None and isinstance(
            err, (ValueError, FileNotFoundError, ConnectionError, LeaseHeld, StageStalled)
        ):
            message = str(err)
        if message is None or getattr(args, "verbose", False):
            raise
        print(f"veclip {args.command}: error: {message}", file=sys.stderr)
        return 2


def fleet_flags(parser: argparse.ArgumentParser) -> None:
    """The simulated fleet's flags (``veclip simulate``; ``veclip plan --simulate`` takes them as run options)."""
    from veclip.shards.simulate import Fleet

    for f in dataclasses.fields(Fleet):
        add_field_flag(parser, Flag(f.name), Fleet, f.default, f.name)


def _storage_options(args):
    return storage(args) if hasattr(args, "s3_endpoint") else None


if __name__ == "__main__":
    sys.exit(main())
