"""``veclip submit`` and ``veclip jobs``: run the stages as Ray jobs on a cluster.

A stage job is the stage's own command line (``python -m veclip.cli rewrite ...``)
submitted through Ray's ``JobSubmissionClient``, so ``ray job submit -- python -m
veclip.cli rewrite ...`` is the same job. The stage arguments are parsed and the
stage config built here first, so a typo fails before anything reaches the
cluster. Paths in the arguments are read on the cluster, so use ``s3://`` URLs.

Secrets: a job's entrypoint and runtime_env are its public metadata (the
dashboard, ``ray job list`` and the state API show them to everyone who can
reach the cluster), so secret-looking values there are refused. ``--secret
NAME`` sends the value of ``NAME`` from this environment in a package of the
job's own (runtime_env ``py_modules``, stored like code, shown nowhere) that
Ray's ``worker_process_setup_hook`` loads into the environment of each of the
job's processes, and ``veclip.cli`` into the driver's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from veclip.config import SECRET_NAME, TOKEN_SHAPES, secret_values
from veclip.job_client import client

SECRETS_PACKAGE = "veclip_job_secrets"
SECRETS_FLAG = "VECLIP_JOB_SECRETS"  # set in the job: the driver loads the package too
_SECRETS_LOADER = '''"""One veclip job's secrets, set into each of its processes' environment."""
import json
import os
import pathlib


def load():
    os.environ.update(json.loads((pathlib.Path(__file__).parent / "values.json").read_text()))
'''


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
    secrets: tuple[str, ...] = ()  # names of variables of this environment, sent outside the job's metadata

    def entrypoint(self) -> str:
        return shlex.join([self.python, "-m", "veclip.cli", self.stage, *self.stage_args])

    def runtime_env(self, secrets_package: str | None = None) -> dict:
        env: dict = {}
        if self.runtime_env_file:
            env.update(_load_mapping(self.runtime_env_file))
        if self.env:
            env["env_vars"] = {**env.get("env_vars", {}), **self.env}
        if self.ship_code:
            env["py_modules"] = [*env.get("py_modules", []), str(Path(__file__).parent)]
        if self.working_dir:
            env["working_dir"] = self.working_dir
        if secrets_package:
            env["py_modules"] = [*env.get("py_modules", []), secrets_package]
            env["worker_process_setup_hook"] = f"{SECRETS_PACKAGE}.load"
            env["env_vars"] = {**env.get("env_vars", {}), SECRETS_FLAG: "1"}
        return env

    def check_no_visible_secrets(self, stage_config) -> None:
        """Refuse secret-looking values where the job's metadata would show them."""
        where = "use --secret NAME to send it from this environment, or set it on the cluster's nodes"
        env_vars = {
            **(_load_mapping(self.runtime_env_file).get("env_vars", {}) if self.runtime_env_file else {}),
            **self.env,
        }
        named = sorted(k for k, v in env_vars.items() if SECRET_NAME.search(k) or TOKEN_SHAPES.search(str(v)))
        if named:
            raise ValueError(
                f"submit: {', '.join(named)} would be shown to everyone who can list the cluster's jobs "
                f"(a job's runtime_env is public metadata); {where}"
            )
        if secret_values(dataclasses.asdict(stage_config)):
            raise ValueError(
                f"submit: the stage arguments hold a secret-named value, which the job's entrypoint would show; {where}"
            )


def load_job_secrets() -> None:
    """In a job submitted with ``--secret``: set its secrets in this (the driver's) environment."""
    if os.environ.get(SECRETS_FLAG):
        import importlib

        importlib.import_module(SECRETS_PACKAGE).load()


def _secrets_package(names: tuple[str, ...]) -> str:
    """A folder holding the secrets package (the caller removes its parent once uploaded)."""
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise ValueError(f"submit: --secret {', '.join(missing)}: not set in this environment")
    package = Path(tempfile.mkdtemp(prefix="veclip-secrets-")) / SECRETS_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text(_SECRETS_LOADER)
    values = package / "values.json"
    values.touch(mode=0o600)
    values.write_text(json.dumps({n: os.environ[n] for n in names}))
    return str(package)


def _load_mapping(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def check_stage_args(stage: str, stage_args: list[str]):
    """The stage's config, built here from its arguments and checked as the stage checks it before a run
    (no I/O, no models), so bad flags, ``--set`` keys or settings the stage refuses fail on the user's
    machine, not minutes later on the cluster. ``--dry-run`` on the stage also plans the work."""
    from veclip.cli.registry import checked_args

    return checked_args(stage, stage_args)  # argparse exits 2 with its message


def submit(config: SubmitConfig, agent_wait_s: float = 90.0) -> str:  # a just-started head's job agent: ~10-60 s
    from veclip.cli.flags import parse_command_args
    from veclip.cli.registry import command, submittable

    if config.stage not in submittable():
        raise ValueError(f"unknown stage {config.stage!r}: use one of {', '.join(sorted(submittable()))}")
    stage_config = parse_command_args(command(config.stage), list(config.stage_args))
    config.check_no_visible_secrets(stage_config)  # first: a refusal below may quote the secret's setting
    check_stage_args(config.stage, list(config.stage_args))
    package = _secrets_package(config.secrets) if config.secrets else None
    try:
        jobs, deadline = client(config.address), time.monotonic() + agent_wait_s
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=config.entrypoint(),
                    runtime_env=config.runtime_env(package) or None,
                    submission_id=config.job_id,
                    metadata={"veclip_stage": config.stage},
                )
            except RuntimeError as err:  # a head that has just started has no job agent yet
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        if package:
            shutil.rmtree(Path(package).parent, ignore_errors=True)  # uploaded by now
