"""The paper's label refinement: volume labels -> slice labels, ILR (Eq. 2), the PLR continuity index (Eq. 3-6)."""

from __future__ import annotations

import numpy as np


def volume_slice_labels(n_slices: int, pathological: bool) -> np.ndarray:
    """Every slice takes the volume label (1 pathological, 0 healthy)."""
    return np.full(int(n_slices), int(bool(pathological)), np.int64)


def ilr(slice_labels, couinaud_maps, labelled_segments, min_pixels: int = 1) -> np.ndarray:
    """Image-level label refinement (Eq. 2): a pathological slice whose Couinaud map holds none of
    ``labelled_segments`` becomes healthy.  ``labelled_segments=None`` (a volume-level label)
    means "anywhere in the liver": only slices without liver become healthy."""
    labels = np.asarray(slice_labels).astype(np.int64).copy()
    cm = np.asarray(couinaud_maps)
    if cm.ndim != 3 or cm.shape[0] != labels.shape[0]:
        raise ValueError(f"couinaud_maps {cm.shape} must be (slices, h, w) for {labels.shape[0]} slice labels")
    if labelled_segments is None:
        present = (cm > 0).sum(axis=(1, 2)) >= min_pixels
    else:
        present = np.isin(cm, list(labelled_segments)).sum(axis=(1, 2)) >= min_pixels
    labels[~present] = 0
    return labels


def dice2d(a, b) -> float:
    """Dice of two binary masks (Eq. 4); 0 when both are empty (no continuity to speak of)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = int(a.sum()) + int(b.sum())
    return 0.0 if n == 0 else 2.0 * int((a & b).sum()) / n


def continuity_index(masks, c: float = 5.0) -> np.ndarray:
    """CI_k = c * max(Dice(m_k, m_k-1), Dice(m_k, m_k+1)) (Eq. 5); a missing neighbour counts as empty."""
    masks = np.asarray(masks, bool)
    n = masks.shape[0]
    ci = np.zeros(n, np.float32)
    for k in range(n):
        if not masks[k].any():
            continue
        prev = dice2d(masks[k], masks[k - 1]) if k > 0 else 0.0
        nxt = dice2d(masks[k], masks[k + 1]) if k + 1 < n else 0.0
        ci[k] = c * max(prev, nxt)
    return ci


def plr(pseudo_probs, c: float = 5.0, tau: float = 0.5) -> tuple:
    """Pixel-level label refinement: (refined masks = o_k * CI_k >= tau (Eq. 6), CI) of one volume's
    CouinaudNet probabilities (slices, h, w); masks before refinement are ``o_k >= tau`` (Eq. 3)."""
    probs = np.asarray(pseudo_probs, np.float32)
    masks = probs >= tau
    ci = continuity_index(masks, c)
    return probs * ci[:, None, None] >= tau, ci
