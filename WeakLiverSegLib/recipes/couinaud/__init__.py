"""Recipe ``couinaud``: tumour segmentation from Couinaud-segment and volume-level labels only.

Lyu, Ma, Yuen, "Anatomical Prior-Inspired Label Refinement for Weakly Supervised Liver Tumor
Segmentation with Volume-Level Labels"
(../shared/papers/couinaud_volume_level_label_refinement.txt), built on CouinaudNet (Lyu et al.,
TMI 2022).

1. Liver and Couinaud map of every training case: the liver from the store mask, else from a
   liver model (``liver_model=PATH``), else from a small liver net trained here on the store's
   masked cases; the eight segments from ``couinaud_map.construct_couinaud`` (hepatic-vein and
   portal planes found in the enhanced CT).
2. Image-level labels: the volume label propagates to every slice (a Couinaud case "tumour in
   segments S", a volume-level case "tumour somewhere in the liver").  ILR (Eq. 2): a slice whose
   Couinaud map holds none of the labelled segments becomes healthy.
3. CouinaudNet: a 2D U-Net with input (three slices, region mask) -> tumour mask, trained only on
   healthy slices (healthy volumes, plus the slices ILR made healthy) in which a synthetic
   hypodense tumour is injected into a randomly chosen Couinaud segment (or, for the volume-level
   mode, anywhere in the liver).
4. Pixel pseudo-labels of the pathological slices: CouinaudNet's tumour probability ``o_k`` inside
   the labelled region; PLR (Eq. 3-6): ``m_k = o_k >= tau``, continuity index
   ``CI_k = c * max(Dice(m_k, m_k-1), Dice(m_k, m_k+1))``, refined ``o_k * CI_k >= tau``
   (c = 5, tau = 0.5).  Healthy slices get black masks.
5. A fully supervised segmenter (the project's 2.5D U-Net, background / liver / tumour) on the
   liver masks + refined tumour pseudo-labels with cross-entropy (Eq. 1) + the tumour's Dice
   (nnU-Net trains with CE + Dice).

Cases with a pixel mask (the strong set) give their true labels to the segmenter and their
tumour-free slices to CouinaudNet when ``use_masks`` is true; otherwise only their liver is used
and they count as Couinaud / volume cases.

Liver supervision (the paper assumes a liver is given): store masks where present; for the other
cases ``liver_model`` (any model folder of the project whose segment gives labels >= 1 for the
liver, e.g. an ``sdnet`` or ``o2l`` model), else ``liver_net`` trained on the store's masked
cases (train / val); with neither, training stops with an error naming the cases.

Deviations (CPU budget; all in the config): steps instead of epochs, Adam at 3e-3, a 2D U-Net
instead of nnU-Net, Dice on the tumour class only (``segmenter.dice_classes``), in-plane
resampling to ``spacing_mm``.  Synthetic tumours follow our own simple model
(elliptic, lobulated, soft edge, hypodense 15-90 HU with texture, optional necrosis / rim) since
the paper does not give CouinaudNet's generator.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ... import __version__
from ...learn.config import merge_config
from ...anatomy.couinaud_map import DEFAULTS as CONSTRUCTOR_DEFAULTS
from ...anatomy.couinaud_map import construct_couinaud
from ...errors import InputError
from ...learn.modelstore import LoadedModel, load_model, register_network, save_model
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.postprocess import fill_holes, largest_component, postprocess
from ...learn.slices import (HU_WINDOW, N_CLASSES, PreparedCase, Sampler, cut_window, labels_to_working, resize_slices,
                             slice_groups, to_input_grid, window, working_size)
from ...learn.training import (SegmentResult, check_cancelled, lr_at, make_optimizer, most_common_phase, open_run,
                               optimizer_step, scale_steps, set_lr, soft_cross_entropy,
                               write_pseudo_store)
from ...data.volume import Volume

NAME = "couinaud"
RECIPE_VERSION = 1
LABELS = {"background": 0, "liver": 1, "tumor": 2}
PHASES = {"train": ("enhanced",), "inference": ("enhanced",)}
STAGES = ("liver_net", "couinaudnet", "segmenter")
MIN_LIVER_PIXELS = 64      # the Couinaud constructor needs a liver (working-grid voxels)

# Adam at 3e-3 with Dice on the tumour class only: at 1e-3, or with the Dice averaged over liver
# and tumour, the small tumour class is not learned within a CPU budget of a few hundred steps.
_STAGE_DEFAULTS = {"optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "weight_decay": 0.0,
                   "lr_decay_start": 0.8, "lr_decay": 0.99}

DEFAULTS = {
    "steps": None,              # total optimisation steps over the stages, scaled; None = the stages' own
    "seed": 0,
    "phase": None,              # image phase (enhanced CT); None = each case's reference phase
    "hu_window": list(HU_WINDOW),
    "spacing_mm": 1.5,          # in-plane working spacing (slices stay native)
    "context": 1,               # three-slice groups
    "channels": [8, 16, 32, 64],
    "infer_batch": 8,
    "checkpoint_every": 50,
    "use_masks": True,          # masked cases: true pixel labels for the segmenter
    "liver_model": None,        # model folder giving the liver of cases without a store mask
    "constructor": dict(CONSTRUCTOR_DEFAULTS),
    "refine": {
        "ilr": True,            # image-level label refinement (Eq. 2)
        "plr": True,            # pixel-level label refinement (Eq. 3-6)
        "c": 5.0,
        "tau": 0.5,
        "ilr_min_pixels": 1,    # a segment "is on a slice" from this many working pixels (Eq. 2: 1)
        "clip_to_region": True, # pseudo-labels only inside the labelled segments (False: the paper's vanilla)
    },
    "injection": {
        "radius_mm": [3.0, 15.0],
        "contrast_hu": [-90.0, -15.0],
        "whole_liver_prob": 0.25,   # also learn the volume-level mode (region = whole liver)
        "min_segment_px": 20,
    },
    "liver_net": dict(_STAGE_DEFAULTS, steps=300, crop=96, batch_size=8),
    "couinaudnet": dict(_STAGE_DEFAULTS, steps=800, crop=64, batch_size=8),
    "segmenter": dict(_STAGE_DEFAULTS, steps=800, crop=96, batch_size=8, dice_weight=1.0, dice_classes=[2]),
}


# ----------------------------------------------------------------------------- networks


@register_network("CouinaudNet")
class CouinaudNet(nn.Module):
    """(B, 2c+1, H, W) slices + (B, 1, H, W) region mask -> (B, 2, H, W) logits (background, tumour)."""

    def __init__(self, context: int = 1, channels=(8, 16, 32, 64)):
        super().__init__()
        self.unet = BoxAttentionUNet2D(in_channels=2 * int(context) + 2, out_channels=2, channels=list(channels))

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([image, region.to(image.dtype)], dim=1))


# ----------------------------------------------------------------------------- label refinement


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


# ----------------------------------------------------------------------------- tumour injection


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


# ----------------------------------------------------------------------------- prepared cases


@dataclass
class WeakCase:
    """One training case on the working grid."""
    case_id: str
    kind: str                        # couinaud | volume | mask
    image: np.ndarray                # (z, h, w) windowed to [0, 1]
    liver: np.ndarray                # (z, h, w) bool
    couinaud: np.ndarray             # (z, h, w) uint8 0..8
    pathological: bool
    segments: list | None            # labelled segments; None = volume-level (anywhere in the liver)
    slice_mm: float
    tumour: np.ndarray | None = None    # (z, h, w) bool pixel labels (mask cases)
    liver_source: str = "mask"
    landmarks: dict = field(default_factory=dict)

    def image_labels(self) -> np.ndarray:
        """Slice labels before refinement (mask cases: the truth of their own mask)."""
        if self.tumour is not None:
            return self.tumour.any(axis=(1, 2)).astype(np.int64)
        return volume_slice_labels(self.image.shape[0], self.pathological)

    def refined_labels(self, use_ilr: bool, min_pixels: int = 1) -> np.ndarray:
        labels = self.image_labels()
        if use_ilr and self.tumour is None:
            labels = ilr(labels, self.couinaud, self.segments, min_pixels)
        return labels

    def region(self, z) -> np.ndarray:
        """Where slice ``z``'s tumour is said to be: the labelled segments, else the liver."""
        if self.segments is None:
            return self.couinaud[z] > 0
        return np.isin(self.couinaud[z], self.segments)


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def working_volume(image: Volume, spacing_mm: float) -> Volume:
    """HU volume resampled in-plane to the working grid, with its world geometry (pixel edges kept)."""
    size = working_size(image.array.shape[1:], image.spacing[:2], spacing_mm)
    arr = resize_slices(torch.from_numpy(image.array.astype(np.float32))[:, None], size)[:, 0].numpy()
    ny, nx = image.array.shape[1:]
    fx, fy = nx / size[1], ny / size[0]
    sx, sy, sz = image.spacing
    shift = np.array([(fx - 1) / 2 * sx, (fy - 1) / 2 * sy, 0.0])     # centre of the first working pixel
    origin = np.asarray(image.origin) + image.direction @ shift
    return Volume(arr, (sx * fx, sy * fy, sz), tuple(origin), image.direction)


