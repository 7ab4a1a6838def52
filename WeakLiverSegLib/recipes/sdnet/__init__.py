"""Recipe ``sdnet``: semi-supervised liver segmentation from a few masks and many unlabelled volumes.

Huang et al., "SD-Net: a semi-supervised double-cooperative network for liver segmentation from
computed tomography (CT) images" (../shared/papers/sdnet_double_cooperative_semi_supervised_liver.txt).

Two 3D networks, a VNet and a residual VNet (``networks/vnet3d.py``), see the same batch: half
labelled patches (cases with a mask, split train) and half unlabelled (split-train cases without
a mask) (Eq. 1-2).  Per step:

1. Adaptive mask fine-tuning (labelled half): the disagreement region is where the two argmax
   predictions differ (Eq. 3); each network's supervised loss is CE + Dice + the MSE between its
   softmax and the one-hot mask over that region only (Eq. 6-7).
2. Dynamic pseudo-labels (unlabelled half, Algorithm 1): the network with the lower Dice loss on
   the labelled half is the teacher; its softmax, sharpened with T = 0.1, is the soft target of
   the other network's MSE loss (Eq. 8).  The teacher gets no unsupervised loss that step.

Both networks are kept; inference averages their softmax (``inference`` in the config: mean |
vnet | resvnet) with MONAI's sliding-window inference on the working grid, then resamples the
liver probability to the input grid, thresholds at 0.5 and keeps the largest component with its
holes filled.  The recipe predicts the liver only (label 1); tumour is not predicted.
``liver_mask(model, volume)`` gives other recipes that liver (organ box, Couinaud frame,
post-processing mask).

``method: "vnet"`` trains the single-VNet baseline instead (labelled cases only, CE + Dice, the
same schedule), and ``disagreement_loss`` (mse | wce | none) gives the loss ablation of Table 2.

Deviations from the paper (config fields; the paper's values in brackets):

* Working grid: the volume is resampled to ``spacing_mm`` (3 mm isotropic) and trained on random
  ``patch`` crops (32^3 voxels = 96 mm; the paper trains full-resolution LiTS volumes on a V100).
  ``foreground_fraction`` of the labelled crops are centred near a liver voxel.
* Networks at CPU size: ``VNet`` base width 4, 3 levels (MONAI's VNet blocks; base 16 / 4 levels
  is exactly MONAI's VNet, ``class: "monai.VNet"`` uses MONAI's class itself) and ``ResVNet``
  base 8, 3 levels.  Dropout off (tiny batches).
* Optimiser: SGD, momentum 0.9, weight decay 1e-4, lr 0.01 divided by 10 every ``lr_step`` of
  ``iterations`` (200 of 1200) [same]; ``steps`` scales both together.  For short CPU runs set
  ``iterations`` = ``steps`` and ``lr_step`` yourself (docs/results/sdnet_experiments.md uses
  300 / 200): 1200 compressed into a few hundred steps leaves too few at lr 0.01.
* The Dice loss is on the liver channel (MONAI ``include_background=False``): Eq. 5 pooled over
  both classes is dominated by the background and barely moves, which makes a poor teacher
  criterion.  CE is over both classes.
* Augmentation: random in-plane rotation (``rotate_deg``); random flips [the paper flips] are
  off by default (``flip_prob``) because a left-right flip puts the liver on the spleen's side.
* Post-processing (largest component, hole filling; ``postprocess``) is not in the paper.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss

from ... import __version__
from ...learn.config import merge_config
from ...errors import InputError, ModelError
from ...data.imageio import resample_to
from ...learn.modelstore import LoadedModel, load_model, save_model
from ...learn.networks.vnet3d import build_network
from ...learn.postprocess import fill_holes, largest_component
from ...learn.slices import window
from ...learn.training import SegmentResult, check_cancelled, make_optimizer, most_common_phase, open_run, set_lr
from ...data.volume import Volume

NAME = "sdnet"
RECIPE_VERSION = 1
LABELS = {"background": 0, "liver": 1}
LABELS_NOTE = "liver only (tumour voxels count as liver); this recipe does not predict tumour (label 2)"
# One image phase; ``config["phase"]`` picks it (default: each case's reference phase).
PHASES = {"train": ("enhanced",), "inference": ("enhanced",)}
METHODS = ("sdnet", "vnet")
DISAGREEMENT_LOSSES = ("mse", "wce", "none")
INFERENCE_MEMBERS = ("mean", "vnet", "resvnet")
NETWORK_CLASSES = ("VNet", "ResVNet", "monai.VNet")

DEFAULTS = {
    "steps": None,                 # total optimisation steps; None = ``iterations``
    "seed": 0,
    "method": "sdnet",             # sdnet | vnet (single VNet on the labelled cases: the baseline)
    "phase": None,                 # image phase; None = each case's reference phase
    "hu_window": [-200.0, 200.0],  # window width 400, level 0 (the paper)
    "spacing_mm": [3.0, 3.0, 3.0], # working grid (x, y, z)
    "patch": [32, 32, 32],         # training crop / sliding window (x, y, z) voxels
    "networks": {
        "vnet": {"class": "VNet", "base": 4, "depth": 3},
        "resvnet": {"class": "ResVNet", "base": 8, "depth": 3},
    },
    "iterations": 1200,            # the paper: 1200 iterations ...
    "lr_step": 200,                # ... lr / 10 every 200
    "lr_gamma": 0.1,
    "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
    "labelled_per_batch": 2,       # the paper: batch 4 = 2 labelled + 2 unlabelled
    "unlabelled_per_batch": 2,
    "temperature": 0.1,            # sharpening T of Algorithm 1
    "disagreement_loss": "mse",    # mse (Eq. 6) | wce (Table 2 ablation) | none
    "disagreement_weight": 1.0,
    "unsupervised_weight": 1.0,
    "foreground_fraction": 0.7,
    "rotate_deg": 10.0,
    "flip_prob": 0.0,
    "inference": "mean",           # mean | vnet | resvnet
    "infer_batch": 4,
    "overlap": 0.25,
    "postprocess": True,
    "checkpoint_every": 50,
}


# ----------------------------------------------------------------------------- the paper's pieces


def disagreement_region(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Eq. 3: boolean ``(B, 1, ...)`` mask of the voxels where the two predictions' argmax differ.

    ``p1`` / ``p2``: ``(B, C, ...)`` probabilities or logits (argmax is the same for both).
    """
    if p1.shape != p2.shape:
        raise ValueError(f"predictions differ in shape: {tuple(p1.shape)} vs {tuple(p2.shape)}")
    return (p1.argmax(dim=1, keepdim=True) != p2.argmax(dim=1, keepdim=True))


