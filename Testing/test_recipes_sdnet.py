"""Recipe ``sdnet`` (SD-Net): the paper's pieces on tiny tensors, training, resume, model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.data.imageio import resample_to
from WeakLiverSegLib.errors import Cancelled, InputError, ModelError
from WeakLiverSegLib.learn.modelstore import load_model
from WeakLiverSegLib.learn.networks.vnet3d import MonaiVNet, ResVNet, VNet
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.recipes import sdnet
from WeakLiverSegLib.learn.slices import window
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume

# Tiny networks and patches: every training below takes a second or two on one CPU core.
TINY = {
    "spacing_mm": [4.0, 4.0, 4.0],
    "patch": [16, 16, 16],
    "networks": {"vnet": {"class": "VNet", "base": 2, "depth": 2}, "resvnet": {"class": "ResVNet", "base": 4, "depth": 2}},
    "optimizer": "adam", "lr": 0.01,
    "infer_batch": 2,
}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def blob_case(rng, shape_zyx=(16, 20, 20), spacing=(4.0, 4.0, 4.0)):
    """A bright ellipsoid 'liver' (with a darker 'tumour' labelled 2) in a noisy dark body."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    c = rng.uniform(-0.2, 0.2, 3)
    r = rng.uniform(0.35, 0.5, 3)
    liver = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    labels = liver.astype(np.uint8)
    tumour = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= 0.02
    labels[tumour & liver] = 2
    image = np.where(liver, 110.0, -60.0) - 40.0 * (labels == 2) + rng.normal(0, 10, shape_zyx)
    geo = dict(spacing=spacing, origin=(-10.0, 5.0, 2.0))
    return Volume(image.astype(np.int16), **geo), Volume(labels, **geo)


def make_store(root, n_labelled=2, n_unlabelled=2, n_val=0, seed=0):
    rng = np.random.default_rng(seed)
    ds = Dataset.create(root, name="blobs")
    for n in range(n_labelled + n_unlabelled + n_val):
        # one labelled case on a finer, anisotropic grid: exercises the working-grid resampling
        spacing = (2.0, 2.0, 4.0) if n == 0 else (4.0, 4.0, 4.0)
        shape = (16, 40, 40) if n == 0 else (16, 20, 20)
        image, labels = blob_case(rng, shape, spacing)
        labelled = n < n_labelled or n >= n_labelled + n_unlabelled
        split = "val" if n >= n_labelled + n_unlabelled else "train"
        ds.add_case(f"case{n:03d}", {"ct": image}, mask=labels if labelled else None, split=split,
                    truth={"mask": labels})
    return ds


# ----------------------------------------------------------------------------- the paper's pieces


def test_disagreement_region_is_exactly_where_the_argmaxes_differ():
    g = torch.Generator().manual_seed(0)
    for classes in (2, 3):
        p1 = torch.softmax(torch.randn(2, classes, 5, 6, 7, generator=g), dim=1)
        p2 = torch.softmax(torch.randn(2, classes, 5, 6, 7, generator=g), dim=1)
        region = sdnet.disagreement_region(p1, p2)
        assert region.shape == (2, 1, 5, 6, 7) and region.dtype == torch.bool
        expected = p1.argmax(1, keepdim=True) != p2.argmax(1, keepdim=True)
        assert torch.equal(region, expected)
        assert 0 < int(region.sum()) < region.numel()
    same = torch.softmax(torch.randn(1, 2, 4, 4, 4, generator=g), dim=1)
    assert not sdnet.disagreement_region(same, same * 0.5).any()     # same argmax: no region
    flipped = same.clone()
    flipped[0, :, 1, 2, 3] = same[0, :, 1, 2, 3].flip(0)          # swap the two classes at one voxel
    region = sdnet.disagreement_region(same, flipped)
    assert int(region.sum()) == 1 and bool(region[0, 0, 1, 2, 3])


