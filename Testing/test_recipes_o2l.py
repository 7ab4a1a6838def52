"""Recipe o2l: box attention, localization branch, 2.5D data, training, model folders, resume."""

import json
import pickle

import numpy as np
import pytest
import torch

from WeakLiverSegLib.data.boxes import Box
from WeakLiverSegLib.errors import Cancelled, InputError, ModelError
from WeakLiverSegLib.learn.modelstore import load_model, save_model
from WeakLiverSegLib.learn.networks.unet2d import BoxAttention, BoxAttentionUNet2D, ScaleAttention, fold_batchnorm
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.recipes import o2l
from WeakLiverSegLib.learn.slices import (Sampler, box_maps, image_to_working, input_grid_labels, labels_to_working,
                                          lesion_boxes_for_slices, loc_target, resize_slices, slice_groups, window,
                                          working_size)
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume

torch.set_num_threads(1)  # tiny networks; the machine is shared

TINY = {"channels": [4, 8, 8, 8], "crop": 32, "batch_size": 2, "infer_batch": 4, "checkpoint_every": 2,
        "teacher": {"steps": 4}, "student": {"steps": 4}}


def _zero_conv(module):
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- attention


def test_attention_with_zeroed_convs_is_identity_plus_half():
    f = torch.randn(2, 5, 12, 12)
    box = torch.zeros(2, 1, 12, 12)
    box[:, :, 3:8, 3:8] = 1
    att = BoxAttention(1, 5, shortcut=True).eval()
    _zero_conv(att)
    assert torch.allclose(att(f, box), 1.5 * f)
    plain = BoxAttention(1, 5, shortcut=False).eval()
    _zero_conv(plain)
    assert torch.allclose(plain(f, box), 0.5 * f)
    o2l_att = ScaleAttention("o2l", 5).eval()      # organ then lesion: (1 + 0.5) * (1 + 0.5)
    _zero_conv(o2l_att)
    assert torch.allclose(o2l_att(f, torch.cat([box, box], 1)), 2.25 * f)


def test_attention_weights_follow_the_box():
    torch.manual_seed(0)
    att = BoxAttention(1, 6).eval()
    f = torch.ones(1, 6, 24, 24)
    box = torch.zeros(1, 1, 24, 24)
    box[:, :, 8:16, 8:16] = 1
    out = att(f, box)
    # two 3x3 convolutions: the box reaches 2 pixels out, the zero padding 2 pixels in
    inside, outside = out[..., 10:14, 10:14], out[..., 2:6, 2:6]
    assert torch.allclose(inside, inside[..., :1, :1].expand_as(inside), atol=1e-6)
    assert torch.allclose(outside, outside[..., :1, :1].expand_as(outside), atol=1e-6)
    assert (inside[..., 0, 0] - outside[..., 0, 0]).abs().max() > 1e-3
    # no box: the "outside" modulation everywhere (away from the image border)
    empty = att(f, torch.zeros_like(box))[..., 2:-2, 2:-2]
    assert torch.allclose(empty, outside[..., :1, :1].expand_as(empty), atol=1e-6)
    # the features inside the box depend on the box map only near them
    box.requires_grad_(True)
    att(f, box)[..., 10:14, 10:14].sum().backward()
    grad = box.grad[0, 0].abs()
    assert grad[8:16, 8:16].sum() > 0
    grad[8:16, 8:16] = 0
    assert grad.sum() == 0


@pytest.mark.parametrize("attention", ["o2l", "o2l_noshortcut", "multichannel"])
def test_box_input_changes_the_output_only_with_attention(attention):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    boxes = torch.zeros(2, 2, 32, 32)
    boxes[:, 0, 4:28, 4:28] = 1
    boxes[:, 1, 10:16, 10:16] = 1
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention=attention).eval()
    with torch.no_grad():
        for m in net.attn.modules():      # a decided attention, as after training (at init it is ~0.5 everywhere)
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(10)
        a, b = net(x, boxes), net(x, torch.zeros_like(boxes))
    assert a.shape == (2, 3, 32, 32)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs the"):
        net(x)
    plain = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention="none").eval()
    with torch.no_grad():
        assert torch.equal(plain(x, boxes), plain(x, torch.zeros_like(boxes)))
        assert torch.equal(plain(x), plain(x, boxes))