def labels_on_working(labels_zyx, size) -> np.ndarray:
    """0/1/2 label map -> working-grid labels (argmax of the resampled one-hot maps)."""
    return labels_to_working(labels_zyx, size).argmax(axis=1).astype(np.uint8)


def select_cases(dataset, cfg) -> list:
    """Training cases (split train) with a mask, Couinaud segments or a volume label."""
    chosen = []
    for case in dataset.cases.values():
        # a masked case with use_masks off and no weak label has an unknown tumour status:
        # it can only teach the liver (liver net), not the tumour
        if case.split == "train" and case_kind(case, cfg) != "liver_only":
            chosen.append(case)
    if not chosen:
        raise InputError(f"{dataset.root}: no training case (split train) with a mask, Couinaud segments or a "
                         f"volume label: recipe {NAME!r} needs them")
    return chosen


def case_kind(case, cfg) -> str:
    if case.mask is not None and cfg["use_masks"]:
        return "mask"
    if case.couinaud is not None:
        return "couinaud"
    if case.volume_label is not None:
        return "volume"
    return "liver_only"      # a mask case with use_masks off and no weak label, or an unlabelled case


def load_case(dataset, case, cfg, keep_original: bool = False) -> dict:
    """Working-grid images of one case: {"hu": Volume, "image": windowed, "mask": labels or None,
    "original": the input-grid image when ``keep_original``}."""
    image = dataset.read_image(case.id, _phase_of(case, cfg))
    hu = working_volume(image, cfg["spacing_mm"])
    mask = dataset.read_mask(case.id)
    return {"hu": hu, "image": window(hu.array, cfg["hu_window"]),
            "mask": None if mask is None else labels_on_working(mask.array, hu.array.shape[1:]),
            "original": image if keep_original else None}


