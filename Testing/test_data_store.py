"""Weak-label store: round trips, label updates, every bad input of issue 2, interrupted saves.

Every failing operation must raise InputError naming the file / case / field, and leave the
store on disk byte-for-byte as it was (the previous dataset.json still loads).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from WeakLiverSegLib.data import store as store_module
from WeakLiverSegLib.data.boxes import Box, boxes_from_mask, liver_box_from_mask
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.data.imageio import write_image
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume

SHAPE = (6, 14, 16)  # (z, y, x): tiny, the tests are about bookkeeping
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rotated in-plane


def grid_volume(array, spacing=(0.9, 0.9, 2.5), origin=(-10.0, 20.0, 100.0), direction=DIRECTION):
    return Volume(array, spacing, origin, direction)


def make_case(seed=0):
    """Two co-registered phases, a mask with liver + two tumours."""
    rng = np.random.default_rng(seed)
    enhanced = grid_volume(rng.normal(100, 20, SHAPE).astype(np.float32))
    plain = enhanced.with_array((enhanced.array * 0.5).astype(np.int16))
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:5, 2:12, 3:14] = 1
    mask[2:4, 3:6, 4:7] = 2
    mask[3:5, 8:10, 10:13] = 2
    return {"enhanced": enhanced, "plain": plain}, enhanced.with_array(mask)


def snapshot(root: Path) -> dict:
    """Every file under the store, relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path):
    """A saved store with one full case ('case000') and one healthy weak case ('case001')."""
    ds = Dataset.create(tmp_path / "ds", name="tiny")
    images, mask = make_case(0)
    ds.add_case(
        "case000",
        images,
        reference="enhanced",
        mask=mask,
        boxes=boxes_from_mask(mask.array) + boxes_from_mask(mask.array, per_slice=True)[:1],
        liver_box=liver_box_from_mask(mask.array),
        couinaud=[7, 6],
        volume_label="tumor",
    )
    images1, mask1 = make_case(1)
    ds.add_case(
        "case001",
        images1,
        liver_box=liver_box_from_mask(mask1.array),
        couinaud=[],
        volume_label="healthy",
        split="val",
    )
    return ds


def assert_unchanged(ds: Dataset, before: dict, case_ids=("case000", "case001")):
    """Store on disk as it was; the previous dataset.json loads with the same cases."""
    assert snapshot(ds.root) == before
    assert list(Dataset.load(ds.root).cases) == list(case_ids)
    assert list(ds.cases) == list(case_ids)


def edit_json(ds: Dataset, change):
    data = json.loads(ds.path.read_text())
    change(data)
    ds.path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- happy paths


