"""Production-shape shards: does memory stay flat from 1,000 to 10,000 rows per shard?

    .venv/bin/python benchmarks/bench_shapes.py [--rows 1000 10000] [--side 512x384] [--work DIR] [--one-group]

Makes one shard per size of web-photo-sized JPEGs (noise at 512x384, quality 90:
~100 KB each, so 10,000 rows are ~1 GB), then runs each stage on it in a process
of its own and samples that process tree's resident memory every 0.1 s:

* ``score`` (the caption gate, in process: one ShardScorer scoring the shard with a
  random veclip-tiny, batch 64), against a bare loop that embeds the same images
  with open_clip and holds no more than a batch;
* ``validate --images full`` (every image decoded), against a bare PIL loop;
* ``import --resize 256`` of the same rows as a webdataset tar, against a bare
  loop that reads, resizes and writes them a batch at a time;
* ``eval`` in process (zero-shot on a 10-class label column and retrieval with
  the AltText: retrieval's similarity matrix grows with the square of the set);
* training ingest (the stream's windows of 8 units through ``read_window`` and ``preprocess``);
* ``rewrite`` (``--mode both --layout copy``: the captioner worker decoding and
  fitting every image, then the fusion + LaCLIP worker writing the enriched
  shard, images included) with a stand-in engine that answers at once (a tiny
  vLLM on 2 cores takes minutes per 1,000 rows; an engine's memory does not
  depend on rows per shard), against a bare loop that reads, decodes, fits and
  writes the same rows a batch at a time.

``--one-group`` writes each shard as one row group (pyarrow's, pandas' and
img2dataset's default) instead of veclip's ~128 MiB groups. Prints Markdown rows
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

STAGE_CODE = {
    "score": """
import json, sys, time, pyarrow.parquet as pq
from veclip.dataset import open_dataset
from veclip.score.config import build_config
from veclip.score.stage import Score
from veclip.score.worker import ShardScorer, shard_columns
from veclip.shards.guard import RunContext
from veclip.storage import StorageOptions
data, model, out = sys.argv[1:4]
config = build_config("cpu", None, ["batch_size=64"], input=data, output=out, model=model)
stage = Score(config, StorageOptions())
stage.list_inputs()
run = RunContext("bench", stage.fingerprint())
shard = stage.dataset.shards[0]
scorer = ShardScorer(config, StorageOptions(), run, stage.dataset, stage.model, stage.weights,
                     shard_columns(stage.dataset, config), stage.stamps)
scorer.guard.lease.check = lambda: None  # no run holds this bench's output
start = time.perf_counter()
scorer.process(shard.path, shard.size)
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "score-bare": """
import json, sys, time, io, torch, pyarrow.parquet as pq
from PIL import Image
from veclip.eval.model import load_model
data, model = sys.argv[1:3]
m, preprocess, _ = load_model(model, None, None)
parquet = pq.ParquetFile(sorted(__import__("glob").glob(data + "/*.parquet"))[0])
start = time.perf_counter()
with torch.no_grad():
    for g in range(parquet.num_row_groups):  # a row group at a time, a batch at a time
        column = parquet.read_row_group(g, columns=["image"]).column("image")
        for i in range(0, len(column), 64):
            batch = [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in column.slice(i, 64).to_pylist()]
            m.encode_image(torch.stack(batch))
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "validate": """
import json, sys, time
from veclip.validate import ValidateConfig, validate
start = time.perf_counter()
report = validate(ValidateConfig(sys.argv[1], images="full"))
assert report.usable, report.render()
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "validate-bare": """
import io, json, sys, time, glob, pyarrow.parquet as pq
from PIL import Image
start = time.perf_counter()
for path in sorted(glob.glob(sys.argv[1] + "/*.parquet")):
    parquet = pq.ParquetFile(path)
    for g in range(parquet.num_row_groups):
        for data in parquet.read_row_group(g, columns=["image"]).column("image").to_pylist():
            Image.open(io.BytesIO(data)).convert("RGB")
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "ingest": """
import json, sys, time, numpy as np
from veclip.images import ImageLimits
from veclip.schema import ColumnMap
from veclip.storage import StorageOptions
from veclip.train.captions import CaptionConfig
from veclip.train.data import plan_data, preprocess, read_window
from veclip.train.order import Position, worker_windows
plan = plan_data(sys.argv[1], StorageOptions(), ColumnMap(), 1, log=lambda *_: None)
start = time.perf_counter()
for w in range(len(worker_windows(list(plan.units), 0, 0, 0, 1, 8))):  # the stream's windows (8 units) and chunks
    for chunk in read_window({"epoch": np.array([0]), "window": np.array([w])}, plan, Position(), 0, 1, 0, 8):
        preprocess(chunk, "veclip-tiny", CaptionConfig(mode="alttext"), ImageLimits(), 0)
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "import": """
import json, sys, time
from veclip.ingest import ImportConfig, run_import
tars, out = sys.argv[1:3]
start = time.perf_counter()
summary = run_import(ImportConfig(tars, out, resize=256), log=lambda *_: None)  # every image checked, resized to 256 px
assert summary.rows > 0, summary
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "import-bare": """
import io, json, sys, time, glob, tarfile, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
tars, out = sys.argv[1:3]
start = time.perf_counter()
writer, rows = None, []
def flush():
    global writer
    table = pa.table({"key": [k for k, _ in rows], "image": [b for _, b in rows]})
    writer = writer or pq.ParquetWriter(out + ".parquet", table.schema)
    writer.write_table(table)
    rows.clear()
