"""Shared training helpers: device choice, losses, schedule, checkpoints (safetensors + JSON)."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from WeakLiverSegLib.errors import Cancelled, InputError
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.learn.training import (PRECISION_ENV, Checkpointer, LazySegmentResult, check_cancelled,
                                            inference_dtype, lr_at, make_optimizer, scale_steps, select_device,
                                            soft_cross_entropy)

torch.set_num_threads(1)  # tiny tensors; the machine is shared


def test_select_device():
    assert select_device("cpu") == "cpu"
    assert select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="expected auto, cpu, cuda"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: CUDA was asked for but is not available"):
            select_device("cuda")
        with pytest.raises(InputError, match="not available"):
            select_device("cuda:1")


def test_inference_dtype(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_dtype("cpu", "float32") == torch.float32
    assert inference_dtype("cpu", "bfloat16") == torch.bfloat16
    assert inference_dtype("cuda") == torch.float32          # auto: bfloat16 only on a CPU with AMX
    assert inference_dtype("cpu") in (torch.float32, torch.bfloat16)
    monkeypatch.setenv(PRECISION_ENV, "float32")             # segment --precision float32
    assert inference_dtype("cpu") == torch.float32
    assert inference_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(InputError, match="--precision 'half'"):
        inference_dtype("cpu", "half")


def test_lazy_segment_result_makes_its_maps_once():
    calls = []
    res = LazySegmentResult("labels", lambda: calls.append(1) or ("p", "u"))
    assert res.labels == "labels" and not calls
    assert (res.probabilities, res.uncertainty, res.probabilities) == ("p", "u", "p") and calls == [1]

def test_soft_cross_entropy_matches_hard_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    labels = torch.randint(0, 3, (2, 5, 4))
    onehot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels), atol=1e-6)
    w = torch.tensor([0.1, 0.1, 1.0])
    assert torch.allclose(soft_cross_entropy(logits, onehot, w), F.cross_entropy(logits, labels, weight=w), atol=1e-6)
    # a soft target is the mixture of the hard losses
    soft = 0.3 * onehot + 0.7 * F.one_hot((labels + 1) % 3, 3).permute(0, 3, 1, 2).float()
    expect = 0.3 * F.cross_entropy(logits, labels) + 0.7 * F.cross_entropy(logits, (labels + 1) % 3)
    assert torch.allclose(soft_cross_entropy(logits, soft), expect, atol=1e-6)


def test_lr_schedule_and_step_scaling():
    cfg = {"lr": 1e-3, "lr_decay_start": 0.75, "lr_decay": 0.95}
    assert lr_at(0, 100, cfg) == lr_at(74, 100, cfg) == 1e-3
    assert lr_at(75, 100, cfg) == pytest.approx(1e-3 * 0.95)
    assert lr_at(99, 100, cfg) == pytest.approx(1e-3 * 0.95 ** 25)
    assert lr_at(50, 100, {"lr": 0.01}) == 0.01
    assert scale_steps({"teacher": 300, "student": 300}, None) == {"teacher": 300, "student": 300}
    assert scale_steps({"teacher": 300, "student": 100}, 40) == {"teacher": 30, "student": 10}
    assert scale_steps({"teacher": 300, "student": 300}, 1) == {"teacher": 1, "student": 1}
    with pytest.raises(InputError, match="steps must be positive"):
        scale_steps({"a": 1}, 0)
    with pytest.raises(InputError, match="unknown optimizer"):
        make_optimizer(torch.nn.Linear(2, 2).parameters(), {"optimizer": "lbfgs", "lr": 1.0})


def test_check_cancelled():
    check_cancelled(None)
    p = Progress("none")
    check_cancelled(p)
    p.cancelled = True
    with pytest.raises(Cancelled):
        check_cancelled(p)


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _run(net, opts, rng, steps):
    """Deterministic-given-state optimisation: data drawn from ``rng``, dropout-like noise from torch."""
    for _ in range(steps):
        x = torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32))
        x = x + 0.01 * torch.randn(6, 4)
        loss = net(x).pow(2).mean()
        for opt in opts.values():
            opt.zero_grad()
        loss.backward()
        for opt in opts.values():
            opt.step()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, kind):
    cfg = {"optimizer": kind, "lr": 1e-2, "momentum": 0.9}
    torch.manual_seed(1)
    ref = _net()
    ref_opt = {"n": make_optimizer(ref.parameters(), cfg)}
    ref_rng = np.random.default_rng(3)
    _run(ref, ref_opt, ref_rng, 10)

    torch.manual_seed(1)
    net = _net()
    opts = {"n": make_optimizer(net.parameters(), cfg)}
    rng = np.random.default_rng(3)
    _run(net, opts, rng, 6)
    ck = Checkpointer(tmp_path / "checkpoint", every=3)
    ck.save("teacher", 6, {"n": net}, opts, rng, extra={"curve": [[1, 0.5]]})

    # a fresh process: other weights, other RNG states, then restore
    torch.manual_seed(99)
    net2 = _net()
    opts2 = {"n": make_optimizer(net2.parameters(), cfg)}
    rng2 = np.random.default_rng(42)
    loaded = ck.load()
    assert (loaded.stage, loaded.step) == ("teacher", 6)
    assert loaded.meta["extra"] == {"curve": [[1, 0.5]]}
    ck.restore(loaded, {"n": net2}, opts2, rng2)
    _run(net2, opts2, rng2, 4)
    for a, b in zip(ref.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    # the files are safetensors + JSON only
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["checkpoint.json", "state-teacher-0000006.safetensors"]
    json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())


def test_checkpoint_keeps_only_newest_state_and_clear(tmp_path):
    net = _net()
    ck = Checkpointer(tmp_path / "ck", every=2)
    assert ck.load() is None and not ck.exists()
    assert ck.due(4) and not ck.due(3)
    ck.save("teacher", 2, {"n": net})
    ck.save("student", 4, {"n": net})
    files = sorted(p.name for p in ck.folder.iterdir())
    assert files == ["checkpoint.json", "state-student-0000004.safetensors"]
    assert ck.load().stage == "student"
    ck.clear()
    assert not ck.folder.exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    net = _net()
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save("teacher", 1, {"n": net})
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))      # a pickle where safetensors belongs
    with pytest.raises(InputError, match=r"state-teacher-0000001\.safetensors: not a valid safetensors"):
        ck.load()
    ck.json_path.write_text("{not json")
    with pytest.raises(InputError, match=r"checkpoint\.json: unreadable checkpoint"):
        ck.load()
    ck.json_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a WeakLiverSeg checkpoint"):
        ck.load()


def test_restore_into_other_architecture_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save("teacher", 1, {"n": _net()})
    other = torch.nn.Linear(3, 3)
    with pytest.raises(InputError, match="does not fit this training run"):
        ck.restore(ck.load(), {"n": other})


def test_recalibrate_batchnorm_averages_the_statistics_of_training_batches():
    from WeakLiverSegLib.learn.training import recalibrate_batchnorm

    class Batches:
        def __init__(self):
            self.rng = np.random.default_rng(0)

        def sample(self):
            x = torch.from_numpy(self.rng.normal(5.0, 2.0, (4, 1, 6, 6)).astype(np.float32))
            return {"image": x, "boxes": torch.zeros(4, 2, 6, 6)}

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    torch.nn.init.ones_(net[0].weight)
    net[1].running_mean.fill_(-100.0)       # stale statistics, as after training on shifting data
    recalibrate_batchnorm(net, Batches(), 20)
    assert not net.training and net[1].momentum == 0.1
    assert net[1].running_mean.item() == pytest.approx(5.0, abs=0.2)
    assert net[1].running_var.item() == pytest.approx(4.0, rel=0.15)
    recalibrate_batchnorm(net, Batches(), 0)   # 0 batches: nothing changes
    assert net[1].running_mean.item() == pytest.approx(5.0, abs=0.2)
