"""open_clip's train augmentation, drawn reproducibly per row; and its crop on the worker's device, where JPEGs
are decoded there (``decode="device"``: nvJPEG on a GPU)."""

from __future__ import annotations

import functools
import math
import random

import numpy as np


@functools.lru_cache(maxsize=4)
def augment_and_tokenizer(model_name: str):
    """open_clip's train transform minus ToTensor/Normalize, its output size, and the model's tokenizer."""
    import open_clip

    from veclip.train.model import register_configs

    register_configs()
    config = open_clip.get_model_config(model_name)
    if config:  # a named config: its transform is the default one at the model's size (as create_model sets it)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        train_transform = image_transform_v2(PreprocessCfg(size=config["vision_cfg"]["image_size"]), is_train=True)
    else:  # building the model to learn its transform costs seconds per decode process
        _, train_transform, _ = open_clip.create_model_and_transforms(model_name, load_weights=False)
    keep = [t for t in train_transform.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    size = next(tuple(t.size) for t in keep if hasattr(t, "size"))
    return keep, size, open_clip.get_tokenizer(model_name)


def resized_crop(crop, image, draw: random.Random):
    """torchvision's ``RandomResizedCrop`` with its parameters drawn by the same algorithm from a Python
    generator: ~5 us instead of ~130 us of single-element torch ops per image (a third of a 64 px decode)."""
    from torchvision.transforms import functional

    top, left, h, w = crop_box(crop, *image.size, draw)
    return functional.resized_crop(image, top, left, h, w, crop.size, crop.interpolation, antialias=crop.antialias)


def crop_box(crop, width: int, height: int, draw: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, height, width) for an image of this size."""
    area, log_ratio = width * height, (math.log(crop.ratio[0]), math.log(crop.ratio[1]))
    for _ in range(10):
        target = area * draw.uniform(*crop.scale)
        aspect = math.exp(draw.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = draw.randint(0, height - h), draw.randint(0, width - w)
            break
    else:  # central crop, as torchvision falls back
        ratio = width / height
        w, h = (
            (width, round(width / min(crop.ratio)))
            if ratio < min(crop.ratio)
            else ((round(height * max(crop.ratio)), height) if ratio > max(crop.ratio) else (width, height))
        )
        top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w


def crop_for_device(augment: list):
    """The one transform a device-decoded image still needs (RandomResizedCrop; the rest must be
    open_clip's RGB conversion, which decoding to RGB does), or a clear error."""
    from torchvision.transforms import RandomResizedCrop

    crops = [t for t in augment if isinstance(t, RandomResizedCrop)]
    rgb = lambda t: (
        type(t).__name__ == "MaybeConvertMode" and t.mode == "RGB" or "convert_to_rgb" in getattr(t, "__name__", "")
    )
    others = [t for t in augment if not isinstance(t, RandomResizedCrop) and not rgb(t)]
    if len(crops) != 1 or others:
        raise ValueError(
            f"train: decode=device supports open_clip's default train transform (a random resized crop); "
            f"this model's has {augment}. Use decode=cpu."
        )
    return crops[0]


def device_crop_for(model_name: str):
    """The crop a worker applies to the images it decodes (``decode="device"``)."""
    return crop_for_device(augment_and_tokenizer(model_name)[0])


def decode_on_device(images, jpegs: np.ndarray, boxes: np.ndarray, rows: np.ndarray, crop) -> None:
    """Decode the JPEGs of ``rows`` on ``images``' device in one batched call (nvJPEG on a GPU) and
    write their crops, resized like the CPU path, into ``images`` (uint8, N x 3 x H x W) in place."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional

    if not len(rows):
        return
    data = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in rows]
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=images.device)
    for i, image in zip(rows, decoded):
        top, left, h, w = (int(v) for v in boxes[i])
        images[i] = functional.resized_crop(image, top, left, h, w, list(crop.size), crop.interpolation, antialias=True)
