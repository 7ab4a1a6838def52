"""The MRML side of WeakLiverSeg: the ONLY library module that touches ``slicer`` / ``vtk``.

Both are imported lazily inside the functions, so ``import WeakLiverSegLib.slicer_bridge``
works anywhere; the functions themselves need either the Slicer application or the PyPI
wheel ``slicer-core`` (what the tests use).

Coordinates: Slicer works in RAS, the library (ITK / DICOM) in LPS.  Every conversion goes
through ``_RAS_LPS`` (flip of the first two axes) and nowhere else.

Segments: a label map (0 background, 1 liver, 2 tumour; tumour voxels are part of the liver)
becomes two NON-overlapping segments, ``Liver`` = label 1 only and ``Liver tumor`` = label 2,
which is what Slicer users and the Segment Editor expect (a voxel belongs to one segment).
``segmentation_to_mask`` merges them back to 0/1/2 and also accepts overlapping segments
drawn by hand (a liver segment that includes the tumour): the tumour wins.

Boxes: a Markups ROI node is a box on a reference volume.  A voxel is in the box when its
centre lies inside the ROI; a ROI thinner than a voxel, or one flagged 2D, covers the one
slice nearest its centre.  A box goes back as a ROI aligned with the volume's axes whose
faces lie on voxel edges, so ROI -> box -> ROI -> box is exact.
"""

from __future__ import annotations

import numpy as np

from ..data.boxes import Box
from ..errors import InputError
from ..data.volume import Volume

_RAS_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse

# Node attributes that mark a ROI as a WeakLiverSeg box.
ROI_LABEL_ATTRIBUTE = "WeakLiverSeg.boxLabel"   # "tumor" | "liver"
ROI_2D_ATTRIBUTE = "WeakLiverSeg.box2D"          # "1" | "0"
ROI_FIRST_CLICK_ATTRIBUTE = "WeakLiverSeg.firstClickRAS"   # "x y z" while a two-click placement is under way

TABLE_COLUMNS = ("Tumour", "Volume (mL)", "Couinaud segment", "Longest diameter (mm)", "Centroid R", "Centroid A", "Centroid S")
_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}


def couinaud_of(mask_component: Volume) -> int | None:
    """Couinaud segment (1..8) holding one tumour component, or None when unknown.

    ``mask_component`` is a boolean ``Volume``: the component's bounding-box crop with that
    crop's own geometry (so world coordinates, hence any Couinaud map, can be looked up).
    The default hook knows no Couinaud map and answers None (the table shows "n/a"); pass
    ``couinaud_of=couinaud_lookup(map)`` to ``tumour_table`` / ``measure_tumours`` to fill
    the column (the Slicer logic does, from ``couinaud_map.construct_couinaud``, on request).
    """
    return None


def couinaud_lookup(couinaud_map: Volume):
    """A ``couinaud_of`` hook reading a Couinaud map (uint8 0 / 1..8) on the label map's grid.

    Each tumour gets the segment holding most of its voxels; None when it lies outside the
    map's liver or its grid is not the map's.
    """
    table = np.asarray(couinaud_map.array)

    def hook(component: Volume):
        if not (np.allclose(component.spacing, couinaud_map.spacing, atol=1e-4)
                and np.allclose(component.direction, couinaud_map.direction, atol=1e-4)):
            return None
        i, j, k = np.rint(couinaud_map.world_to_index(component.origin)).astype(int)
        nz, ny, nx = component.array.shape
        if min(i, j, k) < 0 or k + nz > table.shape[0] or j + ny > table.shape[1] or i + nx > table.shape[2]:
            return None
        values = table[k:k + nz, j:j + ny, i:i + nx][np.asarray(component.array, dtype=bool)]
        values = values[values > 0]
        return int(np.bincount(values, minlength=9).argmax()) if values.size else None

    return hook


# --------------------------------------------------------------------------- environment


def current_scene():
    """The application's MRML scene (``slicer.mrmlScene``)."""
    import slicer

    return slicer.mrmlScene


