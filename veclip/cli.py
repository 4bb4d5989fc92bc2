"""The ``veclip`` command: one CLI, a subcommand per job.

Each subcommand parses its flags into the typed config of the module that does
the work and calls it; no logic lives here beyond exit codes and messages.
"""

from __future__ import annotations

import argparse
import sys

from veclip import schema
from veclip.storage import StorageOptions


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (defaults: the standard AWS chain, AWS_ENDPOINT_URL)")
    group.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    group.add_argument("--s3-region", help="S3 region")
    group.add_argument("--s3-anon", action="store_true", help="anonymous access (public buckets)")


def _storage(args: argparse.Namespace) -> StorageOptions:
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
        default=schema.ColumnMap(),
        help="column mapping role=column,..., e.g. image=jpg,alt_text=caption (roles: key, image, alt_text, url, width, height)",
    )


def _config_flags(parser: argparse.ArgumentParser, stage: str, presets: str, example: str) -> None:
    """--preset, --config and --set, the same on every stage."""
    parser.add_argument("--preset", choices=("default", "tiny"), default="default", help=presets)
    parser.add_argument("--config", help=f"a JSON/YAML file of config fields (see veclip/{stage}/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a field, e.g. {example} (repeatable)")
    _columns_flag(parser)
    _storage_flags(parser)
    parser.set_defaults(columns=None)  # None: keep the preset's or the config file's mapping