def one_hot(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """``(B, 1, ...)`` integer labels -> ``(B, C, ...)`` float one-hot."""
    return F.one_hot(labels[:, 0].long(), n_classes).movedim(-1, 1).float()


def disagreement_mse(prob: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean squared error between ``prob`` and ``target`` (both ``(B, C, ...)``) over ``region``.

    The mean runs over the region's voxels and the classes; an empty region gives 0 (still a
    tensor attached to the graph).
    """
    mask = region.to(prob.dtype)
    n = mask.sum() * prob.shape[1]
    return ((prob - target) ** 2 * mask).sum() / n.clamp_min(1.0)


def disagreement_wce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Table 2's alternative: class-balanced cross-entropy over ``region`` (weights = inverse class
    frequency of ``target`` inside the region); 0 for an empty region."""
    mask = region.to(logits.dtype)
    counts = (target * mask).flatten(2).sum(dim=(0, 2))              # voxels per class in the region
    present = counts > 0
    weight = torch.where(present, counts.sum() / (present.sum().clamp_min(1) * counts.clamp_min(1.0)),
                         torch.zeros_like(counts)).detach()
    logp = F.log_softmax(logits.float(), dim=1)
    w = (target * weight.view(1, -1, *([1] * (logits.dim() - 2)))).sum(dim=1, keepdim=True) * mask
    return -(w * (target * logp).sum(dim=1, keepdim=True)).sum() / w.sum().clamp_min(1e-12)


_DICE_CE = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
_DICE = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")


def dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 lines 5-8: the liver Dice loss averaged over the labelled samples (scalar)."""
    return _DICE(logits.float(), labels).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, region: torch.Tensor | None,
                    kind: str = "mse", weight: float = 1.0) -> tuple:
    """Eq. 7: ``L_CE + L_Dice + L_MSE`` on the labelled half -> (total, {"dice_ce", "region"}).

    ``labels``: ``(B, 1, ...)`` 0/1; ``region``: the disagreement mask (None or ``kind="none"``:
    no region term); ``kind`` ``"wce"`` swaps the MSE for class-balanced CE (the ablation).
    """
    base = _DICE_CE(logits.float(), labels)
    if region is None or kind == "none":
        extra = logits.new_zeros(())
    elif kind == "mse":
        extra = disagreement_mse(torch.softmax(logits.float(), dim=1), one_hot(labels, logits.shape[1]), region)
    elif kind == "wce":
        extra = disagreement_wce(logits, one_hot(labels, logits.shape[1]), region)
    else:
        raise ValueError(f"disagreement loss must be one of {DISAGREEMENT_LOSSES}, got {kind!r}")
    return base + weight * extra, {"dice_ce": float(base.detach()), "region": float(extra.detach())}


def sharpen(p: torch.Tensor, T: float = 0.1, dim: int = 1) -> torch.Tensor:
    """Algorithm 1 lines 11/14: ``P^(1/T) / sum_c P_c^(1/T)`` over the class axis ``dim``.

    For two classes this is the paper's ``P^(1/T) / (P^(1/T) + (1-P)^(1/T))``; computed in log
    space so T = 0.1 does not underflow.
    """
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    return torch.softmax(torch.log(p.clamp_min(1e-12)) / T, dim=dim)


def pick_teacher(dice_loss_a, dice_loss_b) -> int:
    """Algorithm 1 line 9: 0 (network a teaches) when ``dice_loss_a < dice_loss_b``, else 1."""
    return 0 if float(dice_loss_a) < float(dice_loss_b) else 1


def unsupervised_mse(prob: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Eq. 8: MSE between the student's softmax and the (detached) sharpened pseudo-label."""
    return F.mse_loss(prob, pseudo.detach())


def sdnet_step(nets: dict, opts: dict, x_l, y_l, x_u=None, cfg: dict | None = None) -> dict:
    """One SD-Net optimisation step of both networks; returns the losses and the teacher.

    ``nets`` / ``opts``: ``{"vnet", "resvnet"}``; ``x_l`` ``(B, 1, ...)`` images with labels ``y_l``
    ``(B, 1, ...)`` 0/1; ``x_u`` unlabelled images or None (no unsupervised term).
    """
    cfg = cfg or DEFAULTS
    names = ("vnet", "resvnet")
    n_l = x_l.shape[0]
    x = x_l if x_u is None or x_u.shape[0] == 0 else torch.cat([x_l, x_u])
    logits = {k: nets[k](x) for k in names}                                   # Eq. 1-2
    lab = {k: logits[k][:n_l] for k in names}
    region = disagreement_region(lab["vnet"].detach(), lab["resvnet"].detach())   # Eq. 3
    losses, parts = {}, {}
    for k in names:
        losses[k], parts[k] = supervised_loss(lab[k], y_l, region, cfg["disagreement_loss"],
                                              float(cfg["disagreement_weight"]))      # Eq. 7
    with torch.no_grad():
        dice = {k: float(dice_loss(lab[k], y_l)) for k in names}
    teacher = pick_teacher(dice["vnet"], dice["resvnet"])
    sup = {k: float(losses[k].detach()) for k in names}
    uns = None
    if x.shape[0] > n_l:
        t_name, s_name = names[teacher], names[1 - teacher]
        with torch.no_grad():
            pseudo = sharpen(torch.softmax(logits[t_name][n_l:].float(), dim=1), float(cfg["temperature"]))
        uns = unsupervised_mse(torch.softmax(logits[s_name][n_l:].float(), dim=1), pseudo)   # Eq. 8
        losses[s_name] = losses[s_name] + float(cfg["unsupervised_weight"]) * uns
    total = losses["vnet"] + losses["resvnet"]
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in opts.values():
        opt.step()
    return {"loss": float(total.detach()), "sup_vnet": sup["vnet"], "sup_resvnet": sup["resvnet"],
            "dice_vnet": dice["vnet"], "dice_resvnet": dice["resvnet"], "teacher": names[teacher],
            "unsup": None if uns is None else float(uns.detach()),
            "region_fraction": float(region.float().mean()), "region_loss_vnet": parts["vnet"]["region"]}


def vnet_step(net, opt, x_l, y_l) -> dict:
    """One step of the single-VNet baseline: CE + Dice on the labelled patches."""
    loss, _ = supervised_loss(net(x_l), y_l, None, "none")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach())}