def test_create_add_reload(store):
    ds = store
    again = Dataset.load(ds.root)
    assert again.name == "tiny" and list(again.cases) == ["case000", "case001"]
    assert again.cases == ds.cases  # every field, boxes and their world corners included
    c0, c1 = again.cases["case000"], again.cases["case001"]
    assert c0.images == {"enhanced": "images/case000_enhanced.nii.gz", "plain": "images/case000_plain.nii.gz"}
    assert c0.mask == "labels/case000.nii.gz" and c1.mask is None
    assert c0.couinaud == [6, 7] and c0.volume_label == "tumour" and c0.split == "train"
    assert c1.couinaud == [] and c1.volume_label == "healthy" and c1.split == "val" and c1.boxes == []
    assert [b.is_2d for b in c0.boxes] == [False, False, True]
    assert c0.label_kinds == {"mask", "boxes", "couinaud", "volume"}
    assert c1.label_kinds == {"boxes", "couinaud", "volume"}
    assert [c.id for c in again.cases_with("mask")] == ["case000"]
    assert [c.id for c in again.cases_with("boxes", split="val")] == ["case001"]
    with pytest.raises(InputError, match="label kind 'pixels'"):
        again.cases_with("pixels")

    images, mask = make_case(0)
    for phase in ("enhanced", "plain"):
        back = again.read_image("case000", phase)
        assert back.same_grid(images[phase]) and back.array.dtype == images[phase].array.dtype
        np.testing.assert_array_equal(back.array, images[phase].array)
    assert again.read_image("case000").same_grid(images["enhanced"])  # reference by default
    stored_mask = again.read_mask("case000")
    assert stored_mask.array.dtype == np.uint8 and stored_mask.same_grid(mask)
    np.testing.assert_array_equal(stored_mask.array, mask.array)
    assert again.read_mask("case001") is None and again.read_truth("case000") is None

    for box in c0.boxes + [c0.liver_box]:  # LPS corners = voxel centres of the ijk corners
        np.testing.assert_allclose(box.lps_min, images["enhanced"].index_to_world(box.ijk_min), atol=1e-4)
        np.testing.assert_allclose(box.lps_max, images["enhanced"].index_to_world(box.ijk_max), atol=1e-4)
    data = json.loads(ds.path.read_text())
    assert data["format"] == "weakliverseg-dataset" and data["version"] == 1
    assert data["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert set(data["cases"][0]["boxes"][0]) == {"label", "ijk_min", "ijk_max", "lps_min", "lps_max", "source"}
    box0 = c0.boxes[0]
    assert f'"ijk_min": [{box0.ijk_min[0]}, {box0.ijk_min[1]}, {box0.ijk_min[2]}]' in ds.path.read_text()
    again.validate(deep=True)
    assert [p.name for p in ds.root.rglob(".*")] == [".dataset.lock"]  # the store lock; no temp / staging / backup files


def test_masks_stored_as_uint8_and_truth(tmp_path):
    ds = Dataset.create(tmp_path / "ds")
    images, mask = make_case(2)
    truth = {"mask": mask.with_array(mask.array.astype(np.int64)), "couinaud_map": mask.with_array(mask.array * 4)}
    ds.add_case("c", images, mask=mask.with_array(mask.array.astype(np.float64)), truth=truth)
    back = Dataset.load(ds.root)
    assert back.cases["c"].truth == {"mask": "truth/c_mask.nii.gz", "couinaud_map": "truth/c_couinaud_map.nii.gz"}
    for rel in ("labels/c.nii.gz", "truth/c_mask.nii.gz", "truth/c_couinaud_map.nii.gz"):
        assert sitk.ReadImage(str(ds.root / rel)).GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(back.read_truth("c", "couinaud_map").array, mask.array * 4)
    back.validate(deep=True)


def test_update_labels(store):
    ds = store
    _, mask1 = make_case(1)
    mask1.array[mask1.array == 2] = 1  # healthy
    new_box = Box("tumor", (1, 1, 1), (3, 4, 1), source="slicer")
    ds.update_labels("case000", boxes=[new_box], couinaud=[2], split="test")
    ds.update_labels("case001", mask=mask1, split="train")
    again = Dataset.load(ds.root)
    assert again.cases == ds.cases
    c0 = again.cases["case000"]
    assert [(b.ijk_min, b.ijk_max, b.source) for b in c0.boxes] == [((1, 1, 1), (3, 4, 1), "slicer")]
    assert c0.boxes[0].lps_min is not None and c0.couinaud == [2] and c0.split == "test"
    assert c0.mask == "labels/case000.nii.gz" and c0.volume_label == "tumour"  # untouched fields kept
    np.testing.assert_array_equal(again.read_mask("case001").array, mask1.array)
    assert "mask" in again.cases["case001"].label_kinds

    ds.update_labels("case000", mask=None, liver_box=None, boxes=[])
    assert not (ds.root / "labels/case000.nii.gz").exists()
    assert Dataset.load(ds.root).cases["case000"].label_kinds == {"couinaud", "volume"}
    with pytest.raises(InputError, match=r"case000: cannot update field\(s\) \['images'\]"):
        ds.update_labels("case000", images={})
    with pytest.raises(InputError, match="unknown case 'nope'"):
        ds.update_labels("nope", split="val")


def test_add_existing_case_needs_overwrite(store):
    ds = store
    before = snapshot(ds.root)
    images, _ = make_case(5)
    with pytest.raises(InputError, match="case000: case already exists .*overwrite=True"):
        ds.add_case("case000", images)
    assert_unchanged(ds, before)
    ds.add_case("case000", {"ct": images["enhanced"]}, overwrite=True)
    again = Dataset.load(ds.root)
    assert list(again.cases) == ["case000", "case001"]  # keeps its place
    assert again.cases["case000"].images == {"ct": "images/case000_ct.nii.gz"} and again.cases["case000"].mask is None
    assert not (ds.root / "images/case000_plain.nii.gz").exists() and not (ds.root / "labels/case000.nii.gz").exists()
    np.testing.assert_array_equal(again.read_image("case000").array, images["enhanced"].array)


def test_create_refuses_existing_store(store):
    with pytest.raises(InputError, match="dataset.json: a dataset already exists"):
        Dataset.create(store.root)
    assert list(Dataset.create(store.root, exist_ok=True).cases) == ["case000", "case001"]


# ----------------------------------------------------------------------------- bad input: add_case


def bad_add(ds, expected, case_id="case002", **kwargs):
    """add_case must fail with a message containing every ``expected`` piece, writing nothing."""
    before = snapshot(ds.root)
    images, mask = make_case(3)
    args = {"images": images, "mask": mask}
    args.update(kwargs)
    with pytest.raises(InputError) as err:
        ds.add_case(case_id, **args)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))
    assert_unchanged(ds, before)
    return str(err.value)


