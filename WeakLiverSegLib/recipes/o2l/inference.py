"""o2l inference: teacher / student probabilities on the working grid -> labels on the input grid (``segment``), the teacher's pseudo-label store (``pseudo``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data.volume import Volume
from ...errors import InputError
from ...learn.networks.unet2d import fold_batchnorm
from ...learn.postprocess import postprocess
from ...learn.slices import (HU_WINDOW, N_CLASSES, box_maps, image_to_working, input_grid_labels, lesion_boxes_for_slices,
                             slice_groups, split_boxes, to_input_grid)
from ...learn.training import LazySegmentResult, SegmentResult, check_cancelled, inference_dtype, write_pseudo_store


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


@torch.inference_mode()
def predict_volume(net, image_w: np.ndarray, maps: np.ndarray | None = None, context: int = 1, batch: int = 8,
                   device="cpu", progress=None, stage: str = "segment", dtype=torch.float32) -> np.ndarray:
    """Softmax (z, 3, h, w) float32 of every three-slice group of a working-grid volume; the network
    runs in ``dtype`` (``learn.training.inference_dtype``; the softmax is float32 either way)."""
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
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = net(x, b)
        out[centres] = torch.softmax(logits.float(), dim=1).cpu().numpy()
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


def _input_grid_maps(probs_w: np.ndarray, shape_zyx, liver=False) -> tuple:
    """Working-grid softmax -> (tumour probability, entropy[, liver probability]) float32 on the input grid.

    Resampled a few slices at a time so a 512x512 CT never holds all class maps at full size.
    """
    nz, ny, nx = shape_zyx
    tumour = np.empty(shape_zyx, np.float32)
    entropy = np.empty(shape_zyx, np.float32)
    fg = np.empty(shape_zyx, np.float32) if liver else None
    chunk = 8
    for z0 in range(0, nz, chunk):
        pw = torch.from_numpy(probs_w[z0:z0 + chunk])
        # entropy on the working grid (cheap), then resampled like the probabilities
        ent_w = -(pw * torch.log(pw.clamp_min(1e-8))).sum(dim=1, keepdim=True)
        p = to_input_grid(torch.cat([pw[:, 1:], ent_w], dim=1), (ny, nx))
        tumour[z0:z0 + chunk] = p[:, 1].numpy()
        entropy[z0:z0 + chunk] = p[:, 2].numpy()
        if liver:
            fg[z0:z0 + chunk] = (p[:, 0] + p[:, 1]).numpy()
    return (tumour, entropy, fg) if liver else (tumour, entropy)


def _input_grid_labels(probs_w: np.ndarray, shape_zyx, do_postprocess=True) -> np.ndarray:
    labels = input_grid_labels(probs_w, shape_zyx[1:])
    return postprocess(labels) if do_postprocess else labels


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


def _working_probs(model, image: Volume, boxes, use_teacher: bool, device, progress, batch=None,
                   dtype=torch.float32) -> np.ndarray:
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
                           stage="teacher" if use_teacher else "segment", dtype=dtype)
    if use_teacher and model.meta.get("training", {}).get("config", {}).get("teacher", {}).get("box_constraint"):
        probs = constrain_to_boxes(probs, maps)
    return probs


def segment(model, images: dict, boxes=None, device="cpu", progress=None, use_teacher=None,
            do_postprocess: bool = True, batch: int | None = None, precision: str | None = None) -> SegmentResult:
    """Segment one volume (``images``: phase -> Volume) with the student, or with the teacher when
    ``boxes`` are given (store ``Box`` list: a liver box and tumour boxes) and the model has one.

    ``use_teacher``: None = teacher iff boxes are given and the model has one; True / False to force.
    ``precision``: the network's float type (``learn.training.inference_dtype``; None = auto).
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
    probs = _working_probs(model, image, boxes, use_teacher, device, progress, batch, inference_dtype(_device(device), precision))
    labels = _input_grid_labels(probs, image.array.shape, do_postprocess)

    def maps():     # only when asked for (--probabilities / --uncertainty, fused annotators)
        return [image.with_array(m) for m in _input_grid_maps(probs, image.array.shape)]

    return LazySegmentResult(image.with_array(labels), maps)



