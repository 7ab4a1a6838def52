"""Image I/O with SimpleITK: NIfTI, NRRD, MHA and DICOM series in; NIfTI / NRRD / MHA and
Slicer ``.seg.nrrd`` out; checks (finite voxels, same grid) and resampling onto another grid.

Geometry (spacing, origin, direction) is carried by ``Volume`` through every path. NRRD and
MHA store it in double precision (exact round trip); NIfTI stores it as float32 (about 1e-6
relative error), which is the format's limit.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .safeio import check_written, fsync_file, make_parent, os_reason, short_write_reason
from .terminology import segment_styles
from .volume import Volume

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")  # written; any SimpleITK format is read

SEG_NRRD_SUFFIX = ".seg.nrrd"


# ----------------------------------------------------------------------------------- reading


def read_image(path) -> Volume:
    """Read a scalar 3D image file (NIfTI, NRRD, MHA...) or a DICOM series folder.

    Raises InputError for a missing or unreadable file, a 2D image (or a single slice), a 4D
    series and vector (multi-component) images.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    if path.is_dir():
        return read_dicom_series(path)
    if path.suffix.lower() in ("", ".dcm") and _is_dicom_seg(path):
        raise InputError(f"{path}: is a DICOM SEG (a segmentation), not an image; give it where a mask or label map is expected")
    _refuse_non_image_dicom(path)
    itk = []
    try:
        with itk_messages(itk):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            image_io = reader.GetImageIOFromFileName(str(path))
            if image_io == "NiftiImageIO":
                _check_nifti_complete(path)
                _check_nifti_finite(path)
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image, the file is corrupt or not a NIfTI/NRRD/MHA/DICOM image "
                         f"({_first_line(exc)}{_itk_warnings(itk)})") from None
    is_dicom = image_io == "GDCMImageIO"
    if is_dicom and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise InputError(f"{path}: is a single DICOM slice (2D); a 3D image is needed: give the folder holding the whole series")
    return _as_scalar_3d(image, path)


def _check_nifti_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without a word: compare the data size with the header's."""
    sizes = _nifti_sizes(path)
    if sizes is not None and sizes[0] < sizes[1]:
        actual, expected = sizes
        raise InputError(f"{path}: NIfTI file is truncated ({actual} of the {expected} bytes of header and image "
                         f"data are present); the file was cut short by an interrupted copy, download or write")


def _nifti_sizes(path: Path):
    """(bytes present, bytes the header promises) of a single-file NIfTI (.nii / .nii.gz), or None
    when there is nothing to compare (not NIfTI-1/2, a .hdr/.img pair, unreadable: ITK says why)."""
    gz = path.name.lower().endswith(".gz")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(544)
    except (OSError, EOFError, zlib.error):
        return None
    expected = _nifti_expected_size(header)
    if expected is None:
        return None
    if not gz:
        return path.stat().st_size, expected
    with open(path, "rb") as raw:  # gzip trailer: uncompressed size mod 2**32 (one member)
        raw.seek(-4, os.SEEK_END)
        trailer = struct.unpack("<I", raw.read(4))[0]
    if trailer == expected % 2**32:
        return expected, expected
    return _gzip_data_size(path), expected  # trailer disagrees (truncated or multi-member): count


def _gzip_data_size(path: Path) -> int:
    """Bytes a gzip file decompresses to, counting up to where a truncated or damaged one ends."""
    actual = 0
    with open(path, "rb") as raw:
        while True:  # one gzip member after the other
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                while chunk := raw.read(1 << 20):
                    actual += len(inflater.decompress(chunk))
                    if inflater.eof:
                        break
            except zlib.error:
                return actual
            if not inflater.eof or not inflater.unused_data.strip(b"\0"):
                return actual
            raw.seek(-len(inflater.unused_data), os.SEEK_CUR)