def test_phase_with_different_geometry_is_refused(store):
    images, _ = make_case(3)
    plain = images["plain"]
    images["plain"] = Volume(plain.array, (0.9, 0.9, 3.0), plain.origin, plain.direction)
    bad_add(store, ["case002 images['plain'] (reference phase 'enhanced')", "spacing", "resample"], images=images)
    images["plain"] = Volume(plain.array[:, :, :-2], plain.spacing, plain.origin, plain.direction)
    bad_add(store, ["case002 images['plain']", "size (16, 14, 6) vs (14, 14, 6)"], images=images)


def test_box_outside_image_or_min_above_max_is_refused(store):
    bad_add(store, ["case002 boxes[1]: ijk_max [16, 5, 2] outside the image grid (16, 14, 6)"],
            boxes=[Box("tumor", (1, 1, 1), (3, 3, 1)), Box("tumor", (10, 2, 2), (16, 5, 2))])
    bad_add(store, ["case002 boxes[0]: ijk_min [5, 2, 2] > ijk_max [4, 5, 2] on axis i"],
            boxes=[Box("tumor", (5, 2, 2), (4, 5, 2))])
    bad_add(store, ["case002 liver_box: label must be 'liver'"], liver_box=Box("tumor", (0, 0, 0), (3, 3, 3)))
    bad_add(store, ["case002 boxes[0]", "missing field 'ijk_max'"], boxes=[{"label": "tumor", "ijk_min": [1, 1, 1]}])


def test_mask_with_other_labels_is_refused(store):
    _, mask = make_case(3)
    mask.array[0, 0, 0], mask.array[5, 13, 15] = 3, 7
    bad_add(store, ["case002 mask", "label values 3, 7 found", "only 0, 1, 2"], mask=mask)
    _, mask = make_case(3)
    bad_add(store, ["case002 mask", "not on the reference grid", "origin"], mask=Volume(mask.array, mask.spacing, (0, 0, 0), DIRECTION))


def test_nan_voxels_are_refused(store):
    images, _ = make_case(3)
    images["enhanced"].array[2, 3, 4] = np.nan
    images["enhanced"].array[4, 0, 0] = np.inf
    bad_add(store, ["case002 images['enhanced']", f"2 of {np.prod(SHAPE)} voxels are NaN or infinite"], images=images)


def test_2d_image_is_refused(store):
    images, mask = make_case(3)
    flat = {"enhanced": Volume(images["enhanced"].array[0], (1, 1, 1))}
    bad_add(store, ["case002 images['enhanced']", "expected a 3D image, got a 2D array"], images=flat, mask=None)
    one_slice = {"enhanced": Volume(images["enhanced"].array[:1].copy(), (1, 1, 1))}
    bad_add(store, ["case002 images['enhanced']", "single slice (2D image", "3D volume is needed"], images=one_slice, mask=None)


def test_other_bad_add_arguments(store):
    bad_add(store, ["case002 reference: phase 'ct' is not one of the images ['enhanced', 'plain']"], reference="ct")
    bad_add(store, ["case002 couinaud: segment 9 is not an integer in 1..8"], couinaud=[2, 9])
    bad_add(store, ["case002 couinaud: segment 3 listed twice"], couinaud=[3, 3])
    bad_add(store, ["case002 volume_label: 'sick'"], volume_label="sick")
    bad_add(store, ["case002 split: 'training'"], split="training")
    bad_add(store, ["case002: volume_label 'healthy' contradicts couinaud [4]"], volume_label="healthy", couinaud=[4])
    bad_add(store, ["case id '../evil' is not a valid name"], case_id="../evil")


# ----------------------------------------------------------------------------- bad input: dataset.json


