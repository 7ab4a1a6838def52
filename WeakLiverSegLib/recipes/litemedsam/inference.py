"""litemedsam inference: boxes -> label map with the (pretrained or fine-tuned) LiteMedSAM annotator."""

from __future__ import annotations

from ...errors import InputError
from ...learn.training import SegmentResult


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    from ...annotate.annotators import LiteMedSAMAnnotator

    if not boxes:
        raise InputError(f"{model.path}: a LiteMedSAM model segments from boxes: give --boxes BOXES.json")
    image = next(iter(images.values()))
    return SegmentResult(LiteMedSAMAnnotator(model, device).annotate(image, boxes, progress).labels)
