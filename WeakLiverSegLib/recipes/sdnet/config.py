"""sdnet settings: names, methods, DEFAULTS, their validation, the networks' arguments and learning rate."""

from __future__ import annotations

from ...errors import InputError
from ...learn.config import merge_config

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