def test_network_handles_sizes_not_divisible_by_16():
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention="o2l", localization=True).eval()
    x, b = torch.rand(1, 3, 37, 45), torch.ones(1, 2, 37, 45)
    seg, loc = net(x, b, with_loc=True)
    assert seg.shape == loc.shape == (1, 3, 37, 45)


def test_folded_batchnorm_gives_the_same_outputs():
    torch.manual_seed(0)
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention="o2l")
    for _ in range(3):                      # non-trivial running statistics
        net(torch.rand(4, 3, 32, 32) * 3, torch.rand(4, 2, 32, 32))
    net.eval()
    fast = fold_batchnorm(net)
    x, b = torch.rand(2, 3, 40, 40), torch.rand(2, 2, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, b), net(x, b), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.encoder.modules())   # the original is untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.encoder.modules())


# ----------------------------------------------------------------------------- localization branch



def test_predict_volume_in_bfloat16_is_close_to_float32():
    torch.manual_seed(0)
    net = BoxAttentionUNet2D(channels=(4, 8, 16, 32), attention="o2l").eval()
    image = np.random.default_rng(0).random((5, 40, 40), dtype=np.float32)
    maps = box_maps(image.shape, (40, 40), Box("liver", (5, 5, 0), (30, 30, 4)), [Box("tumor", (10, 10, 1), (15, 15, 3))])
    p32 = o2l.inference.predict_volume(net, image, maps, batch=2)
    p16 = o2l.inference.predict_volume(net, image, maps, batch=2, dtype=torch.bfloat16)
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16.sum(1), 1, atol=1e-5)
    assert np.abs(p16 - p32).max() < 0.05

