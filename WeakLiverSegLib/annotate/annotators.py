"""Box -> label-map annotators behind one interface: the foundation model (LiteMedSAM, pretrained or
fine-tuned), box filling (the baseline), the teacher of a trained model, and the two fused.

Every annotator turns a liver box into label 1 and each tumour box into label 2 (tumour wins), on
the image's own grid, and refuses a box whose object comes back empty (naming the box).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.boxes import Box, box_mask
from ..errors import InputError
from ..data.volume import Volume
from .propagate import PropagationSettings, Propagator

NAMES = ("litemedsam", "fill", "fused")


@dataclass
class AnnotateResult:
    labels: Volume
    seconds: float = 0.0
    encoded_slices: int = 0
    per_box: list = field(default_factory=list)      # {"box", "label", "voxels", "slices"}


def _where(n: int, box: Box) -> str:
    return f"box [{n}] ({box.label}, ijk {list(box.ijk_min)}..{list(box.ijk_max)})"


def _order(boxes):
    """Liver boxes first so that tumours drawn inside them win."""
    return sorted(enumerate(boxes), key=lambda nb: nb[1].label != "liver")


def _compose(shape, masks) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for box, mask in masks:
        labels[mask] = 2 if box.label == "tumor" else np.maximum(labels[mask], 1)
    return labels


def _check_boxes(image: Volume, boxes) -> list:
    boxes = list(boxes or [])
    if not boxes:
        raise InputError("annotate: no boxes given (a liver box and/or tumour boxes are needed)")
    for n, box in enumerate(boxes):
        if box.label not in ("liver", "tumor"):
            raise InputError(f"{_where(n, box)}: label must be liver or tumor")
        box.validate(image, where=_where(n, box))
    return boxes


class FillAnnotator:
    """The baseline: every voxel of a box is the object."""
    name = "fill"

    def annotate(self, image: Volume, boxes, progress=None) -> AnnotateResult:
        t0 = time.perf_counter()
        boxes = _check_boxes(image, boxes)
        masks = [(b, box_mask(image.array.shape, [b])) for _, b in _order(boxes)]
        return AnnotateResult(image.with_array(_compose(image.array.shape, masks)), time.perf_counter() - t0,
                              per_box=[{"box": n, "label": b.label, "voxels": int(m.sum())}
                                       for n, (b, m) in enumerate(masks)])


class LiteMedSAMAnnotator:
    """Per-slice LiteMedSAM carried through each box (``propagate.Propagator``). The network and its
    embedding cache stay loaded between calls, so a warm worker pays for a slice only once."""
    name = "litemedsam"

    def __init__(self, model, device: str = "cpu", settings: PropagationSettings | None = None,
                 window=None, input_size: int | None = None, batch_size: int = 4):
        from .litemedsam import SlicePredictor, fuse_batchnorm

        self.model = model
        net = model.networks["litemedsam"]
        fuse_batchnorm(net)
        win = window or model.meta.get("input", {}).get("hu_window") or (-160.0, 240.0)
        # one input size for every box when asked (or a fine-tuned model's), else the settings' per label
        self.input_size = input_size or model.meta.get("input", {}).get("input_size")
        self.predictor = SlicePredictor(net, device=device, window=win, input_size=self.input_size,
                                        batch_size=batch_size)
        self.settings = settings or PropagationSettings()
        if self.settings.view is None:   # the view the model was fine-tuned on, else the whole slice
            self.settings = replace(self.settings, view=model.meta.get("input", {}).get("view") or "slice")
        self.settings.check()
        self.probabilities = None   # set by annotate(keep_probabilities=True): float16 (z, y, x)

    def annotate(self, image: Volume, boxes, progress=None, image_key=None,
                 keep_probabilities: bool = False) -> AnnotateResult:
        t0 = time.perf_counter()
        boxes = _check_boxes(image, boxes)
        encoded0 = self.predictor.encoded
        prop = Propagator(self.predictor, self.settings, self.input_size)
        self.probabilities = np.zeros(image.array.shape, np.float16) if keep_probabilities else None
        masks, per_box = [], []
        order = _order(boxes)
        for step, (n, box) in enumerate(order):
            mask = prop.segment(image.array, box, image_key=image_key, prob_out=self.probabilities)
            if not mask.any():
                raise InputError(f"{_where(n, box)}: LiteMedSAM found no {box.label} inside this box; check that the "
                                 f"box is drawn around the object on this image")
            masks.append((box, mask))
            per_box.append({"box": n, "label": box.label, "voxels": int(mask.sum()),
                            "slices": int(mask.any(axis=(1, 2)).sum())})
            if progress is not None:
                progress.update("annotate", step + 1, len(order), encoded=self.predictor.encoded - encoded0)
        return AnnotateResult(image.with_array(_compose(image.array.shape, masks)), time.perf_counter() - t0,
                              self.predictor.encoded - encoded0, per_box)


class TrainedAnnotator:
    """The teacher of a trained model (a recipe whose ``segment`` uses boxes, e.g. o2l); ``recipe``
    is the model's recipe module, handed in by the caller (annotate sits below the recipes)."""
    name = "trained"

    def __init__(self, model, recipe, device: str = "cpu"):
        self.model = model
        self.device = device
        self.recipe = recipe

    def result(self, image: Volume, boxes, progress=None):
        phases = self.model.meta.get("input", {}).get("phases") or ["ct"]
        return self.recipe.segment(self.model, {phases[0]: image}, boxes=boxes, device=self.device,
                                   progress=progress)

    def annotate(self, image: Volume, boxes, progress=None) -> AnnotateResult:
        t0 = time.perf_counter()
        boxes = _check_boxes(image, boxes)
        labels = self.result(image, boxes, progress).labels.array
        labels = np.where(box_mask(labels.shape, boxes), labels, 0).astype(np.uint8)
        _check_found(labels, boxes)
        return AnnotateResult(image.with_array(labels), time.perf_counter() - t0)


