"""One prepared GPU check for a 15-minute device lease (issue 33): the training step, MFU, device decode
and scoring, with no Ray and no vLLM. It imports torch, torchvision, pillow, pyarrow and open_clip
(carried as wheels: `make gpu-wheels`) and the project's own functions.

On a lent GPU (the device tool runs in a copy of the working tree):

    pip install --no-index --find-links .gpu-wheels open_clip_torch fsspec ftfy regex \\
        && python benchmarks/bench_gpu.py --out "$OUT"

On CPU, as the tests run it (a tiny model, so it cannot rot before a GPU comes):

    python benchmarks/bench_gpu.py --device cpu --models veclip-tiny --batches 4 8 --steps 2 --images 8

Measures, each in its own try (an out-of-memory batch ends that model's sweep, not the script):
- the training step as `veclip train` runs it: the project's model, AdamW (fused on GPUs), ClipLoss and
  the multi-positive loss at K = 2, bf16 autocast on GPUs, with and without torch.compile; per batch
  size: samples/s, step time, peak memory and MFU against the device's bf16 peak (train/model.py);
- device decode (`decode=device`): the project's `decode_on_device` on a batch of real-size JPEGs made
  here (512x384, quality 90) against the CPU path (decode + open_clip's train transform) on all cores;
- scoring (`veclip score`'s image embedding, `embed_images`) at the stage's batch size: images/s.
Writes `gpu.json` and `gpu.md` into --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's veclip, not installed

import numpy as np
import torch

from veclip.train.config import OptimConfig
from veclip.train.loss import MultiPositiveClipLoss
from veclip.train.model import adamw, create_model, peak_flops, train_flops_per_sample

SCORE_BATCH = 256  # veclip score's default batch (ScoreConfig.batch_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model_name: str, batch: int, k: int, compiled: bool, steps: int, device: torch.device) -> dict:
    """Samples/s, step time, peak memory and MFU of `veclip train`'s optimizer step at ``batch`` images."""
    model = create_model(model_name).to(device)
    model.train()
    optimizer = adamw(model, OptimConfig(), device)
    loss_fn = MultiPositiveClipLoss(k)  # K = 1 is exactly open_clip's ClipLoss
    size, context = model.visual.image_size[0], model.context_length
    flops = train_flops_per_sample(model, size, context, k)
    step_model = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(0, 49407, (batch * k, context), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step():
        with autocast:
            image_features, text_features, scale = step_model(images, texts)[:3]
            loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3 if compiled else 2):  # warm-up (and compilation)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = peak_flops(device)
    return {
        "model": model_name,
        "batch": batch,
        "captions_per_image": k,
        "compile": compiled,
        "samples_per_s": batch / seconds,
        "step_ms": 1000 * seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mfu": flops * batch / seconds / peak if peak else None,
    }


def sweep(
    model_name: str, batches: list[int], steps: int, device: torch.device, compile_modes: list[bool]
) -> list[dict]:
    rows = []
    for compiled in compile_modes:
        for k in (1, 2):
            for batch in batches:
                try:
                    rows.append(train_step(model_name, batch, k, compiled, steps, device))
                except torch.cuda.OutOfMemoryError:
                    rows.append(
                        {"model": model_name, "batch": batch, "captions_per_image": k, "compile": compiled, "oom": True}
                    )
                    break
                except Exception as err:  # a compile failure says why, the sweep goes on
                    rows.append(
                        {
                            "model": model_name,
                            "batch": batch,
                            "captions_per_image": k,
                            "compile": compiled,
                            "error": repr(err)[:300],
                        }
                    )
                    break
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(json.dumps(rows[-1]), flush=True)
    return rows


