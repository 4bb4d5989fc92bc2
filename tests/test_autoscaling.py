"""A rewrite pool grows as Ray's autoscaler adds nodes, and the nodes go when idle (issue 31), on this
machine: Ray's fake multi-node provider launches and terminates real local nodes (each its own raylet
and object store) as a cloud provider would launch VMs.

Ray's own ``AutoscalingCluster`` cannot be used: it runs ``ray stop --force`` (every Ray on the machine)
and reads an example YAML the pip wheel lacks. The test starts the head itself (``ray start --head
--block`` in its own session, so every process it and its autoscaler start is found by PID and stopped),
with the cluster config written here, and leaves no cluster address behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import descendants, free_port, ray_address_file_kept

from veclip.shards.layout import CURRENT
from veclip.world.generate import SampleConfig, generate

pytestmark = pytest.mark.long

RAY = str(Path(sys.executable).with_name("ray"))
# the test's own head: no token (the driver and the fake nodes need no secret), the fake provider on
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}


def cluster_config(gcs: str, max_nodes: int) -> dict:
    """An autoscaling cluster of a CPU-less head and up to ``max_nodes`` one-CPU worker nodes, none at the
    start, an idle node terminated after 6 s (the fields of Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "veclip-fake",
        "max_workers": max_nodes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {"CPU": 1, "object_store_memory": 300_000_000},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        **{key: {} for key in ("auth", "docker", "file_mounts")},
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts_sync_continuously": False,
    }


def raylets(head: subprocess.Popen) -> int:
    """The cluster's nodes now: the raylets among the head's processes (the fake nodes are its children)."""
    return sum("/raylet/raylet " in cmd for cmd in descendants(head.pid).values())


@contextlib.contextmanager
def autoscaling_cluster(tmp_path: Path, max_nodes: int):
    """(the head process, its address); stopped after by PID, with Ray's last-cluster address as it was."""
    import ray._private.services as services

    port, ip = free_port(), services.get_node_ip_address()
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps(cluster_config(f"{ip}:{port}", max_nodes)))
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"]
    cmd += [f"--autoscaling-config={config}"]
    with ray_address_file_kept():
        log = open(tmp_path / "head.log", "w")
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | ENV, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in (tmp_path / "head.log").read_text():
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(0.5)
            yield head, f"{ip}:{port}"
        finally:
            started = descendants(head.pid)
            os.killpg(head.pid, signal.SIGKILL)
            for pid in started:  # the fake nodes' processes, whatever session they started in
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            head.wait(30)
            log.close()


@pytest.mark.slow
def test_the_pool_grows_onto_nodes_the_autoscaler_adds_and_they_go_when_idle(tmp_path, vllm_python):
    """A cluster with no worker node and a rewrite pool of up to 3 one-CPU actors: the autoscaler launches
    nodes for the pending actors, the pool grows onto them (the summary's pool over time), every key is
    written once, and the idle nodes are terminated after the run."""
    # ~2 min of work for one actor: long enough for the nodes launched on its demand to start engines
    sample = SampleConfig(str(tmp_path / "sample"), rows=4800, eval_rows=1, shards=48, image_size=32)
    generate(sample, log=lambda *_: None)
    out = tmp_path / "out"
    with autoscaling_cluster(tmp_path, max_nodes=3) as (head, address):
        assert raylets(head) == 1  # the head alone
        cmd = [str(Path(sys.executable).with_name("veclip")), "rewrite", "--input", str(tmp_path / "sample" / "train")]
        cmd += ["--output", str(out), "--preset", "tiny", "--mode", "laclip"]
        pool = ("laclip.pool.min_actors=1", "laclip.pool.max_actors=3", "laclip.pool.num_cpus=1")
        cmd += [word for s in pool for word in ("--set", s)]
        env = os.environ | ENV | {"RAY_ADDRESS": address, "VECLIP_VLLM_PYTHON": vllm_python, "VECLIP_VERBOSE": "0"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((out / CURRENT.summary).read_text())
        timeline = summary["pool_over_time"]
        assert max(t["actors"] for t in timeline) >= 2 and max(t["nodes"] for t in timeline) >= 2, timeline
        assert timeline[0]["actors"] < max(t["actors"] for t in timeline), timeline  # it grew
        assert "pool over the run:" in run.stdout, run.stdout
        keys = [
            k for p in sorted(out.glob("*.parquet")) for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()
        ]
        sources = [
            k
            for p in sorted((tmp_path / "sample" / "train").glob("*.parquet"))
            for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()
        ]
        assert sorted(keys) == sorted(sources)
        deadline = time.monotonic() + 120  # idle for 6 s, then terminated by the autoscaler
        while raylets(head) > 1:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
