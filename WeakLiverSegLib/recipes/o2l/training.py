"""o2l training: the O2L-attention teacher on masked cases, its pseudo-labels, the student with the localization branch."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from ... import __version__
from ...errors import InputError
from ...learn.modelstore import LoadedModel, load_model, save_model
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.distributed import wrap
from ...learn.slices import N_CLASSES, Sampler, annotate_case, labels_to_working
from ...learn.training import (check_cancelled, lr_at, recalibrate_batchnorm, make_optimizer, most_common_phase, open_run, optimizer_step,
                               set_lr, soft_cross_entropy)
from .config import LABELS, NAME, NETWORK_CLASS, PHASES, RECIPE_VERSION, needs_teacher, resolve_config
from .data import _prepare, _read_image, mask_boxes, store_boxes
from .inference import _device, _model_input, box_annotator, constrain_to_boxes, predict_volume, segment, sharpen


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
    model = wrap(net)   # torchrun: DDP (gradients averaged over the ranks), else the network itself
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
            logits, loc_logits = model(x, boxes, with_loc=True)
        else:
            logits = model(x, boxes)
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
    if init is not None:
        config = _init_input_settings(init, config)
    cfg = resolve_config(config)
    ckpt_folder, saved, init = open_run(out, cfg, resume, init, dataset=dataset, recipe=NAME)
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
        init_channels = [spec["kwargs"].get("channels") for spec in init_model.meta["networks"].values()
                         if isinstance(spec, dict) and isinstance(spec.get("kwargs"), dict)]
        if init_channels and init_channels[0] is not None and list(init_channels[0]) != list(cfg["channels"]):
            if "channels" in (config or {}):   # asked for explicitly: never ignored silently
                raise InputError(f"--set channels={json.dumps(cfg['channels'])}: the --init model {init} has channels "
                                 f"{list(init_channels[0])}; fine-tuning keeps the architecture (drop the setting)")
        for role in ("teacher", "student"):
            spec = init_model.meta["networks"].get(role)
            if spec is not None:
                kw = dict(spec["kwargs"])
                if role == "student":   # keep the requested variant's localization branch choice
                    kw["localization"] = kwargs["student"]["localization"]
                kwargs[role] = kw
    if init_model is not None and "teacher" not in init_model.networks and "student" in init_model.networks:
        # a student-only model (the shipped starter): the teacher starts from the same backbone
        kwargs["teacher"] = dict(kwargs["student"], attention=cfg["teacher"]["attention"], localization=False)
    nets = {role: BoxAttentionUNet2D(**kwargs[role]) for role in ("teacher", "student")}
    if init_model is not None:
        for role, net in nets.items():
            source = role if role in init_model.networks else "student" if role == "teacher" else None
            if source is None or source not in init_model.networks:
                continue
            # the localization branch may be added or dropped by the new variant, and a teacher taken
            # from a student gets fresh box attention; nothing else may differ
            missing, unexpected = net.load_state_dict(init_model.networks[source].state_dict(), strict=False)
            allowed = ("loc.",) if source == role else ("loc.", "attn.")
            if any(not k.startswith(allowed) for k in list(missing) + list(unexpected)):
                raise InputError(f"{init}: network {source!r} does not fit the requested architecture")
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
    if use_teacher and weak_images and cfg["teacher"]["annotator"] != "trained":
        t0 = time.monotonic()
        phase = cfg["phase"] or most_common_phase(strong + weak, PHASES["inference"][0])
        teacher_meta = {"input": {"phases": [phase], "hu_window": list(cfg["hu_window"]),
                                  "spacing_mm": [float(cfg["spacing_mm"])] * 2, "context_slices": int(cfg["context"])},
                        "training": {"config": cfg}}
        annotator = box_annotator(LoadedModel(out, teacher_meta, {"teacher": nets["teacher"]}), device)
        for n, (case, prepared) in enumerate(zip(weak, weak_images)):
            check_cancelled(progress)
            image = _read_image(dataset, case, cfg)
            labels = annotate_case(annotator, image, case.liver_box, case.boxes, progress, where=case.id)
            prepared.target = labels_to_working(labels, prepared.image.shape[1:]).astype(np.float16)
            if progress is not None:
                progress.update("pseudo-labels", n + 1, len(weak_images))
        state["seconds"]["pseudo"] = round(time.monotonic() - t0, 2)
    elif use_teacher and weak_images:
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
    if cfg["student"]["bn_recalibration"]:
        t0 = time.monotonic()
        recalibrate_batchnorm(nets["student"], sampler(student_cases), cfg["student"]["bn_recalibration"], device,
                              progress)
        state["seconds"]["bn_recalibration"] = round(time.monotonic() - t0, 2)

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
            "config": dict(copy.deepcopy(cfg), channels=list(kwargs["student"]["channels"])),  # as trained (--init)
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


def _init_input_settings(init, config) -> dict:
    """The user's config with the --init model's input settings (working spacing, HU window, context,
    channels) filled in where the user set none, so ``train --init <starter>`` needs no ``--set``."""
    from ...learn.modelstore import read_meta

    meta = read_meta(init)
    inp, config = meta.get("input", {}), dict(config or {})
    trained = meta.get("training", {}).get("config", {})
    fill = {"spacing_mm": (inp.get("spacing_mm") or [None])[0], "hu_window": inp.get("hu_window"),
            "context": inp.get("context_slices"), "channels": trained.get("channels")}
    for key, value in fill.items():
        if key not in config and value is not None:
            config[key] = value
    return config


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
