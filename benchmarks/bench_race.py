"""The peer race: `veclip train` against open_clip's own trainer on the same work.

    .venv/bin/python benchmarks/bench_race.py [--rows 2000] [--steps 200] [--rounds 3]

Same rows (the sample world's, 64 px JPEG, rows with an AltText), same JPEG
bytes and captions, `veclip-tiny`, batch 64, fp32 on the CPU, AdamW with the
same lr / decay / betas / eps / warm-up, both re-decoding every image every
pass:

- open_clip_train: webdataset tars of those rows (``--dataset-resampled``, so
  one "epoch" is exactly ``steps`` batches), 1 loader worker, a step logged
  each step.
- veclip: ``veclip train`` on Parquet shards of those rows, 1 Ray Train worker
  holding 1 CPU in Ray's accounting with 2 torch threads (as open_clip's main
  process has), Ray Data decode tasks of 0.5 CPU.

Each command runs as a user would start it, alternating which goes first, for
``rounds`` rounds; medians and ranges are printed as a Markdown table. Steady
samples/s is the wall time of steps (steps/2 + 2) .. steps (each tool's own
per-step clock: open_clip's "Batch (t)", veclip's step end times); the whole
command includes start-up and shutdown; memory is the peak PSS of the
command's process tree (Ray's processes included), sampled every 2 s (reading
it costs CPU that Ray's niced workers would lose), processes every 0.5 s.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
OPEN_CLIP = (
    "import sys; from veclip.train.model import register_configs; register_configs(); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def make_data(tmp: Path, rows: int) -> tuple[Path, Path, int]:
    """The same rows twice: Parquet shards for veclip, webdataset tars for open_clip_train."""
    from veclip.world.generate import SampleConfig, generate

    generate(SampleConfig(str(tmp / "sample"), rows=rows, eval_rows=1, shards=4, image_size=64), log=lambda *_: None)
    parquet, tars = tmp / "parquet", tmp / "tars"
    parquet.mkdir(), tars.mkdir()
    kept = 0
    for i, path in enumerate(sorted((tmp / "sample" / "train").glob("*.parquet"))):
        table = pq.read_table(path)
        table = table.filter(pa.compute.greater(pa.compute.utf8_length(pa.compute.fill_null(table["alt_text"], "")), 0))
        pq.write_table(table, parquet / path.name, row_group_size=128)
        with tarfile.open(tars / f"{i:05d}.tar", "w") as tar:
            for key, image, text in zip(*(table[c].to_pylist() for c in ("key", "image", "alt_text"))):
                for suffix, data in (("jpg", image), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        kept += table.num_rows
    return parquet, tars, kept


def _tree(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(command: list[str], env: dict) -> dict:
    """Wall time, console bytes, and the peak PSS and process count of the command's tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    peak = {"pss_kb": 0, "processes": 0}

    def watch():
        for tick in itertools.count():
            if proc.poll() is not None:
                return
            pids = _tree(proc.pid)
            peak["processes"] = max(peak["processes"], len(pids))
            if tick % 4 == 0:
                peak["pss_kb"] = max(peak["pss_kb"], sum(_pss_kb(p) for p in pids))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    console = proc.stdout.read().decode(errors="replace")
    proc.wait()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{command[:3]} failed ({proc.returncode}):\n{console[-4000:]}")
    return {"wall_s": time.perf_counter() - start, "console": console, "console_bytes": len(console.encode()), **peak}


