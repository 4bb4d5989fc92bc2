"""Every stage in one registry: its flags, its typed config, and how it runs.

One flag vocabulary: a stage reads ``--input`` (or a positional source) and
writes ``--output``; the older spellings ``--data`` and ``--out`` still work.

A stage's config is built the same way everywhere (``veclip STAGE``, ``veclip
submit STAGE``, ``veclip config show STAGE``) and without side effects: a
preset, then ``--config FILE``, then the stage's flags, then ``--set KEY=VALUE``
overrides (:func:`stage_config`). The CLI (:mod:`veclip.cli`) and job
submission (:mod:`veclip.jobs`) are both built from :data:`STAGES`; each
stage's ``run`` prints its summary and returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from veclip import schema
from veclip.config import build
from veclip.storage import StorageOptions


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    flags: Callable[[argparse.ArgumentParser], None]  # the stage's own flags
    fields: Callable[[argparse.Namespace], dict]  # flag values -> config fields (None: not given)
    preset: Callable[[str], Any]  # preset name -> config
    run: Callable[[Any, StorageOptions, argparse.Namespace], int]  # run it, print the summary, exit code
    presets: str = "default: the only preset"
    submittable: bool = False  # runs as a Ray job (veclip submit)
    set_example: str = ""
    # (preset name, config file, fields, overrides) -> config, for a stage whose build does more than
    # layer them (rewrite: mode both shares the fuser's pool); None: veclip.config.build
    builder: Callable[..., Any] | None = None


# --- flags shared by stages -----------------------------------------------------------------------


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


def _columns_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--columns",
        type=_column_map,
        default=None,
        help="column mapping role=column,..., e.g. image=jpg,alt_text=caption "
        "(roles: key, image, alt_text, url, width, height)",
    )


def _config_flags(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """--preset, --config and --set: the same on every stage."""
    group = parser.add_argument_group(f"configuration (every field: veclip config show {stage.name})")
    group.add_argument("--preset", default="default", help=stage.presets)
    group.add_argument("--config", help="a JSON/YAML file of config fields")
    example = f", e.g. {stage.set_example}" if stage.set_example else ""
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a field{example} (repeatable)"
    )
    group.add_argument(
        "--verbose", action="store_true", help="print Ray's worker output, Ray Data's progress and vLLM's logs here too"
    )


def add_stage_parser(sub, stage: Stage) -> argparse.ArgumentParser:
    parser = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    stage.flags(parser)
    _config_flags(parser, stage)
    storage_flags(parser)
    return parser


def stage_config(stage: Stage, args: argparse.Namespace):
    """The stage's config from parsed flags: preset, file, flags, ``--set`` (no I/O, no models)."""
    if stage.builder:
        return stage.builder(args.preset, args.config, stage.fields(args), args.set)
    return build(stage.preset(args.preset), args.config, stage.fields(args), args.set)


def parse_stage_args(name: str, argv: list[str]):
    """A stage's config from its command-line arguments, as ``veclip STAGE`` would build it."""
    if name not in STAGES:
        raise ValueError(f"no stage {name!r}; stages: {sorted(STAGES)}")
    parser = argparse.ArgumentParser(prog=f"veclip {name}")
    stage = STAGES[name]
    add_stage_parser(parser.add_subparsers(dest="command", required=True), stage)
    args, extra = parser.parse_known_args([name, *argv])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}{field_hint(name, extra)}")
    return stage_config(stage, args)


def checked_stage_args(name: str, argv: list[str]):
    """:func:`parse_stage_args`, then the stage's own validation before a run (a model not set, pools that
    disagree): what ``veclip submit`` and a pipeline refuse before anything starts."""
    config = parse_stage_args(name, argv)
    if hasattr(config, "validate_for_run"):
        config.validate_for_run()
    output, inputs = getattr(config, "output", None), [getattr(config, "input", None)]
    if output and any(inputs):  # an output over its input: refused here, before a job reaches the cluster
        from veclip.storage import refuse_overlap

        refuse_overlap(name, output, [*inputs, *getattr(config, "add_captions", ())])
    return config