def inside_slicer_app() -> bool:
    """True inside the 3D Slicer application (not with the bare ``slicer-core`` wheel)."""
    import sys

    module = sys.modules.get("slicer")
    return module is not None and getattr(module, "app", None) is not None


def dicom_database():
    """Slicer's DICOM database (``fileForInstance(uid)``), or None outside Slicer / when closed."""
    try:
        import slicer
    except ImportError:
        return None
    return getattr(slicer, "dicomDatabase", None)


def python_executable() -> str:
    """The Python that runs ``python -m WeakLiverSegLib`` (the CLI) in a child process.

    Inside Slicer, ``sys.executable`` is the Slicer application itself; its standalone
    interpreter is ``PythonSlicer`` next to it (the same one ``slicer.util.pip_install`` uses).
    """
    import os
    import shutil
    import sys

    if inside_slicer_app():
        found = shutil.which("PythonSlicer")
        if found:
            return found
        here = os.path.dirname(sys.executable)
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            for folder in (here, os.path.join(here, "..", "bin")):
                candidate = os.path.join(folder, name)
                if os.path.isfile(candidate):
                    return os.path.normpath(candidate)
        raise InputError("PythonSlicer not found next to the Slicer executable; cannot start a background process")
    return sys.executable


def _scene(scene=None):
    if scene is not None:
        return scene
    import slicer

    current = getattr(slicer, "mrmlScene", None)
    if current is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene or pass scene=")
    return current


def _vtk_matrix(array4):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array4[r, c]))
    return matrix


def _numpy_matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed node)"


# --------------------------------------------------------------------------- volumes


