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

    monkeypatch.setenv(VERBOSE_ENV, "0")  # recorded, so the "1" main sets is undone after (no leak)
    monkeypatch.setattr(
        "veclip.train.trainer.run_train", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here"))
    )
    with pytest.raises(ValueError, match="stop here"):  # --verbose: the traceback, not one line
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


def test_ray_messages_to_the_driver_become_one_line_per_node_lost(tmp_path, monkeypatch):
    """What Ray's error listener would print on the driver's console (raylet dumps, retry warnings, a node
    marked dead) goes whole to a file; the console gets one line per node lost, once."""
    import ray._private.worker as ray_worker

    from veclip.console import quiet_cluster_events

    printed, lines = [], []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    quiet_cluster_events(tmp_path / "events.log", lines.append)
    dead = (
        "The node with node id: 369bac401c576889de11 and address: 192.0.2.2 and node name: 192.0.2.2 has been "
        "marked dead because the detector has missed too many heartbeats from it."
    )
    dump = "Raylet is terminated. Termination is unexpected.\n    [state-dump] NodeManager ..."
    retry = "Task MapWorker(MapBatches(ShardRewriter)).submit failed. There are infinite retries remaining"
    for message in (dump, retry, dead, dead, retry):
        ray_worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["a worker's own line"], "pid": 42, "is_err": False}, ignore_prefix=False)
    assert lines == [
        "ray: node 369bac40… (192.0.2.2) lost; Ray restarts its actors and retries its work on the nodes left "
        f"(Ray's messages: {tmp_path / 'events.log'})"
    ]
    assert [d["pid"] for d in printed] == [42]  # anything not the raylet's is printed as Ray would
    logged = (tmp_path / "events.log").read_text()
    assert "[state-dump]" in logged and logged.count("marked dead") == 2 and "infinite retries" in logged