# ----------------------------------------------------------------------------- working grid


def working_grid(volume: Volume, spacing_mm) -> Volume:
    """An empty LPS-aligned grid (identity direction) over ``volume``'s field of view, ``spacing_mm`` voxels.

    Whatever the input's direction matrix (e.g. a RAS-flipped NIfTI), the networks then see
    every volume the same way round: x towards the patient's left, y posterior, z superior.
    The grid's outer edges are those of the input's bounding box in world space (up to rounding).
    """
    spacing_out = np.asarray(spacing_mm, float)
    n = np.asarray(volume.shape_xyz, float)
    # the 8 outer corners of the input's voxels (index -0.5 and n - 0.5 on each axis)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    world = volume.index_to_world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    size = np.maximum(1, np.round((hi - lo) / spacing_out - 1e-6)).astype(int)
    centre = (lo + hi) / 2.0
    origin = centre - (size - 1) / 2.0 * spacing_out    # centred on the field of view
    return Volume(np.zeros(tuple(size[::-1]), np.uint8), tuple(spacing_out), tuple(origin), np.eye(3))


def image_to_working(volume: Volume, spacing_mm, hu_window) -> tuple:
    """HU volume -> (windowed float32 (z, y, x) on the working grid, the grid)."""
    grid = working_grid(volume, spacing_mm)
    vol = volume.with_array(volume.array.astype(np.float32, copy=False))
    work = resample_to(vol, grid, "linear")
    return window(work.array, hu_window), grid