def make_weak_case(case, loaded: dict, liver: np.ndarray, liver_source: str, cfg) -> WeakCase:
    """Couinaud map + labels of one case whose working-grid liver is known."""
    kind = case_kind(case, cfg)
    cm, lm = construct_couinaud(loaded["hu"], liver, cfg["constructor"], where=case.id, return_landmarks=True)
    mask = loaded["mask"]
    pathological = bool(case.couinaud) if case.couinaud is not None else case.volume_label == "tumour"
    segments = list(case.couinaud) if case.couinaud else None
    tumour = None
    if kind == "mask":
        tumour = mask == 2
        if tumour.any() or not pathological:
            pathological = bool(tumour.any())
        else:
            # a liver-only mask of a case labelled as tumorous (e.g. the liver drawn, segment VI ticked):
            # the mask gives the liver, the weak labels the tumour -- never train it as healthy
            kind, tumour = ("couinaud" if segments else "volume"), None
    return WeakCase(case.id, kind, loaded["image"], liver, cm.array, pathological, segments,
                    float(loaded["hu"].spacing[2]), tumour, liver_source, lm.to_json())


# ----------------------------------------------------------------------------- generic training


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes) -> torch.Tensor:
    """Mean over ``classes`` of 1 - batch Dice between softmax and (soft) one-hot targets."""
    p = torch.softmax(logits.float(), dim=1)
    losses = []
    for c in classes:
        inter = (p[:, c] * target[:, c]).sum()
        losses.append(1.0 - (2 * inter + 1.0) / (p[:, c].sum() + target[:, c].sum() + 1.0))
    return torch.stack(losses).mean()


def run_stage(stage, net, opt, next_batch, loss_fn, scfg, total, start=0, save=None, every=50, progress=None,
              curves=None):
    """Optimisation steps ``start..total`` of one stage; ``save(stage, step)`` checkpoints on the way."""
    net.train()
    curve = [] if curves is None else curves.setdefault(stage, [])
    for step in range(start, total):
        check_cancelled(progress)
        set_lr(opt, lr_at(step, total, scfg))
        loss = loss_fn(net, next_batch())
        value = optimizer_step(opt, loss, stage, step)
        if (step + 1) % 10 == 0 or step + 1 == total:
            curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update(stage, step + 1, total, loss=round(value, 4))
        if save is not None and (step + 1) % every == 0 and step + 1 < total:
            save(stage, step + 1)
    net.eval()
    if save is not None and total > start:
        save(stage, total)


def _crop_size(cases, want: int) -> int:
    biggest = max(max(c.image.shape[1:]) for c in cases)
    return int(math.ceil(min(want, biggest) / 16) * 16)


def _seg_batch_fn(sampler, device):
    dev = _device(device)

    def next_batch():
        b = sampler.sample()
        return b["image"].to(dev), b["target"].to(dev)
    return next_batch


def _seg_loss(dice_weight: float, classes):
    def loss_fn(net, batch):
        x, target = batch
        logits = net(x)
        loss = soft_cross_entropy(logits, target)            # Eq. 1
        if dice_weight:
            loss = loss + dice_weight * soft_dice_loss(logits, target, classes)
        return loss
    return loss_fn


def prepared_case(case_id, image, liver, tumour) -> PreparedCase:
    """A PreparedCase with one-hot targets; its "boxes" are the liver / tumour masks so the sampler's
    crops centre on the liver (the segmenter has no attention: they are never a network input)."""
    tumour = tumour & liver
    target = np.stack([~liver, liver & ~tumour, tumour], axis=1).astype(np.float16)
    maps = np.stack([liver, tumour], axis=1).astype(np.uint8)
    return PreparedCase(case_id, image, target, maps, kind="weak")


# ----------------------------------------------------------------------------- liver


