"""Recipe ``wsts``: an enhanced-phase teacher (DDRL + USSE) teaching a non-enhanced-phase student (SDDRL + SDUNet).

Weakly-supervised teacher-student network for liver tumour segmentation from non-enhanced
images (../shared/papers/wsts_weakly_supervised_teacher_student_nonenhanced_mri.txt).
Training needs both phases of every case ("enhanced" and "plain" in the store); ``segment``
reads the plain (non-enhanced) phase only.

Training (the paper's three steps, section 4.2), per 2D slice on an in-plane working grid:

1. ``detector``: DDRL (two relative-entropy-biased SAC agents, ``rl_boxes``) explores the
   enhanced slices holding a tumour box (pixel-labelled cases: boxes from their masks;
   box-labelled cases: their boxes) and learns to move a box onto the tumour (reward Eq. 11
   from the box label).  SDDRL, the same pair of agents on the plain slices, learns at the same
   time from the teacher's transitions (same actions and rewards, plain-phase states).
2. ``usse``: the teacher's mean teacher (``usse``) on the enhanced slices with a tumour, input =
   slice + DDRL detection box (with location / size noise), Dice on the pixel-labelled cases
   and uncertainty-sifted self-consistency on all; its target model then gives pseudo tumour
   masks of the box-labelled cases on the slices their boxes mark (other slices: no tumour).
3. ``student``: SDUNet (a Dense U-Net) on the plain slices, input = slice + SDDRL detection box
   (hard attention, with the same noise), loss Eq. 21: Dice with the masks (pixel cases) +
   ramped ``gamma'`` x Dice with the USSE pseudo masks (box cases).

Inference (plain phase only): SDDRL detects a box on every slice, SDUNet segments; tumour =
probability > 0.75 (the paper's threshold).

Additions / deviations (all config fields), mostly for a CPU budget:

* The student also predicts the liver (a second sigmoid channel, Dice on the pixel-labelled
  cases only; the paper segments tumours only), so the output is a full 0/1/2 label map;
  post-processing as in ``o2l`` (largest liver component, holes filled, tumour inside the liver).
* ``usse.bce`` / ``student.bce`` (1.0) add pixel cross-entropy to the Dice losses of Eq. 18 and
  Eq. 21.  With Dice alone and the box as hard attention, short runs settle on "tumour = the
  whole box" on every slice (tumour-free ones included): recall ~100 %, Dice ~5 % on whole
  volumes, and pseudo masks as large as the box.  0 restores the paper's losses.
* ``network.tumour_prior`` (0.01): USSE's and the student's tumour outputs start at that probability
  (``dense_unet.set_output_prior``).  Started near 0.5, 3 of 12 phantom students (one cached detector,
  different student seeds / variants) scored tumour Dice 0 at 0.75; the two inspected had every tumour
  head weight negative, their probability capped at 0.40 / 0.70.  With the prior the same seeds scored
  0.72 / 0.70 (all pixel-labelled) and 0.38 (pixel half alone).
* Adam for the segmentation networks (the paper: SGD), learning rate x ``lr_decay`` (0.8)
  ``lr_decays`` times over a stage, never below 1e-6.  Steps, not epochs.
* The RL grid is ``detector.size`` pixels (the paper: 256); box, step and scale sizes are
  given in pixels of a 256-pixel image (the paper's 24, 6, 4) and scaled to that grid.
  The agents see a box-centred view of the paper's state, share one small CNN per agent
  (the paper: three ResNet-18s), ``detector.reward_scale`` softens Eq. 11's exponent,
  ``detector.imitation`` adds behaviour cloning to SDDRL, ``detector.random_starts`` starts half
  the training episodes off the fixed start boxes: see ``rl_boxes``.  Discount 0.9 and student
  learning rate 1e-3 instead of the paper's 0.99 and 1e-4 (short runs); a fixed temperature
  0.05 instead of the paper's 1.0 (an entropy bonus of that size drowns Eq. 11's rewards; tuned
  automatically it collapsed and the boxes shrank to a pixel).
* ``usse.attention`` = ``label`` (default): on slices that carry a box label (every tumour
  slice of the training cases) USSE is trained and pseudo-labels with that box -- the one the
  radiologist drew, with the same location / size noise -- instead of the DDRL proposal
  (``detection``, the paper).  On a CPU budget the detectors reach IoU 0.07 (DDRL) to 0.18 (one
  agent) with the true box (docs/results/wsts_experiments.md), and pseudo masks drawn inside such
  proposals taught the student that box cases hold no tumour.  The student and inference still use SDDRL proposals.
* Slices with no tumour box are part of the student's training (the paper trains and tests on
  tumour slices only): the SDDRL box lands somewhere there and SDUNet learns to ignore it.
* ``hu_window`` per phase: the non-enhanced tumour contrast is a few HU, so the plain phase
  gets a narrower window than the enhanced one.
* A 3D variant of the detector (6 actions) is not implemented.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ... import __version__
from ...data.boxes import boxes_from_mask
from ...learn.config import merge_config
from ...errors import InputError
from ...learn.modelstore import LoadedModel, save_model
from .dense_unet import DenseUNet2D, set_output_prior
from ...learn.postprocess import postprocess
from .rl_boxes import BoxEnv, DetectorTrainer, SACSettings, detect, iou, jitter_boxes
from ...learn.slices import image_to_working, labels_to_working, lesion_boxes_for_slices, resize_slices, slice_groups
from ...learn.training import SegmentResult, check_cancelled, open_run, scale_steps
from .usse import UNCERTAINTY_KINDS, MeanTeacher, add_noise, ramp_up, seg_loss, with_attention

NAME = "wsts"
RECIPE_VERSION = 2                 # 2: the agents see a wide view and a glimpse (4 state channels)
LABELS = {"background": 0, "liver": 1, "tumor": 2}
PHASES = {"train": ("enhanced", "plain"), "inference": ("plain",)}
NETWORK_CLASS = "DenseUNet2D"
POLICY_CLASS = "BoxPolicy2D"
USSE_ATTENTION = ("label", "detection")

DEFAULTS = {
    "steps": None,                 # total optimisation steps over the three stages, scaled; None = their own
    "seed": 0,
    "teacher_phase": "enhanced",
    "student_phase": "plain",
    "hu_window": {"enhanced": [-200.0, 250.0], "plain": [-100.0, 200.0]},
    "spacing_mm": 1.5,             # in-plane working spacing (slices stay native)
    "context": 0,                  # slices on each side given to the segmentation networks (0 = the paper's 2D)
    "threshold": 0.75,             # tumour probability threshold (the paper)
    "liver_threshold": 0.5,
    "postprocess": True,
    "infer_batch": 16,
    "checkpoint_every": 100,
    "box_noise": {"shift": 0.1, "scale": [0.9, 1.2]},   # proposal noise of steps 2 and 3 (x side)
    "network": {"stem": 16, "growth": 8, "layers": 3, "levels": 3, "dropout": 0.1,
                "tumour_prior": 0.01},     # initial tumour probability of USSE and the student (set_output_prior)
    "detector": {
        "agents": 2,               # 2 = DDRL; 1 = a single agent (the comparison)
        "relative_entropy": 1.0,   # weight of KL(pi_i || pi_j) in Eq. 12 (0 = two independent SAC agents)
        "size": 64,                # RL grid (pixels); the paper: 256
        "px_reference": 256,       # the pixel sizes below are of an image this wide
        "init_box_px": 24.0, "translate_px": 6.0, "scale_px": 4.0,
        "episode_steps": 35,
        "reward_scale": 0.5,       # d / (reward_scale * size) in Eq. 11's exponent (see rl_boxes); <= ~1, or
                                   # creeping towards the tumour out-earns reaching it
        "steps": 1500,             # update rounds (each: one step of every parallel episode, then every agent in turn)
        "envs": 8,                 # parallel episodes
        "batch": 80, "memory": 20000,
        "updates": 1,              # gradient rounds per environment step (update-to-data ratio); 4 with zeta 0.01 and a
                                   # fixed alpha 0.01 lifted a 10-case phantom's test IoU from ~0 to ~0.1 (one seed): not default
        "lr": 1e-3, "student_lr": 1e-3,   # the paper: 1e-3 teacher, 1e-4 student (too slow for a short run)
        "alpha": 0.05, "auto_alpha": False, "alpha_lr": 1e-3,   # fixed temperature: see the module docstring
        "random_starts": 0.5,      # share of training episodes starting off the fixed starts (exploring starts)
        "zeta": 0.9,               # the paper: 0.99; 0.9 propagates values faster in a short run
        "tau": 0.01, "kl_clip": 5.0,
        "imitation": 1.0,          # SDDRL behaviour-cloning weight (0 = pure SAC on the teacher's transitions)
        "width": 16, "features": 128,
    },
    "usse": {
        "steps": 600, "batch": 8, "lr": 1e-3, "lr_decay": 0.8, "lr_decays": 10,
        "ema": 0.99, "noise_std": 0.05, "noise_clip": 0.1, "consistency": 1.0,
        "uncertainty": "multiscale",   # multiscale (USSE) | none (plain self-ensembling)
        "attention": "label",          # USSE attention box on labelled slices: label (the case's own box, with the box
                                       # noise) | detection (the DDRL proposal, the paper)
        "rampup": 0.5, "warmup": 0.5,  # fractions of the stage for gamma and beta'
        "labelled_fraction": 0.5,      # share of pixel-labelled slices in a batch (when both kinds exist)
        "bce": 1.0,                    # cross-entropy weight beside the Dice loss (0 = the paper's Dice only)
    },
    "student": {
        "steps": 1200,                 # the box channel slows learning: at 400 steps the phantom study's all-pixel
                                       # student scored tumour Dice 0.07, at 1200 0.69
        "batch": 8, "lr": 1e-3, "lr_decay": 0.8, "lr_decays": 10,
        "noise_std": 0.02, "noise_clip": 0.1,
        "rampup": 0.5,                 # fraction of the stage for gamma'
        "box_weight": 1.0,             # gamma' at the end of the ramp-up
        "tumour_fraction": 0.5,        # share of slices drawn from tumour slices
        "bce": 1.0,                    # cross-entropy weight beside the Dice losses (0 = the paper's Eq. 21)
        "pseudo": "hard",              # USSE pseudo masks as targets: hard (probability > 0.5) | soft (the probabilities;
                                       # 8+8 phantom students at 0.75, before tumour_prior: soft 0.57 / 0.00,
                                       # hard 0.63 / 0.51, seeds 0 / 1)
    },
}


# ----------------------------------------------------------------------------- config


def _check_config(cfg: dict) -> None:
    where = "--config/--set"

    def positive(path, value, integer=False, zero=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
        if integer:
            ok = ok and isinstance(value, int)
        if not ok:
            kind = "integer" if integer else "number"
            raise InputError(f"{where}: {path} must be a {'non-negative' if zero else 'positive'} {kind}, got {value!r}")

    if cfg["teacher_phase"] == cfg["student_phase"]:
        raise InputError(f"{where}: teacher_phase and student_phase must differ (both {cfg['teacher_phase']!r})")
    for phase in (cfg["teacher_phase"], cfg["student_phase"]):
        win = cfg["hu_window"].get(phase)
        if not (isinstance(win, list) and len(win) == 2 and all(isinstance(v, (int, float)) for v in win) and win[0] < win[1]):
            raise InputError(f"{where}: hu_window.{phase} must be [low, high] with low < high, got {win!r}")
    positive("spacing_mm", cfg["spacing_mm"])
    positive("context", cfg["context"], integer=True, zero=True)
    for key in ("infer_batch", "checkpoint_every"):
        positive(key, cfg[key], integer=True)
    for key in ("threshold", "liver_threshold"):
        if not (isinstance(cfg[key], (int, float)) and 0 < cfg[key] < 1):
            raise InputError(f"{where}: {key} must be between 0 and 1, got {cfg[key]!r}")
    d = cfg["detector"]
    if d["agents"] not in (1, 2):
        raise InputError(f"{where}: detector.agents must be 1 or 2, got {d['agents']!r}")
    for key in ("size", "episode_steps", "envs", "batch", "memory", "width", "features", "px_reference", "updates"):
        positive(f"detector.{key}", d[key], integer=True)
    for key in ("init_box_px", "translate_px", "scale_px", "reward_scale", "lr", "student_lr", "alpha", "alpha_lr",
                "zeta", "tau", "kl_clip"):
        positive(f"detector.{key}", d[key])
    for key in ("relative_entropy", "imitation"):
        positive(f"detector.{key}", d[key], zero=True)
    if d["memory"] < d["batch"]:
        raise InputError(f"{where}: detector.memory ({d['memory']}) must hold at least one batch ({d['batch']})")
    for stage in ("detector", "usse", "student"):
        positive(f"{stage}.steps", cfg[stage]["steps"], integer=True, zero=True)
    for stage in ("usse", "student"):
        s = cfg[stage]
        positive(f"{stage}.batch", s["batch"], integer=True)
        positive(f"{stage}.lr", s["lr"])
        positive(f"{stage}.lr_decays", s["lr_decays"], integer=True, zero=True)
        positive(f"{stage}.bce", s["bce"], zero=True)
        if not 0 < s["lr_decay"] <= 1:
            raise InputError(f"{where}: {stage}.lr_decay must be in (0, 1], got {s['lr_decay']!r}")
    if cfg["student"]["pseudo"] not in ("soft", "hard"):
        raise InputError(f"{where}: student.pseudo must be 'soft' or 'hard', got {cfg['student']['pseudo']!r}")
    if cfg["usse"]["attention"] not in USSE_ATTENTION:
        raise InputError(f"{where}: usse.attention {cfg['usse']['attention']!r} is not one of {list(USSE_ATTENTION)}")
    if not 0 <= d["random_starts"] <= 1:
        raise InputError(f"{where}: detector.random_starts must be in [0, 1], got {d['random_starts']!r}")
    if cfg["usse"]["uncertainty"] not in UNCERTAINTY_KINDS:
        raise InputError(f"{where}: usse.uncertainty {cfg['usse']['uncertainty']!r} is not one of {list(UNCERTAINTY_KINDS)}")
    net = cfg["network"]
    for key in ("stem", "growth", "layers", "levels"):
        positive(f"network.{key}", net[key], integer=True)
    if not (isinstance(net["tumour_prior"], (int, float)) and 0 < net["tumour_prior"] < 1):
        raise InputError(f"{where}: network.tumour_prior must be between 0 and 1, got {net['tumour_prior']!r}")
    if not 0 <= net["dropout"] < 1:
        raise InputError(f"{where}: network.dropout must be in [0, 1), got {net['dropout']!r}")
    lo, hi = cfg["box_noise"]["scale"]
    if not 0 < lo <= hi:
        raise InputError(f"{where}: box_noise.scale must be [low, high] with 0 < low <= high")


def resolve_config(config: dict | None) -> dict:
    """DEFAULTS merged with the user's settings, validated, stage steps scaled to ``steps``."""
    cfg = merge_config(DEFAULTS, config or {}, where="--config/--set")
    _check_config(cfg)
    stages = scale_steps({k: cfg[k]["steps"] for k in ("detector", "usse", "student")}, cfg["steps"])
    for key, value in stages.items():
        cfg[key]["steps"] = value
    return cfg


