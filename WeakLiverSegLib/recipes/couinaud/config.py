"""couinaud settings: names, stages, DEFAULTS, their validation and the networks' arguments."""

from __future__ import annotations

from ...anatomy.couinaud_map import DEFAULTS as CONSTRUCTOR_DEFAULTS
from ...errors import InputError
from ...learn.config import merge_config
from ...learn.slices import HU_WINDOW, N_CLASSES
from ...learn.training import scale_steps

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
