"""couinaud cases: store case -> working grid with liver and Couinaud map (``WeakCase``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...anatomy.couinaud_map import construct_couinaud
from ...data.volume import Volume
from ...errors import InputError
from ...learn.slices import labels_to_working, resize_slices, window, working_size
from .config import NAME
from .refine import ilr, volume_slice_labels


@dataclass
class WeakCase:
    """One training case on the working grid."""
    case_id: str
    kind: str                        # couinaud | volume | mask
    image: np.ndarray                # (z, h, w) windowed to [0, 1]
    liver: np.ndarray                # (z, h, w) bool
    couinaud: np.ndarray             # (z, h, w) uint8 0..8
    pathological: bool
    segments: list | None            # labelled segments; None = volume-level (anywhere in the liver)
    slice_mm: float
    tumour: np.ndarray | None = None    # (z, h, w) bool pixel labels (mask cases)
    liver_source: str = "mask"
    landmarks: dict = field(default_factory=dict)

    def image_labels(self) -> np.ndarray:
        """Slice labels before refinement (mask cases: the truth of their own mask)."""
        if self.tumour is not None:
            return self.tumour.any(axis=(1, 2)).astype(np.int64)
        return volume_slice_labels(self.image.shape[0], self.pathological)

    def refined_labels(self, use_ilr: bool, min_pixels: int = 1) -> np.ndarray:
        labels = self.image_labels()
        if use_ilr and self.tumour is None:
            labels = ilr(labels, self.couinaud, self.segments, min_pixels)
        return labels

    def region(self, z) -> np.ndarray:
        """Where slice ``z``'s tumour is said to be: the labelled segments, else the liver."""
        if self.segments is None:
            return self.couinaud[z] > 0
        return np.isin(self.couinaud[z], self.segments)


def _phase_of(case, cfg) -> str:
    phase = cfg["phase"] or case.reference
    if phase not in case.images:
        raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
    return phase


def working_volume(image: Volume, spacing_mm: float) -> Volume:
    """HU volume resampled in-plane to the working grid, with its world geometry (pixel edges kept)."""
    size = working_size(image.array.shape[1:], image.spacing[:2], spacing_mm)
    arr = resize_slices(torch.from_numpy(image.array.astype(np.float32))[:, None], size)[:, 0].numpy()
    ny, nx = image.array.shape[1:]
    fx, fy = nx / size[1], ny / size[0]
    sx, sy, sz = image.spacing
    shift = np.array([(fx - 1) / 2 * sx, (fy - 1) / 2 * sy, 0.0])     # centre of the first working pixel
    origin = np.asarray(image.origin) + image.direction @ shift
    return Volume(arr, (sx * fx, sy * fy, sz), tuple(origin), image.direction)


def labels_on_working(labels_zyx, size) -> np.ndarray:
    """0/1/2 label map -> working-grid labels (argmax of the resampled one-hot maps)."""
    return labels_to_working(labels_zyx, size).argmax(axis=1).astype(np.uint8)


def select_cases(dataset, cfg) -> list:
    """Training cases (split train) with a mask, Couinaud segments or a volume label."""
    chosen = []
    for case in dataset.cases.values():
        # a masked case with use_masks off and no weak label has an unknown tumour status:
        # it can only teach the liver (liver net), not the tumour
        if case.split == "train" and case_kind(case, cfg) != "liver_only":
            chosen.append(case)
    if not chosen:
        raise InputError(f"{dataset.root}: no training case (split train) with a mask, Couinaud segments or a "
                         f"volume label: recipe {NAME!r} needs them")
    return chosen


def case_kind(case, cfg) -> str:
    if case.mask is not None and cfg["use_masks"]:
        return "mask"
    if case.couinaud is not None:
        return "couinaud"
    if case.volume_label is not None:
        return "volume"
    return "liver_only"      # a mask case with use_masks off and no weak label, or an unlabelled case


def load_case(dataset, case, cfg, keep_original: bool = False) -> dict:
    """Working-grid images of one case: {"hu": Volume, "image": windowed, "mask": labels or None,
    "original": the input-grid image when ``keep_original``}."""
    image = dataset.read_image(case.id, _phase_of(case, cfg))
    hu = working_volume(image, cfg["spacing_mm"])
    mask = dataset.read_mask(case.id)
    return {"hu": hu, "image": window(hu.array, cfg["hu_window"]),
            "mask": None if mask is None else labels_on_working(mask.array, hu.array.shape[1:]),
            "original": image if keep_original else None}


def make_weak_case(case, loaded: dict, liver: np.ndarray, liver_source: str, cfg) -> WeakCase:
    """Couinaud map + labels of one case whose working-grid liver is known."""
    kind = case_kind(case, cfg)
    cm, lm = construct_couinaud(loaded["hu"], liver, cfg["constructor"], where=case.id, return_landmarks=True)
    mask = loaded["mask"]
    pathological = bool(case.couinaud) if case.couinaud is not None else case.volume_label == "tumour"
    segments = list(case.couinaud) if case.couinaud else None
    tumour = None
    if kind == "mask":
        tumour = mask == 2
        if tumour.any() or not pathological:
            pathological = bool(tumour.any())
        else:
            # a liver-only mask of a case labelled as tumorous (e.g. the liver drawn, segment VI ticked):
            # the mask gives the liver, the weak labels the tumour -- never train it as healthy
            kind, tumour = ("couinaud" if segments else "volume"), None
    return WeakCase(case.id, kind, loaded["image"], liver, cm.array, pathological, segments,
                    float(loaded["hu"].spacing[2]), tumour, liver_source, lm.to_json())