def _to_world_matrix(node) -> np.ndarray:
    """4x4 node-to-world (RAS) matrix of a transformable node: identity, or its linear parent transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{_node_name(node)}: is under a non-linear transform; harden the transform first")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _numpy_matrix(matrix)


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _to_world_matrix(node) @ _numpy_matrix(matrix)


def _geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, array) -> Volume:
    lps = _RAS_LPS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume geometry has a zero spacing ({spacing.tolist()})")
    return Volume(array, tuple(spacing), tuple(_RAS_LPS @ ijk_to_ras[:3, 3]), lps / spacing)


def _image_array(node):
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise InputError(f"{_node_name(node)}: volume has no image data")
    from vtkmodules.util import numpy_support

    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise InputError(f"{_node_name(node)}: volume has no voxel values")
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"{_node_name(node)}: expected a scalar volume, got {scalars.GetNumberOfComponents()} components per voxel")
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx)


def volume_geometry(node) -> Volume:
    """Geometry of a volume node as a ``Volume`` whose array is a read-only zero view (no copy)."""
    if node is None or node.GetImageData() is None:
        raise InputError(f"{_node_name(node)}: volume has no image data")
    nx, ny, nz = node.GetImageData().GetDimensions()
    return _geometry_from_ijk_to_ras(_ijk_to_ras(node), np.broadcast_to(np.zeros((), np.uint8), (nz, ny, nx)))


def volume_from_node(node) -> Volume:
    """A volume node (scalar or label map) -> ``Volume`` in LPS with its full geometry (array copied).

    Linear parent transforms are applied to the geometry; non-linear ones are refused.
    """
    return _geometry_from_ijk_to_ras(_ijk_to_ras(node), np.array(_image_array(node), copy=True))


def volume_to_node(volume: Volume, name: str = "Volume", node=None, labelmap: bool = False, scene=None,
                   display: bool = True):
    """A ``Volume`` -> new (or the given) scalar / label-map volume node, geometry converted to RAS.

    ``display=False`` skips the display node (temporary nodes that are never shown).
    """
    import vtk
    from vtkmodules.util import numpy_support

    scene = _scene(scene)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    nz, ny, nx = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(nx, ny, nz)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _RAS_LPS @ volume.direction @ np.diag(volume.spacing)
    ijk_to_ras[:3, 3] = _RAS_LPS @ np.asarray(volume.origin)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))
    node.SetAndObserveImageData(image)
    if display and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------- boxes <-> ROIs


def _reference_geometry(reference) -> Volume:
    return reference if isinstance(reference, Volume) else volume_geometry(reference)


def mark_roi(roi, label: str, two_d: bool = False) -> None:
    """Tag a ROI node as a WeakLiverSeg box of ``label`` ("tumor" / "liver"), 2D or 3D."""
    label = {"tumour": "tumor"}.get(label, label)
    if label not in ("tumor", "liver"):
        raise InputError(f"{_node_name(roi)}: box label must be 'tumor' or 'liver', not {label!r}")
    roi.SetAttribute(ROI_LABEL_ATTRIBUTE, label)
    roi.SetAttribute(ROI_2D_ATTRIBUTE, "1" if two_d else "0")


def roi_label(roi) -> str | None:
    """"tumor" / "liver" for a WeakLiverSeg box ROI, None for any other ROI."""
    return roi.GetAttribute(ROI_LABEL_ATTRIBUTE) or None


def roi_is_2d(roi) -> bool:
    return roi.GetAttribute(ROI_2D_ATTRIBUTE) == "1"


def new_box_roi_node(name: str, label: str, two_d: bool = False, scene=None):
    """A new ROI node, tagged as a box BEFORE it enters the scene, so observers of the scene's
    NodeAddedEvent already see it as a box."""
    scene = _scene(scene)
    roi = scene.CreateNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetName(name)
    mark_roi(roi, label, two_d=two_d)
    scene.AddNode(roi)
    roi.UnRegister(None)  # CreateNodeByClass returned a new reference; the scene holds its own
    return roi


def box_rois(scene=None) -> list:
    """Every ROI node of the scene tagged as a WeakLiverSeg box, in scene order."""
    scene = _scene(scene)
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    out = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [roi for roi in out if roi_label(roi)]


def roi_corners_ras(roi) -> np.ndarray:
    """(8, 3) world RAS corners of a ROI node (rotation and parent transforms included)."""
    if roi.GetNumberOfDefinedControlPoints() < 1:
        raise InputError(f"{_node_name(roi)}: ROI is not placed yet")
    half = np.asarray(roi.GetSize(), dtype=float) / 2
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    local = np.c_[signs * half, np.ones(8)]
    return (local @ _numpy_matrix(roi.GetObjectToWorldMatrix()).T)[:, :3]


def roi_object_to_world(roi) -> np.ndarray:
    """4x4 ROI-object-to-world (RAS) matrix: its columns 0..2 are the box axes, column 3 its centre."""
    return _numpy_matrix(roi.GetObjectToWorldMatrix())


def roi_size(roi) -> np.ndarray:
    return np.asarray(roi.GetSize(), dtype=float)


def set_roi_size(roi, size) -> None:
    """New side lengths (ROI axes, mm), centre kept."""
    roi.SetSize(*[float(v) for v in size])


def roi_defined_points_ras(roi) -> np.ndarray:
    """(N, 3) world RAS positions of the ROI's defined control points."""
    points = []
    for index in range(roi.GetNumberOfControlPoints()):
        if roi.GetNthControlPointPositionStatus(index) == roi.PositionDefined:
            position = [0.0, 0.0, 0.0]
            roi.GetNthControlPointPositionWorld(index, position)
            points.append(position)
    return np.asarray(points, dtype=float).reshape(-1, 3)


def roi_first_click(roi):
    """The recorded first click of a two-click placement (RAS), or None."""
    text = roi.GetAttribute(ROI_FIRST_CLICK_ATTRIBUTE)
    if not text:
        return None
    try:
        return np.array([float(v) for v in text.split()], dtype=float)
    except ValueError:
        return None


def set_roi_first_click(roi, ras) -> None:
    """Record (RAS) or, with None, forget the first click of a two-click placement."""
    if ras is None:
        roi.RemoveAttribute(ROI_FIRST_CLICK_ATTRIBUTE)
    else:
        roi.SetAttribute(ROI_FIRST_CLICK_ATTRIBUTE, " ".join(repr(float(v)) for v in ras))