def box_env(cfg: dict) -> BoxEnv:
    d = cfg["detector"]
    k = d["size"] / d["px_reference"]
    return BoxEnv(size=d["size"], init_box=d["init_box_px"] * k, translate=d["translate_px"] * k,
                  scale=d["scale_px"] * k, episode_steps=d["episode_steps"], reward_scale=d["reward_scale"] * d["size"])


def stage_lr(scfg: dict, step: int, total: int) -> float:
    """``lr`` x ``lr_decay`` ** (decays so far), ``lr_decays`` decays spread evenly over the stage, >= 1e-6."""
    n = int(scfg["lr_decays"])
    done = 0 if n == 0 or total <= 0 else min(n, int(step * (n + 1) / total))
    return max(1e-6, float(scfg["lr"]) * float(scfg["lr_decay"]) ** done)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- data


@dataclass
class WCase:
    """One case on the working grid: images per phase, targets, per-slice tumour boxes (working pixels)."""
    id: str
    kind: str                                   # pixel | box | test
    images: dict                                # phase -> (z, h, w) float32 in [0, 1]
    tumour: np.ndarray | None = None            # (z, h, w) float32 target (pixel cases)
    liver: np.ndarray | None = None             # liver incl. tumour (pixel cases)
    boxes: dict = field(default_factory=dict)   # slice -> (n, 4) (cx, cy, w, h)
    pseudo: np.ndarray | None = None            # USSE tumour probability (box cases)
    det: dict = field(default_factory=dict)     # role -> (z, 4) detection boxes, working pixels

    @property
    def shape(self) -> tuple:
        return next(iter(self.images.values())).shape

    @property
    def tumour_slices(self) -> np.ndarray:
        return np.array(sorted(self.boxes), np.int64)

    def dominant(self, k: int) -> np.ndarray:
        """The largest tumour box of slice k (the paper labels the dominant lesion)."""
        b = self.boxes[k]
        return b[int(np.argmax(b[:, 2] * b[:, 3]))]


