"""The shipped starter model (Resources/models/starter, issue 15): it loads with the model store's
usual checks, ``segment`` without ``--model`` finds it, the Slicer logic uses it by default, and
o2l fine-tunes from it (``train --init``) without extra settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.data.imageio import read_image, write_image
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import InputError, ModelError
from WeakLiverSegLib.learn import modelstore
from WeakLiverSegLib.synth import phantom

STARTER = Path(__file__).resolve().parent.parent / "Resources" / "models" / "starter"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("WLS_STARTER_MODEL", raising=False)


def test_starter_is_shipped_small_and_loads_with_the_store_checks(no_env):
    assert modelstore.starter_model_dir() == STARTER == modelstore.default_model()
    files = sorted(p.name for p in STARTER.iterdir())
    assert files == ["model.json", "student.safetensors"]
    assert sum(p.stat().st_size for p in STARTER.iterdir()) < 20_000_000
    meta = modelstore.read_meta(STARTER)
    assert meta["recipe"] == "o2l" and meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    model = modelstore.load_model(STARTER)
    assert set(model.networks) == {"student"} and not model.networks["student"].needs_boxes
    assert meta["training"]["config"]["student"]["variant"] == "strong_only"


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    case = phantom.generate_case(np.random.default_rng(2), shape=(64, 64, 8), spacing=(5.0, 5.0, 5.0), n_tumors=0)
    return write_image(case["enhanced"], tmp_path_factory.mktemp("ct") / "ct.nii.gz")


def test_segment_without_model_uses_the_starter(no_env, ct_file, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", "--input", str(ct_file), "--out", str(out), "--device", "cpu",
                     "--progress", "none"]) == 0
    labels = read_image(out)
    assert labels.array.shape == read_image(ct_file).array.shape and set(np.unique(labels.array)) <= {0, 1, 2}


def test_segment_without_model_and_without_starter_is_a_clear_error(monkeypatch, ct_file, tmp_path, capsys):
    monkeypatch.setenv("WLS_STARTER_MODEL", str(tmp_path / "nowhere"))
    assert cli.main(["segment", "--input", str(ct_file), "--out", str(tmp_path / "s.nii.gz"),
                     "--progress", "none"]) == 2
    assert "starter model is not installed" in capsys.readouterr().err
    with pytest.raises(ModelError):
        modelstore.default_model()


def test_slicer_logic_segments_with_the_starter_when_no_model_is_selected(no_env, monkeypatch, tmp_path):
    from WeakLiverSegLib.slicer.slicer_logic import WeakLiverSegLogic

    assert WeakLiverSegLogic.default_model_folder() == STARTER and WeakLiverSegLogic.has_default_model()
    argv = WeakLiverSegLogic.build_segment_command(WeakLiverSegLogic.__new__(WeakLiverSegLogic), None,
                                                   "ct.nii", "out.nii.gz")
    assert argv[argv.index("--model") + 1] == str(STARTER)
    monkeypatch.setenv("WLS_STARTER_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="choose a trained model"):
        WeakLiverSegLogic.default_model_folder()
    assert not WeakLiverSegLogic.has_default_model()


def test_o2l_fine_tunes_from_the_starter_without_settings(no_env, tmp_path):
    from WeakLiverSegLib.recipes import o2l

    ds = phantom.generate_cohort(tmp_path / "ds", cases=2, seed=1, shape=(40, 40, 6), spacing=(4.0, 4.0, 8.0),
                                 mix="strong=0.5,box=0.5", healthy_fraction=0.0, tumors=(1, 1))
    cfg = {"crop": 32, "batch_size": 2, "teacher": {"steps": 1}, "student": {"steps": 1}}
    out = o2l.train(ds, tmp_path / "ft", cfg, "cpu", None, init=STARTER)
    meta = json.loads((out / "model.json").read_text())
    start = modelstore.read_meta(STARTER)
    assert meta["input"]["spacing_mm"] == start["input"]["spacing_mm"]        # taken from the starter
    assert meta["networks"]["teacher"]["kwargs"]["attention"] == "o2l"
    tuned = modelstore.load_model(out).networks
    base = modelstore.load_model(STARTER).networks["student"].state_dict()
    key = "encoder.0.conv1.conv.weight"
    for role in ("student", "teacher"):       # both start from the starter's backbone
        assert (tuned[role].state_dict()[key] - base[key]).abs().max() < 0.05