def field_hint(stage_name: str, unknown: list[str]) -> str:
    """For an unknown flag that names a config field (``--steps 100``, ``--lr=1e-4``): how to set it."""
    from veclip.config import describe

    if stage_name not in STAGES:
        return ""
    try:
        keys = [key for key, _, _ in describe(STAGES[stage_name].preset("default"))]
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


def _lazy(target: str) -> Callable:
    """``module:attribute``, imported when called: stage modules pull in torch, Ray and vLLM."""
    module, _, attribute = target.partition(":")
    return lambda *args: getattr(importlib.import_module(module), attribute)(*args)


def _only_default(config_type: str) -> Callable[[str], Any]:
    """The presets of a stage that has one: the defaults of its config class (``module:Class``)."""

    def preset(name: str):
        if name != "default":
            raise ValueError(f"unknown preset {name!r}: this stage has only 'default'")
        return _lazy(config_type)()

    return preset


# --- the stages ---------------------------------------------------------------------------------


def _sample_flags(p):
    p.add_argument(
        "--output", "--out", dest="output", metavar="URL", required=True, help="output folder or s3:// prefix"
    )
    p.add_argument("--rows", type=int, help="train rows (default 2000)")
    p.add_argument("--eval-rows", type=int, help="eval rows (default 500)")
    p.add_argument("--shards", type=int, help="shards per split (default 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int, help="image side in pixels (default 128)")


def _sample_run(config, options, args) -> int:
    from veclip.world.generate import generate

    written = generate(config, options)
    print(f"sample: {written['train']} train + {written['eval']} eval rows in {config.output}")
    return 0


def _validate_flags(p):
    p.add_argument("url", help="folder or s3:// prefix holding .parquet shards")
    _columns_flag(p)
    p.add_argument(
        "--images", choices=("sample", "full", "none"), help="decode a sample per shard (default), every image, or none"
    )
    p.add_argument("--sample-per-shard", type=int, help="images decoded per shard with --images sample (default 32)")
    p.add_argument(
        "--sample-row-groups",
        type=int,
        help="row groups per shard the sample is drawn from; only their image bytes are read (default 1)",
    )
    p.add_argument(
        "--max-keys-in-memory",
        type=int,
        help="keys held in memory for the duplicate check; beyond it they are spilled to local disk",
    )
    p.add_argument("--max-bad-image-share", type=float, help="share of checked images allowed to fail (default 0)")


def _validate_run(config, options, args) -> int:
    from veclip.validate import validate

    report = validate(config, options)
    print(report.render())
    return 0 if report.usable else 1


def _import_flags(p):
    p.add_argument("source", help="folder of .tar shards, or a .csv file")
    p.add_argument(
        "--output", "--out", dest="output", metavar="URL", required=True, help="output folder or s3:// prefix"
    )
    p.add_argument("--format", choices=("auto", "webdataset", "csv"))
    _columns_flag(p)
    p.add_argument("--rows-per-shard", type=int, help="CSV rows per output shard (default 10000)")
    p.add_argument(
        "--resize",
        type=int,
        metavar="PX",
        help="pre-resize: images with a larger short side are scaled to PX (e.g. 384) and re-encoded as JPEG",
    )
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        default=None,
        help="CSV: also read absolute paths, URLs and paths above the CSV's folder (refused by default)",
    )


def _import_run(config, options, args) -> int:
    from veclip.ingest import run_import

    print(run_import(config, options).render())
    return 0


def _webdataset_flags(p):
    p.add_argument(
        "--input", metavar="URL", required=True, help="a dataset, or a caption output (joined to its images)"
    )
    p.add_argument("--output", "--out", dest="output", metavar="URL", required=True, help="folder for the tars")
    p.add_argument("--caption", help="the column written as <key>.txt (default vecap; a list column: its first)")
    p.add_argument("--fallback", help="the column used where --caption is empty (default alt_text; '': leave out)")
    p.add_argument(
        "--add-captions", dest="add_captions", action="append", metavar="URL", help="more caption outputs to join"
    )