def _check_nifti_finite(path: Path) -> None:
    """ITK 5.4's NIfTI reader silently turns NaN/inf voxels into 0: look at float data ourselves."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(348)
            for endian in "<>":
                if len(header) == 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
                    datatype = struct.unpack(endian + "h", header[70:72])[0]
                    offset = int(struct.unpack(endian + "f", header[108:112])[0])
                    break
            else:
                return  # NIfTI-2 or a pair of files: ITK's own reading applies
            dtype = {16: "f4", 64: "f8"}.get(datatype)
            if dtype is None:
                return  # integer data cannot hold NaN
            stream.read(max(0, offset - 348))
            bad = 0
            while chunk := stream.read(1 << 24):
                usable = len(chunk) - len(chunk) % np.dtype(dtype).itemsize
                bad += int((~np.isfinite(np.frombuffer(chunk[:usable], dtype=endian + dtype))).sum())
    except (OSError, EOFError, zlib.error):
        return  # unreadable: ITK's own error message follows
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them before use")


def _nifti_expected_size(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1 or NIfTI-2 single-file header, else None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 and header[4:7] == b"n+2":
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0:
            return None
        return offset + int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]])) * bitpix // 8
    return None


def read_dicom_series(folder) -> Volume:
    """Read the DICOM series of a folder (the one with most slices), slices sorted by position.

    Refuses series whose slices are not evenly spaced (missing slices would silently stretch
    the geometry otherwise).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        for path in sorted(folder.iterdir())[:200]:  # a folder of SEG / RT STRUCT files only: say so
            if path.is_file():
                _refuse_non_image_dicom(path, folder)
        raise InputError(f"{folder}: no DICOM series found in this folder")
    files = max((reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series), key=len)
    _refuse_non_image_dicom(Path(files[0]), folder)
    if len(files) < 2:
        raise InputError(f"{folder}: the DICOM series has a single slice (2D); a 3D image is needed")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    itk = []
    try:
        with itk_messages(itk):
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series ({_first_line(exc)}{_itk_warnings(itk)})") from None
    _check_even_slices(reader, image, folder)
    return _as_scalar_3d(image, folder)


def _check_even_slices(reader, image, folder) -> None:
    """Slice positions along the slice normal must be evenly spaced (no gaps, no duplicates)."""
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = []
    for index in range(image.GetSize()[2]):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return  # no positions (e.g. secondary capture): nothing to check against
        try:
            positions.append([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])
        except ValueError:
            return
    steps = np.diff(np.asarray(positions) @ normal)
    if steps.size and (np.min(np.abs(steps)) < 1e-3 or np.ptp(steps) > max(0.01, 0.01 * abs(np.median(steps)))):
        raise InputError(
            f"{folder}: DICOM slices are not evenly spaced (steps {np.min(steps):.3f} to {np.max(steps):.3f} mm): "
            "missing or duplicate slices"
        )


def _as_scalar_3d(image, where) -> Volume:
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    dim = image.GetDimension()
    if dim == 2:
        raise InputError(f"{where}: is a 2D image (size {image.GetSize()}); a 3D image is needed")
    if dim != 3:
        raise InputError(f"{where}: is a {dim}D image (size {image.GetSize()}); a 3D image is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{where}: is a vector image ({image.GetNumberOfComponentsPerPixel()} components per voxel); "
            "a scalar (grey-level) 3D image is needed"
        )
    if 1 in image.GetSize():
        raise InputError(f"{where}: has a single slice (size {image.GetSize()}), i.e. it is 2D; a 3D image is needed")
    return Volume.from_sitk(image)


# ------------------------------------------------------------------------------------ checks


def check_finite(volume: Volume, where) -> None:
    """InputError naming ``where`` when any voxel is NaN or infinite."""
    if not np.issubdtype(volume.array.dtype, np.floating):
        return
    bad = int(volume.array.size - np.count_nonzero(np.isfinite(volume.array)))
    if bad:
        raise InputError(f"{where}: {bad} of {volume.array.size} voxels are NaN or infinite")


def check_same_grid(reference: Volume, other: Volume, where) -> None:
    """InputError naming ``where`` and the difference when ``other`` is not on ``reference``'s grid."""
    if not reference.same_grid(other):
        difference = reference.grid_difference(other) or "geometry differs beyond tolerance"
        raise InputError(
            f"{where}: not on the reference grid ({difference}); resample it onto the reference first"
        )


# -------------------------------------------------------------------------------- resampling


