"""Recipe ``o2l`` (default): box-attention teacher, localization-branch student.

Sun et al., "A Teacher-Student Framework for Semi-supervised Medical Image Segmentation From
Mixed Supervision" (../shared/papers/o2l_teacher_student_mixed_supervision_lits.txt).

1. Teacher annotator: a 2D U-Net on three consecutive slices with the hierarchical
   organ-to-lesion attention of Eq. 1-2 at each of the 4 encoder scales, cross-entropy (Eq. 3),
   trained on the strong set (cases with a mask, split train).  Its boxes are derived from the
   masks as in the paper: tumour boxes per lesion per slice (2D) and the organ box of the liver.
2. Pseudo-labels: the teacher's softmax for every weak case (boxes, no mask, split train),
   computed from the case's own boxes.
3. Student segmentor: the same backbone plus the localization branch; loss Eq. 4 =
   cross-entropy with the strong masks and the soft pseudo-labels + ``alpha`` x class-weighted
   cross-entropy of the box one-hot map (background / liver box / lesion box, lesion wins).
4. Inference: every three-slice group of the volume (batched), at the working in-plane spacing,
   back to the input grid, then post-processing (largest liver component, hole filling, no
   lesion outside the liver).  The localization branch is never computed there.

Ablations (``config``): ``teacher.attention`` none | multichannel | o2l_noshortcut | o2l;
``student.variant`` strong_only | mixed | mixed_loc | full.  ``full`` (the upper bound) trains on
the *truth* masks of the weak cases (``truth`` in the store), which no other code path reads.

Deviations from the paper, for a CPU budget of a few minutes (all are config fields):

* Adam (lr 1e-3) instead of SGD (teacher lr 1e-3, student 3e-4, momentum 0.9): SGD at those
  rates does not converge in a few hundred steps.  The paper's setting is
  ``{"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9}`` (teacher) / ``3e-4`` (student).
* Steps, not epochs: ``teacher.steps`` (300) / ``student.steps`` (600) optimisation steps of 8
  three-slice groups; the learning rate is multiplied by 0.95 every step over the last 15 %
  (the paper: every epoch after 3000 of 4000 for the student, which anneals to ~0 within about
  100 epochs; the teacher keeps it constant there).  The student gets twice the teacher's
  steps: without box input it needs them to pick up the small tumours.
* Images are resampled in-plane to ``spacing_mm`` (1.5 mm) so 512x512 CT runs on a CPU; random
  crops of ``crop`` pixels (160 = 240 mm, about the paper's 320 px at 0.7 mm; smaller images
  are used whole); ``roi_prob`` of the crops are centred on a slice inside the organ box (half
  of them on a lesion slice) instead of uniformly anywhere.
* Localization loss class weights: lesion 1 and liver 0.1 as in the paper; background (not
  given in the paper) 0.1: like the liver box it is a large region, and the paper's point is
  that the small lesion boxes should dominate this loss.
* The attention's ``conv`` is two 3x3 convolutions with batch norm (the paper: "convolutional
  layers followed by batch normalization"); attended encoder features also feed the next
  encoder level.
* A soft Dice term is added to both cross-entropies (``dice_weight`` 1.0; 0 = the paper's
  cross-entropy only).  With a few hundred steps, tumours (< 1 % of the pixels) stay
  under-confident under cross-entropy alone: on the 20-case phantom (300 teacher steps) the
  O2L teacher's median tumour probability inside tumours was 0.6 (pseudo-label tumour Dice
  0.87, box filling 0.85), with Dice 0.97 (Dice 0.905); a plain U-Net on the strong set alone
  reached tumour Dice 0.09 without and 0.53 with it.
* ``teacher.box_constraint`` (default off, the paper has none) can clip pseudo-labels to the
  boxes; ``teacher.pseudo_temperature`` (default 1 = the paper's soft labels) can sharpen them.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from ... import __version__
from ...data.boxes import boxes_from_mask, liver_box_from_mask
from ...learn.config import merge_config
from ...errors import InputError
from ...learn.modelstore import LoadedModel, load_model, save_model
from ...learn.networks.unet2d import ATTENTION_VARIANTS, BoxAttentionUNet2D, fold_batchnorm
from ...learn.postprocess import postprocess
from ...learn.slices import (HU_WINDOW, N_CLASSES, PreparedCase, Sampler, box_maps, image_to_working, labels_to_working,
                             lesion_boxes_for_slices, slice_groups, split_boxes, to_input_grid)
from ...learn.training import (SegmentResult, check_cancelled, lr_at, make_optimizer, most_common_phase, open_run,
                               optimizer_step, scale_steps, set_lr, soft_cross_entropy,
                               write_pseudo_store)
from ...data.volume import Volume

NAME = "o2l"
RECIPE_VERSION = 1
NETWORK_CLASS = "BoxAttentionUNet2D"
LABELS = {"background": 0, "liver": 1, "tumor": 2}
# One image phase: the contrast-enhanced CT (any single phase works; ``config["phase"]`` picks it,
# default the reference phase of each case).
PHASES = {"train": ("enhanced",), "inference": ("enhanced",)}
STUDENT_VARIANTS = ("strong_only", "mixed", "mixed_loc", "full")

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
    },
    "student": {
        "variant": "mixed_loc",  # strong_only | mixed | mixed_loc | full (upper bound: reads truth)
        "steps": 600,
        "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
        "lr_decay_start": 0.85, "lr_decay": 0.95,
        "dice_weight": 1.0,                      # + weight x soft Dice loss (see the module docstring)
        "loc_weight": 1.0,                       # alpha of Eq. 4
        "loc_class_weights": [0.1, 0.1, 1.0],    # background, liver box, lesion box
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
    if not (_number(t["pseudo_temperature"]) and t["pseudo_temperature"] > 0):
        raise InputError(f"{where}: teacher.pseudo_temperature must be a positive number")
    lw = s["loc_class_weights"]
    if not (isinstance(lw, list) and len(lw) == N_CLASSES and all(_number(w) and w >= 0 for w in lw)):
        raise InputError(f"{where}: student.loc_class_weights needs {N_CLASSES} numbers >= 0 (background, liver, lesion)")
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


# ----------------------------------------------------------------------------- data preparation


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def _read_image(dataset, case, cfg):
    return dataset.read_image(case.id, _phase_of(case, cfg))


def _prepare(case_id, image: Volume, cfg, kind, labels=None, liver_box=None, tumor_boxes=(), target=None):
    spacing = cfg["spacing_mm"]
    work = image_to_working(image.array, image.spacing[:2], spacing, cfg["hu_window"])
    size = work.shape[1:]
    if labels is not None:
        target = labels_to_working(labels, size)
    maps = box_maps(image.array.shape, size, liver_box, tumor_boxes)
    return PreparedCase(case_id, work, target, maps, kind=kind)


def mask_boxes(labels) -> tuple:
    """The paper's boxes of a strong case: tumour boxes per lesion per slice, the liver's organ box."""
    return liver_box_from_mask(labels), boxes_from_mask(labels, 2, per_slice=True)


def store_boxes(case) -> tuple:
    """(liver box, tumour boxes to rasterize) of a weak case's store labels."""
    return case.liver_box, lesion_boxes_for_slices(case.boxes)