def test_missing_image_file_names_it(store):
    ds = store
    (ds.root / "images/case001_plain.nii.gz").unlink()
    before = snapshot(ds.root)
    with pytest.raises(InputError) as err:
        Dataset.load(ds.root)
    msg = str(err.value)
    assert "dataset.json" in msg and "case001 images['plain']" in msg and "images/case001_plain.nii.gz not found" in msg
    assert snapshot(ds.root) == before


BAD_JSON = [
    (lambda d: d.update(version=2), ["version 2 is newer than this software reads (version 1)"]),
    (lambda d: d.pop("version"), ["missing field 'version' (this software reads version 1)"]),
    (lambda d: d.update(format="nnunet"), ["unknown format 'nnunet'"]),
    (lambda d: d.update(cases={"case000": {}}), ["cases: expected a list"]),
    (lambda d: d["cases"].append(dict(d["cases"][0])), ["cases[2]: duplicate case id 'case000'"]),
    (lambda d: d["cases"][1].update(reference="arterial"), ["case001 reference: phase 'arterial'"]),
    (lambda d: d["cases"][1].update(split="holdout"), ["case001 split: 'holdout'"]),
    (lambda d: d["cases"][0].update(couinaud=[0, 3]), ["case000 couinaud: segment 0 is not an integer in 1..8"]),
    (lambda d: d["cases"][0].update(couinaud=[5, 5]), ["case000 couinaud: segment 5 listed twice"]),
    (lambda d: d["cases"][0].update(volume_label="maybe"), ["case000 volume_label: 'maybe'"]),
    (lambda d: d["cases"][0]["boxes"][1].update(ijk_min=[1, 2]), ["case000 boxes[1] ijk_min: expected a list of 3 integers"]),
    (lambda d: d["cases"][0]["boxes"][0].update(ijk_min=[9, 9, 9], ijk_max=[9, 9, 3]), ["case000 boxes[0]: ijk_min [9, 9, 9] > ijk_max"]),
    (lambda d: d["cases"][0].update(mask="/etc/passwd"), ["case000 mask: path '/etc/passwd' must be relative"]),
    (lambda d: d["cases"][0].update(volume_lable="tumour"), ["case000: unknown field(s) ['volume_lable']"]),
    (lambda d: d["cases"][0].pop("images"), ["case000: missing field 'images'"]),
    (lambda d: d["cases"][1]["liver_box"].update(label="tumor"), ["case001 liver_box: label must be 'liver'"]),
]


@pytest.mark.parametrize("change, expected", BAD_JSON)
def test_bad_dataset_json_names_field(store, change, expected):
    edit_json(store, change)
    before = snapshot(store.root)
    with pytest.raises(InputError) as err:
        Dataset.load(store.root)
    assert str(err.value).startswith(str(store.path) + ": ")
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))
    assert snapshot(store.root) == before


def test_tumor_alias_normalised(store):
    edit_json(store, lambda d: d["cases"][0].update(volume_label="tumor"))
    assert Dataset.load(store.root).cases["case000"].volume_label == "tumour"


def test_malformed_json_gives_line_and_column(store):
    text = store.path.read_text()
    store.path.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"dataset.json: malformed JSON at line \d+, column \d+"):
        Dataset.load(store.root)
    with pytest.raises(InputError, match=r"dataset.json: not found"):
        Dataset.load(store.root / "images")


# ----------------------------------------------------------------------------- bad files: validate(deep)


