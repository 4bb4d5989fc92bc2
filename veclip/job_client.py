"""Ray jobs on a cluster, as a client sees them: the connection (with Ray's token auth), a job's status,
waiting for it, its logs. Apart from :mod:`veclip.cli.jobs` (which builds and submits stage jobs) so that a
pipeline can attach to a job it submitted earlier without importing the stage registry.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

TERMINAL_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def auth_headers() -> dict[str, str]:
    """A bearer token for clusters with token auth (Ray 2.60's default), looked up where
    Ray keeps it: ``RAY_AUTH_TOKEN``, the file at ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


TOKEN_OVER_HTTP_ENV = "VECLIP_SEND_TOKEN_OVER_HTTP"  # 1: send the cluster's token over plain http anyway


def check_token_transport(address: str | None, headers: dict[str, str]) -> None:
    """Refuse to send the cluster's token in clear text to another host (plain ``http://`` beyond loopback)."""
    from urllib.parse import urlparse

    url = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    loopback = parsed.hostname in ("localhost", "::1") or (parsed.hostname or "").startswith("127.")
    if headers and parsed.scheme == "http" and not loopback and os.environ.get(TOKEN_OVER_HTTP_ENV) != "1":
        raise ValueError(
            f"the cluster's auth token would go in clear text over http to {parsed.hostname}: use https (a TLS "
            f"proxy in front of the dashboard) or a tunnel to 127.0.0.1 (ssh -L 8265:localhost:8265 HEAD), or "
            f"set {TOKEN_OVER_HTTP_ENV}=1 on a network you trust"
        )


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    check_token_transport(address, headers)
    return JobSubmissionClient(address, headers=headers)


def follow_logs(address: str | None, job_id: str, out=print) -> None:
    """Stream the job's logs until it ends."""

    async def tail():
        async for lines in client(address).tail_job_logs(job_id):
            out(lines, end="")

    asyncio.run(tail())


def job_status(address: str | None, job_id: str) -> str | None:
    """The job's status name, None when the cluster knows no such job (never submitted, or another cluster)."""
    try:
        return str(client(address).get_job_status(job_id).value)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            return None
        raise


def wait(address: str | None, job_id: str, poll_s: float = 2.0) -> str:  # a status poll: cheap, far below a step
    """Block until the job ends; its final status name."""
    jobs = client(address)
    while True:
        status = jobs.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    return TERMINAL_EXIT.get(status, 1)