def test_disagreement_mse_only_sees_the_region():
    g = torch.Generator().manual_seed(1)
    prob = torch.softmax(torch.randn(2, 2, 4, 4, 4, generator=g), dim=1).requires_grad_(True)
    target = sdnet.one_hot(torch.randint(0, 2, (2, 1, 4, 4, 4), generator=g))
    region = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    region[0, 0, :2] = True
    loss = sdnet.disagreement_mse(prob, target, region)
    manual = ((prob - target) ** 2)[region.expand_as(prob)].mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    assert torch.all(prob.grad[region.expand_as(prob).logical_not()] == 0)      # nothing outside the region
    assert prob.grad[region.expand_as(prob)].abs().sum() > 0
    empty = sdnet.disagreement_mse(prob, target, torch.zeros_like(region))
    assert float(empty.detach()) == 0.0
    # the weighted-CE ablation is also confined to the region and balanced over its classes
    logits = torch.randn(2, 2, 4, 4, 4, generator=g, requires_grad=True)
    wce = sdnet.disagreement_wce(logits, target, region)
    assert torch.isfinite(wce) and float(wce.detach()) > 0
    wce.backward()
    assert torch.all(logits.grad[region.expand_as(logits).logical_not()] == 0)
    assert float(sdnet.disagreement_wce(logits, target, torch.zeros_like(region)).detach()) == 0.0


def test_supervised_loss_is_ce_plus_dice_plus_region_term():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 6, 6, 6, generator=g)
    labels = torch.randint(0, 2, (2, 1, 6, 6, 6), generator=g)
    region = torch.rand(2, 1, 6, 6, 6, generator=g) > 0.7
    base, parts0 = sdnet.supervised_loss(logits, labels, None)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0])
    assert abs(float(base) - (float(ce) + float(sdnet.dice_loss(logits, labels)))) < 1e-5
    full, parts = sdnet.supervised_loss(logits, labels, region, "mse", weight=2.0)
    mse = sdnet.disagreement_mse(torch.softmax(logits, 1), sdnet.one_hot(labels), region)
    assert abs(float(full) - (float(base) + 2.0 * float(mse))) < 1e-5
    assert parts["region"] == pytest.approx(float(mse))
    with pytest.raises(ValueError):
        sdnet.supervised_loss(logits, labels, region, "nosuch")


def test_sharpen_with_T_0_1_pushes_probabilities_to_0_and_1():
    p1 = torch.tensor([0.05, 0.3, 0.45, 0.5, 0.55, 0.6, 0.9, 0.999])
    p = torch.stack([1 - p1, p1])[None]                    # (1, 2, 8): background, liver
    s = sdnet.sharpen(p, T=0.1)
    expected = p1 ** 10 / (p1 ** 10 + (1 - p1) ** 10)      # Algorithm 1, line 11
    assert torch.allclose(s[0, 1], expected, atol=1e-6)
    assert torch.allclose(s.sum(1), torch.ones(1, 8))
    assert torch.all((s[0, 1] - 0.5).abs() >= (p1 - 0.5).abs() - 1e-7)
    assert float(s[0, 1, 5]) > 0.98 and float(s[0, 1, 1]) < 0.01          # 0.6 -> 0.983, 0.3 -> 0.0002
    assert float(s[0, 1, 3]) == pytest.approx(0.5)                         # undecided stays undecided
    assert torch.equal(s.argmax(1), p.argmax(1))                           # the decision is unchanged
    # higher temperature sharpens less; an extreme probability does not underflow to NaN
    assert float(sdnet.sharpen(p, T=0.5)[0, 1, 5]) < float(s[0, 1, 5])
    assert torch.isfinite(sdnet.sharpen(torch.tensor([[[0.0], [1.0]]]), 0.1)).all()