def resample_to(volume: Volume, reference: Volume, interpolation: str = "linear", default=None) -> Volume:
    """``volume`` resampled onto ``reference``'s grid (world space, identity transform).

    ``interpolation``: ``"linear"`` for intensities, ``"nearest"`` for label maps. Voxels that
    fall outside ``volume`` get ``default`` (None: 0 for nearest, the volume's minimum, e.g.
    air in CT, for linear). The voxel type is kept.
    """
    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in interpolators:
        raise ValueError(f"interpolation must be one of {sorted(interpolators)}, got {interpolation!r}")
    if default is None:
        default = 0.0 if interpolation == "nearest" or volume.array.size == 0 else float(np.min(volume.array))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(reference.shape_xyz)
    resampler.SetOutputSpacing(reference.spacing)
    resampler.SetOutputOrigin(reference.origin)
    resampler.SetOutputDirection(tuple(reference.direction.ravel()))
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(interpolators[interpolation])
    resampler.SetDefaultPixelValue(float(default))
    source = volume.with_array(volume.array.astype(np.uint8)) if volume.array.dtype == bool else volume
    out = sitk.GetArrayFromImage(resampler.Execute(source.to_sitk()))
    return reference.with_array(out.astype(bool) if volume.array.dtype == bool else out)


# ----------------------------------------------------------------------------------- writing


def write_image(volume: Volume, path, compress: bool = True) -> Path:
    """Write a volume (NIfTI / NRRD / MHA by extension), atomically (temp file + rename).

    Single-file formats only: a detached header (.nhdr, .mhd) could not be renamed atomically.
    """
    path = Path(path)
    if path.name.endswith(SEG_NRRD_SUFFIX):
        raise InputError(f"{path}: use write_seg_nrrd (or write_label_map) for Slicer segmentation files")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(f"{path}: unknown image file extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    make_parent(path, "image")
    itk = []

    def write(tmp):
        with itk_messages(itk):
            sitk.WriteImage(volume.to_sitk(), str(tmp), compress)
            _verify_image_file(tmp, volume)

    return _write_verified(path, "image", write, (RuntimeError, OSError), lambda: _itk_warnings(itk))


def _verify_image_file(tmp: Path, volume: Volume) -> None:
    """Read back what a writer produced before it replaces anything: OSError when the file is empty,
    short (a full disk that the writer did not report), or its header disagrees with ``volume``."""
    check_written(tmp)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
        if tuple(reader.GetSize()) != tuple(volume.shape_xyz):
            raise OSError(f"the written header says size {reader.GetSize()}, not {volume.shape_xyz}")
        if reader.GetImageIOFromFileName(str(tmp)) == "NiftiImageIO":
            sizes = _nifti_sizes(tmp)
            if sizes is None or sizes[0] < sizes[1]:
                raise OSError(short_write_reason(tmp.parent, *(sizes or (os.path.getsize(tmp), None))))
        else:
            reader.Execute()  # NRRD / MHA readers detect missing data themselves
    except RuntimeError:
        raise OSError(short_write_reason(tmp.parent, os.path.getsize(tmp))) from None


def write_label_map(volume: Volume, path, segments=None) -> Path:
    """Write a label map as uint8: Slicer ``.seg.nrrd`` or NIfTI / NRRD / MHA by extension."""
    label_map = _as_label_map(volume, path)
    if Path(path).suffix.lower() == ".dcm":
        raise InputError(f"{path}: a DICOM SEG needs its source DICOM series; write it with data.dicom_seg.write_dicom_seg "
                         "(weakliverseg segment --input DICOM_DIR --out FILE.dcm, or weakliverseg dicomseg)")
    if Path(path).name.endswith(SEG_NRRD_SUFFIX):
        return write_seg_nrrd(label_map, path, segments)
    return write_image(label_map, path)


def read_label_map(path, reference: Volume | None = None) -> Volume:
    """Read a label map in the WeakLiverSeg convention (uint8: 0 background, 1 liver, 2 tumour).

    A ``.seg.nrrd`` is mapped segment by segment (terminology, then name: "Liver" -> 1,
    "Liver tumor" -> 2; the tumour wins where segments overlap); so is a DICOM SEG
    (``dicom_seg.read_dicom_seg``; with ``reference``, its frames are placed on that image's
    grid); any other file is read as is and must hold only integer values 0..255.
    """
    if Path(path).suffix.lower() in ("", ".dcm") and _is_dicom_seg(path):
        from .dicom_seg import read_dicom_seg

        return read_dicom_seg(path, reference=reference)
    if Path(path).name.endswith(SEG_NRRD_SUFFIX):
        from .terminology import style_for_segment

        label_map, segments = read_seg_nrrd(path)
        styles = segment_styles()
        out = np.zeros(label_map.array.shape, np.uint8)
        for label in styles:  # ordered by label value: tumour painted last
            for segment in segments:
                if style_for_segment(segment) == label:
                    out[label_map.array == segment["label_value"]] = styles[label]["label_value"]
        unknown = [s["name"] for s in segments if style_for_segment(s) is None and np.any(label_map.array == s["label_value"])]
        if unknown:
            raise InputError(f"{path}: segments {unknown} are neither liver nor liver tumour (expected names {[s['name'] for s in styles.values()]})")
        return label_map.with_array(out)
    return _as_label_map(read_image(path), path)


def _as_label_map(volume: Volume, where) -> Volume:
    array = volume.array
    if array.dtype == np.uint8:
        return volume
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError(f"{where}: a label map must hold whole numbers, found fractional or NaN values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"{where}: label values must be 0..255, found {array.min()}..{array.max()}")
    return volume.with_array(array.astype(np.uint8))


def write_seg_nrrd(label_map: Volume, path, segments=None) -> Path:
    """Write a label map as a Slicer segmentation (``.seg.nrrd``), atomically.

    ``segments``: None for the WeakLiverSeg labels (1 "Liver", 2 "Liver tumor", with their
    colours and SNOMED CT terminology, both written even when empty), or a list whose items
    are label names of ``segment_styles()`` or dicts with ``label_value``, ``name`` and
    optional ``color`` (RGB 0..1), ``terminology``, ``id`` (as returned by ``read_seg_nrrd``).
    Every non-zero value of the map must belong to a segment. Slicer reads the file back with
    these names, colours, label values and the exact geometry.
    """
    import slicerio

    path = Path(path)
    if not path.name.endswith(SEG_NRRD_SUFFIX):
        raise InputError(f"{path}: a Slicer segmentation file name must end with {SEG_NRRD_SUFFIX}")
    label_map = _as_label_map(label_map, path)
    entries = _segment_entries(segments, path)
    values = {int(v) for v in np.unique(label_map.array)} - {0}
    missing = sorted(values - {e["labelValue"] for e in entries})
    if missing:
        known = ", ".join(f"{e['labelValue']}={e['name']}" for e in entries)
        raise InputError(f"{path}: label values {missing} of the label map have no segment (segments: {known})")

    voxels = np.ascontiguousarray(label_map.array.transpose(2, 1, 0))  # (i, j, k) for index order F
    for entry in entries:
        indices = np.nonzero(voxels == entry["labelValue"])
        entry["extent"] = ([int(v) for axis in indices for v in (axis.min(), axis.max())]
                           if indices[0].size else [0, -1, 0, -1, 0, -1])
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = label_map.direction @ np.diag(label_map.spacing)
    ijk_to_lps[:3, 3] = label_map.origin
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": entries,
    }
    make_parent(path, "segmentation")

    def write(tmp):
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=6)
        _verify_seg_nrrd(tmp, voxels.shape)

    return _write_verified(path, "segmentation", write, (OSError, ValueError))