def open_clip_run(tars: Path, tmp: Path, name: str, steps: int, shards: int) -> dict:
    args = [
        "--train-data",
        f"{tars}/{{00000..{shards - 1:05d}}}.tar",
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(steps * BATCH),
        "--epochs",
        "1",
        "--batch-size",
        str(BATCH),
        "--workers",
        "1",
        "--model",
        "veclip-tiny",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--lr",
        "1e-3",
        "--wd",
        "0.1",
        "--warmup",
        "5",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--seed",
        "0",
        "--logs",
        str(tmp / "open_clip"),
        "--name",
        name,
        "--log-every-n-steps",
        "1",
        "--report-to",
        "",
        "--save-frequency",
        "1",
    ]
    result = run_measured([sys.executable, "-c", OPEN_CLIP, *args], {**os.environ, "OMP_NUM_THREADS": "2"})
    # "Train Epoch: 0 [ 6464/12800 (50%)] Data (t): 0.001 Batch (t): 0.190, ..." -> per-step seconds
    step_seconds = {
        int(n) // BATCH: float(t)
        for n, t in re.findall(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([\d.]+)", result["console"])
    }
    if len(step_seconds) < steps:
        raise SystemExit(f"open_clip_train logged {len(step_seconds)} of {steps} steps:\n{result['console'][-3000:]}")
    steady = range(steps // 2 + 2, steps + 1)
    return {
        **result,
        "steady": BATCH * len(steady) / sum(step_seconds[s] for s in steady),
        "first_step_s": step_seconds[1],
    }


def veclip_run(parquet: Path, tmp: Path, name: str, steps: int) -> dict:
    from veclip.train.checkpoint import metric_history

    sets = [
        f"steps={steps}",
        f"batch_size={BATCH}",
        "scale.num_workers=1",
        "scale.cpus_per_worker=1",
        "scale.torch_threads=2",
        "scale.preprocess_cpus=0.5",
        f"checkpoint_every={steps}",
        "optim.warmup_steps=5",
        "optim.warmup_share=0",  # the same schedule as open_clip_train's --warmup 5, no clipping
        "optim.grad_clip_norm=0",
        "seed=0",
        "captions.min_words=1",
    ]  # open_clip trains on every caption
    command = [
        str(Path(sys.executable).with_name("veclip")),
        "train",
        "--preset",
        "tiny",
        "--input",
        str(parquet),
        "--output",
        str(tmp / "veclip"),
        "--name",
        name,
        "--caption-mode",
        "alttext",
        *(a for s in sets for a in ("--set", s)),
    ]
    result = run_measured(command, dict(os.environ))
    history = {m["step"]: m for m in metric_history(str(tmp / "veclip" / name))}
    first, last = steps // 2 + 1, steps
    return {
        **result,
        "steady": BATCH * (last - first) / (history[last]["time"] - history[first]["time"]),
        "first_step_s": BATCH / history[1]["samples_per_s"],
    }


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"open_clip_train": [], "veclip train": []}
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        parquet, tars, rows = make_data(tmp, args.rows)
        print(
            f"data: {rows} rows with an AltText, 64 px JPEG; {args.steps} steps of {BATCH}; {args.rounds} rounds",
            file=sys.stderr,
        )
        for round_ in range(args.rounds):
            order = ["open_clip_train", "veclip train"][:: 1 if round_ % 2 == 0 else -1]
            for tool in order:
                name = f"r{round_}"
                result = (
                    open_clip_run(tars, tmp, name, args.steps, 4)
                    if tool == "open_clip_train"
                    else veclip_run(parquet, tmp, name, args.steps)
                )
                runs[tool].append(result)
                print(
                    f"round {round_}: {tool}: steady {result['steady']:.0f} samples/s, whole {result['wall_s']:.1f} s, "
                    f"first step {result['first_step_s']:.2f} s, peak PSS {result['pss_kb'] / 2**20:.2f} GB, "
                    f"{result['processes']} processes, console {result['console_bytes'] / 1024:.0f} KB",
                    file=sys.stderr,
                )
    base = runs["open_clip_train"]
    print(
        f"| {rows} rows, {args.steps} steps x {BATCH}, {args.rounds} rounds: median (range) | open_clip_train | veclip train | ratio (medians) |"
    )
    print("| --- | --- | --- | --- |")
    for label, key, fmt, scale in (
        ("steady samples/s (wall of the second half)", "steady", ".0f", 1),
        ("whole command, s", "wall_s", ".1f", 1),
        ("first step, s", "first_step_s", ".2f", 1),
        ("peak memory, PSS of the process tree, GB", "pss_kb", ".2f", 2**20),
        ("processes (peak)", "processes", ".0f", 1),
        ("console, KB", "console_bytes", ".0f", 1024),
    ):
        a, b = [r[key] / scale for r in base], [r[key] / scale for r in runs["veclip train"]]
        print(
            f"| {label} | {_spread(a, fmt)} | {_spread(b, fmt)} | {statistics.median(b) / statistics.median(a):.2f}x |"
        )


if __name__ == "__main__":
    main()
