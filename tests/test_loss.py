"""The multi-positive contrastive loss: exact values on hand-made embeddings, and DDP = one process."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from veclip.train.loss import MultiPositiveClipLoss


def reference(images: torch.Tensor, texts: torch.Tensor, scale: float, k: int) -> float:
    """The loss written out term by term from its definition (loss.py's docstring)."""
    n = images.shape[0]
    logits = scale * images @ texts.T  # images x texts
    image_to_text = []
    for i in range(n):
        negatives = [logits[i, t] for t in range(n * k) if t // k != i]
        for p in range(i * k, i * k + k):
            denominator = math.exp(logits[i, p]) + sum(math.exp(v) for v in negatives)
            image_to_text.append(-math.log(math.exp(logits[i, p]) / denominator))
    text_to_image = [-F.log_softmax(logits[:, t], dim=0)[t // k].item() for t in range(n * k)]
    return (sum(image_to_text) / len(image_to_text) + sum(text_to_image) / len(text_to_image)) / 2


def test_one_caption_per_image_is_exactly_clip_loss():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    ours = MultiPositiveClipLoss(1)(images, texts, torch.tensor(10.0))
    assert torch.allclose(ours, ClipLoss()(images, texts, torch.tensor(10.0)), atol=1e-6)


def test_an_images_other_captions_are_not_negatives():
    # image 0's two captions: one near it, one orthogonal to everything. Neither may push down the other.
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss = MultiPositiveClipLoss(2)(images, texts, torch.tensor(5.0))
    assert math.isclose(loss.item(), reference(images, texts, 5.0, 2), rel_tol=1e-5)
    # the same captions with the image's second caption made identical to its first: only the
    # image->text positive term for it changes, never a "negative" between the two
    torch.manual_seed(1)
    images, texts = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(12, 16), dim=1)
    assert math.isclose(
        MultiPositiveClipLoss(3)(images, texts, torch.tensor(20.0)).item(),
        reference(images, texts, 20.0, 3),
        rel_tol=1e-5,
    )


def test_texts_must_come_k_per_image():
    with pytest.raises(ValueError, match="5 texts for 2 images x 2"):
        MultiPositiveClipLoss(2)(torch.randn(2, 4), torch.randn(5, 4), torch.tensor(1.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(weight: torch.Tensor, x_images: torch.Tensor, x_texts: torch.Tensor):
    return F.normalize(x_images @ weight, dim=1), F.normalize(x_texts @ weight, dim=1)


def _ddp_worker(rank: int, world: int, port: int, batch: dict, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    weight = batch["weight"].clone().requires_grad_(True)
    per = batch["images"].shape[0] // world
    k = batch["k"]
    images, texts = _features(
        weight, batch["images"][rank * per : (rank + 1) * per], batch["texts"][rank * per * k : (rank + 1) * per * k]
    )
    loss = MultiPositiveClipLoss(k, local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
        images, texts, torch.tensor(10.0)
    )
    loss.backward()
    dist.all_reduce(weight.grad)  # what DDP does to a parameter's gradient (then divides by the world size)
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, loss.detach().view(1))
    if rank == 0:
        out["grad"] = weight.grad / world
        out["loss"] = torch.cat(losses).mean()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, batch: dict, path: str) -> None:
    out: dict = {}
    _ddp_worker(rank, world, port, batch, out)
    if rank == 0:
        torch.save(out, path)


def test_two_ddp_workers_equal_the_same_batch_on_one(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(2)
    k = 3
    batch = {"weight": torch.randn(12, 8), "images": torch.randn(8, 12), "k": k}
    texts = torch.randn(8 * k, 12)
    texts[k * 5] = texts[k * 1]  # a caption of image 5 (worker 1) identical to one of image 1 (worker 0)
    batch["texts"] = texts
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_spawned, args=(2, _free_port(), batch, path), nprocs=2, join=True)
    ddp = torch.load(path)

    weight = batch["weight"].clone().requires_grad_(True)
    images, texts = _features(weight, batch["images"], batch["texts"])
    loss = MultiPositiveClipLoss(k)(images, texts, torch.tensor(10.0))
    loss.backward()
    assert torch.allclose(ddp["loss"], loss.detach(), atol=1e-5)
    assert torch.allclose(ddp["grad"], weight.grad, atol=1e-5)
    assert math.isclose(loss.item(), reference(images.detach(), texts.detach(), 10.0, k), rel_tol=1e-5)