# ----------------------------------------------------------------------------- inference core


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


@torch.inference_mode()
def predict_volume(net, image_w: np.ndarray, maps: np.ndarray | None = None, context: int = 1, batch: int = 8,
                   device="cpu", progress=None, stage: str = "segment") -> np.ndarray:
    """Softmax (z, 3, h, w) float32 of every three-slice group of a working-grid volume."""
    dev = _device(device)
    net = fold_batchnorm(net).to(dev).to(memory_format=torch.channels_last)
    nz = image_w.shape[0]
    out = np.empty((nz, N_CLASSES) + image_w.shape[1:], np.float32)
    for z0 in range(0, nz, batch):
        check_cancelled(progress)
        centres = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(slice_groups(image_w, centres, context)).to(dev).contiguous(memory_format=torch.channels_last)
        b = None
        if maps is not None and net.needs_boxes:
            b = torch.from_numpy(maps[centres].astype(np.float32)).to(dev)
        out[centres] = torch.softmax(net(x, b).float(), dim=1).cpu().numpy()
        if progress is not None:
            progress.update(stage, int(centres[-1]) + 1, nz)
    return out


def constrain_to_boxes(probs: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Move tumour probability outside the lesion boxes to liver, liver outside the organ box to background."""
    probs = probs.copy()
    organ, lesion = maps[:, 0:1] > 0, maps[:, 1:2] > 0
    tumour_out = np.where(lesion, 0.0, probs[:, 2:3])
    probs[:, 1:2] += tumour_out
    probs[:, 2:3] -= tumour_out
    fg_out = np.where(organ, 0.0, probs[:, 1:2] + probs[:, 2:3])
    probs[:, 0:1] += fg_out
    probs[:, 1:3] = np.where(organ, probs[:, 1:3], 0.0)
    return probs


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities (z, C, ...) raised to 1/T and renormalised (T = 1: unchanged)."""
    if temperature == 1.0:
        return probs
    p = np.power(np.clip(probs, 1e-8, 1.0), 1.0 / float(temperature))
    return p / p.sum(axis=1, keepdims=True)


def _to_input_grid(probs_w: np.ndarray, shape_zyx, do_postprocess=True, liver=False) -> tuple:
    """Working-grid softmax -> (labels uint8, tumour probability, entropy[, liver probability]) on the input grid.

    Resampled a few slices at a time so a 512x512 CT never holds all class maps at full size.
    """
    nz, ny, nx = shape_zyx
    labels = np.empty(shape_zyx, np.uint8)
    tumour = np.empty(shape_zyx, np.float32)
    entropy = np.empty(shape_zyx, np.float32)
    fg = np.empty(shape_zyx, np.float32) if liver else None
    chunk = 8
    for z0 in range(0, nz, chunk):
        pw = torch.from_numpy(probs_w[z0:z0 + chunk])
        # entropy on the working grid (cheap), then resampled like the probabilities
        ent_w = -(pw * torch.log(pw.clamp_min(1e-8))).sum(dim=1, keepdim=True)
        p = to_input_grid(torch.cat([pw, ent_w], dim=1), (ny, nx))
        labels[z0:z0 + chunk] = p[:, :N_CLASSES].argmax(dim=1).to(torch.uint8).numpy()
        tumour[z0:z0 + chunk] = p[:, 2].numpy()
        entropy[z0:z0 + chunk] = p[:, N_CLASSES].numpy()
        if liver:
            fg[z0:z0 + chunk] = (p[:, 1] + p[:, 2]).numpy()
    if do_postprocess:
        labels = postprocess(labels)
    return (labels, tumour, entropy, fg) if liver else (labels, tumour, entropy)


def _model_input(model_meta) -> dict:
    inp = model_meta.get("input", {})
    return {
        "hu_window": inp.get("hu_window", list(HU_WINDOW)),
        "spacing_mm": float(inp.get("spacing_mm", [1.5])[0]),
        "context": int(inp.get("context_slices", 1)),
        "phases": inp.get("phases") or [None],
    }


def _pick_image(images: dict, phases) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    want = phases[0] if phases else None
    if want in images:
        return images[want]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model needs the phase {want!r}; got phases {sorted(map(str, images))}")


def _working_probs(model, image: Volume, boxes, use_teacher: bool, device, progress, batch=None) -> np.ndarray:
    """Softmax of the teacher (with boxes) or the student on the working grid of ``image``."""
    inp = _model_input(model.meta)
    net = model.networks["teacher" if use_teacher else "student"]
    work = image_to_working(image.array, image.spacing[:2], inp["spacing_mm"], inp["hu_window"])
    maps = None
    if use_teacher:
        boxes = list(boxes or [])
        for n, box in enumerate(boxes):
            box.check_fields(f"--boxes [{n}]")
            if any(hi >= s for hi, s in zip(box.ijk_max, image.shape_xyz)):
                raise InputError(f"--boxes [{n}]: ijk_max {list(box.ijk_max)} outside the image grid {image.shape_xyz}")
        liver, tumors = split_boxes(boxes)
        if liver is None:
            raise InputError("--boxes: the teacher needs a liver box (label 'liver') besides the tumour boxes")
        maps = box_maps(image.array.shape, work.shape[1:], liver, lesion_boxes_for_slices(tumors))
    probs = predict_volume(net, work, maps, inp["context"], batch or 8, device, progress,
                           stage="teacher" if use_teacher else "segment")
    if use_teacher and model.meta.get("training", {}).get("config", {}).get("teacher", {}).get("box_constraint"):
        probs = constrain_to_boxes(probs, maps)
    return probs


def segment(model, images: dict, boxes=None, device="cpu", progress=None, use_teacher=None,
            do_postprocess: bool = True, batch: int | None = None) -> SegmentResult:
    """Segment one volume (``images``: phase -> Volume) with the student, or with the teacher when
    ``boxes`` are given (store ``Box`` list: a liver box and tumour boxes) and the model has one.

    ``use_teacher``: None = teacher iff boxes are given and the model has one; True / False to force.
    """
    inp = _model_input(model.meta)
    image = _pick_image(images, inp["phases"])
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    has_teacher = "teacher" in model.networks
    if use_teacher is None:
        use_teacher = bool(boxes) and has_teacher
        if boxes and not has_teacher and progress is not None:
            progress.log("this model has no teacher: the boxes are ignored, the student segments")
    if use_teacher and not has_teacher:
        raise InputError(f"{model.path}: this model has no teacher network (it was trained without one)")
    probs = _working_probs(model, image, boxes, use_teacher, device, progress, batch)
    labels, tumour, entropy = _to_input_grid(probs, image.array.shape, do_postprocess)
    return SegmentResult(image.with_array(labels), image.with_array(tumour), image.with_array(entropy))


# ----------------------------------------------------------------------------- training


def _net_kwargs(cfg, role: str) -> dict:
    return {
        "in_channels": 2 * cfg["context"] + 1,
        "out_channels": N_CLASSES,
        "channels": list(cfg["channels"]),
        "attention": cfg["teacher"]["attention"] if role == "teacher" else "none",
        "localization": role == "student" and cfg["student"]["variant"] == "mixed_loc",
    }


def _select_cases(dataset, cfg, progress):
    strong = [c for c in dataset.cases_with("mask", split="train")]
    weak, skipped = [], []
    if cfg["student"]["variant"] != "strong_only":
        for c in dataset.cases_with("boxes", split="train"):
            if c.mask is not None:
                continue
            if cfg["student"]["variant"] == "full":
                if not c.truth or "mask" not in c.truth:
                    raise InputError(f"{c.id}: student.variant 'full' (upper bound) needs the truth mask of every "
                                     f"weak case; this case has none")
            elif c.liver_box is None:
                skipped.append(c.id)
                continue
            weak.append(c)
    if skipped and progress is not None:
        progress.log(f"skipped {len(skipped)} box case(s) without a liver box (the teacher needs one): "
                     f"{', '.join(skipped)}")
    val = [c for c in dataset.cases_with("mask", split="val")]
    return strong, weak, val, skipped


def _train_stage(stage, net, opt, sampler, scfg, total, start, ckpt, state, progress, device, with_loc=False):
    """Optimisation loop of one stage from step ``start`` to ``total``, checkpointing on the way."""
    dev = _device(device)
    net.train()
    loc_w = torch.tensor(state["cfg"]["student"]["loc_class_weights"], dtype=torch.float32, device=dev)
    alpha = float(state["cfg"]["student"]["loc_weight"])
    dice_w = float(scfg.get("dice_weight", 0.0))
    dice = DiceLoss(include_background=False, softmax=True, batch=True, soft_label=True) if dice_w > 0 else None
    curve = state["curves"].setdefault(stage, [])
    for step in range(start, total):
        check_cancelled(progress)
        set_lr(opt, lr_at(step, total, scfg))
        batch = sampler.sample()
        x = batch["image"].to(dev).contiguous(memory_format=torch.channels_last)
        boxes = batch["boxes"].to(dev) if net.needs_boxes else None
        target = batch["target"].to(dev)
        if with_loc:
            logits, loc_logits = net(x, boxes, with_loc=True)
        else:
            logits = net(x, boxes)
        loss = soft_cross_entropy(logits, target)
        if dice is not None:
            loss = loss + dice_w * dice(logits.float(), target)
        if with_loc:
            loss = loss + alpha * F.cross_entropy(loc_logits.float(), batch["loc"].to(dev), weight=loc_w)
        value = optimizer_step(opt, loss, stage, step)
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update(stage, step + 1, total, loss=round(value, 4), lr=round(opt.param_groups[0]["lr"], 7))
        if ckpt.due(step + 1) and step + 1 < total:
            state["save"](stage, step + 1)
    state["save"](stage, total)


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Teacher on the strong set -> soft pseudo-labels of the weak set -> student; writes the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    ckpt_folder, saved, init = open_run(out, cfg, resume, init)
    strong, weak, val, skipped = _select_cases(dataset, cfg, progress)
    use_teacher = needs_teacher(cfg)

    # networks: built (and initialised) up front so every checkpoint holds both, RNG use is fixed
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = {"teacher": _net_kwargs(cfg, "teacher"), "student": _net_kwargs(cfg, "student")}
    init_model = None
    if init is not None:
        init_model = load_model(init, device="cpu")
        if init_model.recipe != NAME:
            raise InputError(f"{init}: --init model is of recipe {init_model.recipe!r}, not {NAME!r}")
        inp = _model_input(init_model.meta)
        if inp["spacing_mm"] != cfg["spacing_mm"] or list(inp["hu_window"]) != list(cfg["hu_window"]) \
                or inp["context"] != cfg["context"]:
            raise InputError(f"{init}: --init model was trained at spacing {inp['spacing_mm']} mm, HU window "
                             f"{inp['hu_window']}, context {inp['context']}; set the same in the config")
        for role in ("teacher", "student"):
            spec = init_model.meta["networks"].get(role)
            if spec is not None:
                kw = dict(spec["kwargs"])
                if role == "student":   # keep the requested variant's localization branch choice
                    kw["localization"] = kwargs["student"]["localization"]
                kwargs[role] = kw
    nets = {role: BoxAttentionUNet2D(**kwargs[role]) for role in ("teacher", "student")}
    if init_model is not None:
        for role, net in nets.items():
            if role in init_model.networks:
                # the localization branch may be added or dropped by the new variant; nothing else may differ
                missing, unexpected = net.load_state_dict(init_model.networks[role].state_dict(), strict=False)
                if any(not k.startswith("loc.") for k in list(missing) + list(unexpected)):
                    raise InputError(f"{init}: network {role!r} does not fit the requested architecture")
    dev = _device(device)
    for net in nets.values():
        net.to(dev).to(memory_format=torch.channels_last)
    opts = {"teacher": make_optimizer(nets["teacher"].parameters(), cfg["teacher"], "teacher.optimizer"),
            "student": make_optimizer(nets["student"].parameters(), cfg["student"], "student.optimizer")}

    if use_teacher and not strong and not (init_model is not None and "teacher" in init_model.networks):
        raise InputError(f"{dataset.root}: no strong case (mask and split train) to train the teacher on")
    if not strong and not weak:
        raise InputError(f"{dataset.root}: no training case (cases with a mask, or boxes, and split train)")

    data_summary = {"dataset": str(dataset.root), "strong": [c.id for c in strong], "weak": [c.id for c in weak],
                    "val": [c.id for c in val], "skipped_no_liver_box": skipped}
    state = {"cfg": cfg, "curves": {}, "seconds": {}}

    def save_ckpt(stage, step):
        ckpt_folder.save(stage, step, nets, opts, rng, extra={
            "config": cfg, "init": None if init is None else str(init), "kwargs": kwargs,
            "curves": state["curves"], "seconds": state["seconds"], "data": data_summary})

    state["save"] = save_ckpt
    stage0, step0 = "teacher", 0
    if saved is not None:
        if saved.meta["extra"].get("kwargs") != kwargs:
            raise InputError(f"{ckpt_folder.folder}: checkpoint networks differ from this run; delete it to start over")
        stage0, step0 = ckpt_folder.resume(saved, nets, opts, rng, state, progress)

    # -- prepare the data (images on the working grid; boxes of strong cases from their masks)
    t0 = time.monotonic()
    prepared_strong = []
    for n, case in enumerate(strong):
        check_cancelled(progress)
        image = _read_image(dataset, case, cfg)
        labels = dataset.read_mask(case.id).array
        liver, tumors = mask_boxes(labels)
        prepared_strong.append(_prepare(case.id, image, cfg, "strong", labels=labels, liver_box=liver, tumor_boxes=tumors))
        if progress is not None:
            progress.update("prepare", n + 1, len(strong) + len(weak))
    weak_images = []
    for n, case in enumerate(weak):
        check_cancelled(progress)
        image = _read_image(dataset, case, cfg)
        liver, tumors = store_boxes(case)
        labels = None
        if cfg["student"]["variant"] == "full":
            truth = dataset.read_truth(case.id, "mask")
            if truth.array.shape != image.array.shape:
                raise InputError(f"{case.id}: truth mask grid {truth.array.shape} differs from the image {image.array.shape}")
            labels = truth.array.astype(np.uint8)
        weak_images.append(_prepare(case.id, image, cfg, "weak", labels=labels, liver_box=liver, tumor_boxes=tumors))
        if progress is not None:
            progress.update("prepare", len(strong) + n + 1, len(strong) + len(weak))
    state["seconds"].setdefault("prepare", round(time.monotonic() - t0, 2))
    every = [c.image.shape[1:] for c in prepared_strong + weak_images]
    crop = min(cfg["crop"], max(max(s) for s in every))
    crop = int(math.ceil(crop / 16) * 16)

    def sampler(cases):
        return Sampler(cases, crop, cfg["batch_size"], rng, cfg["context"], cfg["groups_per_crop"],
                       cfg["scale_range"], cfg["flip_prob"], cfg["roi_prob"])

    # -- teacher
    t_steps = cfg["teacher"]["steps"] if (use_teacher and strong) else 0
    if use_teacher and stage0 == "teacher" and t_steps > 0:
        t0 = time.monotonic()
        _train_stage("teacher", nets["teacher"], opts["teacher"], sampler(prepared_strong), cfg["teacher"],
                     t_steps, step0, ckpt_folder, state, progress, device)
        state["seconds"]["teacher"] = round(state["seconds"].get("teacher", 0) + time.monotonic() - t0, 2)
        stage0, step0 = "student", 0
    elif stage0 == "teacher":
        stage0, step0 = "student", 0

    # -- pseudo-labels (soft) for the weak cases
    if use_teacher and weak_images:
        t0 = time.monotonic()
        for n, case in enumerate(weak_images):
            probs = predict_volume(nets["teacher"], case.image, case.boxes, cfg["context"], cfg["infer_batch"], device)
            if cfg["teacher"]["box_constraint"]:
                probs = constrain_to_boxes(probs, case.boxes)
            case.target = sharpen(probs, cfg["teacher"]["pseudo_temperature"]).astype(np.float16)
            if progress is not None:
                progress.update("pseudo-labels", n + 1, len(weak_images))
        state["seconds"]["pseudo"] = round(time.monotonic() - t0, 2)

    # -- student
    variant = cfg["student"]["variant"]
    student_cases = prepared_strong + ([] if variant == "strong_only" else weak_images)
    if not student_cases:
        raise InputError(f"{dataset.root}: no case to train the student on")
    t0 = time.monotonic()
    _train_stage("student", nets["student"], opts["student"], sampler(student_cases), cfg["student"],
                 cfg["student"]["steps"], step0 if stage0 == "student" else 0, ckpt_folder, state, progress, device,
                 with_loc=variant == "mixed_loc")
    state["seconds"]["student"] = round(state["seconds"].get("student", 0) + time.monotonic() - t0, 2)

    # -- save the model, then validate
    networks = {"student": (NETWORK_CLASS, kwargs["student"], nets["student"].eval())}
    if use_teacher:
        networks["teacher"] = (NETWORK_CLASS, kwargs["teacher"], nets["teacher"].eval())
    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [cfg["phase"] or most_common_phase(strong + weak, PHASES["inference"][0])],
            "inference_phases": [cfg["phase"] or most_common_phase(strong + weak, PHASES["inference"][0])],
            "hu_window": list(cfg["hu_window"]),
            "spacing_mm": [float(cfg["spacing_mm"]), float(cfg["spacing_mm"])],
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
            "teacher_boxes": "liver box + tumour boxes (2D per slice preferred)" if use_teacher else None,
        },
        "training": {
            "config": copy.deepcopy(cfg),
            "data": data_summary,
            "steps": {"teacher": t_steps, "student": cfg["student"]["steps"]},
            "crop": crop,
            "init": None if init is None else str(init),
            "device": str(device),
            "seconds": state["seconds"],
            "curves": state["curves"],
        },
        "metrics": {},
    }
    if val:
        t0 = time.monotonic()
        meta["metrics"] = {"val": _validate(LoadedModel(out, meta, {"student": nets["student"]}), dataset, val, cfg,
                                            device, progress)}
        state["seconds"]["validate"] = round(time.monotonic() - t0, 2)
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt_folder.clear()
    return out


