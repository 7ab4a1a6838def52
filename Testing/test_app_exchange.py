"""The CLI side of issue 18: segment --out FILE.dcm, export --include-pseudo, import, dicomseg, add-case --mask."""

from __future__ import annotations

import json

import numpy as np
import pytest

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume

pytestmark = pytest.mark.filterwarnings("ignore:.*the series has no (Study|Series)InstanceUID")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-case store (1 strong, 2 box-only) and an o2l model trained for 2 + 2 steps on it."""
    torch = pytest.importorskip("torch")
    from WeakLiverSegLib.app.progress import Progress
    from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
    from WeakLiverSegLib.recipes import o2l

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    ds = Dataset.create(root / "store", name="tiny")
    z, y, x = np.mgrid[:8, :32, :32]
    for n, strong in enumerate([True, False, False]):
        liver = (((y - 15 - n) / 8) ** 2 + ((x - 13) / 9) ** 2 < 1) & (z >= 1) & (z <= 6)
        labels = liver.astype(np.uint8)
        labels[(((y - 15 - n) / 3) ** 2 + ((x - 15) / 3) ** 2 < 1) & (z >= 2) & (z <= 4)] = 2
        hu = (np.where(labels == 1, 120, 40) + np.where(labels == 2, 60, 0)).astype(np.int16)
        geo = dict(spacing=(1.5, 1.5, 3.0), origin=(0, 0, 0))
        ds.add_case(f"c{n}", {"ct": Volume(hu, **geo)}, mask=Volume(labels, **geo) if strong else None,
                    boxes=boxes_from_mask(labels, 2), liver_box=liver_box_from_mask(labels))
    cfg = {"channels": [4, 8, 8, 8], "crop": 32, "batch_size": 2, "infer_batch": 4, "checkpoint_every": 2,
           "teacher": {"steps": 2}, "student": {"steps": 2}}
    model = o2l.train(ds, root / "model", cfg, "cpu", Progress("none"))
    return ds, model


def test_export_include_pseudo_marks_the_teacher_labels(tiny, tmp_path, capsys):
    ds, model = tiny
    out = tmp_path / "Dataset502_Tiny"
    assert cli.main(["export", "--dataset", str(ds.root), "--format", "nnunet", "--out", str(out),
                     "--include-pseudo", str(model), "--device", "cpu", "--progress", "none"]) == 0
    assert "1 expert, 2 pseudo labels" in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3
    assert meta["weakliverseg"]["label_sources"] == {"c0": "expert", "c1": "pseudo", "c2": "pseudo"}
    assert meta["weakliverseg"]["pseudo_labels"]["recipe"] == "o2l"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the pseudo store was temporary
    # the export target now exists: a second export is bad input, named on one line
    assert cli.main(["export", "--dataset", str(ds.root), "--format", "msd", "--out", str(out)]) == 2
    assert "export target already exists" in capsys.readouterr().err
    # and import reads it back, leaving the pseudo-labels out of the masks
    assert cli.main(["import", "--source", str(out), "--out", str(tmp_path / "back"), "--progress", "none"]) == 0
    back = Dataset.load(tmp_path / "back")
    assert [c.id for c in back.cases_with("mask")] == ["c0"] and len(back.cases) == 3


@pytest.mark.realdata
def test_segment_of_a_dicom_series_writes_a_dicom_seg(tiny, shared_data, tmp_path, monkeypatch):
    import pydicom

    from WeakLiverSegLib.data import dicom_seg
    from WeakLiverSegLib.data.imageio import read_dicom_series

    _, model = tiny
    written = {}
    original = dicom_seg.write_dicom_seg

    def spy(label_map, path, source, **kwargs):
        written.update(labels=label_map, **kwargs)
        return original(label_map, path, source, **kwargs)

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", spy)
    series = shared_data / "totalseg" / "ct_dicom_20slices"
    out = tmp_path / "result.dcm"
    assert cli.main(["segment", "--model", str(model), "--input", str(series), "--out", str(out),
                     "--device", "cpu", "--progress", "none"]) == 0
    assert written["algorithm_type"] == "AUTOMATIC" and written["recipe"] == "o2l"
    back = dicom_seg.read_dicom_seg(out)
    ct = read_dicom_series(series)
    assert back.same_grid(ct) and np.array_equal(back.array, written["labels"].array)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert ds.NumberOfFrames == 40 and [s.SegmentLabel for s in ds.SegmentSequence] == ["Liver", "Liver tumor"]
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "WeakLiverSeg" and "recipe=o2l" in algorithm.AlgorithmParameters
    # .dcm needs a DICOM series input: a NIfTI input is refused before the model runs
    nifti = tmp_path / "ct.nii.gz"
    from WeakLiverSegLib.data.imageio import write_image

    write_image(ct, nifti)
    assert cli.main(["segment", "--model", str(model), "--input", str(nifti), "--out", str(tmp_path / "x.dcm")]) == 2


@pytest.mark.realdata
def test_add_case_takes_a_dicom_seg_mask_and_dicomseg_writes_one(shared_data, tmp_path):
    from WeakLiverSegLib.data.imageio import read_label_map

    dcmqi = shared_data / "dcmqi"
    store = tmp_path / "store"
    assert cli.main(["add-case", "--dataset", str(store), "--case", "dcmqi", "--image", str(dcmqi / "ct-3slice"),
                     "--mask", str(dcmqi / "liver.dcm")]) == 0
    ds = Dataset.load(store)
    assert np.array_equal(ds.read_mask("dcmqi").array, read_label_map(dcmqi / "liver_seg.nrrd").array)
    # the store's mask back out as a DICOM SEG of the same series (an expert mask: MANUAL)
    out = tmp_path / "mask.dcm"
    assert cli.main(["dicomseg", "--labels", str(store / "labels" / "dcmqi.nii.gz"), "--dicom", str(dcmqi / "ct-3slice"),
                     "--out", str(out), "--algorithm-type", "MANUAL"]) == 0
    assert np.array_equal(read_label_map(out).array, ds.read_mask("dcmqi").array)
