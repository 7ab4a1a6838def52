"""DICOM SEG in and out (highdicom): WeakLiverSeg label maps as Segmentation objects that
reference their source CT series, and DICOM SEGs from elsewhere read back as label maps.

Writing (``write_dicom_seg``): one BINARY SEG with the segments ``Liver`` (label 1) and ``Liver
tumor`` (label 2), with the SNOMED CT category / type / anatomic region codes and the colours of
``Resources/WeakLiverSeg.colors.json`` (``terminology.segment_styles``), every frame written (also
empty ones, so the SEG covers the source grid exactly), the Study / Patient of the source series,
its Frame of Reference, one source-image reference per frame (Study, Series, SOP Instance UIDs),
and algorithm identification (name WeakLiverSeg, version, the recipe as a parameter):
``AUTOMATIC`` for a plain ``segment``, ``SEMIAUTOMATIC`` for masks derived from boxes (a
teacher's pseudo-labels, ``segment --boxes``), ``MANUAL`` (no algorithm) for expert masks.

Reading (``read_dicom_seg``): segments are mapped to WeakLiverSeg labels by their SNOMED CT
type code (old SNOMED RT ``SRT`` codes, as dcmqi writes them, are translated), then by name;
a non-empty segment that is neither liver nor liver tumour is refused with a message naming it.
Liver is painted first, the tumour over it.  With ``reference`` (the image the mask belongs
to), the SEG's frames are placed on that grid (a SEG may omit empty frames) and a SEG whose
frames do not lie on it is refused.

Only ``data`` (and the root) is imported here; highdicom / pydicom are imported in functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from .terminology import segment_styles, style_for_segment
from .volume import Volume

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
DICOM_SEG_SUFFIX = ".dcm"
ALGORITHM_NAME = "WeakLiverSeg"
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


# ------------------------------------------------------------------------------- sniffing


def is_dicom_seg(path) -> bool:
    """True when ``path`` is a file holding a DICOM Segmentation object (read from its header)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    if head[128:132] != b"DICM":
        return False
    try:
        import pydicom
    except ImportError:  # without pydicom: look for the SEG SOP Class UID in the file meta header
        with open(path, "rb") as stream:
            return SEG_SOP_CLASS_UID.encode() in stream.read(4096)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # pydicom raises many kinds on a corrupt file; the reader says more
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS_UID


# ------------------------------------------------------------------------------- codes


def _code_triplet(code) -> list:
    """[scheme, value, meaning] of a pydicom/highdicom coded item, SRT translated to SCT."""
    scheme, value, meaning = str(code.CodingSchemeDesignator), str(code.CodeValue), str(code.CodeMeaning)
    if scheme in ("SRT", "SNM3"):
        try:
            from pydicom.sr._snomed_dict import mapping

            translated = mapping.get("SRT", {}).get(value)
        except ImportError:  # private module of pydicom: without it only SCT codes and names match
            translated = None
        if translated:
            scheme, value = "SCT", str(translated)
    return [scheme, value, meaning]


def segment_info(description) -> dict:
    """A SEG segment as ``{"number", "name", "terminology": {"category", "type"}}`` for matching."""
    number = int(description.SegmentNumber)
    name = str(getattr(description, "SegmentLabel", "") or f"Segment {number}")
    terminology = {}
    for key, attribute in (("category", "SegmentedPropertyCategoryCodeSequence"),
                           ("type", "SegmentedPropertyTypeCodeSequence")):
        items = getattr(description, attribute, None)
        if items:
            terminology[key] = _code_triplet(items[0])
    return {"number": number, "name": name, "terminology": terminology}


def _describe(info: dict) -> str:
    code = info["terminology"].get("type")
    return f"{info['name']!r} ({code[0]} {code[1]} {code[2]})" if code else repr(info["name"])


# ------------------------------------------------------------------------------- reading


def read_dicom_seg(path, reference: Volume | None = None) -> Volume:
    """A DICOM SEG as a WeakLiverSeg label map (uint8 0 / 1 liver / 2 tumour).

    Without ``reference`` the map lies on the SEG's own grid (its frames, gaps between them
    filled with background); with it, on ``reference``'s grid (frames placed where they lie,
    InputError when they do not lie on it).
    """
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: DICOM SEG file not found")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # not DICOM, not a SEG, corrupt: pydicom / highdicom error text
        raise InputError(f"{path}: cannot read as a DICOM SEG ({_first_line(exc)})") from None
    infos = [segment_info(d) for d in seg.SegmentSequence]
    labels = {info["number"]: style_for_segment({"name": info["name"], "terminology": info["terminology"]})
              for info in infos}
    try:
        volume = seg.get_volume(combine_segments=False, dtype=np.uint8)
    except Exception as exc:  # irregular frame positions, several orientations, tiled ...
        raise InputError(f"{path}: the SEG's frames do not form a 3D grid ({_first_line(exc)})") from None
    grid, masks = _to_volume(volume)  # masks: (z, y, x, segments) in the SEG's segment order
    numbers = [int(n) for n in seg.segment_numbers]
    unknown = [info for info in infos if labels[info["number"]] is None
               and info["number"] in numbers and masks[..., numbers.index(info["number"])].any()]
    if unknown:
        expected = ", ".join(f"{s['name']} ({s['terminology']['type'][0]} {s['terminology']['type'][1]})"
                             for s in segment_styles().values())
        raise InputError(f"{path}: segments {', '.join(_describe(i) for i in unknown)} are neither liver nor "
                         f"liver tumour (expected {expected})")
    out = np.zeros(grid.array.shape, np.uint8)
    styles = segment_styles()
    for label, style in styles.items():  # ordered by label value: the tumour painted last
        for index, number in enumerate(numbers):
            if labels.get(number) == label:
                out[masks[..., index] > 0] = style["label_value"]
    result = grid.with_array(out)
    if reference is not None:
        result = place_on_grid(result, reference, where=str(path))
    return result


