"""couinaud ``segment`` and ``pseudo``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...data.volume import Volume
from ...errors import InputError
from ...learn.postprocess import postprocess
from ...learn.slices import HU_WINDOW, N_CLASSES, resize_slices, to_input_grid, window, working_size
from ...learn.training import SegmentResult, write_pseudo_store
from .config import MIN_LIVER_PIXELS, resolve_config
from .cases import labels_on_working, load_case, make_weak_case
from .liver import predict_softmax
from .couinaudnet import couinaudnet_probs, pseudo_masks


def _model_input(meta) -> dict:
    inp = meta.get("input", {})
    return {"hu_window": inp.get("hu_window", list(HU_WINDOW)),
            "spacing_mm": float(inp.get("spacing_mm", [1.5])[0]),
            "context": int(inp.get("context_slices", 1)),
            "phases": inp.get("inference_phases") or inp.get("phases") or [None]}


def _pick_image(images: dict, phases) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    if phases and phases[0] in images:
        return images[phases[0]]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model needs the phase {phases[0]!r}; got phases {sorted(map(str, images))}")


def segment(model, images: dict, boxes=None, device="cpu", progress=None, do_postprocess: bool = True) -> SegmentResult:
    """Segment one volume with the final segmenter (boxes are not used by this recipe)."""
    inp = _model_input(model.meta)
    image = _pick_image(images, inp["phases"])
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    if "segmenter" not in model.networks:
        raise InputError(f"{model.path}: model has no 'segmenter' network")
    size = working_size(image.array.shape[1:], image.spacing[:2], inp["spacing_mm"])
    work = resize_slices(torch.from_numpy(window(image.array, inp["hu_window"]))[:, None], size)[:, 0].numpy()
    probs = predict_softmax(model.networks["segmenter"], work, inp["context"], 8, device, progress)
    nz, ny, nx = image.array.shape
    labels = np.empty((nz, ny, nx), np.uint8)
    tumour = np.empty((nz, ny, nx), np.float32)
    entropy = np.empty((nz, ny, nx), np.float32)
    for z0 in range(0, nz, 8):      # back to the input grid a few slices at a time
        p = to_input_grid(torch.from_numpy(probs[z0:z0 + 8]), (ny, nx))
        labels[z0:z0 + 8] = p.argmax(dim=1).to(torch.uint8).numpy()
        tumour[z0:z0 + 8] = p[:, 2].numpy()
        entropy[z0:z0 + 8] = (-(p * torch.log(p.clamp_min(1e-8))).sum(dim=1)).numpy()
    if do_postprocess:
        labels = postprocess(labels)
    return SegmentResult(image.with_array(labels), image.with_array(tumour), image.with_array(entropy))


# ----------------------------------------------------------------------------- pseudo


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Refined pseudo-labels of the weak cases (Couinaud / volume label, no mask) as a new store.

    The liver comes from the model's own segmenter; Couinaud maps, ILR and PLR follow the
    model's training settings.  Every other case is copied unchanged.
    """
    if "couinaudnet" not in model.networks:
        raise InputError(f"{model.path}: this model has no CouinaudNet (it was trained on masks only)")
    cfg = resolve_config(model.meta.get("training", {}).get("config", {}))
    weak_ids = {c.id for c in dataset.cases.values() if c.mask is None and ({"couinaud", "volume"} & c.label_kinds)}
    if not weak_ids:
        raise InputError(f"{dataset.root}: no case with a Couinaud or volume label and no mask to pseudo-label")
    r = cfg["refine"]

    def relabel(case, images):
        loaded = load_case(dataset, case, cfg, keep_original=True)
        liver = segment(model, {"image": loaded["original"]}, device=device).labels.array >= 1
        liver_w = labels_on_working(liver.astype(np.uint8), loaded["image"].shape[1:]) >= 1
        if liver_w.sum() < MIN_LIVER_PIXELS:
            return None      # no liver found: the case is copied unlabelled
        wc = make_weak_case(case, loaded, liver_w, "segmenter", cfg)
        probs = couinaudnet_probs(model.networks["couinaudnet"], wc, wc.refined_labels(r["ilr"], r["ilr_min_pixels"]),
                                  cfg["context"], cfg["infer_batch"], device, r["clip_to_region"])
        tum, _ = pseudo_masks(probs, cfg, r["plr"])
        work = liver_w.astype(np.uint8)
        work[tum & liver_w] = 2
        onehot = F.one_hot(torch.from_numpy(work.astype(np.int64)), N_CLASSES).permute(0, 3, 1, 2).float()
        lab = to_input_grid(onehot, liver.shape[1:]).argmax(dim=1).to(torch.uint8).numpy()
        return loaded["original"].with_array(lab)

    return write_pseudo_store(dataset, out_dir, weak_ids, relabel, progress=progress)
