"""Fault injection across the commands (issue 16, "nothing lost, nothing silently wrong"):
concurrent writers of one store, a full disk (injected short writes / ENOSPC) for the image
writer, the store and the checkpointer, kill -9 during ``train`` then ``--resume``, and a table of
bad inputs that must each exit 2 with one line naming the file / case / field and change nothing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from WeakLiverSegLib.data import imageio
from WeakLiverSegLib.data.safeio import file_lock
from WeakLiverSegLib.data.store import LOCK_FILE, Dataset
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` (bytes), the store lock file excepted."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _tiny(seed=0, shape=(3, 4, 5)):
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(-100, 200, shape).astype(np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))


# ----------------------------------------------------------------------------- 1. the store lock

_ADDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from WeakLiverSegLib.data.store import Dataset
    from WeakLiverSegLib.data.volume import Volume
    root, who, rounds, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    ds = Dataset(root, name="shared")           # a stale in-memory store, as a Slicer window holds it
    while not go.exists():
        time.sleep(0.005)
    for n in range(rounds):
        vol = Volume(np.full((3, 4, 5), n, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
        ds.add_case(f"{who}{n:02d}", {"ct": vol}, volume_label="healthy")
    print("ok", len(ds.cases))
""")


def test_concurrent_adders_lose_no_case(tmp_path):
    """Three processes add 20 cases each to one store (a new one: they also race to create it)."""
    root, go = tmp_path / "ds", tmp_path / "go"
    rounds, writers = 20, ("a", "b", "c")
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(root), who, str(rounds), str(go)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who in writers]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    ds = Dataset.load(root)
    expected = {f"{who}{n:02d}" for who in writers for n in range(rounds)}
    assert set(ds.cases) == expected
    ds.validate(deep=True)
    for who in writers:
        assert int(ds.read_image(f"{who}07").array.max()) == 7
    orphans = {p.name for p in (root / "images").iterdir()} - {Path(c.images["ct"]).name for c in ds.cases.values()}
    assert not orphans and not [p for p in root.rglob(".*") if p.name != LOCK_FILE]


def test_lock_timeout_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c0", {"ct": _tiny()})
    before = _snapshot(ds.root)
    monkeypatch.setenv("WLS_LOCK_TIMEOUT", "0.3")
    errors = []

    def other_writer():
        try:
            Dataset.load(ds.root).add_case("c1", {"ct": _tiny(1)})
        except InputError as exc:
            errors.append(str(exc))

    with file_lock(ds.root / LOCK_FILE):   # another writer holds the store
        t = threading.Thread(target=other_writer)
        t.start()
        t.join(30)
    assert len(errors) == 1 and LOCK_FILE in errors[0] and "another process is writing" in errors[0]
    assert _snapshot(ds.root) == before
    Dataset.load(ds.root).add_case("c1", {"ct": _tiny(1)})   # free again
    assert set(Dataset.load(ds.root).cases) == {"c0", "c1"}


def test_slicer_add_case_path_takes_the_store_lock(tmp_path, monkeypatch):
    from WeakLiverSegLib.slicer.slicer_logic import CaseInput, write_case

    root = tmp_path / "ds"
    Dataset.create(root).add_case("c0", {"ct": _tiny()})
    monkeypatch.setenv("WLS_LOCK_TIMEOUT", "0.2")
    result = []
    case = CaseInput(root, "c1", {"ct": _tiny(1)}, "ct", volume_label="healthy")
    with file_lock(root / LOCK_FILE):
        t = threading.Thread(target=lambda: result.append(_catch(write_case, case)))
        t.start()
        t.join(30)
    assert isinstance(result[0], InputError) and LOCK_FILE in str(result[0])
    assert write_case(case).id == "c1" and set(Dataset.load(root).cases) == {"c0", "c1"}


def _catch(fn, *args):
    try:
        return fn(*args)
    except InputError as exc:
        return exc


# ----------------------------------------------------------------------------- shared tiny cohort / model

TRAIN_SETTINGS = ["--set", "channels=[4,8,8,8]", "--set", "crop=32", "--set", "batch_size=2",
                  "--set", "infer_batch=4", "--device", "cpu", "--progress", "none"]


def cli(*argv):
    from WeakLiverSegLib.app.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "ds"
    assert cli("phantom", "--out", root, "--cases", 4, "--seed", 1, "--shape", 32, 32, 6,
               "--mix", "strong=0.5,box=0.5", "--progress", "none") == 0
    return root


@pytest.fixture(scope="module")
def model(cohort, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("model") / "m"
    assert cli("train", "--dataset", cohort, "--out", out, "--steps", 4, *TRAIN_SETTINGS) == 0
    return out


# ----------------------------------------------------------------------------- 2. a full disk


def _short_writes(monkeypatch, module, name, fraction=0.5):
    """Replace ``module.name`` (a writer) by one that writes, then loses the end of the file without
    an error: what a library that ignores its short writes leaves on a full disk."""
    real = getattr(module, name)
    hit = []

    def short(*args, **kwargs):
        result = real(*args, **kwargs)
        target = Path(str(args[1] if len(args) > 1 and name != "write_segmentation" else args[0]))
        if name == "WriteImage":
            target = Path(str(args[1]))
        size = target.stat().st_size
        with open(target, "r+b") as fh:
            fh.truncate(int(size * fraction))
        hit.append(target)
        return result

    monkeypatch.setattr(module, name, short)
    return hit


def test_image_writer_short_write_keeps_the_good_file(tmp_path, monkeypatch, small_volume):
    import SimpleITK as sitk

    for name in ("out.nii.gz", "out.nrrd", "out.mha", "out.nii"):
        target = tmp_path / name
        imageio.write_image(small_volume(), target)
        good = target.read_bytes()
        hit = _short_writes(monkeypatch, sitk, "WriteImage")
        with pytest.raises(InputError) as err:
            imageio.write_image(small_volume(dtype=np.float32), target)
        monkeypatch.undo()
        assert hit, name
        msg = str(err.value)
        assert str(target) in msg and "previous file is unchanged" in msg and "\n" not in msg
        assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mha", "out.nii", "out.nii.gz", "out.nrrd"]
    assert "incomplete" in msg and "bytes free" in msg


def test_image_writer_os_error_names_the_reason(tmp_path, monkeypatch, small_volume):
    import SimpleITK as sitk

    def enospc(image, path, *a):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sitk, "WriteImage", enospc)
    with pytest.raises(InputError, match=r"new\.nii\.gz: cannot write image \(No space left on device \[ENOSPC\]\); nothing was written"):
        imageio.write_image(small_volume(), tmp_path / "new.nii.gz")
    assert not list(tmp_path.iterdir())


