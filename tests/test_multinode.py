"""veclip on a multi-node Ray cluster on this machine (issue 31): ``ray.cluster_utils.Cluster`` starts a head
and worker nodes, each its own raylet and object store; the stage attaches as a user's driver does
(``RAY_ADDRESS``); the node that hosts the stage's actors is removed without grace mid-run, as a spot
preemption does. Each test stops its own cluster and leaves no stale address behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import descendants, parquet_keys, random_tiny_clip, ray_address_file_kept

from veclip.shards.layout import CURRENT
from veclip.world.generate import SampleConfig, generate

pytestmark = pytest.mark.long


@contextlib.contextmanager
def _local_cluster(workers: int, cpus: int):
    """A head with no CPUs (drivers only, as cluster/ specs have it) and ``workers`` nodes of ``cpus`` CPUs;
    stopped after, with Ray's last-cluster address file as it was."""
    from ray.cluster_utils import Cluster

    with ray_address_file_kept():
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        nodes = [c.add_node(num_cpus=cpus) for _ in range(workers)]
        c.wait_for_nodes()
        try:
            yield c, nodes
        finally:
            c.shutdown()


@pytest.fixture
def cluster():
    """Two worker nodes of 3 CPUs: room for the rewrite's two actors on either."""
    with _local_cluster(2, 3) as c:
        yield c


def _hosts(node, name: str) -> bool:
    """Whether ``node`` (a cluster_utils node) runs an actor process named ``name`` (Ray titles worker
    processes ``ray::<Class>...``): the raylet's descendants, read from the OS, no Ray client needed."""
    raylet = node.all_processes["raylet"][0].process.pid
    return any(name in cmd for cmd in descendants(raylet).values())


def _start_laclip(tmp_path, address: str, vllm_python: str, *sets: str) -> tuple[subprocess.Popen, list[str], dict]:
    """A user's driver (the CLI, RAY_ADDRESS) rewriting 8 sample shards with the tiny LaCLIP model; returns
    once the first shard is done: (the driver, its command, its environment)."""
    generate(
        SampleConfig(str(tmp_path / "sample"), rows=160, eval_rows=1, shards=8, image_size=32), log=lambda *_: None
    )
    cmd = [str(Path(sys.executable).with_name("veclip")), "rewrite", "--input", str(tmp_path / "sample" / "train")]
    cmd += ["--output", str(tmp_path / "out"), "--preset", "tiny", "--mode", "laclip"]
    cmd += [word for s in sets for word in ("--set", s)]
    env = os.environ | {"RAY_ADDRESS": address, "VECLIP_VLLM_PYTHON": vllm_python, "VECLIP_VERBOSE": "0"}
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    done, deadline = tmp_path / "out" / CURRENT.done, time.monotonic() + 600
    while not (done.exists() and any(done.iterdir())):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.5)
    return driver, cmd, env


@pytest.mark.slow
def test_a_worker_node_lost_mid_rewrite_loses_no_key_and_says_so_in_a_line(cluster, tmp_path, vllm_python):
    c, workers = cluster
    out = tmp_path / "out"
    pool = ["laclip.pool.min_actors=2", "laclip.pool.max_actors=2", "laclip.pool.num_cpus=1"]
    driver, _, _ = _start_laclip(tmp_path, c.address, vllm_python, *pool)
    # a spot node gone, its raylet and actors with it: one with a try in flight (a node whose actor was idle
    # lost no work and the test failed, seen in a fresh-clone CI run)
    _remove_mid_shard(c, workers, out / CURRENT.attempts / "rewrite", driver)
    console, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, console
    keys = [k for p in sorted(out.glob("*.parquet")) for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()]
    sources = [
        k
        for p in sorted((tmp_path / "sample" / "train").glob("*.parquet"))
        for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()
    ]
    quarantined = [
        k
        for p in sorted(out.glob(f"{CURRENT.quarantine}/*.parquet"))
        for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()
    ]
    assert sorted(keys + quarantined) == sorted(sources)  # every key exactly once
    shards = json.loads((out / CURRENT.summary).read_text())["shards"]
    assert shards["retried"] >= 1 and shards["actors_lost"] >= 1 and shards["nodes_lost"] == 1, shards
    # told in a line or two, not Ray's raylet dumps: the node lost, and the shards retried in the summary
    assert "[state-dump]" not in console and "infinite retries remaining" not in console, console
    assert console.count("lost; Ray restarts its actors") == 1, console
    assert "retried" in console and "shard(s) whose earlier try was lost" in console, console
    assert "died mid-shard and were restarted by Ray, 1 of their node(s) lost" in console, console
    assert len(console.splitlines()) <= 40, console