def _to_volume(volume):
    """highdicom Volume (slice, row, column[, segment]) -> (Volume geometry, array (z, y, x, seg)).

    The slice axis is turned to point along row x column direction (as SimpleITK and ITK read
    a DICOM series), so that a SEG of a series lands on the same grid as the series itself.
    """
    affine = np.asarray(volume.affine, dtype=float)
    array = np.asarray(volume.array)
    if array.ndim == 3:
        array = array[..., None]
    steps = affine[:3, :3]  # columns: world step per slice, per row, per column index
    spacing = np.linalg.norm(steps, axis=0)
    if np.any(spacing == 0):
        raise InputError("DICOM SEG has a zero voxel spacing")
    unit = steps / spacing
    x_dir, y_dir, z_dir = unit[:, 2], unit[:, 1], unit[:, 0]
    origin = affine[:3, 3].copy()
    if np.dot(np.cross(x_dir, y_dir), z_dir) < 0:  # slices stored top-down: flip to ITK order
        origin = origin + steps[:, 0] * (array.shape[0] - 1)
        z_dir = -z_dir
        array = array[::-1]
    direction = np.stack([x_dir, y_dir, z_dir], axis=1)
    grid = Volume(np.zeros(array.shape[:3], np.uint8), (float(spacing[2]), float(spacing[1]), float(spacing[0])),
                  tuple(float(v) for v in origin), direction)
    return grid, np.ascontiguousarray(array)


def place_on_grid(label_map: Volume, reference: Volume, where, tol: float = 1e-3) -> Volume:
    """``label_map`` (e.g. a SEG covering some of an image's slices) on ``reference``'s grid.

    Every voxel centre of ``label_map`` must coincide with a voxel centre of ``reference``
    (same directions and spacing, offset by whole voxels, inside the grid); else InputError
    naming ``where`` and what differs.  Reference voxels the map does not cover are 0.
    """
    if reference.same_grid(label_map):
        return reference.with_array(label_map.array)
    problem = None
    if not np.allclose(np.abs(label_map.direction.T @ reference.direction), np.eye(3), atol=tol):
        problem = "its frames are oriented differently from the image"
    else:
        # index of the map's voxel (0,0,0) and of its unit steps, in the reference's index space
        corner = reference.world_to_index(np.asarray(label_map.origin, float))
        steps = np.stack([reference.world_to_index(label_map.index_to_world(np.eye(3)[a])) - corner for a in range(3)])
        offset = np.round(corner)
        if not np.allclose(np.abs(steps), np.eye(3), atol=tol):
            problem = (f"its voxel spacing {tuple(round(s, 4) for s in label_map.spacing)} differs from the image's "
                       f"{tuple(round(s, 4) for s in reference.spacing)}")
        elif not np.allclose(corner, offset, atol=1e-2):
            problem = f"its frames lie between the image's voxels (offset {np.round(corner, 3).tolist()} voxels)"
        else:
            signs = np.round(np.diag(steps)).astype(int)
            shape_xyz = np.array(label_map.shape_xyz)
            last = offset + signs * (shape_xyz - 1)
            low, high = np.minimum(offset, last).astype(int), np.maximum(offset, last).astype(int)
            if np.any(low < 0) or np.any(high >= np.array(reference.shape_xyz)):
                problem = (f"its frames reach outside the image (voxels {low.tolist()}..{high.tolist()} of an image of "
                           f"size {list(reference.shape_xyz)})")
            else:
                array = label_map.array[::signs[2], ::signs[1], ::signs[0]]
                out = np.zeros(reference.array.shape, np.uint8)
                out[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1] = array
                return reference.with_array(out)
    raise InputError(f"{where}: the DICOM SEG's frames do not match the image's grid ({problem})")


# ------------------------------------------------------------------------------- writing


