"""Recipe ``acol``: tumour pseudo-masks from boxes by anchor-based region mining (ACoL + dense CRF).

Fan et al., "Weakly Supervised Liver Tumor Segmentation Based on Anchor Box and Adversarial
Complementary Learning" (../shared/papers/anchor_box_acol_region_mining.txt).  A second
box-to-mask teacher that needs no pixel label at all (``o2l``'s teacher needs a strong set).

1. Region-mining classifier (``networks/fpn_classifier.py``): ResNet-50 + FPN on three-slice
   crops around the tumour boxes; positives = the tumour boxes of the store (2D per-slice boxes
   preferred, 3D boxes on every slice they cover), negatives = FPN anchors (areas 32^2..256^2,
   ratios 1:1, 1:2, 2:1, one set per level P2..P5) that do not overlap any box, the 10 % nearest
   to a box centre per level, ``N`` of them drawn at random (256 in the paper).  Box features
   come from the level of Eq. 2.  Two branches A / B (ACoL, delta 0.6); ``mode: cam`` keeps
   branch A only (the paper's CAM baseline).
2. Pseudo-masks: for each tumour box, the fused map max(norm A, norm B) resized to the box is the
   tumour unary of a dense CRF run inside the box (mean-field in torch: Gaussian + bilateral
   kernels, Potts compatibility); background outside the boxes; in-box pixels left background
   are *ignored* by the segmentation loss (label 255).
3. Segmentation network on the pseudo-masks: the project's 2D U-Net on three-slice groups,
   masked two-class soft Dice loss (MONAI ``MaskedDiceLoss``: ignored pixels count nowhere;
   background and tumour Dice averaged, see below), poly learning rate
   ``lr (1 - it / max_it) ** 0.9``.  Cases with a real mask use it (no ignored pixel).

The recipe is tumour-only: labels are 0 (not tumour) and 2 (tumour); nothing here knows the
liver.  ``segment`` runs the student; given tumour boxes it returns the teacher's pseudo-mask
inside them instead (the box-to-mask tool); a liver box, if given, limits the student's output.

Deviations from the paper (all config fields):

* No ImageNet weights (nothing can be downloaded; MONAI has no 2D ResNet-50 weights): the
  classifier trains from scratch.  ``classifier.size``: ``paper`` (width 1, FPN 256, heads 512,
  RoI 14, N 256, batch 8), ``cpu`` (width 0.25, FPN 64, heads 128, RoI 8, N 64, batch 4) or
  ``auto`` (paper on a GPU, cpu otherwise); each of those fields can be set on its own.
* The positive / negative loss is class-balanced (mean over the positives + mean over the
  negatives): one to three boxes face N anchors per crop; the paper does not say how it balances.
* Steps, not epochs; Adam (lr 1e-3) by default for both networks, as in ``o2l``, for
  from-scratch training in a few hundred steps (SGD was not tried here).  The paper's settings:
  ``classifier: {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}``,
  ``segmenter: {"optimizer": "sgd", "lr": 5e-3, "momentum": 0.9, "weight_decay": 1e-4}``
  (the poly schedule applies to the segmenter either way).
* The segmentation network is the project's 2D U-Net, not DeepLab-v3 (no torchvision here).
* Segmenter Dice over both classes (``segmenter.dice_background``, default true; false = the
  tumour-only Dice used before): a tumour-only Dice is exactly 1 with zero gradient on a batch
  without tumour (healthy slices, crops beside the tumour), so it cannot say "no tumour here".
  Not yet shown to help on its own: on a 12-case phantom (true masks, 300 steps of 4 crops of
  128 px) it scored 0.14 held-out tumour Dice against 0.34 for the tumour-only Dice.  What did
  help there was training longer (900 steps of 4: 0.64): the old 300 steps left the student
  far from converged, hence 600 steps of 8 crops by default now (as ``o2l``'s student).
* Images are resampled in-plane to ``spacing_mm`` = 0.8 mm (about LiTS's 512 px pixels, so the
  anchor sizes mean what they mean in the paper); crops of ``classifier.crop`` pixels around a box.
* Dense CRF: exact mean-field on the box crop (all pixel pairs, symmetric kernel normalisation as
  in pydensecrf; no CRF package installs here), the crop shrunk to at most ``crf.max_pixels``
  pixels first; boxes with a side under ``crf.min_side`` working pixels are filled (nothing to
  mine).  Kernel settings (``crf.*``) were chosen on a synthetic cohort (seed 11) and ircadb/p01.
* Fill prior (``crf.fill_prior``, 0.6; ``null`` = the paper's raw unary): before the CRF the
  fused map ``m`` becomes ``m ** g``, ``g`` chosen so that its mean over the box is 0.6.  The
  min-max normalised maps of a from-scratch miner cover about a third of a box where tumours
  fill two thirds, and the raw unary then loses to box fill (p01: 0.47-0.59 vs 0.80); with the
  prior, p01 reaches 0.86 (see docs/results/acol_experiments.md).
* ``classifier.mode``: ``box`` (Table 2's baseline: the filled boxes are the pseudo-masks) and
  ``centre`` (a centred Gaussian instead of a mined map: how much the mining adds over the CRF
  and the fill prior alone) train no classifier.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ... import __version__
from ...data.boxes import box_mask, boxes_from_mask
from ...learn.config import merge_config
from ...errors import InputError
from ...learn.modelstore import load_model, save_model
from .fpn_classifier import FPNACoLClassifier, pad_multiple
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.slices import (HU_WINDOW, PreparedCase, Sampler, _axis_range, box_maps, cut_window, image_to_working,
                             lesion_boxes_for_slices, slice_groups, split_boxes, to_input_grid)
from ...learn.training import (SegmentResult, check_cancelled, make_optimizer, most_common_phase, open_run, optimizer_step,
                               scale_steps, set_lr, write_pseudo_store)
from ...data.volume import Volume

NAME = "acol"
RECIPE_VERSION = 1
LABELS = {"background": 0, "tumor": 2}
TUMOUR_VALUE = 2
IGNORE = 255
PHASES = {"train": ("enhanced",), "inference": ("enhanced",)}
# acol / cam: mined maps; box: no classifier, pseudo-mask = the filled boxes (Table 2's baseline);
# centre: no classifier, a centred Gaussian instead of the mined map (a control: the CRF without mining)
MODES = ("acol", "cam", "box", "centre")
MINING_MODES = ("acol", "cam")
SIZES = {
    "paper": {"width": 1.0, "fpn_channels": 256, "head_channels": 512, "roi_size": 14, "negatives": 256, "batch_size": 8},
    "cpu": {"width": 0.25, "fpn_channels": 64, "head_channels": 128, "roi_size": 8, "negatives": 64, "batch_size": 4},
}
ANCHOR_AREAS = (32 ** 2, 64 ** 2, 128 ** 2, 256 ** 2)     # on P2..P5
ANCHOR_RATIOS = (1.0, 0.5, 2.0)                            # h / w: 1:1, 1:2, 2:1
ANCHOR_STRIDES = (4, 8, 16, 32)

DEFAULTS = {
    "steps": None,               # total optimisation steps (classifier + segmenter), scaled; None = the stages' own
    "seed": 0,
    "phase": None,               # image phase; None = each case's reference phase
    "hu_window": list(HU_WINDOW),
    "spacing_mm": 0.8,           # in-plane working spacing (z stays native)
    "context": 1,                # slices on each side: three-slice groups = the 3 input channels
    "checkpoint_every": 50,
    "classifier": {
        "mode": "acol",          # acol | cam (branch A only: the paper's CAM) | box (filled boxes) | centre (control)
        "size": "auto",          # auto | paper | cpu: defaults of the six fields below
        "width": None, "fpn_channels": None, "head_channels": None, "roi_size": None,
        "negatives": None,       # N anchors drawn per crop
        "batch_size": None,      # crops per step
        "negative_fraction": 0.1,  # the nearest 10 % of each level's non-overlapping anchors
        "delta": 0.6,            # ACoL erasing threshold
        "crop": 128,             # crop side (working pixels) around a box
        "flip_prob": 0.5,
        "balance": True,         # mean over positives + mean over negatives
        "steps": 300,
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
    },
    "crf": {
        "iterations": 5,
        "gaussian_weight": 1.0, "gaussian_sxy": 3.0,           # smoothness kernel (working pixels)
        "bilateral_weight": 10.0, "bilateral_sxy": 20.0,       # appearance kernel: pixels ...
        "bilateral_sintensity": 0.02,                          # ... and windowed intensity (0.02 = 9 HU)
        "unary_eps": 1e-5,                                     # probabilities clipped to [eps, 1 - eps]
        "fill_prior": 0.6,       # map ** g with g such that its mean in the box is this; None = the raw map (paper)
        "threshold": 0.5,
        "max_pixels": 2500,
        "min_side": 3,
    },
    "segmenter": {
        "channels": [16, 32, 64, 128],
        "crop": 160, "batch_size": 8,
        "scale_range": [0.8, 1.2], "flip_prob": 0.5, "roi_prob": 0.8,
        "steps": 600,            # as o2l's student: 300 left the student far from converged
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4,
        "poly_power": 0.9,
        "dice_background": True,  # Dice over background + tumour (False: tumour only, blind on tumour-free batches)
        "ce_weight": 0.0,        # extra cross-entropy (ignore index 255); the paper: Dice only
        "infer_batch": 8,
    },
}


# ----------------------------------------------------------------------------- config


def resolve_config(config: dict | None, device="cpu") -> dict:
    """DEFAULTS merged with ``config``, classifier size preset filled in, checked, steps scaled."""
    where = "--config/--set"
    cfg = merge_config(DEFAULTS, config or {}, where=where)
    c = cfg["classifier"]
    if c["mode"] not in MODES:
        raise InputError(f"{where}: classifier.mode {c['mode']!r} is not one of {list(MODES)}")
    size = c["size"]
    if size == "auto":
        size = "paper" if str(device).startswith("cuda") else "cpu"
    if size not in SIZES:
        raise InputError(f"{where}: classifier.size {c['size']!r} is not one of auto, {', '.join(SIZES)}")
    for key, value in SIZES[size].items():
        if c[key] is None:
            c[key] = value
    c["size"] = size
    for key in ("fpn_channels", "head_channels", "roi_size", "negatives", "batch_size", "crop"):
        _positive_int(c[key], f"classifier.{key}")
    for key in ("crop", "batch_size", "infer_batch"):
        _positive_int(cfg["segmenter"][key], f"segmenter.{key}")
    for key in ("checkpoint_every",):
        _positive_int(cfg[key], key)
    for key, value in (("spacing_mm", cfg["spacing_mm"]), ("classifier.width", c["width"]),
                       ("classifier.lr", c["lr"]), ("segmenter.lr", cfg["segmenter"]["lr"])):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{where}: {key} must be a positive number, got {value!r}")
    if not (_is_number(c["negative_fraction"]) and 0 < c["negative_fraction"] <= 1
            and _is_number(c["delta"]) and 0 <= c["delta"] <= 1):
        raise InputError(f"{where}: classifier.negative_fraction must be in (0, 1] and delta in [0, 1]")
    if not isinstance(cfg["segmenter"]["dice_background"], bool):
        raise InputError(f"{where}: segmenter.dice_background must be true or false, "
                         f"got {cfg['segmenter']['dice_background']!r}")
    if not isinstance(cfg["context"], int) or cfg["context"] < 0:
        raise InputError(f"{where}: context must be an integer >= 0, got {cfg['context']!r}")
    if not cfg["hu_window"][0] < cfg["hu_window"][1]:
        raise InputError(f"{where}: hu_window must be [low, high] with low < high, got {cfg['hu_window']!r}")
    for stage in ("classifier", "segmenter"):
        steps = cfg[stage]["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"{where}: {stage}.steps must be an integer >= 0, got {steps!r}")
    if c["mode"] not in MINING_MODES:
        c["steps"] = 0                # nothing to mine: every step goes to the segmenter
    crf = cfg["crf"]
    fill = crf["fill_prior"]
    if fill is not None and (not _is_number(fill) or not 0 < fill < 1):
        raise InputError(f"{where}: crf.fill_prior must be a number in (0, 1) or null, got {fill!r}")
    if isinstance(crf["iterations"], bool) or not isinstance(crf["iterations"], int) or crf["iterations"] < 0:
        raise InputError(f"{where}: crf.iterations must be an integer >= 0, got {crf['iterations']!r}")
    for key in ("gaussian_sxy", "bilateral_sxy", "bilateral_sintensity", "unary_eps", "max_pixels", "threshold"):
        if not _is_number(crf[key]) or not crf[key] > 0:
            raise InputError(f"{where}: crf.{key} must be a positive number, got {crf[key]!r}")
    for key in ("gaussian_weight", "bilateral_weight", "min_side"):
        if not _is_number(crf[key]) or crf[key] < 0:
            raise InputError(f"{where}: crf.{key} must be a number >= 0, got {crf[key]!r}")
    stages = {"classifier": c["steps"], "segmenter": cfg["segmenter"]["steps"]}
    stages = scale_steps({k: v for k, v in stages.items() if v}, cfg["steps"]) if cfg["steps"] else stages
    c["steps"], cfg["segmenter"]["steps"] = stages.get("classifier", 0), stages.get("segmenter", 0)
    return cfg


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"--config/--set: {name} must be a positive integer, got {value!r}")


def classifier_kwargs(cfg) -> dict:
    c = cfg["classifier"]
    return {"in_channels": 2 * cfg["context"] + 1, "width": float(c["width"]), "fpn_channels": c["fpn_channels"],
            "head_channels": c["head_channels"], "roi_size": c["roi_size"], "acol": c["mode"] == "acol",
            "delta": float(c["delta"])}


def segmenter_kwargs(cfg) -> dict:
    return {"in_channels": 2 * cfg["context"] + 1, "out_channels": 2, "channels": list(cfg["segmenter"]["channels"]),
            "attention": "none", "localization": False}


# ----------------------------------------------------------------------------- anchors and boxes


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


# ----------------------------------------------------------------------------- classifier training


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


# ----------------------------------------------------------------------------- pseudo-masks


def dense_crf(prob: torch.Tensor, image: torch.Tensor, iterations: int = 5, gaussian_weight: float = 3.0,
              gaussian_sxy: float = 3.0, bilateral_weight: float = 5.0, bilateral_sxy: float = 20.0,
              bilateral_sintensity: float = 0.05, unary_eps: float = 1e-5, max_pixels: int = 2500,
              **_ignored) -> torch.Tensor:
    """Two-label fully connected CRF (Kraehenbuehl & Koltun 2011), mean-field inference, Potts model.

    ``prob`` (h, w) foreground probability (unaries -log p and -log(1 - p), p clipped to
    [eps, 1 - eps]); ``image`` (C, h, w) appearance features.  Kernels between all pixel pairs
    (no self term): ``exp(-|dp|^2 / 2 sxy_g^2)`` (smoothness) and ``exp(-|dp|^2 / 2 sxy_b^2 -
    |dI|^2 / 2 s_I^2)`` (appearance), each normalised symmetrically (D^-1/2 K D^-1/2, as
    pydensecrf's default) and weighted.  A crop of more than ``max_pixels`` is solved on a shrunk
    grid (distances still in original pixels) and Q resized back.  Returns Q(foreground) (h, w).
    """
    h, w = prob.shape
    scale = min(1.0, math.sqrt(max_pixels / (h * w)))
    gh, gw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    p, img = prob.float(), image.float()
    if (gh, gw) != (h, w):
        p = F.interpolate(p[None, None], size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        img = F.interpolate(img[None], size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)[0]
    p = p.clamp(unary_eps, 1 - unary_eps).flatten()
    unary = -torch.log(torch.stack([1 - p, p], dim=1))              # (n, 2)
    ys = (torch.arange(gh, dtype=torch.float32, device=p.device) + 0.5) * (h / gh)
    xs = (torch.arange(gw, dtype=torch.float32, device=p.device) + 0.5) * (w / gw)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    feat = img.reshape(img.shape[0], -1).t()
    d_pos = torch.cdist(pos, pos).pow_(2)
    kernels = [(gaussian_weight, torch.exp(-d_pos / (2 * gaussian_sxy ** 2))),
               (bilateral_weight, torch.exp(-d_pos / (2 * bilateral_sxy ** 2)
                                            - torch.cdist(feat, feat).pow_(2) / (2 * bilateral_sintensity ** 2)))]
    del d_pos
    kernel = torch.zeros_like(kernels[0][1])
    for weight, k in kernels:
        k.fill_diagonal_(0.0)
        norm = k.sum(dim=1).clamp_min(1e-20).rsqrt()
        kernel += weight * (norm[:, None] * k * norm[None, :])
    del kernels
    q = torch.softmax(-unary, dim=1)
    for _ in range(int(iterations)):
        msg = kernel @ q                                             # (n, 2)
        pairwise = msg.sum(dim=1, keepdim=True) - msg               # Potts: the mass of the other label
        q = torch.softmax(-unary - pairwise, dim=1)
    q = q[:, 1].reshape(gh, gw)
    if (gh, gw) != (h, w):
        q = F.interpolate(q[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return q


@torch.no_grad()
def box_maps_of(net: FPNACoLClassifier, image_w: np.ndarray, rects: dict, crop: int = 128, context: int = 1,
                batch: int = 8, device="cpu") -> list:
    """Fused localization maps of every box: [(slice, rect (4,) int, map (S, S) float32 numpy)].

    Each box is classified in a ``crop`` window centred on it (larger when the box needs it), as
    in training; the map is the ACoL fusion (branch A alone for a CAM network).
    """
    dev = torch.device(device)
    net = net.to(dev).eval()
    by_side = {}
    for z, rs in rects.items():
        for r in rs:
            by_side.setdefault(crop_side(r, crop), []).append((int(z), np.asarray(r).astype(np.int64)))
    out = []
    for side, jobs in sorted(by_side.items()):
        for start in range(0, len(jobs), batch):
            group = jobs[start:start + batch]
            images, rois = [], []
            for b, (z, r) in enumerate(group):
                x0 = int((r[0] + r[2]) // 2 - side // 2)
                y0 = int((r[1] + r[3]) // 2 - side // 2)
                images.append(cut_window(slice_groups(image_w, [z], context)[0], y0, x0, side))
                rois.append([b, r[0] - x0, r[1] - y0, r[2] - x0, r[3] - y0])
            x = torch.from_numpy(np.stack(images)).to(dev)
            fused = net.localization(net(x, torch.tensor(rois, dtype=torch.float32, device=dev))).float().cpu().numpy()
            out += [(z, r, fused[n]) for n, (z, r) in enumerate(group)]
    return out


def mine_pseudo(net, image_w: np.ndarray, rects: dict, cfg: dict, device="cpu", progress=None,
                maps: list | None = None) -> tuple:
    """Working-grid pseudo-mask of one volume: (tumour probability (z, h, w) float32, in-box (z, h, w) bool).

    The probability is the CRF's Q(tumour) inside the boxes (max over overlapping boxes), 0 outside.
    ``maps`` (from ``box_maps_of``) can be given to reuse the classifier pass.
    """
    crf = cfg["crf"]
    prob = np.zeros(image_w.shape, np.float32)
    inbox = np.zeros(image_w.shape, bool)
    if cfg["classifier"]["mode"] == "box":
        for z, rs in rects.items():
            for x0, y0, x1, y1 in np.asarray(rs, np.int64):
                prob[z, y0:y1, x0:x1] = 1.0
                inbox[z, y0:y1, x0:x1] = True
        return prob, inbox
    if maps is None and cfg["classifier"]["mode"] == "centre":
        maps = [(z, np.asarray(r).astype(np.int64), centre_prior()) for z, rs in rects.items() for r in rs]
    elif maps is None:
        maps = box_maps_of(net, image_w, rects, cfg["classifier"]["crop"], cfg["context"],
                           cfg["segmenter"]["infer_batch"], device)
    for n, (z, r, fmap) in enumerate(maps):
        check_cancelled(progress)
        x0, y0, x1, y1 = (int(v) for v in r)
        q = box_probability(fmap, image_w[z, y0:y1, x0:x1], crf)
        prob[z, y0:y1, x0:x1] = np.maximum(prob[z, y0:y1, x0:x1], q)
        inbox[z, y0:y1, x0:x1] = True
    return prob, inbox


def centre_prior(size: int = 7, sigma: float = 0.5) -> np.ndarray:
    """A centred Gaussian in [0, 1] (``sigma`` in half-widths of the box): the ``centre`` control's map."""
    t = (np.arange(size) - (size - 1) / 2) / ((size - 1) / 2)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return ((g - g.min()) / (g.max() - g.min())).astype(np.float32)


def calibrate_fill(m: torch.Tensor, fill: float) -> torch.Tensor:
    """``m ** g`` with ``g`` (bisection on log2 g in [-7, 7]) such that its mean is ``fill``.

    The min-max normalised class map covers the most discriminative part of a tumour (a third
    of the box, where tumours fill two thirds); this calibrates the CRF unary to a filling rate
    while keeping the map's ranking.  An all-zero map becomes a flat ``fill``.
    """
    if float(m.max()) <= 0:
        return torch.full_like(m, fill)
    lo, hi = -7.0, 7.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float((m ** (2.0 ** mid)).mean()) > fill:
            lo = mid
        else:
            hi = mid
    return m ** (2.0 ** ((lo + hi) / 2))


def box_probability(fused_map: np.ndarray, crop_image: np.ndarray, crf: dict) -> np.ndarray:
    """The fused map resized to the box (bilinear), calibrated to ``fill_prior`` -> dense CRF on the box
    crop -> Q(tumour) (h, w)."""
    h, w = crop_image.shape
    if min(h, w) < int(crf["min_side"]):
        return np.ones((h, w), np.float32)
    m = torch.from_numpy(np.asarray(fused_map, np.float32))[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    if crf.get("fill_prior") is not None:
        m = calibrate_fill(m, float(crf["fill_prior"]))
    if int(crf["iterations"]) == 0:
        return m.numpy()
    return dense_crf(m, torch.from_numpy(np.asarray(crop_image, np.float32))[None], **crf).numpy()


def pseudo_labels(prob: np.ndarray, inbox: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 (z, h, w): 2 tumour, 255 in-box background (ignored by the loss), 0 outside every box."""
    out = np.zeros(prob.shape, np.uint8)
    out[inbox] = IGNORE
    out[inbox & (prob > threshold)] = TUMOUR_VALUE
    return out


# ----------------------------------------------------------------------------- segmenter training


def encode_target(labels: np.ndarray) -> np.ndarray:
    """(z, h, w) 0 / 2 / 255 -> (z, 3, h, w) one-hot over [background, ignored, tumour] for ``slices.Sampler``.

    The sampler's middle class (its "liver") carries the ignore region, so its scaling / flips /
    padding (padding = background) apply to it like to the rest.
    """
    out = np.zeros((labels.shape[0], 3) + labels.shape[1:], np.float32)
    out[:, 0] = labels == 0
    out[:, 1] = labels == IGNORE
    out[:, 2] = labels == TUMOUR_VALUE
    return out


def decode_target(target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sampler target -> (B, H, W) int64: 0 background, 1 tumour, 255 ignored."""
    cls = target.argmax(dim=1)
    out = torch.zeros_like(cls)
    out[cls == 2] = 1
    out[cls == 1] = IGNORE
    return out


def masked_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ce_weight: float = 0.0,
                     include_background: bool = True) -> torch.Tensor:
    """Soft Dice (over the batch) of a 2-class net, pixels labelled 255 excluded (+ optional CE).

    ``include_background``: mean of the background and tumour Dice.  The tumour Dice alone is a
    constant 1 with no gradient on a batch without tumour, so it cannot teach "no tumour here".
    """
    from monai.losses import MaskedDiceLoss

    valid = (labels != IGNORE)
    target = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), 2).permute(0, 3, 1, 2).float()
    loss = MaskedDiceLoss(include_background=bool(include_background), softmax=True, batch=True)(
        logits.float(), target, mask=valid[:, None].float())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    return loss


