"""Dataset exchange (data/exchange.py): nnU-Net v2 / MSD (MONAI) / NIfTI export, import back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from WeakLiverSegLib.data import exchange
from WeakLiverSegLib.data.imageio import read_image, write_image
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import InputError


def _case(rng, shape=(6, 12, 14)):
    labels = np.zeros(shape, np.uint8)
    labels[1:5, 2:10, 3:12] = 1
    labels[2:4, 4:7, 5:8] = 2
    hu = (rng.normal(40, 10, shape) + 60 * (labels == 1) - 30 * (labels == 2)).astype(np.int16)
    return hu, labels


@pytest.fixture
def store(tmp_path, small_volume):
    """Two-phase store: 2 strong train, 1 strong val, 1 weak (boxes only) train, 1 test case."""
    from WeakLiverSegLib.data.boxes import boxes_from_mask

    geometry = small_volume(shape_zyx=(6, 12, 14))  # rotated, anisotropic: geometry must survive
    ds = Dataset.create(tmp_path / "store", name="tiny")
    rng = np.random.default_rng(0)
    for cid, kind, split in [("a", "strong", "train"), ("b", "strong", "train"), ("v", "strong", "val"),
                             ("w", "weak", "train"), ("t", "test", "test")]:
        hu, labels = _case(rng)
        images = {"enhanced": geometry.with_array(hu), "plain": geometry.with_array((hu // 2).astype(np.int16))}
        ds.add_case(cid, images, mask=geometry.with_array(labels) if kind == "strong" else None,
                    boxes=boxes_from_mask(labels, 2) if kind == "weak" else (), split=split)
    return ds


def _pseudo(store, tmp_path):
    labels = np.zeros((6, 12, 14), np.uint8)
    labels[2:4, 3:9, 3:9] = 1
    path = tmp_path / "w_pseudo.nii.gz"
    write_image(store.read_image("w").with_array(labels), path)
    return {"w": path}


# ------------------------------------------------------------------------------ nnU-Net


def test_nnunet_layout_follows_the_v2_raw_format(store, tmp_path):
    out = tmp_path / "Dataset501_Tiny"
    summary = exchange.export_dataset(store, out, "nnunet", pseudo=_pseudo(store, tmp_path),
                                      pseudo_source={"model": "m", "recipe": "o2l"})
    meta = json.loads((out / "dataset.json").read_text())
    # dataset.json as nnU-Net v2 documents it (documentation/dataset_format.md)
    assert meta["channel_names"] == {"0": "CT", "1": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert meta["channel_phases"] == {"0": "enhanced", "1": "plain"}
    train_ids = ["a", "b", "v", "w"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_{k:04d}.nii.gz" for c in train_ids for k in (0, 1)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train_ids]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["t_0000.nii.gz", "t_0001.nii.gz"]
    provenance = meta["weakliverseg"]
    assert provenance["label_sources"] == {"a": "expert", "b": "expert", "v": "expert", "w": "pseudo"}
    assert provenance["pseudo_labels"] == {"model": "m", "recipe": "o2l"} and provenance["validation"] == ["v"]
    assert summary["training"] == 4 and summary["test"] == 1 and summary["skipped"] == {}
    # images, channels and labels on one grid; voxels as in the store
    for cid in train_ids:
        image = read_image(out / "imagesTr" / f"{cid}_0001.nii.gz")
        label = read_image(out / "labelsTr" / f"{cid}.nii.gz")
        assert image.same_grid(label) and np.array_equal(image.array, store.read_image(cid, "plain").array)
    assert np.array_equal(read_image(out / "labelsTr" / "a.nii.gz").array, store.read_mask("a").array)


def test_weak_only_cases_are_skipped_without_pseudo_labels(store, tmp_path):
    summary = exchange.export_dataset(store, tmp_path / "out", "nnunet")
    assert list(summary["skipped"]) == ["w"] and "--include-pseudo" in summary["skipped"]["w"]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["numTraining"] == 3


def test_nnunet_integrity_check(store, tmp_path):
    """nnU-Net's own verify_dataset_integrity on the export: in-process when nnunetv2 is installed,
    or with the Python named by WLS_NNUNET_PYTHON (a separate environment, nnunetv2 pulls its own torch)."""
    python = os.environ.get("WLS_NNUNET_PYTHON")
    try:
        import nnunetv2  # noqa: F401

        python = sys.executable
    except ImportError:
        if not python:
            pytest.skip("nnunetv2 is not installed (set WLS_NNUNET_PYTHON to a Python that has it); "
                        "the layout is checked against nnU-Net's documentation by test_nnunet_layout_follows_the_v2_raw_format")
    raw = tmp_path / "nnUNet_raw"
    exchange.export_dataset(store, raw / "Dataset501_Tiny", "nnunet", pseudo=_pseudo(store, tmp_path))
    code = ("from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
            f"verify_dataset_integrity({str(raw / 'Dataset501_Tiny')!r}, num_processes=1)")
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1")
    run = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # and it does catch a broken export: a label on another grid
    bad = raw / "Dataset501_Tiny" / "labelsTr" / "a.nii.gz"
    label = read_image(bad)
    write_image(Volume(label.array, (1.0, 1.0, 1.0), label.origin, label.direction), bad)
    run = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0


# ------------------------------------------------------------------------------ MSD / MONAI


def test_msd_datalist_round_trips_through_monai(store, tmp_path):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "msd"
    exchange.export_dataset(store, out, "msd", pseudo=_pseudo(store, tmp_path), pseudo_source={"model": "m"})
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["modality"] == {"0": "enhanced", "1": "plain"} and meta["labels"] == {"0": "background", "1": "liver", "2": "tumor"}
    assert (meta["numTraining"], meta["numValidation"], meta["numTest"]) == (3, 1, 1)
    training = load_decathlon_datalist(out / "dataset.json", data_list_key="training")
    validation = load_decathlon_datalist(out / "dataset.json", data_list_key="validation")
    test = load_decathlon_datalist(out / "dataset.json", data_list_key="test")
    assert [i["id"] for i in training] == ["a", "b", "w"] and [i["id"] for i in validation] == ["v"]
    assert [i["id"] for i in test] == ["t"] and "label" not in test[0]
    assert {i["id"]: i["label_source"] for i in training} == {"a": "expert", "b": "expert", "w": "pseudo"}
    for item in training + validation + test:
        assert all(os.path.isfile(p) for p in item["image"]) and len(item["image"]) == 2
        assert "label" not in item or os.path.isfile(item["label"])


def test_msd_export_loads_with_monai_transforms(store, tmp_path):
    pytest.importorskip("nibabel", reason="nibabel (MONAI's NIfTI reader) is not installed")
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    exchange.export_dataset(store, tmp_path / "msd", "msd")
    training = load_decathlon_datalist(tmp_path / "msd" / "dataset.json", data_list_key="training")
    loaded = LoadImaged(keys=["image", "label"], reader="NibabelReader", ensure_channel_first=True)(training[0])
    assert tuple(loaded["image"].shape) == (2, 14, 12, 6) and tuple(loaded["label"].shape) == (1, 14, 12, 6)
    assert np.array_equal(np.asarray(loaded["label"][0]).transpose(2, 1, 0), store.read_mask("a").array)


def test_plain_nifti_export_lists_cases_and_label_sources(store, tmp_path):
    out = tmp_path / "nifti"
    exchange.export_dataset(store, out, "nifti", phases=["plain"])
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "weakliverseg-export"
    rows = {c["id"]: c for c in meta["cases"]}
    assert rows["a"] == {"id": "a", "split": "train", "images": {"plain": "images/a_plain.nii.gz"},
                         "label": "labels/a.nii.gz", "label_source": "expert"}
    assert rows["t"]["label"] is None and "w" not in rows
    assert meta["weakliverseg"]["skipped"].keys() == {"w"}


# ------------------------------------------------------------------------------ import


@pytest.mark.parametrize("fmt", ["nnunet", "msd"])
def test_import_reads_an_export_back_into_a_store(store, tmp_path, fmt):
    out = tmp_path / "exp"
    exchange.export_dataset(store, out, fmt, pseudo=_pseudo(store, tmp_path), pseudo_source={"model": "m"})
    summary = exchange.import_dataset(out, tmp_path / "back")
    back = Dataset.load(tmp_path / "back")
    assert summary["format"] == fmt and summary["pseudo_not_imported"] == ["w"] and summary["masks"] == 3
    assert {c.id: c.split for c in back.cases.values()} == {"a": "train", "b": "train", "v": "val", "w": "train", "t": "test"}
    assert back.cases["w"].mask is None and back.cases["t"].mask is None  # pseudo-labels stay pseudo
    for cid in ("a", "v"):
        assert list(back.cases[cid].images) == ["enhanced", "plain"]
        for phase in ("enhanced", "plain"):
            assert np.array_equal(back.read_image(cid, phase).array, store.read_image(cid, phase).array)
        mask = back.read_mask(cid)
        assert mask.same_grid(store.read_image(cid)) and np.array_equal(mask.array, store.read_mask(cid).array)


def test_import_of_a_foreign_nnunet_dataset_maps_labels_by_name(tmp_path, small_volume):
    root = tmp_path / "Dataset003_Liver"
    geometry = small_volume(shape_zyx=(5, 6, 7))
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:4, 1:5, 1:6] = 2  # "liver" has value 2 and "cancer" value 1 in this dataset
    labels[2, 2, 2] = 1
    write_image(geometry, root / "imagesTr" / "liver_7_0000.nii.gz")
    write_image(geometry.with_array(labels), root / "labelsTr" / "liver_7.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "cancer": 1, "liver": 2},
            "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    exchange.import_dataset(root, tmp_path / "store")
    back = Dataset.load(tmp_path / "store")
    assert list(back.cases["liver_7"].images) == ["ct"]
    mask = back.read_mask("liver_7").array
    assert mask[2, 2, 2] == 2 and mask[1, 1, 1] == 1 and mask.sum() == (labels == 2).sum() + 2


# ------------------------------------------------------------------------------ bad input


def test_export_target_that_exists_is_refused_and_left_alone(store, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="taken: export target already exists"):
        exchange.export_dataset(store, target, "nnunet")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        exchange.export_dataset(store, tmp_path / "file", "msd")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine (made for the export)
    assert exchange.export_dataset(store, empty, "nifti")["training"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_import_refuses_unknown_labels_regions_and_missing_channels(tmp_path, small_volume):
    root = tmp_path / "ds"
    geometry = small_volume(shape_zyx=(5, 6, 7))
    write_image(geometry, root / "imagesTr" / "c_0000.nii.gz")
    write_image(geometry.with_array(np.zeros((5, 6, 7), np.uint8)), root / "labelsTr" / "c.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
            "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"labels 'spleen' \(2\) are neither liver nor liver tumour"):
        exchange.import_dataset(root, tmp_path / "s1")
    meta["labels"] = {"background": 0, "liver": [1, 2], "tumor": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="region"):
        exchange.import_dataset(root, tmp_path / "s2")
    meta.update(labels={"background": 0, "liver": 1}, channel_names={"0": "CT", "1": "CT"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"case 'c' lacks channel\(s\) \[1\]"):
        exchange.import_dataset(root, tmp_path / "s3")
    (root / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="neither an nnU-Net v2 dataset.json"):
        exchange.import_dataset(root, tmp_path / "s4")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s4").exists()