def dicom_series_files(folder) -> list:
    """The files of a folder's DICOM series (the one with most slices) in the order SimpleITK
    stacks them, i.e. slice k of ``imageio.read_dicom_series(folder)`` is file k."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found (a DICOM SEG needs the source CT series)")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    return [Path(f) for f in max((reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series), key=len)]


def source_datasets(files, where) -> list:
    """pydicom datasets of a series' files, with the identifying UIDs a SEG must reference.

    Anonymised series (e.g. TotalSegmentator's test series) may have emptied SOP Class / SOP
    Instance UIDs, which the file meta information still holds: they are taken from there.
    Empty Study / Series Instance UIDs are replaced by UIDs derived from the files' SOP Instance
    UIDs (the same series always gets the same UIDs), with a warning: such a SEG still points
    to the right images, by SOP Instance UID and Frame of Reference.
    """
    import warnings

    import pydicom
    from pydicom.uid import generate_uid

    try:
        datasets = [pydicom.dcmread(f) for f in files]
    except Exception as exc:
        raise InputError(f"{where}: cannot read the DICOM series with pydicom ({_first_line(exc)})") from None
    for ds in datasets:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty (dcmqi's test CT): the default repertoire, as the standard says
        meta = getattr(ds, "file_meta", None)
        for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(key, "") or "") and meta is not None and str(meta.get(meta_key, "") or ""):
                setattr(ds, key, meta.get(meta_key))
            if not str(ds.get(key, "") or ""):
                raise InputError(f"{where}: a file of the series has no {key}; a DICOM SEG cannot reference it")
    instances = [str(ds.SOPInstanceUID) for ds in datasets]
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        found = {str(ds.get(key, "") or "") for ds in datasets}
        if found == {""}:
            uid = generate_uid(entropy_srcs=[key] + instances)
            warnings.warn(f"{where}: the series has no {key}; the DICOM SEG uses {uid}, derived from its SOP Instance UIDs")
            for ds in datasets:
                setattr(ds, key, uid)
        elif "" in found or len(found) > 1:
            raise InputError(f"{where}: the series' files disagree on {key} ({sorted(found)})")
    if not str(datasets[0].get("FrameOfReferenceUID", "") or ""):
        raise InputError(f"{where}: the series has no Frame of Reference UID; a DICOM SEG cannot be placed on it")
    return datasets


def write_dicom_seg(label_map: Volume, path, source, recipe: str | None = None,
                    algorithm_type: str = "AUTOMATIC", model_name: str | None = None,
                    series_description: str = "WeakLiverSeg segmentation") -> Path:
    """Write ``label_map`` (0 / 1 liver / 2 tumour, on the grid of the series) as a DICOM SEG.

    ``source``: the DICOM series folder the label map was computed on.  ``algorithm_type``:
    AUTOMATIC, SEMIAUTOMATIC (box-derived) or MANUAL (expert mask; no algorithm recorded).
    ``recipe`` / ``model_name`` go into the algorithm identification's parameters.  Atomic
    (temp file + rename).  InputError when the label map is not on the series' grid or holds
    values other than 0, 1, 2.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .imageio import check_same_grid, read_dicom_series

    path = Path(path)
    if algorithm_type not in ALGORITHM_TYPES:
        raise InputError(f"algorithm type {algorithm_type!r} is not one of {list(ALGORITHM_TYPES)}")
    files = dicom_series_files(source)
    series = read_dicom_series(source)
    check_same_grid(series, label_map, f"{path}: label map vs. the DICOM series {source}")
    array = np.asarray(label_map.array)
    values = set(np.unique(array).tolist()) - {0}
    styles = segment_styles()
    unknown = sorted(values - {s["label_value"] for s in styles.values()})
    if unknown:
        raise InputError(f"{path}: label values {unknown} have no segment (1 = Liver, 2 = Liver tumor)")
    datasets = source_datasets(files, source)
    first = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    if not np.allclose(first, series.origin, atol=1e-2):
        raise InputError(f"{source}: the first file's position {first.tolist()} is not the series origin")

    algorithm = None
    if algorithm_type != "MANUAL":
        parameters = {"recipe": recipe or "unknown"}
        if model_name:
            parameters["model"] = str(model_name)
        algorithm = hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__,
            parameters=parameters)
    descriptions, planes = [], []
    for number, (label, style) in enumerate(styles.items(), start=1):
        term = style["terminology"]
        region = term.get("anatomicRegion")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=style["name"],
            segmented_property_category=_coded(term["category"]),
            segmented_property_type=_coded(term["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type],
            algorithm_identification=algorithm,
            anatomic_regions=[_coded(region)] if region else None,
            display_color=hd.color.CIELabColor.from_rgb(*style["color_rgb"]),
        ))
        planes.append(array == style["label_value"])
    pixels = np.stack(planes, axis=-1).astype(np.uint8)  # (frames, rows, columns, segments)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="WeakLiverSeg",
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description,
            content_label="WEAKLIVERSEG",
            content_description=(f"{algorithm_type.lower()} segmentation"
                                 + (f", recipe {recipe}" if recipe else "")),
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: cannot build the DICOM SEG from {source} ({_first_line(exc)})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        seg.save_as(str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the DICOM SEG ({exc})") from None
    return path


def _coded(triplet):
    import highdicom as hd

    scheme, value, meaning = (str(v) for v in triplet[:3])
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
