"""Every `veclip` command README, docs/ and the cluster specs print, run as printed (issue 30).

Only bucket URLs and model names are substituted: every ``s3://NAME/...`` becomes a prefix of a bucket
on the local S3 server (moto), where every documented input holds sample shards; a score model becomes
a tiny CLIP exported here. Then, by what the command needs:

* planning stages (rewrite, score, train, pipeline) run with ``--dry-run``: their own validation and a
  plan from a real listing of the inputs; ``submit STAGE ...`` (and a RayJob's entrypoint) gets the
  checks ``veclip submit`` makes, then the stage's dry run; ``pipeline --submit`` runs as ``--dry-run``;
* read-only commands on data (validate, show) run in full; ``simulate`` runs in full on 300 shards;
* commands that need a cluster or a finished run (jobs, status, export, eval of a run's model) are
  parsed and their config built and validated, as ``veclip submit`` would.

A command with a placeholder (``<id>``, ``HEAD``) is parsed and validated only; one abbreviated with
``...`` is not a command and is left out.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, veclip_cli

DOCS = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLANNING = {"rewrite", "score", "train"}
SUBMIT_ONLY = {"--address": 1, "--follow": 0, "--no-wait": 0, "--python": 1, "--env": 1, "--secret": 1, "--job-id": 1}
STAGE_NAMES = {"sample", "validate", "import", "rewrite", "train", "score", "export", "eval", "show", "status", "plan"}
PLACEHOLDER = re.compile(r"<[a-z-]+>|\bHEAD\b|raysubmit_")
ABBREVIATED = re.compile(r"\.\.\.|…")


def documented() -> list[tuple[str, list[str]]]:
    """``(where, argv after 'veclip')`` of every command in the docs' shell blocks and the RayJobs."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if not line.startswith("veclip ") or "[--" in line:  # the synopsis block is tested against the parser
                    continue
                out.append((f"{path.relative_to(REPO)}: {line[:60]}", shlex.split(line, comments=True)[1:]))
    for path in sorted((REPO / "cluster" / "kuberay").glob("rayjob-*.yaml")):
        words = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
        out.append((f"{path.relative_to(REPO)}: entrypoint", ["submit", words[3], *words[4:]]))
    return out


COMMANDS = documented()


def test_the_docs_print_commands():
    """The extraction finds what the docs hold (so an empty list cannot pass the test below)."""
    names = {argv[0] for _, argv in COMMANDS}
    assert {"validate", "pipeline", "submit", "rewrite", "train", "score", "show", "status"} <= names
    assert len(COMMANDS) >= 15


def _strip_submit(argv: list[str]) -> list[str]:
    """``submit STAGE ...`` -> ``STAGE ...`` without submit's own flags."""
    out, skip = [], 0
    for word in argv[1:]:
        if skip:
            skip -= 1
            continue
        flag = word.split("=", 1)[0]
        if flag in SUBMIT_ONLY:
            skip = SUBMIT_ONLY[flag] if "=" not in word else 0
            continue
        out.append(word)
    return out


def _inputs(argv: list[str]) -> list[str]:
    """The URLs a command reads: --input/--data, and validate's and show's positional URL."""
    urls = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--input", "--data")]
    if argv[0] in ("validate", "show") and len(argv) > 1:
        urls.append(argv[1])
    return [u for u in urls if u.startswith("s3://")]


@pytest.fixture(scope="module")
def world(s3_endpoint, sample_root, tmp_path_factory):
    """A bucket where every documented input holds sample shards (with a VeCap column), and a tiny model."""
    import s3fs

    from veclip.storage import StorageOptions

    options = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs = s3fs.S3FileSystem(**options.s3fs_kwargs())
    bucket = "veclip-docs"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    local = tmp_path_factory.mktemp("docs-shards")
    for path in sorted((sample_root / "train").glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.append_column("vecap", table.column("ref_caption")), local / path.name)
    for _, argv in COMMANDS:
        for url in _inputs(_strip_submit(argv) if argv[0] == "submit" else argv):
            prefix = _bucket_url(url, bucket)[len("s3://") :].rstrip("/")
            for path in sorted(local.glob("*.parquet")):
                fs.put(str(path), f"{prefix}/{path.name}")
    from test_eval_metrics import _random_tiny_export

    model = _random_tiny_export(tmp_path_factory.mktemp("docs-model") / "model")
    return bucket, ["--s3-endpoint", s3_endpoint], str(model)


