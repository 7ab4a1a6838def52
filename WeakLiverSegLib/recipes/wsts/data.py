"""wsts data: a two-phase store case -> working-grid slices, labels and tumour boxes (``WCase``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...data.boxes import boxes_from_mask
from ...errors import InputError
from ...learn.slices import image_to_working, labels_to_working, lesion_boxes_for_slices
from ...learn.training import check_cancelled


@dataclass
class WCase:
    """One case on the working grid: images per phase, targets, per-slice tumour boxes (working pixels)."""
    id: str
    kind: str                                   # pixel | box | test
    images: dict                                # phase -> (z, h, w) float32 in [0, 1]
    tumour: np.ndarray | None = None            # (z, h, w) float32 target (pixel cases)
    liver: np.ndarray | None = None             # liver incl. tumour (pixel cases)
    boxes: dict = field(default_factory=dict)   # slice -> (n, 4) (cx, cy, w, h)
    pseudo: np.ndarray | None = None            # USSE tumour probability (box cases)
    det: dict = field(default_factory=dict)     # role -> (z, 4) detection boxes, working pixels

    @property
    def shape(self) -> tuple:
        return next(iter(self.images.values())).shape

    @property
    def tumour_slices(self) -> np.ndarray:
        return np.array(sorted(self.boxes), np.int64)

    def dominant(self, k: int) -> np.ndarray:
        """The largest tumour box of slice k (the paper labels the dominant lesion)."""
        b = self.boxes[k]
        return b[int(np.argmax(b[:, 2] * b[:, 3]))]


def _box_to_work(box, shape_zyx, work_hw) -> tuple:
    """Store box (inclusive voxel indices) -> (k range, (cx, cy, w, h) on the working grid)."""
    nz, ny, nx = shape_zyx
    h, w = work_hw
    x0, x1 = box.ijk_min[0] * w / nx, (box.ijk_max[0] + 1) * w / nx
    y0, y1 = box.ijk_min[1] * h / ny, (box.ijk_max[1] + 1) * h / ny
    k0, k1 = max(box.ijk_min[2], 0), min(box.ijk_max[2], nz - 1)
    return range(k0, k1 + 1), np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], np.float32)


def slice_boxes(tumour_boxes, shape_zyx, work_hw) -> dict:
    """Store tumour boxes -> {slice: (n, 4) working-grid boxes}; 3D boxes cover every slice of their range."""
    out = {}
    for box in tumour_boxes:
        ks, b = _box_to_work(box, shape_zyx, work_hw)
        for k in ks:
            out.setdefault(int(k), []).append(b)
    return {k: np.stack(v) for k, v in out.items()}


def prepare_case(case_id: str, images: dict, cfg: dict, kind: str, labels=None, tumour_boxes=()) -> WCase:
    """Volumes (phase -> Volume, same grid) -> WCase.  ``labels`` (0/1/2 array) for pixel cases; else store boxes."""
    work = {}
    for phase, vol in images.items():
        work[phase] = image_to_working(vol.array, vol.spacing[:2], cfg["spacing_mm"], cfg["hu_window"][phase])
    ref = next(iter(images.values()))
    size = next(iter(work.values())).shape[1:]
    case = WCase(case_id, kind, work)
    if labels is not None:
        probs = labels_to_working(labels, size)
        case.tumour = probs[:, 2].copy()
        case.liver = (probs[:, 1] + probs[:, 2]).copy()
        tumour_boxes = boxes_from_mask(labels, 2, per_slice=True)
    case.boxes = slice_boxes(tumour_boxes, ref.array.shape, size)
    return case


def _phase_volumes(dataset, case, phases) -> dict:
    missing = [p for p in phases if p not in case.images]
    if missing:
        raise InputError(f"{case.id}: recipe wsts needs the image phases {list(phases)}; this case has "
                         f"{sorted(case.images)} (missing {missing})")
    vols = {p: dataset.read_image(case.id, p) for p in phases}
    ref = vols[phases[0]]
    for p, v in vols.items():
        if v.array.shape != ref.array.shape:
            raise InputError(f"{case.id}: phase {p!r} grid {v.array.shape} differs from {phases[0]!r} {ref.array.shape}")
    return vols


def select_cases(dataset, cfg) -> tuple:
    """(pixel cases, box cases, val cases) of the store: train split with a mask / with boxes only."""
    pixel = dataset.cases_with("mask", split="train")
    box = [c for c in dataset.cases_with("boxes", split="train") if c.mask is None]
    val = dataset.cases_with("mask", split="val")
    return pixel, box, val


def load_cases(dataset, cases, kind, cfg, progress=None, offset=0, total=None) -> list:
    phases = (cfg["teacher_phase"], cfg["student_phase"])
    out = []
    for n, case in enumerate(cases):
        check_cancelled(progress)
        vols = _phase_volumes(dataset, case, phases)
        labels = dataset.read_mask(case.id).array if kind == "pixel" else None
        tumours = [] if labels is not None else lesion_boxes_for_slices(case.boxes)
        out.append(prepare_case(case.id, vols, cfg, kind, labels=labels, tumour_boxes=tumours))
        if progress is not None:
            progress.update("prepare", offset + n + 1, total or len(cases))
    return out
