"""couinaud training: liver -> Couinaud map -> CouinaudNet -> ILR / PLR pseudo-labels -> segmenter."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from ... import __version__
from ...errors import InputError
from ...learn.modelstore import load_model, save_model
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.training import check_cancelled, make_optimizer, most_common_phase, open_run
from .config import LABELS, MIN_LIVER_PIXELS, NAME, PHASES, RECIPE_VERSION, STAGES, network_kwargs, resolve_config
from .cases import load_case, make_weak_case, select_cases
from .stages import _device
from .liver import liver_from_model, liver_from_softmax, predict_softmax, train_liver_net
from .couinaudnet import CouinaudNet, couinaudnet_probs, pseudo_masks, train_couinaudnet
from .segmenter import segmenter_cases, train_segmenter


def build_networks(kwargs) -> dict:
    return {"liver_net": BoxAttentionUNet2D(**kwargs["liver_net"]), "segmenter": BoxAttentionUNet2D(**kwargs["segmenter"]),
            "couinaudnet": CouinaudNet(**kwargs["couinaudnet"])}


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Liver + Couinaud maps -> ILR -> CouinaudNet -> pseudo-labels + PLR -> segmenter; writes the model folder."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    ckpt, saved, init = open_run(out, cfg, resume, init, dataset=dataset, recipe=NAME)
    cases = select_cases(dataset, cfg)
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    kwargs = network_kwargs(cfg)
    nets = build_networks(kwargs)
    if init is not None:
        _load_init(nets, init)
    dev = _device(device)
    for net in nets.values():
        net.to(dev)
    opts = {s: make_optimizer(nets[s].parameters(), cfg[s], f"{s}.optimizer") for s in STAGES}
    state = {"curves": {}, "seconds": {}}

    def save(stage, step):
        ckpt.save(stage, step, nets, opts, rng, extra={"config": cfg, "init": None if init is None else str(init),
                                                        "curves": state["curves"], "seconds": state["seconds"]})

    stage0, step0 = STAGES[0], 0
    if saved is not None:
        stage0, step0 = ckpt.resume(saved, nets, opts, rng, state, progress)
    done = {s: STAGES.index(s) < STAGES.index(stage0) for s in STAGES}

    def start_of(stage):
        return step0 if stage == stage0 else 0

    # -- load the cases on the working grid
    t0 = time.monotonic()
    loaded = {}
    for n, case in enumerate(cases):
        check_cancelled(progress)
        loaded[case.id] = load_case(dataset, case, cfg, keep_original=bool(cfg["liver_model"]) and case.mask is None)
        if progress is not None:
            progress.update("prepare", n + 1, len(cases))
    state["seconds"]["load"] = round(time.monotonic() - t0, 2)

    # -- liver of every case: store mask, liver model, or a liver net trained on the masked cases
    livers, sources = {}, {}
    for case in cases:
        if loaded[case.id]["mask"] is not None:
            livers[case.id], sources[case.id] = loaded[case.id]["mask"] >= 1, "mask"
    missing = [c for c in cases if c.id not in livers]
    liver_net_used = False
    if missing and cfg["liver_model"]:
        liver_model = load_model(cfg["liver_model"], device=device)
        for case in missing:
            livers[case.id] = liver_from_model(liver_model, loaded[case.id]["original"],
                                               loaded[case.id]["image"].shape[1:], device)
            sources[case.id] = "liver_model"
    elif missing:
        masked = [(c.id, loaded[c.id] if c.id in loaded else load_case(dataset, c, cfg))
                  for c in dataset.cases.values() if c.split in ("train", "val") and c.mask is not None]
        if not masked:
            raise InputError(f"{dataset.root}: no liver mask for {len(missing)} case(s) "
                             f"({', '.join(c.id for c in missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                             f"the Couinaud constructor needs the liver: add masked cases to the store or pass "
                             f"--set liver_model=PATH (a liver model of this project)")
        liver_net_used = True
        if not done["liver_net"]:
            t0 = time.monotonic()
            train_liver_net(nets["liver_net"], opts["liver_net"], masked, cfg, rng, device, start_of("liver_net"),
                            save, progress, state["curves"])
            state["seconds"]["liver_net"] = round(time.monotonic() - t0, 2)
        for n, case in enumerate(missing):
            probs = predict_softmax(nets["liver_net"], loaded[case.id]["image"], cfg["context"], cfg["infer_batch"], device)
            livers[case.id], sources[case.id] = liver_from_softmax(probs), "liver_net"
            if progress is not None:
                progress.update("liver", n + 1, len(missing))

    # -- Couinaud maps and image-level labels
    t0 = time.monotonic()
    weak = []
    for n, case in enumerate(cases):
        check_cancelled(progress)
        if livers[case.id].sum() < MIN_LIVER_PIXELS:
            if progress is not None:
                progress.log(f"{case.id}: no liver found ({sources[case.id]}); case skipped")
            continue
        weak.append(make_weak_case(case, loaded[case.id], livers[case.id], sources[case.id], cfg))
        loaded[case.id] = None      # free the HU volume
        if progress is not None:
            progress.update("couinaud", n + 1, len(cases))
    state["seconds"]["couinaud"] = round(time.monotonic() - t0, 2)
    if not weak:
        raise InputError(f"{dataset.root}: no training case has a liver (store mask, liver model or liver net)")
    r = cfg["refine"]
    before = {c.case_id: c.image_labels() for c in weak}
    labels = {c.case_id: c.refined_labels(r["ilr"], r["ilr_min_pixels"]) for c in weak}

    # -- CouinaudNet on healthy slices with injected tumours
    need_net = any(c.tumour is None and labels[c.case_id].any() for c in weak)
    pool_size = 0
    if need_net and not done["couinaudnet"]:
        t0 = time.monotonic()
        pool_size = train_couinaudnet(nets["couinaudnet"], opts["couinaudnet"], weak, labels, cfg, rng, device,
                                      start_of("couinaudnet"), save, progress, state["curves"])
        state["seconds"]["couinaudnet"] = round(time.monotonic() - t0, 2)

    # -- pseudo-labels (+ PLR) of the pathological weak slices
    tumours, pseudo_stats = {}, {"pixels_before_plr": 0, "pixels_after_plr": 0}
    if need_net:
        for n, case in enumerate(c for c in weak if c.tumour is None):
            probs = couinaudnet_probs(nets["couinaudnet"], case, labels[case.case_id], cfg["context"],
                                      cfg["infer_batch"], device, r["clip_to_region"])
            masks, _ = pseudo_masks(probs, cfg, r["plr"])
            tumours[case.case_id] = masks & case.liver
            pseudo_stats["pixels_before_plr"] += int((probs >= r["tau"]).sum())
            pseudo_stats["pixels_after_plr"] += int(masks.sum())
            if progress is not None:
                progress.update("pseudo-labels", n + 1, sum(c.tumour is None for c in weak))

    # -- the final segmenter
    t0 = time.monotonic()
    train_segmenter(nets["segmenter"], opts["segmenter"], segmenter_cases(weak, tumours), cfg, rng, device,
                    start_of("segmenter"), save, progress, state["curves"])
    state["seconds"]["segmenter"] = round(time.monotonic() - t0, 2)

    liver_slices = {c.case_id: c.liver.any(axis=(1, 2)) for c in weak}
    summary = {
        "dataset": str(dataset.root),
        "cases": {kind: [c.case_id for c in weak if c.kind == kind] for kind in ("couinaud", "volume", "mask", "liver_only")},
        "liver_source": {c.case_id: c.liver_source for c in weak},
        "landmarks_found": {c.case_id: c.landmarks.get("found", {}) for c in weak},
        "liver_slices": int(sum(v.sum() for v in liver_slices.values())),
        "pathological_slices_before_ilr": int(sum((before[k] > 0)[liver_slices[k]].sum() for k in before)),
        "pathological_slices_after_ilr": int(sum((labels[k] > 0)[liver_slices[k]].sum() for k in labels)),
        "healthy_pool_slices": int(pool_size),
        **pseudo_stats,
    }
    networks = {"segmenter": ("BoxAttentionUNet2D", kwargs["segmenter"], nets["segmenter"].eval())}
    if need_net:
        networks["couinaudnet"] = ("CouinaudNet", kwargs["couinaudnet"], nets["couinaudnet"].eval())
    phase = cfg["phase"] or most_common_phase(cases, PHASES["inference"][0])
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [phase], "inference_phases": [phase],
            "hu_window": list(cfg["hu_window"]),
            "spacing_mm": [float(cfg["spacing_mm"]), float(cfg["spacing_mm"])],
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
        },
        "training": {
            "config": copy.deepcopy(cfg),
            "data": summary,
            "steps": {s: (cfg[s]["steps"] if (s != "liver_net" or liver_net_used) and (s != "couinaudnet" or need_net)
                          else 0) for s in STAGES},
            "init": None if init is None else str(init),
            "device": str(device),
            "seconds": state["seconds"],
            "curves": state["curves"],
        },
        "metrics": {},
    }
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def _load_init(nets: dict, init) -> None:
    """Fine-tuning: start CouinaudNet / the segmenter from an earlier couinaud model."""
    model = load_model(init, device="cpu")
    if model.recipe != NAME:
        raise InputError(f"{init}: --init model is of recipe {model.recipe!r}, not {NAME!r}")
    for name in ("couinaudnet", "segmenter"):
        if name in model.networks:
            try:
                nets[name].load_state_dict(model.networks[name].state_dict(), strict=True)
            except RuntimeError:
                raise InputError(f"{init}: network {name!r} does not fit this configuration "
                                 f"(channels / context differ)") from None
