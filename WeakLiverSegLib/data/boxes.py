"""Axis-aligned boxes in the voxel grid of a case's reference image (plus their LPS corners).

Indices are ``(i, j, k)`` = ``(x, y, z)``, integers, inclusive on both ends; a 2D box has
``ijk_min[2] == ijk_max[2]``.  Arrays are ``(z, y, x)`` as everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from ..errors import InputError
from .volume import Volume

BOX_LABELS = ("liver", "tumor")
BOX_SOURCES = ("manual", "derived", "phantom", "perturbed", "slicer")
_LABEL_ALIASES = {"tumour": "tumor"}
_JSON_KEYS = ("label", "ijk_min", "ijk_max", "lps_min", "lps_max", "source")
_LPS_DECIMALS = 4  # 0.1 micrometre: round-trips through JSON unchanged

# The O2L paper's perturbation study (section IV-F): (scale range, corner shift fraction).
PAPER_PERTURBATION = {"liver": ((0.95, 1.1), 1 / 20), "tumor": ((0.9, 1.2), 1 / 10)}


@dataclass
class Box:
    label: str
    ijk_min: tuple
    ijk_max: tuple
    source: str = "manual"
    lps_min: tuple | None = None
    lps_max: tuple | None = None

    def __post_init__(self):
        self.ijk_min = tuple(int(v) for v in self.ijk_min)
        self.ijk_max = tuple(int(v) for v in self.ijk_max)
        if self.lps_min is not None:
            self.lps_min = tuple(float(v) for v in self.lps_min)
        if self.lps_max is not None:
            self.lps_max = tuple(float(v) for v in self.lps_max)

    @property
    def is_2d(self) -> bool:
        return self.ijk_min[2] == self.ijk_max[2]

    @property
    def size_ijk(self) -> tuple:
        return tuple(b - a + 1 for a, b in zip(self.ijk_min, self.ijk_max))

    def to_json(self) -> dict:
        out = {"label": self.label, "ijk_min": list(self.ijk_min), "ijk_max": list(self.ijk_max)}
        if self.lps_min is not None:
            out["lps_min"] = list(self.lps_min)
        if self.lps_max is not None:
            out["lps_max"] = list(self.lps_max)
        out["source"] = self.source
        return out

    @staticmethod
    def from_json(d, where: str = "box") -> "Box":
        """Parse one box dict, checking every field; errors start with ``where``."""
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected an object with label/ijk_min/ijk_max, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_JSON_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown field(s) {unknown} (allowed: {list(_JSON_KEYS)})")
        for key in ("label", "ijk_min", "ijk_max"):
            if key not in d:
                raise InputError(f"{where}: missing field '{key}'")
        label = _LABEL_ALIASES.get(d["label"], d["label"]) if isinstance(d["label"], str) else d["label"]
        box = Box(
            label=label,
            ijk_min=_int_triple(d["ijk_min"], f"{where} ijk_min"),
            ijk_max=_int_triple(d["ijk_max"], f"{where} ijk_max"),
            source=d.get("source", "manual"),
            lps_min=_float_triple(d.get("lps_min"), f"{where} lps_min"),
            lps_max=_float_triple(d.get("lps_max"), f"{where} lps_max"),
        )
        box.check_fields(where)
        return box

    def check_fields(self, where: str = "box") -> None:
        """Checks that need no image: label, source, min <= max, no negative index."""
        if self.label not in BOX_LABELS:
            raise InputError(f"{where}: label {self.label!r} is not one of {list(BOX_LABELS)}")
        if self.source not in BOX_SOURCES:
            raise InputError(f"{where}: source {self.source!r} is not one of {list(BOX_SOURCES)}")
        for axis, (lo, hi) in enumerate(zip(self.ijk_min, self.ijk_max)):
            if lo > hi:
                raise InputError(
                    f"{where}: ijk_min {list(self.ijk_min)} > ijk_max {list(self.ijk_max)} on axis {'ijk'[axis]}"
                )
        if min(self.ijk_min) < 0:
            raise InputError(f"{where}: ijk_min {list(self.ijk_min)} has a negative index")

    def validate(self, volume: Volume, where: str = "box") -> None:
        """min <= max per axis, inside ``volume``'s grid, world corners consistent with it."""
        self.check_fields(where)
        shape = volume.shape_xyz
        if any(hi >= n for hi, n in zip(self.ijk_max, shape)):
            raise InputError(f"{where}: ijk_max {list(self.ijk_max)} outside the image grid {shape}")
        # Stored world corners must land on the same voxels (a box drawn on one phase is
        # valid on the others only through them); more than half a voxel off = wrong image.
        for name, ijk, lps in (("lps_min", self.ijk_min, self.lps_min), ("lps_max", self.ijk_max, self.lps_max)):
            if lps is None:
                continue
            back = volume.world_to_index(lps)
            if np.any(np.abs(back - np.asarray(ijk)) > 0.5 + 1e-6):
                raise InputError(
                    f"{where}: {name} {list(lps)} maps to voxel {np.round(back, 2).tolist()} on this image, "
                    f"not {list(ijk)} (box and image disagree)"
                )

    def with_world(self, volume: Volume) -> "Box":
        """Copy with ``lps_min`` / ``lps_max`` set to the world positions of the corner voxel centres."""
        corners = volume.index_to_world(np.array([self.ijk_min, self.ijk_max], dtype=float))
        lps_min, lps_max = (tuple(round(float(v), _LPS_DECIMALS) + 0.0 for v in c) for c in corners)
        return replace(self, lps_min=lps_min, lps_max=lps_max)

    @staticmethod
    def from_world(lps_a, lps_b, volume: Volume, label: str, source: str = "manual", where: str = "") -> "Box":
        """Box spanning two opposite world corners (LPS mm), for any direction matrix.

        Each corner is mapped to a continuous index; per axis the smaller / larger one is
        rounded to the nearest voxel. A corner more than half a voxel outside the grid is an error.
        """
        where = where or f"{label} box"
        idx = volume.world_to_index(np.array([lps_a, lps_b], dtype=float))
        if not np.all(np.isfinite(idx)):
            raise InputError(f"{where}: world corners {list(lps_a)}, {list(lps_b)} are not finite numbers")
        shape = np.array(volume.shape_xyz)
        tol = 1e-6
        for corner, lps in zip(idx, (lps_a, lps_b)):
            if np.any(corner < -0.5 - tol) or np.any(corner > shape - 0.5 + tol):
                raise InputError(
                    f"{where}: world corner {[float(v) for v in lps]} is outside the image grid {tuple(shape.tolist())} "
                    f"(continuous index {np.round(corner, 2).tolist()})"
                )
        lo = np.clip(np.floor(idx.min(axis=0) + 0.5), 0, shape - 1).astype(int)
        hi = np.clip(np.floor(idx.max(axis=0) + 0.5), 0, shape - 1).astype(int)
        box = Box(label=_LABEL_ALIASES.get(label, label), ijk_min=tuple(lo), ijk_max=tuple(hi), source=source)
        box.check_fields(where)
        return box.with_world(volume)


