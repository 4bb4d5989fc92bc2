"""Shared fixtures: small sample data, a local S3 server, and a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from veclip.storage import StorageOptions
from veclip.world.generate import SampleConfig, generate

REPO = Path(__file__).resolve().parents[1]


LONG_TESTS = "VECLIP_LONG_TESTS"  # 1: run the tests marked long outside CI too


def pytest_collection_modifyitems(config, items):
    """A test that needs the vLLM environment starts an engine (or its interpreter): mark it ``engine``,
    so that ``make test-fast`` (-m "not slow and not engine and not raytrain") leaves it to ``make test``.
    A test marked ``long`` runs in CI (``CI=true``) or with ``VECLIP_LONG_TESTS=1``; elsewhere ``make test``
    skips it and says so, to stay near half an hour on a 2-core machine."""
    run_long = os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get(LONG_TESTS) == "1"
    for item in items:
        if "vllm_python" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
        if not run_long and item.get_closest_marker("long"):
            item.add_marker(pytest.mark.skip(reason=f"long (minutes): CI runs it; here set {LONG_TESTS}=1"))


class MemoryPeak:
    """The most memory held at once inside the block: pyarrow's pool (sampled every millisecond) plus
    Python's heap (tracemalloc's peak, which sees the bytes a Python file object returns to pyarrow).
    A stage that streams a shard stays near one batch; one that reads it whole reaches its size."""

    def __enter__(self):
        import tracemalloc

        import pyarrow as pa

        tracemalloc.start()
        self._python_base = tracemalloc.get_traced_memory()[0]
        self.arrow_peak = self._arrow_base = pa.total_allocated_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.001):
                self.arrow_peak = max(self.arrow_peak, pa.total_allocated_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import tracemalloc

        self._stop.set()
        self._thread.join()
        self.python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    @property
    def grew(self) -> int:
        return (self.arrow_peak - self._arrow_base) + (self.python_peak - self._python_base)


def noise_jpegs(n: int, side: int = 128, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of noise (incompressible: ~20 KB each at 128 px), for shards with real-size bytes."""
    import io

    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def descendants(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of a process's descendants, read from /proc (Linux; no psutil here)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        children = [c for c, parent in parents.items() if parent in frontier]
        for child in children:
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
        frontier = children
    return found


@contextlib.contextmanager
def ray_address_file_kept():
    """Ray's last-cluster file as it was before (a test that starts a cluster leaves no address behind:
    a later plain ``ray.init()`` would connect to it, or retry it forever once it is gone)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    try:
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """Small sample data (train + eval), made once; copy it before changing it."""
    root = tmp_path_factory.mktemp("sample")
    generate(SampleConfig(str(root), rows=60, eval_rows=20, shards=3, seed=7, image_size=64), log=lambda *_: None)
    return root


@pytest.fixture
def train_copy(sample_root, tmp_path) -> Path:
    """A private copy of the train split to corrupt."""
    return Path(shutil.copytree(sample_root / "train", tmp_path / "train"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (never another address), as s3fs's own tests do."""
    from moto.server import ThreadedMotoServer

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> tuple[str, StorageOptions]:
    """A fresh bucket per test: ``("s3://<bucket>", options)``."""
    import s3fs

    options = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    bucket = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    fs = s3fs.S3FileSystem(**options.s3fs_kwargs())
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}", options


@pytest.fixture(params=["local", "s3"])
def out_location(request, tmp_path):
    """An output folder on local disk, then on the local S3 server: the same test on both storages."""
    from veclip.storage import Location

    if request.param == "local":
        return Location(str(tmp_path / "out"))
    url, options = request.getfixturevalue("s3_bucket")
    return Location(url + "/out", options)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's interpreter (`make test` creates it and sets VECLIP_VLLM_PYTHON)."""
    python = os.environ.get("VECLIP_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail(f"vLLM environment missing at {python}: `make test` creates it")
        pytest.skip("no vLLM environment (run `make test` to create it)")
    os.environ["VECLIP_VLLM_PYTHON"] = python
    return python


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():  # its own local Ray, whatever Ray's last-cluster file names
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def veclip_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed ``veclip`` console script as a user would."""
    exe = Path(sys.executable).with_name("veclip")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def browser_screenshot(page: Path, shot: Path, size: str = "1000,1400"):
    """The page as headless Chromium (Debian's; `make test` installs it) draws it, as an RGB array;
    skips the test where there is no chromium."""
    import shutil

    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium (make test installs Debian's package where apt-get is available)")
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={shot.parent / 'chromium-profile'}",
            f"--window-size={size}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def random_tiny_clip(folder: Path) -> Path:
    """A random veclip-tiny as an exported folder (open_clip's local-dir layout), fixed by its seed."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from veclip.train.model import create_model, register_configs

    register_configs()
    torch.manual_seed(0)
    model = create_model("veclip-tiny")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("veclip-tiny"), "preprocess_cfg": {}})
    )
    return folder


def parquet_keys(folder: Path, pattern: str = "*.parquet") -> list[str]:
    """The keys of the Parquet files in ``folder`` matching ``pattern``, file by file in name order."""
    import pyarrow.parquet as pq

    return [k for p in sorted(folder.glob(pattern)) for k in pq.read_table(p, columns=["key"]).column(0).to_pylist()]
