"""Training data path and train loop vs bare baselines in the same script.

    .venv/bin/python benchmarks/bench_train.py [--rows 2000] [--steps 200]

1. Ingest: our per-row preprocessing (safe decode + open_clip's train
   augmentation + choosing each row's caption and tokenizing only it) vs a
   bare PIL + torchvision loop (decode, RandomResizedCrop, ToTensor,
   Normalize) over the same JPEGs, one process each, so the figures are per
   core. The table is *enriched*: every caption slot is filled (stand-ins of
   the real lengths: the sample world's reference description as
   vlm_caption, AltText + description as vecap, four word-shuffled copies of
   the description as rewrites), so a per-slot cost would show.
2. Train loop: wall-clock samples/s over whole passes (from the end of step 1
   to the end of the last step, every pass re-reading and re-decoding its
   images) of the Ray Train loop with 1 worker on 1 CPU, its Ray Data decode
   tasks on the other core, vs a bare torch loop over the same model, loss
   and optimizer on in-memory tensors with the same torch threads (1).
   Start-up is in bench_race.py.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def enrich(table: pa.Table) -> pa.Table:
    """Every caption slot filled, with stand-ins of the real captions' lengths (see the module doc)."""
    import random

    described = table.column("ref_caption").to_pylist()
    alt = [a or "" for a in table.column("alt_text").to_pylist()]
    shuffled = []
    for i, text in enumerate(described):
        words = text.split()
        rewrites = []
        for r in range(4):
            random.Random(i * 4 + r).shuffle(words)
            rewrites.append(" ".join(words))
        shuffled.append(rewrites)
    table = table.drop_columns([c for c in ("vecap", "vlm_caption", "rewrites") if c in table.column_names])
    return (
        table.append_column("vecap", pa.array([f"{a}: {d}" for a, d in zip(alt, described)]))
        .append_column("vlm_caption", pa.array(described))
        .append_column("rewrites", pa.array(shuffled))
    )


def enriched_table(folder: Path) -> pa.Table:
    """The folder's shards, enriched, with the stream's position columns (epoch 0)."""
    import numpy as np

    table = enrich(pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]))
    for name in ("_epoch", "_window", "_offset"):
        table = table.append_column(name, pa.array(np.zeros(table.num_rows, np.int64)))
    return table


def bench_ingest(folder: Path, model: str) -> tuple[float, float, int]:
    from torchvision import transforms

    from veclip.images import ImageLimits
    from veclip.train.augment import augment_and_tokenizer
    from veclip.train.captions import CaptionConfig
    from veclip.train.data import preprocess

    table = enriched_table(folder)
    augment_and_tokenizer(model)  # build once, outside the timing
    size = 224 if model != "veclip-tiny" else 64
    bare = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    start = time.perf_counter()
    for data in table.column("image").to_pylist():
        bare(Image.open(io.BytesIO(data)).convert("RGB"))
    bare_rate = table.num_rows / (time.perf_counter() - start)
    start = time.perf_counter()
    for offset in range(0, table.num_rows, 256):
        preprocess(table.slice(offset, 256), model, CaptionConfig("laclip"), ImageLimits(), seed=0)
    ours_rate = table.num_rows / (time.perf_counter() - start)
    return bare_rate, ours_rate, size


def bench_device_decode(folder: Path, model: str) -> tuple[float, float]:
    """decode=device: the CPU task's img/s (header, 1/8-scale check decode, crop box, caption) and the
    worker's decode + crop img/s, with torchvision's CPU JPEG decoder standing in for nvJPEG."""
    import numpy as np

    from veclip.images import ImageLimits
    from veclip.train.augment import decode_on_device, device_crop_for
    from veclip.train.captions import CaptionConfig
    from veclip.train.data import preprocess

    table = enriched_table(folder)
    crop = device_crop_for(model)
    task_seconds = worker_seconds = 0.0
    for offset in range(0, table.num_rows, 256):
        start = time.perf_counter()
        out = preprocess(
            table.slice(offset, 256), model, CaptionConfig("laclip"), ImageLimits(), seed=0, decode="device"
        )
        task_seconds += time.perf_counter() - start
        start = time.perf_counter()
        decode_on_device(
            torch.from_numpy(out["image"]), out["jpeg"], out["box"], np.flatnonzero(out["on_device"]), crop
        )
        worker_seconds += time.perf_counter() - start
    return table.num_rows / task_seconds, table.num_rows / worker_seconds


