"""Recipe ``acol`` (anchor-box region mining, ACoL, dense CRF) on tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from WeakLiverSegLib.synth import phantom
from WeakLiverSegLib.data.boxes import box_mask, boxes_from_mask
from WeakLiverSegLib.errors import Cancelled, InputError
from WeakLiverSegLib.data.imageio import read_image
from WeakLiverSegLib.learn.modelstore import load_model
from WeakLiverSegLib.recipes.acol.fpn_classifier import FPNACoLClassifier, assign_levels, erase, normalise_map, roi_align
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.recipes import acol
from WeakLiverSegLib.learn.slices import lesion_boxes_for_slices
from WeakLiverSegLib.data.store import Dataset

TINY = {
    "spacing_mm": 1.5, "checkpoint_every": 1,
    "classifier": {"width": 0.125, "fpn_channels": 16, "head_channels": 16, "roi_size": 6, "negatives": 16,
                   "batch_size": 2, "crop": 64, "steps": 3},
    "crf": {"max_pixels": 400},
    "segmenter": {"channels": [4, 8, 16, 32], "crop": 48, "batch_size": 2, "steps": 3},
}


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


# ----------------------------------------------------------------------------- anchors


def test_anchor_grid_has_the_papers_sizes_and_levels():
    boxes, levels = acol.anchors((64, 64), inside=False)
    # W x H x 3 anchors per level for strides 4, 8, 16, 32
    assert [int((levels == k).sum()) for k in (2, 3, 4, 5)] == [16 * 16 * 3, 8 * 8 * 3, 4 * 4 * 3, 2 * 2 * 3]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    for k, side in zip((2, 3, 4, 5), (32, 64, 128, 256)):
        np.testing.assert_allclose(w[levels == k] * h[levels == k], side ** 2, rtol=1e-5)
        assert sorted(np.unique(np.round(h[levels == k] / w[levels == k], 3))) == [0.5, 1.0, 2.0]
    inside, _ = acol.anchors((64, 64))
    assert inside.min() >= 0 and inside.max() <= 64 and len(inside) < len(boxes)


def test_eq2_level_assignment():
    sides = torch.tensor([8.0, 32, 111, 112, 224, 447, 448, 2000])
    rois = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], dim=1)
    # floor(4 + log2(s / 224)), clipped to 2..5
    assert assign_levels(rois).tolist() == [2, 2, 2, 3, 4, 4, 5, 5]


def test_negatives_never_overlap_a_box_and_are_the_nearest():
    rng = np.random.default_rng(0)
    a_boxes, a_levels = acol.anchors((128, 128))
    for trial in range(20):
        n_boxes = int(rng.integers(1, 4))
        xy = rng.uniform(0, 100, size=(n_boxes, 2))
        wh = rng.uniform(3, 40, size=(n_boxes, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        neg = acol.sample_negatives(a_boxes, a_levels, boxes, rng, fraction=0.1, n=32)
        assert 0 < len(neg) <= 32
        for a in neg:
            assert not any(_overlap(a, b) for b in boxes)
        # every returned anchor is within its level's 10 % nearest free anchors
        free = ~acol.overlaps_any(a_boxes, boxes)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2

        def dist(x):
            return np.sqrt((((x[:, None, :2] + x[:, None, 2:]) / 2 - centres[None]) ** 2).sum(-1)).min(1)

        for a in neg:
            k = a_levels[np.flatnonzero((a_boxes == a).all(1))[0]]
            pool = a_boxes[free & (a_levels == k)]
            cutoff = np.sort(dist(pool))[max(1, int(np.ceil(0.1 * len(pool)))) - 1]
            assert dist(a[None])[0] <= cutoff + 1e-4


def test_classifier_batch_positives_are_the_boxes_and_negatives_are_free():
    rng = np.random.default_rng(1)
    image = rng.random((5, 80, 90)).astype(np.float32)
    rects = {2: np.array([[30, 20, 45, 41], [60, 60, 70, 75]], np.float32)}
    batch = acol.classifier_batch([acol.BoxCase("c", image, rects)], 64, 3, rng, negatives=20)
    assert batch["image"].shape == (3, 3, 64, 64)
    rois, labels = batch["rois"].numpy(), batch["labels"].numpy()
    assert set(labels.tolist()) == {0, 1}
    for b in range(3):
        pos = rois[(rois[:, 0] == b) & (labels == 1), 1:]
        neg = rois[(rois[:, 0] == b) & (labels == 0), 1:]
        assert len(pos) >= 1 and len(neg) <= 20
        # positives lie in the crop and are a box (or at least half of one, clipped); no negative overlaps one
        assert pos.min() >= 0 and pos.max() <= 64
        for wh in pos[:, 2:] - pos[:, :2]:
            assert any(np.all(wh <= (w, h)) and wh.prod() >= 0.5 * w * h for w, h in ((15, 21), (10, 15)))
        for a in neg:
            assert not any(_overlap(a, p) for p in pos)


# ----------------------------------------------------------------------------- network pieces


def test_roi_align_reads_the_right_cells():
    f = torch.arange(64.0).view(1, 1, 8, 8)
    whole = roi_align(f, torch.tensor([[0, 0, 0, 32, 32.0]]), stride=4, size=8, sampling=1)
    assert torch.equal(whole[0, 0], f[0, 0])
    part = roi_align(f, torch.tensor([[0, 8, 4, 16, 12.0]]), stride=4, size=2, sampling=1)
    assert torch.equal(part[0, 0], f[0, 0, 1:3, 2:4])


def test_erasing_removes_the_most_salient_region_from_branch_b():
    torch.manual_seed(0)
    net = FPNACoLClassifier(width=0.125, fpn_channels=8, head_channels=8, roi_size=6, delta=0.6).eval()
    x = torch.randn(2, 3, 64, 64)
    rois = torch.tensor([[0, 4, 4, 40, 36.0], [1, 10, 20, 30, 60.0]])
    seen = {}
    net.head_b.register_forward_pre_hook(lambda m, args: seen.setdefault("b_in", args[0].clone()))
    with torch.no_grad():
        out = net(x, rois)
        feats = net.box_features(net.pyramid(x), rois)
    m = normalise_map(out["cam_a"][:, 1])
    b_in = seen["b_in"]
    for r in range(2):
        top = torch.nonzero(m[r] == m[r].max())[0]
        assert m[r].max() == pytest.approx(1.0)
        # the most salient cell of branch A is zero in branch B's input ...
        assert torch.all(b_in[r, :, top[0], top[1]] == 0)
        assert torch.any(feats[r, :, top[0], top[1]] != 0)
        # ... and every cell at or below delta is passed on untouched
        low = m[r] <= 0.6
        assert low.any()
        assert torch.equal(b_in[r][:, low], feats[r][:, low])
        assert torch.all(b_in[r][:, m[r] > 0.6] == 0)
    # the labels choose the class map that drives the erasing
    with torch.no_grad():
        bg = net(x, rois, labels=torch.tensor([0, 0]))
    assert torch.equal(bg["erase_map"], normalise_map(bg["cam_a"][:, 0]))
    assert torch.equal(erase(feats, torch.ones(2, 6, 6), 0.6), torch.zeros_like(feats))


def test_cam_mode_has_one_branch():
    net = FPNACoLClassifier(width=0.125, fpn_channels=8, head_channels=8, roi_size=4, acol=False).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([[0, 2, 2, 20, 20.0]]))
    assert "cam_b" not in out and net.head_b is None
    fused = net.localization(out)
    assert fused.shape == (1, 4, 4) and float(fused.min()) >= 0 and float(fused.max()) <= 1


# ----------------------------------------------------------------------------- CRF and pseudo-masks


def _disc_image(n=40, r=10.0):
    yy, xx = np.mgrid[:n, :n]
    disc = (yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 <= r ** 2
    return disc


def test_crf_follows_the_image_edges():
    rng = np.random.default_rng(0)
    disc = _disc_image()
    image = np.where(disc, 0.3, 0.6) + rng.normal(0, 0.02, disc.shape)
    # a blurred, shifted "CAM" of the disc: thresholding it alone misses the disc
    prior = np.roll(disc, 4, axis=1).astype(np.float32)
    prior = 0.25 + 0.5 * prior
    q = acol.dense_crf(torch.from_numpy(prior), torch.from_numpy(image[None].astype(np.float32)),
                       iterations=5, bilateral_sintensity=0.05, max_pixels=1600).numpy()
    before = acol.dice(prior > 0.5, disc)
    after = acol.dice(q > 0.5, disc)
    assert after > before + 0.05 and after > 0.9


def test_crf_on_a_shrunk_grid_is_close_to_the_full_one():
    rng = np.random.default_rng(1)
    disc = _disc_image(48, 14)
    image = np.where(disc, 0.3, 0.6) + rng.normal(0, 0.02, disc.shape)
    prior = torch.from_numpy((0.3 + 0.4 * disc).astype(np.float32))
    img = torch.from_numpy(image[None].astype(np.float32))
    full = acol.dense_crf(prior, img, max_pixels=48 * 48).numpy() > 0.5
    small = acol.dense_crf(prior, img, max_pixels=24 * 24).numpy() > 0.5
    assert acol.dice(full, small) > 0.95


def test_pseudo_mask_stays_inside_its_box_and_marks_the_ignore_region():
    rng = np.random.default_rng(2)
    cfg = acol.resolve_config({"crf": {"max_pixels": 400}})
    image = rng.random((3, 50, 60)).astype(np.float32)
    image[1, 10:30, 20:40] = 0.1              # a dark "tumour" filling the box
    rects = {1: np.array([[18, 8, 42, 32]], np.float32)}
    fused = np.ones((6, 6), np.float32)       # the map claims the whole box
    maps = [(1, rects[1][0].astype(np.int64), fused)]
    prob, inbox = acol.mine_pseudo(None, image, rects, cfg, maps=maps)
    assert inbox.sum() == 24 * 24 and inbox[1, 8:32, 18:42].all()
    assert np.all(prob[~inbox] == 0)
    assert prob[1, 12:28, 22:38].min() > 0.5      # tumour inside the box is kept
    labels = acol.pseudo_labels(prob, inbox)
    assert set(np.unique(labels[~inbox])) == {0}
    assert set(np.unique(labels[inbox])) <= {2, 255} and (labels == 2).any()
    assert np.all((labels == 255) == (inbox & (prob <= 0.5)))


def test_fill_prior_keeps_the_ranking_and_sets_the_mean():
    m = torch.rand(12, 9)
    out = acol.calibrate_fill(m, 0.6)
    assert float(out.mean()) == pytest.approx(0.6, abs=1e-3)
    assert torch.equal(torch.argsort(out.flatten()), torch.argsort(m.flatten()))
    assert torch.all(acol.calibrate_fill(torch.zeros(3, 3), 0.6) == 0.6)


def test_box_and_centre_modes_need_no_network():
    image = np.full((2, 40, 40), 0.6, np.float32)
    image[0, 12:28, 12:28] = 0.3
    rects = {0: np.array([[10, 10, 30, 30]], np.float32)}
    box = acol.resolve_config({"classifier": {"mode": "box"}})
    prob, inbox = acol.mine_pseudo(None, image, rects, box)
    assert np.array_equal(prob > 0.5, inbox) and inbox.sum() == 400
    centre = acol.resolve_config({"classifier": {"mode": "centre"}, "crf": {"max_pixels": 400}})
    assert centre["classifier"]["steps"] == 0
    prob, inbox = acol.mine_pseudo(None, image, rects, centre)
    fg = prob > 0.5
    assert fg[0, 14:26, 14:26].all() and not fg[0, 10, 10] and not fg[~inbox].any()


def test_tiny_boxes_are_filled():
    crf = acol.resolve_config({})["crf"]
    q = acol.box_probability(np.zeros((4, 4), np.float32), np.zeros((2, 5), np.float32), crf)
    assert q.shape == (2, 5) and np.all(q == 1)


# ----------------------------------------------------------------------------- segmentation loss


def test_ignored_pixels_do_not_contribute_to_the_loss():
    torch.manual_seed(0)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:8, 4:8] = 1
    labels[:, 8:12, 4:12] = acol.IGNORE
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    for ce in (0.0, 1.0):
        loss = acol.masked_dice_loss(logits, labels, ce_weight=ce)
        loss.backward()
        ignored = labels == acol.IGNORE
        assert torch.all(logits.grad.permute(0, 2, 3, 1)[ignored] == 0)
        assert logits.grad.abs().sum() > 0
        changed = logits.detach().clone()
        changed[:, :, 8:12, 4:12] = torch.randn(2, 2, 4, 8) * 10
        assert float(acol.masked_dice_loss(changed, labels, ce_weight=ce)) == pytest.approx(float(loss.detach()), abs=1e-6)
        logits.grad = None
    # a perfect prediction of the valid pixels has (almost) zero loss whatever the ignored ones say
    perfect = torch.where(labels[:, None] == 1, torch.tensor([-20.0, 20.0]).view(1, 2, 1, 1),
                          torch.tensor([20.0, -20.0]).view(1, 2, 1, 1))
    assert float(acol.masked_dice_loss(perfect, labels)) < 1e-4


def test_target_encoding_round_trip():
    labels = np.array([[[0, 2, 255], [255, 0, 2]]], np.uint8)
    back = acol.decode_target(torch.from_numpy(acol.encode_target(labels)))
    assert back.tolist() == [[[0, 1, 255], [255, 0, 1]]]


def test_poly_schedule():
    assert acol.poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert acol.poly_lr(50, 100, 0.01) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert acol.poly_lr(100, 100, 0.01) == 0.0


def test_config_errors_name_the_setting():
    with pytest.raises(InputError, match="classifier.mode"):
        acol.resolve_config({"classifier": {"mode": "gradcam"}})
    with pytest.raises(InputError, match="unknown setting 'classifier.widht'"):
        acol.resolve_config({"classifier": {"widht": 1}})
    with pytest.raises(InputError, match="crf.fill_prior"):
        acol.resolve_config({"crf": {"fill_prior": 1.5}})
    with pytest.raises(InputError, match="crf.bilateral_sintensity"):
        acol.resolve_config({"crf": {"bilateral_sintensity": 0}})
    with pytest.raises(InputError, match="classifier.size"):
        acol.resolve_config({"classifier": {"size": "huge"}})
    assert acol.resolve_config({}, "cpu")["classifier"]["width"] == 0.25
    paper = acol.resolve_config({"classifier": {"size": "paper"}})["classifier"]
    assert (paper["width"], paper["head_channels"], paper["negatives"], paper["delta"]) == (1.0, 512, 256, 0.6)
    scaled = acol.resolve_config({"steps": 10})
    assert scaled["classifier"]["steps"] + scaled["segmenter"]["steps"] == 10


# ----------------------------------------------------------------------------- train / save / load


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("acol") / "cohort"
    return phantom.generate_cohort(out, cases=3, seed=5, shape=(40, 40, 8), spacing=(2.0, 2.0, 4.0),
                                   mix="box=0.67,test=0.33", healthy_fraction=0.0, tumors=(1, 2),
                                   tumor_radius_mm=(6.0, 9.0))


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("acol_model") / "model"
    acol.train(cohort, out, TINY, "cpu", Progress("none"))
    return out


def test_train_save_load_round_trip(trained, cohort):
    meta = json.loads((trained / "model.json").read_text())
    assert meta["recipe"] == "acol" and set(meta["networks"]) == {"classifier", "segmenter"}
    assert meta["networks"]["classifier"]["class"] == "FPNACoLClassifier"
    assert meta["training"]["steps"] == {"classifier": 3, "segmenter": 3}
    assert not (trained / "checkpoint").exists()
    model = load_model(trained)
    test = next(c for c in cohort.cases.values() if c.split == "test")
    image = cohort.read_image(test.id)
    a = acol.segment(model, {"enhanced": image})
    b = acol.segment(load_model(trained), {"enhanced": image})
    assert a.labels.array.shape == image.array.shape and set(np.unique(a.labels.array)) <= {0, 2}
    np.testing.assert_array_equal(a.probabilities.array, b.probabilities.array)
    # with tumour boxes the teacher answers, and only inside them
    truth = cohort.read_truth(test.id).array
    boxes = boxes_from_mask(truth, 2, per_slice=True)
    t = acol.segment(model, {"enhanced": image}, boxes=boxes)
    inside = box_mask(image.array.shape, boxes)
    assert not (t.labels.array[~inside] == 2).any() and np.all(t.probabilities.array[~inside] == 0)
    assert t.probabilities.array[inside].max() > 0


def test_pseudo_writes_box_bounded_masks(trained, cohort, tmp_path):
    model = load_model(trained)
    out = acol.pseudo(model, cohort, tmp_path / "pseudo", "cpu", Progress("none"))
    ds = Dataset.load(out)
    for case in cohort.cases.values():
        new = ds.cases[case.id]
        if case.split == "train" and case.boxes:
            mask = ds.read_mask(case.id).array
            inside = box_mask(mask.shape, lesion_boxes_for_slices(case.boxes))
            assert set(np.unique(mask)) <= {0, 2} and not (mask[~inside] == 2).any()
            prob = read_image(out / "pseudo" / f"{case.id}_tumor_prob.nii.gz").array
            assert prob.max() > 0 and np.all(prob[~inside] == 0)
        else:
            assert new.mask is None
    with pytest.raises(InputError, match="new folder"):
        acol.pseudo(model, cohort, cohort.root, "cpu")


class _CancelAfter(Progress):
    def __init__(self, n):
        super().__init__("none")
        self.n = n

    def update(self, stage, step, total, **fields):
        super().update(stage, step, total, **fields)
        if stage == "segmenter" and step >= self.n:
            self.cancelled = True


def test_interrupted_training_resumes_to_the_same_model(cohort, trained, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "model"
    with pytest.raises(Cancelled):
        acol.train(cohort, out, TINY, "cpu", _CancelAfter(2))
    assert (out / "checkpoint" / "checkpoint.json").is_file() and not (out / "model.json").exists()
    with pytest.raises(InputError, match="--resume"):
        acol.train(cohort, out, TINY, "cpu", Progress("none"))
    acol.train(cohort, out, TINY, "cpu", Progress("none"), resume=True)
    a, b = load_model(out), load_model(trained)
    for role in ("classifier", "segmenter"):
        for (k, va), vb in zip(a.networks[role].state_dict().items(), b.networks[role].state_dict().values()):
            assert torch.allclose(va.float(), vb.float(), atol=1e-5), (role, k)


def test_dice_loss_penalises_false_tumour_on_a_tumour_free_batch():
    # A batch of healthy slices (or crops beside the tumour) predicting tumour everywhere.  The
    # tumour-only Dice is a flat 1 there (no gradient): the student never learned "no tumour here"
    # and marked look-alike organs on held-out cases.  The two-class Dice must push tumour down.
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    logits = torch.zeros(2, 2, 16, 16)
    logits[:, 1] = 2.0
    logits.requires_grad_(True)
    acol.masked_dice_loss(logits, labels, include_background=False).backward()
    assert float(logits.grad.abs().max()) < 1e-8          # the old loss: blind
    logits.grad = None
    loss = acol.masked_dice_loss(logits, labels)
    loss.backward()
    assert torch.all(logits.grad[:, 1] > 0) and torch.all(logits.grad[:, 0] < 0)   # descent lowers tumour
    quiet = logits.detach().clone()
    quiet[:, 1] = -2.0
    assert float(acol.masked_dice_loss(quiet, labels)) < float(loss.detach())
    assert acol.resolve_config({})["segmenter"]["dice_background"] is True
    with pytest.raises(InputError, match="dice_background"):
        acol.resolve_config({"segmenter": {"dice_background": "yes"}})


def test_litemedsam_annotator_replaces_mining(cohort, tmp_path, monkeypatch):
    """pseudo.annotator=litemedsam: no classifier, the annotator's masks (here a fill stand-in) train the segmenter
    and the model's pseudo-masks come from it too."""
    from WeakLiverSegLib.annotate import annotators
    from WeakLiverSegLib.data.boxes import box_mask
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.learn.slices import lesion_boxes_for_slices

    calls = []

    class FillSam(annotators.FillAnnotator):
        name = "litemedsam"

        def annotate(self, image, boxes, progress=None, image_key=None):
            calls.append(image_key)
            return super().annotate(image, boxes)

    monkeypatch.setattr(annotators, "load_annotator", lambda spec, device="cpu": FillSam())
    cfg = dict(TINY, pseudo={"annotator": "litemedsam"})
    out = acol.train(cohort, tmp_path / "m", cfg, "cpu", Progress("none"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["config"]["classifier"]["steps"] == 0 and "classifier" not in meta["networks"]
    weak = [c for c in cohort.cases.values() if c.mask is None and c.boxes and c.split == "train"]
    assert calls == [c.id for c in weak]
    case = weak[0]
    tumors = lesion_boxes_for_slices(case.boxes)
    res = acol.segment(load_model(out), {"enhanced": cohort.read_image(case.id)}, boxes=[case.liver_box] + tumors)
    np.testing.assert_array_equal(res.labels.array == 2, box_mask(res.labels.array.shape, tumors))
    with pytest.raises(InputError, match="pseudo.annotator 'sam'"):
        acol.train(cohort, tmp_path / "x", dict(TINY, pseudo={"annotator": "sam"}), "cpu", None)