def real_size_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like 512x384 JPEGs at quality 90: smooth gradients, shapes and noise (not flat colour, which
    would decode unrealistically fast)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.linspace(0, 255, 512, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, size=(1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 18, size=(384, 512, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, 440)), int(rng.integers(0, 320))
            draw.ellipse((x, y, x + 70, y + 60), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _cpu_decode(args) -> int:
    """The CPU path for a share of the images: decode (the project's safe decoder) and open_clip's train
    transform, as the preprocess tasks do."""
    jpegs, model_name = args
    from veclip.images import ImageLimits, decode_image
    from veclip.train.augment import augment_and_tokenizer

    augment = augment_and_tokenizer(model_name)[0]
    for data in jpegs:
        image = decode_image(data, ImageLimits())
        for transform in augment:
            image = transform(image)
    return len(jpegs)


def decode(model_name: str, jpegs: list[bytes], device: torch.device) -> dict:
    from veclip.train.augment import crop_box, decode_on_device, device_crop_for

    crop = device_crop_for(model_name)
    draw = random.Random(0)
    boxes = np.array([crop_box(crop, 512, 384, draw) for _ in jpegs])
    array = np.empty(len(jpegs), dtype=object)
    array[:] = jpegs
    images = torch.empty(len(jpegs), 3, *crop.size, dtype=torch.uint8, device=device)
    rows = np.arange(len(jpegs))
    decode_on_device(images, array, boxes, rows, crop)  # warm-up (nvJPEG's handles)
    _sync(device)
    start = time.perf_counter()
    decode_on_device(images, array, boxes, rows, crop)
    _sync(device)
    on_device = len(jpegs) / (time.perf_counter() - start)
    cores = os.cpu_count() or 1
    parts = [(jpegs[i::cores], model_name) for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_cpu_decode, [(p[0][:1], model_name) for p in parts]))  # warm-up: imports, transforms
        start = time.perf_counter()
        done = sum(pool.map(_cpu_decode, parts))
    on_cpu = done / (time.perf_counter() - start)
    return {"images": len(jpegs), "device_images_per_s": on_device, "cpu_images_per_s": on_cpu, "cpu_cores": cores}


def score(model_name: str, jpegs: list[bytes], device: torch.device, batch: int) -> dict:
    """`veclip score`'s image embedding on ``device`` at the stage's batch size."""
    import open_clip

    from veclip.eval.embed import embed_images
    from veclip.train.model import register_configs

    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    model.eval()
    embed_images(model, preprocess, jpegs[:batch], batch, device=device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    embed_images(model, preprocess, jpegs, batch, device=device)
    _sync(device)
    return {"model": model_name, "batch": batch, "images_per_s": len(jpegs) / (time.perf_counter() - start)}


def render(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, Python {report['python']}; {report['when']}.",
        "",
        "| model | batch | captions/image | compile | samples/s | step (ms) | peak memory (GiB) | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["train"]:
        if "samples_per_s" not in r:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['captions_per_image']} | {r['compile']} | {'OOM' if r.get('oom') else r.get('error', '')} | | | |"
            )
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['captions_per_image']} | {r['compile']} | {r['samples_per_s']:.0f} | "
            f"{r['step_ms']:.1f} | {memory} | {mfu} |"
        )
    d, s = report["decode"], report["score"]
    lines += [
        "",
        f"Decode + crop of {d['images']} JPEGs (512x384, q90): {d['device_images_per_s']:.0f} images/s on the device, "
        f"{d['cpu_images_per_s']:.0f} on {d['cpu_cores']} CPU cores ({d['device_images_per_s'] / d['cpu_images_per_s']:.1f}x).",
        f"Scoring ({s['model']}, batch {s['batch']}): {s['images_per_s']:.0f} images/s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-B-32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--compile", choices=("both", "on", "off"), default="both")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs for the decode and scoring checks")
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "train": [
            row for model in args.models for row in sweep(model, args.batches, args.steps, device, compile_modes)
        ],
    }
    jpegs = real_size_jpegs(args.images)
    report["decode"] = decode(args.models[0], jpegs, device)
    report["score"] = score(args.models[0], jpegs, device, min(SCORE_BATCH, args.images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    (out / "gpu.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
