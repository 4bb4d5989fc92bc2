"""What a person sees: a stage's driver is quiet unless --verbose (VECLIP_VERBOSE) asks for Ray's own output."""

import os
import subprocess
import sys

import pytest

# A stage's driver in miniature: start Ray as the stages do, a worker that prints, a Ray Data pipeline.
DRIVER = """
import time, ray
from veclip.console import start_ray
start_ray()
@ray.remote
def shout():
    print("hello from a worker")
ray.get(shout.remote())
ray.data.range(8).map_batches(lambda batch: batch).materialize()
time.sleep(2)  # worker output reaches the driver asynchronously
ray.shutdown()
"""


def _run_driver(verbose: bool) -> str:
    env = {**os.environ, "VECLIP_VERBOSE": "1" if verbose else "0"}
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_unless_verbose(verbose):
    console = _run_driver(verbose)
    forwarded = "hello from a worker" in console
    ray_data = "Execution plan of Dataset" in console or "Running Dataset" in console
    if verbose:
        assert forwarded and ray_data, console[-3000:]
    else:
        assert not forwarded and not ray_data, console
        assert "ray: worker and engine logs in " in console
        assert "Token authentication is enabled" not in console  # Ray's notice on every local start
        assert len(console.splitlines()) <= 3, console  # our line, and Ray's one C++ notice (ray-project/ray#57733)


def test_the_verbose_flag_reaches_ray_workers(monkeypatch, tmp_path):
    from veclip import cli
    from veclip.console import VERBOSE_ENV, verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setattr(
        "veclip.train.trainer.run_train", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here"))
    )
    cli.main(["train", "--data", str(tmp_path), "--output", str(tmp_path), "--verbose"])
    assert verbose()  # set in the environment, which Ray jobs and workers inherit


def test_a_stale_ray_address_is_said_in_one_line_and_a_fresh_local_ray_starts(tmp_path):
    """A killed local cluster leaves its address in ray_current_cluster: plain ray.init() retries it forever.
    A stage says so in one line and starts its own local Ray instead."""
    import shutil
    import tempfile
    from pathlib import Path

    from conftest import free_port

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live below it
    try:
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        code = (
            "from veclip.console import start_ray; import ray; start_ray(); "
            "print('nodes', len(ray.nodes())); ray.shutdown()"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "is gone; starting a fresh local one" in result.stdout and "nodes 1" in result.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
