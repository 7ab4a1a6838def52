"""A 3D image as a numpy array plus its physical geometry (ITK / LPS conventions).

``array`` is indexed ``[k, j, i]`` (z, y, x) like SimpleITK's ``GetArrayFromImage``; voxel
indices elsewhere are ``(i, j, k)``.  ``world = origin + direction @ (ijk * spacing)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape_xyz(self) -> tuple:
        """Grid size as (nx, ny, nz)."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def _matrix(self) -> np.ndarray:
        return self.direction @ np.diag(self.spacing)

    def index_to_world(self, ijk) -> np.ndarray:
        """Continuous (i, j, k) index (shape (3,) or (N, 3)) to LPS millimetres."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self._matrix().T + np.asarray(self.origin)

    def world_to_index(self, xyz) -> np.ndarray:
        """LPS millimetres (shape (3,) or (N, 3)) to continuous (i, j, k) index."""
        xyz = np.asarray(xyz, dtype=float) - np.asarray(self.origin)
        return xyz @ np.linalg.inv(self._matrix()).T

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * max(1.0, max(map(abs, self.origin + other.origin), default=1.0)))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def grid_difference(self, other: "Volume") -> str:
        """Human-readable description of how two grids differ ('' when they match)."""
        parts = []
        if self.array.shape != other.array.shape:
            parts.append(f"size {self.shape_xyz} vs {other.shape_xyz}")
        if not np.allclose(self.spacing, other.spacing, atol=1e-4):
            parts.append(f"spacing {self.spacing} vs {other.spacing}")
        if not np.allclose(self.origin, other.origin, atol=1e-3):
            parts.append(f"origin {self.origin} vs {other.origin}")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            parts.append("direction differs")
        return ", ".join(parts)

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxel data (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @staticmethod
    def from_sitk(image) -> "Volume":
        import SimpleITK as sitk

        return Volume(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
        )