def _box_to_work(box, shape_zyx, work_hw) -> tuple:
    """Store box (inclusive voxel indices) -> (k range, (cx, cy, w, h) on the working grid)."""
    nz, ny, nx = shape_zyx
    h, w = work_hw
    x0, x1 = box.ijk_min[0] * w / nx, (box.ijk_max[0] + 1) * w / nx
    y0, y1 = box.ijk_min[1] * h / ny, (box.ijk_max[1] + 1) * h / ny
    k0, k1 = max(box.ijk_min[2], 0), min(box.ijk_max[2], nz - 1)
    return range(k0, k1 + 1), np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], np.float32)


def slice_boxes(tumour_boxes, shape_zyx, work_hw) -> dict:
    """Store tumour boxes -> {slice: (n, 4) working-grid boxes}; 3D boxes cover every slice of their range."""
    out = {}
    for box in tumour_boxes:
        ks, b = _box_to_work(box, shape_zyx, work_hw)
        for k in ks:
            out.setdefault(int(k), []).append(b)
    return {k: np.stack(v) for k, v in out.items()}


def prepare_case(case_id: str, images: dict, cfg: dict, kind: str, labels=None, tumour_boxes=()) -> WCase:
    """Volumes (phase -> Volume, same grid) -> WCase.  ``labels`` (0/1/2 array) for pixel cases; else store boxes."""
    work = {}
    for phase, vol in images.items():
        work[phase] = image_to_working(vol.array, vol.spacing[:2], cfg["spacing_mm"], cfg["hu_window"][phase])
    ref = next(iter(images.values()))
    size = next(iter(work.values())).shape[1:]
    case = WCase(case_id, kind, work)
    if labels is not None:
        probs = labels_to_working(labels, size)
        case.tumour = probs[:, 2].copy()
        case.liver = (probs[:, 1] + probs[:, 2]).copy()
        tumour_boxes = boxes_from_mask(labels, 2, per_slice=True)
    case.boxes = slice_boxes(tumour_boxes, ref.array.shape, size)
    return case


