"""Domain randomisation of the phantom generator (phantom.Randomization): off by default, deterministic
for a seed, and every knob changes what it says (and the image-only knobs never the labels)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.synth import phantom
from WeakLiverSegLib.synth.phantom import Randomization

SMALL = dict(shape=(48, 48, 16), spacing=(4.0, 4.0, 12.0), n_tumors=2, tumor_radius_mm=(6.0, 12.0))


def _case(seed=5, rz=None):
    return phantom.generate_case(np.random.default_rng(seed), randomization=rz, **SMALL)


@pytest.fixture(scope="module")
def base():
    return _case()


def _same(a, b, key):
    return a[key].array.shape == b[key].array.shape and np.array_equal(a[key].array, b[key].array)


def test_default_and_preset_none_keep_todays_phantoms(base):
    for rz in (Randomization(), "none", {}):
        other = _case(rz=rz)
        assert all(_same(base, other, k) for k in ("enhanced", "plain", "label", "couinaud_map"))
        assert "params" not in other
    assert not Randomization().active and Randomization.preset("all").active


def test_randomised_case_is_deterministic_for_a_seed():
    a, b, c = _case(rz="all"), _case(rz="all"), _case(seed=6, rz="all")
    assert all(_same(a, b, k) for k in ("enhanced", "plain", "label", "couinaud_map"))
    assert a["params"] == b["params"] and a["enhanced"].spacing == b["enhanced"].spacing
    assert not _same(a, c, "enhanced")


# knob -> the value that turns it on; image-only knobs must leave the label map as it was
IMAGE_ONLY = {
    "intensities": True,
    "bias_field": 0.05,
    "noise_hu": (25.0, 30.0),
    "blur_mm": (2.5, 3.0),
    "inplane_spacing_mm": (9.0, 10.0),     # PSF >= 0.42 x acquired pixel: a visible blur at this size
    "arms": 1.0,                           # arms and table only in the air around the body
    "heart": 1.0,                          # outside the liver
}


@pytest.mark.parametrize("knob", sorted(IMAGE_ONLY))
def test_image_only_knobs_change_the_image_not_the_labels(base, knob):
    other = _case(rz={knob: IMAGE_ONLY[knob]})
    assert _same(base, other, "label") and _same(base, other, "couinaud_map")
    assert not _same(base, other, "enhanced")


def test_intensities_draw_a_phase_and_its_values():
    phases = {_case(seed=s, rz={"intensities": True})["params"]["phase"] for s in range(12)}
    assert len(phases) >= 3 and phases <= set(phantom.PHASES)
    nc = _case(rz={"intensities": True, "phases": ["non-contrast"]})
    liver = nc["label"].array == 1
    # a non-contrast liver (25-70 HU) is darker than today's enhanced liver (100-120 HU)
    assert np.median(nc["enhanced"].array[liver]) < 85
    mr = _case(rz={"intensities": True, "phases": ["mr-like"]})
    assert mr["params"]["phase"] == "mr-like"


def test_noise_knob_sets_the_noise_level(base):
    quiet = _case(rz={"noise_hu": (0.0, 0.0)})
    loud = _case(rz={"noise_hu": (40.0, 40.0)})
    air = np.zeros_like(base["label"].array, bool)
    air[:, :2, :2] = True            # a corner of air outside the body
    assert quiet["enhanced"].array[air].std() < 3 < 20 < loud["enhanced"].array[air].std()


def test_slice_thickness_changes_the_z_spacing_and_slices():
    c = _case(rz={"slice_thickness_mm": (2.0, 2.0), "max_slices": 200})
    assert c["enhanced"].spacing[2] == pytest.approx(2.0)
    assert c["enhanced"].array.shape[0] == 16 * 12 // 2          # same height of abdomen, thinner slices
    assert c["params"]["slice_mm"] == 2.0
    capped = _case(rz={"slice_thickness_mm": (2.0, 2.0), "max_slices": 20})
    assert capped["enhanced"].array.shape[0] == 20


def test_partial_fov_cuts_the_abdomen(base):
    c = _case(rz={"partial_fov": 1.0})
    assert c["params"]["partial_fov"] and c["enhanced"].array.shape[0] < base["enhanced"].array.shape[0]
    assert c["enhanced"].spacing == base["enhanced"].spacing


def test_patient_size_scales_the_anatomy(base):
    small = _case(rz={"patient_size": (0.7, 0.7)})
    big = _case(rz={"patient_size": (1.3, 1.3)})
    n = [(c["label"].array > 0).sum() for c in (small, base, big)]
    assert n[0] < n[1] < n[2]


def test_rotation_turns_the_patient(base):
    c = _case(rz={"rotation_deg": 30.0})
    assert c["params"]["rotation_deg"] != 0 and not _same(base, c, "label")


def test_liver_shapes_and_tumours_change_the_labels(base):
    shapes = [_case(seed=s, rz={"liver_shapes": True}) for s in range(8)]
    assert any(not _same(base, c, "label") for c in shapes[:1])
    drawn = [c["params"]["liver"] for c in shapes]
    assert len({(d["left"], d["right"]) for d in drawn}) >= 6
    t = _case(rz={"tumours": True})
    assert set(t["params"]["tumours"]) <= {"hypo", "hyper", "rim", "faint", "necrotic"}
    assert not _same(base, t, "enhanced")
    assert ((base["label"].array > 0) == (t["label"].array > 0)).all()   # the liver itself stays


def test_knobs_are_validated():
    with pytest.raises(InputError, match="nosuch"):
        Randomization.from_value({"nosuch": 1})
    with pytest.raises(InputError, match="noise_hu"):
        Randomization.from_value({"noise_hu": [5, 1]})
    with pytest.raises(InputError, match="phases"):
        Randomization.from_value({"phases": ["xray"]})
    with pytest.raises(InputError, match="preset"):
        Randomization.from_value("most")


def test_cli_phantom_randomize_writes_the_draws(tmp_path):
    out = tmp_path / "c"
    code = cli.main(["phantom", "--out", str(out), "--cases", "2", "--seed", "1", "--shape", "40", "40", "12",
                     "--spacing", "5", "5", "12", "--mix", "strong=1", "--randomize", '{"intensities": true}',
                     "--progress", "none"])
    assert code == 0
    drawn = json.loads((out / "randomization.json").read_text())
    assert drawn["knobs"]["intensities"] is True and set(drawn["cases"]) == {"case000", "case001"}
    assert cli.main(["phantom", "--out", str(tmp_path / "d"), "--randomize", "{bad", "--progress", "none"]) == 2
