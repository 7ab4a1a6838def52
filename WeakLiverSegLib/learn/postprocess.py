"""Post-processing of liver / tumour label maps (the O2L paper, section IV-B).

Largest connected liver component, hole filling in liver and lesions (per slice in 2D, then in
3D), lesions outside the liver removed.  Label maps are uint8 ``(z, y, x)``: 0 background,
1 liver, 2 tumour (tumour voxels are part of the liver).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _bbox(mask: np.ndarray) -> tuple | None:
    """Slices of the bounding box of ``mask`` (None when empty): work happens only there."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(out)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean 3D mask (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    box = _bbox(mask)
    out = np.zeros_like(mask)
    if box is None:
        return out
    labels, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        out[box] = labels > 0
        return out
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out[box] = labels == int(np.argmax(sizes))
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (2D, axial) and then in 3D."""
    mask = np.asarray(mask, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    out = mask.copy()
    sub = out[box]
    for k in range(sub.shape[0]):
        if sub[k].any():
            sub[k] = ndimage.binary_fill_holes(sub[k])
    out[box] = ndimage.binary_fill_holes(sub)
    return out


def postprocess(labels: np.ndarray, tumor: bool = True) -> np.ndarray:
    """Clean a 0/1/2 label map: one liver component, no holes, tumour only inside the liver.

    ``tumor=False`` drops the tumour steps (a liver-only model).
    """
    labels = np.asarray(labels)
    liver = fill_holes(largest_component(labels >= 1))
    out = liver.astype(np.uint8)
    if tumor:
        lesions = fill_holes((labels == 2) & liver) & liver
        out[lesions] = 2
    return out
