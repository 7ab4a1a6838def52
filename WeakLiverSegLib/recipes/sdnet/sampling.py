"""sdnet 3D patches: liver-focused crops, rotation / flip augmentation, ``PatchSampler``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _crop(array: np.ndarray, start, size) -> np.ndarray:
    """``array[start : start + size]`` per axis, zero-padded where it runs past the edges."""
    out = np.zeros(tuple(size), array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(0, s), min(dim, s + n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_patch(image: np.ndarray, liver: np.ndarray | None, size_zyx, rng, foreground_fraction=0.0) -> tuple:
    """A random ``size_zyx`` crop (image, liver or None); with ``foreground_fraction`` probability
    centred within a quarter patch of a random liver voxel."""
    size = np.asarray(size_zyx)
    shape = np.asarray(image.shape)
    if liver is not None and rng.random() < foreground_fraction and liver.any():
        fg = np.flatnonzero(liver)
        centre = np.asarray(np.unravel_index(fg[rng.integers(len(fg))], liver.shape))
        centre = centre + rng.integers(-(size // 4), size // 4 + 1)
        start = centre - size // 2
    else:
        hi = np.maximum(shape - size, 0)
        start = np.array([rng.integers(0, h + 1) for h in hi])
        start -= np.maximum(size - shape, 0) // 2      # centre a volume smaller than the patch
    start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
    return _crop(image, start, size), None if liver is None else _crop(liver, start, size)


def augment(x: torch.Tensor, y: torch.Tensor | None, rng, rotate_deg: float, flip_prob: float) -> tuple:
    """Random in-plane (axial) rotation of each sample and optional left-right flip (labels nearest)."""
    if rotate_deg <= 0 and flip_prob <= 0:
        return x, y
    n = x.shape[0]
    theta = torch.zeros(n, 3, 4)
    for b in range(n):
        a = math.radians(float(rng.uniform(-rotate_deg, rotate_deg))) if rotate_deg > 0 else 0.0
        c, s = math.cos(a), math.sin(a)
        flip = -1.0 if flip_prob > 0 and rng.random() < flip_prob else 1.0
        # grid_sample coordinates are (x, y, z); rotate x-y, optionally mirror x
        theta[b] = torch.tensor([[c * flip, -s, 0, 0], [s * flip, c, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if y is not None:
        y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="border", align_corners=False).long()
    return x, y


class PatchSampler:
    """Batches of labelled (image, liver) and unlabelled (image) patches from working-grid cases."""

    def __init__(self, labelled: list, unlabelled: list, size_zyx, rng, cfg):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.size, self.rng, self.cfg = tuple(size_zyx), rng, cfg

    def sample(self, n_l: int, n_u: int) -> tuple:
        xl, yl, xu = [], [], []
        for _ in range(n_l):
            case = self.labelled[self.rng.integers(len(self.labelled))]
            img, liv = sample_patch(case["image"], case["liver"], self.size, self.rng, self.cfg["foreground_fraction"])
            xl.append(img)
            yl.append(liv)
        for _ in range(n_u if self.unlabelled else 0):
            case = self.unlabelled[self.rng.integers(len(self.unlabelled))]
            xu.append(sample_patch(case["image"], None, self.size, self.rng)[0])
        x_l = torch.from_numpy(np.stack(xl)[:, None])
        y_l = torch.from_numpy(np.stack(yl)[:, None].astype(np.int64))
        x_u = torch.from_numpy(np.stack(xu)[:, None]) if xu else None
        x_l, y_l = augment(x_l, y_l, self.rng, self.cfg["rotate_deg"], self.cfg["flip_prob"])
        if x_u is not None:
            x_u, _ = augment(x_u, None, self.rng, self.cfg["rotate_deg"], self.cfg["flip_prob"])
        return x_l, y_l, x_u
