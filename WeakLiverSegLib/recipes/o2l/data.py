"""o2l data preparation: a store case -> the 2.5D working grid with its box maps."""

from __future__ import annotations

from ...data.boxes import boxes_from_mask, liver_box_from_mask
from ...data.volume import Volume
from ...errors import InputError
from ...learn.slices import PreparedCase, box_maps, image_to_working, labels_to_working, lesion_boxes_for_slices


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