def poly_lr(step: int, total: int, lr: float, power: float = 0.9) -> float:
    """``lr (1 - step / total) ** power`` (DeepLab's poly schedule)."""
    return float(lr) * (1.0 - min(step, total) / max(total, 1)) ** float(power)


# ----------------------------------------------------------------------------- data


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def _working_image(image: Volume, cfg) -> np.ndarray:
    return image_to_working(image.array, image.spacing[:2], cfg["spacing_mm"], cfg["hu_window"])


def _select_cases(dataset):
    """(training cases with boxes or a mask, val cases with a mask)."""
    train = [c for c in dataset.cases.values() if c.split == "train" and (c.mask is not None or "boxes" in c.label_kinds)]
    val = [c for c in dataset.cases.values() if c.split == "val" and c.mask is not None]
    return train, val


def case_tumor_boxes(case, dataset=None, labels=None) -> list:
    """Tumour boxes of a case: the store's (2D per slice preferred), or per-slice boxes of its mask."""
    if case.mask is not None and not [b for b in case.boxes if b.label != "liver"]:
        labels = dataset.read_mask(case.id).array if labels is None else labels
        return boxes_from_mask(labels, TUMOUR_VALUE, per_slice=True)
    return lesion_boxes_for_slices(case.boxes)


# ----------------------------------------------------------------------------- train


