"""acol settings: names, modes, anchor sizes, DEFAULTS, their validation and the networks' arguments."""

from __future__ import annotations

import math

from ...errors import InputError
from ...learn.config import merge_config
from ...learn.slices import HU_WINDOW
from ...learn.training import scale_steps

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
PSEUDO_ANNOTATORS = ("mined", "litemedsam")
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
    "pseudo": {
        "annotator": "mined",    # mined (the paper: classifier maps + CRF) | litemedsam (LiteMedSAM's annotation
                                 # of the boxes, hard 0/2, no ignore region; the classifier is then not trained)
        "annotator_model": None, # LiteMedSAM model folder (fine-tuned); None = the pretrained one
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
    ps = cfg["pseudo"]
    if ps["annotator"] not in PSEUDO_ANNOTATORS:
        raise InputError(f"{where}: pseudo.annotator {ps['annotator']!r} is not one of {list(PSEUDO_ANNOTATORS)}")
    if ps["annotator_model"] is not None and not isinstance(ps["annotator_model"], str):
        raise InputError(f"{where}: pseudo.annotator_model must be a model folder path or null")
    if c["mode"] not in MINING_MODES or ps["annotator"] != "mined":
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
