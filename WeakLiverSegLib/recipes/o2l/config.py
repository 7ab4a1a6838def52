"""o2l settings: names, phases, DEFAULTS and their validation."""

from __future__ import annotations

import math

from ...errors import InputError
from ...learn.config import merge_config
from ...learn.networks.unet2d import ATTENTION_VARIANTS
from ...learn.slices import HU_WINDOW, N_CLASSES
from ...learn.training import scale_steps

NAME = "o2l"
RECIPE_VERSION = 1
NETWORK_CLASS = "BoxAttentionUNet2D"
LABELS = {"background": 0, "liver": 1, "tumor": 2}
# One image phase: the contrast-enhanced CT (any single phase works; ``config["phase"]`` picks it,
# default the reference phase of each case).
PHASES = {"train": ("enhanced",), "inference": ("enhanced",)}
STUDENT_VARIANTS = ("strong_only", "mixed", "mixed_loc", "full")
ANNOTATORS = ("trained", "litemedsam", "fused")

DEFAULTS = {
    "steps": None,               # total optimisation steps (teacher + student), scaled; None = the stages' own
    "seed": 0,
    "phase": None,               # image phase to train on; None = each case's reference phase
    "hu_window": list(HU_WINDOW),
    "spacing_mm": 1.5,           # in-plane working spacing (z stays native)
    "context": 1,                # slices on each side: 1 = three-slice groups
    "channels": [16, 32, 64, 128],
    "crop": 160,                 # training crop in working pixels (smaller images are used whole)
    "batch_size": 8,             # crops per step
    "groups_per_crop": 1,        # consecutive three-slice groups per crop (the paper: 4)
    "scale_range": [0.8, 1.2],
    "flip_prob": 0.5,
    "roi_prob": 0.8,
    "infer_batch": 8,            # three-slice groups per forward pass at inference
    "checkpoint_every": 50,
    "teacher": {
        "attention": "o2l",      # none | multichannel | o2l_noshortcut | o2l
        "steps": 300,
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
        "lr_decay_start": 0.85, "lr_decay": 0.95,
        "box_constraint": False, # clip pseudo-labels to the boxes (not in the paper)
        "dice_weight": 1.0,      # + weight x soft Dice loss (see the module docstring; 0 = the paper)
        "pseudo_temperature": 1.0,   # softmax^(1/T) renormalised; 1 = the paper's soft labels, < 1 sharper
        "annotator": "trained",  # who pseudo-labels the weak cases: trained (this teacher, the paper) |
                                 # litemedsam (LiteMedSAM's annotation of the boxes, one-hot) | fused (both averaged)
        "annotator_model": None, # LiteMedSAM model folder for litemedsam / fused; None = the pretrained one
    },
    "student": {
        "variant": "mixed_loc",  # strong_only | mixed | mixed_loc | full (upper bound: reads truth)
        "steps": 600,
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
        "lr_decay_start": 0.85, "lr_decay": 0.95,
        "dice_weight": 1.0,                      # + weight x soft Dice loss (see the module docstring)
        "loc_weight": 1.0,                       # alpha of Eq. 4
        "loc_class_weights": [0.1, 0.1, 1.0],    # background, liver box, lesion box
        "bn_recalibration": 0,   # batches to re-estimate the batch-norm statistics after training (0 = off)
    },
}


