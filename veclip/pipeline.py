"""Pipelines: a chain of stages in one file, run locally or as a sequence of Ray jobs, resumable by step.

A pipeline file (YAML; the shipped ones are package data, ``veclip/pipelines/``, linked as ``pipelines/``)
names its steps, each the command a user would type after ``veclip``::

    name: laclip-3m
    about: LaCLIP rewrites, then CLIP training on them
    vars: {steps: 11700, actors: 4}              # defaults; --var NAME=VALUE overrides
    steps:
      - name: captions
        run: rewrite --input {input} --output {output}/captions --mode laclip --set laclip.pool.max_actors={actors}
      - name: clip
        run: train --input {output}/captions --output {output}/runs --name clip --set steps={steps}
      - name: eval
        when: "{eval_data}"                       # skipped when empty
        run: eval --model {output}/runs/clip --input {eval_data} --output {output}/eval

``{input}`` and ``{output}`` are the run's; every other ``{name}`` is a var. A
step that succeeds leaves ``<output>/_pipeline/<step>.json`` (its command, its
seconds): a rerun skips the steps whose record holds the same command and
resumes at the first that is not finished. The stages themselves are
exactly-once (rewrite, score) or resume exactly (train), so a step killed
midway also goes on where it stopped.

A step run here dies with the pipeline. A step submitted as a Ray job (``--submit``)
runs on the cluster whatever happens to the pipeline: its job id is recorded before
it is submitted, and a rerun attaches to that job while it still runs (or counts it
done once it succeeded) instead of submitting the step a second time.
"""

from __future__ import annotations

import functools
import posixpath
import shlex
import signal
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from veclip.command import Command, Flag
from veclip.storage import Location, StorageOptions, read_json, write_json

RECORDS_DIR = "_pipeline"  # <output>/_pipeline/<step>.json: the steps finished
SHIPPED = Path(__file__).parent / "pipelines"  # package data: found from a wheel, an editable install, an image


@dataclass(frozen=True)
class Step:
    name: str
    run: str  # the command after `veclip`, with {placeholders}
    when: str = ""  # a placeholder expression: the step is skipped when it formats to ""


@dataclass(frozen=True)
class Pipeline:
    name: str
    about: str
    steps: tuple[Step, ...]
    vars: dict = field(default_factory=dict)

    def commands(self, input: str, output: str, overrides: dict[str, str]) -> list[tuple[Step, list[str] | None]]:
        """Each step with its command line (None: skipped by its ``when``), placeholders filled."""
        unknown = sorted(set(overrides) - set(self.vars))
        if unknown:
            raise ValueError(f"pipeline {self.name}: no var {unknown[0]!r}; its vars: {sorted(self.vars)}")
        values = {
            **{k: str(v) for k, v in self.vars.items()},
            **overrides,
            "input": input,
            "output": output.rstrip("/"),
        }
        out = []
        for step in self.steps:
            when = _fill(step.when, values, self.name, step.name) if step.when else "yes"
            out.append((step, shlex.split(_fill(step.run, values, self.name, step.name)) if when.strip() else None))
        return out


def _fill(text: str, values: dict, pipeline: str, step: str) -> str:
    missing = [n for _, n, _, _ in string.Formatter().parse(text) if n and n not in values]
    if missing:
        raise ValueError(f"pipeline {pipeline}, step {step}: {{{missing[0]}}} is not a var, nor input or output")
    return text.format_map(values)


@dataclass(frozen=True)
class PipelineConfig:
    pipeline: str = ""
    """a shipped pipeline's name (veclip pipeline list) or a YAML file"""
    input: str = ""
    """the data the first step reads: a folder or s3:// prefix of Parquet shards"""
    output: str = ""
    """the run's folder or s3:// prefix: every step writes below it"""
    vars: tuple[str, ...] = ()
    """NAME=VALUE overrides of the pipeline's vars"""
    submit: bool = False
    """run the submittable steps as Ray jobs (veclip submit), the others here"""
    address: str | None = None
    """the cluster's job address for --submit (default: RAY_ADDRESS)"""
    dry_run: bool = False
    """print the commands, run nothing"""


