"""Metrics: agreement with MONAI on real IRCADb masks, known answers, conventions, cohort sums."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from WeakLiverSegLib.evaluation.metrics import (
    LESION_KEYS,
    METRIC_KEYS,
    GlobalSums,
    auc_from_histograms,
    binary_metrics,
    burden_rmse,
    case_metrics,
    lesion_detection,
    roc_auc,
    summarize,
    tumor_burden,
)

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _monai(pred, truth, spacing_xyz):
    """MONAI's Dice, HD95 and symmetric ASSD of two (z, y, x) boolean masks."""
    torch = pytest.importorskip("torch")
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    torch.set_num_threads(1)
    yp = torch.from_numpy(pred[None, None].astype(np.float32))
    yt = torch.from_numpy(truth[None, None].astype(np.float32))
    spacing = tuple(float(s) for s in spacing_xyz[::-1])  # MONAI: spacing per array axis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True)(yp, yt).item()
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)(yp, yt, spacing=spacing).item()
        assd = SurfaceDistanceMetric(include_background=True, symmetric=True)(yp, yt, spacing=spacing).item()
    return dice, hd95, assd


def _liver_crop(label_map, margin=4):
    liver = label_map >= 1
    box = []
    for axis in range(3):
        present = np.flatnonzero(liver.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(present[0] - margin, 0), present[-1] + 1 + margin))
    return label_map[tuple(box)]


# -------------------------------------------------------------------- real masks vs MONAI

REAL_CASES = [("p01", "liver", "eroded"), ("p01", "tumor", "shifted"),
              ("p17", "liver", "shifted"), ("p17", "tumor", "eroded")]


@pytest.fixture(scope="module")
def ircadb_labels():
    sitk = pytest.importorskip("SimpleITK")
    cache = {}

    def load(patient):
        path = SHARED_DATA / "ircadb" / patient / "label.nii.gz"
        if not path.is_file():
            pytest.skip(f"real IRCADb masks not available ({path} is absent, e.g. on a fresh clone)")
        if patient not in cache:
            image = sitk.ReadImage(str(path))
            cache[patient] = (_liver_crop(sitk.GetArrayFromImage(image)), image.GetSpacing())
        return cache[patient]

    return load


@pytest.mark.realdata
@pytest.mark.parametrize("patient,structure,perturbation", REAL_CASES)
def test_agrees_with_monai_on_real_masks(ircadb_labels, patient, structure, perturbation):
    label_map, spacing = ircadb_labels(patient)
    truth = label_map >= 1 if structure == "liver" else label_map == 2
    if perturbation == "eroded":
        pred = ndimage.binary_erosion(truth, iterations=2)
    else:  # shift by (2, 3, 1) voxels along (x, y, z); the crop margin keeps np.roll from wrapping
        pred = np.roll(truth, (1, 3, 2), axis=(0, 1, 2))
    ours = binary_metrics(pred, truth, spacing)
    dice, hd95, assd = _monai(pred, truth, spacing)
    assert 0.5 < ours["dice"] < 0.999  # a real, imperfect prediction
    assert ours["dice"] == pytest.approx(dice, abs=1e-6)
    assert ours["hd95_mm"] == pytest.approx(hd95, abs=0.01)
    assert ours["assd_mm"] == pytest.approx(assd, abs=0.01)
    assert ours["hd95_mm"] > 1.0 and ours["assd_mm"] > 0.3


# ----------------------------------------------------------------------- known answers


def test_offset_cubes_known_answer():
    truth = np.zeros((10, 10, 10), bool)
    pred = np.zeros_like(truth)
    truth[2:6, 2:6, 2:6] = True           # 4x4x4 = 64 voxels
    pred[2:6, 2:6, 3:7] = True            # shifted one voxel in x: overlap 4x4x3 = 48
    m = binary_metrics(pred, truth)
    tp, fp, fn, tn = 48, 16, 16, 1000 - 80
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert m["jaccard"] == pytest.approx(48 / 80)
    assert m["recall"] == pytest.approx(48 / 64) and m["precision"] == pytest.approx(48 / 64)
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    observed = (tp + tn) / 1000
    chance = (64 / 1000) * (64 / 1000) + (936 / 1000) * (936 / 1000)
    assert m["kappa"] == pytest.approx((observed - chance) / (1 - chance))
    # each cube's +x / -x face is 1 voxel from the other's; the rest touch: HD95 = 1 voxel
    assert m["hd95_mm"] == pytest.approx(1.0)
    assert 0.0 < m["assd_mm"] < 1.0


def test_single_voxels_distance_uses_spacing_in_xyz_order():
    pred = np.zeros((5, 6, 7), bool)
    truth = np.zeros_like(pred)
    pred[1, 2, 1] = True                  # (i, j, k) = (1, 2, 1)
    truth[2, 2, 3] = True                 # (i, j, k) = (3, 2, 2): di = 2, dk = 1
    spacing = (0.5, 1.0, 3.0)             # (sx, sy, sz)
    m = binary_metrics(pred, truth, spacing)
    assert m["hd95_mm"] == pytest.approx(math.hypot(2 * 0.5, 1 * 3.0))
    assert m["assd_mm"] == pytest.approx(math.hypot(2 * 0.5, 1 * 3.0))