def _phase_volumes(dataset, case, phases) -> dict:
    missing = [p for p in phases if p not in case.images]
    if missing:
        raise InputError(f"{case.id}: recipe wsts needs the image phases {list(phases)}; this case has "
                         f"{sorted(case.images)} (missing {missing})")
    vols = {p: dataset.read_image(case.id, p) for p in phases}
    ref = vols[phases[0]]
    for p, v in vols.items():
        if v.array.shape != ref.array.shape:
            raise InputError(f"{case.id}: phase {p!r} grid {v.array.shape} differs from {phases[0]!r} {ref.array.shape}")
    return vols


def select_cases(dataset, cfg) -> tuple:
    """(pixel cases, box cases, val cases) of the store: train split with a mask / with boxes only."""
    pixel = dataset.cases_with("mask", split="train")
    box = [c for c in dataset.cases_with("boxes", split="train") if c.mask is None]
    val = dataset.cases_with("mask", split="val")
    return pixel, box, val


def load_cases(dataset, cases, kind, cfg, progress=None, offset=0, total=None) -> list:
    phases = (cfg["teacher_phase"], cfg["student_phase"])
    out = []
    for n, case in enumerate(cases):
        check_cancelled(progress)
        vols = _phase_volumes(dataset, case, phases)
        labels = dataset.read_mask(case.id).array if kind == "pixel" else None
        tumours = [] if labels is not None else lesion_boxes_for_slices(case.boxes)
        out.append(prepare_case(case.id, vols, cfg, kind, labels=labels, tumour_boxes=tumours))
        if progress is not None:
            progress.update("prepare", offset + n + 1, total or len(cases))
    return out


# ----------------------------------------------------------------------------- RL data


def to_rl(images_zhw: np.ndarray, size: int) -> np.ndarray:
    """(z, h, w) working slices -> (z, size, size) on the RL grid."""
    return resize_slices(torch.from_numpy(np.ascontiguousarray(images_zhw))[:, None], (size, size))[:, 0].numpy()


def rl_scale(case: WCase, size: int) -> np.ndarray:
    """Multiply (cx, cy, w, h) working boxes by this to get RL-grid boxes."""
    h, w = case.shape[1:]
    return np.array([size / w, size / h, size / w, size / h], np.float32)


def rl_slices(cases, phases, size: int) -> tuple:
    """Every tumour slice of the cases -> ({phase: (S, size, size)}, targets (S, 4) RL grid, [(case index, slice)])."""
    stacks = {p: [] for p in phases}
    targets, where = [], []
    for ci, case in enumerate(cases):
        ks = case.tumour_slices
        if not len(ks):
            continue
        for p in phases:
            stacks[p].append(to_rl(case.images[p][ks], size))
        scale = rl_scale(case, size)
        for k in ks:
            targets.append(case.dominant(int(k)) * scale)
            where.append((ci, int(k)))
    if not targets:
        return None, None, []
    return {p: np.concatenate(v) for p, v in stacks.items()}, np.stack(targets).astype(np.float32), where


def make_detector(cfg, rl_images, targets, rng, device, act_phase, imitate_phase) -> DetectorTrainer:
    d = cfg["detector"]
    settings = SACSettings(zeta=d["zeta"], tau=d["tau"], relative_entropy=float(d["relative_entropy"]),
                           kl_clip=d["kl_clip"], auto_alpha=bool(d["auto_alpha"]))
    student = SACSettings(zeta=d["zeta"], tau=d["tau"], relative_entropy=float(d["relative_entropy"]),
                          kl_clip=d["kl_clip"], auto_alpha=bool(d["auto_alpha"]), imitation=float(d["imitation"]))
    return DetectorTrainer(rl_images, targets, box_env(cfg), d["agents"], settings, rng, act_phase, imitate_phase,
                           lr=d["lr"], student_lr=d["student_lr"], memory=d["memory"], batch=d["batch"],
                           n_envs=d["envs"], width=d["width"], features=d["features"], alpha=d["alpha"],
                           alpha_lr=d["alpha_lr"], device=device, student_settings=student, updates=d["updates"],
                           random_starts=d["random_starts"])