def voxel_step_mm(reference, direction_ras) -> float | None:
    """Distance (mm) between neighbouring voxel centres of the reference volume along a world
    direction (the slice thickness along a slice view's normal; any orientation)."""
    if reference is None:
        return None
    grid = _reference_geometry(reference)
    lps = _RAS_LPS @ np.asarray(direction_ras, dtype=float)
    lps = lps / np.linalg.norm(lps)
    # Slices of the volume axis closest to the direction, their spacing measured along it.
    cosines = np.abs(grid.direction.T @ lps)
    axis = int(np.argmax(cosines))
    return float(grid.spacing[axis] / cosines[axis])


def observe(obj, event_names, callback) -> list:
    """Observe VTK / MRML events by name (``"NodeAddedEvent"``, ``"PointPositionDefinedEvent"``,
    ...); ``callback(obj, event_name)``.  Returns the observer tags for ``unobserve``."""
    import vtk

    tags = []
    for name in event_names:
        event = getattr(obj, name, None)
        if event is None:
            event = getattr(vtk.vtkCommand, name)   # ModifiedEvent and the other generic events
        tags.append(obj.AddObserver(event, lambda caller, _event, _name=name: callback(caller, _name)))
    return tags


def unobserve(obj, tags) -> None:
    for tag in tags:
        obj.RemoveObserver(tag)


def box_from_roi(roi, reference, label: str | None = None, source: str = "slicer") -> Box:
    """ROI node -> store ``Box`` on the reference volume (node or ``Volume``).

    Voxels whose centres lie inside the ROI, clipped to the grid (a ROI wholly outside it is
    an error); an axis thinner than one voxel (a ROI drawn in a slice view) or a ROI flagged
    2D keeps the slice nearest the ROI centre.  The corners go through ``Box.from_world``
    (LPS), so the box carries its world corners for the other phases.
    """
    grid = _reference_geometry(reference)
    label = label or roi_label(roi)
    if label is None:
        raise InputError(f"{_node_name(roi)}: ROI is not tagged as a tumour or liver box")
    where = f"ROI {_node_name(roi)!r}"
    corners_lps = roi_corners_ras(roi) @ _RAS_LPS.T
    index = grid.world_to_index(corners_lps)
    lo, hi = index.min(axis=0), index.max(axis=0)
    ijk_min = np.ceil(lo - 1e-6)
    ijk_max = np.floor(hi + 1e-6)
    centre = np.floor((lo + hi) / 2 + 0.5 + 1e-6)  # halves round up, whatever the float noise
    thin = ijk_min > ijk_max
    ijk_min[thin] = ijk_max[thin] = centre[thin]
    if roi_is_2d(roi):
        ijk_min[2] = ijk_max[2] = centre[2]
    shape = np.asarray(grid.shape_xyz)
    if np.any(ijk_max < 0) or np.any(ijk_min > shape - 1):
        raise InputError(f"{where}: box does not overlap the reference volume (voxel range {ijk_min.astype(int).tolist()}..{ijk_max.astype(int).tolist()}, grid {tuple(shape.tolist())})")
    ijk_min = np.clip(ijk_min, 0, shape - 1)
    ijk_max = np.clip(ijk_max, 0, shape - 1)
    # Exact voxel centres: Box.from_world's rounding cannot move them.
    lps_a, lps_b = grid.index_to_world(np.array([ijk_min, ijk_max]))
    return Box.from_world(lps_a, lps_b, grid, label, source=source, where=where)


def roi_from_box(box: Box, reference, roi=None, name: str | None = None, scene=None):
    """Store ``Box`` -> ROI node aligned with the reference volume's axes, faces on voxel edges."""
    grid = _reference_geometry(reference)
    scene = _scene(scene)
    if roi is None:
        default = "Liver box" if box.label == "liver" else "Tumour box"
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name or default)
    lo, hi = np.asarray(box.ijk_min, float), np.asarray(box.ijk_max, float)
    centre_ras = _RAS_LPS @ grid.index_to_world((lo + hi) / 2)
    axes_ras = _RAS_LPS @ grid.direction  # columns: i, j, k directions in RAS
    if np.linalg.det(axes_ras) < 0:  # a ROI frame must be a rotation; the box is symmetric in k
        axes_ras[:, 2] *= -1
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes_ras
    object_to_node[:3, 3] = centre_ras
    # The ROI lives in world RAS: undo any parent transform of the ROI node itself.
    object_to_node = np.linalg.inv(_to_world_matrix(roi)) @ object_to_node
    roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(object_to_node))
    roi.SetSize(*((hi - lo + 1) * np.asarray(grid.spacing)))
    mark_roi(roi, box.label, two_d=box.is_2d)
    return roi