def mask_to_working(mask: Volume, grid: Volume) -> np.ndarray:
    """Liver (labels >= 1) on the working grid: uint8 0/1 (linear on the 0/1 mask, >= 0.5)."""
    liver = mask.with_array((mask.array >= 1).astype(np.float32))
    return (resample_to(liver, grid, "linear", default=0.0).array >= 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling


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


# ----------------------------------------------------------------------------- config


def _check_config(cfg: dict) -> None:
    where = "--config/--set"

    def positive_list(key, n, kind):
        v = cfg[key]
        if not (isinstance(v, list) and len(v) == n and all(isinstance(x, kind) and not isinstance(x, bool)
                                                             and x > 0 for x in v)):
            raise InputError(f"{where}: {key} must be a list of {n} positive numbers, got {v!r}")

    if cfg["method"] not in METHODS:
        raise InputError(f"{where}: method {cfg['method']!r} is not one of {list(METHODS)}")
    if cfg["disagreement_loss"] not in DISAGREEMENT_LOSSES:
        raise InputError(f"{where}: disagreement_loss {cfg['disagreement_loss']!r} is not one of "
                         f"{list(DISAGREEMENT_LOSSES)}")
    if cfg["inference"] not in INFERENCE_MEMBERS:
        raise InputError(f"{where}: inference {cfg['inference']!r} is not one of {list(INFERENCE_MEMBERS)}")
    positive_list("spacing_mm", 3, (int, float))
    positive_list("patch", 3, int)
    lo, hi = cfg["hu_window"]
    if not lo < hi:
        raise InputError(f"{where}: hu_window must be [low, high] with low < high, got {cfg['hu_window']!r}")
    for key in ("iterations", "lr_step", "labelled_per_batch", "infer_batch", "checkpoint_every"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise InputError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["unlabelled_per_batch"], int) or cfg["unlabelled_per_batch"] < 0:
        raise InputError(f"{where}: unlabelled_per_batch must be an integer >= 0, got {cfg['unlabelled_per_batch']!r}")
    for key in ("lr", "temperature"):
        if not isinstance(cfg[key], (int, float)) or not cfg[key] > 0:
            raise InputError(f"{where}: {key} must be a positive number, got {cfg[key]!r}")
    for key in ("foreground_fraction", "flip_prob", "overlap"):
        if not isinstance(cfg[key], (int, float)) or not 0 <= cfg[key] < (1 if key == "overlap" else 1.0000001):
            raise InputError(f"{where}: {key} must be a number in [0, 1], got {cfg[key]!r}")
    for role in ("vnet", "resvnet"):
        spec = cfg["networks"].get(role)
        if not isinstance(spec, dict) or spec.get("class") not in NETWORK_CLASSES:
            raise InputError(f"{where}: networks.{role}.class must be one of {list(NETWORK_CLASSES)}")
    depth = max(_net_kwargs(cfg, r).get("depth", 4) for r in ("vnet", "resvnet"))
    if any(p % (2 ** depth) for p in cfg["patch"]):
        raise InputError(f"{where}: every patch size must be a multiple of {2 ** depth} (2^depth), got {cfg['patch']}")


def resolve_config(config: dict | None) -> dict:
    """DEFAULTS merged with the user's settings, validated; ``steps`` rescales the lr schedule."""
    cfg = merge_config(DEFAULTS, config or {}, where="--config/--set")
    _check_config(cfg)
    if cfg["steps"] is not None:
        steps = int(cfg["steps"])
        if steps < 1:
            raise InputError(f"steps must be positive, got {cfg['steps']!r}")
        cfg["lr_step"] = max(1, int(round(cfg["lr_step"] * steps / cfg["iterations"])))
        cfg["iterations"] = steps
    return cfg


def _net_kwargs(cfg: dict, role: str) -> dict:
    spec = dict(cfg["networks"][role])
    cls = spec.pop("class")
    if cls == "monai.VNet":
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **spec}
    return {"in_channels": 1, "out_channels": 2, **spec}