def detector_round(detector: DetectorTrainer, cfg: dict, step: int, total: int) -> dict:
    """One detector training round: learning rates x 0.8 every tenth of the stage, one environment step, updates."""
    d = cfg["detector"]
    decay = 0.8 ** min(9, int(step / max(total, 1) * 10))
    detector.set_lr(max(1e-6, d["lr"] * decay), max(1e-6, d["student_lr"] * decay))
    reward = detector.env_step()
    logs = detector.update(step)
    logs["reward"] = reward
    return logs


def detect_case(policies, case: WCase, phase: str, env: BoxEnv, device="cpu") -> np.ndarray:
    """Union box of the agents on every slice of ``case`` -> (z, 4) in working pixels."""
    img = torch.from_numpy(to_rl(case.images[phase], env.size)).to(device)
    union, _ = detect(policies, img, env)
    return union / rl_scale(case, env.size)


def detection_iou(policies, cases, phase, env, device="cpu") -> dict:
    """Mean IoU / recall of the detection with the dominant tumour box over the cases' tumour slices."""
    from .rl_boxes import box_recall

    ious, recalls = [], []
    for case in cases:
        ks = case.tumour_slices
        if not len(ks):
            continue
        img = torch.from_numpy(to_rl(case.images[phase][ks], env.size)).to(device)
        union, _ = detect(policies, img, env)
        target = np.stack([case.dominant(int(k)) for k in ks]) * rl_scale(case, env.size)
        ious.append(iou(union, target))
        recalls.append(box_recall(union, target))
    if not ious:
        return {"iou": None, "recall": None, "slices": 0}
    ious, recalls = np.concatenate(ious), np.concatenate(recalls)
    return {"iou": float(ious.mean()), "recall": float(recalls.mean()), "slices": int(len(ious))}


def usse_boxes(case: WCase, attention: str) -> np.ndarray:
    """(z, 4) USSE attention boxes: the DDRL detections, or (``label``) the case's own tumour box where a slice has one."""
    boxes = case.det["teacher"].copy()
    if attention == "label":
        for k in case.boxes:
            boxes[k] = case.dominant(int(k))
    return boxes


# ----------------------------------------------------------------------------- segmentation samples


def _inputs(case: WCase, phase: str, ks, context: int) -> np.ndarray:
    """(B, 2c+1, h, w) slice groups of one case."""
    return slice_groups(case.images[phase], np.asarray(ks), context)


def _jitter(boxes, rng, cfg, case):
    h, w = case.shape[1:]
    b = jitter_boxes(boxes, rng, cfg["box_noise"]["shift"], cfg["box_noise"]["scale"])
    b[:, 0] = np.clip(b[:, 0], 0, w)
    b[:, 1] = np.clip(b[:, 1], 0, h)
    return b


def _group_by_shape(items):
    """Batches must share a slice size: keep only the items whose case has the first item's size."""
    shape = items[0][0].shape[1:]
    return [it for it in items if it[0].shape[1:] == shape]


def sample_usse_batch(cases, cfg, rng, phase, device) -> dict:
    """Tumour slices (pixel-labelled share ``labelled_fraction``) with their jittered teacher detection boxes."""
    ucfg = cfg["usse"]
    pixel = [c for c in cases if c.kind == "pixel" and len(c.tumour_slices)]
    box = [c for c in cases if c.kind == "box" and len(c.tumour_slices)]
    items = []
    for _ in range(ucfg["batch"]):
        pool = pixel if (not box or (pixel and rng.random() < ucfg["labelled_fraction"])) else box
        case = pool[int(rng.integers(len(pool)))]
        k = int(case.tumour_slices[int(rng.integers(len(case.tumour_slices)))])
        items.append((case, k))
    items = _group_by_shape([(c, k) for c, k in items])
    ks_img = np.concatenate([_inputs(c, phase, [k], cfg["context"]) for c, k in items])
    boxes = np.concatenate([_jitter(c.det["usse"][[k]], rng, cfg, c) for c, k in items])
    target = np.stack([c.tumour[k] if c.kind == "pixel" else np.zeros(c.shape[1:], np.float32) for c, k in items])
    return {"image": torch.from_numpy(ks_img).to(device), "box": boxes,
            "target": torch.from_numpy(target[:, None]).to(device),
            "labelled": torch.tensor([c.kind == "pixel" for c, _ in items], device=device)}


def sample_student_batch(cases, cfg, rng, phase, device) -> dict:
    """Slices (``tumour_fraction`` from tumour slices) with jittered SDDRL boxes, masks or pseudo masks."""
    scfg = cfg["student"]
    items = []
    for _ in range(scfg["batch"]):
        case = cases[int(rng.integers(len(cases)))]
        ts = case.tumour_slices
        if len(ts) and rng.random() < scfg["tumour_fraction"]:
            k = int(ts[int(rng.integers(len(ts)))])
        else:
            k = int(rng.integers(case.shape[0]))
        items.append((case, k))
    items = _group_by_shape(items)
    img = np.concatenate([_inputs(c, phase, [k], cfg["context"]) for c, k in items])
    boxes = np.concatenate([_jitter(c.det["student"][[k]], rng, cfg, c) for c, k in items])
    tumour, liver, is_pixel = [], [], []
    for c, k in items:
        zero = np.zeros(c.shape[1:], np.float32)
        if c.kind == "pixel":
            tumour.append(c.tumour[k]); liver.append(c.liver[k]); is_pixel.append(True)
        else:
            pseudo = zero if c.pseudo is None else c.pseudo[k]
            if scfg["pseudo"] == "hard":
                pseudo = (pseudo > 0.5).astype(np.float32)
            tumour.append(pseudo); liver.append(zero); is_pixel.append(False)
    t = lambda a: torch.from_numpy(np.stack(a)[:, None]).to(device)  # noqa: E731
    return {"image": torch.from_numpy(img).to(device), "box": boxes, "tumour": t(tumour), "liver": t(liver),
            "pixel": torch.tensor(is_pixel, device=device)}