def bench_bare_loop(model_name: str, batch: int, steps: int) -> float:
    from open_clip.loss import ClipLoss

    from veclip.train.model import create_model, param_groups

    model = create_model(model_name)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    loss_fn = ClipLoss()
    size, context = model.visual.image_size[0], model.context_length
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(0, 49408, (batch, context))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        image_features, text_features, scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[len(times) // 2 :])


def print_ingest(ingest: list, device: tuple[float, float]) -> None:
    print(
        "| ingest (1 process), enriched table: 7 caption slots filled | source px -> crop | bare PIL+torchvision (img/s) | veclip preprocess (img/s) | ratio |"
    )
    print("| --- | --- | --- | --- | --- |")
    for (bare_rate, ours_rate, size), source in zip(ingest, (256, 64)):
        print(
            f"| decode + augment (+ choose a caption, tokenize it) | {source} -> {size} | {bare_rate:,.0f} | {ours_rate:,.0f} | {ours_rate / bare_rate:.2f} |"
        )
    bare_256 = ingest[0][0]
    print(
        f"| decode=device, the CPU task (header, 1/8-scale check, crop box, caption) | 256 -> 224 | {bare_256:,.0f} | {device[0]:,.0f} | {device[0] / bare_256:.2f} |"
    )
    print(
        f"| decode=device, the worker's decode + crop (torchvision CPU decoder standing in for nvJPEG) | 256 -> 224 | {bare_256:,.0f} | {device[1]:,.0f} | {device[1] / bare_256:.2f} |"
    )
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ingest-only", action="store_true", help="skip the train loop")
    args = parser.parse_args()

    from veclip.train.checkpoint import metric_history
    from veclip.train.config import build_config
    from veclip.train.trainer import run_train
    from veclip.world.generate import SampleConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(
            SampleConfig(tmp + "/s256", rows=args.rows // 4, eval_rows=1, shards=2, image_size=256), log=lambda *_: None
        )
        generate(SampleConfig(tmp + "/s64", rows=args.rows, eval_rows=1, shards=4, image_size=64), log=lambda *_: None)
        torch.set_num_threads(1)  # one process, one core: per-core figures
        ingest = [
            bench_ingest(Path(tmp) / "s256" / "train", "ViT-B-16"),
            bench_ingest(Path(tmp) / "s64" / "train", "veclip-tiny"),
        ]
        device = bench_device_decode(Path(tmp) / "s256" / "train", "ViT-B-16")
        print_ingest(ingest, device)
        if args.ingest_only:
            return

        bare = bench_bare_loop("veclip-tiny", args.batch, args.steps)
        config = build_config(
            "tiny",
            None,
            [
                f"steps={args.steps}",
                f"batch_size={args.batch}",
                "scale.num_workers=1",
                "scale.cpus_per_worker=1",
                "scale.preprocess_cpus=0.5",
                "captions.mode=alttext",
                "captions.min_words=1",
                f"checkpoint_every={args.steps}",
            ],
            input=tmp + "/s64/train",
            output=tmp + "/runs",
            name="bench",
        )
        run_train(config, log=lambda *_: None)
        history = {m["step"]: m for m in metric_history(tmp + "/runs/bench")}
        passes = args.steps * args.batch / args.rows
        ray_rate = args.batch * (args.steps - 1) / (history[args.steps]["time"] - history[1]["time"])
        waits = sorted(m["data_wait_share"] for m in history.values())

    print(f"| train loop (veclip-tiny, CPU, 1 torch thread, batch {args.batch}) | samples/s | ratio |")
    print("| --- | --- | --- |")
    print(f"| bare torch loop, in-memory tensors (median step, second half) | {bare:.1f} | 1.00 |")
    print(
        f"| Ray Train, 1 worker (1 CPU), Ray Data stream re-decoding every pass: wall clock of steps 2-{args.steps} "
        f"({passes:.1f} passes; data wait median {statistics.median(waits):.0%}, max {waits[-1]:.0%}) | {ray_rate:.1f} | {ray_rate / bare:.2f} |"
    )


if __name__ == "__main__":
    main()