def cmd_sample(args: argparse.Namespace) -> int:
    from veclip.sample import SampleConfig, generate

    config = SampleConfig(args.out, args.rows, args.eval_rows, args.shards, args.seed, args.image_size)
    written = generate(config, _storage(args))
    print(f"sample: {written['train']} train + {written['eval']} eval rows in {args.out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from veclip.validate import ValidateConfig, validate

    config = ValidateConfig(args.url, args.columns, args.images, sample_per_shard=args.sample_per_shard,
                            sample_row_groups=args.sample_row_groups, max_bad_image_share=args.max_bad_image_share,
                            max_keys_in_memory=args.max_keys_in_memory)
    report = validate(config, _storage(args))
    print(report.render())
    return 0 if report.usable else 1


def cmd_import(args: argparse.Namespace) -> int:
    from veclip.ingest import ImportConfig, run_import

    config = ImportConfig(args.source, args.out, args.format, args.columns, args.rows_per_shard,
                          allow_outside_paths=args.allow_outside_paths)
    summary = run_import(config, _storage(args))
    print(summary.render())
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    from veclip.rewrite.config import build_config
    from veclip.rewrite.pipeline import render_summary, run_rewrite

    config = build_config(args.preset, args.config, args.set, input=args.input, output=args.output, mode=args.mode, columns=args.columns)
    summary = run_rewrite(config, _storage(args), redo_mismatched=args.redo_mismatched, take_over_lease=args.take_over_lease)
    print(render_summary(summary))
    return 1 if summary["failed"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    from veclip.train.config import build_config
    from veclip.train.trainer import render_summary, run_train

    overrides = list(args.set)
    if args.caption_mode:
        overrides.insert(0, f"captions.mode={args.caption_mode}")
    config = build_config(args.preset, args.config, overrides, data=args.data, output=args.output, model=args.model, name=args.name, columns=args.columns)
    print(render_summary(run_train(config, _storage(args))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from veclip.train.export import export

    out = export(args.checkpoint, args.out, _storage(args))
    print(f"export: wrote {out}; load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from veclip.eval.run import EvalConfig, evaluate, render_markdown

    config = EvalConfig(
        model=args.model, data=args.data, out=args.out, pretrained=args.pretrained, label_column=args.label_column,
        caption_column=args.caption_column, classes=args.classes, templates=args.templates, columns=args.columns,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker,
    )
    print(render_markdown(evaluate(config, _storage(args))))
    return 0


def cmd_convert_eval(args: argparse.Namespace) -> int:
    from veclip.eval import convert

    if args.format == "folders":
        summary = convert.from_class_folders(args.source, args.out, args.class_names, options=_storage(args))
    else:
        if not args.images:
            raise ValueError("convert-eval coco: --images DIR is required")
        summary = convert.from_coco(args.source, args.images, args.out, options=_storage(args))
    for problem in summary["skipped"]:
        print(f"skipped: {problem}")
    print(f"convert-eval: wrote {summary['rows']} rows to {args.out} ({len(summary['skipped'])} skipped)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from veclip.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(out=args.out, rows=args.rows, seed=args.seed), _storage(args))


def _env_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def cmd_submit(args: argparse.Namespace) -> int:
    from veclip import jobs

    stage_args = [a for a in args.stage_args if a != "--"]
    config = jobs.SubmitConfig(
        stage=args.stage, stage_args=tuple(stage_args), address=args.address, python=args.python, env=dict(args.env),
        ship_code=args.ship_code, working_dir=args.working_dir, runtime_env_file=args.runtime_env, job_id=args.job_id,
        secrets=tuple(args.secret),
    )
    job_id = jobs.submit(config)
    print(f"submit: job {job_id} ({args.stage}); follow it with: veclip jobs logs {job_id} --follow", flush=True)
    if args.no_wait:
        return 0
    try:
        if args.follow:
            jobs.follow_logs(args.address, job_id)
        status = jobs.wait(args.address, job_id)
    except KeyboardInterrupt:
        print(f"\nsubmit: stopped waiting; job {job_id} goes on (veclip jobs stop {job_id} to stop it)", file=sys.stderr)
        return 130
    print(f"submit: job {job_id} {status}")
    if status != "SUCCEEDED" and not args.follow:  # say why without a second command
        tail = jobs.client(args.address).get_job_logs(job_id).splitlines()[-20:]
        print("submit: the job's last log lines:\n" + "\n".join(tail), file=sys.stderr)
    return jobs.exit_code(status)


def cmd_jobs(args: argparse.Namespace) -> int:
    from veclip import jobs

    client = jobs.client(args.address)
    if args.action == "list":
        for info in client.list_jobs():
            print(f"{info.submission_id}\t{info.status}\t{(info.metadata or {}).get('veclip_stage', '-')}\t{info.entrypoint}")
        return 0
    if not args.job_id:
        raise ValueError(f"jobs {args.action}: a job id is required")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0 if str(info.status) != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            jobs.follow_logs(args.address, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veclip", description="Better CLIP from noisy web image-text data.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write rendered sample data (train + eval splits)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--rows", type=int, default=2000, help="train rows (default 2000)")
    p.add_argument("--eval-rows", type=int, default=500, help="eval rows (default 500)")
    p.add_argument("--shards", type=int, default=4, help="shards per split (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    _storage_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("validate", help="check a folder of Parquet shards against the input schema")
    p.add_argument("url", help="folder or s3:// prefix holding .parquet shards")
    _columns_flag(p)
    p.add_argument("--images", choices=("sample", "full", "none"), default="sample", help="decode a sample per shard (default), every image, or none")
    p.add_argument("--sample-per-shard", type=int, default=32, help="images decoded per shard with --images sample")
    p.add_argument("--sample-row-groups", type=int, default=1,
                   help="row groups per shard the sample is drawn from; only their image bytes are read (default 1)")
    p.add_argument("--max-keys-in-memory", type=int, default=20_000_000,
                   help="keys held in memory for the duplicate check; beyond it they are spilled to local disk")
    p.add_argument("--max-bad-image-share", type=float, default=0.0, help="share of checked images allowed to fail (default 0)")
    _storage_flags(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("import", help="convert webdataset tars or a CSV of image paths into Parquet shards")
    p.add_argument("source", help="folder of .tar shards, or a .csv file")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--format", choices=("auto", "webdataset", "csv"), default="auto")
    _columns_flag(p)
    p.add_argument("--rows-per-shard", type=int, default=10_000, help="CSV rows per output shard")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="CSV: also read absolute paths, URLs and paths above the CSV's folder (refused by default)")
    _storage_flags(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("rewrite", help="enrich captions: VeCap (VLM caption + LLM fusion) and/or LaCLIP rewrites")
    p.add_argument("--input", required=True, help="folder or s3:// prefix of input shards")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for enriched shards")
    p.add_argument("--mode", choices=("vecap", "laclip", "both"), help="what to generate (default both)")
    _config_flags(p, "rewrite", "default: real models on GPU actors; tiny: tiny random models on CPU", "fuser.pool.max_actors=4 or laclip.sampling.temperature=0.7")
    p.add_argument("--redo-mismatched", action="store_true",
                   help="write again the shards an earlier run wrote with another configuration (fingerprint) into this output")
    p.add_argument("--take-over-lease", action="store_true",
                   help="take the output from another run's lease (only when that run is surely gone)")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("train", help="train CLIP with Ray Train on (enriched) shards")
    p.add_argument("--data", required=True, help="folder or s3:// prefix of (enriched) shards")
    p.add_argument("--output", required=True, help="run storage (checkpoints, summary): folder or s3:// prefix")
    p.add_argument("--model", help="open_clip model name, e.g. ViT-B-16 (default), or veclip-tiny")
    p.add_argument("--name", help="run name; rerun with the same name and output to resume")
    p.add_argument("--caption-mode", choices=("alttext", "vecap", "mix", "laclip", "weighted"), help="caption choice per sample (default mix)")
    _config_flags(p, "train", "default: ViT-B-16 on 8 GPU workers; tiny: 8M-param CLIP on 2 CPU workers", "steps=2000, captions.p_vecap=0.3, scale.num_workers=4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a checkpoint as a folder stock open_clip loads")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest checkpoint is used)")
    p.add_argument("--out", required=True, help="local output folder")
    _storage_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="zero-shot classification and image<->text retrieval on a Parquet eval set")
    p.add_argument("--model", required=True, help="an exported folder, a training run/checkpoint folder, or an open_clip model name (with --pretrained)")
    p.add_argument("--data", required=True, help="eval shards: folder or s3:// prefix")
    p.add_argument("--out", help="write eval.json and eval.md here")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file, with a model name")
    p.add_argument("--label-column", default="label_shape", help="class-name column for zero-shot (default label_shape)")
    p.add_argument("--caption-column", default="caption", help="caption (string or list) column for retrieval (default caption)")
    p.add_argument("--classes", help='JSON file with "classnames" (default: the eval set\'s _classes.json)')
    p.add_argument("--templates", default="generic", help="prompt templates: generic, imagenet, scenes (the sample data's caption style), or a JSON file")
    p.add_argument("--workers", type=int, default=0, help="embed images over up to N Ray actors (default 0: in this process)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per embedding actor with --workers (default 0)")
    _columns_flag(p)
    _storage_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert-eval", help="convert class folders (ImageNet-style) or a COCO captions JSON into an eval set")
    p.add_argument("format", choices=("folders", "coco"))
    p.add_argument("source", help="folders: ROOT with one folder per class; coco: the captions JSON")
    p.add_argument("--images", help="coco: the folder of the images")
    p.add_argument("--class-names", help="folders: JSON list of human class names, in sorted-folder order")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    _storage_flags(p)
    p.set_defaults(func=cmd_convert_eval)

    p = sub.add_parser("demo", help="the main job on built-in sample data (local)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--rows", type=int, default=400, help="train rows of sample data (default 400)")
    p.add_argument("--seed", type=int, default=0)
    _storage_flags(p)
    p.set_defaults(func=cmd_demo)

    address_help = "the cluster's dashboard URL, e.g. http://head:8265 (default: RAY_ADDRESS)"
    p = sub.add_parser("submit", help="run a stage as a Ray job on a cluster: veclip submit rewrite --address URL [rewrite flags]",
                       description="Submit a stage as a Ray job. Flags not listed here are the stage's own (see veclip STAGE --help); "
                                   "its paths are read on the cluster, so use s3:// URLs.")
    p.add_argument("stage", choices=("rewrite", "train", "eval"))
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--no-wait", action="store_true", help="return after submitting (default: wait and exit with the job's status)")
    p.add_argument("--python", default="python", help="the driver's interpreter on the cluster (default python, the head's PATH)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE", help="environment for the job (repeatable)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="send this environment's NAME (a token, a key) to every process of the job, outside the job's "
                        "visible metadata (repeatable); secret-named --env values are refused")
    p.add_argument("--ship-code", action="store_true", help="upload this machine's veclip package instead of using the installed one")
    p.add_argument("--working-dir", help="a local folder to upload as the job's working directory")
    p.add_argument("--runtime-env", help="a JSON/YAML file of further runtime_env fields")
    p.add_argument("--job-id", help="the submission id (default: Ray picks one)")
    p.set_defaults(func=cmd_submit, stage_args=[])

    p = sub.add_parser("jobs", help="status, logs, stop or list of Ray jobs on a cluster")
    p.add_argument("action", choices=("status", "logs", "stop", "list"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "submit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.stage_args = extra  # the stage's own flags, checked by the stage's parser before submitting
    from veclip.jobs import load_job_secrets
    from veclip.lease import LeaseHeld

    load_job_secrets()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError, LeaseHeld) as err:
        # bad config, input, address or environment, or a busy output: say what, not a traceback
        print(f"veclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
