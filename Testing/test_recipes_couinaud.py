"""Recipe ``couinaud``: ILR (Eq. 2), PLR (Eq. 3-6), tumour injection, the Couinaud constructor,
and a tiny train -> segment -> resume run through the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.synth import phantom
from WeakLiverSegLib.anatomy.couinaud_map import construct_couinaud, segment_dice, segment_of_component
from WeakLiverSegLib.errors import Cancelled, InputError
from WeakLiverSegLib.data.imageio import read_image
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.recipes import couinaud
from WeakLiverSegLib.learn.slices import window
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from threads; on a shared 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- ILR


def toy_couinaud_stack():
    cm = np.zeros((4, 6, 6), np.uint8)
    cm[0, :3], cm[0, 3:] = 4, 5        # slice 0: segments 4, 5 (18 pixels each)
    cm[1, :3], cm[1, 3:] = 6, 7        # slice 1: segments 6, 7
    cm[2] = 7                          # slice 2: segment 7; slice 3: no liver
    return cm


def test_ilr_makes_slices_without_the_labelled_segment_healthy():
    cm = toy_couinaud_stack()
    labels = couinaud.volume_slice_labels(4, pathological=True)
    assert labels.tolist() == [1, 1, 1, 1]                       # the volume label on every slice
    assert couinaud.ilr(labels, cm, [7]).tolist() == [0, 1, 1, 0]
    assert couinaud.ilr(labels, cm, [4, 6]).tolist() == [1, 1, 0, 0]
    assert couinaud.ilr(labels, cm, None).tolist() == [1, 1, 1, 0]   # volume-level: anywhere in the liver
    assert couinaud.ilr(np.zeros(4), cm, [7]).tolist() == [0, 0, 0, 0]
    assert couinaud.ilr(labels, cm, [4], min_pixels=19).tolist() == [0, 0, 0, 0]
    assert labels.tolist() == [1, 1, 1, 1]                       # input untouched


# ----------------------------------------------------------------------------- PLR


def test_continuity_index_is_c_times_best_neighbour_dice():
    m = np.zeros((3, 4, 4), bool)
    m[0, :2, :2] = True                # 4 pixels
    m[1, :2, :1] = True                # 2 pixels, both inside slice 0's
    ci = couinaud.continuity_index(m, c=5.0)
    assert ci[0] == pytest.approx(5 * 2 * 2 / 6)
    assert ci[1] == pytest.approx(5 * 2 * 2 / 6)
    assert ci[2] == 0.0                # empty slice


def test_plr_removes_isolated_predictions_and_keeps_continuous_ones():
    probs = np.zeros((6, 8, 8), np.float32)
    probs[0, 1:3, 1:3] = 0.9           # isolated in z: a false positive
    probs[2:5, 4:7, 4:7] = 0.8         # a tumour across three slices
    probs[3, 3, 4:7] = 0.3             # below tau, but on a continuous slice
    masks, ci = couinaud.plr(probs, c=5.0, tau=0.5)
    assert ci[0] == 0.0 and not masks[0].any()
    assert ci[2] == pytest.approx(5.0) and ci[3] == pytest.approx(5.0)
    assert masks[2:5, 4:7, 4:7].all()
    assert masks[3, 3, 4:7].all()      # Eq. 6: 0.3 * CI >= tau
    assert masks.sum() == 27 + 3
    before, _ = couinaud.pseudo_masks(probs, {"refine": {"c": 5.0, "tau": 0.5}}, use_plr=False)
    assert before.sum() == 4 + 27      # Eq. 3 only


class ConstantNet(torch.nn.Module):
    """Tumour probability 0.8 everywhere, whatever the input."""

    def forward(self, image, region):
        b, _, h, w = image.shape
        return torch.stack([torch.zeros(b, h, w), torch.full((b, h, w), math.log(4.0))], dim=1)


def test_pseudo_labels_are_clipped_to_the_labelled_segments_unless_vanilla():
    cm = toy_couinaud_stack()
    case = couinaud.WeakCase("c", "couinaud", np.zeros(cm.shape, np.float32), cm > 0, cm, True, [7], 3.0)
    labels = couinaud.volume_slice_labels(4, True)
    clipped = couinaud.couinaudnet_probs(ConstantNet(), case, labels)
    assert np.allclose(clipped[cm == 7], 0.8) and not clipped[cm != 7].any()
    vanilla = couinaud.couinaudnet_probs(ConstantNet(), case, labels, clip=False)
    assert np.allclose(vanilla[cm > 0], 0.8) and not vanilla[cm == 0].any()   # slice 0 too: ILR's job
    refined = couinaud.couinaudnet_probs(ConstantNet(), case, couinaud.ilr(labels, cm, [7]), clip=False)
    assert not refined[0].any() and np.allclose(refined[1][cm[1] > 0], 0.8)


# ----------------------------------------------------------------------------- tumour injection


@pytest.fixture(scope="module")
def phantom_case():
    return phantom.generate_case(np.random.default_rng(7), shape=(96, 96, 48), spacing=(1.5, 1.5, 3.0), n_tumors=0)


def test_injected_tumour_lies_inside_the_chosen_segment(phantom_case):
    img = window(phantom_case["enhanced"].array)
    cm = phantom_case["couinaud_map"].array
    rng = np.random.default_rng(0)
    for seg in (0, 2, 4, 5, 6, 7, 8):
        region_all = cm > 0 if seg == 0 else cm == seg
        z = int(np.argmax(region_all.sum(axis=(1, 2))))
        stack, cms = img[z - 1:z + 2], cm[z - 1:z + 2]
        region = cms > 0 if seg == 0 else cms == seg
        out, mask = couinaud.inject_tumour(stack, cms, seg, rng, pixel_mm=1.5, slice_mm=3.0, hu_per_unit=450.0)
        assert mask[1].sum() >= 4, seg
        assert not (mask & ~region).any(), seg                  # tumour only in the segment
        assert np.array_equal(out[~region], stack[~region]), seg   # nothing changes outside it
        assert out[mask].mean() < stack[mask].mean() - 5 / 450, seg           # hypodense (>= 5 HU darker)
    out2, mask2 = couinaud.inject_tumour(img[z], cm[z], 7, rng, 1.5, 3.0, 450.0)   # a single slice works too
    assert out2.shape == img[z].shape and not (mask2 & (cm[z] != 7)).any()


def test_injection_sampler_batches_match_their_regions(phantom_case):
    hu = phantom_case["enhanced"]
    liver = phantom_case["label"].array >= 1
    case = couinaud.WeakCase("c", "couinaud", window(hu.array), liver, phantom_case["couinaud_map"].array,
                             False, None, 3.0)
    cfg = couinaud.resolve_config({})
    pool = couinaud.healthy_pool([case], {"c": np.zeros(hu.array.shape[0], np.int64)}, 20)
    sampler = couinaud.InjectionSampler([case], pool, 48, 4, np.random.default_rng(1), cfg)
    x, region, target = sampler.sample()
    assert x.shape == (4, 3, 48, 48) and region.shape == (4, 1, 48, 48) and target.shape == (4, 48, 48)
    assert target.sum() > 0
    assert not ((target > 0) & (region[:, 0] == 0)).any()


# ----------------------------------------------------------------------------- constructor


def test_constructor_per_segment_dice_on_a_phantom_case(phantom_case):
    cm, lm = construct_couinaud(phantom_case["enhanced"], phantom_case["label"], return_landmarks=True)
    assert cm.array.dtype == np.uint8 and cm.same_grid(phantom_case["enhanced"])
    liver = phantom_case["label"].array >= 1
    assert np.array_equal(cm.array > 0, liver)
    dice = segment_dice(cm.array, phantom_case["couinaud_map"].array)
    assert all(d is not None and d >= 0.5 for d in dice.values()), dice
    assert np.mean(list(dice.values())) >= 0.8, dice
    assert lm.found == {"ivc": True, "portal": True, "veins": True}


def test_liver_only_mask_of_a_tumour_labelled_case_stays_weak(phantom_case):
    """A drawn liver without tumour plus ticked segments: liver from the mask, tumour from the labels."""
    from types import SimpleNamespace

    hu = phantom_case["enhanced"]
    liver = phantom_case["label"].array >= 1
    loaded = {"hu": hu, "image": window(hu.array), "mask": liver.astype(np.uint8)}
    cfg = couinaud.resolve_config({})
    labelled = SimpleNamespace(id="c", mask="masks/c.nii.gz", couinaud=[6], volume_label="tumour")
    weak = couinaud.make_weak_case(labelled, loaded, liver, "mask", cfg)
    assert (weak.kind, weak.pathological, weak.segments, weak.tumour) == ("couinaud", True, [6], None)
    healthy = SimpleNamespace(id="h", mask="masks/h.nii.gz", couinaud=[], volume_label="healthy")
    strong = couinaud.make_weak_case(healthy, loaded, liver, "mask", cfg)
    assert strong.kind == "mask" and not strong.pathological and not strong.tumour.any()


def test_constructor_works_in_world_coordinates(phantom_case):
    """The same anatomy stored with the x axis flipped gives the same (flipped) map."""
    img, lab = phantom_case["enhanced"], phantom_case["label"]
    nx = img.array.shape[2]
    direction = np.diag([-1.0, 1.0, 1.0])
    origin = (img.origin[0] + (nx - 1) * img.spacing[0], img.origin[1], img.origin[2])
    flipped = Volume(img.array[:, :, ::-1].copy(), img.spacing, origin, direction)
    cm = construct_couinaud(img, lab).array
    cm_f = construct_couinaud(flipped, lab.array[:, :, ::-1].copy()).array
    agree = (cm_f[:, :, ::-1] == cm)[lab.array >= 1].mean()
    assert agree > 0.98


def test_segment_of_component_is_the_majority_segment():
    cm = np.zeros((2, 4, 4), np.uint8)
    cm[:, :, :2], cm[:, :, 2:] = 6, 7
    comp = np.zeros_like(cm, bool)
    comp[0, :, 1:4] = True             # 4 pixels in 6, 8 in 7
    assert segment_of_component(cm, comp) == 7
    assert segment_of_component(cm, np.zeros_like(comp)) == 0
    with pytest.raises(InputError):
        segment_of_component(cm, comp[:1])


def test_constructor_rejects_a_missing_or_mismatched_liver(phantom_case):
    img = phantom_case["enhanced"]
    with pytest.raises(InputError, match="case9: liver mask has 0 voxels"):
        construct_couinaud(img, np.zeros(img.array.shape, np.uint8), where="case9")
    with pytest.raises(InputError, match="does not match"):
        construct_couinaud(img, np.ones((4, 4, 4), np.uint8))


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_setting():
    with pytest.raises(InputError, match="unknown setting 'refine.cc'"):
        couinaud.resolve_config({"refine": {"cc": 3}})
    with pytest.raises(InputError, match="refine.tau"):
        couinaud.resolve_config({"refine": {"tau": 1.5}})
    cfg = couinaud.resolve_config({"steps": 30})
    assert sum(cfg[s]["steps"] for s in couinaud.STAGES) == pytest.approx(30, abs=2)
    assert couinaud.DEFAULTS["steps"] is None and couinaud.DEFAULTS["seed"] == 0
    assert couinaud.DEFAULTS["refine"]["c"] == 5.0 and couinaud.DEFAULTS["refine"]["tau"] == 0.5


# ----------------------------------------------------------------------------- train / segment / resume


TINY = {"couinaudnet": {"crop": 32, "batch_size": 2}, "segmenter": {"crop": 48, "batch_size": 2},
        "liver_net": {"crop": 48, "batch_size": 2}, "channels": [4, 8, 8, 16], "checkpoint_every": 50}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("couinaud") / "ds"
    return phantom.generate_cohort(root, cases=6, seed=2, shape=(48, 48, 16), spacing=(3.0, 3.0, 6.0),
                                   healthy_fraction=0.34, mix="strong=0.34,couinaud=0.33,volume=0.33")


def test_train_and_segment_through_the_cli(tiny_cohort, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    model = tmp_path / "model"
    rc = cli.main(["train", "--dataset", str(tiny_cohort.root), "--recipe", "couinaud", "--out", str(model),
                   "--steps", "8", "--config", str(cfg), "--device", "cpu", "--progress", "none"])
    assert rc == 0
    meta = json.loads((model / "model.json").read_text())
    assert meta["recipe"] == "couinaud" and set(meta["networks"]) == {"segmenter", "couinaudnet"}
    data = meta["training"]["data"]
    assert data["pathological_slices_after_ilr"] <= data["pathological_slices_before_ilr"]
    assert data["healthy_pool_slices"] > 0
    assert set(data["liver_source"].values()) <= {"mask", "liver_net"}
    assert sum(meta["training"]["steps"].values()) <= 10
    assert not (model / "checkpoint").exists()
    case = next(c for c in tiny_cohort.cases.values() if c.split == "train")
    src = tiny_cohort.root / case.images["enhanced"]
    seg, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    rc = cli.main(["segment", "--model", str(model), "--input", str(src), "--out", str(seg),
                   "--probabilities", str(prob), "--progress", "none"])
    assert rc == 0
    labels, probs = read_image(seg), read_image(prob)
    assert labels.array.shape == read_image(src).array.shape
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    assert probs.array.min() >= 0 and probs.array.max() <= 1
    # pseudo: the weak cases come back with refined pixel pseudo-labels as their mask
    pseudo_dir = tmp_path / "pseudo"
    rc = cli.main(["pseudo", "--model", str(model), "--dataset", str(tiny_cohort.root), "--out", str(pseudo_dir),
                   "--progress", "none"])
    assert rc == 0
    pseudo_ds = Dataset.load(pseudo_dir)
    weak = [c.id for c in tiny_cohort.cases.values() if c.mask is None and {"couinaud", "volume"} & c.label_kinds]
    assert weak and all(pseudo_ds.cases[cid].mask is not None for cid in weak)
    for cid in weak:
        lab = pseudo_ds.read_mask(cid).array
        assert set(np.unique(lab)) <= {0, 1, 2}
        assert pseudo_ds.cases[cid].couinaud == tiny_cohort.cases[cid].couinaud   # weak labels kept


class CancelAt(Progress):
    """Progress that asks to stop at one step of one stage (a user pressing Cancel)."""

    def __init__(self, stage, step):
        super().__init__("none")
        self.at = (stage, step)

    def update(self, stage, step, total, **fields):
        super().update(stage, step, total, **fields)
        if (stage, step) == self.at:
            self.cancelled = True


def test_interrupted_training_resumes_from_its_checkpoint(tiny_cohort, tmp_path):
    config = dict(TINY, steps=8, checkpoint_every=2)       # segmenter: 3 steps, a checkpoint at 2
    out = tmp_path / "model"
    with pytest.raises(Cancelled):
        couinaud.train(tiny_cohort, out, config, "cpu", CancelAt("segmenter", 2))
    assert (out / "checkpoint" / "checkpoint.json").exists() and not (out / "model.json").exists()
    with pytest.raises(InputError, match="--resume"):
        couinaud.train(tiny_cohort, out, config, "cpu", Progress("none"))
    progress = Progress("none")
    couinaud.train(tiny_cohort, out, config, "cpu", progress, resume=True)
    assert (out / "model.json").exists()
    seg_steps = [e["step"] for e in progress.history if e["stage"] == "segmenter"]
    assert seg_steps and seg_steps[0] > 1          # continued, not restarted
    assert not any(e["stage"] in ("liver_net", "couinaudnet") for e in progress.history)


def test_weak_cases_without_any_liver_source_are_an_error(tmp_path):
    ds = phantom.generate_cohort(tmp_path / "ds", cases=2, seed=1, shape=(32, 32, 8), spacing=(4.0, 4.0, 8.0),
                                 mix="couinaud=1.0")
    with pytest.raises(InputError, match="liver_model=PATH"):
        couinaud.train(ds, tmp_path / "m", {"steps": 3}, "cpu", Progress("none"))
    assert Dataset.load(ds.root).cases.keys() == ds.cases.keys()     # the store is untouched
