"""Image I/O with SimpleITK: NIfTI, NRRD, MHA and DICOM series in; NIfTI / NRRD / .seg.nrrd out.

Geometry (spacing, origin, direction) is carried by ``Volume`` through every path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import Volume


def read_image(path) -> Volume:
    """Read a 3D image file (NIfTI, NRRD, MHA...) or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    try:
        if path.is_dir():
            return read_dicom_series(path)
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image ({_first_line(exc)})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    return Volume.from_sitk(image)


def read_dicom_series(folder) -> Volume:
    """Read the (first) DICOM series of a folder, slices sorted by position."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series ({_first_line(exc)})") from None
    return Volume.from_sitk(image)


def write_image(volume: Volume, path, compress: bool = True) -> Path:
    """Write a volume (NIfTI / NRRD / MHA by extension), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    sitk.WriteImage(volume.to_sitk(), str(tmp), compress)
    os.replace(tmp, path)
    return path


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