def student_loss(logits: torch.Tensor, batch: dict, gamma: float, bce: float = 0.0) -> tuple:
    """Eq. 21: Dice(tumour, mask) + liver Dice on pixel-labelled slices + gamma' Dice(tumour, pseudo) on box slices.

    ``bce`` > 0 adds that weight of pixel cross-entropy to every term (``usse.seg_loss``)."""
    logits = logits.float()
    pix, box = batch["pixel"], ~batch["pixel"]
    lp = torch.zeros((), device=logits.device)
    lb = torch.zeros((), device=logits.device)
    if bool(pix.any()):
        lp = seg_loss(logits[pix, 1:2], batch["tumour"][pix], bce) + seg_loss(logits[pix, 0:1], batch["liver"][pix], bce)
    if bool(box.any()):
        lb = seg_loss(logits[box, 1:2], batch["tumour"][box], bce)
    return lp + gamma * lb, float(lp.detach()), float(lb.detach())


# ----------------------------------------------------------------------------- networks


def net_kwargs(cfg: dict, role: str) -> dict:
    """``usse``: image slices + box map -> tumour; ``student``: image slices + box map -> (liver, tumour)."""
    n = cfg["network"]
    return {"in_channels": 2 * cfg["context"] + 2, "out_channels": 1 if role == "usse" else 2,
            "stem": n["stem"], "growth": n["growth"], "layers": n["layers"], "levels": n["levels"],
            "dropout": n["dropout"]}


def make_net(cfg: dict, role: str) -> DenseUNet2D:
    """A new USSE / student network, its tumour output started at ``network.tumour_prior``."""
    net = DenseUNet2D(**net_kwargs(cfg, role))
    set_output_prior(net.head, 0 if role == "usse" else 1, cfg["network"]["tumour_prior"])
    return net


# ----------------------------------------------------------------------------- pipeline pieces


def pseudo_labels(teacher: MeanTeacher, cases, cfg, phase, device, batch=16) -> None:
    """USSE target model on the box-labelled slices of the box cases -> ``case.pseudo`` (0 on unmarked slices)."""
    for case in cases:
        if case.kind != "box":
            continue
        case.pseudo = np.zeros(case.shape, np.float32)
        ks = case.tumour_slices
        if not len(ks):
            continue
        img = torch.from_numpy(_inputs(case, phase, ks, cfg["context"])).to(device)
        probs = teacher.predict(img, case.det["usse"][ks], batch)
        case.pseudo[ks] = probs[:, 0].cpu().numpy()


@torch.no_grad()
def predict_case(net: nn.Module, policies, images_zhw: np.ndarray, cfg_like: dict, env: BoxEnv, device="cpu",
                 batch: int = 16, boxes_w: np.ndarray | None = None) -> tuple:
    """Plain-phase working volume -> (probabilities (z, C, h, w), detection boxes (z, 4) working pixels)."""
    dev = torch.device(device)
    h, w = images_zhw.shape[1:]
    if boxes_w is None:
        img_rl = torch.from_numpy(to_rl(images_zhw, env.size)).to(dev)
        union, _ = detect(policies, img_rl, env)
        boxes_w = union / np.array([env.size / w, env.size / h, env.size / w, env.size / h], np.float32)
    net = net.to(dev).eval()
    out = []
    nz = images_zhw.shape[0]
    for z0 in range(0, nz, batch):
        ks = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(slice_groups(images_zhw, ks, cfg_like["context"])).to(dev)
        out.append(torch.sigmoid(net(with_attention(x, boxes_w[ks])).float()).cpu().numpy())
    return np.concatenate(out), boxes_w


def labels_from_probs(probs_w: np.ndarray, shape_zyx, threshold: float, liver_threshold: float,
                      do_postprocess: bool = True) -> tuple:
    """Working-grid (z, 2, h, w) sigmoid maps [liver, tumour] -> (labels, tumour prob, entropy) on the input grid."""
    nz, ny, nx = shape_zyx
    p = resize_slices(torch.from_numpy(np.ascontiguousarray(probs_w)), (ny, nx)).numpy()
    liver, tumour = p[:, 0], p[:, 1]
    labels = (liver > liver_threshold).astype(np.uint8)
    labels[tumour > threshold] = 2
    if do_postprocess:
        labels = postprocess(labels)
    t = np.clip(tumour, 1e-6, 1 - 1e-6)
    entropy = -(t * np.log(t) + (1 - t) * np.log(1 - t))
    return labels, tumour.astype(np.float32), entropy.astype(np.float32)


# ----------------------------------------------------------------------------- train