def test_localization_branch_only_when_asked_and_does_not_change_segmentation():
    torch.manual_seed(0)
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), localization=True).eval()
    calls = []
    net.loc.register_forward_hook(lambda *args: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        seg = net(x)
        assert calls == []
        seg2, loc = net(x, with_loc=True)
        assert calls == [1]
    assert torch.equal(seg, seg2)
    assert loc.shape == (2, 3, 32, 32)
    # the branch's weights have no influence on the segmentation output
    with torch.no_grad():
        for p in net.loc.parameters():
            p.add_(1.0)
        assert torch.equal(net(x), seg)
    # it is trained by the loss: gradients reach the decoder through it
    net.train()
    net.zero_grad()
    _, loc = net(x, with_loc=True)
    loc.sum().backward()
    assert net.decoder[0].conv_block.conv1.conv.weight.grad.abs().sum() > 0
    assert net.head.conv.conv.weight.grad is None
    student = BoxAttentionUNet2D(channels=(4, 8, 8, 8))
    with pytest.raises(ValueError, match="no localization branch"):
        student(x, with_loc=True)


def test_loc_target_one_hot_from_boxes():
    shape = (3, 10, 12)                      # z, y, x
    liver = Box("liver", (2, 1, 0), (8, 7, 1))
    lesion_2d = Box("tumor", (3, 2, 1), (4, 3, 1))
    lesion_out = Box("tumor", (9, 8, 2), (10, 9, 2))   # outside the liver box: joins the organ map
    maps = box_maps(shape, (10, 12), liver, [lesion_2d, lesion_out])
    assert maps.shape == (3, 2, 10, 12) and maps.dtype == np.uint8
    target = loc_target(maps)
    expect = np.zeros(shape, np.int64)
    expect[0:2, 1:8, 2:9] = 1
    expect[1, 2:4, 3:5] = 2
    expect[2, 8:10, 9:11] = 2
    np.testing.assert_array_equal(target, expect)
    np.testing.assert_array_equal(maps[:, 0] > 0, expect >= 1)
    np.testing.assert_array_equal(maps[:, 1] > 0, expect == 2)


def test_box_maps_on_a_coarser_working_grid():
    # 8 voxels -> 4 pixels: voxels 2..5 are pixels 1..2
    maps = box_maps((1, 8, 8), (4, 4), Box("liver", (2, 2, 0), (5, 5, 0)))
    np.testing.assert_array_equal(np.flatnonzero(maps[0, 0].any(axis=0)), [1, 2])
    # a one-voxel box never vanishes
    maps = box_maps((1, 8, 8), (4, 4), None, [Box("tumor", (3, 3, 0), (3, 3, 0))])
    assert maps[0, 1].sum() == 1


def test_lesion_boxes_prefer_per_slice_boxes():
    b3 = Box("tumor", (2, 2, 1), (6, 6, 3))
    flat = [Box("tumor", (3, 3, k), (5, 5, k)) for k in (1, 2, 3)]
    other3 = Box("tumor", (20, 20, 1), (22, 22, 2))
    chosen = lesion_boxes_for_slices([b3, other3, Box("liver", (0, 0, 0), (30, 30, 5))] + flat)
    assert chosen == flat + [other3]


# ----------------------------------------------------------------------------- 2.5D data


def test_window_groups_and_working_grid():
    hu = np.array([[[-1000, -200, 25, 250, 3000]]], np.int16)
    np.testing.assert_allclose(window(hu)[0, 0], [0, 0, 0.5, 1, 1])
    vol = np.arange(4)[:, None, None] * np.ones((4, 2, 2))
    groups = slice_groups(vol, np.array([0, 3]), 1)
    assert groups.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(groups[0, :, 0, 0], [0, 0, 1])
    np.testing.assert_array_equal(groups[1, :, 0, 0], [2, 3, 3])
    assert working_size((512, 512), (0.743, 0.743), 1.5) == (254, 254)
    assert working_size((96, 96), (1.5, 1.5), 1.5) == (96, 96)
    ct = np.full((2, 40, 60), 25, np.int16)
    work = image_to_working(ct, (0.75, 0.75), 1.5)
    assert work.shape == (2, 20, 30)
    np.testing.assert_allclose(work, 0.5, atol=1e-6)
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, 1:3, 1:3] = 2
    onehot = labels_to_working(labels, (4, 4))
    np.testing.assert_array_equal(onehot.argmax(1), labels)
    np.testing.assert_allclose(labels_to_working(labels, (2, 2)).sum(1), 1, atol=1e-6)



def test_input_grid_labels_are_the_argmax_of_the_resampled_probabilities():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(20, 3, 9, 11)).astype(np.float32)) * 3
    probs = torch.softmax(logits, dim=1).numpy()
    probs[0, :, 0, 0] = [0.25, 0.25, 0.5]       # ties go to the lower class, like argmax
    probs[0, :, 0, 1] = [0.4, 0.3, 0.3]
    probs[0, :, 0, 2] = [0.2, 0.4, 0.4]
    for size in ((9, 11), (40, 37)):
        expected = resize_slices(torch.from_numpy(probs), size).argmax(dim=1).numpy()
        got = input_grid_labels(probs, size)
        assert got.dtype == np.uint8 and got.shape == (20,) + size
        assert (got != expected).mean() < 1e-4       # only float rounding at near-ties may differ
    np.testing.assert_array_equal(input_grid_labels(probs, (9, 11))[0, 0, :3], [2, 0, 1])
    np.testing.assert_array_equal(image_to_working(np.full((3, 8, 8), 25.0), (1, 1), 2.0), 0.5)