with tarfile.open(sorted(glob.glob(tars + "/*.tar"))[0], "r|") as tar:
    for member in tar:  # read, resize to 256 px and write each image, a batch at a time
        if not member.name.endswith(".jpg"):
            continue
        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
        image.thumbnail((256 * image.width // min(image.size), 256 * image.height // min(image.size)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        rows.append((member.name, buffer.getvalue()))
        if len(rows) == 256:
            flush()
if rows:
    flush()
writer.close()
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "eval": """
import json, sys, time
from veclip.eval.run import EvalConfig, evaluate
data, model = sys.argv[1:3]
start = time.perf_counter()
result = evaluate(EvalConfig(model=model, input=data, label_column="label", caption_column="alt_text", batch_size=64))
assert result["images"] > 0, result
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
    "rewrite": """
import dataclasses, json, sys, time
from veclip.rewrite.config import fingerprint, preset
from veclip.rewrite.engine import Completion
from veclip.rewrite.stage import plan_run
from veclip.rewrite.workers import ShardCaptioner, ShardRewriter
from veclip.shards.driver import shard_rows
from veclip.shards.guard import RunContext
from veclip.shards.lease import OutputLease
from veclip.storage import Location, StorageOptions
class StandIn:  # a stand-in engine that answers at once: its memory does not depend on rows per shard
    name = "stand-in"
    def generate(self, requests, sampling):
        return [Completion("a photo of a small red star on a striped wall", 10, 12) for _ in requests]
data, out = sys.argv[1:3]
config = dataclasses.replace(preset("default"), input=data, output=out, mode="both", layout="copy")
options, run = StorageOptions(), RunContext("bench", fingerprint(config)[0])
lease = OutputLease(Location(out, options), run.run_id)
lease.acquire()
start = time.perf_counter()
batch = shard_rows(plan_run(config, options, run.fingerprint, False))
for worker in (ShardCaptioner(config, options, run, engine=StandIn()), ShardRewriter(config, options, run, engine=StandIn())):
    batch = worker(batch)  # VLM captions (every image decoded and fit), then fusion + LaCLIP, the enriched shard written
seconds = time.perf_counter() - start
lease.release()
assert set(batch["status"]) == {"done"}, batch["status"]
print(json.dumps({"seconds": seconds}))
""",
    "rewrite-bare": """
import io, json, sys, time, glob, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
data, out = sys.argv[1:3]
start = time.perf_counter()
parquet = pq.ParquetFile(sorted(glob.glob(data + "/*.parquet"))[0], buffer_size=8 << 20)
writer = None
for batch in parquet.iter_batches(batch_size=256):  # read, decode and fit each image, write the rows with a caption
    for data_ in batch.column("image").to_pylist():
        Image.open(io.BytesIO(data_)).convert("RGB").thumbnail((448, 448))
    table = pa.Table.from_batches([batch]).append_column("vecap", pa.array(["a photo of a small red star"] * batch.num_rows))
    writer = writer or pq.ParquetWriter(out + ".parquet", table.schema)
    writer.write_table(table)
writer.close()
print(json.dumps({"seconds": time.perf_counter() - start}))
""",
}


LABELS = [f"class {i}" for i in range(10)]


def make_shard(folder: Path, rows: int, side: tuple[int, int], one_group: bool) -> None:
    """One shard of ``rows`` noise JPEGs (distinct per row, ~100 KB at 512x384), as ``veclip import`` writes
    it (row groups of ~128 MiB), or with ``one_group`` as pyarrow, pandas and img2dataset do by default."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from veclip.parquet_files import write_parquet
    from veclip.schema import INPUT_SCHEMA
    from veclip.storage import filesystem

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)
    images = []
    for i in range(rows):
        pixels = np.roll(base, i * 7, axis=1)  # a different image per row, at the cost of one encode
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    table = pa.table(
        {
            "key": [f"k{i:06d}" for i in range(rows)],
            "image": pa.array(images, pa.binary()),
            "alt_text": [f"a photo number {i} of something" for i in range(rows)],
            "url": [None] * rows,
            "width": [side[0]] * rows,
            "height": [side[1]] * rows,
        },
        schema=INPUT_SCHEMA,
    )
    table = table.append_column("label", pa.array([LABELS[i % len(LABELS)] for i in range(rows)]))  # for eval
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_classes.json").write_text(json.dumps({"label": LABELS}))
    tars = folder.parent / f"{folder.name}-tars"  # the same rows as webdataset, for import
    tars.mkdir(exist_ok=True)
    with tarfile.open(tars / "part-0.tar", "w") as tar:
        for i, data in enumerate(images):
            for ext, payload in (("jpg", data), ("txt", f"a photo number {i} of something".encode())):
                member = tarfile.TarInfo(f"{i:06d}.{ext}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    if one_group:
        pq.write_table(table, folder / "part-00000.parquet")
    else:
        write_parquet(filesystem(str(folder))[0], str(folder / "part-00000.parquet"), table)


def random_model(folder: Path) -> str:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from veclip.train.model import create_model, register_configs

    if (folder / "open_clip_config.json").exists():
        return str(folder)
    register_configs()
    torch.manual_seed(0)
    model = create_model("veclip-tiny")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": open_clip.get_model_config("veclip-tiny"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return str(folder)


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants, from /proc (Linux)."""
    from veclip.processes import process_tree

    total = 0
    for current in process_tree([pid]):
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def peak_rss(args: list[str]) -> tuple[float, float]:
    """``(seconds the stage reported, peak resident MiB of its process tree)``."""
    process = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = process.communicate()
    done.set()
    thread.join()
    if process.returncode:
        raise RuntimeError(f"{args[1:]} failed ({process.returncode})")
    return json.loads(out.strip().splitlines()[-1])["seconds"], peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--side", default="512x384")
    parser.add_argument("--work", help="keep the shards here between runs")
    parser.add_argument("--one-group", action="store_true", help="shards in one row group (pyarrow's default)")
    args = parser.parse_args()
    side = tuple(int(x) for x in args.side.split("x"))
    work = Path(args.work or tempfile.mkdtemp(prefix="veclip-shapes-"))
    model = random_model(work / "model")
    results = {}
    for rows in args.rows:
        data = work / f"rows-{rows}{'-one-group' if args.one_group else ''}"
        if not data.exists():
            make_shard(data, rows, side, args.one_group)
        size = sum(p.stat().st_size for p in data.glob("*.parquet"))
        for done in ("scores", "rewrite", "import"):  # a done output would be skipped
            shutil.rmtree(work / f"{done}-{rows}", ignore_errors=True)
        measured = {}
        for stage, extra in (
            ("score", [str(data), model, str(work / f"scores-{rows}")]),
            ("score-bare", [str(data), model]),
            ("validate", [str(data)]),
            ("validate-bare", [str(data)]),
            ("ingest", [str(data)]),
            ("import", [str(data) + "-tars", str(work / f"import-{rows}")]),
            ("import-bare", [str(data) + "-tars", str(work / f"import-bare-{rows}")]),
            ("eval", [str(data), model]),
            ("rewrite", [str(data), str(work / f"rewrite-{rows}")]),
            ("rewrite-bare", [str(data), str(work / f"rewrite-bare-{rows}")]),
        ):
            measured[stage] = peak_rss([STAGE_CODE[stage], *extra])
            print(f"{rows} rows, {stage}: {measured[stage][0]:.1f} s, peak {measured[stage][1]:,.0f} MiB", flush=True)
        results[rows] = (size, measured)
    groups = "one row group (pyarrow's default)" if args.one_group else "row groups of ~128 MiB (as veclip writes)"
    print(
        f"\nOne shard of noise JPEGs at {args.side}, quality 90, in {groups}; each stage in its own process, "
        "peak RSS of its tree.\n"
    )
    print(
        "| stage | rows per shard | shard MB | seconds | rows/s | ratio to its bare loop | peak RSS MiB | bare loop's |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows, (size, measured) in results.items():
        for stage, bare in (
            ("score", "score-bare"),
            ("validate", "validate-bare"),
            ("ingest", None),
            ("import", "import-bare"),
            ("eval", None),
            ("rewrite", "rewrite-bare"),
        ):
            seconds, peak = measured[stage]
            ratio = f"{measured[bare][0] / seconds:.2f}" if bare else "-"
            bare_peak = f"{measured[bare][1]:,.0f}" if bare else "-"
            print(
                f"| {stage} | {rows:,} | {size / 1e6:,.0f} | {seconds:.1f} | {rows / seconds:,.0f} | {ratio} | {peak:,.0f} | {bare_peak} |"
            )


if __name__ == "__main__":
    main()