def _remove_when_hosting(c, workers, name: str, driver: subprocess.Popen, seconds: float = 300):
    """Remove, without grace, the first worker node that runs an actor named ``name``; that node."""
    deadline = time.monotonic() + seconds
    while not (hosts := [n for n in workers if _hosts(n, name)]):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.2)
    c.remove_node(hosts[0], allow_graceful=False)
    return hosts[0]


def _remove_mid_shard(c, workers, attempts: Path, driver: subprocess.Popen, seconds: float = 300):
    """Remove, without grace, a worker node with a try in flight (its attempt record written and not yet
    removed, in ``attempts``): a node with an idle actor would lose no work, and test nothing."""
    deadline = time.monotonic() + seconds
    while not (busy := [n for n in workers if n.node_id in _nodes_mid_shard(attempts)]):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.05)
    c.remove_node(busy[0], allow_graceful=False)
    return busy[0]


def _nodes_mid_shard(attempts: Path) -> set[str]:
    nodes = set()
    for path in attempts.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # removed, or being written, as we read
            continue
        if not record.get("ended") and not record.get("done"):
            nodes.add(record["on"]["node"])
    return nodes


@pytest.mark.slow
def test_a_worker_node_lost_mid_score_loses_no_key(cluster, tmp_path):
    """score's pool (2 actors, one shard per call) loses the node of one actor after its first shard: every
    key is scored exactly once and the lost try is counted."""
    c, workers = cluster
    generate(
        SampleConfig(str(tmp_path / "sample"), rows=240, eval_rows=1, shards=12, image_size=32), log=lambda *_: None
    )
    model, out = random_tiny_clip(tmp_path / "model"), tmp_path / "scores"
    cmd = [str(Path(sys.executable).with_name("veclip")), "score", "--preset", "cpu", "--model", str(model)]
    cmd += ["--input", str(tmp_path / "sample" / "train"), "--output", str(out), "--percentile", "20"]
    cmd += [
        w for s in ("batch_size=1", "pool.min_actors=2", "pool.max_actors=2", "pool.num_cpus=1") for w in ("--set", s)
    ]
    env = os.environ | {"RAY_ADDRESS": c.address, "VECLIP_VERBOSE": "0"}
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 600
    while not ((out / CURRENT.done).exists() and any((out / CURRENT.done).iterdir())):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.2)
    _remove_mid_shard(c, workers, out / CURRENT.attempts / "score", driver)
    console, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, console
    assert sorted(parquet_keys(out) + parquet_keys(out, f"{CURRENT.quarantine}/*.parquet")) == sorted(
        parquet_keys(tmp_path / "sample" / "train")
    )
    summary = json.loads((out / CURRENT.summary).read_text())
    assert summary["shards"]["done"] == 12 and summary["failed"] == {}, summary["shards"]
    assert "[state-dump]" not in console and console.count("lost; Ray restarts its actors") == 1, console


