"""acol data: phases, working images, tumour boxes of a case."""

from __future__ import annotations

import numpy as np

from ...data.boxes import boxes_from_mask
from ...data.volume import Volume
from ...errors import InputError
from ...learn.slices import image_to_working, lesion_boxes_for_slices
from .config import TUMOUR_VALUE


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def _working_image(image: Volume, cfg) -> np.ndarray:
    return image_to_working(image.array, image.spacing[:2], cfg["spacing_mm"], cfg["hu_window"])


def _select_cases(dataset):
    """(training cases with boxes or a mask, val cases with a mask)."""
    train = [c for c in dataset.cases.values() if c.split == "train" and (c.mask is not None or "boxes" in c.label_kinds)]
    val = [c for c in dataset.cases.values() if c.split == "val" and c.mask is not None]
    return train, val


def case_tumor_boxes(case, dataset=None, labels=None) -> list:
    """Tumour boxes of a case: the store's (2D per slice preferred), or per-slice boxes of its mask."""
    if case.mask is not None and not [b for b in case.boxes if b.label != "liver"]:
        labels = dataset.read_mask(case.id).array if labels is None else labels
        return boxes_from_mask(labels, TUMOUR_VALUE, per_slice=True)
    return lesion_boxes_for_slices(case.boxes)
