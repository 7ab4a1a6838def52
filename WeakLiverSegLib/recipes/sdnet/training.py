"""sdnet training: VNet + residual VNet on labelled and unlabelled volumes, validation."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from ... import __version__
from ...data.imageio import resample_to
from ...errors import InputError
from ...learn.modelstore import LoadedModel, load_model, save_model
from ...learn.networks.vnet3d import build_network
from ...learn.training import check_cancelled, make_optimizer, most_common_phase, open_run, set_lr
from .config import LABELS, LABELS_NOTE, NAME, PHASES, RECIPE_VERSION, _net_kwargs, lr_for, resolve_config
from .cooperative import sdnet_step, vnet_step
from .grid import image_to_working, mask_to_working
from .sampling import PatchSampler
from .inference import _model_input, segment


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
    ckpt, saved, init = open_run(out, cfg, resume, init, dataset=dataset, recipe=NAME)

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