def available() -> dict[str, Path]:
    """The shipped pipelines, by name."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def load(spec: str) -> Pipeline:
    import yaml

    path = Path(spec) if spec.endswith((".yaml", ".yml")) else available().get(spec)
    if path is None or not path.exists():
        raise FileNotFoundError(f"pipeline: no pipeline {spec!r}; shipped: {sorted(available())}, or give a YAML file")
    data = yaml.safe_load(path.read_text())
    steps = tuple(Step(**s) for s in data["steps"])
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline {path}: step names repeat: {names}")
    return Pipeline(data.get("name", path.stem), data.get("about", ""), steps, data.get("vars") or {})


def parse_vars(items: tuple[str, ...]) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (_, sep, _) in zip(items, pairs) if not sep]
    if bad:
        raise ValueError(f"bad --var {bad[0]!r}: expected NAME=VALUE")
    return {k.strip(): v for k, _, v in pairs}


def check_commands(pipeline: Pipeline, steps: list[tuple[Step, list[str] | None]], check: Callable) -> None:
    """Every step's command through ``check(stage, args)`` (the stage registry's parser and config build),
    before the first one runs."""
    for step, command in steps:
        if command is None:
            continue
        try:
            check(command[0], command[1:])
        except SystemExit:  # argparse said why on stderr
            raise ValueError(
                f"pipeline {pipeline.name}, step {step.name}: bad command: veclip {shlex.join(command)}"
            ) from None
        except (KeyError, ValueError) as err:
            raise ValueError(f"pipeline {pipeline.name}, step {step.name}: {err}") from None


def _run_step(command: list[str]) -> int:
    """The step as its own ``veclip`` process, exactly as a user would type it. It dies with the pipeline: a
    pipeline killed (even by SIGKILL) must not leave its step writing on into an output that a rerun writes too."""
    return subprocess.run([sys.executable, "-m", "veclip.cli", *command], preexec_fn=_die_with_parent).returncode


def _submit_step(name: str, command: list[str], address: str | None, record: Callable[[dict], None], job, log) -> int:
    """The step as a Ray job (``veclip submit``, as a user would type it), attached to instead when ``job`` (the
    id an earlier run of the pipeline recorded) still runs. The id is recorded before the job is submitted."""
    from veclip import job_client as jobs

    status = jobs.job_status(address, job) if job else None
    if status in ("PENDING", "RUNNING"):
        log(f"pipeline: step {name}: job {job} (submitted by an earlier run) is still {status.lower()}: attaching")
        return jobs.exit_code(jobs.wait(address, job))
    if status == "SUCCEEDED":
        log(f"pipeline: step {name}: job {job} (submitted by an earlier run) succeeded")
        return 0
    job = f"veclip-{name}-{uuid.uuid4().hex[:12]}"
    record({"job_id": job, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    address_args = ["--address", address] if address else []
    return _run_step(["submit", command[0], *address_args, "--job-id", job, *command[1:]])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent process dies (Linux's PR_SET_PDEATHSIG; elsewhere
    nothing: a step outlives a killed pipeline there)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_pipeline(
    config: PipelineConfig,
    options: StorageOptions | None = None,
    log=print,
    *,
    check: Callable | None = None,
    submittable: frozenset[str] = frozenset(),
) -> int:
    """Run every step not yet finished, in order; a process exit code (the failed step's). ``check(stage, args)``
    vets each command first (the CLI passes the stage registry's); ``submittable``: the stages --submit sends."""
    if not config.input or not config.output:
        raise ValueError("pipeline: --input and --output are required")
    pipeline = load(config.pipeline)
    records = Location(config.output, options or StorageOptions()).child(RECORDS_DIR)
    steps = pipeline.commands(config.input, config.output, parse_vars(config.vars))
    if check:
        check_commands(pipeline, steps, check)
    log(f"pipeline {pipeline.name}: {len(steps)} steps -> {config.output}")
    for n, (step, command) in enumerate(steps, 1):
        head = f"pipeline {pipeline.name}: [{n}/{len(steps)}] {step.name}"
        if command is None:
            log(f"{head}: skipped (its condition {step.when!r} is empty)")
            continue
        if config.dry_run:  # no storage is read: the commands as they would run on a fresh output
            log(f"{head}: veclip {shlex.join(command)}")
            continue
        record_path = records.join(step.name + ".json")
        record = read_json(records.fs, record_path) or {}
        if record.get("command") != command:
            record = {"step": step.name, "command": command}  # another command: nothing of it is reused
        elif record.get("finished_at"):
            log(f"{head}: done ({record['seconds']:.0f}s, {record['finished_at']})")
            continue
        log(f"{head}: veclip {shlex.join(command)}")
        start = time.perf_counter()
        if config.submit and command[0] in submittable:
            note = functools.partial(_note, records.fs, record_path, record)
            code = _submit_step(step.name, command, config.address, note, record.get("job_id"), log)
        else:
            code = _run_step(command)
        if code != 0:
            log(
                f"pipeline {pipeline.name}: step {step.name} failed (exit {code}); "
                "rerun the same command to resume from it"
            )
            return code
        _note(
            records.fs,
            record_path,
            record,
            {"seconds": time.perf_counter() - start, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
    if config.dry_run:
        log(f"pipeline {pipeline.name}: dry run: every step's command parses and builds its config; nothing ran")
    else:
        log(f"pipeline {pipeline.name}: done; step records in {posixpath.join(config.output, RECORDS_DIR)}/")
    return 0


def _note(fs, path: str, record: dict, fields: dict) -> None:
    """Add ``fields`` to a step's record, durably, now."""
    record.update(fields)
    write_json(fs, path, record)


def step_seconds(output: str, options: StorageOptions | None = None) -> dict[str, float]:
    """Each finished step's seconds, from its record."""
    records = Location(output, options or StorageOptions()).child(RECORDS_DIR)
    if not records.exists():
        return {}
    out = {}
    for entry in sorted(records.fs.ls(records.path, detail=False)):
        record = read_json(records.fs, entry) if entry.endswith(".json") else None
        if record and "seconds" in record:  # (a step submitted and not yet finished has none)
            out[record["step"]] = record["seconds"]
    return out


COMMAND = Command(
    "pipeline",
    "run a pipeline (a chain of stages in one file) on an input, resuming at its first unfinished step",
    PipelineConfig,
    "veclip.cli.registry:run_pipeline_command",  # its steps are checked by the commands they name
    flags=(
        Flag("pipeline", "pipeline", metavar="PIPELINE"),
        Flag("input", metavar="URL"),
        Flag("output", aliases=("--out",), metavar="URL"),
        Flag("vars", "--var", metavar="NAME=VALUE"),
        "submit",
        "address",
        "dry_run",
    ),
)