def _webdataset_run(config, options, args) -> int:
    from veclip.wds_export import export_webdataset

    print(export_webdataset(config, options).render(config))
    return 0


def _plan_flags(p):
    p.add_argument("--input", metavar="URL", required=True, help="the input a rewrite would read")
    p.add_argument("--mode", choices=("vecap", "laclip", "both"), help="what the rewrite generates (default both)")
    _columns_flag(p)
    p.add_argument("--rows", type=int, default=64, help="rows sampled from the input and rewritten to measure")
    p.add_argument("--calibration", metavar="URL", help="a rewrite output on the GPUs you consider: its rates")
    p.add_argument(
        "--price", action="append", metavar="GPU=DOLLARS", help="dollars per GPU-hour (default H100=4.0, L40S=1.9)"
    )
    p.add_argument(
        "--scratch", dest="output", metavar="DIR", help="keep the measuring run here (default: a temporary folder)"
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="then simulate the whole run on spot nodes (the pools at max_actors, shards timed from the plan's "
        "rates): finish time, goodput, cost, shards redone",
    )
    p.add_argument("--gpu", default="H100", help="--simulate: the GPU whose rates and price it uses (default H100)")
    p.add_argument(
        "--engine-start-minutes", type=float, default=5.0, help="--simulate: an engine's load time (default 5)"
    )
    fleet_flags(p)


def fleet_flags(p):
    """The simulated fleet's flags (``veclip simulate``, ``veclip plan --simulate``)."""
    p.add_argument("--preemption-per-hour", type=float, default=0.10, help="each node's chance an hour (default 0.10)")
    p.add_argument("--replacement-minutes", type=float, default=10.0, help="a lost node's replacement (default 10)")
    p.add_argument("--drain-notice-seconds", type=float, default=0.0, help="notice before a preemption (default 0)")
    p.add_argument("--never-replaced", action="store_true", help="lost nodes never come back (a hung pool)")
    p.add_argument("--actor-kills-per-hour", type=float, default=0.0, help="each actor's process killed (default 0)")
    p.add_argument("--s3-latency-ms", type=float, default=0.0, help="a store request's mean latency (default 0)")
    p.add_argument(
        "--s3-fault-rate", type=float, default=0.0, help="a store request's chance to fail after retries (default 0)"
    )
    p.add_argument("--seeds", type=int, default=3, help="simulated runs, one per seed (default 3)")


def fleet_fields(args) -> dict:
    """:func:`fleet_flags`' values as :class:`~veclip.shards.simulate.SimConfig` fields."""
    names = ("preemption_per_hour", "replacement_minutes", "drain_notice_seconds", "never_replaced")
    names += ("actor_kills_per_hour", "s3_latency_ms", "s3_fault_rate")
    return {name: getattr(args, name) for name in names}


def _plan_fields(args) -> dict:
    from veclip.plan import TEMPORARY

    # the rewrite config's output is where the measuring run goes
    return {"input": args.input, "mode": args.mode, "columns": args.columns, "output": args.output or TEMPORARY}


def _plan_run(config, options, args) -> int:
    from veclip.plan import plan_rewrite, render_plan

    prices = {gpu: float(dollars) for gpu, _, dollars in (p.partition("=") for p in args.price or ())}
    plan = plan_rewrite(config, options, args.rows, args.calibration, prices)
    print(render_plan(plan))
    if not args.simulate:
        return 0
    from veclip.plan import simulated_runs
    from veclip.shards.simulate import render_runs, simulate_seeds

    finished = True
    for label, sim in simulated_runs(plan, config, args.gpu, args.engine_start_minutes, fleet_fields(args)):
        print(f"plan --simulate: {label}")
        runs = simulate_seeds(sim, args.seeds)
        print(render_runs(sim, runs))
        finished &= all(r.finished for r in runs)
    return 0 if finished else 2