def test_anisotropic_spacing_scales_only_the_shifted_axis():
    # two parallel 1-voxel-thick plates, 3 slices apart: every distance is straight along z
    truth = np.zeros((10, 9, 9), bool)
    truth[3, 2:7, 2:7] = True
    pred = np.roll(truth, 3, axis=0)
    for spacing in [(0.7, 0.7, 1.0), (0.7, 0.7, 2.5), (0.3, 2.0, 2.5)]:
        m = binary_metrics(pred, truth, spacing)
        assert m["hd95_mm"] == pytest.approx(3 * spacing[2])
        assert m["assd_mm"] == pytest.approx(3 * spacing[2])
    # a solid box shifted in z: isotropic scaling scales every distance, overlap is unchanged
    box = np.zeros((16, 14, 14), bool)
    box[4:10, 3:10, 4:11] = True
    shifted = np.roll(box, 2, axis=0)
    one, two = binary_metrics(shifted, box, (0.7, 0.9, 1.3)), binary_metrics(shifted, box, (1.4, 1.8, 2.6))
    assert two["hd95_mm"] == pytest.approx(2 * one["hd95_mm"])
    assert two["assd_mm"] == pytest.approx(2 * one["assd_mm"])
    assert two["dice"] == one["dice"]
    dice, hd95, assd = _monai(shifted, box, (0.3, 2.0, 2.5))
    ours = binary_metrics(shifted, box, (0.3, 2.0, 2.5))
    assert ours["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
    assert ours["assd_mm"] == pytest.approx(assd, abs=1e-4)
    assert ours["dice"] == pytest.approx(dice, abs=1e-6)


def test_empty_set_conventions():
    empty = np.zeros((6, 6, 6), bool)
    blob = empty.copy()
    blob[2:4, 2:4, 2:4] = True
    both = binary_metrics(empty, empty)
    assert all(both[k] == 1.0 for k in ("dice", "jaccard", "recall", "precision", "specificity", "kappa"))
    assert both["hd95_mm"] == 0.0 and both["assd_mm"] == 0.0
    missed = binary_metrics(empty, blob)           # prediction empty
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["precision"] == 0.0
    assert missed["hd95_mm"] is None and missed["assd_mm"] is None
    assert missed["specificity"] == 1.0 and missed["kappa"] == 0.0
    false_alarm = binary_metrics(blob, empty)      # truth empty
    assert false_alarm["dice"] == 0.0 and false_alarm["recall"] == 0.0
    assert false_alarm["hd95_mm"] is None
    assert false_alarm["specificity"] == pytest.approx((216 - 8) / 216)
    assert set(both) == set(missed) == set(METRIC_KEYS)


# --------------------------------------------------------------------- lesions, burden


def test_lesion_detection_counts():
    truth = np.zeros((20, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True                    # lesion A: found
    truth[12:15, 12:15, 12:15] = True              # lesion B: missed
    pred = np.zeros_like(truth)
    pred[3:6, 3:6, 3:6] = True                     # overlaps A
    pred[2:4, 15:18, 2:4] = True                   # touches nothing: false positive
    assert lesion_detection(pred, truth) == {"lesions_tp": 1, "lesions_fp": 1, "lesions_fn": 1}
    # one predicted blob over both lesions detects both, no FP
    bridge = np.zeros_like(truth)
    bridge[2:15, 2:15, 2:15] = True
    assert lesion_detection(bridge, truth) == {"lesions_tp": 2, "lesions_fp": 0, "lesions_fn": 0}
    # diagonal neighbours are one 26-connected lesion, two 6-connected ones
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    assert lesion_detection(diagonal, np.zeros_like(diagonal))["lesions_fp"] == 1
    assert lesion_detection(diagonal, np.zeros_like(diagonal), connectivity=6)["lesions_fp"] == 2
    assert lesion_detection(np.zeros_like(truth), np.zeros_like(truth)) == dict.fromkeys(LESION_KEYS, 0)


def _label_map(liver_voxels, tumor_voxels, shape=(10, 10, 10)):
    array = np.zeros(int(np.prod(shape)), np.uint8)
    array[:liver_voxels] = 1
    array[:tumor_voxels] = 2
    return array.reshape(shape)


def test_tumor_burden_and_rmse_over_cases():
    assert tumor_burden(_label_map(100, 10)) == pytest.approx(0.1)   # tumour voxels count as liver
    assert tumor_burden(np.zeros((3, 3, 3), np.uint8)) == 0.0
    accum = GlobalSums()
    per_case = {
        "a": case_metrics(_label_map(100, 20), _label_map(100, 10), (1, 1, 1), accum=accum),  # 0.2 vs 0.1
        "b": case_metrics(_label_map(200, 10), _label_map(200, 0), (1, 1, 1), accum=accum),   # 0.05 vs 0
    }
    summary = summarize(per_case, accum)
    assert summary["tumor"]["burden_rmse"] == pytest.approx(math.sqrt((0.1 ** 2 + 0.05 ** 2) / 2))
    assert burden_rmse([]) is None
    assert "burden_rmse" not in summary["liver"]


# ----------------------------------------------------------------------------------- AUC


def _pairwise_auc(prob, truth):
    pos, neg = prob[truth], prob[~truth]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_perfect_random_and_ties():
    rng = np.random.default_rng(3)
    truth = rng.random(20000) < 0.3
    assert roc_auc(truth * 0.8 + 0.1, truth) == pytest.approx(1.0)
    assert roc_auc(1.0 - truth, truth) == pytest.approx(0.0)
    assert roc_auc(rng.random(20000), truth) == pytest.approx(0.5, abs=0.02)
    assert roc_auc(np.full(20000, 0.3), truth) == pytest.approx(0.5)
    small_truth = rng.random(60) < 0.4
    small_prob = np.round(rng.random(60), 1)       # many ties
    assert roc_auc(small_prob, small_truth) == pytest.approx(_pairwise_auc(small_prob, small_truth))
    assert roc_auc(small_prob, np.zeros(60, bool)) is None
    # pooled histogram AUC is exact when the scores fall in distinct bins
    quantized = np.round(rng.random(5000), 2)
    labels = rng.random(5000) < quantized          # informative scores
    accum = GlobalSums()
    accum.add_probabilities("tumor", quantized, labels)
    pooled = auc_from_histograms(accum.of("tumor").auc_pos, accum.of("tumor").auc_neg)
    assert pooled == pytest.approx(roc_auc(quantized, labels), abs=1e-12)
    assert 0.7 < pooled < 0.95


# -------------------------------------------------------------------------------- cohort


def test_case_metrics_scores_liver_with_tumour_and_summary_is_lits_style():
    truth1 = np.zeros((8, 12, 12), np.uint8)
    truth1[2:6, 2:10, 2:10] = 1
    truth1[3:5, 4:6, 4:6] = 2
    pred1 = truth1.copy()
    pred1[pred1 == 2] = 1                          # tumour missed but painted liver
    m1 = case_metrics(pred1, truth1, (1.0, 1.0, 2.0))
    assert m1["liver"]["dice"] == 1.0              # liver = labels >= 1, tumour included
    assert m1["tumor"]["dice"] == 0.0 and m1["tumor"]["lesions_fn"] == 1
    assert set(m1["liver"]) == set(METRIC_KEYS)
    assert set(m1["tumor"]) == set(METRIC_KEYS) | set(LESION_KEYS)

    big_truth = np.zeros((8, 12, 12), np.uint8)
    big_truth[1:7, 1:11, 1:11] = 1
    big_pred = np.zeros_like(big_truth)
    big_pred[1:7, 1:11, 1:6] = 1                   # half of a big liver
    small_truth = np.zeros_like(big_truth)
    small_truth[3:5, 3:5, 3:5] = 1
    accum = GlobalSums()
    per_case = {"big": case_metrics(big_pred, big_truth, (1, 1, 1), accum=accum),
                "small": case_metrics(small_truth.copy(), small_truth, (1, 1, 1), accum=accum)}
    liver = summarize(per_case, accum)["liver"]
    n_big, n_small = 6 * 10 * 10, 8
    assert liver["dice_per_case"] == pytest.approx((2 * 300 / (300 + n_big) + 1.0) / 2)
    assert liver["dice_global"] == pytest.approx(2 * (300 + n_small) / (300 + n_big + 2 * n_small))
    assert liver["hd95_mm"] == pytest.approx((per_case["big"]["liver"]["hd95_mm"] + 0.0) / 2)
    tumor = summarize(per_case, accum)["tumor"]
    assert tumor["dice_per_case"] == 1.0 and tumor["dice_global"] == 1.0   # no tumour anywhere
    assert tumor["lesions_tp"] == tumor["lesions_fp"] == tumor["lesions_fn"] == 0


def test_case_metrics_with_probabilities_adds_auc():
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:5, 1:7, 1:7] = 1
    truth[2:4, 3:5, 3:5] = 2
    prob = (truth == 2) * 0.9 + 0.05
    accum = GlobalSums()
    per_case = {"c": case_metrics(truth, truth, (1, 1, 1), probabilities=prob, accum=accum)}
    assert per_case["c"]["tumor"]["auc"] == pytest.approx(1.0)
    assert "auc" not in per_case["c"]["liver"]
    summary = summarize(per_case, accum)
    assert summary["tumor"]["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        case_metrics(truth, truth, (1, 1, 1), probabilities=prob * 3)
