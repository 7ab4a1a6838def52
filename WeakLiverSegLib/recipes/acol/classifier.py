"""The region-mining classifier's batches (positive boxes vs. anchor negatives) and loss."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...learn.slices import cut_window, slice_groups
from .fpn_classifier import pad_multiple
from .anchor_boxes import anchors, sample_negatives


class BoxCase:
    """One case for the region miner: working-grid image and the tumour rects per slice."""

    def __init__(self, case_id: str, image: np.ndarray, rects: dict):
        self.case_id, self.image, self.rects = case_id, image, rects


def crop_side(rect, crop: int) -> int:
    """Side of the square window used for a box: ``crop``, or more (a multiple of 32) for a large box."""
    return max(int(crop), pad_multiple(int(math.ceil(max(rect[2] - rect[0], rect[3] - rect[1]))) + 32))


def classifier_batch(cases, crop: int, batch_size: int, rng, context: int = 1, negatives: int = 256,
                     fraction: float = 0.1, flip_prob: float = 0.5, anchor_cache: dict | None = None) -> dict:
    """Crops around tumour boxes with their positives (the boxes) and sampled anchor negatives.

    Each crop is centred near one box of a random tumour slice (shifted by up to a quarter of
    the crop, the box kept inside); the crop side is ``crop``, or larger when a chosen box needs
    it.  Positives: the slice's boxes with at least half their area in the crop (clipped to it).
    Returns ``image`` (B, 2c+1, side, side) float32, ``rois`` (R, 5) ``[b, x0, y0, x1, y1]``,
    ``labels`` (R,) 1 tumour / 0 background.
    """
    pool = [(ci, z) for ci, c in enumerate(cases) for z in c.rects]
    if not pool:
        raise ValueError("no slice with a tumour box")
    anchor_cache = {} if anchor_cache is None else anchor_cache
    picks = []
    for _ in range(batch_size):
        ci, z = pool[int(rng.integers(len(pool)))]
        rects = cases[ci].rects[z]
        picks.append((cases[ci], z, rects, rects[int(rng.integers(len(rects)))]))
    side = max(crop_side(r, crop) for *_, r in picks)
    if side not in anchor_cache:
        anchor_cache[side] = anchors((side, side))
    a_boxes, a_levels = anchor_cache[side]
    images, rois, labels = [], [], []
    for b, (case, z, rects, r) in enumerate(picks):
        cx, cy = (r[0] + r[2]) / 2, (r[1] + r[3]) / 2
        jitter = side // 4
        x0 = int(round(cx - side / 2 + rng.integers(-jitter, jitter + 1)))
        y0 = int(round(cy - side / 2 + rng.integers(-jitter, jitter + 1)))
        x0 = int(np.clip(x0, math.ceil(r[2]) - side, math.floor(r[0])))     # the box stays in the crop
        y0 = int(np.clip(y0, math.ceil(r[3]) - side, math.floor(r[1])))
        img = cut_window(slice_groups(case.image, [z], context)[0], y0, x0, side)
        local = rects - np.array([x0, y0, x0, y0], np.float32)
        if rng.random() < flip_prob:
            img = img[..., ::-1]
            local = np.stack([side - local[:, 2], local[:, 1], side - local[:, 0], local[:, 3]], axis=1)
        if rng.random() < flip_prob:
            img = img[..., ::-1, :]
            local = np.stack([local[:, 0], side - local[:, 3], local[:, 2], side - local[:, 1]], axis=1)
        clipped = np.clip(local, 0, side)
        area = (local[:, 2] - local[:, 0]) * (local[:, 3] - local[:, 1])
        c_area = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
        pos = clipped[c_area >= 0.5 * area]
        neg = sample_negatives(a_boxes, a_levels, local, rng, fraction, negatives)
        for boxes, label in ((pos, 1), (neg, 0)):
            if len(boxes):
                rois.append(np.concatenate([np.full((len(boxes), 1), b, np.float32), boxes], axis=1))
                labels.append(np.full(len(boxes), label, np.int64))
        images.append(np.ascontiguousarray(img))
    return {"image": torch.from_numpy(np.stack(images)), "rois": torch.from_numpy(np.concatenate(rois)),
            "labels": torch.from_numpy(np.concatenate(labels))}


def classifier_loss(out: dict, labels: torch.Tensor, balance: bool = True) -> torch.Tensor:
    """Cross-entropy of branch A (+ branch B), class-balanced when ``balance``."""
    total = 0.0
    for key in ("logits_a", "logits_b"):
        if key not in out:
            continue
        ce = F.cross_entropy(out[key].float(), labels, reduction="none")
        if balance:
            parts = [ce[labels == c].mean() for c in (0, 1) if (labels == c).any()]
            total = total + sum(parts) / len(parts)
        else:
            total = total + ce.mean()
    return total