# --------------------------------------------------------------------------- segmentations


def _styles() -> dict:
    from ..data.terminology import segment_styles

    return segment_styles()


def _set_terminology(segment, entry: str) -> None:
    if hasattr(segment, "SetTerminology"):  # vtkSegment.SetTerminology exists from Slicer 5.10; 5.8 uses the tag
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def _get_terminology(segment) -> str:
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    import vtk

    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def _segment_kind(segment) -> str | None:
    """"liver" / "tumor" for a segment (terminology type code first, then its name)."""
    from ..data.terminology import style_for_segment

    terminology = {}
    fields = _get_terminology(segment).split("~")
    if len(fields) > 2 and fields[2].count("^") == 2:
        terminology["type"] = fields[2].split("^")
    return style_for_segment({"name": segment.GetName(), "terminology": terminology})


def labelmap_to_segmentation(label_map: Volume, reference_node=None, node=None, name: str = "Segmentation", scene=None):
    """A 0/1/2 label map -> segmentation node with segments ``Liver`` (label 1 only) and
    ``Liver tumor`` (label 2): names, colours and terminology from the colours resource.

    Existing segments of ``node`` with those names are replaced; others are kept.
    """
    import slicer

    scene = _scene(scene)
    styles = _styles()
    values = np.unique(np.asarray(label_map.array))
    known = {s["label_value"] for s in styles.values()}
    unknown = sorted(set(int(v) for v in values) - known - {0})
    if unknown:
        raise InputError(f"{name}: label map holds values {unknown}; expected 0 (background), {sorted(known)}")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation = node.GetSegmentation()
    import vtk

    segment_ids = vtk.vtkStringArray()
    # Label value v is imported into segment_ids[v - 1]: one id per value 1..max.
    for style in styles.values():
        old = segmentation.GetSegmentIdBySegmentName(style["name"])
        if old:
            segmentation.RemoveSegment(old)
    by_value = {s["label_value"]: s for s in styles.values()}
    for value in range(1, max(by_value) + 1):
        style = by_value.get(value)
        seg_id = segmentation.AddEmptySegment("", style["name"] if style else f"Label {value}", style["color"] if style else (0.5, 0.5, 0.5))
        if style:
            _set_terminology(segmentation.GetSegment(seg_id), style["terminology_entry"])
        segment_ids.InsertNextValue(seg_id)
    labels = volume_to_node(label_map.with_array(np.asarray(label_map.array, dtype=np.uint8)),
                            name=f"{name} labels (temporary)", labelmap=True, scene=scene, display=False)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, node, segment_ids)
    finally:
        _remove_node(labels, scene)
    if not ok:
        raise RuntimeError(f"{name}: Slicer could not import the label map into the segmentation")
    return node


def _remove_node(node, scene) -> None:
    display = node.GetDisplayNode()
    storage = node.GetStorageNode()
    scene.RemoveNode(node)
    for extra in (display, storage):
        if extra is not None and extra.GetScene() is not None:
            scene.RemoveNode(extra)


def segments_by_kind(segmentation_node) -> dict:
    """{"liver": [segment ids], "tumor": [segment ids], None: [ids of other segments]}."""
    segmentation = segmentation_node.GetSegmentation()
    out = {"liver": [], "tumor": [], None: []}
    for index in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(index)
        out[_segment_kind(segmentation.GetSegment(seg_id))].append(seg_id)
    return out


