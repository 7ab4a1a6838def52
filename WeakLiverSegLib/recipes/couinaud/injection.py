"""Synthetic tumours injected into a chosen Couinaud segment of a healthy slice (CouinaudNet's training data)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def inject_tumour(image, couinaud_map, segment_id: int, rng, pixel_mm: float = 1.5, slice_mm: float = 3.0,
                  hu_per_unit: float = 1.0, radius_mm=(3.0, 15.0), contrast_hu=(-90.0, -15.0)) -> tuple:
    """A synthetic hypodense tumour inside one Couinaud segment: (new image, tumour mask).

    ``image``: (h, w) or a slice stack (c, h, w) whose middle slice is the tumour's centre level
    (the tumour is an ellipsoid across the stack, so neighbouring slices stay consistent);
    ``couinaud_map`` the same shape; ``segment_id`` 1..8, or 0 for anywhere in the liver.
    ``hu_per_unit``: HU per image unit (1 for HU images, 450 for the [-200, 250] window).
    Only pixels of the segment change; the mask is where the tumour covers at least half a pixel.
    The tumour replaces the local parenchyma (vessels inside it vanish) and keeps the image's
    own noise; it is lobulated, has a soft edge, an internal texture and sometimes a necrotic
    core or an enhancing rim.
    """
    img = np.asarray(image, np.float32)
    cm = np.asarray(couinaud_map)
    if img.shape != cm.shape or img.ndim not in (2, 3):
        raise ValueError(f"image {img.shape} and couinaud_map {cm.shape} must be the same (h, w) or (c, h, w)")
    flat = img.ndim == 2
    if flat:
        img, cm = img[None], cm[None]
    region = cm > 0 if int(segment_id) == 0 else cm == int(segment_id)
    out, mask = img.copy(), np.zeros(img.shape, bool)
    c0 = img.shape[0] // 2
    if not region[c0].any():
        return (out[0], mask[0]) if flat else (out, mask)
    depth = ndimage.distance_transform_edt(region[c0]) * pixel_mm
    r = float(rng.uniform(*radius_mm))
    r = min(r, max(1.25 * float(depth.max()), 1.5 * pixel_mm))     # mostly fits the segment
    cand = np.argwhere(depth >= min(0.7 * r, float(depth.max())))
    cy, cx = cand[rng.integers(len(cand))]
    angle, ratio = rng.uniform(0, np.pi), rng.uniform(0.65, 1.0)
    a, b = r / math.sqrt(ratio), r * math.sqrt(ratio)
    rz = r * rng.uniform(0.6, 1.2)
    lobes = [(n, rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)) for n in (2, 3, 4)]
    edge = rng.uniform(0.04, 0.15)
    contrast = rng.uniform(*contrast_hu) / hu_per_unit
    necrosis = rng.uniform(0.3, 0.8) if rng.random() < 0.3 else 0.0
    rim = rng.uniform(0.3, 0.6) * abs(contrast) if rng.random() < 0.2 else 0.0   # the tumour stays hypodense
    h, w = img.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (yy - cy) * pixel_mm, (xx - cx) * pixel_mm
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos(n * phi + ph) for n, amp, ph in lobes)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 2.0)
    texture *= 0.25 * abs(contrast) / max(float(texture.std()), 1e-6)
    for c in range(img.shape[0]):
        s = 1.0 - ((c - c0) * slice_mm / rz) ** 2
        if s <= 0 or not region[c].any():
            continue
        scale = math.sqrt(s)
        rho = np.sqrt((u / (a * scale)) ** 2 + (v / (b * scale)) ** 2) / wobble
        p = 1.0 / (1.0 + np.exp(-np.clip((1.0 - rho) / edge, -30, 30)))
        p = np.where(region[c], p, 0.0).astype(np.float32)
        if not (p >= 0.5).any():
            continue
        level = float(np.median(img[c][region[c]]))
        base = ndimage.gaussian_filter(img[c], 1.0)
        noise = img[c] - base
        core = np.clip(1.0 - rho / 0.5, 0.0, 1.0)
        value = level + contrast * (1.0 + necrosis * core) + texture + rim * ((rho > 0.8) & (rho < 1.0))
        out[c] = (1.0 - p) * img[c] + p * (value + noise)
        mask[c] = p >= 0.5
    return (out[0], mask[0]) if flat else (out, mask)
