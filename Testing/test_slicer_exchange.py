"""The panel's "Export dataset" and "Save as DICOM SEG" (slicer_logic), on a real MRML scene."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")

from WeakLiverSegLib.data.store import Dataset  # noqa: E402
from WeakLiverSegLib.data.volume import Volume  # noqa: E402
from WeakLiverSegLib.errors import InputError  # noqa: E402
from WeakLiverSegLib.slicer import slicer_bridge as bridge  # noqa: E402
from WeakLiverSegLib.slicer import slicer_logic  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*the series has no (Study|Series)InstanceUID")


class FakeDicomDatabase:
    """Stands in for slicer.dicomDatabase: SOP Instance UID -> file."""

    def __init__(self, files: dict):
        self.files = files

    def fileForInstance(self, uid):  # noqa: N802 - Slicer's name
        return self.files.get(uid, "")


def _store(root):
    ds = Dataset.create(root, name="tiny")
    labels = np.zeros((4, 8, 9), np.uint8)
    labels[1:3, 2:6, 2:7] = 1
    labels[1, 3:5, 3:5] = 2
    for cid, mask in (("s", True), ("w", False)):
        ds.add_case(cid, {"ct": Volume(labels.astype(np.int16) * 50, (1, 1, 2), (0, 0, 0))},
                    mask=Volume(labels, (1, 1, 2), (0, 0, 0)) if mask else None, volume_label="tumour")
    return ds


def test_export_button_runs_weakliverseg_export_in_the_background(scene, tmp_path):
    logic = slicer_logic.WeakLiverSegLogic(scene)
    ds = _store(tmp_path / "store")
    argv = logic.build_export_command(ds.root, "msd", tmp_path / "out", include_pseudo=tmp_path / "model", device="cpu")
    assert argv[argv.index("export"):] == ["export", "--dataset", str(ds.root), "--format", "msd", "--out",
                                           str(tmp_path / "out"), "--include-pseudo", str(tmp_path / "model"),
                                           "--device", "cpu", "--progress", "jsonl"]
    with pytest.raises(InputError, match="not one of"):
        logic.build_export_command(ds.root, "zip", tmp_path / "out")
    logic.start_export(ds.root, "nnunet", tmp_path / "out")
    outcome = logic.wait_for_job(timeout_s=300)
    assert outcome.message is None, outcome.message
    assert "exported" in outcome.status and "1 expert, 0 pseudo labels, 1 skipped" in outcome.status
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["numTraining"] == 1
    # the folder now exists: refused before any process starts
    with pytest.raises(InputError, match="export target already exists"):
        logic.start_export(ds.root, "msd", tmp_path / "out")
    assert not logic.busy


def test_dicom_source_files_come_from_the_volume_attribute_and_the_database(scene, tmp_path):
    logic = slicer_logic.WeakLiverSegLogic(scene)
    node = bridge.volume_to_node(Volume(np.zeros((3, 4, 5), np.int16), (1, 1, 1), (0, 0, 0)), "ct", scene=scene)
    seg = bridge.labelmap_to_segmentation(Volume(np.ones((3, 4, 5), np.uint8), (1, 1, 1), (0, 0, 0)), node, scene=scene)
    assert logic.dicom_source_files(node, FakeDicomDatabase({})) is None
    assert not logic.can_save_dicom_seg(seg, node)  # not from DICOM: the button stays off
    with pytest.raises(InputError, match="was not loaded from DICOM"):
        logic.prepare_dicom_seg(seg, node, tmp_path / "x.dcm", database=FakeDicomDatabase({}))
    (tmp_path / "a.dcm").write_bytes(b"")
    node.SetAttribute(slicer_logic.DICOM_UIDS_ATTRIBUTE, "1.2.3 1.2.4")
    assert logic.can_save_dicom_seg(seg, node)
    with pytest.raises(InputError, match="1 of the 2 DICOM files of ct are not in the DICOM database"):
        logic.dicom_source_files(node, FakeDicomDatabase({"1.2.3": str(tmp_path / "a.dcm")}))


@pytest.mark.realdata
def test_save_as_dicom_seg_writes_the_segmentation_of_a_dicom_volume(scene, shared_data, tmp_path):
    import pydicom

    from WeakLiverSegLib.data.dicom_seg import dicom_series_files, read_dicom_seg
    from WeakLiverSegLib.data.imageio import read_dicom_series

    folder = shared_data / "totalseg" / "ct_dicom_20slices"
    files = dicom_series_files(folder)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID) for f in files]
    database = FakeDicomDatabase(dict(zip(uids, map(str, files))))
    ct = read_dicom_series(folder)
    node = bridge.volume_to_node(ct, "ct", scene=scene)
    node.SetAttribute(slicer_logic.DICOM_UIDS_ATTRIBUTE, " ".join(reversed(uids)))  # any order
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[4:12, 200:320, 150:300] = 1
    labels[6:8, 240:260, 200:230] = 2
    seg = bridge.labelmap_to_segmentation(ct.with_array(labels), node, scene=scene)
    logic = slicer_logic.WeakLiverSegLogic(scene)
    with pytest.raises(InputError, match="ending in .dcm"):
        logic.start_save_dicom_seg(seg, node, tmp_path / "x.nii.gz", database=database)
    out = tmp_path / "liver.dcm"
    logic.start_save_dicom_seg(seg, node, out, algorithm_type="AUTOMATIC", recipe="o2l", database=database)
    outcome = logic.wait_for_job(timeout_s=300)
    assert outcome.message is None, outcome.message
    assert outcome.status == f"DICOM SEG written to {out}."
    back = read_dicom_seg(out)
    assert back.same_grid(ct) and np.array_equal(back.array, labels)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert {s.SegmentAlgorithmType for s in ds.SegmentSequence} == {"AUTOMATIC"}
    assert "recipe=o2l" in ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
