"""A contrastive loss with several captions of each image in the step, all of them positives.

open_clip's :class:`~open_clip.loss.ClipLoss` pairs image i with text i. Here
each image brings ``captions_per_image`` (K) texts, laid out image-major
(texts ``i*K … i*K+K-1`` belong to image i), and:

* text -> image: each text's target is its own image (cross-entropy over the
  images, as in CLIP);
* image -> text: each of an image's K texts is a positive, scored against the
  texts of *other* images only — the image's other captions are neither
  positives in the denominator nor negatives:
  ``-log(exp(s_ip) / (exp(s_ip) + sum_{n not of i} exp(s_in)))``, averaged
  over the K positives.

With K = 1 this is exactly ClipLoss. Under DDP the features are gathered by
open_clip's ``get_logits`` (``local_loss``, ``gather_with_grad``); owners are
global indices (``rank * local images + i``), so a caption that happens to be
identical on two workers is still a negative for every image but its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss


class MultiPositiveClipLoss(ClipLoss):
    def __init__(self, captions_per_image: int, **clip_loss_args):
        super().__init__(**clip_loss_args)
        if captions_per_image < 1:
            raise ValueError("captions_per_image must be >= 1")
        self.k = captions_per_image

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        k, local_images = self.k, image_features.shape[0]
        if text_features.shape[0] != local_images * k:
            raise ValueError(f"{text_features.shape[0]} texts for {local_images} images x {k} captions each")
        logits_per_image, logits_per_text = self.get_logits(
            image_features, text_features, logit_scale, logit_bias=logit_bias
        )
        device = image_features.device
        # the first image's global index in logits_per_image's rows, and each text's owner (global)
        first = local_images * self.rank if self.world_size > 1 and self.local_loss else 0
        images = first + torch.arange(logits_per_image.shape[0], device=device)
        text_owner = torch.arange(logits_per_image.shape[1], device=device) // k
        positive = text_owner[None, :] == images[:, None]
        negatives = torch.logsumexp(logits_per_image.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
        positives = logits_per_image[positive].view(-1, k)
        image_to_text = (torch.logaddexp(positives, negatives) - positives).mean()
        text_first = first * k if self.world_size > 1 and self.local_loss else 0
        targets = (text_first + torch.arange(logits_per_text.shape[0], device=device)) // k
        text_to_image = F.cross_entropy(logits_per_text, targets)
        total = (image_to_text + text_to_image) / 2
        return {"contrastive_loss": total} if output_dict else total
