"""Recipe ``litemedsam``: the LiteMedSAM box annotator as a model folder.

``segment`` with boxes annotates them (``annotate.annotators.LiteMedSAMAnnotator``); ``train``
fine-tunes the mask decoder on the store's strong cases (see ``annotate.finetune``).
"""

from __future__ import annotations

from ..annotate import litemedsam as _network  # noqa: F401  (registers the LiteMedSAM network class)
from ..errors import InputError
from ..learn.training import SegmentResult

NAME = "litemedsam"
PHASES = {"train": ("ct",), "inference": ("ct",)}


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    from ..annotate.annotators import LiteMedSAMAnnotator

    if not boxes:
        raise InputError(f"{model.path}: a LiteMedSAM model segments from boxes: give --boxes BOXES.json")
    image = next(iter(images.values()))
    return SegmentResult(LiteMedSAMAnnotator(model, device).annotate(image, boxes, progress).labels)