def _rewrite_flags(p):
    p.add_argument("--input", metavar="URL", required=True, help="folder or s3:// prefix of input shards")
    p.add_argument("--output", metavar="URL", required=True, help="folder or s3:// prefix for enriched shards")
    p.add_argument("--mode", choices=("vecap", "laclip", "both"), help="what to generate (default both)")
    p.add_argument(
        "--layout",
        choices=("copy", "captions"),
        help="captions (default): caption tables, joined to their input by key; "
        "copy: the input's columns + the new ones",
    )
    _columns_flag(p)
    _sharded_run_flags(p)
    _dry_run_flag(p)


def _sharded_run_flags(p):
    """A sharded stage's run options (rewrite, score): one spelling, one help."""
    p.add_argument(
        "--redo-mismatched",
        action="store_true",
        help="write again the shards an earlier run wrote with another configuration (fingerprint) into this output",
    )
    p.add_argument(
        "--take-over-lease",
        action="store_true",
        help="take the output from another run's lease (only when that run is surely gone)",
    )


def _dry_run_flag(p):
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan (shards, rows, fingerprint, what a rerun skips, pools or workers and "
        "their resources); start nothing, write nothing",
    )


def _rewrite_run(config, options, args) -> int:
    from veclip.rewrite.pipeline import dry_run_rewrite, render_summary, run_rewrite
    from veclip.shards.driver import render_dry_run

    if args.dry_run:
        print(render_dry_run(dry_run_rewrite(config, options)))
        return 0

    summary = run_rewrite(config, options, redo_mismatched=args.redo_mismatched, take_over_lease=args.take_over_lease)
    print(render_summary(summary))
    return 1 if summary["failed"] else 0


def _train_flags(p):
    p.add_argument(
        "--input",
        "--data",
        dest="input",
        metavar="URL",
        required=True,
        help="folder or s3:// prefix of (enriched) shards",
    )
    p.add_argument(
        "--output", metavar="URL", required=True, help="run storage (checkpoints, summary): folder or s3:// prefix"
    )
    p.add_argument("--model", help="open_clip model name, e.g. ViT-B-16 (default), or veclip-tiny")
    p.add_argument("--name", help="run name; rerun with the same name and output to resume")
    p.add_argument(
        "--add-captions",
        action="append",
        metavar="URL[#COLUMNS]",
        help="another caption output of the same input, joined beside --input's (repeatable); "
        "#vecap=vlm_caption,rewrites picks and renames its columns",
    )
    p.add_argument(
        "--caption-mode",
        choices=("alttext", "vecap", "mix", "laclip", "weighted"),
        help="caption choice per sample (default mix)",
    )
    p.add_argument(
        "--report-to",
        metavar="TRACKERS",
        help="log each step to tensorboard, wandb and/or mlflow, comma-separated (offline by default)",
    )
    _columns_flag(p)
    _dry_run_flag(p)


def _train_fields(args) -> dict:
    fields = dict(
        input=args.input,
        add_captions=args.add_captions,
        output=args.output,
        model=args.model,
        name=args.name,
        columns=args.columns,
    )
    trackers = tuple(t.strip() for t in args.report_to.split(",") if t.strip()) if args.report_to else None
    return {**fields, "captions.mode": args.caption_mode, "tracking.report_to": trackers}


def _train_run(config, options, args) -> int:
    from veclip.train.trainer import dry_run_train, render_dry_run, render_summary, run_train

    if args.dry_run:
        print(render_dry_run(dry_run_train(config, options)))
        return 0
    print(render_summary(run_train(config, options)))
    return 0


def _score_flags(p):
    p.add_argument(
        "--input",
        metavar="URL",
        required=True,
        help="shards with captions, or a caption output (joined to its images by key): what training reads",
    )
    p.add_argument(
        "--add-captions",
        action="append",
        metavar="URL[#COLUMNS]",
        help="another caption output of the same input (repeatable)",
    )
    p.add_argument("--output", metavar="URL", required=True, help="folder or s3:// prefix for the score tables")
    p.add_argument(
        "--model",
        required=True,
        help="an exported folder, a training run/checkpoint folder, or an open_clip model name (with --pretrained)",
    )
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file, with a model name")
    p.add_argument("--threshold", type=float, help="flag captions whose cosine with their image is under this")
    p.add_argument(
        "--percentile",
        type=float,
        help="flag captions under this percentile of their column's scores in their shard, e.g. 10",
    )
    _columns_flag(p)
    _sharded_run_flags(p)
    _dry_run_flag(p)


