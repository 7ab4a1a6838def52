"""acol training: classifier -> pseudo-masks of the box cases -> segmenter."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ... import __version__
from ...errors import InputError
from ...learn.modelstore import load_model, save_model
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.slices import PreparedCase, Sampler, box_maps
from ...learn.training import check_cancelled, make_optimizer, most_common_phase, open_run, optimizer_step, set_lr
from .fpn_classifier import FPNACoLClassifier
from .config import (LABELS, MINING_MODES, NAME, PHASES, RECIPE_VERSION, TUMOUR_VALUE, classifier_kwargs,
                     resolve_config, segmenter_kwargs)
from .anchor_boxes import slice_rects
from .classifier import BoxCase, classifier_batch, classifier_loss
from .mining import mine_pseudo, pseudo_labels
from .segmenter import decode_target, encode_target, masked_dice_loss, poly_lr
from .data import _phase_of, _select_cases, _working_image, case_tumor_boxes
from .inference import annotator_mask, box_annotator, segment


def _train_classifier(net, opt, cases, cfg, start, ckpt, state, rng, progress, device):
    c = cfg["classifier"]
    total = c["steps"]
    dev = torch.device(device)
    cache = {}
    curve = state["curves"].setdefault("classifier", [])
    net.train()
    for step in range(start, total):
        check_cancelled(progress)
        batch = classifier_batch(cases, c["crop"], c["batch_size"], rng, cfg["context"], c["negatives"],
                                 c["negative_fraction"], c["flip_prob"], cache)
        labels = batch["labels"].to(dev)
        out = net(batch["image"].to(dev), batch["rois"].to(dev), labels)
        loss = classifier_loss(out, labels, c["balance"])
        value = optimizer_step(opt, loss, "classifier", step)
        with torch.no_grad():
            acc = float((out["logits_a"].argmax(1) == labels).float().mean())
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update("classifier", step + 1, total, loss=round(value, 4), acc=round(acc, 3))
        if ckpt.due(step + 1) and step + 1 < total:
            state["save"]("classifier", step + 1, "classifier")


def _train_segmenter(net, opt, sampler, cfg, start, ckpt, state, progress, device):
    s = cfg["segmenter"]
    total = s["steps"]
    dev = torch.device(device)
    curve = state["curves"].setdefault("segmenter", [])
    net.train()
    for step in range(start, total):
        check_cancelled(progress)
        set_lr(opt, poly_lr(step, total, s["lr"], s["poly_power"]))
        batch = sampler.sample()
        labels = decode_target(batch["target"]).to(dev)
        loss = masked_dice_loss(net(batch["image"].to(dev)), labels, s["ce_weight"], s["dice_background"])
        value = optimizer_step(opt, loss, "segmenter", step)
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update("segmenter", step + 1, total, loss=round(value, 4), lr=round(opt.param_groups[0]["lr"], 7))
        if ckpt.due(step + 1) and step + 1 < total:
            state["save"]("segmenter", step + 1, "segmenter")


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Region-mining classifier -> CRF pseudo-masks -> segmentation network; writes the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config, device)
    ckpt, saved, init = open_run(out, cfg, resume, init, dataset=dataset, recipe=NAME)
    train_cases, val = _select_cases(dataset)
    if not train_cases:
        raise InputError(f"{dataset.root}: no training case (boxes or a mask, split train)")

    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = {"classifier": classifier_kwargs(cfg), "segmenter": segmenter_kwargs(cfg)}
    nets = {"classifier": FPNACoLClassifier(**kwargs["classifier"]), "segmenter": BoxAttentionUNet2D(**kwargs["segmenter"])}
    if init is not None:
        init_model = load_model(init, device="cpu")
        if init_model.recipe != NAME:
            raise InputError(f"{init}: --init model is of recipe {init_model.recipe!r}, not {NAME!r}")
        for role, net in nets.items():
            spec = init_model.meta["networks"].get(role)
            if spec is not None:
                if spec["kwargs"] != kwargs[role]:
                    raise InputError(f"{init}: network {role!r} was built with {spec['kwargs']}, this run asks for "
                                     f"{kwargs[role]}; set the same sizes in the config")
                net.load_state_dict(init_model.networks[role].state_dict())
    dev = torch.device(device)
    for net in nets.values():
        net.to(dev)
    opts = {"classifier": make_optimizer(nets["classifier"].parameters(), cfg["classifier"], "classifier.optimizer"),
            "segmenter": make_optimizer(nets["segmenter"].parameters(), cfg["segmenter"], "segmenter.optimizer")}
    state = {"curves": {}, "seconds": {}}
    data = {"dataset": str(dataset.root), "train": [c.id for c in train_cases], "val": [c.id for c in val]}

    def save_ckpt(stage, step, opt_name):
        ckpt.save(stage, step, nets, {opt_name: opts[opt_name]}, rng, extra={
            "config": cfg, "init": None if init is None else str(init), "curves": state["curves"],
            "seconds": state["seconds"], "data": data})

    state["save"] = save_ckpt
    stage0, step0 = "classifier", 0
    if saved is not None:
        stage0, step0 = ckpt.resume(saved, nets, {saved.stage: opts[saved.stage]}, rng, state, progress)

    # -- data on the working grid
    t0 = time.monotonic()
    prepared = []           # (case, image_w, rects, real labels (z, h, w) or None, box maps for the sampler)
    for n, case in enumerate(train_cases):
        check_cancelled(progress)
        image = dataset.read_image(case.id, _phase_of(case, cfg))
        work = _working_image(image, cfg)
        mask = dataset.read_mask(case.id).array if case.mask is not None else None
        tumors = case_tumor_boxes(case, dataset, mask)
        rects = slice_rects(tumors, image.array.shape, work.shape[1:])
        real = None
        if mask is not None:
            t = torch.from_numpy((mask == TUMOUR_VALUE).astype(np.float32))[:, None]
            t = F.interpolate(t, size=work.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()
            real = np.where(t > 0.5, TUMOUR_VALUE, 0).astype(np.uint8)
        liver = case.liver_box if case.liver_box is not None else None
        maps = box_maps(image.array.shape, work.shape[1:], liver, tumors)
        prepared.append((case, work, rects, real, maps))
        if progress is not None:
            progress.update("prepare", n + 1, len(train_cases))
    state["seconds"].setdefault("prepare", round(time.monotonic() - t0, 2))
    box_cases = [BoxCase(case.id, work, rects) for case, work, rects, _, _ in prepared if rects]
    needs_mining = any(real is None and rects for _, _, rects, real, _ in prepared)
    if needs_mining and not box_cases:
        raise InputError(f"{dataset.root}: no tumour box in the training cases: nothing to mine")

    # -- classifier
    if stage0 == "classifier":
        t0 = time.monotonic()
        if box_cases and cfg["classifier"]["steps"]:
            _train_classifier(nets["classifier"], opts["classifier"], box_cases, cfg, step0, ckpt, state, rng,
                              progress, device)
        state["seconds"]["classifier"] = round(state["seconds"].get("classifier", 0) + time.monotonic() - t0, 2)
        stage0, step0 = "segmenter", 0
        save_ckpt("segmenter", 0, "segmenter")

    # -- pseudo-masks (deterministic given the classifier: recomputed on resume)
    t0 = time.monotonic()
    seg_cases = []
    n_mined, to_mine = 0, sum(1 for p in prepared if p[3] is None and p[2])
    annotator = box_annotator(cfg, device) if to_mine else None
    for case, work, rects, real, maps in prepared:
        if real is not None:
            labels = real
        elif rects and annotator is not None:
            check_cancelled(progress)
            image = dataset.read_image(case.id, _phase_of(case, cfg))
            fg = annotator_mask(annotator, image, case.liver_box, case_tumor_boxes(case, dataset), where=case.id)
            t = torch.from_numpy(fg.astype(np.float32))[:, None]
            t = F.interpolate(t, size=work.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()
            labels = np.where(t > 0.5, TUMOUR_VALUE, 0).astype(np.uint8)
            n_mined += 1
            if progress is not None:
                progress.update("pseudo-masks", n_mined, to_mine)
        elif rects:
            prob, inbox = mine_pseudo(nets["classifier"], work, rects, cfg, device, progress)
            labels = pseudo_labels(prob, inbox, cfg["crf"]["threshold"])
            n_mined += 1
            if progress is not None:
                progress.update("pseudo-masks", n_mined, to_mine)
        else:
            labels = np.zeros(work.shape, np.uint8)   # boxes but no tumour box: a tumour-free case
        seg_cases.append(PreparedCase(case.id, work, encode_target(labels), maps, kind="weak" if real is None else "strong"))
    state["seconds"]["pseudo"] = round(time.monotonic() - t0, 2)

    # -- segmenter
    s = cfg["segmenter"]
    crop = int(math.ceil(min(s["crop"], max(max(c.image.shape[1:]) for c in seg_cases)) / 16) * 16)
    sampler = Sampler(seg_cases, crop, s["batch_size"], rng, cfg["context"], 1, s["scale_range"], s["flip_prob"],
                      s["roi_prob"])
    t0 = time.monotonic()
    _train_segmenter(nets["segmenter"], opts["segmenter"], sampler, cfg, step0, ckpt, state, progress, device)
    state["seconds"]["segmenter"] = round(state["seconds"].get("segmenter", 0) + time.monotonic() - t0, 2)

    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [cfg["phase"] or most_common_phase(train_cases, PHASES["inference"][0])],
            "inference_phases": [cfg["phase"] or most_common_phase(train_cases, PHASES["inference"][0])],
            "hu_window": list(cfg["hu_window"]),
            "spacing_mm": [float(cfg["spacing_mm"])] * 2,
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
            "teacher_boxes": "tumour boxes (2D per slice preferred); output tumour only",
        },
        "training": {"config": copy.deepcopy(cfg), "data": data, "crop": crop, "device": str(device),
                     "init": None if init is None else str(init), "pretrained": None,
                     "steps": {"classifier": cfg["classifier"]["steps"], "segmenter": s["steps"]},
                     "seconds": state["seconds"], "curves": state["curves"]},
        "metrics": {},
    }
    networks = {role: (type(net).__name__, kwargs[role], net.eval()) for role, net in nets.items()
                if role != "classifier" or (cfg["classifier"]["mode"] in MINING_MODES
                                            and cfg["pseudo"]["annotator"] == "mined")}
    if val:
        from ...learn.modelstore import LoadedModel

        meta["metrics"] = {"val": _validate(LoadedModel(out, meta, {r: n for r, n in nets.items()}), dataset, val, cfg,
                                            device)}
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def dice(pred, truth) -> float | None:
    """Dice of two boolean arrays (None when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(pred.sum()) + int(truth.sum())
    return None if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def _validate(model, dataset, val, cfg, device) -> dict:
    per_case = {}
    for case in val:
        image = dataset.read_image(case.id, _phase_of(case, cfg))
        result = segment(model, {"image": image}, device=device)
        truth = dataset.read_mask(case.id).array == TUMOUR_VALUE
        per_case[case.id] = {"tumor": {"dice": dice(result.labels.array == TUMOUR_VALUE, truth)}}
    values = [v["tumor"]["dice"] for v in per_case.values() if v["tumor"]["dice"] is not None]
    return {"cases": per_case, "summary": {"tumor": {"dice_per_case": float(np.mean(values)) if values else None}}}
