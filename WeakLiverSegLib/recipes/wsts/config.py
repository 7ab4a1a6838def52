"""wsts settings: names, phases, DEFAULTS, their validation, the RL environment and learning-rate schedule."""

from __future__ import annotations

from ...errors import InputError
from ...learn.config import merge_config
from ...learn.training import scale_steps
from .rl_boxes import BoxEnv
from .usse import UNCERTAINTY_KINDS

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
        "warm_start": 0.7,         # share of the rounds spent cloning the greedy expert (rl_boxes.oracle_actions) before
                                   # SAC takes over; 0 = the paper (SAC from the start: test IoU ~3-7 %, see
                                   # docs/results/wsts_detectors.md)
        "expert": 1.0,             # weight of the expert's action in the SAC policy loss after the warm start; 0 = the paper
        "width": 16, "features": 128,
        "strided": 4, "pool": 4,   # the agents' CNN: stride-2 convolutions (of 4) and the pooled map's side
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
    if not (isinstance(d["warm_start"], (int, float)) and 0 <= d["warm_start"] <= 1):
        raise InputError(f"{where}: detector.warm_start must be a share of the rounds in [0, 1], got {d['warm_start']!r}")
    positive("detector.pool", d["pool"], integer=True)
    if d["strided"] not in range(5):
        raise InputError(f"{where}: detector.strided must be 0 to 4 (of the 4 convolutions), got {d['strided']!r}")
    for key in ("init_box_px", "translate_px", "scale_px", "reward_scale", "lr", "student_lr", "alpha", "alpha_lr",
                "zeta", "tau", "kl_clip"):
        positive(f"detector.{key}", d[key])
    for key in ("relative_entropy", "imitation", "expert"):
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
