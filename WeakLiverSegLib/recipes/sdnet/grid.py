"""sdnet working grid: isotropic resampling of images and masks."""

from __future__ import annotations

import numpy as np

from ...data.imageio import resample_to
from ...data.volume import Volume
from ...learn.slices import window


def working_grid(volume: Volume, spacing_mm) -> Volume:
    """An empty LPS-aligned grid (identity direction) over ``volume``'s field of view, ``spacing_mm`` voxels.

    Whatever the input's direction matrix (e.g. a RAS-flipped NIfTI), the networks then see
    every volume the same way round: x towards the patient's left, y posterior, z superior.
    The grid's outer edges are those of the input's bounding box in world space (up to rounding).
    """
    spacing_out = np.asarray(spacing_mm, float)
    n = np.asarray(volume.shape_xyz, float)
    # the 8 outer corners of the input's voxels (index -0.5 and n - 0.5 on each axis)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    world = volume.index_to_world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    size = np.maximum(1, np.round((hi - lo) / spacing_out - 1e-6)).astype(int)
    centre = (lo + hi) / 2.0
    origin = centre - (size - 1) / 2.0 * spacing_out    # centred on the field of view
    return Volume(np.zeros(tuple(size[::-1]), np.uint8), tuple(spacing_out), tuple(origin), np.eye(3))


def image_to_working(volume: Volume, spacing_mm, hu_window) -> tuple:
    """HU volume -> (windowed float32 (z, y, x) on the working grid, the grid)."""
    grid = working_grid(volume, spacing_mm)
    vol = volume.with_array(volume.array.astype(np.float32, copy=False))
    work = resample_to(vol, grid, "linear")
    return window(work.array, hu_window), grid


def mask_to_working(mask: Volume, grid: Volume) -> np.ndarray:
    """Liver (labels >= 1) on the working grid: uint8 0/1 (linear on the 0/1 mask, >= 0.5)."""
    liver = mask.with_array((mask.array >= 1).astype(np.float32))
    return (resample_to(liver, grid, "linear", default=0.0).array >= 0.5).astype(np.uint8)