class FusedAnnotator:
    """LiteMedSAM and a trained teacher averaged: inside each tumour box a voxel is tumour when the mean
    of LiteMedSAM's probability (its mask where a slice was interpolated) and the teacher's tumour
    probability exceeds 0.5; the liver is LiteMedSAM's."""
    name = "fused"

    def __init__(self, sam: LiteMedSAMAnnotator, teacher: TrainedAnnotator, weight: float = 0.5):
        self.sam, self.teacher, self.weight = sam, teacher, float(weight)

    def annotate(self, image: Volume, boxes, progress=None, image_key=None) -> AnnotateResult:
        t0 = time.perf_counter()
        boxes = _check_boxes(image, boxes)
        sam = self.sam.annotate(image, boxes, progress, image_key=image_key, keep_probabilities=True)
        p_sam = self.sam.probabilities.astype(np.float32)
        p_teacher = self.teacher.result(image, boxes, progress).probabilities.array.astype(np.float32)
        fused = self.weight * p_sam + (1 - self.weight) * p_teacher
        labels = sam.labels.array.copy()
        inside = box_mask(labels.shape, [b for b in boxes if b.label == "tumor"])
        dropped = inside & (fused <= 0.5) & (labels == 2)
        labels[inside & (fused > 0.5)] = 2
        # a tumour voxel the fusion drops stays liver where a liver box covers it
        labels[dropped] = box_mask(labels.shape, [b for b in boxes if b.label == "liver"])[dropped]
        _check_found(labels, boxes)
        return AnnotateResult(image.with_array(labels), time.perf_counter() - t0, sam.encoded_slices, sam.per_box)


def _check_found(labels, boxes):
    for n, box in enumerate(boxes):
        inside = labels[box_mask(labels.shape, [box])]
        if not (inside == (2 if box.label == "tumor" else 1)).any() and not (box.label == "liver" and (inside >= 1).any()):
            raise InputError(f"{_where(n, box)}: the annotator found no {box.label} inside this box")


def load_annotator(spec, device: str = "cpu", teacher=None, settings: PropagationSettings | None = None,
                   models_root=None, recipe_lookup=None, **sam_kwargs):
    """``spec``: "litemedsam" (the pretrained model, converted on first use), "fill", "fused" (needs
    ``teacher``, a trained model folder) or a model folder (a fine-tuned LiteMedSAM or a trained model
    whose teacher annotates). ``recipe_lookup``: name -> recipe module (``recipes.get``), needed for
    a trained teacher."""

    def trained(model):
        if recipe_lookup is None:
            raise ValueError("load_annotator: a trained teacher needs recipe_lookup")
        return TrainedAnnotator(model, recipe_lookup(model.recipe), device)

    from ..learn.modelstore import load_model
    from . import litemedsam  # noqa: F401  (registers the LiteMedSAM network class)
    from .convert import pretrained_dir

    spec = str(spec)
    if spec == "fill":
        return FillAnnotator()
    if spec in ("litemedsam", "fused"):
        sam = LiteMedSAMAnnotator(load_model(pretrained_dir(models_root), device=device), device, settings,
                                  **sam_kwargs)
        if spec == "litemedsam":
            return sam
        if teacher is None:
            raise InputError("--annotator fused: needs --teacher MODEL_DIR (a trained model with a teacher)")
        return FusedAnnotator(sam, trained(load_model(teacher, device=device)))
    path = Path(spec)
    if not path.exists():
        raise InputError(f"--annotator {spec!r}: not litemedsam, fill or fused, and no such model folder")
    model = load_model(path, device=device)
    if model.recipe == "litemedsam":
        return LiteMedSAMAnnotator(model, device, settings, **sam_kwargs)
    if "teacher" not in model.networks:
        raise InputError(f"{path}: recipe {model.recipe!r} model has no teacher network to annotate boxes with")
    return trained(model)


def refine_labels(image: Volume, labels: Volume, annotator, progress=None) -> Volume:
    """Redraw every object of a label map with a box annotator: the liver (labels >= 1) and each
    26-connected tumour component, each from its bounding box 1 mm larger on every side (as
    ``data.boxes.radiologist_boxes`` draws them). An object the annotator finds nothing in keeps
    its original voxels; a tumour stays inside the refined liver's label map (tumour wins)."""
    from ..data.boxes import radiologist_boxes

    boxes = radiologist_boxes(labels.array, labels.spacing)
    out = np.zeros(labels.array.shape, dtype=np.uint8)
    for n, (_, box) in enumerate(_order(boxes)):
        inside = box_mask(out.shape, [box])
        try:
            mask = annotator.annotate(image, [box]).labels.array >= 1
        except InputError:      # nothing found in the box: keep the object as it was
            mask = inside & ((labels.array == 2) if box.label == "tumor" else (labels.array >= 1))
        if box.label == "tumor":
            out[mask] = 2
        else:
            out[mask & (out == 0)] = 1
        if progress is not None:
            progress.update("refine", n + 1, len(boxes))
    return labels.with_array(out)


def annotate(image: Volume, boxes, annotator="litemedsam", device: str = "cpu", progress=None, **kwargs) -> Volume:
    """One call: boxes on ``image`` -> label map (1 liver, 2 tumour) on the image's grid.
    ``annotator`` and ``kwargs`` as ``load_annotator``; a warm worker keeps the annotator instead."""
    return load_annotator(annotator, device=device, **kwargs).annotate(image, boxes, progress).labels