def segment_array(segmentation_node, segment_id: str, reference_node, scene=None) -> np.ndarray:
    """Binary (z, y, x) uint8 array of one segment on the reference volume's grid."""
    import slicer
    import vtk

    scene = _scene(scene)
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "WeakLiverSeg export (temporary)")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labels, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise RuntimeError(f"{_node_name(segmentation_node)}: Slicer could not export segment {segment_id!r}")
        return (_image_array(labels) > 0).astype(np.uint8)
    finally:
        _remove_node(labels, scene)


def ensure_segment(segmentation_node, kind: str) -> str:
    """Id of the segmentation's ``Liver`` / ``Liver tumor`` segment (``kind`` "liver" / "tumor"):
    the one with that name, else the first of that kind (terminology, then name), else a new empty
    segment with the style's name, colour and terminology."""
    style = _styles()[kind]
    segmentation = segmentation_node.GetSegmentation()
    seg_id = segmentation.GetSegmentIdBySegmentName(style["name"])
    if seg_id:
        return seg_id
    same_kind = segments_by_kind(segmentation_node)[kind]
    if same_kind:
        return same_kind[0]
    seg_id = segmentation.AddEmptySegment("", style["name"], style["color"])
    _set_terminology(segmentation.GetSegment(seg_id), style["terminology_entry"])
    return seg_id


def set_segment_array(segmentation_node, segment_id: str, array, reference_node, scene=None) -> None:
    """Replace one segment's content with a binary (z, y, x) array on the reference volume's grid;
    the other segments are kept (Slicer's labelmap import into an existing segment replaces it)."""
    import slicer
    import vtk

    scene = _scene(scene)
    grid = volume_geometry(reference_node)
    array = (np.asarray(array) > 0).astype(np.uint8)
    if array.shape != grid.array.shape:
        raise ValueError(f"segment array {array.shape} does not match the reference grid {grid.array.shape}")
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    labels = volume_to_node(grid.with_array(array), name=f"{_node_name(segmentation_node)} update (temporary)",
                            labelmap=True, scene=scene, display=False)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation_node, ids)
    finally:
        _remove_node(labels, scene)
    if not ok:
        raise RuntimeError(f"{_node_name(segmentation_node)}: Slicer could not update segment {segment_id!r}")


def segmentation_to_mask(segmentation_node, reference_node, scene=None) -> Volume | None:
    """Segmentation node -> uint8 0/1/2 label map on the reference volume's grid (for the store).

    Liver segments give 1, tumour segments 2 (tumour wins where they overlap, and a tumour
    outside every liver segment is still 2: tumour voxels are liver by definition).  None when
    the node has no liver or tumour segment; other segments are ignored.
    """
    kinds = segments_by_kind(segmentation_node)
    if not kinds["liver"] and not kinds["tumor"]:
        return None
    grid = volume_geometry(reference_node)
    mask = np.zeros(grid.array.shape, np.uint8)
    for kind, value in (("liver", 1), ("tumor", 2)):
        for seg_id in kinds[kind]:
            mask[segment_array(segmentation_node, seg_id, reference_node, scene=scene) > 0] = value
    return grid.with_array(mask)


# --------------------------------------------------------------------------- tumour table