# ----------------------------------------------------------------------------- config


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_config(cfg: dict) -> None:
    where = "--config/--set"
    t, s = cfg["teacher"], cfg["student"]
    if t["attention"] not in ATTENTION_VARIANTS:
        raise InputError(f"{where}: teacher.attention {t['attention']!r} is not one of {list(ATTENTION_VARIANTS)}")
    if s["variant"] not in STUDENT_VARIANTS:
        raise InputError(f"{where}: student.variant {s['variant']!r} is not one of {list(STUDENT_VARIANTS)}")
    if not _number(cfg["spacing_mm"]) or not cfg["spacing_mm"] > 0:
        raise InputError(f"{where}: spacing_mm must be a positive number, got {cfg['spacing_mm']!r}")
    for key in ("context", "crop", "batch_size", "groups_per_crop", "infer_batch", "checkpoint_every"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "context" else 1):
            raise InputError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    for stage in ("teacher", "student"):
        st = cfg[stage]
        if not isinstance(st["steps"], int) or st["steps"] < 0:
            raise InputError(f"{where}: {stage}.steps must be an integer >= 0, got {st['steps']!r}")
        for key in ("dice_weight", "lr_decay", "lr_decay_start"):
            if not _number(st[key]) or st[key] < 0:
                raise InputError(f"{where}: {stage}.{key} must be a number >= 0, got {st[key]!r}")
        if not _number(st["lr"]) or not st["lr"] > 0:
            raise InputError(f"{where}: {stage}.lr must be a positive number, got {st['lr']!r}")
    if not (isinstance(cfg["channels"], list) and len(cfg["channels"]) == 4
            and all(isinstance(c, int) and c > 0 for c in cfg["channels"])):
        raise InputError(f"{where}: channels must be a list of 4 positive integers, got {cfg['channels']!r}")
    hw = cfg["hu_window"]
    if not (isinstance(hw, list) and len(hw) == 2 and all(map(_number, hw)) and hw[0] < hw[1]):
        raise InputError(f"{where}: hu_window must be [low, high] with low < high, got {cfg['hu_window']!r}")
    sr = cfg["scale_range"]
    if not (isinstance(sr, list) and len(sr) == 2 and all(map(_number, sr)) and 0 < sr[0] <= sr[1]):
        raise InputError(f"{where}: scale_range must be [low, high] with 0 < low <= high, got {sr!r}")
    for key in ("flip_prob", "roi_prob"):
        if not _number(cfg[key]) or not 0 <= cfg[key] <= 1:
            raise InputError(f"{where}: {key} must be a probability in [0, 1], got {cfg[key]!r}")
    if t["annotator"] not in ANNOTATORS:
        raise InputError(f"{where}: teacher.annotator {t['annotator']!r} is not one of {list(ANNOTATORS)}")
    if t["annotator_model"] is not None and not isinstance(t["annotator_model"], str):
        raise InputError(f"{where}: teacher.annotator_model must be a model folder path or null")
    if not (_number(t["pseudo_temperature"]) and t["pseudo_temperature"] > 0):
        raise InputError(f"{where}: teacher.pseudo_temperature must be a positive number")
    lw = s["loc_class_weights"]
    if not (isinstance(lw, list) and len(lw) == N_CLASSES and all(_number(w) and w >= 0 for w in lw)):
        raise InputError(f"{where}: student.loc_class_weights needs {N_CLASSES} numbers >= 0 (background, liver, lesion)")
    br = s["bn_recalibration"]
    if not isinstance(br, int) or isinstance(br, bool) or br < 0:
        raise InputError(f"{where}: student.bn_recalibration must be an integer >= 0 (batches), got {br!r}")
    if not _number(s["loc_weight"]) or s["loc_weight"] < 0:
        raise InputError(f"{where}: student.loc_weight must be a number >= 0, got {s['loc_weight']!r}")


def resolve_config(config: dict | None) -> dict:
    """DEFAULTS merged with the user's settings, validated, stage steps scaled to ``steps``."""
    cfg = merge_config(DEFAULTS, config or {}, where="--config/--set")
    _check_config(cfg)
    running = ("teacher", "student") if needs_teacher(cfg) else ("student",)   # only stages that run share ``steps``
    stages = scale_steps({k: cfg[k]["steps"] for k in running}, cfg["steps"])
    for key, value in stages.items():
        cfg[key]["steps"] = value
    return cfg


def needs_teacher(cfg: dict) -> bool:
    return cfg["student"]["variant"] in ("mixed", "mixed_loc")