def _verify_seg_nrrd(tmp: Path, shape) -> None:
    """Read a written ``.seg.nrrd`` back whole (pynrrd checks the data size): OSError when short."""
    import nrrd

    check_written(tmp)
    try:
        data, _ = nrrd.read(str(tmp))
    except Exception as exc:  # pynrrd: NRRDError, ValueError, zlib.error, EOFError...
        raise OSError(f"{short_write_reason(tmp.parent, os.path.getsize(tmp))} ({_first_line(exc)})") from None
    if tuple(data.shape[-3:]) != tuple(shape):
        raise OSError(f"the written segmentation has shape {data.shape}, not {tuple(shape)}")


def _segment_entries(segments, where) -> list:
    """slicerio segment dicts (labelValue, name, color, terminology, id, layer) from our spec."""
    styles = segment_styles()
    if segments is None:
        segments = list(styles)
    entries, seen = [], set()
    for index, item in enumerate(segments):
        if isinstance(item, str):
            if item not in styles:
                raise InputError(f"{where}: unknown segment {item!r}; known: {sorted(styles)}")
            item = styles[item]
        try:
            value = int(item["label_value"])
            name = str(item["name"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: segment {index} needs a 'label_value' and a 'name'") from None
        if not 1 <= value <= 255 or value in seen:
            raise InputError(f"{where}: segment {name!r} has an invalid or repeated label value {value}")
        seen.add(value)
        entry = {"id": str(item.get("id") or f"Segment_{value}"), "name": name, "labelValue": value, "layer": 0,
                 "nameAutoGenerated": False}
        if item.get("color") is not None:
            entry["color"] = [float(c) for c in item["color"]]
            entry["colorAutoGenerated"] = False
        if item.get("terminology"):
            entry["terminology"] = item["terminology"]
        entries.append(entry)
    return entries


def read_seg_nrrd(path):
    """Read a Slicer ``.seg.nrrd``: ``(label map Volume, segments)``.

    Segments: dicts with ``id``, ``name``, ``label_value`` (its value in the returned map),
    ``color`` (RGB 0..1 or None) and ``terminology`` (dict or None). A multi-layer file
    (overlapping segments) is flattened with one new label value per segment, later segments
    drawn over earlier ones.
    """
    import slicerio

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: segmentation file not found")
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise IOError, NRRDError, ValueError...
        raise InputError(f"{path}: cannot read Slicer segmentation ({_first_line(exc)})") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim not in (3, 4):
        raise InputError(f"{path}: segmentation voxels have {voxels.ndim} dimensions, expected 3 or 4")
    matrix = np.asarray(seg["ijkToLPS"], dtype=float)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing == 0):
        raise InputError(f"{path}: segmentation has a zero voxel spacing")
    geometry = dict(spacing=tuple(spacing), origin=tuple(np.asarray(seg["ijkToLPS"], float)[:3, 3]),
                    direction=matrix / spacing)

    segments = []
    raw = seg.get("segments", [])
    if voxels.ndim == 3:
        array = voxels.transpose(2, 1, 0)
        out_values = [int(s.get("labelValue", 1)) for s in raw]
    else:
        layers = voxels.transpose(0, 3, 2, 1)
        array = np.zeros(layers.shape[1:], dtype=np.uint8 if len(raw) < 256 else np.uint16)
        out_values = list(range(1, len(raw) + 1))
        for segment, value in zip(raw, out_values):
            array[layers[int(segment.get("layer", 0))] == int(segment.get("labelValue", 1))] = value
    if not raw:  # a plain NRRD label map: one unnamed segment per value, as slicerio does for NIfTI
        out_values = [int(v) for v in np.unique(array) if v != 0]
        raw = [{"id": f"Segment_{v}", "name": f"Segment_{v}"} for v in out_values]
    for segment, value in zip(raw, out_values):
        segments.append({
            "id": segment.get("id"),
            "name": segment.get("name", segment.get("id")),
            "label_value": value,
            "color": tuple(segment["color"]) if segment.get("color") else None,
            "terminology": segment.get("terminology"),
        })
    return Volume(np.ascontiguousarray(array), **geometry), segments


# ----------------------------------------------------------------------------------- helpers


def _is_dicom_seg(path) -> bool:
    from .dicom_seg import is_dicom_seg

    return is_dicom_seg(path)


def _write_verified(path: Path, what: str, write, errors, extra=lambda: "") -> Path:
    """``write(tmp)`` writes and checks a temp file beside ``path``, which is then fsynced and renamed
    over ``path``; on ``errors`` an InputError names the path and the OS reason, the temp file is
    removed and a previous file stays as it was."""
    tmp = _temp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except errors as exc:
        raise InputError(f"{path}: cannot write {what} ({os_reason(exc)}{extra()}); "
                         f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temp_name(path: Path) -> Path:
    """Hidden temp file beside ``path`` with the same extension (writers pick format by it)."""
    name = path.name
    suffix = next((s for s in (SEG_NRRD_SUFFIX,) + IMAGE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    return path.with_name(f".{name}.tmp{os.getpid()}{suffix}")


def _first_line(exc: Exception) -> str:
    """The informative line of an ITK / library exception (ITK puts it last)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text.replace("sitk::ERROR: ", "")


# ------------------------------------------------------------------------ ITK's own messages

_CAPTURE = threading.Lock()
_ITK_WARNING = re.compile(r"^\s*(?:WARNING|ERROR): In .*, line \d+\s*$")
_ITK_SOURCE = re.compile(r"^\s*\w+ \(0x[0-9a-fA-F]+\): ")


@contextmanager
def itk_messages(into: list):
    """Capture what ITK prints on the process's stderr (its ``WARNING: In ...`` blocks) during the
    ``with`` block into ``into`` (one string), instead of letting it reach the terminal: callers fold
    it into their one-line error, or drop it when the operation succeeded.  Captures nothing (and
    lets ITK print) where stderr has no file descriptor or another thread is capturing."""
    saved = None
    if _CAPTURE.acquire(blocking=False):
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            sink = tempfile.TemporaryFile()
            os.dup2(sink.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            if saved is not None:
                os.close(saved)
            saved = None
            _CAPTURE.release()
    try:
        yield into
    finally:
        if saved is not None:
            try:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                into.append(sink.read().decode("utf-8", "replace"))
                sink.close()
            finally:
                _CAPTURE.release()


def _itk_warnings(captured: list) -> str:
    """``"; ITK: <message>; <message>"`` from captured ITK output (the source-file lines dropped)."""
    messages = []
    for text in captured:
        for line in text.splitlines():
            if not line.strip() or _ITK_WARNING.match(line):
                continue
            line = _ITK_SOURCE.sub("", line).strip()
            if line not in messages:
                messages.append(line)
    return f"; ITK: {' / '.join(messages)}" if messages else ""


# ------------------------------------------------------------------- what a DICOM file really is

_NON_IMAGE_DICOM = {  # SOP Class UID -> what the file is
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (segmentation) object",
    "1.2.840.10008.5.1.4.1.1.481.3": "a DICOM RT STRUCT (contours)",
    "1.2.840.10008.5.1.4.1.1.481.5": "a DICOM RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "a DICOM RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.481.2": "a DICOM RT Dose grid",
    "1.2.840.10008.5.1.4.1.1.481.4": "a DICOM RT Beams Treatment Record",
    "1.2.840.10008.5.1.4.1.1.66": "a DICOM Raw Data object",
    "1.2.840.10008.5.1.4.1.1.66.1": "a DICOM Spatial Registration object",
    "1.2.840.10008.5.1.4.1.1.66.2": "a DICOM Spatial Fiducials object",
    "1.2.840.10008.5.1.4.1.1.66.3": "a DICOM Deformable Registration object",
    "1.2.840.10008.5.1.4.1.1.11.1": "a DICOM Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.59": "a DICOM Key Object Selection document",
    "1.2.840.10008.5.1.4.1.1.104.1": "a DICOM encapsulated PDF",
}
_NON_IMAGE_MODALITIES = {"SEG": "a DICOM SEG (segmentation) object", "RTSTRUCT": "a DICOM RT STRUCT (contours)",
                         "RTPLAN": "a DICOM RT Plan", "RTDOSE": "a DICOM RT Dose grid", "SR": "a DICOM Structured Report",
                         "PR": "a DICOM Presentation State", "KO": "a DICOM Key Object Selection document",
                         "REG": "a DICOM registration object", "FID": "a DICOM Spatial Fiducials object",
                         "DOC": "a DICOM document"}
_UID_AT = re.compile(rb"\x02\x00\x02\x00(?:UI(..)|(....))", re.S)
_MODALITY_AT = re.compile(rb"\x08\x00\x60\x00(?:CS(..)|(....))", re.S)


def dicom_kind(path) -> str | None:
    """What a DICOM file holds when it is not an image series slice (SEG, RT STRUCT, RT Dose, SR...),
    from its SOP Class UID (or Modality); None for image files and non-DICOM files."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    match = _UID_AT.search(head, 132)
    if match:
        length = struct.unpack("<H", match.group(1))[0] if match.group(1) else struct.unpack("<I", match.group(2))[0]
        uid = head[match.end():match.end() + length].rstrip(b"\0 ").decode("ascii", "replace")
        if uid in _NON_IMAGE_DICOM:
            return _NON_IMAGE_DICOM[uid]
        if uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
            return "a DICOM Structured Report"
    match = _MODALITY_AT.search(head, 132)
    if match:
        length = struct.unpack("<H", match.group(1))[0] if match.group(1) else struct.unpack("<I", match.group(2))[0]
        modality = head[match.end():match.end() + min(length, 16)].strip(b"\0 ").decode("ascii", "replace").upper()
        return _NON_IMAGE_MODALITIES.get(modality)
    return None


def _refuse_non_image_dicom(path: Path, where=None) -> None:
    kind = dicom_kind(path)
    if kind is not None:
        where = path if where is None else f"{where} ({path.name})"
        raise InputError(f"{where}: is {kind}, not an image; give the CT / MR image (a file or its DICOM series folder)")
