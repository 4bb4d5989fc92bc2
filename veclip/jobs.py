"""``veclip submit`` and ``veclip jobs``: run the stages as Ray jobs on a cluster.

A stage job is the stage's own command line (``python -m veclip.cli rewrite ...``)
submitted through Ray's ``JobSubmissionClient``, so ``ray job submit -- python -m
veclip.cli rewrite ...`` is the same job. The stage arguments are parsed and the
stage config built here first, so a typo fails before anything reaches the
cluster. Paths in the arguments are read on the cluster, so use ``s3://`` URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("rewrite", "train", "eval")
TERMINAL_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


@dataclass(frozen=True)
class SubmitConfig:
    stage: str
    stage_args: tuple[str, ...]
    address: str | None = None  # the dashboard URL; None: RAY_ADDRESS / RAY_API_SERVER_ADDRESS
    python: str = "python"  # the cluster's interpreter for the driver (a job runs with the head's PATH)
    env: dict[str, str] = field(default_factory=dict)
    ship_code: bool = False  # upload this machine's veclip package (py_modules) instead of the installed one
    working_dir: str | None = None
    runtime_env_file: str | None = None  # extra runtime_env fields, JSON or YAML
    job_id: str | None = None

    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", "veclip.cli", self.stage, *self.stage_args])

    def runtime_env(self) -> dict:
        env: dict = {}
        if self.runtime_env_file:
            env.update(_load_mapping(self.runtime_env_file))
        if self.env:
            env["env_vars"] = {**env.get("env_vars", {}), **self.env}
        if self.ship_code:
            env["py_modules"] = [*env.get("py_modules", []), str(Path(__file__).parent)]
        if self.working_dir:
            env["working_dir"] = self.working_dir
        return env


def _load_mapping(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def auth_headers() -> dict[str, str]:
    """A bearer token for clusters with token auth (Ray 2.60's default), looked up where
    Ray keeps it: ``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def check_stage_args(stage: str, stage_args: list[str]) -> None:
    """Parse the stage's arguments and build its config here (no I/O, no models), so bad
    flags or ``--set`` keys fail on the user's machine, not minutes later on the cluster."""
    from veclip.cli import build_parser
    from veclip.config import apply_overrides, load_config_file

    args = build_parser().parse_args([stage, *stage_args])  # exits 2 with argparse's message
    if stage == "rewrite":
        from veclip.rewrite.config import preset

        config = preset(args.preset)
        config = load_config_file(config, args.config) if args.config else config
        apply_overrides(config, list(args.set))
    elif stage == "train":
        from veclip.train.config import build_config

        build_config(args.preset, args.config, list(args.set))


def submit(config: SubmitConfig, agent_wait_s: float = 90.0) -> str:
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}: use one of {', '.join(STAGES)}")
    check_stage_args(config.stage, list(config.stage_args))
    jobs, deadline = client(config.address), time.monotonic() + agent_wait_s
    while True:
        try:
            return jobs.submit_job(
                entrypoint=config.entrypoint(), runtime_env=config.runtime_env() or None, submission_id=config.job_id,
                metadata={"veclip_stage": config.stage},
            )
        except RuntimeError as err:  # a head that has just started has no job agent yet
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow_logs(address: str | None, job_id: str, out=print) -> None:
    """Stream the job's logs until it ends."""

    async def tail():
        async for lines in client(address).tail_job_logs(job_id):
            out(lines, end="")

    asyncio.run(tail())


def wait(address: str | None, job_id: str, poll_s: float = 2.0) -> str:
    """Block until the job ends; its final status name."""
    jobs = client(address)
    while True:
        status = jobs.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    return TERMINAL_EXIT.get(status, 1)