def test_deep_validation_catches_bad_files(store):
    ds = store
    images, mask = make_case(0)
    cases = [
        ("images/case000_plain.nii.gz", Volume(images["plain"].array, images["plain"].spacing, (5.0, 5.0, 5.0), DIRECTION),
         ["case000 images['plain'] (images/case000_plain.nii.gz)", "reference phase 'enhanced'", "origin"]),
        ("labels/case000.nii.gz", mask.with_array(np.where(mask.array == 2, 5, mask.array).astype(np.uint8)),
         ["case000 mask (labels/case000.nii.gz)", "label values 5 found"]),
    ]
    for rel, volume, expected in cases:
        original = (ds.root / rel).read_bytes()
        write_image(volume, ds.root / rel)
        Dataset.load(ds.root)  # load() does not open images: still fine
        with pytest.raises(InputError) as err:
            Dataset.load(ds.root).validate(deep=True)
        for piece in expected:
            assert piece in str(err.value), (piece, str(err.value))
        (ds.root / rel).write_bytes(original)
    ds.validate(deep=True)

    # NaN voxels in a stored image. NRRD, because ITK 5.4's NIfTI reader silently turns NaN
    # into 0 (ITK PR #6683), so a NaN can never be seen through a .nii file.
    nan_image = images["enhanced"].with_array(images["enhanced"].array.copy())
    nan_image.array[1:3, 4, 5] = np.nan
    write_image(nan_image, ds.root / "images/case001_enhanced.nrrd")
    edit_json(ds, lambda d: d["cases"][1]["images"].update(enhanced="images/case001_enhanced.nrrd"))
    with pytest.raises(InputError, match=r"case001 images\['enhanced'\] \(images/case001_enhanced.nrrd\).*2 of \d+ voxels are NaN"):
        Dataset.load(ds.root).validate(deep=True)
    edit_json(ds, lambda d: d["cases"][1]["images"].update(enhanced="images/case001_enhanced.nii.gz"))

    # A 2D image file where a 3D one is needed.
    original = (ds.root / "images/case001_plain.nii.gz").read_bytes()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((14, 16), np.int16)), str(ds.root / "images/case001_plain.nii.gz"))
    with pytest.raises(InputError, match=r"case001 images\['plain'\]: .*images/case001_plain.nii.gz: .*2D"):
        ds.validate(deep=True)
    with pytest.raises(InputError, match=r"case001 images\['plain'\]: .*images/case001_plain.nii.gz: .*2D"):
        ds.read_image("case001", "plain")
    (ds.root / "images/case001_plain.nii.gz").write_bytes(original)

    # A box outside the image can only be seen once the image is opened.
    edit_json(ds, lambda d: d["cases"][0]["boxes"][0].update(ijk_max=[16, 5, 3], lps_max=None))
    with pytest.raises(InputError, match=r"case000 boxes\[0\]: ijk_max \[16, 5, 3\] outside the image grid \(16, 14, 6\)"):
        Dataset.load(ds.root).validate(deep=True)
    with pytest.raises(InputError, match=r"case000 boxes\[0\]: ijk_max \[16, 5, 3\] outside"):
        Dataset.load(ds.root).update_labels("case000", boxes=Dataset.load(ds.root).cases["case000"].boxes)


# ----------------------------------------------------------------------------- interrupted saves


def test_interrupted_save_on_rename_keeps_previous_store(store, monkeypatch):
    ds = store
    before = snapshot(ds.root)
    real_replace = store_module.os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "dataset.json":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    images, mask = make_case(4)
    with pytest.raises(InputError) as err:
        ds.add_case("case002", images, mask=mask)
    assert str(ds.path) in str(err.value) and "could not save" in str(err.value)
    assert "previous dataset.json is unchanged" in str(err.value)
    # Overwriting a case: its old image files come back too.
    with pytest.raises(InputError, match="could not save"):
        ds.add_case("case000", images, mask=mask, overwrite=True)
    with pytest.raises(InputError, match="could not save"):
        ds.update_labels("case001", mask=mask, couinaud=None)
    monkeypatch.undo()
    assert_unchanged(ds, before)
    assert ds.cases == Dataset.load(ds.root).cases  # memory rolled back too


def test_interrupted_json_write_keeps_previous_store(store, monkeypatch):
    ds = store
    before = snapshot(ds.root)
    real_fsync = store_module.os.fsync
    half_written = []

    def fail_half_way(fd):
        """The disk gives out while dataset.json's new content is being written: half of it made it."""
        temp = ds.root / f".dataset.json.tmp{os.getpid()}"
        if temp.exists() and os.fstat(fd).st_ino == temp.stat().st_ino:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, size // 2)
            half_written.append(size // 2)
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fail_half_way)
    with pytest.raises(InputError, match=r"dataset.json: could not save"):
        ds.update_labels("case000", split="val")
    with pytest.raises(InputError, match=r"dataset.json: could not save"):
        ds.add_case("case002", make_case(4)[0])
    monkeypatch.undo()
    assert len(half_written) == 2 and min(half_written) > 0  # the failure really hit mid-write
    assert_unchanged(ds, before)
    assert ds.cases["case000"].split == "train"
    ds.update_labels("case000", split="val")  # and the store still works afterwards
    assert Dataset.load(ds.root).cases["case000"].split == "val"


def test_save_refuses_invalid_in_memory_state(store):
    before = snapshot(store.root)
    store.cases["case001"].split = "everything"
    with pytest.raises(InputError, match="dataset.json: not saved: case001 split: 'everything'"):
        store.save()
    assert snapshot(store.root) == before
