"""FPN anchors and boxes: anchors per level, negatives nearest the tumour boxes, boxes on the working grid."""

from __future__ import annotations

import math

import numpy as np

from ...learn.slices import _axis_range
from .config import ANCHOR_AREAS, ANCHOR_RATIOS, ANCHOR_STRIDES


def anchors(size_hw, strides=ANCHOR_STRIDES, areas=ANCHOR_AREAS, ratios=ANCHOR_RATIOS, inside=True) -> tuple:
    """Faster R-CNN / FPN anchors of an image of ``size_hw`` pixels.

    One anchor per ratio (h / w) at every cell centre of each level (stride s, area a): W x H x 3
    anchors per level.  Returns ``(boxes (A, 4) float32 [x0, y0, x1, y1] pixel edges, levels (A,)
    int 2..5)``; ``inside`` keeps only anchors lying wholly in the image.
    """
    h, w = (int(v) for v in size_hw)
    out, levels = [], []
    for level, (stride, area) in enumerate(zip(strides, areas), start=2):
        ys = (np.arange(math.ceil(h / stride)) + 0.5) * stride
        xs = (np.arange(math.ceil(w / stride)) + 0.5) * stride
        cy, cx = np.meshgrid(ys, xs, indexing="ij")
        for ratio in ratios:
            aw = math.sqrt(area / ratio)
            ah = aw * ratio
            b = np.stack([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2], axis=-1).reshape(-1, 4)
            out.append(b)
            levels.append(np.full(len(b), level))
    boxes = np.concatenate(out).astype(np.float32)
    levels = np.concatenate(levels).astype(np.int64)
    if inside:
        keep = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)
        boxes, levels = boxes[keep], levels[keep]
    return boxes, levels


def overlaps_any(candidates: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(A,) True where a candidate [x0, y0, x1, y1] shares a positive area with any box (touching is not overlap)."""
    if len(boxes) == 0 or len(candidates) == 0:
        return np.zeros(len(candidates), bool)
    a, b = candidates[:, None, :], np.asarray(boxes, np.float32)[None, :, :]
    ix = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    iy = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return ((ix > 0) & (iy > 0)).any(axis=1)


def sample_negatives(anchor_boxes: np.ndarray, anchor_levels: np.ndarray, boxes: np.ndarray, rng,
                     fraction: float = 0.1, n: int = 256) -> np.ndarray:
    """The paper's negatives: anchors overlapping no box, the ``fraction`` nearest (centre to the nearest
    box centre) of each level, then ``n`` drawn at random without replacement.  Returns (k, 4), k <= n."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    free = ~overlaps_any(anchor_boxes, boxes)
    cand, lev = anchor_boxes[free], anchor_levels[free]
    if len(cand) == 0:
        return np.zeros((0, 4), np.float32)
    if len(boxes):
        centre = (cand[:, None, :2] + cand[:, None, 2:]) / 2
        bcentre = (boxes[None, :, :2] + boxes[None, :, 2:]) / 2
        dist = np.sqrt(((centre - bcentre) ** 2).sum(-1)).min(axis=1)
    else:
        dist = np.zeros(len(cand))
    chosen = []
    for level in np.unique(lev):
        idx = np.flatnonzero(lev == level)
        k = max(1, int(math.ceil(fraction * len(idx))))
        chosen.append(idx[np.argsort(dist[idx], kind="stable")[:k]])
    chosen = np.concatenate(chosen)
    if len(chosen) > n:
        chosen = rng.choice(chosen, size=n, replace=False)
    return cand[np.sort(chosen)]


def working_rect(box, shape_zyx, size_hw) -> tuple:
    """A store box on the working grid: (x0, y0, x1, y1) pixel edges (integers) + its slice range (k0, k1)."""
    nz, ny, nx = shape_zyx
    h, w = size_hw
    i0, i1 = _axis_range(box.ijk_min[0], box.ijk_max[0], nx, w)
    j0, j1 = _axis_range(box.ijk_min[1], box.ijk_max[1], ny, h)
    return (i0, j0, i1 + 1, j1 + 1), (max(box.ijk_min[2], 0), min(box.ijk_max[2], nz - 1))


def slice_rects(tumor_boxes, shape_zyx, size_hw) -> dict:
    """{slice: (n, 4) float32 working-grid rects} of the tumour boxes (3D boxes on each slice they cover)."""
    out = {}
    for box in tumor_boxes:
        rect, (k0, k1) = working_rect(box, shape_zyx, size_hw)
        for k in range(k0, k1 + 1):
            out.setdefault(k, []).append(rect)
    return {k: np.asarray(v, np.float32) for k, v in sorted(out.items())}