def _bucket_url(url: str, bucket: str) -> str:
    return re.sub(r"^s3://([^/]+)", lambda m: f"s3://{bucket}/{m.group(1)}", url)


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    return (
        [*argv[: argv.index(flag) + 1], value, *argv[argv.index(flag) + 2 :]] if flag in argv else [*argv, flag, value]
    )


def _substituted(argv: list[str], bucket: str, model: str) -> list[str]:
    out = [_bucket_url(w, bucket) if w.startswith("s3://") else w for w in argv]
    if out[0] == "score" and "--model" in out:
        out[out.index("--model") + 1] = model  # a model name: the tiny CLIP exported here
    return out


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_runs_as_printed(where, argv, world, sample_root, tmp_path):
    from veclip.cli.jobs import check_stage_args

    bucket, storage, model = world
    world_sample = sample_root
    if ABBREVIATED.search(shlex.join(argv)):
        return  # "veclip train ... --add-captions URL ...": an abbreviation, not a command
    if argv[0] == "submit":
        check_stage_args(argv[1], _strip_submit(argv)[1:])  # what `veclip submit` refuses before sending
        argv = _strip_submit(argv)
    needs_a_run = any(w.startswith("runs/demo/") and not w.startswith("runs/demo/data/") for w in argv)
    if PLACEHOLDER.search(shlex.join(argv)) or needs_a_run or argv[0] in ("jobs", "status", "export", "eval", "plan"):
        if argv[0] in STAGE_NAMES:
            check_stage_args(argv[0], argv[1:])  # parsed, built and validated; it needs a finished run to run
        return
    argv = _substituted(argv, bucket, model)
    if argv[0] == "pipeline":
        argv = [w for w in argv if w != "--submit"]
        argv = [w for i, w in enumerate(argv) if w != "--address" and (i == 0 or argv[i - 1] != "--address")]
        argv += [] if "--dry-run" in argv else ["--dry-run"]
    elif argv[0] in PLANNING:
        argv += ["--dry-run"]
    elif argv[0] == "simulate":  # as printed, on 300 shards and one seed (a 30,000-shard run takes minutes)
        argv = _with(_with(argv, "--shards", "300"), "--seeds", "1")
    if any(w.startswith("s3://") for w in argv):
        argv += storage
    demo = tmp_path / "runs" / "demo" / "data"  # `make demo`'s sample data, where the docs' examples read it
    demo.mkdir(parents=True)
    for split in ("train", "eval"):
        shutil.copytree(world_sample / split, demo / split)
    exe = Path(sys.executable).with_name("veclip")
    result = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"{where}\nveclip {shlex.join(argv)}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    if "--dry-run" in argv and argv[0] in PLANNING:
        assert "nothing was started or written" in result.stdout


def test_show_writes_its_page_where_the_docs_say(world, tmp_path):
    """README's `veclip show ... --html gallery.html` writes the page beside the user (here: tmp_path)."""
    bucket, storage, _ = world
    cmd = next(argv for _, argv in COMMANDS if argv[0] == "show" and "--html" in argv)
    argv = _substituted(cmd, bucket, "")
    argv[argv.index("--html") + 1] = str(tmp_path / Path(argv[argv.index("--html") + 1]).name)
    assert veclip_cli(*argv, *storage).returncode == 0
    assert (tmp_path / "gallery.html").stat().st_size > 1000
    assert pa  # pyarrow is imported for the fixture's tables