def _score_run(config, options, args) -> int:
    from veclip.score.pipeline import dry_run_score, render_summary, run_score
    from veclip.shards.driver import render_dry_run

    if args.dry_run:
        print(render_dry_run(dry_run_score(config, options, args.redo_mismatched)))
        return 0

    summary = run_score(config, options, take_over_lease=args.take_over_lease, redo_mismatched=args.redo_mismatched)
    print(render_summary(summary))
    return 1 if summary["failed"] else 0


def _export_flags(p):
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest checkpoint is used)"
    )
    p.add_argument("--output", "--out", dest="output", metavar="DIR", required=True, help="local output folder")


def _export_run(config, options, args) -> int:
    from veclip.train.export import export

    out = export(config.checkpoint, config.output, options)
    print(f"export: wrote {out}; load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _eval_flags(p):
    p.add_argument(
        "--model",
        required=True,
        help="an exported folder, a training run/checkpoint folder, or an open_clip model name (with --pretrained)",
    )
    p.add_argument(
        "--input", "--data", dest="input", metavar="URL", required=True, help="eval shards: folder or s3:// prefix"
    )
    p.add_argument("--output", "--out", dest="output", metavar="URL", help="write eval.json and eval.md here")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file, with a model name")
    p.add_argument("--label-column", help="class-name column(s) for zero-shot, comma-separated (default label_shape)")
    p.add_argument(
        "--caption-column",
        help="caption (string or list) column(s) for retrieval, comma-separated, each scored (default caption)",
    )
    p.add_argument(
        "--choice-column",
        help="multiple-choice column(s): a list of texts per image, the right one first (e.g. probe_brand)",
    )
    p.add_argument("--classes", help='JSON file with "classnames" (default: the eval set\'s _classes.json)')
    p.add_argument(
        "--templates",
        help="prompt template set(s), comma-separated, each scored: generic (default), imagenet, scenes (the sample "
        "data's caption style), brands, or JSON files",
    )
    p.add_argument("--workers", type=int, help="embed images over up to N Ray actors (default 0: in this process)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per embedding actor with --workers (default 0)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per embedding actor with --workers (default 1)")
    p.add_argument("--batch-size", type=int, help="images and texts per forward pass (default 256)")
    _columns_flag(p)


def _eval_run(config, options, args) -> int:
    from veclip.eval.run import evaluate, render_markdown

    print(render_markdown(evaluate(config, options)))
    return 0


def _show_flags(p):
    p.add_argument("url", help="input, enriched or caption output, or its .veclip/quarantine: folder or s3:// prefix")
    p.add_argument("--rows", type=int, help="rows to show (default 10)")
    p.add_argument("--offset", type=int, help="matching rows to pass over first (default 0)")
    p.add_argument(
        "--keys", type=lambda text: tuple(k for k in text.split(",") if k), help="only these keys, comma-separated"
    )
    p.add_argument(
        "--where", help="only rows with a flag or quarantine reason containing this text, e.g. entities_lost"
    )
    p.add_argument(
        "--html", metavar="FILE", help="write self-contained HTML pages (images inline) instead of a terminal table"
    )
    p.add_argument("--page-rows", type=int, help="rows per HTML page (default 50)")
    p.add_argument(
        "--add-captions",
        action="append",
        metavar="URL[#COLUMNS]",
        help="another caption output of the same input (repeatable)",
    )
    _columns_flag(p)


def _show_run(config, options, args) -> int:
    from veclip.show import show

    print(show(config, options))
    return 0


def _status_run(config, options, args) -> int:
    from veclip.status import status

    report = status(config, options)
    print(report.render())
    return 0 if report.done else 1


def _models_flags(p):
    p.add_argument("action", choices=("build",), help="build: train the captioner VLM and the instruction LLM (cached)")
    p.add_argument(
        "--output", "--out", dest="output", metavar="DIR", help="where to build (default: the cache, see --help)"
    )
    p.add_argument("--scale", choices=("full", "quick"), help="full (~10 min on 2 cores, the demo's) or quick (tests)")
    p.add_argument("--seed", type=int)


def _models_run(config, options, args) -> int:
    from veclip.world.build import run

    return run(config)


def _demo_flags(p):
    p.add_argument("--output", "--out", dest="output", metavar="URL", help="output folder (default runs/demo)")
    p.add_argument("--rows", type=int, help="train rows of sample data (default 1000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="CLIP training steps per caption mode (default 300)")
    p.add_argument(
        "--models",
        choices=("full", "quick"),
        help="the trained captioner and LLM's scale (default full; quick for tests)",
    )


def _demo_run(config, options, args) -> int:
    from veclip.demo import run_demo

    return run_demo(config, options)


def _pipeline_flags(p):
    from veclip.pipeline import available

    p.add_argument("pipeline", help=f"a shipped pipeline ({', '.join(available())}) or a YAML file")
    p.add_argument("--input", metavar="URL", help="the data the first step reads (folder or s3:// prefix)")
    p.add_argument("--output", "--out", dest="output", metavar="URL", help="the run's folder or s3:// prefix")
    p.add_argument("--var", dest="vars", action="append", metavar="NAME=VALUE", help="a pipeline var (repeatable)")
    p.add_argument("--submit", action="store_true", default=None, help="run rewrite/train/score/eval as Ray jobs")
    p.add_argument("--address", help="the cluster's job address for --submit (default: RAY_ADDRESS)")
    p.add_argument("--dry-run", action="store_true", default=None, help="print each step's command, run nothing")


def run_checked_pipeline(config, options=None, log=print) -> int:
    """A pipeline whose every command is first parsed, built and validated by this registry (as ``veclip
    submit`` checks a stage), as ``veclip pipeline`` runs it."""
    from veclip.pipeline import run_pipeline

    submittable = frozenset(name for name, stage in STAGES.items() if stage.submittable)
    return run_pipeline(config, options, log, check=checked_stage_args, submittable=submittable)


def _pipeline_run(config, options, args) -> int:
    return run_checked_pipeline(config, options)


def _fields(*names: str) -> Callable[[argparse.Namespace], dict]:
    """Flag values -> config fields of the same name."""
    return lambda args: {name: getattr(args, name) for name in names}


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "sample",
            "write rendered sample data (train + eval splits)",
            _sample_flags,
            _fields("output", "rows", "eval_rows", "shards", "seed", "image_size"),
            _only_default("veclip.world.generate:SampleConfig"),
            _sample_run,
        ),
        Stage(
            "validate",
            "check a folder of Parquet shards against the input schema",
            _validate_flags,
            _fields(
                "url",
                "columns",
                "images",
                "sample_per_shard",
                "sample_row_groups",
                "max_bad_image_share",
                "max_keys_in_memory",
            ),
            _only_default("veclip.validate:ValidateConfig"),
            _validate_run,
        ),
        Stage(
            "import",
            "convert webdataset tars or a CSV of image paths into Parquet shards",
            _import_flags,
            _fields("source", "output", "format", "columns", "rows_per_shard", "allow_outside_paths", "resize"),
            _only_default("veclip.ingest:ImportConfig"),
            _import_run,
        ),
        Stage(
            "webdataset",
            "write a dataset and its captions as WebDataset tars (image, .txt caption, .json of every caption)",
            _webdataset_flags,
            _fields("input", "output", "caption", "fallback", "add_captions"),
            _only_default("veclip.wds_export:WebDatasetConfig"),
            _webdataset_run,
        ),
        Stage(
            "rewrite",
            "enrich captions: VeCap (VLM caption + LLM fusion) and/or LaCLIP rewrites",
            _rewrite_flags,
            _fields("input", "output", "mode", "layout", "columns"),
            _lazy("veclip.rewrite.config:preset"),
            _rewrite_run,
            presets="default (LLaVA-1.5 + Llama-3-8B), qwen2-vl, qwen2.5-vl: real models on GPU actors; "
            "tiny: tiny random models on CPU; "
            "trained, trained-quick: small models trained here (veclip models build) on CPU",
            submittable=True,
            set_example="fuser.pool.max_actors=4 or laclip.sampling.temperature=0.7",
            builder=_lazy("veclip.rewrite.config:build_from"),
        ),
        Stage(
            "plan",
            "before a rewrite: measure sampled rows with the preset's own models, project requests, tokens, "
            "GPU-hours and cost",
            _plan_flags,
            _plan_fields,
            _lazy("veclip.rewrite.config:preset"),
            _plan_run,
            presets="the rewrite's",
            builder=_lazy("veclip.rewrite.config:build_from"),
        ),
        Stage(
            "train",
            "train CLIP with Ray Train on (enriched) shards",
            _train_flags,
            _train_fields,
            _lazy("veclip.train.config:preset"),
            _train_run,
            presets="default: ViT-B-16 on 8 GPU workers; tiny: 8M-param CLIP on 2 CPU workers",
            submittable=True,
            set_example="steps=2000, captions.p_vecap=0.3, scale.num_workers=4",
        ),
        Stage(
            "score",
            "the caption gate: score every caption against its image with a CLIP model and flag the low ones",
            _score_flags,
            _fields("input", "add_captions", "output", "model", "pretrained", "threshold", "percentile", "columns"),
            _lazy("veclip.score.config:preset"),
            _score_run,
            presets="default: GPU actors (up to 8); cpu: one CPU actor",
            submittable=True,
            set_example='pool.max_actors=16 or caption_columns=["vecap"]',
        ),
        Stage(
            "export",
            "write a checkpoint as a folder stock open_clip loads",
            _export_flags,
            _fields("checkpoint", "output"),
            _only_default("veclip.train.export:ExportConfig"),
            _export_run,
        ),
        Stage(
            "eval",
            "zero-shot classification and image<->text retrieval on a Parquet eval set",
            _eval_flags,
            _fields(
                "model",
                "input",
                "output",
                "pretrained",
                "label_column",
                "caption_column",
                "choice_column",
                "classes",
                "templates",
                "workers",
                "gpus_per_worker",
                "cpus_per_worker",
                "batch_size",
                "columns",
            ),
            _only_default("veclip.eval.run:EvalConfig"),
            _eval_run,
            submittable=True,
        ),
        Stage(
            "show",
            "look at rows of a dataset or stage output: captions beside their images, flags, reasons",
            _show_flags,
            _fields("url", "rows", "offset", "keys", "where", "html", "page_rows", "add_captions", "columns"),
            _only_default("veclip.show:ShowConfig"),
            _show_run,
        ),
        Stage(
            "status",
            "how far a rewrite or score output or a training run is: shards/steps, rows/s, ETA, flags; exit 0 when "
            "done",
            lambda p: p.add_argument("url", help="a rewrite or score output, or a training run folder <output>/<name>"),
            _fields("url"),
            _only_default("veclip.status:StatusConfig"),
            _status_run,
        ),
        Stage(
            "models",
            "train small real models on the sample world (captioner VLM, instruction LLM) for the trained presets",
            _models_flags,
            _fields("output", "scale", "seed"),
            _only_default("veclip.world.build:ModelsConfig"),
            _models_run,
        ),
        Stage(
            "pipeline",
            "run a pipeline (a chain of stages in one file) on an input, resuming at its first unfinished step",
            _pipeline_flags,
            _fields("pipeline", "input", "output", "vars", "submit", "address", "dry_run"),
            _only_default("veclip.pipeline:PipelineConfig"),
            _pipeline_run,
        ),
        Stage(
            "demo",
            "the demo pipeline on built-in sample data (local), then its report",
            _demo_flags,
            _fields("output", "rows", "seed", "steps", "models"),
            _only_default("veclip.demo:DemoConfig"),
            _demo_run,
        ),
    )
}
