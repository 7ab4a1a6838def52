"""Segmentation metrics: overlap, surface distances in mm, Cohen's kappa, lesion detection,
tumour burden and ROC AUC, per case and over a cohort (LiTS-style global Dice).

numpy / scipy only (no torch). Arrays are ``(z, y, x)``; ``spacing`` is ``(sx, sy, sz)`` in mm,
the order of ``Volume.spacing``, reversed here to scale array indices into mm.

Surface distances follow MONAI exactly (``HausdorffDistanceMetric(percentile=95)`` and
``SurfaceDistanceMetric(symmetric=True)``): the surface of a mask is its voxels removed by one
binary erosion with the 6-connected cross (outside the grid counts as background); each
surface voxel of one mask gets the Euclidean distance (mm) to the nearest surface voxel of the
other (exact nearest neighbour with a k-d tree, as MONAI does on CPU). ``hd95_mm`` = max of
the two directed 95th percentiles (linear interpolation); ``assd_mm`` = mean over the surface
voxels of both masks together.

Empty-set conventions (per mask pair):

* both empty: dice, jaccard, recall, precision, specificity, kappa = 1.0; hd95_mm = assd_mm = 0.0
  (a healthy liver with no tumour predicted is a perfect tumour result).
* exactly one empty: dice = jaccard = 0.0; recall / precision with a zero denominator = 0.0;
  hd95_mm = assd_mm = None (no surface to measure to; MONAI returns inf there).
* specificity with no truth-negative voxel = 1.0; kappa when chance agreement is 1 = 1.0 if
  the masks agree everywhere.
* ``roc_auc`` is None without both positive and negative voxels.

Cohort summaries average each metric over the cases where it is defined (None skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

METRIC_KEYS = ("dice", "jaccard", "recall", "precision", "specificity", "hd95_mm", "assd_mm", "kappa")
LESION_KEYS = ("lesions_tp", "lesions_fp", "lesions_fn")
DEFAULT_LABELS = {"liver": 1, "tumor": 2}
ORGAN_LABEL = "liver"      # scored on the union of all label values (tumour lies inside the liver)
AUC_BINS = 1 << 16         # histogram bins for the pooled (cohort) AUC; see GlobalSums


# ------------------------------------------------------------------------------ binary masks


def overlap_counts(pred, truth) -> tuple:
    """Voxel counts ``(tp, fp, fn, tn)`` of two boolean masks, as Python ints."""
    pred, truth = _bool(pred), _bool(truth)
    _check_shapes(pred, truth)
    n_pred = int(np.count_nonzero(pred))
    n_truth = int(np.count_nonzero(truth))
    tp = int(np.count_nonzero(pred & truth))
    fp, fn = n_pred - tp, n_truth - tp
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def mask_edges(mask) -> np.ndarray:
    """Surface voxels of a boolean mask: those one 6-connected erosion removes (MONAI's edges)."""
    mask = _bool(mask)
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(pred, truth, spacing=(1.0, 1.0, 1.0)):
    """Directed surface distances in mm: ``(pred -> truth, truth -> pred)`` arrays.

    Each element is, for one surface voxel of the first mask, the distance to the nearest
    surface voxel of the second. ``None`` when exactly one mask is empty; two empty arrays
    when both are. Works on the bounding box of the union plus one voxel (exact: every surface
    voxel lies inside it), so big volumes with small masks stay cheap.
    """
    pred, truth = _bool(pred), _bool(truth)
    _check_shapes(pred, truth)
    sampling = _sampling(spacing, pred.ndim)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return np.zeros(0), np.zeros(0)
    if not (has_pred and has_truth):
        return None
    box = _bounding_box(pred | truth, margin=1)
    # Cropping does not change the edges: erosion treats outside-the-grid as background, the
    # same as MONAI's crop padded with zeros.
    points_pred = np.argwhere(mask_edges(pred[box])) * np.asarray(sampling)
    points_truth = np.argwhere(mask_edges(truth[box])) * np.asarray(sampling)
    # Exact nearest-surface distances with a k-d tree over the surface points (what MONAI does
    # on CPU): the same values as a spacing-aware distance transform, ~10x faster on a liver.
    to_truth = cKDTree(points_truth, leafsize=32).query(points_pred, k=1)[0]
    to_pred = cKDTree(points_pred, leafsize=32).query(points_truth, k=1)[0]
    return to_truth, to_pred


def binary_metrics(pred, truth, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Dice, Jaccard, recall, precision, specificity, HD95 / ASSD (mm) and Cohen's kappa.

    ``pred`` / ``truth``: boolean (or 0/1) arrays of the same shape, ``(z, y, x)``;
    ``spacing``: ``(sx, sy, sz)`` mm. Empty-set conventions: see the module docstring.
    """
    tp, fp, fn, tn = overlap_counts(pred, truth)
    n_pred, n_truth = tp + fp, tp + fn
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "jaccard": 1.0, "recall": 1.0, "precision": 1.0,
                "specificity": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0, "kappa": 1.0}
    out = {
        "dice": 2.0 * tp / (n_pred + n_truth),
        "jaccard": tp / (tp + fp + fn),
        "recall": tp / n_truth if n_truth else 0.0,
        "precision": tp / n_pred if n_pred else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        "hd95_mm": None,
        "assd_mm": None,
        "kappa": cohen_kappa(tp, fp, fn, tn),
    }
    distances = surface_distances(pred, truth, spacing) if n_pred and n_truth else None
    if distances is not None:
        to_truth, to_pred = distances
        out["hd95_mm"] = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
        out["assd_mm"] = float((to_truth.sum() + to_pred.sum()) / (to_truth.size + to_pred.size))
    return out


def cohen_kappa(tp: int, fp: int, fn: int, tn: int) -> float:
    """Cohen's kappa of two binary raters over voxels, from the confusion counts."""
    n = tp + fp + fn + tn
    if n == 0:
        return 1.0
    observed = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
    if chance >= 1.0:  # both raters constant and equal
        return 1.0 if observed == 1.0 else 0.0
    return (observed - chance) / (1.0 - chance)


# ------------------------------------------------------------------------- lesions, burden


def lesion_detection(pred_tumor, truth_tumor, connectivity: int = 26) -> dict:
    """Per-lesion detection counts ``{lesions_tp, lesions_fp, lesions_fn}``.

    Lesions are connected components (26-connected by default, 6 or 18 allowed). A truth
    lesion is detected (TP) when at least one voxel of any predicted component overlaps it,
    else it is missed (FN). A predicted component that overlaps no truth lesion is a false
    positive (FP). So one predicted blob covering two truth lesions gives 2 TP, and two
    predicted blobs on one truth lesion give 1 TP and no FP.
    """
    pred, truth = _bool(pred_tumor), _bool(truth_tumor)
    _check_shapes(pred, truth)
    union = pred | truth
    if not union.any():
        return {"lesions_tp": 0, "lesions_fp": 0, "lesions_fn": 0}
    box = _bounding_box(union, margin=0)
    pred, truth = pred[box], truth[box]
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    structure = ndimage.generate_binary_structure(pred.ndim, {6: 1, 18: 2, 26: 3}[connectivity])
    truth_ids, n_truth = ndimage.label(truth, structure=structure)
    pred_ids, n_pred = ndimage.label(pred, structure=structure)
    both = pred & truth
    detected = np.unique(truth_ids[both]).size
    overlapping_pred = np.unique(pred_ids[both]).size
    return {"lesions_tp": int(detected), "lesions_fp": int(n_pred - overlapping_pred),
            "lesions_fn": int(n_truth - detected)}


def tumor_burden(label_map, tumor: int = 2, liver_values=None) -> float:
    """Tumour voxels / liver voxels (liver = labels >= 1, or ``liver_values``); 0.0 without liver."""
    label_map = np.asarray(label_map)
    liver = label_map >= 1 if liver_values is None else _isin(label_map, liver_values)
    n_liver = int(np.count_nonzero(liver))
    return int(np.count_nonzero(label_map == tumor)) / n_liver if n_liver else 0.0


def burden_rmse(pairs) -> float | None:
    """Root-mean-square error of ``[(predicted burden, true burden), ...]``; None if empty."""
    pairs = list(pairs)
    if not pairs:
        return None
    return math.sqrt(sum((p - t) ** 2 for p, t in pairs) / len(pairs))


# --------------------------------------------------------------------------------------- AUC


def roc_auc(prob, truth) -> float | None:
    """Area under the ROC curve of scores ``prob`` against the boolean ``truth``.

    Rank-based (Mann-Whitney U: the chance that a random positive voxel scores above a random
    negative one, ties counting one half), exact; None when ``truth`` has no positive or no
    negative voxel.
    """
    prob = np.asarray(prob)
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float64)
    prob, truth = prob.ravel(), _bool(truth).ravel()
    if prob.shape != truth.shape:
        raise ValueError(f"roc_auc: {prob.size} scores for {truth.size} labels")
    positives, negatives = np.sort(prob[truth]), np.sort(prob[~truth])
    if positives.size == 0 or negatives.size == 0:
        return None
    # Locating each (sorted) positive among the sorted negatives is the U statistic without
    # ranking the voxels together (several times faster on a CT volume).
    below = np.searchsorted(negatives, positives, side="left").astype(np.float64)
    up_to = np.searchsorted(negatives, positives, side="right")
    wins = float(np.sum(below + 0.5 * (up_to - below)))
    return wins / (positives.size * negatives.size)


def auc_from_histograms(pos_hist, neg_hist) -> float | None:
    """AUC from score histograms of positives and negatives (same ascending bins).

    Exact for scores that fall in distinct bins; pairs sharing a bin count one half, like ties.
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float(np.dot(pos, neg_below + 0.5 * neg) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------ cohort


@dataclass
class LabelSums:
    """Running sums of one label over a cohort (no volumes kept)."""
    intersection: int = 0
    pred_voxels: int = 0
    truth_voxels: int = 0
    burden: list = field(default_factory=list)          # (pred, truth) tumour burden per case
    auc_pos: np.ndarray | None = None                    # probability histograms, AUC_BINS bins
    auc_neg: np.ndarray | None = None


@dataclass
class GlobalSums:
    """What ``summarize`` needs beyond the per-case dicts, accumulated case by case.

    ``dice_global`` = 2 * sum(intersections) / sum(|pred| + |truth|) over all cases (LiTS); the
    pooled AUC uses histograms of the probabilities (AUC_BINS bins over [0, 1]).
    """
    labels: dict = field(default_factory=lambda: dict(DEFAULT_LABELS))
    per_label: dict = field(default_factory=dict)

    def of(self, name: str) -> LabelSums:
        return self.per_label.setdefault(name, LabelSums())

    def add_probabilities(self, name: str, prob, truth) -> None:
        prob = np.asarray(prob)
        sums = self.of(name)
        if sums.auc_pos is None:
            sums.auc_pos = np.zeros(AUC_BINS, np.int64)
            sums.auc_neg = np.zeros(AUC_BINS, np.int64)
        bins = np.minimum((prob * AUC_BINS).astype(np.int64), AUC_BINS - 1).ravel()
        truth = _bool(truth).ravel()
        sums.auc_pos += np.bincount(bins[truth], minlength=AUC_BINS)
        sums.auc_neg += np.bincount(bins[~truth], minlength=AUC_BINS)


def region_masks(label_map, labels=None) -> dict:
    """Boolean mask per label name: ``liver`` = any of the label values (tumour included, as in
    LiTS), every other label = voxels equal to its value."""
    labels = DEFAULT_LABELS if labels is None else labels
    label_map = np.asarray(label_map)
    return {name: (_isin(label_map, labels.values()) if name == ORGAN_LABEL else label_map == value)
            for name, value in labels.items()}


def case_metrics(pred_labels, truth_labels, spacing, labels=None, probabilities=None,
                 accum: GlobalSums | None = None) -> dict:
    """Metrics of one case: ``{label name: {dice, ..., kappa[, lesions_tp/fp/fn][, auc]}}``.

    ``pred_labels`` / ``truth_labels``: label maps ``(z, y, x)`` on the same grid; ``spacing``
    ``(sx, sy, sz)`` mm; ``labels`` name -> value (default liver=1, tumor=2): ``liver`` is
    scored on all label values (tumour included), other labels on their own value and also
    get lesion counts. ``probabilities``: a probability array of the tumour (the last
    non-organ label), or ``{label name: array}``, in [0, 1]; adds ``auc``. ``accum``: the
    cohort's running sums, updated in place for ``summarize``.
    """
    labels = dict(DEFAULT_LABELS if labels is None else labels)
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _check_shapes(pred_labels, truth_labels)
    probabilities = _probabilities_by_label(probabilities, labels)
    pred_masks, truth_masks = region_masks(pred_labels, labels), region_masks(truth_labels, labels)
    organ_values = list(labels.values())
    result = {}
    for name in labels:
        pred, truth = pred_masks[name], truth_masks[name]
        values = binary_metrics(pred, truth, spacing)
        if name != ORGAN_LABEL:
            values.update(lesion_detection(pred, truth))
        if name in probabilities:
            prob = _check_probability(probabilities[name], truth.shape, name)
            values["auc"] = roc_auc(prob, truth)
            if accum is not None:
                accum.add_probabilities(name, prob, truth)
        result[name] = values
        if accum is not None:
            sums = accum.of(name)
            tp, fp, fn, _ = overlap_counts(pred, truth)
            sums.intersection += tp
            sums.pred_voxels += tp + fp
            sums.truth_voxels += tp + fn
            if name != ORGAN_LABEL:
                liver = organ_values if ORGAN_LABEL in labels else None
                sums.burden.append((tumor_burden(pred_labels, labels[name], liver),
                                    tumor_burden(truth_labels, labels[name], liver)))
    if accum is not None:
        accum.labels = labels
    return result


def summarize(per_case: dict, accum: GlobalSums | None = None) -> dict:
    """Cohort summary per label: ``dice_per_case`` (mean), ``dice_global`` (LiTS: pooled over
    voxels of all cases), the mean of every other metric over the cases where it is defined,
    lesion counts summed, ``burden_rmse`` for non-organ labels and the pooled ``auc`` when
    probabilities were given. Without ``accum`` the pooled values are None."""
    names = list(accum.labels) if accum is not None and accum.labels else []
    for case in per_case.values():
        names += [n for n in case if n not in names]
    summary = {}
    for name in names:
        rows = [case[name] for case in per_case.values() if name in case]
        sums = accum.per_label.get(name) if accum is not None else None
        out = {"dice_per_case": _mean(r.get("dice") for r in rows), "dice_global": None}
        if sums is not None:
            denominator = sums.pred_voxels + sums.truth_voxels
            out["dice_global"] = 2.0 * sums.intersection / denominator if denominator else 1.0
        for key in METRIC_KEYS[1:]:
            out[key] = _mean(r.get(key) for r in rows)
        if any(k in r for r in rows for k in LESION_KEYS):
            for key in LESION_KEYS:
                out[key] = int(sum(r.get(key) or 0 for r in rows))
        if name != ORGAN_LABEL:
            out["burden_rmse"] = burden_rmse(sums.burden) if sums is not None and sums.burden else None
        if any("auc" in r for r in rows):
            out["auc"] = (auc_from_histograms(sums.auc_pos, sums.auc_neg)
                          if sums is not None and sums.auc_pos is not None else None)
            out["auc_per_case"] = _mean(r.get("auc") for r in rows)
        summary[name] = out
    return summary


# ----------------------------------------------------------------------------------- helpers


def _bool(array) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array != 0


def _check_shapes(a, b) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} differs from truth shape {b.shape}")


def _sampling(spacing, ndim: int) -> tuple:
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    if any(not s > 0 for s in spacing):
        raise ValueError(f"voxel spacing must be positive, got {spacing}")
    return spacing[::-1]  # (sx, sy, sz) -> array order (z, y, x)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple:
    """Slices of the smallest box holding ``mask`` (non-empty), grown by ``margin``, clipped."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), int(present[-1]) + 1 + margin))
    return tuple(box)


def _isin(label_map: np.ndarray, values) -> np.ndarray:
    values = [int(v) for v in values]
    if label_map.dtype == np.uint8 and all(0 <= v < 256 for v in values):
        table = np.zeros(256, dtype=bool)  # lookup table: much faster than np.isin on big maps
        table[values] = True
        return table[label_map]
    return np.isin(label_map, values)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _probabilities_by_label(probabilities, labels: dict) -> dict:
    if probabilities is None:
        return {}
    if isinstance(probabilities, dict):
        unknown = sorted(set(probabilities) - set(labels))
        if unknown:
            raise ValueError(f"probabilities given for unknown labels {unknown}; labels are {sorted(labels)}")
        return probabilities
    lesion_labels = [n for n in labels if n != ORGAN_LABEL]
    if not lesion_labels:
        raise ValueError("a single probability map is the tumour's, but no tumour label is scored")
    return {lesion_labels[-1]: probabilities}


def _check_probability(prob, shape, name: str) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.shape != shape:
        raise ValueError(f"{name} probabilities have shape {prob.shape}, the label maps {shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    low, high = float(np.min(prob)), float(np.max(prob))
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0.0 or high > 1.0:
        raise ValueError(f"{name} probabilities must lie in [0, 1], found {low:g}..{high:g}")
    return prob
