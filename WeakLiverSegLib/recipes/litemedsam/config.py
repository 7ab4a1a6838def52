"""litemedsam settings: names, phases, DEFAULTS and their validation."""

from __future__ import annotations

import math

from ...errors import InputError
from ...learn.config import merge_config
from ...learn.training import scale_steps

NAME = "litemedsam"
RECIPE_VERSION = 1
PHASES = {"train": ("ct",), "inference": ("ct",)}
LABELS = {"background": 0, "liver": 1, "tumor": 2}
OBJECTS = ("liver", "tumor")

DEFAULTS = {
    "steps": None,               # total optimisation steps; None = ``train_steps``
    "seed": 0,
    "phase": None,               # image phase; None = each case's reference phase
    "hu_window": None,           # [low, high] HU; None = the --init model's (the pretrained one: -160..240)
    "input_size": None,          # model input side (multiple of 16); None = the network's 256
    "objects": ["liver", "tumor"],
    "view": "slice",             # slice: the whole slice (the annotator's default); crop: a square around the
                                 # object's 3D box. Recorded in model.json: the annotator then uses it
    "crop_context": 0.5,         # as annotate.propagate.PropagationSettings
    "crop_min_px": 64,
    "min_pixels": 4,             # slice objects smaller than this are not trained on
    "max_views": None,           # encode at most this many (slice, view) pairs (a random subset; None = all)
    "encode_batch": 4,
    "train_prompt_encoder": False,
    "train_steps": 200,
    "batch_size": 8,
    "box_jitter_px": 5,          # MedSAM's bbox_shift: each side enlarged by 0..N model pixels
    "box_grow": 0.15,            # ... plus 0..this fraction of the box side (the propagation's prompt margin)
    "optimizer": "adam", "lr": 5e-5, "momentum": 0.9, "weight_decay": 0.0,
    "lr_decay_start": 0.85, "lr_decay": 0.95,
    "dice_weight": 1.0, "bce_weight": 1.0, "iou_weight": 1.0,
    "checkpoint_every": 50,
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v, lo) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check(cfg: dict) -> None:
    where = "--config/--set"
    hw = cfg["hu_window"]
    if hw is not None and not (isinstance(hw, list) and len(hw) == 2 and all(map(_number, hw)) and hw[0] < hw[1]):
        raise InputError(f"{where}: hu_window must be [low, high] with low < high (or null), got {hw!r}")
    if cfg["input_size"] is not None and not (_int(cfg["input_size"], 16) and cfg["input_size"] % 16 == 0):
        raise InputError(f"{where}: input_size must be a multiple of 16 (or null), got {cfg['input_size']!r}")
    objs = cfg["objects"]
    if not (isinstance(objs, list) and objs and all(o in OBJECTS for o in objs)):
        raise InputError(f"{where}: objects must be a non-empty list of {list(OBJECTS)}, got {objs!r}")
    if cfg["view"] not in ("crop", "slice"):
        raise InputError(f"{where}: view {cfg['view']!r} is not one of crop, slice")
    for key in ("train_steps",):
        if not _int(cfg[key], 0):
            raise InputError(f"{where}: {key} must be an integer >= 0, got {cfg[key]!r}")
    for key in ("batch_size", "encode_batch", "checkpoint_every", "crop_min_px", "min_pixels"):
        if not _int(cfg[key], 1):
            raise InputError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    if cfg["max_views"] is not None and not _int(cfg["max_views"], 1):
        raise InputError(f"{where}: max_views must be a positive integer or null, got {cfg['max_views']!r}")
    if not _int(cfg["box_jitter_px"], 0):
        raise InputError(f"{where}: box_jitter_px must be an integer >= 0, got {cfg['box_jitter_px']!r}")
    for key in ("crop_context", "box_grow", "dice_weight", "bce_weight", "iou_weight", "lr_decay",
                "lr_decay_start", "weight_decay"):
        if not _number(cfg[key]) or cfg[key] < 0:
            raise InputError(f"{where}: {key} must be a number >= 0, got {cfg[key]!r}")
    if not _number(cfg["lr"]) or not cfg["lr"] > 0:
        raise InputError(f"{where}: lr must be a positive number, got {cfg['lr']!r}")
    if not isinstance(cfg["train_prompt_encoder"], bool):
        raise InputError(f"{where}: train_prompt_encoder must be true or false")


def resolve_config(config: dict | None) -> dict:
    cfg = merge_config(DEFAULTS, config or {}, where="--config/--set")
    _check(cfg)
    cfg["train_steps"] = scale_steps({"train": cfg["train_steps"]}, cfg["steps"])["train"]
    return cfg