def _train_classifier(net, opt, cases, cfg, start, ckpt, state, rng, progress, device):
    c = cfg["classifier"]
    total = c["steps"]
    dev = torch.device(device)
    cache = {}
    curve = state["curves"].setdefault("classifier", [])
    net.train()
    for step in range(start, total):
        check_cancelled(progress)
        batch = classifier_batch(cases, c["crop"], c["batch_size"], rng, cfg["context"], c["negatives"],
                                 c["negative_fraction"], c["flip_prob"], cache)
        labels = batch["labels"].to(dev)
        out = net(batch["image"].to(dev), batch["rois"].to(dev), labels)
        loss = classifier_loss(out, labels, c["balance"])
        value = optimizer_step(opt, loss, "classifier", step)
        with torch.no_grad():
            acc = float((out["logits_a"].argmax(1) == labels).float().mean())
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update("classifier", step + 1, total, loss=round(value, 4), acc=round(acc, 3))
        if ckpt.due(step + 1) and step + 1 < total:
            state["save"]("classifier", step + 1, "classifier")


def _train_segmenter(net, opt, sampler, cfg, start, ckpt, state, progress, device):
    s = cfg["segmenter"]
    total = s["steps"]
    dev = torch.device(device)
    curve = state["curves"].setdefault("segmenter", [])
    net.train()
    for step in range(start, total):
        check_cancelled(progress)
        set_lr(opt, poly_lr(step, total, s["lr"], s["poly_power"]))
        batch = sampler.sample()
        labels = decode_target(batch["target"]).to(dev)
        loss = masked_dice_loss(net(batch["image"].to(dev)), labels, s["ce_weight"], s["dice_background"])
        value = optimizer_step(opt, loss, "segmenter", step)
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update("segmenter", step + 1, total, loss=round(value, 4), lr=round(opt.param_groups[0]["lr"], 7))
        if ckpt.due(step + 1) and step + 1 < total:
            state["save"]("segmenter", step + 1, "segmenter")


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Region-mining classifier -> CRF pseudo-masks -> segmentation network; writes the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config, device)
    ckpt, saved, init = open_run(out, cfg, resume, init)
    train_cases, val = _select_cases(dataset)
    if not train_cases:
        raise InputError(f"{dataset.root}: no training case (boxes or a mask, split train)")

    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = {"classifier": classifier_kwargs(cfg), "segmenter": segmenter_kwargs(cfg)}
    nets = {"classifier": FPNACoLClassifier(**kwargs["classifier"]), "segmenter": BoxAttentionUNet2D(**kwargs["segmenter"])}
    if init is not None:
        init_model = load_model(init, device="cpu")
        if init_model.recipe != NAME:
            raise InputError(f"{init}: --init model is of recipe {init_model.recipe!r}, not {NAME!r}")
        for role, net in nets.items():
            spec = init_model.meta["networks"].get(role)
            if spec is not None:
                if spec["kwargs"] != kwargs[role]:
                    raise InputError(f"{init}: network {role!r} was built with {spec['kwargs']}, this run asks for "
                                     f"{kwargs[role]}; set the same sizes in the config")
                net.load_state_dict(init_model.networks[role].state_dict())
    dev = torch.device(device)
    for net in nets.values():
        net.to(dev)
    opts = {"classifier": make_optimizer(nets["classifier"].parameters(), cfg["classifier"], "classifier.optimizer"),
            "segmenter": make_optimizer(nets["segmenter"].parameters(), cfg["segmenter"], "segmenter.optimizer")}
    state = {"curves": {}, "seconds": {}}
    data = {"dataset": str(dataset.root), "train": [c.id for c in train_cases], "val": [c.id for c in val]}

    def save_ckpt(stage, step, opt_name):
        ckpt.save(stage, step, nets, {opt_name: opts[opt_name]}, rng, extra={
            "config": cfg, "init": None if init is None else str(init), "curves": state["curves"],
            "seconds": state["seconds"], "data": data})

    state["save"] = save_ckpt
    stage0, step0 = "classifier", 0
    if saved is not None:
        stage0, step0 = ckpt.resume(saved, nets, {saved.stage: opts[saved.stage]}, rng, state, progress)

    # -- data on the working grid
    t0 = time.monotonic()
    prepared = []           # (case, image_w, rects, real labels (z, h, w) or None, box maps for the sampler)
    for n, case in enumerate(train_cases):
        check_cancelled(progress)
        image = dataset.read_image(case.id, _phase_of(case, cfg))
        work = _working_image(image, cfg)
        mask = dataset.read_mask(case.id).array if case.mask is not None else None
        tumors = case_tumor_boxes(case, dataset, mask)
        rects = slice_rects(tumors, image.array.shape, work.shape[1:])
        real = None
        if mask is not None:
            t = torch.from_numpy((mask == TUMOUR_VALUE).astype(np.float32))[:, None]
            t = F.interpolate(t, size=work.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()
            real = np.where(t > 0.5, TUMOUR_VALUE, 0).astype(np.uint8)
        liver = case.liver_box if case.liver_box is not None else None
        maps = box_maps(image.array.shape, work.shape[1:], liver, tumors)
        prepared.append((case, work, rects, real, maps))
        if progress is not None:
            progress.update("prepare", n + 1, len(train_cases))
    state["seconds"].setdefault("prepare", round(time.monotonic() - t0, 2))
    box_cases = [BoxCase(case.id, work, rects) for case, work, rects, _, _ in prepared if rects]
    needs_mining = any(real is None and rects for _, _, rects, real, _ in prepared)
    if needs_mining and not box_cases:
        raise InputError(f"{dataset.root}: no tumour box in the training cases: nothing to mine")

    # -- classifier
    if stage0 == "classifier":
        t0 = time.monotonic()
        if box_cases and cfg["classifier"]["steps"]:
            _train_classifier(nets["classifier"], opts["classifier"], box_cases, cfg, step0, ckpt, state, rng,
                              progress, device)
        state["seconds"]["classifier"] = round(state["seconds"].get("classifier", 0) + time.monotonic() - t0, 2)
        stage0, step0 = "segmenter", 0
        save_ckpt("segmenter", 0, "segmenter")

    # -- pseudo-masks (deterministic given the classifier: recomputed on resume)
    t0 = time.monotonic()
    seg_cases = []
    n_mined, to_mine = 0, sum(1 for p in prepared if p[3] is None and p[2])
    for case, work, rects, real, maps in prepared:
        if real is not None:
            labels = real
        elif rects:
            prob, inbox = mine_pseudo(nets["classifier"], work, rects, cfg, device, progress)
            labels = pseudo_labels(prob, inbox, cfg["crf"]["threshold"])
            n_mined += 1
            if progress is not None:
                progress.update("pseudo-masks", n_mined, to_mine)
        else:
            labels = np.zeros(work.shape, np.uint8)   # boxes but no tumour box: a tumour-free case
        seg_cases.append(PreparedCase(case.id, work, encode_target(labels), maps, kind="weak" if real is None else "strong"))
    state["seconds"]["pseudo"] = round(time.monotonic() - t0, 2)

    # -- segmenter
    s = cfg["segmenter"]
    crop = int(math.ceil(min(s["crop"], max(max(c.image.shape[1:]) for c in seg_cases)) / 16) * 16)
    sampler = Sampler(seg_cases, crop, s["batch_size"], rng, cfg["context"], 1, s["scale_range"], s["flip_prob"],
                      s["roi_prob"])
    t0 = time.monotonic()
    _train_segmenter(nets["segmenter"], opts["segmenter"], sampler, cfg, step0, ckpt, state, progress, device)
    state["seconds"]["segmenter"] = round(state["seconds"].get("segmenter", 0) + time.monotonic() - t0, 2)

    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [cfg["phase"] or most_common_phase(train_cases, PHASES["inference"][0])],
            "inference_phases": [cfg["phase"] or most_common_phase(train_cases, PHASES["inference"][0])],
            "hu_window": list(cfg["hu_window"]),
            "spacing_mm": [float(cfg["spacing_mm"])] * 2,
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
            "teacher_boxes": "tumour boxes (2D per slice preferred); output tumour only",
        },
        "training": {"config": copy.deepcopy(cfg), "data": data, "crop": crop, "device": str(device),
                     "init": None if init is None else str(init), "pretrained": None,
                     "steps": {"classifier": cfg["classifier"]["steps"], "segmenter": s["steps"]},
                     "seconds": state["seconds"], "curves": state["curves"]},
        "metrics": {},
    }
    networks = {role: (type(net).__name__, kwargs[role], net.eval()) for role, net in nets.items()
                if role != "classifier" or cfg["classifier"]["mode"] in MINING_MODES}
    if val:
        from ...learn.modelstore import LoadedModel

        meta["metrics"] = {"val": _validate(LoadedModel(out, meta, {r: n for r, n in nets.items()}), dataset, val, cfg,
                                            device)}
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def dice(pred, truth) -> float | None:
    """Dice of two boolean arrays (None when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(pred.sum()) + int(truth.sum())
    return None if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def _validate(model, dataset, val, cfg, device) -> dict:
    per_case = {}
    for case in val:
        image = dataset.read_image(case.id, _phase_of(case, cfg))
        result = segment(model, {"image": image}, device=device)
        truth = dataset.read_mask(case.id).array == TUMOUR_VALUE
        per_case[case.id] = {"tumor": {"dice": dice(result.labels.array == TUMOUR_VALUE, truth)}}
    values = [v["tumor"]["dice"] for v in per_case.values() if v["tumor"]["dice"] is not None]
    return {"cases": per_case, "summary": {"tumor": {"dice_per_case": float(np.mean(values)) if values else None}}}


# ----------------------------------------------------------------------------- inference


def _model_config(model) -> dict:
    cfg = model.meta.get("training", {}).get("config")
    if not isinstance(cfg, dict):
        raise InputError(f"{model.path}: model.json has no training.config (not an acol model?)")
    return cfg


def has_teacher(model) -> bool:
    """A classifier to mine boxes with, or the box-fill mode (which needs none)."""
    return "classifier" in model.networks or _model_config(model)["classifier"]["mode"] not in MINING_MODES


def _pick_image(images: dict, model) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    phases = model.meta.get("input", {}).get("inference_phases") or []
    if phases and phases[0] in images:
        return images[phases[0]]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model needs the phase {phases[0] if phases else None!r}; got {sorted(map(str, images))}")


def pseudo_mask(model, image: Volume, tumor_boxes, device="cpu", progress=None) -> tuple:
    """The teacher's pseudo-mask on the input grid: (tumour bool (z, y, x), Q(tumour) float32 (z, y, x)).

    Tumour = CRF probability above the threshold, and inside a box on the input grid.
    """
    cfg = _model_config(model)
    if not has_teacher(model):
        raise InputError(f"{model.path}: this model has no region-mining classifier")
    for n, box in enumerate(tumor_boxes):
        box.validate(image, where=f"boxes[{n}]")
    work = _working_image(image, cfg)
    rects = slice_rects(tumor_boxes, image.array.shape, work.shape[1:])
    prob_w, _ = mine_pseudo(model.networks.get("classifier"), work, rects, cfg, device, progress)
    prob = _to_input(prob_w, image.array.shape)
    inside = box_mask(image.array.shape, tumor_boxes)
    prob[~inside] = 0.0
    return prob > cfg["crf"]["threshold"], prob


def _to_input(prob_w: np.ndarray, shape_zyx) -> np.ndarray:
    out = np.empty(shape_zyx, np.float32)
    for z0 in range(0, shape_zyx[0], 8):
        p = torch.from_numpy(np.ascontiguousarray(prob_w[z0:z0 + 8]))[:, None]
        out[z0:z0 + 8] = to_input_grid(p, shape_zyx[1:])[:, 0].numpy()
    return out


@torch.inference_mode()
def student_probability(net, image_w: np.ndarray, context=1, batch=8, device="cpu", progress=None) -> np.ndarray:
    """Tumour softmax (z, h, w) of every three-slice group of a working-grid volume."""
    dev = torch.device(device)
    net = net.to(dev).eval()
    nz = image_w.shape[0]
    out = np.empty(image_w.shape, np.float32)
    for z0 in range(0, nz, batch):
        check_cancelled(progress)
        centres = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(slice_groups(image_w, centres, context)).to(dev)
        out[centres] = torch.softmax(net(x).float(), dim=1)[:, 1].cpu().numpy()
        if progress is not None:
            progress.update("segment", int(centres[-1]) + 1, nz)
    return out


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    """Tumour segmentation of one volume: the student, or the teacher's pseudo-mask when tumour boxes are given.

    ``boxes``: store ``Box`` list.  Tumour boxes (and a classifier in the model) -> pseudo-mask inside
    them; otherwise the student segments the whole volume, limited to the liver box if one is given.
    """
    cfg = _model_config(model)
    image = _pick_image(images, model)
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    liver, tumors = split_boxes(list(boxes or []))
    tumors = lesion_boxes_for_slices(tumors)
    if tumors and has_teacher(model):
        fg, prob = pseudo_mask(model, image, tumors, device, progress)
    else:
        if "segmenter" not in model.networks:
            raise InputError(f"{model.path}: this model has no segmentation network")
        work = _working_image(image, cfg)
        prob = _to_input(student_probability(model.networks["segmenter"], work, cfg["context"],
                                             cfg["segmenter"]["infer_batch"], device, progress), image.array.shape)
        if liver is not None:
            liver.validate(image, where="liver box")
            prob[~box_mask(image.array.shape, [liver])] = 0.0
        fg = prob > 0.5
    labels = np.where(fg, TUMOUR_VALUE, 0).astype(np.uint8)
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    entropy = (-(p * np.log(p) + (1 - p) * np.log(1 - p))).astype(np.float32)
    return SegmentResult(image.with_array(labels), image.with_array(prob.astype(np.float32)), image.with_array(entropy))


# ----------------------------------------------------------------------------- pseudo


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Copy ``dataset`` to ``out_dir``; each case with tumour boxes and no mask gets the pseudo-mask as its mask.

    The mask holds 0 and 2 only (this teacher knows nothing of the liver); in-box background is
    recoverable as "inside a tumour box and 0".  ``pseudo/<id>_tumor_prob.nii.gz``: Q(tumour).
    """
    from ...data.imageio import write_image

    if not has_teacher(model):
        raise InputError(f"{model.path}: this model has no region-mining classifier, so it cannot make pseudo-masks")
    weak = [c for c in dataset.cases.values() if c.mask is None and lesion_boxes_for_slices(c.boxes)]
    if not weak:
        raise InputError(f"{dataset.root}: no case with tumour boxes and no mask to pseudo-label")
    cfg = _model_config(model)

    def relabel(case, images):
        image = images[_phase_of(case, cfg)]
        fg, prob = pseudo_mask(model, image, lesion_boxes_for_slices(case.boxes), device)
        write_image(image.with_array(prob), Path(out_dir) / "pseudo" / f"{case.id}_tumor_prob.nii.gz")
        return image.with_array(np.where(fg, TUMOUR_VALUE, 0).astype(np.uint8))

    return write_pseudo_store(dataset, out_dir, {c.id for c in weak}, relabel, suffix="acol-pseudo",
                              progress=progress)