def _int_triple(value, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InputError(f"{where}: expected a list of 3 integers (i, j, k), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise InputError(f"{where}: expected a list of 3 integers (i, j, k), got {value!r}")
        out.append(int(v))
    return tuple(out)


def _float_triple(value, where: str):
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
    ):
        raise InputError(f"{where}: expected a list of 3 finite numbers (LPS mm) or null, got {value!r}")
    return tuple(float(v) for v in value)


def _label_for_value(value: int) -> str:
    return "liver" if value == 1 else "tumor"


def _box_from_slices(slices, label: str, k=None) -> Box:
    """Box from a ``find_objects`` slice tuple: (z, y, x) for 3D, (y, x) on slice ``k`` for 2D."""
    if k is None:
        sz, sy, sx = slices
        lo, hi = (sx.start, sy.start, sz.start), (sx.stop - 1, sy.stop - 1, sz.stop - 1)
    else:
        sy, sx = slices
        lo, hi = (sx.start, sy.start, k), (sx.stop - 1, sy.stop - 1, k)
    return Box(label=label, ijk_min=lo, ijk_max=hi, source="derived")


def boxes_from_mask(label_map_zyx, value: int = 2, per_slice: bool = False, label: str | None = None) -> list:
    """Boxes around the connected components of ``label_map == value``.

    3D: one box per 26-connected component.  ``per_slice``: one 2D box per 8-connected
    component of each slice (ordered by slice, then raster order), the way a reader draws
    boxes slice by slice.  ``label`` defaults to "tumor" (value 2) / "liver" (value 1).
    """
    fg = np.asarray(label_map_zyx) == value
    if fg.ndim != 3:
        raise InputError(f"boxes_from_mask: expected a 3D (z, y, x) label map, got shape {fg.shape}")
    label = label or _label_for_value(value)
    if not per_slice:
        components, _ = ndimage.label(fg, structure=np.ones((3, 3, 3), dtype=bool))
        return [_box_from_slices(s, label) for s in ndimage.find_objects(components) if s is not None]
    boxes = []
    for k in np.flatnonzero(fg.any(axis=(1, 2))):
        components, _ = ndimage.label(fg[k], structure=np.ones((3, 3), dtype=bool))
        boxes += [_box_from_slices(s, label, int(k)) for s in ndimage.find_objects(components) if s is not None]
    return boxes


def liver_box_from_mask(label_map_zyx) -> Box | None:
    """Organ box: the bounding box of all labels >= 1 (liver including tumour); None if empty."""
    fg = np.asarray(label_map_zyx) >= 1
    if not fg.any():
        return None
    lo, hi = [], []
    for axis in (2, 1, 0):  # i (x), j (y), k (z)
        present = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(int(present[0]))
        hi.append(int(present[-1]))
    return Box(label="liver", ijk_min=tuple(lo), ijk_max=tuple(hi), source="derived")


def box_mask(shape_zyx, boxes) -> np.ndarray:
    """Boolean (z, y, x) mask, True inside any of the boxes (clipped to the grid)."""
    mask = np.zeros(tuple(shape_zyx), dtype=bool)
    for box in boxes:
        i0, j0, k0 = (max(v, 0) for v in box.ijk_min)
        i1, j1, k1 = box.ijk_max
        mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = True
    return mask


def perturb_box(box: Box, rng, scale_range=None, shift_fraction=None, shape_xyz=None) -> Box:
    """Simulate an imprecise annotator (O2L paper, section IV-F).

    Scale the box about its centre by one factor drawn from ``scale_range``, then move each
    corner (each min / max edge per axis) by a random amount of less than ``shift_fraction``
    of the corresponding side.  Defaults are the paper's values for the box's label (liver:
    0.95-1.1 and 1/20; tumour: 0.9-1.2 and 1/10).  The result is clipped to ``shape_xyz``
    when given; a 2D box stays on its slice.  ``rng`` is a ``numpy.random.Generator``.
    """
    default_scale, default_shift = PAPER_PERTURBATION.get(box.label, PAPER_PERTURBATION["tumor"])
    lo_scale, hi_scale = scale_range if scale_range is not None else default_scale
    shift = default_shift if shift_fraction is None else float(shift_fraction)
    axes = 2 if box.is_2d else 3
    # Continuous extent of the voxels: an inclusive box [a, b] covers [a - 0.5, b + 0.5].
    lo = np.asarray(box.ijk_min, dtype=float) - 0.5
    hi = np.asarray(box.ijk_max, dtype=float) + 0.5
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    half[:axes] *= rng.uniform(lo_scale, hi_scale)
    side = 2 * half
    new_lo, new_hi = centre - half, centre + half
    new_lo[:axes] += rng.uniform(-shift, shift, axes) * side[:axes]
    new_hi[:axes] += rng.uniform(-shift, shift, axes) * side[:axes]
    # Voxels whose centres fall inside the perturbed extent.
    ijk_min = np.ceil(new_lo - 1e-9).astype(int)
    ijk_max = np.floor(new_hi + 1e-9).astype(int)
    # Never collapse below one voxel: keep the voxel nearest the centre.
    collapsed = ijk_max < ijk_min
    mid = np.floor(centre + 0.5).astype(int)
    ijk_min[collapsed] = ijk_max[collapsed] = mid[collapsed]
    ijk_min[axes:], ijk_max[axes:] = box.ijk_min[axes:], box.ijk_max[axes:]
    if shape_xyz is not None:
        top = np.asarray(shape_xyz, dtype=int) - 1
        ijk_min, ijk_max = np.clip(ijk_min, 0, top), np.clip(ijk_max, 0, top)
    else:
        ijk_min, ijk_max = np.maximum(ijk_min, 0), np.maximum(ijk_max, 0)
    return Box(label=box.label, ijk_min=tuple(ijk_min), ijk_max=tuple(ijk_max), source="perturbed")


def radiologist_boxes(label_map_zyx, spacing, kind: str = "tight", seed: int = 0, margin_mm: float = 1.0,
                      loose_mm: float = 5.0) -> list:
    """Boxes as a radiologist draws them on a labelled case, for real-data experiments: a liver box
    (labels >= 1) and one 3D box per 26-connected tumour (label 2), each ``margin_mm`` larger than the
    object on every side (not tight to the voxel). ``kind``: "tight"; "loose" (every side a further
    uniform 0..``loose_mm`` mm, drawn with ``seed``); "2d" (tumour boxes on each tumour's largest slice)."""
    if kind not in ("tight", "loose", "2d"):
        raise InputError(f"radiologist_boxes: kind {kind!r} is not tight, loose or 2d")
    label_map_zyx = np.asarray(label_map_zyx)
    rng = np.random.default_rng(seed)
    shape_xyz = label_map_zyx.shape[::-1]

    def box(name, sl, flat_k=None):
        lo = np.array([sl[2].start, sl[1].start, sl[0].start])
        hi = np.array([sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1])
        m_lo, m_hi = np.full(3, margin_mm), np.full(3, margin_mm)
        if kind == "loose":
            m_lo, m_hi = m_lo + rng.uniform(0, loose_mm, 3), m_hi + rng.uniform(0, loose_mm, 3)
        if flat_k is not None:
            lo[2] = hi[2] = flat_k
            m_lo[2] = m_hi[2] = 0
        step = np.asarray(spacing, dtype=float)
        lo = np.maximum(lo - np.ceil(m_lo / step - 1e-9), 0).astype(int)
        hi = np.minimum(hi + np.ceil(m_hi / step - 1e-9), np.asarray(shape_xyz) - 1).astype(int)
        return Box(name, tuple(lo), tuple(hi), source="derived")

    boxes = []
    organ = ndimage.find_objects((label_map_zyx >= 1).astype(np.uint8))
    if organ and organ[0] is not None:
        boxes.append(box("liver", organ[0]))
    comps, _ = ndimage.label(label_map_zyx == 2, structure=np.ones((3, 3, 3), dtype=bool))
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        if kind == "2d":
            k = sl[0].start + int(np.argmax((comps[sl] == i).sum(axis=(1, 2))))
            plane = ndimage.find_objects((comps[k] == i).astype(np.uint8))[0]
            boxes.append(box("tumor", (slice(k, k + 1),) + plane, flat_k=k))
        else:
            boxes.append(box("tumor", sl))
    return boxes