# ----------------------------------------------------------------------------- pseudo
def box_annotator(model, device="cpu"):
    """The pseudo-label annotator of the model's ``teacher.annotator`` (None for ``trained``, the paper's):
    LiteMedSAM (``teacher.annotator_model``, default the pretrained one) alone, or fused with the
    model's teacher (``annotate.annotators.FusedAnnotator``)."""
    from functools import partial
    from types import SimpleNamespace

    from ...annotate.annotators import FusedAnnotator, LiteMedSAMAnnotator, TrainedAnnotator, load_annotator

    t = model.meta.get("training", {}).get("config", {}).get("teacher", {})
    kind = t.get("annotator", "trained")
    if kind == "trained":
        return None
    spec = t.get("annotator_model") or "litemedsam"
    sam = load_annotator(spec, device=str(device))
    if not isinstance(sam, LiteMedSAMAnnotator):
        raise InputError(f"teacher.annotator_model {spec!r}: not a LiteMedSAM model (recipe litemedsam)")
    if kind == "litemedsam":
        return sam
    # float32 like the trained teacher's own pseudo-labels: training data must not depend on the CPU
    teacher = SimpleNamespace(segment=partial(segment, precision="float32"))
    return FusedAnnotator(sam, TrainedAnnotator(model, teacher, str(device)))


def pseudo(model, dataset, out_dir, device="cpu", progress=None) -> Path:
    """Write the teacher's pseudo-labels for every weak case (boxes with a liver box, no mask) of ``dataset``.

    ``out_dir`` becomes a copy of the store in which those cases carry the (post-processed)
    pseudo-label map as their mask, so it can be trained on directly, plus
    ``pseudo/<id>_tumor_prob.nii.gz`` and ``pseudo/<id>_liver_prob.nii.gz`` (liver incl. tumour),
    float32 teacher softmax on the case's grid.  A model trained with ``teacher.annotator`` litemedsam /
    fused labels with that annotator instead (one-hot maps in those files).
    """
    from ...data.imageio import write_image

    if "teacher" not in model.networks:
        raise InputError(f"{model.path}: this model has no teacher network, so it cannot make pseudo-labels")
    weak = [c for c in dataset.cases.values() if c.mask is None and c.liver_box is not None]
    if not weak:
        raise InputError(f"{dataset.root}: no weak case (a liver box, no mask) to pseudo-label")
    phases = _model_input(model.meta)["phases"]
    annotator = box_annotator(model, device)

    def relabel(case, images):
        image = images[phases[0]] if phases[0] in images else images[case.reference]
        if annotator is not None:      # teacher.annotator: one-hot pseudo-labels of the box annotator
            from ...learn.slices import annotate_case

            labels = annotate_case(annotator, image, case.liver_box, case.boxes, progress, where=case.id)
            for key, value in (("tumor", labels == 2), ("liver", labels >= 1)):
                write_image(image.with_array(value.astype(np.float32)), Path(out_dir) / "pseudo" / f"{case.id}_{key}_prob.nii.gz")
            return image.with_array(labels)
        probs = _working_probs(model, image, [case.liver_box] + list(case.boxes), True, device, None)
        labels = _input_grid_labels(probs, image.array.shape)
        tumour, _, liver = _input_grid_maps(probs, image.array.shape, liver=True)
        write_image(image.with_array(tumour), Path(out_dir) / "pseudo" / f"{case.id}_tumor_prob.nii.gz")
        write_image(image.with_array(liver), Path(out_dir) / "pseudo" / f"{case.id}_liver_prob.nii.gz")
        return image.with_array(labels)

    return write_pseudo_store(dataset, out_dir, {c.id for c in weak}, relabel, progress=progress)