def test_seg_nrrd_writer_short_write_keeps_the_good_file(tmp_path, monkeypatch, small_volume):
    import slicerio

    target = tmp_path / "labels.seg.nrrd"
    imageio.write_seg_nrrd(small_volume(values="labels"), target)
    good = target.read_bytes()
    hit = _short_writes(monkeypatch, slicerio, "write_segmentation", fraction=0.6)
    with pytest.raises(InputError, match=r"labels\.seg\.nrrd: cannot write segmentation \(the written file is incomplete"):
        imageio.write_label_map(small_volume(values="labels"), target)
    monkeypatch.undo()
    assert hit and target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["labels.seg.nrrd"]


def test_store_short_writes_change_nothing(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from WeakLiverSegLib.data import safeio

    ds = Dataset.create(tmp_path / "ds")
    ds.add_case("c0", {"ct": _tiny()})
    before = _snapshot(ds.root)
    hit = _short_writes(monkeypatch, sitk, "WriteImage")       # an image of the new case comes out short
    with pytest.raises(InputError, match=r"c1_ct\.nii\.gz: cannot write image"):
        ds.add_case("c1", {"ct": _tiny(1)})
    monkeypatch.undo()
    assert hit
    real_fsync = os.fsync

    def lose_half(fd):  # dataset.json's new content: half of it reaches the disk, no error raised
        temp = ds.root / f".dataset.json.tmp{os.getpid()}"
        if temp.exists() and os.fstat(fd).st_ino == temp.stat().st_ino:
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
        return real_fsync(fd)

    monkeypatch.setattr(safeio.os, "fsync", lose_half)
    with pytest.raises(InputError, match=r"dataset\.json: could not save \(the written file is incomplete.*previous dataset\.json is unchanged"):
        ds.add_case("c1", {"ct": _tiny(1)})
    monkeypatch.undo()
    assert _snapshot(ds.root) == before and set(Dataset.load(ds.root).cases) == {"c0"}
    assert not [p for p in ds.root.rglob(".*") if p.name != LOCK_FILE]


def test_checkpointer_and_model_store_short_writes(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from WeakLiverSegLib.learn.modelstore import save_model
    from WeakLiverSegLib.learn.training import Checkpointer

    net = torch.nn.Linear(8, 4)
    ck = Checkpointer(tmp_path / "run" / "checkpoint", every=1)
    hit = _short_writes(monkeypatch, safetensors.torch, "save_file")
    with pytest.raises(InputError, match=r"state-s-0000001\.safetensors: cannot write \(the written file is incomplete"):
        ck.save("s", 1, {"net": net})
    monkeypatch.undo()
    assert hit and not ck.folder.exists()     # no empty checkpoint folder left behind
    ck.save("s", 1, {"net": net})
    good = ck.json_path.read_bytes()
    _short_writes(monkeypatch, safetensors.torch, "save_file")
    with pytest.raises(InputError, match="the last good checkpoint"):
        ck.save("s", 2, {"net": net})
    monkeypatch.undo()
    assert ck.json_path.read_bytes() == good and ck.load().step == 1
    assert sorted(p.name for p in ck.folder.iterdir()) == ["checkpoint.json", "state-s-0000001.safetensors"]

    models = tmp_path / "models"   # the model store: a failed first save leaves no folder
    _short_writes(monkeypatch, safetensors.torch, "save_file")
    with pytest.raises(InputError, match=r"net\.safetensors: cannot write .*nothing was written"):
        save_model(models / "m", {"recipe": "sdnet"}, {"net": ("VNet", {}, net)})
    monkeypatch.undo()
    assert not (models / "m").exists()


def test_train_and_segment_on_a_full_disk_exit_2(cohort, model, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    import SimpleITK as sitk

    out = tmp_path / "m"
    _short_writes(monkeypatch, safetensors.torch, "save_file")
    assert cli("train", "--dataset", cohort, "--out", out, "--steps", 2, *TRAIN_SETTINGS) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "Traceback" not in err
    assert not (out / "checkpoint").exists()

    labels = tmp_path / "seg.nii.gz"
    image = cohort / "images" / "case000_enhanced.nii.gz"
    assert cli("segment", "--model", model, "--input", image, "--out", labels, "--progress", "none") == 0
    good = labels.read_bytes()
    capsys.readouterr()
    _short_writes(monkeypatch, sitk, "WriteImage")
    assert cli("segment", "--model", model, "--input", image, "--out", labels, "--progress", "none") == 2
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert "segmentation written" not in captured.out and str(labels) in captured.err
    assert labels.read_bytes() == good and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