def _validate(model, dataset, val, cfg, device, progress) -> dict:
    """Student metrics (liver / tumour Dice, ...) on the val cases that have a mask."""
    from ...evaluation.metrics import GlobalSums, case_metrics, summarize

    accum, per_case = GlobalSums(), {}
    for n, case in enumerate(val):
        image = _read_image(dataset, case, cfg)
        result = segment(model, {"image": image}, device=device)
        truth = dataset.read_mask(case.id).array
        per_case[case.id] = case_metrics(result.labels.array, truth, image.spacing, accum=accum)
        if progress is not None:
            progress.update("validate", n + 1, len(val))
    return {"cases": per_case, "summary": summarize(per_case, accum)}


# ----------------------------------------------------------------------------- pseudo


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Write the teacher's pseudo-labels for every weak case (boxes with a liver box, no mask) of ``dataset``.

    ``out_dir`` becomes a copy of the store in which those cases carry the (post-processed)
    pseudo-label map as their mask, so it can be trained on directly, plus
    ``pseudo/<id>_tumor_prob.nii.gz`` and ``pseudo/<id>_liver_prob.nii.gz`` (liver incl. tumour),
    float32 teacher softmax on the case's grid.
    """
    from ...data.imageio import write_image

    if "teacher" not in model.networks:
        raise InputError(f"{model.path}: this model has no teacher network, so it cannot make pseudo-labels")
    weak = [c for c in dataset.cases.values() if c.mask is None and c.liver_box is not None]
    if not weak:
        raise InputError(f"{dataset.root}: no weak case (a liver box, no mask) to pseudo-label")
    phases = _model_input(model.meta)["phases"]

    def relabel(case, images):
        image = images[phases[0]] if phases[0] in images else images[case.reference]
        probs = _working_probs(model, image, [case.liver_box] + list(case.boxes), True, device, None)
        labels, tumour, _, liver = _to_input_grid(probs, image.array.shape, True, liver=True)
        write_image(image.with_array(tumour), Path(out_dir) / "pseudo" / f"{case.id}_tumor_prob.nii.gz")
        write_image(image.with_array(liver), Path(out_dir) / "pseudo" / f"{case.id}_liver_prob.nii.gz")
        return image.with_array(labels)

    return write_pseudo_store(dataset, out_dir, {c.id for c in weak}, relabel, progress=progress)
