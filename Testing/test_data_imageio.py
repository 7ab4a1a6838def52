"""Image I/O: real DICOM / NRRD files, geometry round trips, Slicer .seg.nrrd, resampling, errors."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from WeakLiverSegLib.data import imageio
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.data.terminology import segment_styles, style_for_segment
from WeakLiverSegLib.data.volume import Volume

from scipy.spatial.transform import Rotation

DICOM_SERIES = ["totalseg/ct_dicom_20slices", "dcmqi/ct-3slice"]


def assert_geometry(a: Volume, b: Volume, atol: float):
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


def dicom_header_geometry(folder):
    """Geometry worked out from each file's own DICOM header tags, independently of the reader
    under test: (files sorted along the slice normal, spacing, origin, direction)."""
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        tags = {key: reader.GetMetaData(key).strip() for key in ("0020|0032", "0020|0037", "0028|0030")}
        headers.append((path, tags))
    cosines = np.array([float(v) for v in headers[0][1]["0020|0037"].split("\\")])
    row, col = cosines[:3], cosines[3:]
    normal = np.cross(row, col)
    positions = {path: np.array([float(v) for v in tags["0020|0032"].split("\\")]) for path, tags in headers}
    ordered = sorted(positions, key=lambda p: positions[p] @ normal)
    steps = np.diff([positions[p] @ normal for p in ordered])
    row_spacing, col_spacing = (float(v) for v in headers[0][1]["0028|0030"].split("\\"))
    # PixelSpacing is (between rows, between columns) = (y, x).
    spacing = (col_spacing, row_spacing, float(np.mean(steps)))
    direction = np.column_stack([row, col, normal])
    return ordered, spacing, positions[ordered[0]], direction, steps


# ------------------------------------------------------------------------ real DICOM series


@pytest.mark.realdata
@pytest.mark.parametrize("series", DICOM_SERIES)
def test_dicom_series_geometry_matches_headers_and_survives_nifti(shared_data, series, tmp_path):
    folder = shared_data / series
    volume = imageio.read_image(folder)
    files, spacing, origin, direction, steps = dicom_header_geometry(folder)

    assert volume.array.shape[0] == len(files)
    np.testing.assert_allclose(steps, steps[0], atol=1e-3)  # evenly spaced series
    np.testing.assert_allclose(volume.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(volume.origin, origin, atol=1e-4)
    np.testing.assert_allclose(volume.direction, direction, atol=1e-6)
    # The corner voxel of the last slice lands on that file's ImagePositionPatient.
    last = files[-1]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(last))
    reader.ReadImageInformation()
    last_position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
    np.testing.assert_allclose(volume.index_to_world([0, 0, len(files) - 1]), last_position, atol=1e-3)
    # Slice order: slice k of the volume is the k-th file along the normal, voxel for voxel.
    for k in (0, len(files) - 1):
        single = sitk.GetArrayFromImage(sitk.ReadImage(str(files[k])))[0]
        np.testing.assert_array_equal(volume.array[k], single)

    # Round trips: NIfTI stores geometry as float32, NRRD exactly.
    for name, atol in (("ct.nii.gz", 1e-4), ("ct.nrrd", 1e-9)):
        back = imageio.read_image(imageio.write_image(volume, tmp_path / name))
        assert_geometry(back, volume, atol)
        assert back.array.dtype == volume.array.dtype
        np.testing.assert_array_equal(back.array, volume.array)


@pytest.mark.realdata
def test_dicom_slice_spacing_comes_from_positions_not_thickness(shared_data):
    # This series has SliceThickness 3 mm but slices 2 mm apart: spacing must be 2 mm.
    volume = imageio.read_image(shared_data / "totalseg/ct_dicom_20slices")
    assert volume.shape_xyz == (512, 512, 20)
    assert volume.spacing[2] == pytest.approx(2.0, abs=1e-6)
    assert volume.spacing[0] == pytest.approx(0.9765625)
    assert volume.array.min() >= -1024 - 1  # rescale intercept applied: values are HU
    assert volume.array.max() > 200


@pytest.mark.realdata
def test_dicom_series_with_a_missing_slice_is_refused(shared_data, tmp_path):
    source = shared_data / "totalseg/ct_dicom_20slices"
    files, *_ = dicom_header_geometry(source)
    folder = tmp_path / "gappy"
    folder.mkdir()
    for index, path in enumerate(files[:8]):
        if index != 4:
            shutil.copy(path, folder / path.name)
    with pytest.raises(InputError, match="not evenly spaced") as err:
        imageio.read_image(folder)
    assert str(folder) in str(err.value)


@pytest.mark.realdata
def test_single_dicom_file_asks_for_the_folder(shared_data):
    one = next((shared_data / "dcmqi/ct-3slice").glob("*.dcm"))
    with pytest.raises(InputError, match="single DICOM slice.*3D image is needed") as err:
        imageio.read_image(one)
    assert one.name in str(err.value)


@pytest.mark.realdata
def test_dcmqi_liver_nrrd_is_readable_on_the_ct_grid(shared_data):
    ct = imageio.read_image(shared_data / "dcmqi/ct-3slice")
    mask = imageio.read_image(shared_data / "dcmqi/liver_seg.nrrd")
    assert mask.array.shape == ct.array.shape == (3, 512, 512)
    imageio.check_same_grid(ct, mask, "liver_seg.nrrd")  # same grid within tolerance
    assert set(np.unique(mask.array)) == {0, 1}
    assert 1000 < int((mask.array == 1).sum()) < mask.array.size // 2

    label_map = imageio.read_label_map(shared_data / "dcmqi/liver_seg.nrrd")
    assert label_map.array.dtype == np.uint8
    np.testing.assert_array_equal(label_map.array, mask.array)
    as_seg, segments = imageio.read_seg_nrrd(shared_data / "dcmqi/liver_seg.nrrd")
    assert [s["label_value"] for s in segments] == [1]
    np.testing.assert_array_equal(as_seg.array, mask.array)
    assert_geometry(as_seg, mask, 1e-9)


# ------------------------------------------------------------------- synthetic round trips


@pytest.mark.parametrize("suffix, atol", [(".nii.gz", 1e-4), (".nii", 1e-4), (".nrrd", 1e-12), (".mha", 1e-12)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_round_trip_keeps_voxels_and_rotated_geometry(small_volume, tmp_path, suffix, atol, dtype):
    volume = small_volume(dtype=dtype, origin=(-123.456789, 45.678901, -789.012345))
    assert not np.allclose(volume.direction, np.eye(3))
    back = imageio.read_image(imageio.write_image(volume, tmp_path / f"v{suffix}"))
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    assert_geometry(back, volume, atol)
    # The same voxel lands on the same world point.
    np.testing.assert_allclose(back.index_to_world([7, 0, 5]), volume.index_to_world([7, 0, 5]), atol=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_write_image_replaces_atomically_and_rejects_unknown_extension(small_volume, tmp_path):
    path = tmp_path / "v.nii.gz"
    imageio.write_image(small_volume(), path)
    imageio.write_image(small_volume(dtype=np.float32), path)
    assert imageio.read_image(path).array.dtype == np.float32
    with pytest.raises(InputError, match="unknown image file extension"):
        imageio.write_image(small_volume(), tmp_path / "v.xyz")


# ----------------------------------------------------------------------- Slicer .seg.nrrd


def test_segment_styles_carry_snomed_terminology():
    styles = segment_styles()
    assert list(styles) == ["liver", "tumor"]
    liver, tumor = styles["liver"], styles["tumor"]
    assert (liver["label_value"], liver["name"]) == (1, "Liver")
    assert (tumor["label_value"], tumor["name"]) == (2, "Liver tumor")
    assert liver["terminology"]["type"][:2] == ["SCT", "10200004"]
    assert liver["terminology"]["category"][:2] == ["SCT", "123037004"]
    assert tumor["terminology"]["type"][:2] == ["SCT", "108369006"]
    assert tumor["terminology"]["category"][:2] == ["SCT", "49755003"]
    assert "~SCT^10200004^Liver~" in liver["terminology_entry"]
    assert all(0 <= c <= 1 for c in liver["color"]) and liver["color_rgb"] == (221, 130, 101)
    styles["liver"]["name"] = "changed"  # copies: the next caller is unaffected
    assert segment_styles()["liver"]["name"] == "Liver"


def test_seg_nrrd_round_trip_names_values_colours_masks_geometry(small_volume, tmp_path):
    import slicerio

    label_map = small_volume(shape_zyx=(7, 9, 11), values="labels")
    path = imageio.write_seg_nrrd(label_map, tmp_path / "case.seg.nrrd")
    back, segments = imageio.read_seg_nrrd(path)

    styles = segment_styles()
    assert [(s["name"], s["label_value"]) for s in segments] == [("Liver", 1), ("Liver tumor", 2)]
    for segment, style in zip(segments, styles.values()):
        assert segment["color"] == pytest.approx(style["color"], abs=1e-6)
        assert segment["terminology"]["type"] == style["terminology"]["type"]
    np.testing.assert_array_equal(back.array, label_map.array)
    assert_geometry(back, label_map, 1e-12)

    # slicerio (the reference reader of Slicer's header fields) sees the same segments.
    seg = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(seg) == ["Liver", "Liver tumor"]
    tumour_ijk = slicerio.segment_mask(seg, "Liver tumor")
    np.testing.assert_array_equal(tumour_ijk, (label_map.array == 2).transpose(2, 1, 0))
    liver = slicerio.segment_from_name(seg, "Liver")
    assert liver["labelValue"] == 1 and liver["colorAutoGenerated"] is False
    assert liver["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    expected_ijk_to_lps = np.eye(4)
    expected_ijk_to_lps[:3, :3] = label_map.direction @ np.diag(label_map.spacing)
    expected_ijk_to_lps[:3, 3] = label_map.origin
    np.testing.assert_allclose(seg["ijkToLPS"], expected_ijk_to_lps, atol=1e-12)
    # Extent (i, j, k bounds) is what Slicer uses to crop: check it for the tumour.
    nz = np.nonzero(tumour_ijk)
    assert slicerio.segment_from_name(seg, "Liver tumor")["extent"] == [int(v) for a in nz for v in (a.min(), a.max())]


def test_seg_nrrd_is_read_by_slicer_with_names_colours_values(small_volume, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    label_map = small_volume(shape_zyx=(5, 6, 7), values="labels")
    path = imageio.write_seg_nrrd(label_map, tmp_path / "case.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    styles = list(segment_styles().values())
    assert segmentation.GetNumberOfSegments() == 2
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index, style in enumerate(styles):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == style["name"]
        assert segment.GetLabelValue() == style["label_value"]
        assert segment.GetColor() == pytest.approx(style["color"], abs=1e-6)
        assert segment.GetTerminology() == style["terminology_entry"]
        image = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        # Slicer's image-to-world (RAS) equals our geometry, LPS flipped.
        expected = np.eye(4)
        expected[:3, :3] = label_map.direction @ np.diag(label_map.spacing)
        expected[:3, 3] = label_map.origin
        np.testing.assert_allclose(ijk_to_ras, lps_to_ras @ expected, atol=1e-9)
        # The voxels Slicer holds for this segment are exactly our label's voxels.
        i0, i1, j0, j1, k0, k1 = image.GetExtent()
        values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        full = np.zeros(label_map.array.shape, bool)
        full[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = values == style["label_value"]
        np.testing.assert_array_equal(full, label_map.array == style["label_value"])


def test_seg_nrrd_custom_segments_and_unlabelled_values(small_volume, tmp_path):
    label_map = small_volume(values="labels")
    label_map.array[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"label values \[7\] .* no segment"):
        imageio.write_seg_nrrd(label_map, tmp_path / "x.seg.nrrd")
    assert not (tmp_path / "x.seg.nrrd").exists()
    custom = ["liver", "tumor", {"label_value": 7, "name": "Cyst", "color": (0.1, 0.2, 0.3)}]
    path = imageio.write_seg_nrrd(label_map, tmp_path / "x.seg.nrrd", segments=custom)
    back, segments = imageio.read_seg_nrrd(path)
    assert [(s["name"], s["label_value"]) for s in segments] == [("Liver", 1), ("Liver tumor", 2), ("Cyst", 7)]
    assert segments[2]["color"] == pytest.approx((0.1, 0.2, 0.3))
    np.testing.assert_array_equal(back.array, label_map.array)
    # Reading it as a WeakLiverSeg label map refuses the foreign segment, naming it.
    with pytest.raises(InputError, match="Cyst"):
        imageio.read_label_map(path)
    with pytest.raises(InputError, match="must end with .seg.nrrd"):
        imageio.write_seg_nrrd(label_map, tmp_path / "x.nrrd")


def test_overlapping_slicer_segments_flatten_with_tumour_inside_liver(small_volume, tmp_path):
    """A Slicer file where the user painted the liver over the tumour (two layers)."""
    import slicerio

    truth = small_volume(shape_zyx=(5, 6, 7), values="labels")
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = truth.direction @ np.diag(truth.spacing)
    ijk_to_lps[:3, 3] = truth.origin
    seg = slicerio.create_segmentation(truth.shape_xyz, ijk_to_lps)
    slicerio.add_segment(seg, (truth.array >= 1).transpose(2, 1, 0), {"id": "a", "name": "liver"})
    slicerio.add_segment(seg, (truth.array == 2).transpose(2, 1, 0), {"id": "b", "name": "Tumour"})
    assert seg["voxels"].ndim == 4  # Slicer's layered storage
    path = tmp_path / "painted.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)

    flat, segments = imageio.read_seg_nrrd(path)
    assert [style_for_segment(s) for s in segments] == ["liver", "tumor"]
    label_map = imageio.read_label_map(path)
    np.testing.assert_array_equal(label_map.array, truth.array)
    assert_geometry(label_map, truth, 1e-12)


def test_write_label_map_picks_format_by_extension(small_volume, tmp_path):
    label_map = small_volume(values="labels")
    as_int = label_map.with_array(label_map.array.astype(np.int32))
    for name in ("m.nii.gz", "m.seg.nrrd"):
        path = imageio.write_label_map(as_int, tmp_path / name)
        back = imageio.read_label_map(path)
        assert back.array.dtype == np.uint8
        np.testing.assert_array_equal(back.array, label_map.array)
        assert_geometry(back, label_map, 1e-5)
    with gzip.open(tmp_path / "m.nii.gz") as f:
        assert f.read(4) == (348).to_bytes(4, "little")  # a NIfTI-1 header
    assert (tmp_path / "m.seg.nrrd").read_bytes().startswith(b"NRRD")
    with pytest.raises(InputError, match="0..255"):
        imageio.write_label_map(label_map.with_array(label_map.array.astype(np.int16) - 1), tmp_path / "n.nii.gz")


# ---------------------------------------------------------------------------- resampling


def linear_field(points: np.ndarray) -> np.ndarray:
    return 3.0 * points[..., 0] - 2.0 * points[..., 1] + 0.5 * points[..., 2] + 100.0


def test_resample_linear_places_a_moved_rotated_phase_on_the_reference_grid(small_volume):
    reference = small_volume(shape_zyx=(6, 8, 9), spacing=(1.5, 1.5, 2.0))
    # Another phase: different rotation, origin and spacing, larger, covering the reference.
    other = small_volume(shape_zyx=(30, 40, 40), spacing=(1.0, 1.1, 1.2),
                         direction=Rotation.from_euler("zx", [-20, 5], degrees=True).as_matrix(), dtype=np.float32)
    other.origin = tuple(reference.index_to_world([4, 4, 3]) - other.direction @ (np.array([20, 20, 15]) * other.spacing))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in other.shape_xyz], indexing="ij"), -1)
    other.array = linear_field(other.index_to_world(ijk.reshape(-1, 3))).reshape(ijk.shape[:3]).transpose(2, 1, 0).astype(np.float32)

    out = imageio.resample_to(other, reference, "linear")
    assert out.same_grid(reference) and out.array.dtype == np.float32
    ref_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in reference.shape_xyz], indexing="ij"), -1).reshape(-1, 3)
    world = reference.index_to_world(ref_ijk)
    inside = np.all((other.world_to_index(world) > 0) & (other.world_to_index(world) < np.array(other.shape_xyz) - 1), axis=1)
    assert inside.mean() > 0.9
    got = out.array[ref_ijk[:, 2], ref_ijk[:, 1], ref_ijk[:, 0]]
    # Trilinear interpolation of a linear field is exact: every voxel holds f(its world point).
    np.testing.assert_allclose(got[inside], linear_field(world[inside]), atol=2e-2)


def test_resample_nearest_keeps_labels_at_their_world_point(small_volume):
    reference = small_volume(shape_zyx=(6, 8, 9), spacing=(1.5, 1.5, 2.0))
    labels = small_volume(shape_zyx=(10, 10, 10), spacing=(0.7, 0.7, 0.7), direction=np.eye(3), dtype=np.uint8)
    labels.array[:] = 0
    target = np.array([5, 3, 2])  # reference voxel (i, j, k) that must receive the label
    # Put label voxel (4, 5, 6) exactly on the reference voxel centre.
    labels.origin = tuple(reference.index_to_world(target) - np.array([4, 5, 6]) * 0.7)
    labels.array[6, 5, 4] = 2
    out = imageio.resample_to(labels, reference, "nearest")
    assert out.array.dtype == np.uint8
    assert out.array[target[2], target[1], target[0]] == 2
    assert int((out.array == 2).sum()) == 1  # a 0.7 mm voxel hits one 1.5 mm voxel centre at most
    # Outside the moved volume: the default value.
    out7 = imageio.resample_to(labels, reference, "nearest", default=7)
    assert (out7.array == 7).sum() > 0 and out7.array[target[2], target[1], target[0]] == 2


def test_resample_onto_own_grid_is_identity(small_volume):
    volume = small_volume(dtype=np.float32)
    np.testing.assert_allclose(imageio.resample_to(volume, volume).array, volume.array, atol=1e-3)
    with pytest.raises(ValueError, match="interpolation"):
        imageio.resample_to(volume, volume, "cubic")


# -------------------------------------------------------------------------------- errors


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError, match="not found") as err:
        imageio.read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_files_name_the_file(small_volume, tmp_path):
    garbage = tmp_path / "x.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot read image") as err:
        imageio.read_image(garbage)
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)
    # A real NIfTI cut short in the middle of its voxels.
    # Real files cut short in the middle of their voxels (ITK alone would zero-fill NIfTI).
    for name in ("cut.nii", "cut.nii.gz", "cut.nrrd", "cut.mha"):
        path = imageio.write_image(small_volume(shape_zyx=(20, 30, 30)), tmp_path / name)
        path.write_bytes(path.read_bytes()[:2000])
        with pytest.raises(InputError, match="truncated|cannot read") as err:
            imageio.read_image(path)
        assert str(path) in str(err.value)
    # A complete NIfTI split into two gzip members (as some tools write) is not mistaken for a cut one.
    volume = small_volume(shape_zyx=(20, 30, 30))
    raw = imageio.write_image(volume, tmp_path / "whole.nii", compress=False).read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "multi.nii.gz").array, volume.array)
    # A corrupt .seg.nrrd.
    bad_seg = tmp_path / "bad.seg.nrrd"
    bad_seg.write_bytes(b"NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(InputError, match="bad.seg.nrrd"):
        imageio.read_seg_nrrd(bad_seg)


def test_2d_image_is_refused_saying_3d_is_needed(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match=r"2D image.*3D image is needed") as err:
        imageio.read_image(path)
    assert str(path) in str(err.value)
    one_slice = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(one_slice))
    with pytest.raises(InputError, match="2D; a 3D image is needed"):
        imageio.read_image(one_slice)


def test_vector_and_4d_images_are_refused(tmp_path):
    vector = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(vector))
    with pytest.raises(InputError, match="vector image \\(3 components"):
        imageio.read_image(vector)
    series = tmp_path / "t.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(series))
    with pytest.raises(InputError, match="4D image"):
        imageio.read_image(series)


def test_empty_folder_has_no_dicom_series(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        imageio.read_image(tmp_path)


def test_check_finite_counts_nan_and_inf(small_volume):
    volume = small_volume(dtype=np.float32)
    imageio.check_finite(volume, "ok.nii.gz")
    imageio.check_finite(small_volume(), "ints.nii.gz")  # integer images are always finite
    volume.array[0, 0, :3] = np.nan
    volume.array[1, 1, 1] = np.inf
    with pytest.raises(InputError, match=r"case003_enhanced.nii.gz: 4 of 336 voxels are NaN or infinite"):
        imageio.check_finite(volume, "case003_enhanced.nii.gz")


def test_check_same_grid_describes_the_mismatch(small_volume):
    reference = small_volume()
    imageio.check_same_grid(reference, small_volume(dtype=np.float32), "plain")
    moved = small_volume(origin=(0.0, 0.0, 0.0), spacing=(0.8, 0.9, 3.0))
    with pytest.raises(InputError, match=r"case001 phase 'plain'.*spacing .* origin") as err:
        imageio.check_same_grid(reference, moved, "case001 phase 'plain'")
    assert "resample" in str(err.value)
    with pytest.raises(InputError, match="size"):
        imageio.check_same_grid(reference, small_volume(shape_zyx=(6, 7, 9)), "x")
    with pytest.raises(InputError, match="direction differs"):
        imageio.check_same_grid(reference, small_volume(direction=np.eye(3)), "x")


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nan_voxels_in_nifti_are_reported(tmp_path, ext):
    # ITK's NIfTI reader turns NaN into 0 silently; read_image must still refuse the file.
    array = np.ones((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / f"nan{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match=r"nan.*1 voxels are NaN or infinite"):
        imageio.read_image(path)