class _Stages:
    """The three training stages over a list of WCases, shared by ``train`` and the experiment script."""

    def __init__(self, cfg: dict, cases: list, device="cpu", progress=None, rng=None, detector=None):
        self.cfg, self.cases, self.progress = cfg, cases, progress
        self.dev = torch.device(device)
        self.rng = rng if rng is not None else np.random.default_rng(int(cfg["seed"]))
        self.env = box_env(cfg)
        self.tp, self.sp = cfg["teacher_phase"], cfg["student_phase"]
        self.has_box = any(c.kind == "box" for c in cases)
        if detector is None:     # (the experiments pass one trained earlier on the same boxes)
            rl_images, targets, _ = rl_slices(cases, (self.tp, self.sp), self.env.size)
            if targets is None:
                raise InputError("no training slice with a tumour box: the detectors have nothing to learn from")
            detector = make_detector(cfg, rl_images, targets, self.rng, self.dev, self.tp, self.sp)
        self.detector = detector
        self.usse = None
        if self.has_box:
            online = make_net(cfg, "usse").to(self.dev)
            u = cfg["usse"]
            self.usse = MeanTeacher(online, torch.optim.Adam(online.parameters(), lr=u["lr"]), ema=u["ema"],
                                    noise_std=u["noise_std"], noise_clip=u["noise_clip"], consistency=u["consistency"],
                                    uncertainty=u["uncertainty"], rampup=u["rampup"], warmup=u["warmup"],
                                    bce=u["bce"])
        self.student = make_net(cfg, "student").to(self.dev)
        self.student_opt = torch.optim.Adam(self.student.parameters(), lr=cfg["student"]["lr"])
        self.curves = {}

    def modules(self) -> dict:
        out = dict(self.detector.modules())
        if self.usse is not None:
            out.update(usse_online=self.usse.online, usse_target=self.usse.target)
        out["student"] = self.student
        return out

    def optimizers(self) -> dict:
        out = {f"det_{k}": v for k, v in self.detector.opts.items()}
        if self.usse is not None:
            out["usse"] = self.usse.opt
        out["student"] = self.student_opt
        return out

    def _log(self, stage, step, total, logs, every=10):
        if step % every == 0 or step == total:
            self.curves.setdefault(stage, []).append([step] + [round(float(logs.get(k, 0.0)), 5) for k in sorted(logs)])
            self.curves.setdefault(stage + "_keys", sorted(logs))
        if self.progress is not None:
            self.progress.update(stage, step, total, loss=round(float(logs.get("loss", logs.get("t_q", 0.0))), 5))

    # -- stage 1
    def detector_step(self, step: int, total: int) -> dict:
        return detector_round(self.detector, self.cfg, step, total)

    def after_detector(self) -> None:
        """Detection boxes of every slice: teacher agents on the teacher phase, student agents on the student phase;
        the USSE attention boxes (``usse.attention``)."""
        for case in self.cases:
            case.det["teacher"] = detect_case(self.detector.policies("teacher"), case, self.tp, self.env, self.dev)
            if self.detector.student is not None:
                case.det["student"] = detect_case(self.detector.policies("student"), case, self.sp, self.env, self.dev)
            case.det["usse"] = usse_boxes(case, self.cfg["usse"]["attention"])

    # -- stage 2
    def usse_step(self, step: int, total: int) -> dict:
        _set_lr(self.usse.opt, stage_lr(self.cfg["usse"], step, total))
        batch = sample_usse_batch(self.cases, self.cfg, self.rng, self.tp, self.dev)
        return self.usse.step(batch, step, total)

    def after_usse(self) -> None:
        if self.usse is not None:
            pseudo_labels(self.usse, self.cases, self.cfg, self.tp, self.dev, self.cfg["infer_batch"])

    # -- stage 3
    def student_step(self, step: int, total: int) -> dict:
        s = self.cfg["student"]
        _set_lr(self.student_opt, stage_lr(s, step, total))
        self.student.train()
        batch = sample_student_batch(self.cases, self.cfg, self.rng, self.sp, self.dev)
        c = batch["image"].shape[1]
        x = add_noise(with_attention(batch["image"], batch["box"]), s["noise_std"], s["noise_clip"], c)
        gamma = s["box_weight"] * ramp_up(step, int(s["rampup"] * total))
        loss, lp, lb = student_loss(self.student(x), batch, gamma, s["bce"])
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.student_opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"student: loss became {value} at step {step + 1}")
        return {"loss": value, "pixel_dice_loss": lp, "box_dice_loss": lb, "gamma": gamma}

    def run(self, stage: str, total: int, start: int = 0, save=None, every: int = 100) -> None:
        step_fn = {"detector": self.detector_step, "usse": self.usse_step, "student": self.student_step}[stage]
        for step in range(start, total):
            check_cancelled(self.progress)
            logs = step_fn(step, total)
            self._log(stage, step + 1, total, logs)
            if save is not None and (step + 1) % every == 0 and step + 1 < total:
                save(stage, step + 1)
        if save is not None:
            save(stage, total)


