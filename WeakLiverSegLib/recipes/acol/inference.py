"""acol inference: ``pseudo_mask`` (mining on given boxes), ``segment``, ``pseudo``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data.boxes import box_mask
from ...data.volume import Volume
from ...errors import InputError
from ...learn.slices import lesion_boxes_for_slices, slice_groups, split_boxes, to_input_grid
from ...learn.training import SegmentResult, check_cancelled, write_pseudo_store
from .config import MINING_MODES, TUMOUR_VALUE
from .anchor_boxes import slice_rects
from .mining import mine_pseudo
from .data import _phase_of, _working_image


def _model_config(model) -> dict:
    cfg = model.meta.get("training", {}).get("config")
    if not isinstance(cfg, dict):
        raise InputError(f"{model.path}: model.json has no training.config (not an acol model?)")
    return cfg


def has_teacher(model) -> bool:
    """A classifier to mine boxes with, the box-fill mode or a box annotator (which need none)."""
    cfg = _model_config(model)
    return ("classifier" in model.networks or cfg["classifier"]["mode"] not in MINING_MODES
            or cfg.get("pseudo", {}).get("annotator", "mined") != "mined")


def box_annotator(cfg, device="cpu"):
    """The LiteMedSAM annotator of ``pseudo.annotator`` (None for the paper's mining)."""
    from ...annotate.annotators import load_annotator

    ps = cfg.get("pseudo", {})
    if ps.get("annotator", "mined") == "mined":
        return None
    return load_annotator(ps.get("annotator_model") or "litemedsam", device=str(device))


def annotator_mask(annotator, image: Volume, liver_box, tumor_boxes, where="") -> np.ndarray:
    """Tumour (z, y, x) bool of a box annotator inside the tumour boxes (the liver box helps it, if given)."""
    from ...learn.slices import annotate_case

    return annotate_case(annotator, image, liver_box, tumor_boxes, where=where) == TUMOUR_VALUE


def _pick_image(images: dict, model) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    phases = model.meta.get("input", {}).get("inference_phases") or []
    if phases and phases[0] in images:
        return images[phases[0]]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model needs the phase {phases[0] if phases else None!r}; got {sorted(map(str, images))}")


def pseudo_mask(model, image: Volume, tumor_boxes, device="cpu", progress=None, liver_box=None) -> tuple:
    """The teacher's pseudo-mask on the input grid: (tumour bool (z, y, x), Q(tumour) float32 (z, y, x)).

    Tumour = CRF probability above the threshold, and inside a box on the input grid.
    """
    cfg = _model_config(model)
    if not has_teacher(model):
        raise InputError(f"{model.path}: this model has no region-mining classifier")
    for n, box in enumerate(tumor_boxes):
        box.validate(image, where=f"boxes[{n}]")
    annotator = box_annotator(cfg, device)
    if annotator is not None:
        fg = annotator_mask(annotator, image, liver_box, tumor_boxes) if tumor_boxes else np.zeros(image.array.shape, bool)
        return fg, fg.astype(np.float32)
    work = _working_image(image, cfg)
    rects = slice_rects(tumor_boxes, image.array.shape, work.shape[1:])
    prob_w, _ = mine_pseudo(model.networks.get("classifier"), work, rects, cfg, device, progress)
    prob = _to_input(prob_w, image.array.shape)
    inside = box_mask(image.array.shape, tumor_boxes)
    prob[~inside] = 0.0
    return prob > cfg["crf"]["threshold"], prob


def _to_input(prob_w: np.ndarray, shape_zyx) -> np.ndarray:
    out = np.empty(shape_zyx, np.float32)
    for z0 in range(0, shape_zyx[0], 8):
        p = torch.from_numpy(np.ascontiguousarray(prob_w[z0:z0 + 8]))[:, None]
        out[z0:z0 + 8] = to_input_grid(p, shape_zyx[1:])[:, 0].numpy()
    return out


@torch.inference_mode()
def student_probability(net, image_w: np.ndarray, context=1, batch=8, device="cpu", progress=None) -> np.ndarray:
    """Tumour softmax (z, h, w) of every three-slice group of a working-grid volume."""
    dev = torch.device(device)
    net = net.to(dev).eval()
    nz = image_w.shape[0]
    out = np.empty(image_w.shape, np.float32)
    for z0 in range(0, nz, batch):
        check_cancelled(progress)
        centres = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(slice_groups(image_w, centres, context)).to(dev)
        out[centres] = torch.softmax(net(x).float(), dim=1)[:, 1].cpu().numpy()
        if progress is not None:
            progress.update("segment", int(centres[-1]) + 1, nz)
    return out


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    """Tumour segmentation of one volume: the student, or the teacher's pseudo-mask when tumour boxes are given.

    ``boxes``: store ``Box`` list.  Tumour boxes (and a classifier in the model) -> pseudo-mask inside
    them; otherwise the student segments the whole volume, limited to the liver box if one is given.
    """
    cfg = _model_config(model)
    image = _pick_image(images, model)
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    liver, tumors = split_boxes(list(boxes or []))
    tumors = lesion_boxes_for_slices(tumors)
    if tumors and has_teacher(model):
        fg, prob = pseudo_mask(model, image, tumors, device, progress, liver_box=liver)
    else:
        if "segmenter" not in model.networks:
            raise InputError(f"{model.path}: this model has no segmentation network")
        work = _working_image(image, cfg)
        prob = _to_input(student_probability(model.networks["segmenter"], work, cfg["context"],
                                             cfg["segmenter"]["infer_batch"], device, progress), image.array.shape)
        if liver is not None:
            liver.validate(image, where="liver box")
            prob[~box_mask(image.array.shape, [liver])] = 0.0
        fg = prob > 0.5
    labels = np.where(fg, TUMOUR_VALUE, 0).astype(np.uint8)
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    entropy = (-(p * np.log(p) + (1 - p) * np.log(1 - p))).astype(np.float32)
    return SegmentResult(image.with_array(labels), image.with_array(prob.astype(np.float32)), image.with_array(entropy))


# ----------------------------------------------------------------------------- pseudo


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Copy ``dataset`` to ``out_dir``; each case with tumour boxes and no mask gets the pseudo-mask as its mask.

    The mask holds 0 and 2 only (this teacher knows nothing of the liver); in-box background is
    recoverable as "inside a tumour box and 0".  ``pseudo/<id>_tumor_prob.nii.gz``: Q(tumour).
    """
    from ...data.imageio import write_image

    if not has_teacher(model):
        raise InputError(f"{model.path}: this model has no region-mining classifier, so it cannot make pseudo-masks")
    weak = [c for c in dataset.cases.values() if c.mask is None and lesion_boxes_for_slices(c.boxes)]
    if not weak:
        raise InputError(f"{dataset.root}: no case with tumour boxes and no mask to pseudo-label")
    cfg = _model_config(model)

    def relabel(case, images):
        image = images[_phase_of(case, cfg)]
        fg, prob = pseudo_mask(model, image, lesion_boxes_for_slices(case.boxes), device, liver_box=case.liver_box)
        write_image(image.with_array(prob), Path(out_dir) / "pseudo" / f"{case.id}_tumor_prob.nii.gz")
        return image.with_array(np.where(fg, TUMOUR_VALUE, 0).astype(np.uint8))

    return write_pseudo_store(dataset, out_dir, {c.id for c in weak}, relabel, suffix="acol-pseudo",
                              progress=progress)
