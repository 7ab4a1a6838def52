"""Recipe litemedsam (issue 21 item 3): per-slice training objects from masks, decoder fine-tuning with
frozen cached embeddings, resume, the model folder as an annotator / segment model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from WeakLiverSegLib import recipes
from WeakLiverSegLib.annotate.annotators import LiteMedSAMAnnotator, load_annotator
from WeakLiverSegLib.annotate.litemedsam import LiteMedSAM
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import Cancelled, InputError
from WeakLiverSegLib.learn.modelstore import load_model, save_model

lms = recipes.get("litemedsam")
TINY = {"input_size": 64, "train_steps": 4, "batch_size": 2, "checkpoint_every": 2, "max_views": 3,
        "encode_batch": 3}


def _phantom(rng, shape=(6, 32, 32)):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 16) / 14) ** 2 + ((x - 16) / 15) ** 2 < 1
    liver = (((y - 14) / 8) ** 2 + ((x - 13) / 9) ** 2 < 1) & (z >= 1) & (z <= 4)
    labels = liver.astype(np.uint8)
    labels[(((y - 14) / 3) ** 2 + ((x - 15) / 3) ** 2 < 1) & (z >= 2) & (z <= 3)] = 2
    hu = np.where(body, 40, -1000) + np.where(labels == 1, 80, 0) + np.where(labels == 2, 20, 0)
    return (hu + rng.normal(0, 5, shape)).astype(np.int16), labels


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    ds = Dataset.create(tmp_path_factory.mktemp("store") / "ds", name="tiny")
    rng = np.random.default_rng(0)
    for n, kind in enumerate(["strong", "strong", "weak"]):
        hu, labels = _phantom(rng)
        geo = dict(spacing=(1.5, 1.5, 3.0), origin=(0, 0, 0))
        ds.add_case(f"c{n}", {"enhanced": Volume(hu, **geo)}, mask=Volume(labels, **geo) if kind == "strong" else None,
                    boxes=boxes_from_mask(labels, 2), liver_box=liver_box_from_mask(labels))
    return ds


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """A randomly initialised LiteMedSAM model folder (no wheel needed)."""
    torch.manual_seed(0)
    meta = {"recipe": "litemedsam", "kind": "annotator", "labels": {"background": 0, "liver": 1, "tumor": 2},
            "input": {"phases": ["ct"], "hu_window": [-160.0, 240.0], "image_size": 256},
            "training": {"fine_tuned": False}, "metrics": {}}
    return save_model(tmp_path_factory.mktemp("init") / "m", meta, {"litemedsam": ("LiteMedSAM", {}, LiteMedSAM())})


def test_slice_items_are_the_liver_and_each_tumour_component_per_slice():
    labels = np.zeros((4, 40, 40), np.uint8)
    labels[1:3, 5:30, 5:30] = 1
    labels[1, 8:12, 8:12] = 2            # two lesions on slice 1, one continues on slice 2
    labels[1, 20:25, 20:25] = 2
    labels[2, 20:26, 20:26] = 2
    items = lms.slice_items("c", labels, crop_min_px=16)
    liver = [it for it in items if it.label == "liver"]
    tumour = [it for it in items if it.label == "tumor"]
    assert [it.k for it in liver] == [1, 2] and liver[0].box_rc == (5, 5, 29, 29)
    assert sorted((it.k, it.box_rc) for it in tumour) == [(1, (8, 8, 11, 11)), (1, (20, 20, 24, 24)),
                                                          (2, (20, 20, 25, 25))]
    # one view per object in 3D (what the annotator encodes for a 3D box), each holding its box
    assert len({it.view for it in tumour}) == 2 and len({it.view for it in liver}) == 1
    for it in items:
        r0, c0, h, w = it.view
        assert it.mask.shape == (h, w)
        if it.label == "liver":
            assert it.mask.sum() == (labels[it.k] >= 1).sum()
        assert r0 <= it.box_rc[0] and it.box_rc[2] < r0 + h and c0 <= it.box_rc[1] and it.box_rc[3] < c0 + w
    whole = lms.slice_items("c", labels, view="slice", objects=["tumor"])
    assert {it.view for it in whole} == {(0, 0, 40, 40)} and len(whole) == 3


def test_train_fine_tunes_only_the_decoder_and_writes_an_annotator_model(store, init_model, tmp_path):
    out = lms.train(store, tmp_path / "m", dict(TINY), "cpu", Progress("none"), init=init_model)
    meta = json.loads((out / "model.json").read_text())
    assert meta["recipe"] == "litemedsam" and meta["networks"]["litemedsam"]["class"] == "LiteMedSAM"
    assert meta["input"]["hu_window"] == [-160.0, 240.0] and meta["input"]["input_size"] == 64
    assert meta["training"]["fine_tuned"] and meta["training"]["trained"] == ["mask_decoder"]
    assert meta["training"]["data"]["strong"] == ["c0", "c1"] and meta["training"]["data"]["encoded_views"] <= 3
    assert len(meta["training"]["curves"]["decoder"]) == 4
    assert not (out / "checkpoint").exists()
    before, after = load_model(init_model).networks["litemedsam"], load_model(out).networks["litemedsam"]
    a, b = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("mask_decoder."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("mask_decoder."))
    ann = load_annotator(out)
    assert isinstance(ann, LiteMedSAMAnnotator) and ann.predictor.input_size == 64
    # the prompt encoder too, when asked
    out2 = lms.train(store, tmp_path / "m2", dict(TINY, train_steps=1, train_prompt_encoder=True), "cpu", None,
                     init=init_model)
    b2 = load_model(out2).networks["litemedsam"].state_dict()
    assert any(not torch.equal(a[k], b2[k]) for k in a if k.startswith("prompt_encoder.") and a[k].is_floating_point())


def test_resume_continues_bit_identically(store, init_model, tmp_path):
    ref = lms.train(store, tmp_path / "ref", dict(TINY), "cpu", Progress("none"), init=init_model)

    class StopAt(Progress):
        def update(self, stage, step, total, **fields):
            super().update(stage, step, total, **fields)
            if stage == "decoder" and step == 3:
                self.cancelled = True

    out = tmp_path / "run"
    with pytest.raises(Cancelled):
        lms.train(store, out, dict(TINY), "cpu", StopAt("none"), init=init_model)
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    with pytest.raises(InputError, match="pass --resume"):
        lms.train(store, out, dict(TINY), "cpu", Progress("none"), init=init_model)
    lms.train(store, out, dict(TINY), "cpu", Progress("none"), resume=True)
    a, b = load_model(ref).networks["litemedsam"].state_dict(), load_model(out).networks["litemedsam"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_and_inputs(store, init_model, tmp_path):
    with pytest.raises(InputError, match="view"):
        lms.train(store, tmp_path / "a", {"view": "cube"}, "cpu", None, init=init_model)
    with pytest.raises(InputError, match="input_size"):
        lms.train(store, tmp_path / "b", {"input_size": 60}, "cpu", None, init=init_model)
    with pytest.raises(InputError, match="unknown|not a"):
        lms.train(store, tmp_path / "c", {"decoder_lr": 1}, "cpu", None, init=init_model)
    o2l_like = tmp_path / "notsam"
    save_model(o2l_like, {"recipe": "o2l", "labels": {}, "input": {}}, {"litemedsam": ("LiteMedSAM", {}, LiteMedSAM())})
    with pytest.raises(InputError, match="not a LiteMedSAM model"):
        lms.train(store, tmp_path / "d", dict(TINY), "cpu", None, init=o2l_like)
    with pytest.raises(InputError, match="from boxes"):
        lms.segment(load_model(init_model), {"ct": store.read_image("c2")})


def test_cli_train_then_segment_and_annotate_with_the_fine_tuned_model(tmp_path, capsys):
    """weakliverseg train --recipe litemedsam (from the pretrained model) -> segment --boxes / annotate --annotator."""
    from WeakLiverSegLib.annotate import convert
    from WeakLiverSegLib.app.cli import main as cli
    from WeakLiverSegLib.data.imageio import read_label_map, write_image

    try:
        pretrained = convert.pretrained_dir(tmp_path / "models")
    except InputError as exc:
        pytest.skip(f"LiteMedSAM weights unavailable: {exc}")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:10, :64, :64]
    img = np.full((10, 64, 64), 40.0) + rng.normal(0, 6, (10, 64, 64))
    img[((y - 32) ** 2 + (x - 32) ** 2) >= 30 ** 2] = -1000
    cyl = ((y - 33) ** 2 + (x - 30) ** 2 < 9 ** 2) & (z >= 3) & (z <= 7)
    img[cyl] = 140 + rng.normal(0, 6, int(cyl.sum()))
    geo = dict(spacing=(0.8, 0.8, 2.0), origin=(0, 0, 0))
    vol = Volume(img.astype(np.int16), **geo)
    ds = Dataset.create(tmp_path / "ds", name="cyl")
    ds.add_case("s", {"ct": vol}, mask=Volume((cyl * 2).astype(np.uint8), **geo))
    out = tmp_path / "ft"
    rc = cli(["train", "--recipe", "litemedsam", "--dataset", str(ds.root), "--out", str(out), "--init", str(pretrained),
              "--progress", "none", "--set", "input_size=128", "--set", "train_steps=2", "--set", "max_views=2",
              "--set", "lr=1e-7", "--set", 'objects=["tumor"]'])
    assert rc == 0, capsys.readouterr().err
    image = tmp_path / "ct.nii.gz"
    write_image(vol, image)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"label": "tumor", "ijk_min": [19, 22, 3], "ijk_max": [41, 44, 7]}]))
    for cmd in (["segment", "--model", str(out)], ["annotate", "--annotator", str(out)]):
        dest = tmp_path / f"{cmd[0]}.nii.gz"
        rc = cli(cmd + ["--input", str(image), "--boxes", str(boxes), "--out", str(dest), "--progress", "none"])
        assert rc == 0, capsys.readouterr().err
        lab = read_label_map(dest).array == 2
        assert 2 * (lab & cyl).sum() / (lab.sum() + cyl.sum()) >= 0.85