def lr_for(step: int, cfg: dict) -> float:
    """Step decay of the paper: ``lr * gamma ** (step // lr_step)``."""
    return float(cfg["lr"]) * float(cfg["lr_gamma"]) ** (step // int(cfg["lr_step"]))


# ----------------------------------------------------------------------------- inference


def _model_input(meta: dict) -> dict:
    inp = meta.get("input", {}) or {}
    try:
        return {"phases": list(inp.get("phases") or []), "hu_window": [float(v) for v in inp["hu_window"]],
                "spacing_mm": [float(v) for v in inp["spacing_mm"]], "patch": [int(v) for v in inp["patch"]],
                "overlap": float(inp.get("overlap", 0.25)), "inference": str(inp.get("inference", "mean")),
                "postprocess": bool(inp.get("postprocess", True))}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model.json input: missing or bad field ({exc})") from None


def _pick_image(images: dict, phases) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    for want in phases:
        if want in images:
            return images[want]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model reads one of the phases {phases}; got phases {sorted(map(str, images))}")


def _members(networks: dict, which: str) -> list:
    if which == "mean":
        return [networks[k] for k in ("vnet", "resvnet") if k in networks]
    if which not in networks:
        raise InputError(f"inference member {which!r} is not in this model (it has {sorted(networks)})")
    return [networks[which]]


@torch.inference_mode()
def working_probabilities(nets: list, work: np.ndarray, patch_zyx, device="cpu", overlap=0.25, sw_batch=4,
                          progress=None) -> np.ndarray:
    """Liver probability (z, y, x) float32 of a windowed working-grid volume: MONAI sliding window,
    softmax averaged over ``nets``."""
    dev = torch.device(device)
    nets = [net.to(dev).eval() for net in nets]
    check_cancelled(progress)

    def predictor(x):
        return sum(torch.softmax(net(x).float(), dim=1) for net in nets) / len(nets)

    x = torch.from_numpy(np.ascontiguousarray(work, dtype=np.float32))[None, None].to(dev)
    probs = sliding_window_inference(x, tuple(patch_zyx), sw_batch, predictor, overlap=overlap, mode="gaussian")
    return probs[0, 1].float().cpu().numpy()


def predict_liver_probability(model: LoadedModel, image: Volume, device="cpu", member=None, progress=None) -> Volume:
    """The liver probability of ``image`` on its own grid (float32 Volume)."""
    inp = _model_input(model.meta)
    work, grid = image_to_working(image, inp["spacing_mm"], inp["hu_window"])
    nets = _members(model.networks, member or inp["inference"])
    prob = working_probabilities(nets, work, inp["patch"][::-1], device, inp["overlap"], progress=progress)
    back = resample_to(grid.with_array(prob.astype(np.float32)), image, "linear", default=0.0)
    return image.with_array(np.clip(back.array, 0.0, 1.0).astype(np.float32))


def labels_from_probability(prob: np.ndarray, do_postprocess: bool = True) -> np.ndarray:
    """0/1 uint8 liver labels: probability >= 0.5, then (optionally) the largest component, holes filled."""
    liver = np.asarray(prob) >= 0.5
    if do_postprocess:
        liver = fill_holes(largest_component(liver))
    return liver.astype(np.uint8)


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Predictive entropy in bits (0 = certain, 1 = p 0.5) of a two-class probability."""
    p = np.clip(np.asarray(prob, np.float32), 1e-7, 1 - 1e-7)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)


def segment(model, images: dict, boxes=None, device="cpu", progress=None, member=None,
            do_postprocess=None) -> SegmentResult:
    """Liver segmentation of one volume: labels 0/1, liver probability, entropy (bits), on the input grid.

    ``boxes`` are not used (the recipe needs none; a liver box is ignored).  ``member``: mean |
    vnet | resvnet (default: the model's ``inference`` setting).
    """
    inp = _model_input(model.meta)
    image = _pick_image(images, inp["phases"])
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    if boxes and progress is not None:
        progress.log("sdnet needs no boxes: the boxes are ignored")
    prob = predict_liver_probability(model, image, device, member, progress)
    post = inp["postprocess"] if do_postprocess is None else bool(do_postprocess)
    labels = labels_from_probability(prob.array, post)
    return SegmentResult(image.with_array(labels), prob, image.with_array(binary_entropy(prob.array)))


def liver_mask(model_dir_or_loaded, volume: Volume, device="cpu") -> Volume:
    """The liver (uint8 0/1 Volume on ``volume``'s grid) from an sdnet model folder or LoadedModel,
    for other recipes (organ box, Couinaud frame, post-processing mask)."""
    model = model_dir_or_loaded
    if not isinstance(model, LoadedModel):
        model = load_model(model, device=device)
    if model.recipe != NAME:
        raise ModelError(f"{model.path}: is a {model.recipe!r} model; liver_mask needs an {NAME!r} model")
    return segment(model, {"image": volume}, device=device).labels


# ----------------------------------------------------------------------------- training


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def _select_cases(dataset, cfg):
    labelled = dataset.cases_with("mask", split="train")
    unlabelled = [] if cfg["method"] == "vnet" else [
        c for c in dataset.cases.values() if c.split == "train" and c.mask is None]
    val = dataset.cases_with("mask", split="val")
    if not labelled:
        raise InputError(f"{dataset.root}: no labelled case (a mask and split train); sdnet needs at least one")
    return labelled, unlabelled, val


def _prepare(dataset, case, cfg, with_mask: bool) -> dict:
    image = dataset.read_image(case.id, _phase_of(case, cfg))
    work, grid = image_to_working(image, cfg["spacing_mm"], cfg["hu_window"])
    liver = None
    if with_mask:
        mask = dataset.read_mask(case.id)
        if not mask.same_grid(image):
            mask = resample_to(mask, image, "nearest")     # a mask on another phase's grid
        liver = mask_to_working(mask, grid)
        if not liver.any():
            raise InputError(f"{case.id}: mask has no liver voxel (labels 1 or 2)")
    return {"id": case.id, "image": work, "liver": liver}


def _common_phase(cases, cfg) -> str:
    return cfg["phase"] or most_common_phase(cases, PHASES["inference"][0])


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Train SD-Net (or the single-VNet baseline) on ``dataset``; writes and returns the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    roles = ("vnet", "resvnet") if cfg["method"] == "sdnet" else ("vnet",)
    ckpt, saved, init = open_run(out, cfg, resume, init)

    labelled, unlabelled, val = _select_cases(dataset, cfg)
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = {r: _net_kwargs(cfg, r) for r in roles}
    classes = {r: cfg["networks"][r]["class"] for r in roles}
    init_model = None
    if init is not None:
        init_model = load_model(init, device="cpu")
        if init_model.recipe != NAME:
            raise InputError(f"{init}: --init model is of recipe {init_model.recipe!r}, not {NAME!r}")
        inp = _model_input(init_model.meta)
        if inp["spacing_mm"] != [float(s) for s in cfg["spacing_mm"]] or inp["hu_window"] != [
                float(v) for v in cfg["hu_window"]]:
            raise InputError(f"{init}: --init model works at spacing {inp['spacing_mm']} mm and HU window "
                             f"{inp['hu_window']}; set the same spacing_mm / hu_window in the config")
        for r in roles:
            spec = init_model.meta["networks"].get(r)
            if spec is None:
                raise InputError(f"{init}: --init model has no {r!r} network")
            kwargs[r], classes[r] = dict(spec["kwargs"]), spec["class"]
    nets = {r: build_network(classes[r], **kwargs[r]) for r in roles}
    if init_model is not None:
        for r in roles:
            nets[r].load_state_dict(init_model.networks[r].state_dict())
    dev = torch.device(device)
    for net in nets.values():
        net.to(dev).train()
    opts = {r: make_optimizer(nets[r].parameters(), cfg, "optimizer") for r in roles}

    data = {"dataset": str(dataset.root), "labelled": [c.id for c in labelled],
            "unlabelled": [c.id for c in unlabelled], "val": [c.id for c in val]}
    state = {"curve": [], "teacher_counts": {"vnet": 0, "resvnet": 0}, "seconds": {}}

    def save_ckpt(step):
        ckpt.save(cfg["method"], step, nets, opts, rng, extra={
            "config": cfg, "init": None if init is None else str(init), "kwargs": kwargs, "classes": classes,
            "curve": state["curve"], "teacher_counts": state["teacher_counts"], "seconds": state["seconds"],
            "data": data})

    step0 = 0
    if saved is not None:
        if saved.meta["extra"].get("kwargs") != kwargs:
            raise InputError(f"{ckpt.folder}: checkpoint networks differ from this run; delete it to start over")
        ckpt.restore(saved, nets, opts, rng)
        for key in ("curve", "teacher_counts", "seconds"):
            state[key] = saved.meta["extra"].get(key, state[key])
        step0 = saved.step
        if progress is not None:
            progress.log(f"resuming from step {step0}")

    # -- data on the working grid (rng is not used here, so resuming keeps the sample stream)
    t0 = time.monotonic()
    todo = [(c, True) for c in labelled] + [(c, False) for c in unlabelled]
    prepared_l, prepared_u = [], []
    for n, (case, with_mask) in enumerate(todo):
        check_cancelled(progress)
        (prepared_l if with_mask else prepared_u).append(_prepare(dataset, case, cfg, with_mask))
        if progress is not None:
            progress.update("prepare", n + 1, len(todo))
    state["seconds"]["prepare"] = round(time.monotonic() - t0, 2)
    sampler = PatchSampler(prepared_l, prepared_u, cfg["patch"][::-1], rng, cfg)

    # -- optimisation
    total = int(cfg["iterations"])
    stage = cfg["method"]
    t0 = time.monotonic()
    for step in range(step0, total):
        if progress is not None and progress.cancelled:
            save_ckpt(step)            # resumable from exactly here
            check_cancelled(progress)
        lr = lr_for(step, cfg)
        for opt in opts.values():
            set_lr(opt, lr)
        x_l, y_l, x_u = sampler.sample(cfg["labelled_per_batch"], cfg["unlabelled_per_batch"])
        x_l, y_l = x_l.to(dev), y_l.to(dev)
        x_u = None if x_u is None else x_u.to(dev)
        if stage == "sdnet":
            info = sdnet_step(nets, opts, x_l, y_l, x_u, cfg)
            state["teacher_counts"][info["teacher"]] += 1
        else:
            info = vnet_step(nets["vnet"], opts["vnet"], x_l, y_l)
        if not math.isfinite(info["loss"]):
            raise RuntimeError(f"{stage}: loss became {info['loss']} at step {step + 1}")
        state["curve"].append([step + 1, round(info["loss"], 5)])
        if progress is not None:
            extra = {"teacher": info["teacher"], "region": round(info["region_fraction"], 4)} if stage == "sdnet" else {}
            progress.update(stage, step + 1, total, loss=round(info["loss"], 4), lr=lr, **extra)
        if ckpt.due(step + 1) and step + 1 < total:
            save_ckpt(step + 1)
    state["seconds"][stage] = round(state["seconds"].get(stage, 0) + time.monotonic() - t0, 2)

    # -- model folder, then validation
    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "labels_note": LABELS_NOTE,
        "input": {
            "phases": [_common_phase(labelled + unlabelled, cfg)],
            "inference_phases": [_common_phase(labelled + unlabelled, cfg)],
            "hu_window": [float(v) for v in cfg["hu_window"]],
            "spacing_mm": [float(s) for s in cfg["spacing_mm"]],
            "spacing_note": "isotropic working grid (x, y, z mm); results are resampled to the input grid",
            "patch": [int(p) for p in cfg["patch"]],
            "context_slices": 0,
            "overlap": float(cfg["overlap"]),
            "inference": cfg["inference"] if stage == "sdnet" else "vnet",
            "postprocess": bool(cfg["postprocess"]),
        },
        "training": {
            "config": copy.deepcopy(cfg),
            "data": data,
            "steps": total,
            "init": None if init is None else str(init),
            "device": str(device),
            "teacher_counts": state["teacher_counts"],
            "seconds": state["seconds"],
            "curves": {stage: state["curve"]},
        },
        "metrics": {},
    }
    networks = {r: (classes[r], kwargs[r], nets[r].eval()) for r in roles}
    if val:
        t0 = time.monotonic()
        model = LoadedModel(out, meta, {r: nets[r] for r in roles})
        meta["metrics"] = {"val": validate(model, dataset, val, cfg, device, progress)}
        state["seconds"]["validate"] = round(time.monotonic() - t0, 2)
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def validate(model, dataset, cases, cfg=None, device="cpu", progress=None) -> dict:
    """Liver metrics of ``model`` on store cases that have a mask: {"cases", "summary"}."""
    from ...evaluation.metrics import GlobalSums, case_metrics, summarize

    cfg = cfg or {"phase": None}
    accum, per_case = GlobalSums(), {}
    for n, case in enumerate(cases):
        image = dataset.read_image(case.id, _phase_of(case, cfg))
        result = segment(model, {"image": image}, device=device)
        truth = (dataset.read_mask(case.id).array >= 1).astype(np.uint8)     # tumour is liver here
        per_case[case.id] = case_metrics(result.labels.array, truth, image.spacing, labels={"liver": 1}, accum=accum)
        if progress is not None:
            progress.update("validate", n + 1, len(cases))
    return {"cases": per_case, "summary": summarize(per_case, accum)}
