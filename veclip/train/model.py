"""open_clip models, optimizer groups, the LR schedule, and the FLOP count for MFU."""

from __future__ import annotations

import math
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
# Dense bf16 peak FLOP/s per GPU, for MFU (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def register_configs() -> None:
    """Make our own configs (``veclip-tiny``) known to open_clip by name."""
    import open_clip

    if "veclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def create_model(name: str, pretrained: str | None = None):
    """Any open_clip model by name; ``pretrained``: a local weights file (or an open_clip tag)."""
    import open_clip

    register_configs()
    return open_clip.create_model(name, pretrained=pretrained or None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases and the logit scale (open_clip's rule)."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def adamw(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.AdamW:
    """AdamW as configured (an ``OptimConfig``); fused on GPUs unless ``optim.fused`` says otherwise."""
    fused = optim.fused if optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=fused,
    )


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_flops_per_sample(
    model: torch.nn.Module, image_size: int, context_length: int, texts_per_image: int = 1
) -> float:
    """Forward + backward FLOPs of one image and its texts, counted by torch on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    images = torch.zeros(2, 3, image_size, image_size, device=device)
    texts = torch.zeros(2 * texts_per_image, context_length, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, scale = model(images, texts)[:3]
        (image_features.sum() + text_features.sum() + scale).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