def _longest_diameter_mm(component: np.ndarray, offset_zyx, volume: Volume) -> float:
    """Largest distance (mm) between two surface-voxel centres of one component.

    The farthest pair of a point set lies on its convex hull, so only hull vertices of the
    surface voxels are compared: O(n log n) instead of O(n^2) on the whole lesion.
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    surface = component & ~ndimage.binary_erosion(component)
    zyx = np.argwhere(surface) + np.asarray(offset_zyx)
    points = volume.index_to_world(zyx[:, ::-1].astype(float))
    if len(points) > 4:
        try:
            points = points[ConvexHull(points).vertices]
        except (QhullError, ValueError):  # flat lesion (one slice / one row): keep all points
            pass
    if len(points) < 2:
        return 0.0
    best = 0.0
    for start in range(0, len(points), 512):  # chunks bound memory on huge flat lesions
        block = points[start:start + 512]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def measure_tumours(label_map: Volume, couinaud_of=None) -> list:
    """One dict per 26-connected tumour (label 2), largest first.

    Keys: ``id`` (1-based), ``voxels``, ``volume_ml`` (voxel count x voxel volume),
    ``couinaud`` (int or None), ``longest_diameter_mm`` (between surface-voxel centres),
    ``centroid_ras`` (mm).
    """
    from scipy import ndimage

    hook = couinaud_of if couinaud_of is not None else globals()["couinaud_of"]  # module hook, replaceable
    tumour = np.asarray(label_map.array) == 2
    components, count = ndimage.label(tumour, structure=np.ones((3, 3, 3), dtype=bool))
    rows = []
    for index, slices in enumerate(ndimage.find_objects(components), start=1):
        if slices is None:
            continue
        component = components[slices] == index
        offset = [s.start for s in slices]
        zyx = np.argwhere(component) + np.asarray(offset)
        centroid_lps = label_map.index_to_world(zyx[:, ::-1].mean(axis=0))
        crop = Volume(component, label_map.spacing, tuple(label_map.index_to_world(offset[::-1])),
                      label_map.direction.copy())
        rows.append({
            "voxels": int(len(zyx)),
            "volume_ml": len(zyx) * label_map.voxel_volume_mm3 / 1000.0,
            "couinaud": hook(crop),
            "longest_diameter_mm": _longest_diameter_mm(np.pad(component, 1), np.asarray(offset) - 1, label_map),
            "centroid_ras": tuple(float(v) for v in _RAS_LPS @ centroid_lps),
        })
    rows.sort(key=lambda r: -r["voxels"])
    for n, row in enumerate(rows, start=1):
        row["id"] = n
    return rows


def tumour_table(label_map: Volume, table_node=None, name: str = "Tumours", couinaud_of=None, scene=None,
                 rows=None):
    """Table node with one row per connected tumour: id, volume (mL), Couinaud segment
    (roman numeral or "n/a"), longest diameter (mm), centroid (RAS mm).

    ``rows``: the output of ``measure_tumours`` when the caller already has it.
    """
    import vtk

    scene = _scene(scene)
    if rows is None:
        rows = measure_tumours(label_map, couinaud_of=couinaud_of)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    table.Initialize()  # drop the previous columns and rows (re-segmenting reuses the node)
    columns = []
    for title in TABLE_COLUMNS:
        array = vtk.vtkStringArray() if title in ("Couinaud segment",) else (
            vtk.vtkIntArray() if title == "Tumour" else vtk.vtkDoubleArray())
        array.SetName(title)
        array.SetNumberOfTuples(len(rows))
        columns.append(array)
    for r, row in enumerate(rows):
        columns[0].SetValue(r, row["id"])
        columns[1].SetValue(r, round(row["volume_ml"], 3))
        columns[2].SetValue(r, _ROMAN.get(row["couinaud"], "n/a"))
        columns[3].SetValue(r, round(row["longest_diameter_mm"], 1))
        for c in range(3):
            columns[4 + c].SetValue(r, round(row["centroid_ras"][c], 1))
    for array in columns:
        table.AddColumn(array)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.Modified()
    return table_node


# --------------------------------------------------------------------------- views


def jump_to_ras(ras, scene=None) -> None:
    """Centre every slice view on a RAS point (no-op when the scene has no slice views)."""
    import slicer

    scene = _scene(scene)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(v) for v in ras], slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def roi_center_ras(roi) -> tuple:
    centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(centre)
    return tuple(centre)


def start_roi_placement(roi) -> None:
    """Put the Slicer GUI in place mode for ``roi``. App only.

    A Markups ROI placed with two clicks is the bounding box of the two clicked points: one
    corner, then the opposite corner.
    """
    import slicer

    if not inside_slicer_app():
        raise RuntimeError("interactive ROI placement needs the Slicer application")
    selection = slicer.app.applicationLogic().GetSelectionNode()
    selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsROINode")
    selection.SetActivePlaceNodeID(roi.GetID())
    slicer.modules.markups.logic().StartPlaceMode(False)
