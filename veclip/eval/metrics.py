"""Zero-shot classification and image<->text retrieval metrics on embeddings.

Pure numpy on L2-normalised embeddings, so they can be checked by hand.
Ties are broken by index (the lower class or item ranks first): rankings are
deterministic and a tie never counts twice.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def class_embeddings(template_embeddings: np.ndarray) -> np.ndarray:
    """[classes, templates, dim] -> [classes, dim]: CLIP's prompt ensembling
    (average the normalised template embeddings, then normalise again)."""
    return normalize(normalize(template_embeddings).mean(axis=1))


def _ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target column; ties broken by column index."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    columns = np.arange(scores.shape[1])[None, :]
    better = (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))
    return better.sum(axis=1)


def zero_shot_ranks(image_embeddings: np.ndarray, class_embeddings_: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's 0-based rank of its label among all classes."""
    scores = normalize(image_embeddings) @ normalize(class_embeddings_).T
    return _ranks(scores, np.asarray(labels))


def zero_shot(
    image_embeddings: np.ndarray, class_embeddings_: np.ndarray, labels: np.ndarray, ks=(1, 5)
) -> dict[str, float]:
    """Top-k accuracy of each image's label among all classes (k capped at the class count)."""
    return top_k(zero_shot_ranks(image_embeddings, class_embeddings_, labels), ks)


def top_k(ranks: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    return {f"top{k}": float((np.asarray(ranks) < k).mean()) for k in ks}


def mean_per_class_recall(ranks: np.ndarray, labels: list) -> float:
    """Top-1 recall of each class over its images, averaged over the classes (clip_benchmark's figure: a
    class with few images counts as much as one with many)."""
    hits = np.asarray(ranks) == 0
    by_class = defaultdict(list)
    for hit, label in zip(hits, labels):
        by_class[label].append(hit)
    return float(np.mean([np.mean(h) for h in by_class.values()])) if by_class else 0.0


def choice_ranks(image_embeddings: np.ndarray, candidate_embeddings: np.ndarray) -> np.ndarray:
    """Multiple choice: each image's rank of its right candidate (the first) among its own candidates.
    ``candidate_embeddings``: [images, candidates, dim]."""
    scores = np.einsum("id,icd->ic", normalize(image_embeddings), normalize(candidate_embeddings))
    return _ranks(scores, np.zeros(len(scores), dtype=np.int64))


RETRIEVAL_CHUNK = 1024  # rows of the similarity matrix made at once: memory linear in the set, not square


def retrieval_ranks(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(image -> text ranks of the images that have a caption, text -> image ranks of every caption);
    ``text_image[j]`` is the image that caption ``j`` describes (several captions per image allowed).
    Image->text ranks an image by the best-ranked of its own captions. The similarity matrix is made
    ``RETRIEVAL_CHUNK`` rows at a time (10,000 images: 400 MB whole)."""
    text_image = np.asarray(text_image)
    images, texts = normalize(image_embeddings), normalize(text_embeddings)
    t2i_ranks = np.empty(len(texts), np.int64)
    for start in range(0, len(texts), RETRIEVAL_CHUNK):
        part = slice(start, start + RETRIEVAL_CHUNK)
        t2i_ranks[part] = _ranks(texts[part] @ images.T, text_image[part])
    i2t_ranks = np.full(len(images), np.iinfo(np.int64).max)
    for start in range(0, len(images), RETRIEVAL_CHUNK):
        scores = images[start : start + RETRIEVAL_CHUNK] @ texts.T  # [chunk images, texts]
        captions = np.flatnonzero((text_image >= start) & (text_image < start + RETRIEVAL_CHUNK))
        ranks = _ranks(scores[text_image[captions] - start], captions)
        np.minimum.at(i2t_ranks, text_image[captions], ranks)
    captioned = np.zeros(len(images), dtype=bool)
    captioned[text_image] = True  # image -> text over the images that have a caption
    return i2t_ranks[captioned], t2i_ranks


def retrieval(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways (:func:`retrieval_ranks`): image->text counts a hit when *any* of the image's
    captions is in the top k; text->image when its image is."""
    return recall_at(*retrieval_ranks(image_embeddings, text_embeddings, text_image), ks)


def recall_at(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((np.asarray(i2t_ranks) < k).mean())
        out[f"text_to_image_R@{k}"] = float((np.asarray(t2i_ranks) < k).mean())
    return out
