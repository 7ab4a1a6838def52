"""DICOM SEG in and out (data/dicom_seg.py): dcmqi's liver.dcm against its NRRD, a SEG written on
the TotalSegmentator DICOM series read back with highdicom and pydicom, and the bad inputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="highdicom (DICOM SEG) is not installed")

from WeakLiverSegLib.data import dicom_seg  # noqa: E402
from WeakLiverSegLib.data.imageio import read_dicom_series, read_image, read_label_map, write_label_map  # noqa: E402
from WeakLiverSegLib.data.terminology import segment_styles  # noqa: E402
from WeakLiverSegLib.data.volume import Volume  # noqa: E402
from WeakLiverSegLib.errors import InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*the series has no (Study|Series)InstanceUID")


@pytest.fixture(scope="module")
def series_labels(shared_data):
    """The TotalSegmentator 20-slice series and a label map on it with liver, tumour and edge voxels."""
    folder = shared_data / "totalseg" / "ct_dicom_20slices"
    volume = read_dicom_series(folder)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[3:15, 100:300, 120:350] = 1
    labels[6:9, 150:180, 200:260] = 2
    labels[0, 0, 0], labels[19, 511, 0], labels[10, 5, 511] = 1, 2, 1  # corners: any flip or shift shows
    return folder, volume.with_array(labels)


@pytest.fixture(scope="module")
def written_seg(series_labels, tmp_path_factory):
    folder, labels = series_labels
    path = tmp_path_factory.mktemp("seg") / "result.dcm"
    dicom_seg.write_dicom_seg(labels, path, folder, recipe="o2l", algorithm_type="SEMIAUTOMATIC", model_name="m1")
    return path


# ------------------------------------------------------------------------------ dcmqi


@pytest.mark.realdata
def test_dcmqi_liver_seg_reads_as_the_mask_of_liver_seg_nrrd(shared_data):
    dcmqi = shared_data / "dcmqi"
    truth = read_label_map(dcmqi / "liver_seg.nrrd")
    mask = read_label_map(dcmqi / "liver.dcm")  # SRT T-62000 "Liver" -> label 1
    assert mask.same_grid(truth) and mask.array.dtype == np.uint8
    assert np.array_equal(mask.array, truth.array) and mask.array.sum() == 107098
    ct = read_image(dcmqi / "ct-3slice")
    on_ct = read_label_map(dcmqi / "liver.dcm", reference=ct)  # placed on the CT grid (same here)
    assert on_ct.same_grid(ct) and np.array_equal(on_ct.array, truth.array)


@pytest.mark.realdata
def test_evaluate_takes_a_dicom_seg_as_truth(shared_data, tmp_path):
    from WeakLiverSegLib.app import cli

    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--pred", str(shared_data / "dcmqi" / "liver_seg.nrrd"),
                     "--truth", str(shared_data / "dcmqi" / "liver.dcm"), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["summary"]["liver"]["dice_global"] == pytest.approx(1.0)


@pytest.mark.realdata
def test_a_dicom_seg_is_not_read_as_an_image(shared_data):
    assert dicom_seg.is_dicom_seg(shared_data / "dcmqi" / "liver.dcm")
    assert not dicom_seg.is_dicom_seg(shared_data / "dcmqi" / "ct-3slice" / "01.dcm")
    assert not dicom_seg.is_dicom_seg(shared_data / "dcmqi" / "liver_seg.nrrd")
    with pytest.raises(InputError, match="is a DICOM SEG"):
        read_image(shared_data / "dcmqi" / "liver.dcm")


# ------------------------------------------------------------------------------ writing


@pytest.mark.realdata
def test_written_seg_reads_back_voxel_for_voxel_with_highdicom(written_seg, series_labels):
    import highdicom as hd

    _, labels = series_labels
    back = dicom_seg.read_dicom_seg(written_seg)
    assert back.same_grid(labels) and np.array_equal(back.array, labels.array)
    seg = hd.seg.segread(str(written_seg))
    assert seg.get_segment_numbers() == [1, 2]
    volume = seg.get_volume(combine_segments=True)  # highdicom's own geometry: slices top-down
    grid, _ = dicom_seg._to_volume(volume)
    assert grid.same_grid(labels)


@pytest.mark.realdata
def test_written_seg_per_frame_geometry_codes_and_uids_with_pydicom(written_seg, series_labels):
    import highdicom as hd
    import pydicom

    folder, labels = series_labels
    files = dicom_seg.dicom_series_files(folder)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ds = pydicom.dcmread(written_seg)
    assert ds.SOPClassUID == dicom_seg.SEG_SOP_CLASS_UID and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert ds.NumberOfFrames == 2 * len(files) and (ds.Rows, ds.Columns) == (512, 512)
    # the series is anonymised (no Study/Series UID): the SEG derives them, the same every time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = dicom_seg.source_datasets(files, folder)
    assert ds.StudyInstanceUID == again[0].StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == again[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(s.file_meta.MediaStorageSOPInstanceUID) for s in sources}
    # every frame: its position is its source file's, and its pixels are that slice of the label map
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([labels.spacing[1], labels.spacing[0]])
    frames = ds.pixel_array
    by_uid = {str(s.file_meta.MediaStorageSOPInstanceUID): k for k, s in enumerate(sources)}
    for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = by_uid[uid]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[k].ImagePositionPatient])
        assert position == pytest.approx(labels.index_to_world((0, 0, k)).tolist(), abs=1e-3)
        assert np.array_equal(frames[n] > 0, labels.array[k] == number)
    # segments: names, SNOMED CT codes, colours, algorithm identification
    styles = list(segment_styles().values())
    for item, style in zip(ds.SegmentSequence, styles):
        term = style["terminology"]
        assert item.SegmentLabel == style["name"]
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert [code.CodingSchemeDesignator, code.CodeValue] == term["type"][:2]
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert [category.CodingSchemeDesignator, category.CodeValue] == term["category"][:2]
        assert list(item.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*style["color_rgb"]).value)
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "WeakLiverSeg" and "recipe=o2l" in algorithm.AlgorithmParameters
    assert [c.CodeValue for c in ds.SegmentSequence[1].AnatomicRegionSequence] == ["10200004"]
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"


@pytest.mark.realdata
def test_manual_masks_carry_no_algorithm(series_labels, tmp_path):
    import pydicom

    folder, labels = series_labels
    path = dicom_seg.write_dicom_seg(labels, tmp_path / "expert.dcm", folder, algorithm_type="MANUAL")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert {s.SegmentAlgorithmType for s in ds.SegmentSequence} == {"MANUAL"}
    assert "SegmentationAlgorithmIdentificationSequence" not in ds.SegmentSequence[0]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.realdata
def test_seg_whose_frames_do_not_match_the_image_grid_is_refused(shared_data, tmp_path):
    from WeakLiverSegLib.app import cli

    dcmqi = shared_data / "dcmqi"
    ct = read_image(dcmqi / "ct-3slice")
    shifted = Volume(ct.array, ct.spacing, tuple(np.add(ct.origin, (0.4, 0.0, 0.0))), ct.direction)
    with pytest.raises(InputError, match="do not match the image's grid.*between the image's voxels"):
        read_label_map(dcmqi / "liver.dcm", reference=shifted)
    finer = Volume(ct.array, (0.5, 0.5, 1.0), ct.origin, ct.direction)
    with pytest.raises(InputError, match="do not match the image's grid.*spacing"):
        read_label_map(dcmqi / "liver.dcm", reference=finer)
    # the CLI's add-case: a SEG of another series as the mask of the TotalSegmentator series
    code = cli.main(["add-case", "--dataset", str(tmp_path / "store"), "--case", "c1", "--image",
                     str(shared_data / "totalseg" / "ct_dicom_20slices"), "--mask", str(dcmqi / "liver.dcm")])
    assert code == 2 and not (tmp_path / "store" / "labels").exists()


@pytest.mark.realdata
def test_unknown_segment_codes_are_refused_by_name(shared_data, tmp_path):
    import pydicom

    ds = pydicom.dcmread(shared_data / "dcmqi" / "liver.dcm")
    item = ds.SegmentSequence[0]
    item.SegmentLabel = "Spleen"
    code = item.SegmentedPropertyTypeCodeSequence[0]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "78961009", "SCT", "Spleen"
    ds.save_as(tmp_path / "spleen.dcm")
    with pytest.raises(InputError, match=r"'Spleen' \(SCT 78961009 Spleen\) are neither liver nor liver tumour"):
        read_label_map(tmp_path / "spleen.dcm")
    # a renamed segment keeps its SNOMED code: "Organ 1" with the liver code is still the liver
    item.SegmentLabel = "Organ 1"
    code.CodeValue, code.CodeMeaning = "10200004", "Liver"
    ds.save_as(tmp_path / "renamed.dcm")
    assert read_label_map(tmp_path / "renamed.dcm").array.max() == 1


@pytest.mark.realdata
def test_writing_refuses_a_label_map_off_the_series_grid_or_with_other_values(series_labels, tmp_path):
    folder, labels = series_labels
    off = Volume(labels.array, labels.spacing, tuple(np.add(labels.origin, (0, 0, 1.0))), labels.direction)
    with pytest.raises(InputError, match="not on the reference grid"):
        dicom_seg.write_dicom_seg(off, tmp_path / "a.dcm", folder)
    with pytest.raises(InputError, match=r"label values \[3\]"):
        dicom_seg.write_dicom_seg(labels.with_array(np.full(labels.array.shape, 3, np.uint8)), tmp_path / "b.dcm", folder)
    with pytest.raises(InputError, match="needs its source DICOM series"):
        write_label_map(labels, tmp_path / "c.dcm")
    with pytest.raises(InputError, match="DICOM folder not found"):
        dicom_seg.write_dicom_seg(labels, tmp_path / "d.dcm", tmp_path / "nowhere")
    assert not list(tmp_path.glob("*.dcm"))


# ------------------------------------------------------------------------------ placing frames (no data)


def test_place_on_grid_puts_a_partial_seg_where_its_frames_lie(small_volume):
    image = small_volume(shape_zyx=(6, 7, 8))
    part = np.zeros((3, 7, 8), np.uint8)
    part[0, 1, 2], part[2, 6, 7] = 1, 2
    seg = Volume(part, image.spacing, tuple(image.index_to_world((0, 0, 2))), image.direction)
    placed = dicom_seg.place_on_grid(seg, image, "x.dcm")
    assert placed.same_grid(image)
    expected = np.zeros(image.array.shape, np.uint8)
    expected[2:5] = part
    assert np.array_equal(placed.array, expected)
    # the same frames stored top-down (slice axis reversed) land on the same voxels
    flipped_dir = image.direction.copy()
    flipped_dir[:, 2] *= -1
    flipped = Volume(part[::-1].copy(), image.spacing, tuple(image.index_to_world((0, 0, 4))), flipped_dir)
    assert np.array_equal(dicom_seg.place_on_grid(flipped, image, "x.dcm").array, expected)
    outside = Volume(part, image.spacing, tuple(image.index_to_world((0, 0, 5))), image.direction)
    with pytest.raises(InputError, match="x.dcm: the DICOM SEG's frames do not match the image's grid.*outside"):
        dicom_seg.place_on_grid(outside, image, "x.dcm")