STAGES = ("detector", "usse", "student")


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """DDRL + SDDRL -> USSE -> pseudo masks -> SDUNet; writes the model folder ``out``."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    if init is not None:
        raise InputError("--init: recipe wsts does not support fine-tuning from a model yet; train from scratch")
    ckpt, saved, _ = open_run(out, cfg, resume)

    pixel, box, val = select_cases(dataset, cfg)
    if not pixel:
        raise InputError(f"{dataset.root}: recipe wsts needs at least one pixel-labelled case (a mask, split train)")
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    total = len(pixel) + len(box)
    cases = load_cases(dataset, pixel, "pixel", cfg, progress, 0, total) + \
        load_cases(dataset, box, "box", cfg, progress, len(pixel), total)
    stages = _Stages(cfg, cases, device, progress, rng)
    data = {"dataset": str(dataset.root), "pixel": [c.id for c in pixel], "box": [c.id for c in box],
            "val": [c.id for c in val]}
    seconds = {}

    def save_ckpt(stage, step):
        ckpt.save(stage, step, stages.modules(), stages.optimizers(), rng,
                  extra={"config": cfg, "curves": stages.curves, "seconds": seconds})

    stage0, step0 = STAGES[0], 0
    if saved is not None:
        ckpt.restore(saved, stages.modules(), stages.optimizers(), rng)
        stages.curves = saved.meta["extra"].get("curves", {})
        seconds.update(saved.meta["extra"].get("seconds", {}))
        stage0, step0 = saved.stage, saved.step
        if progress is not None:
            progress.log(f"resuming from {stage0} step {step0}")
    every = cfg["checkpoint_every"]
    for stage in STAGES:
        done = STAGES.index(stage) < STAGES.index(stage0)   # trained before the interruption
        t0 = time.monotonic()
        steps = cfg[stage]["steps"] if (stage != "usse" or stages.usse is not None) else 0
        start = step0 if stage == stage0 else 0
        if not done and steps > 0 and start < steps:
            stages.run(stage, steps, start, save_ckpt, every)
        # the outputs of a stage (detection boxes, pseudo masks) are recomputed from its networks
        if stage == "detector":
            stages.after_detector()
        elif stage == "usse":
            stages.after_usse()
        seconds[stage] = round(seconds.get(stage, 0.0) + time.monotonic() - t0, 2)

    env = stages.env
    det = {"train_teacher": detection_iou(stages.detector.policies("teacher"), cases, stages.tp, env, device),
           "train_student": detection_iou(stages.detector.policies("student"), cases, stages.sp, env, device)}
    policy_kwargs = stages.detector.student[0].policy_kwargs()
    networks = {"student": (NETWORK_CLASS, net_kwargs(cfg, "student"), stages.student.eval())}
    for i, pi in enumerate(stages.detector.policies("student")):
        networks[f"student_agent{i + 1}"] = (POLICY_CLASS, policy_kwargs, pi.eval())
    meta = {
        "recipe": NAME, "recipe_version": RECIPE_VERSION, "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [cfg["teacher_phase"], cfg["student_phase"]],
            "inference_phases": [cfg["student_phase"]],
            "hu_window": list(cfg["hu_window"][cfg["student_phase"]]),
            "spacing_mm": [float(cfg["spacing_mm"])] * 2,
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
            "detector": {"agents": cfg["detector"]["agents"], "size": env.size, "init_box": env.init_box,
                         "translate": env.translate, "scale": env.scale, "episode_steps": env.episode_steps},
            "threshold": float(cfg["threshold"]), "liver_threshold": float(cfg["liver_threshold"]),
            "postprocess": bool(cfg["postprocess"]),
        },
        "training": {"config": copy.deepcopy(cfg), "data": data,
                     "steps": {k: cfg[k]["steps"] for k in STAGES}, "device": str(device),
                     "seconds": seconds, "curves": stages.curves, "detection": det},
        "metrics": {},
    }
    if val:
        model = LoadedModel(out, meta, {k: v[2] for k, v in networks.items()})
        meta["metrics"] = {"val": _validate(model, dataset, val, cfg, device, progress)}
    seconds["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def _validate(model, dataset, val, cfg, device, progress) -> dict:
    from ...evaluation.metrics import GlobalSums, case_metrics, summarize

    accum, per_case = GlobalSums(), {}
    for n, case in enumerate(val):
        image = dataset.read_image(case.id, cfg["student_phase"])
        result = segment(model, {cfg["student_phase"]: image}, device=device)
        per_case[case.id] = case_metrics(result.labels.array, dataset.read_mask(case.id).array, image.spacing,
                                         accum=accum)
        if progress is not None:
            progress.update("validate", n + 1, len(val))
    return {"cases": per_case, "summary": summarize(per_case, accum)}


# ----------------------------------------------------------------------------- segment


def _model_settings(meta: dict) -> dict:
    version = meta.get("recipe_version")
    if version != RECIPE_VERSION:
        raise InputError(f"model.json: recipe_version {version!r} of wsts; this software reads version {RECIPE_VERSION} "
                         "(the box agents' state changed): retrain the model")
    inp = meta.get("input", {})
    d = inp.get("detector", {})
    try:
        return {
            "phase": (inp.get("inference_phases") or ["plain"])[0],
            "hu_window": [float(v) for v in inp["hu_window"]],
            "spacing_mm": float(inp["spacing_mm"][0]),
            "context": int(inp.get("context_slices", 0)),
            "env": BoxEnv(size=int(d["size"]), init_box=float(d["init_box"]), translate=float(d["translate"]),
                          scale=float(d["scale"]), episode_steps=int(d["episode_steps"])),
            "agents": int(d["agents"]),
            "threshold": float(inp.get("threshold", 0.75)),
            "liver_threshold": float(inp.get("liver_threshold", 0.5)),
            "postprocess": bool(inp.get("postprocess", True)),
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"model.json input: incomplete wsts settings ({exc!r})") from None


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    """Segment liver and tumours from the non-enhanced phase alone (``images["plain"]``).

    Any other phase in ``images`` is ignored.  ``boxes`` (store tumour boxes on this grid),
    when given, replace the SDDRL detection on the slices they cover.
    """
    st = _model_settings(model.meta)
    phase = st["phase"]
    if phase in images:
        image = images[phase]
    elif len(images) == 1:
        image = next(iter(images.values()))
    else:
        raise InputError(f"--input: this wsts model reads the {phase!r} (non-enhanced) phase; got phases "
                         f"{sorted(map(str, images))}")
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    for name in ["student"] + [f"student_agent{i + 1}" for i in range(st["agents"])]:
        if name not in model.networks:
            raise InputError(f"{model.path}: wsts model lacks the network {name!r}")
    policies = [model.networks[f"student_agent{i + 1}"] for i in range(st["agents"])]
    work = image_to_working(image.array, image.spacing[:2], st["spacing_mm"], st["hu_window"])
    env = st["env"]
    h, w = work.shape[1:]
    img_rl = torch.from_numpy(to_rl(work, env.size)).to(device)
    union, _ = detect(policies, img_rl, env)
    boxes_w = union / np.array([env.size / w, env.size / h, env.size / w, env.size / h], np.float32)
    if boxes:
        given = slice_boxes([b for b in boxes if b.label != "liver"], image.array.shape, (h, w))
        for k, b in given.items():
            c = np.concatenate([b[:, 0:2] - b[:, 2:4] / 2, b[:, 0:2] + b[:, 2:4] / 2], axis=1)
            lo, hi = c[:, 0:2].min(axis=0), c[:, 2:4].max(axis=0)
            boxes_w[k] = np.concatenate([(lo + hi) / 2, hi - lo])
    if progress is not None:
        progress.update("detect", 1, 2)
    probs, _ = predict_case(model.networks["student"], policies, work, st, env, device, 16, boxes_w)
    if progress is not None:
        progress.update("detect", 2, 2)
    labels, tumour, entropy = labels_from_probs(probs, image.array.shape, st["threshold"], st["liver_threshold"],
                                                st["postprocess"])
    return SegmentResult(image.with_array(labels), image.with_array(tumour), image.with_array(entropy))
