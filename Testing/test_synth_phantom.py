"""Synthetic cohorts (phantom.py) and preview pictures (preview.py), on tiny volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from WeakLiverSegLib.synth import phantom, preview
from WeakLiverSegLib.data.boxes import Box, boxes_from_mask, liver_box_from_mask
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.data.store import Dataset

SMALL = dict(shape=(48, 48, 16), spacing=(3.0, 3.0, 6.0))
ONE_EACH = {k: 1 / 6 for k in phantom.MIX_KEYS}   # six cases: one per mix group


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    progress = Progress("none")
    phantom.generate_cohort(out, cases=6, seed=3, mix=ONE_EACH, healthy_fraction=0.5, tumors=(1, 2),
                            preview=True, progress=progress, **SMALL)
    return out, progress


@pytest.fixture(scope="module")
def case():
    return phantom.generate_case(np.random.default_rng(7), n_tumors=2, **SMALL)


# ----------------------------------------------------------------------------- mix

def test_parse_mix_fills_missing_keys_and_checks_the_sum():
    mix = phantom.parse_mix("strong=0.3, box=0.6,test=0.1")
    assert list(mix) == list(phantom.MIX_KEYS)
    assert mix["strong"] == 0.3 and mix["box"] == 0.6 and mix["test"] == 0.1
    assert mix["couinaud"] == mix["volume"] == mix["unlabelled"] == 0
    assert phantom.parse_mix({"unlabelled": 1})["unlabelled"] == 1


@pytest.mark.parametrize("text, words", [
    ("strong=0.3,boxes=0.7", ["boxes", "unknown"]),
    ("strong=0.3,box=0.6", ["sum", "0.9"]),
    ("strong=abc,box=1", ["strong", "not a number"]),
    ("strong", ["strong", "key=fraction"]),
    ("box=0.5,box=0.5", ["box", "twice"]),
    ("strong=-0.5,box=1.5", ["strong", "between 0 and 1"]),
    ("", ["--mix"]),
])
def test_parse_mix_errors_name_the_problem(text, words):
    with pytest.raises(InputError) as err:
        phantom.parse_mix(text)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


def test_split_counts_sum_to_the_cases():
    mix = phantom.parse_mix(phantom.DEFAULT_MIX)
    assert phantom.split_counts(mix, 20) == {"strong": 6, "box": 12, "couinaud": 0, "volume": 0,
                                             "unlabelled": 0, "test": 2}
    for n in (1, 7, 13):
        assert sum(phantom.split_counts(mix, n).values()) == n


# ----------------------------------------------------------------------------- one case

def test_case_volumes_share_one_grid_and_types(case):
    assert set(case) == {"enhanced", "plain", "label", "couinaud_map"}
    ref = case["enhanced"]
    assert ref.shape_xyz == SMALL["shape"] and ref.spacing == SMALL["spacing"]
    for v in case.values():
        assert v.same_grid(ref)
    assert ref.array.dtype == np.int16 and case["plain"].array.dtype == np.int16
    assert case["label"].array.dtype == np.uint8 and case["couinaud_map"].array.dtype == np.uint8
    assert set(np.unique(case["label"].array)) == {0, 1, 2}


def test_case_intensities_look_like_ct(case):
    e, p, lab = case["enhanced"].array, case["plain"].array, case["label"].array
    liver = lab == 1
    assert 95 < e[liver].mean() < 125 and 45 < p[liver].mean() < 68
    corners = e[:, :3, :3]
    assert corners.mean() < -950                      # air outside the body
    assert e.max() > 400                              # bone
    assert ((e > -150) & (e < -50)).mean() > 0.03     # fat


def test_tumours_lie_inside_the_liver_in_couinaud_segments(case):
    lab, cm = case["label"].array, case["couinaud_map"].array
    # The Couinaud map covers exactly the liver (tumour included), with all eight segments.
    assert np.array_equal(cm > 0, lab > 0)
    assert set(np.unique(cm[cm > 0])) == set(range(1, 9))
    assert (cm[lab == 2] > 0).all()
    # Liver + tumours form one organ; each lesion sits in one segment.
    _, n_organ = ndimage.label(lab > 0)
    assert n_organ == 1
    comps, n = ndimage.label(lab == 2, np.ones((3, 3, 3)))
    assert n >= 1
    for i in range(1, n + 1):
        assert len(np.unique(cm[comps == i])) <= 2


def test_plain_phase_contrast_is_subtle(case):
    e, p, lab = case["enhanced"].array.astype(float), case["plain"].array.astype(float), case["label"].array
    tumour, liver = lab == 2, lab == 1
    c_enh = e[tumour].mean() - e[liver].mean()
    c_plain = p[tumour].mean() - p[liver].mean()
    assert c_enh < -20                   # clearly hypodense in the enhanced phase
    assert c_enh < c_plain < 0           # the plain phase keeps a small hypodensity
    assert abs(c_plain) < abs(c_enh) / 3


def test_healthy_case_and_per_case_randomness():
    healthy = phantom.generate_case(np.random.default_rng(1), n_tumors=0, **SMALL)
    other = phantom.generate_case(np.random.default_rng(2), n_tumors=0, **SMALL)
    assert not (healthy["label"].array == 2).any()
    assert (healthy["label"].array == 1).sum() > 500
    assert not np.array_equal(healthy["label"].array, other["label"].array)


# ----------------------------------------------------------------------------- cohort

def test_cohort_is_a_valid_store_with_every_label_kind(cohort):
    out, progress = cohort
    ds = Dataset.load(out)
    ds.validate(deep=True)
    assert len(ds.cases) == 6
    kinds = sorted((c.split, tuple(sorted(c.label_kinds))) for c in ds.cases.values())
    assert kinds == sorted([
        ("train", ("boxes", "couinaud", "mask", "volume")),   # strong
        ("train", ("boxes",)),                                # box
        ("train", ("couinaud", "volume")),                    # couinaud
        ("train", ("volume",)),                               # volume
        ("train", ()),                                        # unlabelled
        ("test", ()),                                         # test: truth only
    ])
    for c in ds.cases.values():
        assert set(c.images) == {"enhanced", "plain"} and c.reference == "enhanced"
        assert set(c.truth) == {"mask", "couinaud_map"}
        assert ds.read_image(c.id, "plain").same_grid(ds.read_image(c.id))
    assert [e["step"] for e in progress.history] == list(range(1, 7))


def test_cohort_labels_agree_with_the_truth(cohort):
    out, _ = cohort
    ds = Dataset.load(out)
    n_healthy = 0
    for c in ds.cases.values():
        truth = ds.read_truth(c.id).array
        cm = ds.read_truth(c.id, "couinaud_map").array
        tumour = bool((truth == 2).any())
        n_healthy += not tumour
        if c.volume_label is not None:
            assert c.volume_label == ("tumour" if tumour else "healthy")
        if c.couinaud is not None:
            assert c.couinaud == sorted(int(s) for s in np.unique(cm[truth == 2]))
            assert (c.couinaud == []) == (not tumour)
        if c.mask is not None:
            assert np.array_equal(ds.read_mask(c.id).array, truth)
        if "boxes" in c.label_kinds:
            expected = boxes_from_mask(truth, 2) + boxes_from_mask(truth, 2, per_slice=True)
            assert [(b.ijk_min, b.ijk_max) for b in c.boxes] == [(b.ijk_min, b.ijk_max) for b in expected]
            assert any(not b.is_2d for b in c.boxes) == tumour and any(b.is_2d for b in c.boxes) == tumour
            lb = liver_box_from_mask(truth)
            assert (c.liver_box.ijk_min, c.liver_box.ijk_max) == (lb.ijk_min, lb.ijk_max)
            assert c.liver_box.lps_min is not None
    assert n_healthy == 3     # healthy_fraction 0.5 of 6


def test_preview_png_is_written(cohort):
    out, _ = cohort
    with Image.open(out / "preview.png") as img:
        img.verify()
    with Image.open(out / "preview.png") as img:
        assert img.mode == "RGB" and img.width >= 2 * 48 and img.height >= 3 * 48
        pixels = np.asarray(img)
    assert (pixels == preview.COLOURS[2]).all(axis=-1).any()   # a tumour contour is drawn


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(cases=3, mix="strong=0.34,box=0.33,test=0.33", **SMALL)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        phantom.generate_cohort(tmp_path / name, seed=seed, **kw)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 3 * 4 + 1 + 1 + 1      # 2 phases + 2 truth files a case, 1 mask, dataset.json, .dataset.lock (empty)
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert len(images) == 6 and all(a[k] != c[k] for k in images)
    assert a["dataset.json"] != c["dataset.json"]


def test_existing_dataset_is_refused_and_kept(tmp_path):
    phantom.generate_cohort(tmp_path / "d", cases=1, mix="strong=1", **SMALL)
    before = _files(tmp_path / "d")
    with pytest.raises(InputError, match="already exists"):
        phantom.generate_cohort(tmp_path / "d", cases=1, mix="strong=1", **SMALL)
    assert _files(tmp_path / "d") == before


@pytest.mark.parametrize("kwargs, words", [
    (dict(tumors=(3, 1)), ["tumors", "MIN <= MAX"]),
    (dict(shape=(8, 8, 8)), ["shape", "16"]),
    (dict(cases=0), ["cases", "at least 1"]),
    (dict(healthy_fraction=1.5), ["healthy fraction"]),
    (dict(spacing=(1, 0, 1)), ["spacing", "positive"]),
    (dict(tumor_radius_mm=(0, 5)), ["tumor radius"]),
    (dict(mix="strong=1,box=1"), ["--mix", "sum"]),
])
def test_bad_knobs_fail_before_writing(tmp_path, kwargs, words):
    with pytest.raises(InputError) as err:
        phantom.generate_cohort(tmp_path / "bad", **{**SMALL, **kwargs})
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- preview

def test_overlay_slice_draws_contours_and_boxes():
    image = np.full((10, 12), 25.0)
    label = np.zeros((10, 12), np.uint8)
    label[2:8, 2:9] = 1
    label[4:6, 4:6] = 2
    boxes = [Box("tumor", (4, 4, 0), (5, 5, 0)), (1, 1, 9, 8, "liver")]
    img = preview.overlay_slice(image, label, boxes, scale=2)
    assert img.size == (24, 20)
    a = np.asarray(img)
    assert tuple(a[0, 0]) == (127, 127, 127)       # 25 HU in the [-200, 250] window
    assert tuple(a[8, 4]) == preview.COLOURS[1]     # left edge of the liver (column 2, scaled)
    assert tuple(a[8, 6]) == (127, 127, 127)        # inside the liver: no fill, image shows through
    assert tuple(a[2, 2]) == preview.BOX_COLOURS["liver"]       # liver box corner (1, 1) * 2
    assert tuple(a[8, 8]) == preview.BOX_COLOURS["tumor"]       # tumour box corner (4, 4) * 2
    plain = np.asarray(preview.overlay_slice(image, label, scale=2))
    assert tuple(plain[8, 8]) == preview.COLOURS[2]              # under the box: the tumour edge


def test_best_slice_prefers_tumour_then_liver():
    lab = np.zeros((5, 4, 4), np.uint8)
    assert preview.best_slice(lab) == 2
    lab[1, :2, :2] = 1
    assert preview.best_slice(lab) == 1
    lab[3, 0, 0] = 2
    assert preview.best_slice(lab) == 3
