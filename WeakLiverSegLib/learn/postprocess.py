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


_PLANAR = np.zeros((3, 3, 3), bool)     # 4-connectivity within each axial slice, none across slices
_PLANAR[1] = ndimage.generate_binary_structure(2, 1)


def _holes(mask: np.ndarray, structure, faces) -> np.ndarray:
    """Background of ``mask`` not connected (by ``structure``) to the border ``faces``: what
    ``ndimage.binary_fill_holes`` fills, found by one labelling instead of its slow iterated dilation."""
    background, n = ndimage.label(~mask, structure)
    if n == 0:
        return np.zeros_like(mask)
    open_ = np.zeros(n + 1, bool)
    open_[0] = True                     # label 0: the mask itself
    for face in faces:
        open_[np.unique(background[face])] = True
    return ~open_[background]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (2D, axial) and then in 3D (as ``binary_fill_holes`` with its
    default 4- / 6-connectivity)."""
    mask = np.asarray(mask, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    out = mask.copy()
    sub = out[box]
    every = slice(None)
    in_plane = [(every, 0), (every, -1), (every, every, 0), (every, every, -1)]
    sub |= _holes(sub, _PLANAR, in_plane)
    sub |= _holes(sub, None, in_plane + [(0,), (-1,)])
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