def train_liver_net(net, opt, loaded_masked: list, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    """Liver-only net (background / liver; the tumour counts as liver) on the masked cases."""
    cases = [prepared_case(cid, d["image"], d["mask"] >= 1, np.zeros_like(d["mask"], bool)) for cid, d in loaded_masked]
    scfg = cfg["liver_net"]
    sampler = Sampler(cases, _crop_size(cases, scfg["crop"]), scfg["batch_size"], rng, cfg["context"])
    run_stage("liver_net", net, opt, _seg_batch_fn(sampler, device), _seg_loss(scfg.get("dice_weight", 1.0), (1,)),
              scfg, scfg["steps"], start, save, cfg["checkpoint_every"], progress, curves)


@torch.inference_mode()
def predict_softmax(net, image_w: np.ndarray, context: int = 1, batch: int = 8, device="cpu",
                    progress=None, stage: str = "segment") -> np.ndarray:
    """Softmax (z, C, h, w) of a slice network over every three-slice group of a working volume."""
    dev = _device(device)
    net = net.to(dev).eval()
    nz = image_w.shape[0]
    out = None
    for z0 in range(0, nz, batch):
        check_cancelled(progress)
        centres = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(np.ascontiguousarray(slice_groups(image_w, centres, context))).to(dev)
        p = torch.softmax(net(x).float(), dim=1).cpu().numpy()
        if out is None:
            out = np.empty((nz,) + p.shape[1:], np.float32)
        out[centres] = p
        if progress is not None:
            progress.update(stage, int(centres[-1]) + 1, nz)
    return out


def liver_from_softmax(probs: np.ndarray) -> np.ndarray:
    """Largest liver component, holes filled, from a (z, C, h, w) softmax (classes >= 1 are liver)."""
    return fill_holes(largest_component(probs[:, 1:].sum(axis=1) >= 0.5))


def liver_from_model(model: LoadedModel, image: Volume, size, device) -> np.ndarray:
    """Working-grid liver of one image from another project model (labels >= 1)."""
    from .. import get

    result = get(model.recipe).segment(model, {"image": image}, device=device)
    return labels_on_working((np.asarray(result.labels.array) >= 1).astype(np.uint8), size) >= 1


# ----------------------------------------------------------------------------- CouinaudNet


def healthy_pool(cases: list, labels: dict, min_px: int) -> list:
    """(case index, slice) of every slice labelled healthy that holds at least ``min_px`` liver pixels."""
    pool = []
    for i, case in enumerate(cases):
        lab = labels[case.case_id]
        area = case.liver.sum(axis=(1, 2))
        for z in np.flatnonzero((lab == 0) & (area >= min_px)):
            pool.append((i, int(z)))
    return pool


class InjectionSampler:
    """CouinaudNet batches: a healthy slice, a random present segment (or the whole liver), a synthetic
    tumour injected there (consistent over the three slices); input (slices, region), target mask."""

    def __init__(self, cases, pool, crop, batch_size, rng, cfg):
        if not pool:
            raise InputError("no healthy liver slice to train CouinaudNet on: add healthy cases "
                             "(couinaud [] or volume_label healthy) or enable ILR")
        self.cases, self.pool, self.crop, self.batch_size, self.rng = cases, pool, int(crop), int(batch_size), rng
        self.context = int(cfg["context"])
        self.inj = cfg["injection"]
        self.pixel_mm = float(cfg["spacing_mm"])
        lo, hi = cfg["hu_window"]
        self.hu_per_unit = float(hi - lo)

    def one(self):
        rng, crop = self.rng, self.crop
        for _ in range(20):
            ci, z = self.pool[int(rng.integers(len(self.pool)))]
            case = self.cases[ci]
            cm = case.couinaud[z]
            segs, counts = np.unique(cm[cm > 0], return_counts=True)
            segs = segs[counts >= self.inj["min_segment_px"]]
            if rng.random() < self.inj["whole_liver_prob"] or not len(segs):
                seg = 0
                if (cm > 0).sum() < self.inj["min_segment_px"]:
                    continue
            else:
                seg = int(segs[rng.integers(len(segs))])
            region = cm > 0 if seg == 0 else cm == seg
            ys, xs = np.nonzero(region)
            n = rng.integers(len(ys))
            y0 = int(ys[n] + rng.integers(-crop // 4, crop // 4 + 1)) - crop // 2
            x0 = int(xs[n] + rng.integers(-crop // 4, crop // 4 + 1)) - crop // 2
            idx = np.clip(np.arange(z - self.context, z + self.context + 1), 0, case.image.shape[0] - 1)
            img = cut_window(case.image[idx], y0, x0, crop)
            cms = cut_window(case.couinaud[idx], y0, x0, crop)
            if not ((cms[self.context] == seg) if seg else (cms[self.context] > 0)).any():
                continue
            img, mask = inject_tumour(img, cms, seg, rng, self.pixel_mm, case.slice_mm, self.hu_per_unit,
                                      self.inj["radius_mm"], self.inj["contrast_hu"])
            reg = (cms[self.context] == seg) if seg else (cms[self.context] > 0)
            return img, reg, mask[self.context]
        raise InputError("could not place a synthetic tumour in 20 tries: the healthy liver slices are too small")

    def sample(self):
        imgs, regs, tgts = [], [], []
        for _ in range(self.batch_size):
            img, reg, tgt = self.one()
            flips = [a for a in (-1, -2) if self.rng.random() < 0.5]
            if flips:
                img, reg, tgt = (np.flip(a, axis=flips) for a in (img, reg, tgt))
            imgs.append(np.ascontiguousarray(img))
            regs.append(np.ascontiguousarray(reg)[None])
            tgts.append(np.ascontiguousarray(tgt))
        return (torch.from_numpy(np.stack(imgs)).float(), torch.from_numpy(np.stack(regs)).float(),
                torch.from_numpy(np.stack(tgts)).long())


def train_couinaudnet(net, opt, cases, labels, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    """CouinaudNet on the healthy slices of ``labels`` (case id -> slice labels) with injected tumours."""
    scfg = cfg["couinaudnet"]
    pool = healthy_pool(cases, labels, cfg["injection"]["min_segment_px"])
    sampler = InjectionSampler(cases, pool, _crop_size(cases, scfg["crop"]), scfg["batch_size"], rng, cfg)
    dev = _device(device)

    def next_batch():
        x, r, t = sampler.sample()
        return x.to(dev), r.to(dev), t.to(dev)

    def loss_fn(net, batch):
        x, r, t = batch
        logits = net(x, r)
        onehot = F.one_hot(t, 2).permute(0, 3, 1, 2).float()
        return F.cross_entropy(logits.float(), t) + soft_dice_loss(logits, onehot, (1,))

    run_stage("couinaudnet", net, opt, next_batch, loss_fn, scfg, scfg["steps"], start, save,
              cfg["checkpoint_every"], progress, curves)
    return len(pool)


@torch.inference_mode()
def couinaudnet_probs(net, case: WeakCase, slice_labels, context=1, batch=8, device="cpu",
                      clip: bool = True) -> np.ndarray:
    """CouinaudNet tumour probability o_k on the pathological slices.

    ``clip`` (default): zero outside the labelled region, so a slice whose region is empty gets
    none.  ``clip=False`` is the vanilla CouinaudNet of the paper's ablation: the network's raw
    output inside the liver, also on pathological slices whose labelled segment is absent (its
    region input is then empty) -- the label noise that ILR (Eq. 2) removes.
    """
    dev = _device(device)
    net = net.to(dev).eval()
    out = np.zeros(case.image.shape, np.float32)
    zs = [z for z in np.flatnonzero(np.asarray(slice_labels) > 0)
          if (case.region(z).any() if clip else case.liver[z].any())]
    for b0 in range(0, len(zs), batch):
        centres = np.asarray(zs[b0:b0 + batch])
        regions = np.stack([case.region(z) for z in centres])
        x = torch.from_numpy(np.ascontiguousarray(slice_groups(case.image, centres, context))).to(dev)
        r = torch.from_numpy(regions[:, None].astype(np.float32)).to(dev)
        p = torch.softmax(net(x, r).float(), dim=1)[:, 1].cpu().numpy()
        out[centres] = p * (regions if clip else case.liver[centres])
    return out


def pseudo_masks(probs: np.ndarray, cfg, use_plr: bool) -> tuple:
    """(tumour masks, CI or None) from CouinaudNet probabilities: Eq. 3, or Eq. 3-6 with PLR."""
    r = cfg["refine"]
    if use_plr:
        return plr(probs, r["c"], r["tau"])
    return probs >= r["tau"], None


# ----------------------------------------------------------------------------- segmenter


def segmenter_cases(cases: list, tumours: dict) -> list:
    """PreparedCases for the final segmenter: liver + tumour (pixel labels, else pseudo-labels)."""
    out = []
    for case in cases:
        tumour = case.tumour if case.tumour is not None else tumours.get(case.case_id)
        if tumour is None:
            tumour = np.zeros(case.liver.shape, bool)
        out.append(prepared_case(case.case_id, case.image, case.liver, tumour))
    return out


def train_segmenter(net, opt, prepared: list, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    scfg = cfg["segmenter"]
    sampler = Sampler(prepared, _crop_size(prepared, scfg["crop"]), scfg["batch_size"], rng, cfg["context"])
    run_stage("segmenter", net, opt, _seg_batch_fn(sampler, device), _seg_loss(scfg["dice_weight"], scfg["dice_classes"]),
              scfg, scfg["steps"], start, save, cfg["checkpoint_every"], progress, curves)


# ----------------------------------------------------------------------------- config


def _check_config(cfg: dict) -> None:
    where = "--config/--set"

    def positive_int(value, name, minimum=1):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InputError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")

    def pair(value, name):
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) for v in value) and value[0] <= value[1]):
            raise InputError(f"{where}: {name} must be [low, high] numbers, got {value!r}")

    if not isinstance(cfg["spacing_mm"], (int, float)) or not cfg["spacing_mm"] > 0:
        raise InputError(f"{where}: spacing_mm must be a positive number, got {cfg['spacing_mm']!r}")
    positive_int(cfg["context"], "context", 0)
    for key in ("infer_batch", "checkpoint_every"):
        positive_int(cfg[key], key)
    if not (isinstance(cfg["channels"], list) and len(cfg["channels"]) == 4
            and all(isinstance(c, int) and c > 0 for c in cfg["channels"])):
        raise InputError(f"{where}: channels must be a list of 4 positive integers, got {cfg['channels']!r}")
    pair(cfg["hu_window"], "hu_window")
    if not cfg["hu_window"][0] < cfg["hu_window"][1]:
        raise InputError(f"{where}: hu_window must be [low, high] with low < high, got {cfg['hu_window']!r}")
    r = cfg["refine"]
    if not (isinstance(r["c"], (int, float)) and r["c"] > 0):
        raise InputError(f"{where}: refine.c must be a positive number, got {r['c']!r}")
    if not (isinstance(r["tau"], (int, float)) and 0 < r["tau"] < 1):
        raise InputError(f"{where}: refine.tau must be in (0, 1), got {r['tau']!r}")
    positive_int(r["ilr_min_pixels"], "refine.ilr_min_pixels")
    for key in ("ilr", "plr", "clip_to_region"):
        if not isinstance(r[key], bool):
            raise InputError(f"{where}: refine.{key} must be true or false, got {r[key]!r}")
    inj = cfg["injection"]
    pair(inj["radius_mm"], "injection.radius_mm")
    pair(inj["contrast_hu"], "injection.contrast_hu")
    if not inj["radius_mm"][0] > 0:
        raise InputError(f"{where}: injection.radius_mm must be positive, got {inj['radius_mm']!r}")
    if not 0 <= inj["whole_liver_prob"] <= 1:
        raise InputError(f"{where}: injection.whole_liver_prob must be in [0, 1], got {inj['whole_liver_prob']!r}")
    positive_int(inj["min_segment_px"], "injection.min_segment_px")
    dc = cfg["segmenter"]["dice_classes"]
    if not (isinstance(dc, list) and all(isinstance(c, int) and 0 <= c < N_CLASSES for c in dc)):
        raise InputError(f"{where}: segmenter.dice_classes must list class indices 0..{N_CLASSES - 1}, got {dc!r}")
    for stage in STAGES:
        st = cfg[stage]
        positive_int(st["steps"], f"{stage}.steps", 0)
        positive_int(st["crop"], f"{stage}.crop", 16)
        positive_int(st["batch_size"], f"{stage}.batch_size")
        if not (isinstance(st["lr"], (int, float)) and st["lr"] > 0):
            raise InputError(f"{where}: {stage}.lr must be a positive number, got {st['lr']!r}")
    if cfg["liver_model"] is not None and not isinstance(cfg["liver_model"], str):
        raise InputError(f"{where}: liver_model must be a model folder path, got {cfg['liver_model']!r}")


def resolve_config(config: dict | None) -> dict:
    """DEFAULTS merged with the user's settings, validated, stage steps scaled to ``steps``."""
    cfg = merge_config(DEFAULTS, config or {}, where="--config/--set")
    _check_config(cfg)
    scaled = scale_steps({s: cfg[s]["steps"] for s in STAGES}, cfg["steps"])
    for s in STAGES:
        cfg[s]["steps"] = scaled[s]
    return cfg


def network_kwargs(cfg) -> dict:
    seg = {"in_channels": 2 * cfg["context"] + 1, "out_channels": N_CLASSES, "channels": list(cfg["channels"]),
           "attention": "none", "localization": False}
    return {"liver_net": dict(seg), "segmenter": dict(seg),
            "couinaudnet": {"context": cfg["context"], "channels": list(cfg["channels"])}}


def build_networks(kwargs) -> dict:
    return {"liver_net": BoxAttentionUNet2D(**kwargs["liver_net"]), "segmenter": BoxAttentionUNet2D(**kwargs["segmenter"]),
            "couinaudnet": CouinaudNet(**kwargs["couinaudnet"])}


# ----------------------------------------------------------------------------- train


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Liver + Couinaud maps -> ILR -> CouinaudNet -> pseudo-labels + PLR -> segmenter; writes the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    ckpt, saved, init = open_run(out, cfg, resume, init)
    cases = select_cases(dataset, cfg)
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = network_kwargs(cfg)
    nets = build_networks(kwargs)
    if init is not None:
        _load_init(nets, init)
    dev = _device(device)
    for net in nets.values():
        net.to(dev)
    opts = {s: make_optimizer(nets[s].parameters(), cfg[s], f"{s}.optimizer") for s in STAGES}
    state = {"curves": {}, "seconds": {}}

    def save(stage, step):
        ckpt.save(stage, step, nets, opts, rng, extra={"config": cfg, "init": None if init is None else str(init),
                                                        "curves": state["curves"], "seconds": state["seconds"]})

    stage0, step0 = STAGES[0], 0
    if saved is not None:
        stage0, step0 = ckpt.resume(saved, nets, opts, rng, state, progress)
    done = {s: STAGES.index(s) < STAGES.index(stage0) for s in STAGES}

    def start_of(stage):
        return step0 if stage == stage0 else 0

    # -- load the cases on the working grid
    t0 = time.monotonic()
    loaded = {}
    for n, case in enumerate(cases):
        check_cancelled(progress)
        loaded[case.id] = load_case(dataset, case, cfg, keep_original=bool(cfg["liver_model"]) and case.mask is None)
        if progress is not None:
            progress.update("prepare", n + 1, len(cases))
    state["seconds"]["load"] = round(time.monotonic() - t0, 2)

    # -- liver of every case: store mask, liver model, or a liver net trained on the masked cases
    livers, sources = {}, {}
    for case in cases:
        if loaded[case.id]["mask"] is not None:
            livers[case.id], sources[case.id] = loaded[case.id]["mask"] >= 1, "mask"
    missing = [c for c in cases if c.id not in livers]
    liver_net_used = False
    if missing and cfg["liver_model"]:
        liver_model = load_model(cfg["liver_model"], device=device)
        for case in missing:
            livers[case.id] = liver_from_model(liver_model, loaded[case.id]["original"],
                                               loaded[case.id]["image"].shape[1:], device)
            sources[case.id] = "liver_model"
    elif missing:
        masked = [(c.id, loaded[c.id] if c.id in loaded else load_case(dataset, c, cfg))
                  for c in dataset.cases.values() if c.split in ("train", "val") and c.mask is not None]
        if not masked:
            raise InputError(f"{dataset.root}: no liver mask for {len(missing)} case(s) "
                             f"({', '.join(c.id for c in missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                             f"the Couinaud constructor needs the liver: add masked cases to the store or pass "
                             f"--set liver_model=PATH (a liver model of this project)")
        liver_net_used = True
        if not done["liver_net"]:
            t0 = time.monotonic()
            train_liver_net(nets["liver_net"], opts["liver_net"], masked, cfg, rng, device, start_of("liver_net"),
                            save, progress, state["curves"])
            state["seconds"]["liver_net"] = round(time.monotonic() - t0, 2)
        for n, case in enumerate(missing):
            probs = predict_softmax(nets["liver_net"], loaded[case.id]["image"], cfg["context"], cfg["infer_batch"], device)
            livers[case.id], sources[case.id] = liver_from_softmax(probs), "liver_net"
            if progress is not None:
                progress.update("liver", n + 1, len(missing))

    # -- Couinaud maps and image-level labels
    t0 = time.monotonic()
    weak = []
    for n, case in enumerate(cases):
        check_cancelled(progress)
        if livers[case.id].sum() < MIN_LIVER_PIXELS:
            if progress is not None:
                progress.log(f"{case.id}: no liver found ({sources[case.id]}); case skipped")
            continue
        weak.append(make_weak_case(case, loaded[case.id], livers[case.id], sources[case.id], cfg))
        loaded[case.id] = None      # free the HU volume
        if progress is not None:
            progress.update("couinaud", n + 1, len(cases))
    state["seconds"]["couinaud"] = round(time.monotonic() - t0, 2)
    if not weak:
        raise InputError(f"{dataset.root}: no training case has a liver (store mask, liver model or liver net)")
    r = cfg["refine"]
    before = {c.case_id: c.image_labels() for c in weak}
    labels = {c.case_id: c.refined_labels(r["ilr"], r["ilr_min_pixels"]) for c in weak}

    # -- CouinaudNet on healthy slices with injected tumours
    need_net = any(c.tumour is None and labels[c.case_id].any() for c in weak)
    pool_size = 0
    if need_net and not done["couinaudnet"]:
        t0 = time.monotonic()
        pool_size = train_couinaudnet(nets["couinaudnet"], opts["couinaudnet"], weak, labels, cfg, rng, device,
                                      start_of("couinaudnet"), save, progress, state["curves"])
        state["seconds"]["couinaudnet"] = round(time.monotonic() - t0, 2)

    # -- pseudo-labels (+ PLR) of the pathological weak slices
    tumours, pseudo_stats = {}, {"pixels_before_plr": 0, "pixels_after_plr": 0}
    if need_net:
        for n, case in enumerate(c for c in weak if c.tumour is None):
            probs = couinaudnet_probs(nets["couinaudnet"], case, labels[case.case_id], cfg["context"],
                                      cfg["infer_batch"], device, r["clip_to_region"])
            masks, _ = pseudo_masks(probs, cfg, r["plr"])
            tumours[case.case_id] = masks & case.liver
            pseudo_stats["pixels_before_plr"] += int((probs >= r["tau"]).sum())
            pseudo_stats["pixels_after_plr"] += int(masks.sum())
            if progress is not None:
                progress.update("pseudo-labels", n + 1, sum(c.tumour is None for c in weak))

    # -- the final segmenter
    t0 = time.monotonic()
    train_segmenter(nets["segmenter"], opts["segmenter"], segmenter_cases(weak, tumours), cfg, rng, device,
                    start_of("segmenter"), save, progress, state["curves"])
    state["seconds"]["segmenter"] = round(time.monotonic() - t0, 2)

    liver_slices = {c.case_id: c.liver.any(axis=(1, 2)) for c in weak}
    summary = {
        "dataset": str(dataset.root),
        "cases": {kind: [c.case_id for c in weak if c.kind == kind] for kind in ("couinaud", "volume", "mask", "liver_only")},
        "liver_source": {c.case_id: c.liver_source for c in weak},
        "landmarks_found": {c.case_id: c.landmarks.get("found", {}) for c in weak},
        "liver_slices": int(sum(v.sum() for v in liver_slices.values())),
        "pathological_slices_before_ilr": int(sum((before[k] > 0)[liver_slices[k]].sum() for k in before)),
        "pathological_slices_after_ilr": int(sum((labels[k] > 0)[liver_slices[k]].sum() for k in labels)),
        "healthy_pool_slices": int(pool_size),
        **pseudo_stats,
    }
    networks = {"segmenter": ("BoxAttentionUNet2D", kwargs["segmenter"], nets["segmenter"].eval())}
    if need_net:
        networks["couinaudnet"] = ("CouinaudNet", kwargs["couinaudnet"], nets["couinaudnet"].eval())
    phase = cfg["phase"] or most_common_phase(cases, PHASES["inference"][0])
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [phase], "inference_phases": [phase],
            "hu_window": list(cfg["hu_window"]),
            "spacing_mm": [float(cfg["spacing_mm"]), float(cfg["spacing_mm"])],
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
        },
        "training": {
            "config": copy.deepcopy(cfg),
            "data": summary,
            "steps": {s: (cfg[s]["steps"] if (s != "liver_net" or liver_net_used) and (s != "couinaudnet" or need_net)
                          else 0) for s in STAGES},
            "init": None if init is None else str(init),
            "device": str(device),
            "seconds": state["seconds"],
            "curves": state["curves"],
        },
        "metrics": {},
    }
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def _load_init(nets: dict, init) -> None:
    """Fine-tuning: start CouinaudNet / the segmenter from an earlier couinaud model."""
    model = load_model(init, device="cpu")
    if model.recipe != NAME:
        raise InputError(f"{init}: --init model is of recipe {model.recipe!r}, not {NAME!r}")
    for name in ("couinaudnet", "segmenter"):
        if name in model.networks:
            try:
                nets[name].load_state_dict(model.networks[name].state_dict(), strict=True)
            except RuntimeError:
                raise InputError(f"{init}: network {name!r} does not fit this configuration "
                                 f"(channels / context differ)") from None


# ----------------------------------------------------------------------------- segment


def _model_input(meta) -> dict:
    inp = meta.get("input", {})
    return {"hu_window": inp.get("hu_window", list(HU_WINDOW)),
            "spacing_mm": float(inp.get("spacing_mm", [1.5])[0]),
            "context": int(inp.get("context_slices", 1)),
            "phases": inp.get("inference_phases") or inp.get("phases") or [None]}


def _pick_image(images: dict, phases) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    if phases and phases[0] in images:
        return images[phases[0]]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model needs the phase {phases[0]!r}; got phases {sorted(map(str, images))}")


def segment(model, images: dict, boxes=None, device="cpu", progress=None, do_postprocess: bool = True) -> SegmentResult:
    """Segment one volume with the final segmenter (boxes are not used by this recipe)."""
    inp = _model_input(model.meta)
    image = _pick_image(images, inp["phases"])
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    if "segmenter" not in model.networks:
        raise InputError(f"{model.path}: model has no 'segmenter' network")
    size = working_size(image.array.shape[1:], image.spacing[:2], inp["spacing_mm"])
    work = resize_slices(torch.from_numpy(window(image.array, inp["hu_window"]))[:, None], size)[:, 0].numpy()
    probs = predict_softmax(model.networks["segmenter"], work, inp["context"], 8, device, progress)
    nz, ny, nx = image.array.shape
    labels = np.empty((nz, ny, nx), np.uint8)
    tumour = np.empty((nz, ny, nx), np.float32)
    entropy = np.empty((nz, ny, nx), np.float32)
    for z0 in range(0, nz, 8):      # back to the input grid a few slices at a time
        p = to_input_grid(torch.from_numpy(probs[z0:z0 + 8]), (ny, nx))
        labels[z0:z0 + 8] = p.argmax(dim=1).to(torch.uint8).numpy()
        tumour[z0:z0 + 8] = p[:, 2].numpy()
        entropy[z0:z0 + 8] = (-(p * torch.log(p.clamp_min(1e-8))).sum(dim=1)).numpy()
    if do_postprocess:
        labels = postprocess(labels)
    return SegmentResult(image.with_array(labels), image.with_array(tumour), image.with_array(entropy))


# ----------------------------------------------------------------------------- pseudo


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Refined pseudo-labels of the weak cases (Couinaud / volume label, no mask) as a new store.

    The liver comes from the model's own segmenter; Couinaud maps, ILR and PLR follow the
    model's training settings.  Every other case is copied unchanged.
    """
    if "couinaudnet" not in model.networks:
        raise InputError(f"{model.path}: this model has no CouinaudNet (it was trained on masks only)")
    cfg = resolve_config(model.meta.get("training", {}).get("config", {}))
    weak_ids = {c.id for c in dataset.cases.values() if c.mask is None and ({"couinaud", "volume"} & c.label_kinds)}
    if not weak_ids:
        raise InputError(f"{dataset.root}: no case with a Couinaud or volume label and no mask to pseudo-label")
    r = cfg["refine"]

    def relabel(case, images):
        loaded = load_case(dataset, case, cfg, keep_original=True)
        liver = segment(model, {"image": loaded["original"]}, device=device).labels.array >= 1
        liver_w = labels_on_working(liver.astype(np.uint8), loaded["image"].shape[1:]) >= 1
        if liver_w.sum() < MIN_LIVER_PIXELS:
            return None      # no liver found: the case is copied unlabelled
        wc = make_weak_case(case, loaded, liver_w, "segmenter", cfg)
        probs = couinaudnet_probs(model.networks["couinaudnet"], wc, wc.refined_labels(r["ilr"], r["ilr_min_pixels"]),
                                  cfg["context"], cfg["infer_batch"], device, r["clip_to_region"])
        tum, _ = pseudo_masks(probs, cfg, r["plr"])
        work = liver_w.astype(np.uint8)
        work[tum & liver_w] = 2
        onehot = F.one_hot(torch.from_numpy(work.astype(np.int64)), N_CLASSES).permute(0, 3, 1, 2).float()
        lab = to_input_grid(onehot, liver.shape[1:]).argmax(dim=1).to(torch.uint8).numpy()
        return loaded["original"].with_array(lab)

    return write_pseudo_store(dataset, out_dir, weak_ids, relabel, progress=progress)