def test_sampler_batches_are_consistent():
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 20, 24), np.uint8)
    labels[1:5, 5:15, 4:18] = 1
    labels[2:4, 8:11, 8:11] = 2
    liver, tumors = o2l.mask_boxes(labels)
    from WeakLiverSegLib.learn.slices import PreparedCase
    case = PreparedCase("c", rng.random((6, 20, 24)).astype(np.float32), labels_to_working(labels, (20, 24)),
                        box_maps(labels.shape, (20, 24), liver, tumors))
    sampler = Sampler([case], crop=16, batch_size=3, rng=rng, groups_per_crop=2)
    batch = sampler.sample()
    assert batch["image"].shape == (6, 3, 16, 16)
    assert batch["boxes"].shape == (6, 2, 16, 16)
    assert batch["target"].shape == (6, 3, 16, 16)
    torch.testing.assert_close(batch["target"].sum(1), torch.ones(6, 16, 16), atol=1e-3, rtol=0)
    np.testing.assert_array_equal(batch["loc"].numpy(), loc_target(batch["boxes"].numpy()))
    assert set(np.unique(batch["boxes"].numpy())) <= {0.0, 1.0}


def test_sharpen_pseudo_labels():
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)[:, :, None]
    np.testing.assert_array_equal(o2l.sharpen(probs, 1.0), probs)
    sharp = o2l.sharpen(probs, 0.5)
    np.testing.assert_allclose(sharp.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(sharp.argmax(1), probs.argmax(1))
    assert (sharp.max(1) > probs.max(1)).all()


def test_constrain_to_boxes_keeps_probabilities_normalised():
    rng = np.random.default_rng(1)
    probs = rng.random((2, 3, 6, 6)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    maps = np.zeros((2, 2, 6, 6), np.uint8)
    maps[:, 0, 1:5, 1:5] = 1
    maps[:, 1, 2:3, 2:3] = 1
    out = o2l.constrain_to_boxes(probs, maps)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    assert (out[:, 2][maps[:, 1] == 0] == 0).all()
    assert (out[:, 1:][:, :, maps[0, 0] == 0] == 0).all()


# ----------------------------------------------------------------------------- training


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    from WeakLiverSegLib.learn.training import soft_cross_entropy

    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    target = torch.zeros(4, 3, 32, 32)
    target[:, 0] = 1
    target[:, :, 8:24, 8:24] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    target[:, :, 12:16, 12:16] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    x[:, :, 8:24, 8:24] += 0.5
    boxes = torch.zeros(4, 2, 32, 32)
    boxes[:, 0, 6:26, 6:26] = 1
    boxes[:, 1, 11:17, 11:17] = 1
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention="o2l")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(25):
        loss = soft_cross_entropy(net(x, boxes), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_saved_network_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = BoxAttentionUNet2D(channels=(4, 8, 8, 8), attention="o2l", localization=True)
    net.train()
    net(torch.rand(2, 3, 32, 32), torch.ones(2, 2, 32, 32))     # move the BN running statistics
    net.eval()
    kwargs = {"channels": [4, 8, 8, 8], "attention": "o2l", "localization": True}
    save_model(tmp_path / "m", {"recipe": "o2l", "labels": o2l.LABELS}, {"teacher": (o2l.NETWORK_CLASS, kwargs, net)})
    loaded = load_model(tmp_path / "m").networks["teacher"]
    x, b = torch.rand(1, 3, 40, 40), torch.zeros(1, 2, 40, 40)
    b[:, :, 10:30, 10:30] = 1
    with torch.no_grad():
        assert torch.equal(net(x, b), loaded(x, b))


# ----------------------------------------------------------------------------- the recipe on a tiny store


def _phantom(rng, tumour=True, shape=(8, 32, 32)):
    """A bright liver ellipse (one tumour) in a body; returns (HU image, labels)."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 16) / 14) ** 2 + ((x - 16) / 15) ** 2 < 1
    cy, cx = 14 + rng.integers(-2, 3), 12 + rng.integers(-2, 3)
    liver = (((y - cy) / 8) ** 2 + ((x - cx) / 9) ** 2 < 1) & (z >= 1) & (z <= 6)
    labels = liver.astype(np.uint8)
    if tumour:
        labels[(((y - cy) / 3) ** 2 + ((x - cx - 2) / 3) ** 2 < 1) & (z >= 2) & (z <= 4)] = 2
    hu = np.where(body, 40, -1000) + np.where(labels == 1, 80, 0) + np.where(labels == 2, 20, 0)
    hu = hu + rng.normal(0, 5, shape)
    return hu.astype(np.int16), labels


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask

    root = tmp_path_factory.mktemp("store") / "ds"
    ds = Dataset.create(root, name="tiny")
    rng = np.random.default_rng(0)
    for n, kind in enumerate(["strong", "strong", "weak", "weak", "val"]):
        hu, labels = _phantom(rng)
        geo = dict(spacing=(1.5, 1.5, 3.0), origin=(0, 0, 0))
        lab = Volume(labels, **geo)
        boxes = boxes_from_mask(labels, 2) + boxes_from_mask(labels, 2, per_slice=True)
        ds.add_case(f"c{n}", {"enhanced": Volume(hu, **geo)}, mask=lab if kind != "weak" else None,
                    boxes=boxes, liver_box=liver_box_from_mask(labels), split="val" if kind == "val" else "train",
                    truth={"mask": lab})
    return ds


@pytest.fixture(scope="module")
def tiny_model(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    return o2l.train(tiny_store, out, dict(TINY), "cpu", Progress("none"))


def test_train_writes_a_complete_model_folder(tiny_model, tiny_store):
    meta = json.loads((tiny_model / "model.json").read_text())
    assert meta["format"] == "weakliverseg-model" and meta["recipe"] == "o2l"
    assert set(meta["networks"]) == {"student", "teacher"}
    assert meta["networks"]["teacher"]["kwargs"]["attention"] == "o2l"
    assert meta["networks"]["student"]["kwargs"]["localization"] is True
    assert meta["input"]["hu_window"] == [-200.0, 250.0] and meta["input"]["spacing_mm"] == [1.5, 1.5]
    assert meta["input"]["phases"] == ["enhanced"] and meta["input"]["context_slices"] == 1
    assert meta["training"]["data"]["strong"] == ["c0", "c1"] and meta["training"]["data"]["weak"] == ["c2", "c3"]
    assert meta["training"]["steps"] == {"teacher": 4, "student": 4}
    assert len(meta["training"]["curves"]["teacher"]) == 4
    assert set(meta["metrics"]["val"]["summary"]) == {"liver", "tumor"}
    assert not (tiny_model / "checkpoint").exists()
    assert sorted(p.name for p in tiny_model.iterdir()) == ["model.json", "student.safetensors", "teacher.safetensors"]


def test_segment_returns_maps_on_the_input_grid(tiny_model, tiny_store):
    model = load_model(tiny_model)
    image = tiny_store.read_image("c4")
    res = o2l.segment(model, {"enhanced": image})
    assert res.labels.same_grid(image) and res.labels.array.dtype == np.uint8
    assert set(np.unique(res.labels.array)) <= {0, 1, 2}
    for vol in (res.probabilities, res.uncertainty):
        assert vol.same_grid(image) and vol.array.dtype == np.float32
    assert 0 <= res.probabilities.array.min() and res.probabilities.array.max() <= 1
    assert 0 <= res.uncertainty.array.min() and res.uncertainty.array.max() <= np.log(3) + 1e-5
    again = o2l.segment(load_model(tiny_model), {"ct": image})     # a reload gives the same result
    np.testing.assert_array_equal(again.probabilities.array, res.probabilities.array)
    # the teacher runs when boxes are given; it needs a liver box
    case = tiny_store.cases["c2"]
    t = o2l.segment(model, {"enhanced": image}, boxes=[case.liver_box] + case.boxes)
    assert not np.array_equal(t.probabilities.array, res.probabilities.array)
    with pytest.raises(InputError, match="needs a liver box"):
        o2l.segment(model, {"enhanced": image}, boxes=list(case.boxes))


def test_segment_resamples_a_finer_image(tiny_model):
    rng = np.random.default_rng(5)
    hu, _ = _phantom(rng, shape=(6, 64, 64))
    image = Volume(hu, spacing=(0.75, 0.75, 3.0))
    res = o2l.segment(load_model(tiny_model), {"ct": image})
    assert res.labels.array.shape == (6, 64, 64) and res.labels.same_grid(image)


def test_pseudo_writes_a_trainable_store(tiny_model, tiny_store, tmp_path):
    out = o2l.pseudo(load_model(tiny_model), tiny_store, tmp_path / "pseudo", "cpu", Progress("none"))
    ds = Dataset.load(out)
    assert list(ds.cases) == list(tiny_store.cases)
    for cid in ("c2", "c3"):
        mask = ds.read_mask(cid)
        assert mask is not None and mask.same_grid(tiny_store.read_image(cid))
        for key in ("tumor", "liver"):
            assert (out / "pseudo" / f"{cid}_{key}_prob.nii.gz").is_file()
    np.testing.assert_array_equal(ds.read_mask("c0").array, tiny_store.read_mask("c0").array)
    assert ds.cases["c2"].boxes == tiny_store.cases["c2"].boxes
    with pytest.raises(InputError, match="already exists"):
        o2l.pseudo(load_model(tiny_model), tiny_store, tmp_path / "pseudo", "cpu", None)


def test_resume_continues_from_the_checkpoint(tiny_store, tmp_path):
    ref = o2l.train(tiny_store, tmp_path / "ref", dict(TINY), "cpu", Progress("none"))

    class StopAt(Progress):
        def update(self, stage, step, total, **fields):
            super().update(stage, step, total, **fields)
            if stage == "student" and step == 3:
                self.cancelled = True

    out = tmp_path / "run"
    with pytest.raises(Cancelled):
        o2l.train(tiny_store, out, dict(TINY), "cpu", StopAt("none"))
    state = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert (state["stage"], state["step"]) == ("student", 2)
    with pytest.raises(InputError, match="pass --resume"):
        o2l.train(tiny_store, out, dict(TINY), "cpu", Progress("none"))
    with pytest.raises(InputError, match="different settings"):
        o2l.train(tiny_store, out, dict(TINY, seed=7), "cpu", Progress("none"), resume=True)
    o2l.train(tiny_store, out, dict(TINY), "cpu", Progress("none"), resume=True)
    a, b = load_model(ref), load_model(out)
    for name in ("teacher", "student"):
        for (k, va), vb in zip(a.networks[name].state_dict().items(), b.networks[name].state_dict().values()):
            assert torch.equal(va, vb), f"{name}.{k}"
    meta = json.loads((out / "model.json").read_text())
    assert len(meta["training"]["curves"]["student"]) == 4
    with pytest.raises(InputError, match="already holds a model"):
        o2l.train(tiny_store, out, dict(TINY), "cpu", Progress("none"))
    with pytest.raises(InputError, match="no checkpoint to resume"):
        o2l.train(tiny_store, tmp_path / "empty", dict(TINY), "cpu", Progress("none"), resume=True)


def test_init_fine_tunes_from_an_earlier_model(tiny_model, tiny_store, tmp_path):
    cfg = dict(TINY, teacher={"steps": 1}, student={"steps": 1})
    out = o2l.train(tiny_store, tmp_path / "ft", cfg, "cpu", Progress("none"), init=tiny_model)
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["init"] == str(tiny_model)
    # one step of fine-tuning stays close to the initial weights; a fresh start does not
    base = load_model(tiny_model).networks["student"].state_dict()
    tuned = load_model(out).networks["student"].state_dict()
    fresh = BoxAttentionUNet2D(**meta["networks"]["student"]["kwargs"]).state_dict()
    key = "encoder.0.conv1.conv.weight"
    assert (tuned[key] - base[key]).abs().max() < (fresh[key] - base[key]).abs().max()
    with pytest.raises(InputError, match="spacing"):
        o2l.train(tiny_store, tmp_path / "ft2", dict(cfg, spacing_mm=2.0), "cpu", None, init=tiny_model)
    # a variant without the localization branch fine-tunes from a student that has one
    nolocal = dict(cfg, student={"steps": 1, "variant": "mixed"})
    meta = json.loads((o2l.train(tiny_store, tmp_path / "ft3", nolocal, "cpu", None, init=tiny_model)
                       / "model.json").read_text())
    assert meta["networks"]["student"]["kwargs"]["localization"] is False


def test_ablation_variants_and_config_errors(tiny_store, tmp_path):
    cfg = dict(TINY, teacher={"steps": 2, "attention": "multichannel"}, student={"steps": 2, "variant": "mixed"})
    meta = json.loads((o2l.train(tiny_store, tmp_path / "a", cfg, "cpu", None) / "model.json").read_text())
    assert meta["networks"]["teacher"]["kwargs"]["attention"] == "multichannel"
    assert meta["networks"]["student"]["kwargs"]["localization"] is False
    full = dict(TINY, student={"steps": 2, "variant": "full"})
    meta = json.loads((o2l.train(tiny_store, tmp_path / "f", full, "cpu", None) / "model.json").read_text())
    assert set(meta["networks"]) == {"student"}               # no teacher needed for the upper bound
    assert meta["training"]["data"]["weak"] == ["c2", "c3"]
    with pytest.raises(InputError, match="bn_recalibration"):
        o2l.resolve_config({"student": {"bn_recalibration": -1}})
    with pytest.raises(InputError, match="teacher.attention"):
        o2l.train(tiny_store, tmp_path / "x", {"teacher": {"attention": "soft"}}, "cpu", None)
    with pytest.raises(InputError, match="unknown setting"):
        o2l.train(tiny_store, tmp_path / "x", {"studnet": {}}, "cpu", None)
    with pytest.raises(InputError, match="unknown optimizer"):
        o2l.train(tiny_store, tmp_path / "x", dict(TINY, teacher={"optimizer": "rmsprop"}), "cpu", None)


# ----------------------------------------------------------------------------- foreign / corrupt model folders


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickle_renamed_safetensors_fails_naming_the_file(tiny_model, tmp_path):
    bad = _copy_model(tiny_model, tmp_path / "bad")
    (bad / "student.safetensors").write_bytes(pickle.dumps({"encoder.0.weight": [0.0] * 10}))
    with pytest.raises(ModelError, match=r"student\.safetensors: not a valid safetensors file"):
        load_model(bad)


def test_wrong_format_or_class_in_model_json_fails(tiny_model, tmp_path):
    bad = _copy_model(tiny_model, tmp_path / "fmt")
    meta = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps(dict(meta, format="other-tool")))
    with pytest.raises(ModelError, match=r"model\.json: not a WeakLiverSeg model"):
        load_model(bad)
    meta["networks"]["student"]["class"] = "os.system"
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"model\.json networks\.student: unknown network class 'os\.system'"):
        load_model(bad)
    meta["networks"]["student"]["class"] = o2l.NETWORK_CLASS
    meta["networks"]["student"]["kwargs"]["channels"] = [8, 8, 8, 8]
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"student\.safetensors: weights do not fit"):
        load_model(bad)


# ----------------------------------------------------------------------------- box annotators as pseudo-labellers


def test_stack_slice_boxes_makes_one_3d_box_per_lesion():
    from WeakLiverSegLib.learn.slices import stack_slice_boxes

    flat = [Box("tumor", (2, 2, 1), (5, 5, 1)), Box("tumor", (3, 2, 2), (6, 6, 2)),     # lesion A, slices 1-2
            Box("tumor", (20, 20, 2), (24, 24, 2)),                                      # lesion B
            Box("tumor", (2, 2, 5), (5, 5, 5))]                                          # A's column, but a gap
    out = stack_slice_boxes(flat)
    assert sorted((b.ijk_min, b.ijk_max) for b in out) == [((2, 2, 1), (6, 6, 2)), ((2, 2, 5), (5, 5, 5)),
                                                           ((20, 20, 2), (24, 24, 2))]
    solid = Box("tumor", (0, 0, 0), (8, 8, 3))
    out = stack_slice_boxes(flat + [solid])         # a given 3D box covers lesion A's 2D boxes
    assert out[0] == solid and sorted(b.ijk_min for b in out[1:]) == [(2, 2, 5), (20, 20, 2)]


def test_annotate_case_clips_tumour_to_the_per_slice_boxes(tiny_store):
    from WeakLiverSegLib.annotate.annotators import FillAnnotator
    from WeakLiverSegLib.data.boxes import box_mask
    from WeakLiverSegLib.learn.slices import annotate_case

    case = tiny_store.cases["c2"]
    per_slice = [b for b in case.boxes if b.is_2d]
    image = tiny_store.read_image("c2")
    labels = annotate_case(FillAnnotator(), image, case.liver_box, per_slice)
    np.testing.assert_array_equal(labels == 2, box_mask(labels.shape, per_slice))
    np.testing.assert_array_equal(labels >= 1, box_mask(labels.shape, [case.liver_box] + per_slice))


class _FillSam:
    """A LiteMedSAM stand-in: box filling (fast), with the probabilities the fused annotator reads."""

    def __init__(self):
        from WeakLiverSegLib.annotate.annotators import FillAnnotator

        self.fill, self.calls, self.probabilities, self.name = FillAnnotator(), [], None, "litemedsam"

    def annotate(self, image, boxes, progress=None, image_key=None, keep_probabilities=False):
        self.calls.append((image_key, len(boxes)))
        res = self.fill.annotate(image, boxes)
        self.probabilities = (res.labels.array == 2).astype(np.float16) if keep_probabilities else None
        return res


@pytest.mark.parametrize("annotator", ["litemedsam", "fused"])
def test_teacher_annotator_pseudo_labels_the_weak_cases(tiny_store, tmp_path, monkeypatch, annotator):
    from WeakLiverSegLib.annotate import annotators

    stub = _FillSam()
    monkeypatch.setattr(annotators, "LiteMedSAMAnnotator", _FillSam)      # the type check in o2l accepts the stub
    monkeypatch.setattr(annotators, "load_annotator", lambda spec, device="cpu": stub)
    seen = {}
    real = o2l.training.labels_to_working

    def spy(labels, size):
        seen[len(seen)] = labels.copy()
        return real(labels, size)

    monkeypatch.setattr(o2l.training, "labels_to_working", spy)
    cfg = dict(TINY, teacher={"steps": 2, "annotator": annotator}, student={"steps": 2})
    out = o2l.train(tiny_store, tmp_path / annotator, cfg, "cpu", Progress("none"))
    assert [k for k, _ in stub.calls] == ["c2", "c3"]                       # the weak cases, once each
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["config"]["teacher"]["annotator"] == annotator
    # strong cases' targets come from their masks (2 calls), then one pseudo-label per weak case
    from WeakLiverSegLib.data.boxes import box_mask

    pseudo = list(seen.values())[-2:]
    for labels, cid in zip(pseudo, ("c2", "c3")):
        case = tiny_store.cases[cid]
        tumour_boxes = box_mask(labels.shape, [b for b in case.boxes])
        assert set(np.unique(labels)) <= {0, 1, 2} and not (labels == 2)[~tumour_boxes].any()
        if annotator == "litemedsam":      # box filling: exactly the boxes
            np.testing.assert_array_equal(labels == 2, tumour_boxes)
    # the model's pseudo command labels with the same annotator
    stub.calls.clear()
    ds = Dataset.load(o2l.pseudo(load_model(out), tiny_store, tmp_path / "pseudo", "cpu", None))
    assert [k for k, _ in stub.calls] == ["c2", "c3"]
    for cid in ("c2", "c3"):
        mask = ds.read_mask(cid).array
        if annotator == "litemedsam":
            np.testing.assert_array_equal(mask == 2, box_mask(mask.shape, tiny_store.cases[cid].boxes))


def test_teacher_annotator_setting_is_checked(tiny_store, tmp_path):
    with pytest.raises(InputError, match="teacher.annotator 'sam2'"):
        o2l.train(tiny_store, tmp_path / "x", dict(TINY, teacher={"annotator": "sam2"}), "cpu", None)