class FixedNet(nn.Module):
    """Returns preset logits (plus a trainable offset, so optimisers have something to step)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.offset = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits + self.offset


def test_teacher_is_the_network_with_the_lower_labelled_dice_loss():
    assert sdnet.pick_teacher(0.2, 0.5) == 0 and sdnet.pick_teacher(0.5, 0.2) == 1
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[:, :, 2:6, 2:6, 2:6] = 1
    good_l = (sdnet.one_hot(labels) * 8 - 4)                        # confident and right
    bad_l = torch.randn(2, 2, 8, 8, 8, generator=g)                # noise
    u_good, u_bad = torch.randn(2, 2, 8, 8, 8, generator=g), torch.randn(2, 2, 8, 8, 8, generator=g)
    assert float(sdnet.dice_loss(good_l, labels)) < float(sdnet.dice_loss(bad_l, labels))
    x_l, x_u = torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8)
    cfg = dict(sdnet.DEFAULTS)
    for good_name in ("vnet", "resvnet"):
        logits = {good_name: torch.cat([good_l, u_good])}
        bad_name = "resvnet" if good_name == "vnet" else "vnet"
        logits[bad_name] = torch.cat([bad_l, u_bad])
        nets = {k: FixedNet(v) for k, v in logits.items()}
        opts = {k: torch.optim.SGD(n.parameters(), lr=0.0) for k, n in nets.items()}
        info = sdnet.sdnet_step(nets, opts, x_l, labels, x_u, cfg)
        assert info["teacher"] == good_name
        # the student learns from the teacher's sharpened unlabelled prediction (Eq. 8)
        pseudo = sdnet.sharpen(torch.softmax(logits[good_name][2:], 1), 0.1)
        expected = torch.mean((torch.softmax(logits[bad_name][2:], 1) - pseudo) ** 2)
        assert info["unsup"] == pytest.approx(float(expected), rel=1e-5)
        assert info["dice_" + good_name] < info["dice_" + bad_name]


# ----------------------------------------------------------------------------- networks


def test_vnet_from_monai_blocks_matches_monai_vnet_and_both_nets_run():
    ours = {k: tuple(v.shape) for k, v in VNet(1, 2, base=16, depth=4, dropout=0.5).state_dict().items()}
    monai = sorted(tuple(v.shape) for v in MonaiVNet(3, 1, 2).state_dict().values())
    assert sorted(ours.values()) == monai                       # same layers, same sizes
    x = torch.randn(1, 1, 16, 16, 16)
    for net in (VNet(1, 2, base=4, depth=3), ResVNet(1, 2, base=4, depth=3), VNet(1, 2, base=2, depth=2)):
        assert net(x).shape == (1, 2, 16, 16, 16)


def test_a_few_sdnet_steps_lower_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [blob_case(rng, (16, 16, 16)) for _ in range(4)]
    x = torch.from_numpy(np.stack([window(c[0].array, (-200, 200)) for c in cases])[:, None])
    y = torch.from_numpy(np.stack([(c[1].array >= 1) for c in cases])[:, None].astype(np.int64))
    nets = {"vnet": VNet(1, 2, base=2, depth=2), "resvnet": ResVNet(1, 2, base=4, depth=2)}
    opts = {k: torch.optim.Adam(n.parameters(), lr=0.01) for k, n in nets.items()}
    cfg = dict(sdnet.DEFAULTS)
    losses = [sdnet.sdnet_step(nets, opts, x[:2], y[:2], x[2:], cfg) for _ in range(12)]
    first, last = losses[0], losses[-1]
    assert last["sup_vnet"] < first["sup_vnet"] and last["sup_resvnet"] < first["sup_resvnet"]
    assert np.mean([s["loss"] for s in losses[-3:]]) < 0.8 * first["loss"]
    assert all(s["teacher"] in ("vnet", "resvnet") and s["unsup"] is not None for s in losses)


# ----------------------------------------------------------------------------- train / segment / resume


def test_train_save_load_segment_round_trip(tmp_path):
    ds = make_store(tmp_path / "ds", n_labelled=2, n_unlabelled=2, n_val=1)
    progress = Progress("none")
    out = sdnet.train(ds, tmp_path / "model", {**TINY, "steps": 3}, "cpu", progress)
    meta = json.loads((out / "model.json").read_text())
    assert meta["recipe"] == "sdnet" and meta["labels"] == {"background": 0, "liver": 1}
    assert "tumour" in meta["labels_note"]
    assert meta["input"]["spacing_mm"] == [4.0, 4.0, 4.0] and meta["input"]["phases"] == ["ct"]
    assert {k: v["class"] for k, v in meta["networks"].items()} == {"vnet": "VNet", "resvnet": "ResVNet"}
    assert meta["training"]["data"]["labelled"] == ["case000", "case001"]
    assert meta["training"]["data"]["unlabelled"] == ["case002", "case003"]
    assert len(meta["training"]["curves"]["sdnet"]) == 3 and sum(meta["training"]["teacher_counts"].values()) == 3
    assert "dice_per_case" in meta["metrics"]["val"]["summary"]["liver"]
    assert not (out / "checkpoint").exists()
    assert [e["stage"] for e in progress.history if e["stage"] == "sdnet"] == ["sdnet"] * 3

    model = load_model(out)
    image = ds.read_image("case000")                        # the anisotropic 2 x 2 x 4 mm case
    result = sdnet.segment(model, {"ct": image})
    assert result.labels.same_grid(image) and result.labels.array.dtype == np.uint8
    assert set(np.unique(result.labels.array)) <= {0, 1}
    p = result.probabilities.array
    assert p.dtype == np.float32 and p.shape == image.array.shape and p.min() >= 0 and p.max() <= 1
    u = result.uncertainty.array
    assert u.min() >= 0 and u.max() <= 1 + 1e-6
    assert np.allclose(u, sdnet.binary_entropy(p))
    raw = sdnet.segment(model, {"ct": image}, do_postprocess=False).labels.array
    assert np.array_equal(raw, (p >= 0.5).astype(np.uint8))
    # the same weights in memory give the same probabilities; liver_mask serves other recipes
    again = sdnet.segment(load_model(out), {"other": image})
    assert np.array_equal(again.probabilities.array, p)
    assert np.array_equal(sdnet.liver_mask(out, image).array, result.labels.array)
    assert np.array_equal(sdnet.liver_mask(model, image).array, result.labels.array)
    one = sdnet.segment(model, {"ct": image}, member="vnet").probabilities.array
    assert one.shape == p.shape and not np.array_equal(one, p)

    # a model folder that is not sdnet is refused by liver_mask; an existing model is not overwritten
    model.meta["recipe"] = "o2l"
    with pytest.raises(ModelError, match="sdnet"):
        sdnet.liver_mask(model, image)
    with pytest.raises(InputError, match="already holds a model"):
        sdnet.train(ds, out, {**TINY, "steps": 1}, "cpu", progress)


class CancelAt(Progress):
    def __init__(self, step):
        super().__init__("none")
        self.at = step

    def update(self, stage, step, total, **fields):
        super().update(stage, step, total, **fields)
        if stage == "sdnet" and step == self.at:
            self.cancelled = True


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    ds = make_store(tmp_path / "ds", n_labelled=2, n_unlabelled=1)
    cfg = {**TINY, "steps": 5, "checkpoint_every": 2}
    whole = sdnet.train(ds, tmp_path / "whole", cfg, "cpu", Progress("none"))
    with pytest.raises(Cancelled):
        sdnet.train(ds, tmp_path / "cut", cfg, "cpu", CancelAt(3))
    assert (tmp_path / "cut" / "checkpoint" / "checkpoint.json").is_file()
    assert not (tmp_path / "cut" / "model.json").exists()
    with pytest.raises(InputError, match="--resume"):
        sdnet.train(ds, tmp_path / "cut", cfg, "cpu", Progress("none"))
    with pytest.raises(InputError, match="differs"):
        sdnet.train(ds, tmp_path / "cut", {**cfg, "lr": 0.02}, "cpu", Progress("none"), resume=True)
    resumed = sdnet.train(ds, tmp_path / "cut", cfg, "cpu", Progress("none"), resume=True)
    a, b = load_model(whole), load_model(resumed)
    for name in ("vnet", "resvnet"):
        sa, sb = a.networks[name].state_dict(), b.networks[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    curve_a = json.loads((whole / "model.json").read_text())["training"]["curves"]["sdnet"]
    curve_b = json.loads((resumed / "model.json").read_text())["training"]["curves"]["sdnet"]
    assert curve_a == curve_b


def test_baseline_vnet_and_init_from_a_model(tmp_path):
    ds = make_store(tmp_path / "ds", n_labelled=1, n_unlabelled=1)
    base = sdnet.train(ds, tmp_path / "vnet", {**TINY, "steps": 2, "method": "vnet"}, "cpu", Progress("none"))
    meta = json.loads((base / "model.json").read_text())
    assert list(meta["networks"]) == ["vnet"] and meta["training"]["data"]["unlabelled"] == []
    assert meta["input"]["inference"] == "vnet"
    assert sdnet.segment(load_model(base), {"ct": ds.read_image("case001")}).labels.array.dtype == np.uint8
    first = sdnet.train(ds, tmp_path / "m1", {**TINY, "steps": 2}, "cpu", Progress("none"))
    tuned = sdnet.train(ds, tmp_path / "m2", {**TINY, "steps": 1, "lr": 1e-9}, "cpu", Progress("none"), init=first)
    w1 = load_model(first).networks["resvnet"].state_dict()
    w2 = load_model(tuned).networks["resvnet"].state_dict()
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1 if "running" not in k)
    with pytest.raises(InputError, match="spacing"):
        sdnet.train(ds, tmp_path / "m3", {**TINY, "steps": 1, "spacing_mm": [3.0, 3.0, 3.0]}, "cpu",
                    Progress("none"), init=first)


def test_bad_config_and_data_are_input_errors(tmp_path):
    ds = make_store(tmp_path / "ds", n_labelled=0, n_unlabelled=1)
    with pytest.raises(InputError, match="no labelled case"):
        sdnet.train(ds, tmp_path / "m", {**TINY, "steps": 1}, "cpu", Progress("none"))
    for bad, match in (({"nosuch": 1}, "unknown setting 'nosuch'"),
                       ({"disagreement_loss": "l1"}, "disagreement_loss"),
                       ({"patch": [18, 16, 16]}, "multiple of"),
                       ({"networks": {"vnet": {"class": "UNet"}}}, "networks.vnet.class"),
                       ({"temperature": 0}, "temperature")):
        with pytest.raises(InputError, match=match):
            sdnet.resolve_config({**TINY, **bad})
    cfg = sdnet.resolve_config({"steps": 600})
    assert cfg["iterations"] == 600 and cfg["lr_step"] == 100       # the schedule scales with --steps
    assert sdnet.lr_for(0, cfg) == pytest.approx(0.01) and sdnet.lr_for(250, cfg) == pytest.approx(1e-4)


def test_cli_train_and_segment(tmp_path, capsys):
    ds = make_store(tmp_path / "ds", n_labelled=1, n_unlabelled=1)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    code = cli.main(["train", "--dataset", str(ds.root), "--recipe", "sdnet", "--out", str(tmp_path / "m"),
                     "--steps", "2", "--config", str(cfg), "--device", "cpu", "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    code = cli.main(["segment", "--model", str(tmp_path / "m"), "--input", str(ds.root / ds.cases["case001"].images["ct"]),
                     "--out", str(tmp_path / "seg.nii.gz"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "seg.nii.gz").is_file()


def test_working_grid_is_lps_aligned_whatever_the_input_direction():
    rng = np.random.default_rng(5)
    image, labels = blob_case(rng, (12, 16, 20), (2.0, 2.0, 4.0))
    # the same voxels stored the RAS way: x and y axes reversed, origin at the opposite corner
    flip = np.diag([-1.0, -1.0, 1.0])
    far = image.index_to_world([19, 15, 0])
    flipped = Volume(image.array[:, ::-1, ::-1].copy(), image.spacing, tuple(far), flip)
    assert np.allclose(flipped.index_to_world([0, 0, 0]), image.index_to_world([19, 15, 0]))
    w1, g1 = sdnet.image_to_working(image, (4.0, 4.0, 4.0), (-200, 200))
    w2, g2 = sdnet.image_to_working(flipped, (4.0, 4.0, 4.0), (-200, 200))
    assert g1.same_grid(g2) and np.allclose(g1.direction, np.eye(3))
    assert g1.shape_xyz == (10, 8, 12)                       # 40 x 32 x 48 mm field of view at 4 mm
    assert np.allclose(w1, w2, atol=1e-5)
    # the liver probability comes back onto each input's own grid
    back = resample_to(g1.with_array(sdnet.mask_to_working(labels, g1).astype(np.float32)), flipped, "linear")
    assert back.same_grid(flipped)
    agree = ((back.array >= 0.5) == (labels.array[:, ::-1, ::-1] >= 1)).mean()
    assert agree > 0.95
