"""MRML bridge and Slicer logic on a real ``vtkMRMLScene`` (the ``slicer-core`` wheel).

The scene fixture does what the Slicer application does at start-up for what these tests
need: a scene as ``slicer.mrmlScene``, the default colour tables and the Segmentations
module logic registered with the scene (its converters and label-map import / export).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import rotation_matrix
from WeakLiverSegLib.data.boxes import Box
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.data.volume import Volume

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")

from WeakLiverSegLib.slicer import slicer_bridge as bridge  # noqa: E402
from WeakLiverSegLib.slicer import slicer_logic  # noqa: E402
from WeakLiverSegLib.slicer.slicer_logic import WeakLiverSegLogic  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RAS_LPS = np.diag([-1.0, -1.0, 1.0])


def ct_volume(shape_zyx=(10, 24, 28), direction=None, spacing=(0.8, 0.9, 2.5), origin=(-12.5, 30.25, -7.125)) -> Volume:
    """Distinct int16 values, anisotropic spacing, rotated direction: geometry mistakes show."""
    array = ((np.arange(int(np.prod(shape_zyx))) * 7) % 3001 - 1000).reshape(shape_zyx).astype(np.int16)
    return Volume(array, spacing, origin, rotation_matrix() if direction is None else direction)


def liver_labels(grid: Volume) -> Volume:
    """Liver block (1) with two separate tumours (2) of known voxel counts: 3x4x5 = 60 and 1x2x3 = 6."""
    array = np.zeros(grid.array.shape, np.uint8)
    array[1:9, 3:21, 3:25] = 1
    array[2:5, 5:9, 5:10] = 2      # 3 slices x 4 rows x 5 columns
    array[7, 15:17, 18:21] = 2     # 1 x 2 x 3
    return grid.with_array(array)


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def make_roi(scene, center_ras, size, axes_ras=None, name="ROI"):
    """A Markups ROI placed with plain MRML calls (as a user would, in RAS)."""
    import vtk

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) if axes_ras is None else axes_ras
    matrix[:3, 3] = center_ras
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    roi.SetAndObserveObjectToNodeMatrix(m)
    roi.SetSize(*size)
    return roi


# ----------------------------------------------------------------------------- volumes


def test_volume_round_trip_keeps_array_and_oblique_geometry(scene):
    volume = ct_volume()
    node = bridge.volume_to_node(volume, "ct")

    # Slicer's matrix is the LPS geometry with the first two axes flipped.
    expected = np.eye(4)
    expected[:3, :3] = RAS_LPS @ volume.direction @ np.diag(volume.spacing)
    expected[:3, 3] = RAS_LPS @ np.asarray(volume.origin)
    assert np.allclose(ijk_to_ras(node), expected, atol=1e-9)
    assert np.allclose(node.GetSpacing(), volume.spacing)

    back = bridge.volume_from_node(node)
    assert back.array.dtype == np.int16
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.spacing, volume.spacing, atol=1e-9)
    assert np.allclose(back.origin, volume.origin, atol=1e-9)
    assert np.allclose(back.direction, volume.direction, atol=1e-9)

    # Same voxel, same place: LPS from the library, RAS from Slicer's own matrix.
    ijk = np.array([3.0, 5.0, 2.0])
    assert np.allclose(RAS_LPS @ volume.index_to_world(ijk), (ijk_to_ras(node) @ np.r_[ijk, 1.0])[:3])


def test_volume_round_trip_with_flipped_axis_and_slicer_made_node(scene):
    flipped = np.diag([1.0, -1.0, -1.0]) @ rotation_matrix(10.0, 0.0)  # det -1 is legal in images
    volume = ct_volume(direction=flipped, spacing=(1.5, 0.7, 3.0), origin=(100.0, -50.0, 20.0)).with_array(
        np.random.default_rng(0).random((10, 24, 28)).astype(np.float32))
    node = bridge.volume_to_node(volume, "flipped")
    back = bridge.volume_from_node(node)
    assert back.array.dtype == np.float32 and np.array_equal(back.array, volume.array)
    assert back.same_grid(volume, tol=1e-9)

    # A node whose geometry was set by Slicer's own setters (as a loaded file would be).
    made = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "made in Slicer")
    made.SetAndObserveImageData(node.GetImageData())
    made.SetSpacing(2.0, 3.0, 4.0)
    made.SetOrigin(10.0, 20.0, 30.0)  # RAS
    made.SetIJKToRASDirections(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # = LPS identity
    geometry = bridge.volume_from_node(made)
    assert np.allclose(geometry.direction, np.eye(3))
    assert np.allclose(geometry.origin, (-10.0, -20.0, 30.0))
    assert np.allclose(geometry.spacing, (2.0, 3.0, 4.0))


def test_volume_under_a_linear_transform_gets_world_geometry(scene):
    import vtk

    volume = ct_volume(direction=np.eye(3))
    node = bridge.volume_to_node(volume, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)  # 5 mm towards R = -5 mm in L
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = bridge.volume_from_node(node)
    assert np.allclose(np.asarray(moved.origin) - np.asarray(volume.origin), (-5.0, 0.0, 0.0))


def test_volume_without_image_data_is_a_clear_input_error(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty volume")
    with pytest.raises(InputError, match="empty volume"):
        bridge.volume_from_node(empty)


# ----------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("direction", ["rotated", "flipped"])
def test_roi_placed_in_ras_becomes_the_voxel_box_and_comes_back(scene, direction):
    flipped = np.diag([1.0, 1.0, -1.0]) @ rotation_matrix(20.0, 5.0)  # det -1: slices stored head to feet
    volume = ct_volume(direction=None if direction == "rotated" else flipped)
    node = bridge.volume_to_node(volume, "ct")
    ijk_min, ijk_max = np.array([4, 6, 2]), np.array([11, 13, 5])
    # The user's ROI, computed by hand in RAS: centred on the voxel block, aligned with the
    # volume axes, faces on voxel edges.
    center_ras = RAS_LPS @ volume.index_to_world((ijk_min + ijk_max) / 2)
    size = (ijk_max - ijk_min + 1) * np.asarray(volume.spacing)
    axes = RAS_LPS @ volume.direction
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1  # a ROI frame is a rotation
    roi = make_roi(scene, center_ras, size, axes_ras=axes, name="tumour 1")
    bridge.mark_roi(roi, "tumor")

    box = bridge.box_from_roi(roi, node)
    assert (box.label, box.ijk_min, box.ijk_max, box.source) == ("tumor", tuple(ijk_min), tuple(ijk_max), "slicer")
    assert np.allclose(box.lps_min, volume.index_to_world(ijk_min), atol=1e-3)
    assert np.allclose(box.lps_max, volume.index_to_world(ijk_max), atol=1e-3)
    box.validate(volume, "test box")

    again = bridge.roi_from_box(box, node)
    assert np.allclose(bridge.roi_center_ras(again), center_ras, atol=1e-6)
    assert np.allclose(again.GetSize(), size, atol=1e-6)
    assert bridge.box_from_roi(again, node) == box


def test_axis_aligned_ras_roi_maps_through_the_lps_flip(scene):
    # Identity LPS directions: i grows towards L (= -R), j towards P (= -A).
    volume = ct_volume(direction=np.eye(3), spacing=(1.0, 2.0, 3.0), origin=(-20.0, -30.0, 40.0))
    node = bridge.volume_to_node(volume, "ct")
    # Voxels i 5..7, j 2..4, one slice k 3, worked out by hand: R = -(x), A = -(y), S = z.
    center_lps = np.array([-20.0 + 6 * 1.0, -30.0 + 3 * 2.0, 40.0 + 3 * 3.0])
    roi = make_roi(scene, RAS_LPS @ center_lps, (3 * 1.0, 3 * 2.0, 0.0), name="thin")  # drawn in a slice view
    bridge.mark_roi(roi, "tumor")
    box = bridge.box_from_roi(roi, node)
    assert (box.ijk_min, box.ijk_max) == ((5, 2, 3), (7, 4, 3))
    assert box.is_2d


def test_2d_flag_keeps_the_centre_slice_and_bad_rois_are_named(scene):
    volume = ct_volume()
    node = bridge.volume_to_node(volume, "ct")
    roi = bridge.roi_from_box(Box("liver", (2, 3, 1), (20, 18, 8)), node)
    assert not bridge.roi_is_2d(roi) and bridge.roi_label(roi) == "liver"
    bridge.mark_roi(roi, "liver", two_d=True)
    box = bridge.box_from_roi(roi, node)
    assert box.ijk_min[2] == box.ijk_max[2] == 5  # centre of slices 1..8 is 4.5: halves round up

    far = make_roi(scene, (1000.0, 1000.0, 1000.0), (5.0, 5.0, 5.0), name="far away")
    bridge.mark_roi(far, "tumor")
    with pytest.raises(InputError, match="far away"):
        bridge.box_from_roi(far, node)
    unplaced = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "not placed")
    bridge.mark_roi(unplaced, "tumor")
    with pytest.raises(InputError, match="not placed"):
        bridge.box_from_roi(unplaced, node)
    assert [r.GetName() for r in bridge.box_rois(scene)] == [roi.GetName(), "far away", "not placed"]


# ----------------------------------------------------------------------------- segmentations


def test_label_map_becomes_liver_and_tumour_segments_voxel_for_voxel(scene):
    from WeakLiverSegLib.data.terminology import segment_styles

    volume = ct_volume()
    node = bridge.volume_to_node(volume, "ct")
    labels = liver_labels(volume)
    seg_node = bridge.labelmap_to_segmentation(labels, node, name="prediction")
    segmentation = seg_node.GetSegmentation()
    styles = segment_styles()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Liver", "Liver tumor"]
    for kind in ("liver", "tumor"):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(styles[kind]["name"]))
        assert np.allclose(segment.GetColor(), styles[kind]["color"], atol=1e-6)
        assert bridge._get_terminology(segment) == styles[kind]["terminology_entry"]

    liver = bridge.segment_array(seg_node, segmentation.GetSegmentIdBySegmentName("Liver"), node)
    tumour = bridge.segment_array(seg_node, segmentation.GetSegmentIdBySegmentName("Liver tumor"), node)
    assert np.array_equal(liver, (labels.array == 1).astype(np.uint8))   # non-overlapping: label 1 only
    assert np.array_equal(tumour, (labels.array == 2).astype(np.uint8))
    mask = bridge.segmentation_to_mask(seg_node, node)
    assert mask.array.dtype == np.uint8 and np.array_equal(mask.array, labels.array)
    assert mask.same_grid(volume, tol=1e-9)


def test_hand_drawn_overlapping_segments_merge_to_the_store_labels(scene):
    volume = ct_volume()
    node = bridge.volume_to_node(volume, "ct")
    labels = liver_labels(volume)
    # A Segment Editor user: "liver" drawn over the tumour too, and a renamed "Lesion" segment.
    whole_liver = bridge.labelmap_to_segmentation(labels.with_array((labels.array >= 1).astype(np.uint8)), node, name="manual")
    lesion_map = bridge.volume_to_node(labels.with_array((labels.array == 2).astype(np.uint8)), "lesion", labelmap=True)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lesion_map, whole_liver)
    segmentation = whole_liver.GetSegmentation()
    last = segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1)
    last.SetName("Lesion")
    assert segmentation.GetNumberOfSegments() == 3  # Liver, (empty) Liver tumor, Lesion
    kinds = bridge.segments_by_kind(whole_liver)
    assert len(kinds["liver"]) == 1 and len(kinds["tumor"]) == 2 and not kinds[None]
    mask = bridge.segmentation_to_mask(whole_liver, node)
    assert np.array_equal(mask.array, labels.array)

    unrelated = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "spleen only")
    unrelated.GetSegmentation().AddEmptySegment("", "Spleen")
    assert bridge.segmentation_to_mask(unrelated, node) is None


def test_label_map_with_foreign_values_is_refused(scene):
    volume = ct_volume()
    bad = volume.with_array(np.full(volume.array.shape, 7, np.uint8))
    with pytest.raises(InputError, match=r"\[7\]"):
        bridge.labelmap_to_segmentation(bad, None, name="bad labels")


# ----------------------------------------------------------------------------- tumour table


def test_tumour_table_volumes_are_voxel_count_times_voxel_volume(scene):
    volume = ct_volume()
    labels = liver_labels(volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    table = bridge.tumour_table(labels)
    assert table.GetNumberOfRows() == 2
    headers = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert headers == list(bridge.TABLE_COLUMNS)
    rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())] for r in range(2)]
    assert [float(r[1]) for r in rows] == pytest.approx([60 * voxel_ml, 6 * voxel_ml], abs=1e-3)
    assert [r[0] for r in rows] == ["1", "2"] and all(r[2] == "n/a" for r in rows)

    measured = bridge.measure_tumours(labels)
    assert [m["voxels"] for m in measured] == [60, 6]
    # Longest diameter of the 1x2x3 block: its two far corners, in mm on the rotated grid.
    corner_a = volume.index_to_world([18, 15, 7])
    corner_b = volume.index_to_world([20, 16, 7])
    assert measured[1]["longest_diameter_mm"] == pytest.approx(np.linalg.norm(corner_a - corner_b), abs=1e-6)
    big = np.argwhere(labels.array == 2)
    big = big[big[:, 0] < 6][:, ::-1]
    far = max(np.linalg.norm(volume.index_to_world(a) - volume.index_to_world(b)) for a in big for b in big)
    assert measured[0]["longest_diameter_mm"] == pytest.approx(far, abs=1e-6)
    centroid = RAS_LPS @ volume.index_to_world(big.mean(axis=0))
    assert np.allclose(measured[0]["centroid_ras"], centroid)

    # The Couinaud hook gets each component (with its geometry) and fills the column.
    seen = []

    def hook(component: Volume):
        seen.append(int(component.array.sum()))
        return 6 if component.array.sum() > 10 else None

    table = bridge.tumour_table(labels, table_node=table, couinaud_of=hook)
    assert sorted(seen) == [6, 60]
    assert [table.GetCellText(r, 2) for r in range(2)] == ["VI", "n/a"]


def test_tumour_table_of_a_healthy_liver_is_empty(scene):
    volume = ct_volume()
    labels = volume.with_array((liver_labels(volume).array >= 1).astype(np.uint8))
    assert bridge.tumour_table(labels).GetNumberOfRows() == 0


# ----------------------------------------------------------------------------- logic: add case, load result


def _annotated_scene(scene, plain_on_other_grid=True):
    volume = ct_volume()
    enhanced = bridge.volume_to_node(volume, "enhanced")
    plain_volume = volume.with_array((volume.array // 2).astype(np.int16))
    if plain_on_other_grid:  # a registered phase on its own grid: resampled onto the reference
        plain_volume = Volume(plain_volume.array, (0.8, 0.9, 2.5), tuple(np.asarray(volume.origin) + 0.2),
                              volume.direction)
    plain = bridge.volume_to_node(plain_volume, "plain")
    labels = liver_labels(volume)
    seg = bridge.labelmap_to_segmentation(labels, enhanced, name="editor")
    tumour = bridge.roi_from_box(Box("tumor", (5, 5, 2), (9, 8, 4)), enhanced)
    two_d = bridge.roi_from_box(Box("tumor", (18, 15, 7), (20, 16, 7)), enhanced)
    liver = bridge.roi_from_box(Box("liver", (3, 3, 1), (24, 20, 8)), enhanced)
    return volume, enhanced, plain, labels, seg, (tumour, two_d, liver)


def test_add_case_writes_a_store_that_loads_and_validates(scene, tmp_path):
    from WeakLiverSegLib.data.store import Dataset

    volume, enhanced, plain, labels, seg, rois = _annotated_scene(scene)
    logic = WeakLiverSegLogic(scene)
    volumes = logic.phases_from_nodes(enhanced, plain)
    couinaud, volume_label = slicer_logic.labels_from_form([6, 7], "unknown")
    folder = tmp_path / "store"
    case = logic.add_case_to_dataset(folder, "case007", volumes, segmentation=seg, couinaud=couinaud,
                                     volume_label=volume_label, split="train")

    dataset = Dataset.load(folder)
    dataset.validate(deep=True)
    stored = dataset.cases["case007"]
    assert stored.reference == "enhanced" and set(stored.images) == {"enhanced", "plain"}
    assert [(b.ijk_min, b.ijk_max) for b in stored.boxes] == [((5, 5, 2), (9, 8, 4)), ((18, 15, 7), (20, 16, 7))]
    assert stored.boxes[1].is_2d
    assert (stored.liver_box.ijk_min, stored.liver_box.ijk_max) == ((3, 3, 1), (24, 20, 8))
    assert stored.couinaud == [6, 7] and stored.volume_label == "tumour"
    assert case.label_kinds == {"mask", "boxes", "couinaud", "volume"}
    image = dataset.read_image("case007")
    assert np.array_equal(image.array, volume.array) and image.same_grid(volume, tol=1e-4)
    assert np.array_equal(dataset.read_mask("case007").array, labels.array)
    assert dataset.read_image("case007", "plain").same_grid(volume, tol=1e-4)

    # Never overwritten silently; the first case is intact after the refusal.
    before = (folder / "dataset.json").read_text()
    with pytest.raises(InputError, match="case007.*already exists"):
        logic.add_case_to_dataset(folder, "case007", {"ct": enhanced})
    assert (folder / "dataset.json").read_text() == before
    assert logic.case_exists(folder, "case007") and logic.next_case_id(folder) == "case000"
    replaced = logic.add_case_to_dataset(folder, "case007", {"ct": enhanced}, rois=[], volume_label="healthy",
                                         overwrite=True)
    assert replaced.label_kinds == {"volume"} and replaced.images == {"ct": "images/case007_ct.nii.gz"}
    Dataset.load(folder).validate(deep=True)


def test_add_case_refuses_bad_input_with_one_clear_message(scene, tmp_path):
    volume, enhanced, plain, labels, seg, rois = _annotated_scene(scene, plain_on_other_grid=False)
    logic = WeakLiverSegLogic(scene)
    with pytest.raises(InputError, match="case id"):
        logic.add_case_to_dataset(tmp_path / "a", "  ", {"ct": enhanced})
    with pytest.raises(InputError, match="liver boxes"):
        extra = bridge.roi_from_box(Box("liver", (3, 3, 1), (10, 10, 3)), enhanced)
        logic.add_case_to_dataset(tmp_path / "b", "case000", {"ct": enhanced})
    logic.delete_box(extra)
    with pytest.raises(InputError, match="healthy"):
        slicer_logic.labels_from_form([3], "healthy")
    with pytest.raises(InputError):
        logic.add_case_to_dataset(tmp_path / "c", "case000", {"ct": enhanced}, volume_label="healthy")  # tumour boxes
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written on bad input


def test_load_segment_result_makes_segments_table_and_probability(scene, tmp_path):
    from WeakLiverSegLib.data.imageio import write_image, write_label_map

    volume = ct_volume()
    node = bridge.volume_to_node(volume, "patient")
    labels = liver_labels(volume)
    write_label_map(labels, tmp_path / "labels.nii.gz")
    probability = volume.with_array((labels.array == 2).astype(np.float32) * 0.9)
    write_image(probability, tmp_path / "probabilities.nii.gz")
    out = WeakLiverSegLogic(scene).load_segment_result(tmp_path / "labels.nii.gz", tmp_path / "probabilities.nii.gz", node)
    assert out.segmentation.GetName() == "patient WeakLiverSeg"
    assert np.array_equal(bridge.segmentation_to_mask(out.segmentation, node).array, labels.array)
    assert out.table.GetNumberOfRows() == 2 and [t["voxels"] for t in out.tumours] == [60, 6]
    assert np.allclose(bridge.volume_from_node(out.probability).array, probability.array)
    assert out.uncertainty is None and out.summary.startswith("2 tumours")


# ----------------------------------------------------------------------------- the training CLI reads the store


def _cli_available() -> bool:
    lib = REPO_ROOT / "WeakLiverSegLib"
    return (lib / "app" / "cli.py").is_file() and (lib / "recipes" / "o2l" / "__init__.py").is_file()


@pytest.mark.slow
def test_training_cli_reads_the_store_written_by_add_case(scene, tmp_path):
    if not _cli_available():
        pytest.skip("training CLI not available yet")
    volume, enhanced, plain, labels, seg, rois = _annotated_scene(scene, plain_on_other_grid=False)
    logic = WeakLiverSegLogic(scene)
    store = tmp_path / "store"
    logic.add_case_to_dataset(store, "case000", {"ct": enhanced}, segmentation=seg)
    logic.add_case_to_dataset(store, "case001", {"ct": enhanced}, segmentation=None)  # boxes only
    model = tmp_path / "model"
    argv = [sys.executable, "-m", "WeakLiverSegLib", "train", "--dataset", str(store), "--recipe", "o2l",
            "--out", str(model), "--steps", "2", "--progress", "jsonl", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert any('"done"' in line for line in events)
    assert (model / "model.json").is_file()

    # "Segment": the model runs on the scene's volume in the background, the result comes back
    # as segments + table on the volume's grid, and the temporary files are removed.
    runner = logic.start_segmentation(model, {"ct": enhanced}, device="cpu", probabilities=True)
    workdir = Path(runner.argv[runner.argv.index("--out") + 1]).parent
    assert runner.wait(240) == 0, runner.error_message
    assert [e["event"] for e in runner.poll()][-2:] == ["done", "exit"]
    output = logic.finish_segmentation()
    assert not workdir.exists()
    mask = bridge.segmentation_to_mask(output.segmentation, enhanced)
    assert mask is not None and mask.same_grid(volume, tol=1e-6) and set(np.unique(mask.array)) <= {0, 1, 2}
    assert output.table.GetNumberOfRows() == len(output.tumours)
    assert bridge.volume_from_node(output.probability).same_grid(volume, tol=1e-4)


# ----------------------------------------------------------------------------- Couinaud column


def test_couinaud_lookup_names_the_segment_holding_most_of_each_tumour(scene, monkeypatch, tmp_path):
    volume = ct_volume()
    labels = liver_labels(volume)
    couinaud = np.where(labels.array >= 1, 7, 0).astype(np.uint8)
    couinaud[:, :, :8] = np.where(labels.array[:, :, :8] >= 1, 6, 0)  # columns 5..7 of the big tumour
    rows = bridge.measure_tumours(labels, couinaud_of=bridge.couinaud_lookup(volume.with_array(couinaud)))
    assert [r["couinaud"] for r in rows] == [6, 7]  # 60-voxel tumour: 36 voxels in VI, 24 in VII
    outside = bridge.couinaud_lookup(volume.with_array(np.zeros_like(couinaud)))
    assert [r["couinaud"] for r in bridge.measure_tumours(labels, couinaud_of=outside)] == [None, None]

    # The logic wires the constructor in (here a stand-in map) when asked for it.
    import WeakLiverSegLib.anatomy.couinaud_map as couinaud_map
    from WeakLiverSegLib.data.imageio import write_label_map

    monkeypatch.setattr(couinaud_map, "construct_couinaud",
                        lambda image, liver, where="": image.with_array(couinaud))
    node = bridge.volume_to_node(volume, "enhanced")
    label_file = tmp_path / "labels.nii.gz"
    write_label_map(labels, label_file)
    out = WeakLiverSegLogic(scene).load_segment_result(label_file, None, node, couinaud_node=node)
    assert [out.table.GetCellText(r, 2) for r in range(2)] == ["VI", "VII"] and not out.notes


# ----------------------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_real_ct_and_expert_mask_round_trip_through_the_scene(scene, shared_data):
    from WeakLiverSegLib.data.imageio import read_image, read_label_map

    folder = shared_data / "ircadb" / "p01"
    ct, truth = read_image(folder / "ct.nii.gz"), read_label_map(folder / "label.nii.gz")
    # Crop to the liver (+2 voxels): the real geometry and lesion shapes, a quarter of the voxels.
    present = np.argwhere(truth.array > 0)
    lo, hi = np.maximum(present.min(0) - 2, 0), present.max(0) + 3
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    origin = ct.index_to_world(lo[::-1])
    ct = Volume(ct.array[crop].copy(), ct.spacing, tuple(origin), ct.direction)
    truth = Volume(truth.array[crop].copy(), truth.spacing, tuple(origin), truth.direction)

    node = bridge.volume_to_node(ct, "p01")
    assert np.array_equal(bridge.volume_from_node(node).array, ct.array)
    seg = bridge.labelmap_to_segmentation(truth, node)
    assert np.array_equal(bridge.segmentation_to_mask(seg, node).array, truth.array)
    table = bridge.tumour_table(truth)
    from scipy import ndimage

    components, count = ndimage.label(truth.array == 2, structure=np.ones((3, 3, 3)))
    counts = sorted(np.bincount(components.ravel())[1:].tolist(), reverse=True)
    assert table.GetNumberOfRows() == count >= 1
    voxel_ml = ct.voxel_volume_mm3 / 1000
    assert [float(table.GetCellText(r, 1)) for r in range(count)] == pytest.approx([n * voxel_ml for n in counts], abs=1e-3)