@pytest.mark.slow
def test_a_worker_node_lost_mid_eval_gives_the_same_figures(cluster, tmp_path):
    """eval over 2 Ray actors loses the node of one of them as it starts embedding: Ray Data restarts the
    actor and retries its blocks; every image is scored once, to the figures of a run that lost nothing."""
    c, workers = cluster
    generate(
        SampleConfig(str(tmp_path / "sample"), rows=1, eval_rows=400, shards=1, image_size=32), log=lambda *_: None
    )
    model = random_tiny_clip(tmp_path / "model")
    cmd = [str(Path(sys.executable).with_name("veclip")), "eval", "--model", str(model), "--batch-size", "8"]
    cmd += ["--input", str(tmp_path / "sample" / "eval"), "--workers", "2", "--cpus-per-worker", "1"]
    env = os.environ | {"RAY_ADDRESS": c.address, "VECLIP_VERBOSE": "0"}
    figures = {}
    for name in ("straight", "lost"):
        run = cmd + ["--output", str(tmp_path / name)]
        driver = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if name == "lost":
            victim = _remove_when_hosting(c, workers, "ImageEmbedder", driver)
            workers = [n for n in workers if n is not victim]
        console, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, console
        figures[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert console.count("lost; Ray restarts its actors") == 1 and "[state-dump]" not in console, console
    straight, lost = figures["straight"], figures["lost"]
    assert lost["images"] == straight["images"] == 400, lost
    assert lost["zero_shot"] == straight["zero_shot"] and lost["retrieval"] == straight["retrieval"]


@pytest.fixture
def three_workers():
    """Three worker nodes of 2 CPUs: one Ray Train worker and a decode task per node, and a spare node for
    the worker group to restart on."""
    with _local_cluster(3, 2) as c:
        yield c


class _Console:
    """A driver's console, read on a thread as it comes (waits on a line, then the whole of it)."""

    def __init__(self, driver: subprocess.Popen):
        self.driver, self.lines = driver, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(driver.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while not any(text in line for line in self.lines):
            assert self.driver.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.5)

    def finish(self, seconds: float = 900) -> str:
        self.driver.wait(seconds)
        self.thread.join(30)
        return "".join(self.lines)


def _start_train(tmp_path, address: str, *sets: str) -> tuple[_Console, Path]:
    """A user's driver training the tiny CLIP on 2 workers (1.5 CPUs each: one per node); (its console, the
    run folder)."""
    generate(
        SampleConfig(str(tmp_path / "sample"), rows=320, eval_rows=1, shards=4, image_size=64), log=lambda *_: None
    )
    runs = tmp_path / "runs"
    cmd = [str(Path(sys.executable).with_name("veclip")), "train", "--input", str(tmp_path / "sample" / "train")]
    cmd += ["--output", str(runs), "--name", "lost", "--preset", "tiny", "--caption-mode", "alttext"]
    cmd += ["--set", "scale.num_workers=2", "--set", "scale.cpus_per_worker=1.5", "--set", "batch_size=16"]
    cmd += [word for s in ("scale.max_failures=2", *sets) for word in ("--set", s)]
    env = os.environ | {"RAY_ADDRESS": address, "VECLIP_VERBOSE": "0"}
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return _Console(driver), runs / "lost"


def _checkpoints(run: Path) -> list[dict]:
    """The progress.json of each checkpoint of the run, oldest first; one Ray is still copying into the run
    folder (its file there, empty or cut short) is not one yet."""
    found = []
    for path in sorted(run.glob("checkpoint_*/progress.json")):
        try:
            found.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            break
    return found


def _node(nodes, node_id: str):
    return next(n for n in nodes if n.node_id == node_id)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_worker_node_lost_mid_train_resumes_exactly_and_says_so(three_workers, tmp_path, rank):
    """The node of a worker lost without grace (rank 0: the one that writes the run's files and posts
    progress): the group restarts from the last committed checkpoint, in the same data order, and says why."""
    c, workers = three_workers
    console, run = _start_train(tmp_path, c.address, "steps=40", "checkpoint_every=10")
    deadline = time.monotonic() + 600
    while len(_checkpoints(run)) < 2:  # two checkpoints: at step 10 and 20
        assert console.driver.poll() is None and time.monotonic() < deadline, "".join(console.lines)
        time.sleep(0.5)
    victim = _node(workers, _checkpoints(run)[-1]["workers"][rank]["node"])
    c.remove_node(victim, allow_graceful=False)
    out = console.finish()
    assert console.driver.returncode == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["step"] == 40
    assert summary["resumes"], out  # the restart told, not hidden
    resume = summary["resumes"][-1]
    assert resume["exact"] and resume["from_step"] in (10, 20), resume  # the last checkpoint Ray had committed
    assert resume["cause"] == "node lost" and resume["workers"][rank]["node"] == victim.node_id, resume
    assert "restart after a lost node: resumed exactly from step" in out and "[state-dump]" not in out, out


@pytest.mark.slow
def test_a_node_drained_for_preemption_checkpoints_just_in_time_and_resumes_from_it(three_workers, tmp_path):
    """A spot notice: a node of the worker group drained with the preemption reason and a deadline (Ray's drain API,
    as the autoscaler and KubeRay send it). The workers checkpoint at once, between the periodic ones,
    and when the node goes the group resumes exactly from that checkpoint."""
    c, workers = three_workers
    console, run = _start_train(tmp_path, c.address, "steps=120", "checkpoint_every=100")
    console.wait_for("train: [step")  # training, its first checkpoint far off
    assert not _checkpoints(run)  # none yet: the one that comes next is the notice's
    victim = next(n for n in workers if _hosts(n, "RayTrainWorker"))
    drain = [str(Path(sys.executable).with_name("ray")), "drain-node", "--address", c.address]
    drain += ["--node-id", victim.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
    drain += ["--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", "60"]
    subprocess.run(drain, check=True, capture_output=True, timeout=60)
    console.wait_for("is being preempted", 120)  # told once the checkpoint is committed
    [jit] = _checkpoints(run)
    assert jit["preempted"]["nodes"] == [victim.node_id] and 0 < jit["step"] < 100, jit
    c.remove_node(victim, allow_graceful=False)  # the reclaim, before the deadline
    out = console.finish()
    assert console.driver.returncode == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["step"] == 120 and summary["resumes"], out
    resume = summary["resumes"][-1]
    assert resume["cause"] == "preempted" and resume["exact"] and resume["from_step"] == jit["step"], resume
    assert "is being preempted" in out and "restart after a preemption notice" in out and "[state-dump]" not in out, out


@pytest.mark.slow
def test_nodes_replaced_slower_than_stall_seconds_are_waited_for_and_none_left_stops_the_run(cluster, tmp_path):
    """Every worker node lost (spot), then, 3 x stall_seconds later, a replacement: the run waits (the start-up
    allowance, not the stall deadline, while no actor works) and finishes. Lost with none to replace them: Ray
    would wait forever; the driver stops within its start-up allowance, says why, keeps what was done, and a
    rerun on a cluster with a node again finishes the rest. A stand-in engine (0.1 s a request, ~7 s a shard),
    every clock scaled down together: stall_seconds 5 (900 s), first_shard_seconds 45 (3600 s)."""
    c, workers = cluster
    clocks = ["laclip.engine.model=stand-in:latency=0.1", "laclip.pool.python=", "laclip.pool.max_actors=2"]
    clocks += ["faults.stall_seconds=5", "faults.first_shard_seconds=45"]
    driver, cmd, env = _start_laclip(tmp_path, c.address, "", *clocks)
    for node in workers:
        c.remove_node(node, allow_graceful=False)
    time.sleep(3 * 5)  # the replacement comes later than stall_seconds
    workers = [c.add_node(num_cpus=3)]
    c.wait_for_nodes()
    console, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, console
    assert len(list((tmp_path / "out" / CURRENT.done).iterdir())) == 8

    cmd[cmd.index("--output") + 1] = str(tmp_path / "out2")
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    done = tmp_path / "out2" / CURRENT.done
    deadline = time.monotonic() + 300
    while not (done.exists() and any(done.iterdir())):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.5)
    for node in workers:
        c.remove_node(node, allow_graceful=False)
    lost_at = time.monotonic()
    console, _ = driver.communicate(timeout=600)
    assert driver.returncode == 2, console
    assert "no actor of the pool is working" in console and "rerun to continue" in console, console
    assert time.monotonic() - lost_at < 45 + 60  # within its allowance, not forever
    kept = {p.name for p in done.iterdir()}
    assert 1 <= len(kept) < 8
    c.add_node(num_cpus=3)
    c.wait_for_nodes()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(kept)} already done" in rerun.stdout and len(list(done.iterdir())) == 8
