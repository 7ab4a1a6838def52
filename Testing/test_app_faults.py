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


# ----------------------------------------------------------------------------- 3-6. bad inputs, table-driven

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=1))


def _case(data, cid):
    return next(c for c in data["cases"] if c["id"] == cid)


def _rewrite(path: Path, fn) -> None:
    """Replace an image file of a store behind the store's back (what a user's script may do)."""
    vol = imageio.read_image(path)
    imageio.write_image(fn(vol), path)


def _dicom(path: Path, uid: str, modality: str) -> Path:
    """A minimal DICOM Part-10 file: preamble, DICM, (0002,0002) SOP class, (0008,0060) modality."""
    import struct

    def element(group, elem, vr, value: bytes, pad=b"\0"):
        if len(value) % 2:
            value += pad
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    body = element(2, 2, b"UI", uid.encode()) + element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1")
    body += element(8, 0x60, b"CS", modality.encode(), b" ") + element(0x10, 0x10, b"PN", b"Test^Patient", b" ")
    path.write_bytes(b"\0" * 128 + b"DICM" + body)
    return path


SEG_UID, RTSTRUCT_UID, SR_UID = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.88.11"
MASKED = "case001"   # the phantom cohort (seed 1, strong=0.5): case001 and case002 carry a mask
WEAK = "case000"


def _store(ctx, fn=None):
    ds = _copy(ctx["cohort"], ctx["tmp"] / "ds")
    if fn is not None:
        fn(ds)
    return ds


def _mask_edit(fn):
    return lambda ds: _rewrite(ds / "labels" / f"{MASKED}.nii.gz", fn)


def _json_edit(fn):
    return lambda ds: _edit_json(ds / "dataset.json", fn)


def _model(ctx, fn=None):
    m = _copy(ctx["model"], ctx["tmp"] / "model")
    if fn is not None:
        _edit_json(m / "model.json", fn)
    return m


def _train(ctx, ds, *extra):
    return ["train", "--dataset", ds, "--out", ctx["tmp"] / "out", "--steps", 2, *TRAIN_SETTINGS, *extra]


def _segment(ctx, model=None, inputs=None, out=None, *extra):
    image = ctx["cohort"] / "images" / f"{MASKED}_enhanced.nii.gz"
    argv = ["segment", "--model", model or ctx["model"]]
    for item in inputs or [image]:
        argv += ["--input", item]
    return argv + ["--out", out or ctx["tmp"] / "seg.nii.gz", "--progress", "none", *extra]


def _grid(**change):
    def fn(v):
        geo = dict(spacing=v.spacing, origin=v.origin, direction=v.direction)
        geo.update(change)
        return Volume(v.array, **geo)
    return fn


def _truncate(path: Path, fraction=0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _file(ctx, name="afile") -> Path:
    p = ctx["tmp"] / name
    p.write_text("not a folder")
    return p


def _boxes(ctx, payload) -> Path:
    p = ctx["tmp"] / "boxes.json"
    p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return p


def _nifti_2d(ctx) -> Path:
    import SimpleITK as sitk

    p = ctx["tmp"] / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(p))
    return p


def _sheared_nifti(ctx) -> Path:
    """A NIfTI whose sform is sheared: ITK prints a WARNING block, then fails (orthonormal directions)."""
    import struct

    import SimpleITK as sitk

    p = ctx["tmp"] / "sheared.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(p))
    b = bytearray(p.read_bytes())
    struct.pack_into("<hh", b, 252, 0, 1)                       # qform_code 0, sform_code 1
    for row, values in enumerate([(1, 0.5, 0, 0), (0, 1, 0.7, 0), (0.2, 0, 1, 0)]):
        struct.pack_into("<4f", b, 280 + 16 * row, *values)
    p.write_bytes(bytes(b))
    return p


# (id, argv builder (ctx -> list), substrings the one-line error must hold)
BAD_INPUTS = [
    # ---- train: what the store holds (class 3)
    ("mask-shape", lambda c: _train(c, _store(c, _mask_edit(lambda v: Volume(v.array[:, :, :-1], v.spacing, v.origin, v.direction)))),
     [MASKED, "mask", "labels/case001.nii.gz", "size"]),
    ("mask-spacing", lambda c: _train(c, _store(c, _mask_edit(_grid(spacing=(2.0, 2.0, 9.0))))), [MASKED, "mask", "spacing"]),
    ("mask-origin", lambda c: _train(c, _store(c, _mask_edit(_grid(origin=(50.0, 0.0, 0.0))))), [MASKED, "mask", "origin"]),
    ("mask-direction", lambda c: _train(c, _store(c, _mask_edit(_grid(direction=np.diag([-1.0, 1.0, -1.0]))))), [MASKED, "mask", "direction"]),
    ("mask-label-7", lambda c: _train(c, _store(c, _mask_edit(lambda v: v.with_array(np.where(v.array == 2, 7, v.array).astype(np.uint8))))),
     [MASKED, "mask", "label values 7"]),
    ("mask-label-1.5", lambda c: _train(c, _store(c, _mask_edit(lambda v: v.with_array(np.where(v.array == 1, 1.5, v.array).astype(np.float32))))),
     [MASKED, "mask", "label values 1.5"]),
    ("mask-nan", lambda c: _train(c, _store(c, _mask_edit(lambda v: v.with_array(np.where(v.array == 2, np.nan, v.array).astype(np.float32))))),
     ["case001.nii.gz", "NaN"]),
    ("box-outside", lambda c: _train(c, _store(c, _json_edit(lambda d: _case(d, WEAK)["boxes"][0].update(ijk_max=[99, 99, 3])))),
     [WEAK, "boxes[0]", "outside"]),
    ("liver-box-outside", lambda c: _train(c, _store(c, _json_edit(lambda d: _case(d, MASKED)["liver_box"].update(ijk_min=[-5, 0, 0])))),
     [MASKED, "liver_box"]),
    ("plain-other-grid", lambda c: _train(c, _store(c, lambda ds: _rewrite(ds / "images" / f"{WEAK}_plain.nii.gz", _grid(spacing=(3.0, 3.0, 3.0)))), "--recipe", "o2l"),
     [WEAK, "images['plain']", "spacing"]),
    ("image-missing", lambda c: _train(c, _store(c, lambda ds: (ds / "images" / f"{WEAK}_enhanced.nii.gz").unlink())),
     [WEAK, "images['enhanced']", "not found"]),
    ("image-truncated", lambda c: _train(c, _store(c, lambda ds: _truncate(ds / "images" / f"{MASKED}_enhanced.nii.gz"))),
     [f"{MASKED}_enhanced.nii.gz", "truncated"]),
    ("json-malformed", lambda c: _train(c, _store(c, lambda ds: (ds / "dataset.json").write_text("{\"format\": "))), ["dataset.json", "malformed JSON"]),
    ("json-version", lambda c: _train(c, _store(c, _json_edit(lambda d: d.update(version=7)))), ["dataset.json", "version 7"]),
    ("json-split", lambda c: _train(c, _store(c, _json_edit(lambda d: _case(d, WEAK).update(split="training")))), [WEAK, "split", "'training'"]),
    ("json-couinaud", lambda c: _train(c, _store(c, _json_edit(lambda d: _case(d, WEAK).update(couinaud=[9])))), [WEAK, "couinaud", "9"]),
    ("json-unknown-field", lambda c: _train(c, _store(c, _json_edit(lambda d: _case(d, WEAK).update(lesions=3)))), [WEAK, "lesions"]),
    # ---- train: the command line (classes 4, 5)
    ("dataset-is-file", lambda c: _train(c, _file(c)), ["afile", "not a dataset folder"]),
    ("out-is-file", lambda c: ["train", "--dataset", c["cohort"], "--out", _file(c), *TRAIN_SETTINGS], ["--out", "afile", "is a file"]),
    ("out-under-file", lambda c: ["train", "--dataset", c["cohort"], "--out", _file(c) / "m", *TRAIN_SETTINGS], ["--out", "afile", "is a file"]),
    ("steps-zero", lambda c: _train(c, c["cohort"], "--steps", 0), ["--steps"]),
    ("set-unknown-key", lambda c: _train(c, c["cohort"], "--set", "teacher.speed=3"), ["teacher.speed"]),
    ("config-missing", lambda c: _train(c, c["cohort"], "--config", c["tmp"] / "nope.json"), ["nope.json", "not found"]),
    ("device-bogus", lambda c: _train(c, c["cohort"], "--device", "tpu"), ["--device", "tpu"]),
    ("recipe-unknown", lambda c: _train(c, c["cohort"], "--recipe", "unet"), ["--recipe", "unet"]),
    ("init-ignores-channels", lambda c: _train(c, c["cohort"], "--init", c["model"], "--set", "channels=[8,8,8,8]"),
     ["channels", "--init", "[4, 8, 8, 8]"]),
    ("resume-and-init", lambda c: _train(c, c["cohort"], "--resume", "--init", c["model"]), ["--resume", "--init"]),
    ("resume-other-dataset", lambda c: ["train", "--dataset", _store(c), "--out", c["interrupted"], "--resume", "--steps", 4, *TRAIN_SETTINGS],
     ["checkpoint.json", "trained on the dataset", "--dataset"]),
    ("resume-other-recipe", lambda c: ["train", "--dataset", c["cohort"], "--out", c["interrupted"], "--resume", "--recipe", "sdnet", "--steps", 4,
                                       "--device", "cpu", "--progress", "none"], ["checkpoint.json", "'o2l'", "not 'sdnet'"]),
    ("resume-changed-dataset", lambda c: ["train", "--dataset", c["interrupted"].parent / "ds", "--out", c["interrupted"], "--resume", "--steps", 4,
                                          "--set", "checkpoint_every=1", *TRAIN_SETTINGS], ["dataset.json", "changed since the interrupted run"]),
    # ---- segment: what the input is (class 4)
    ("input-dicom-seg", lambda c: _segment(c, inputs=[_dicom(c["tmp"] / "seg.dcm", SEG_UID, "SEG")]), ["seg.dcm", "DICOM SEG", "not an image"]),
    ("input-rtstruct", lambda c: _segment(c, inputs=[_dicom(c["tmp"] / "rs.dcm", RTSTRUCT_UID, "RTSTRUCT")]), ["rs.dcm", "RT STRUCT"]),
    ("input-sr", lambda c: _segment(c, inputs=[_dicom(c["tmp"] / "sr.dcm", SR_UID, "SR")]), ["sr.dcm", "Structured Report"]),
    ("input-seg-in-folder", lambda c: _segment(c, inputs=[_dicom(c["tmp"] / "dcm" / "x.dcm", SEG_UID, "SEG").parent]
                                               if (c["tmp"] / "dcm").mkdir() is None else None), ["dcm", "DICOM SEG"]),
    ("input-unknown-phase", lambda c: _segment(c, inputs=[f"arterial={c['cohort'] / 'images' / 'case001_enhanced.nii.gz'}"]),
     ["arterial", "model.json", "enhanced"]),
    ("input-truncated", lambda c: _segment(c, inputs=[_truncate(Path(_copy(c["cohort"] / "images", c["tmp"] / "im")) / "case001_enhanced.nii.gz")]),
     ["case001_enhanced.nii.gz", "truncated", "of the"]),
    ("input-missing", lambda c: _segment(c, inputs=[c["tmp"] / "ct.nii.gz"]), ["ct.nii.gz", "not found"]),
    ("input-itk-warning", lambda c: _segment(c, inputs=[_sheared_nifti(c)]), ["sheared.nii", "orthonormal", "ITK: ", "unexpected scales in sform"]),
    ("input-2d", lambda c: _segment(c, inputs=[_nifti_2d(c)]), ["slice.nii.gz", "2D"]),
    ("input-not-an-image", lambda c: _segment(c, inputs=[_file(c, "notes.nrrd")]), ["notes.nrrd", "cannot read image"]),
    ("seg-out-under-file", lambda c: _segment(c, out=_file(c) / "seg.nii.gz"), ["afile", "is a file"]),
    ("seg-out-extension", lambda c: _segment(c, out=c["tmp"] / "seg.png"), ["seg.png", "extension"]),
    ("boxes-bad-json", lambda c: _segment(c, None, None, None, "--boxes", _boxes(c, "[{")), ["boxes.json", "not valid JSON"]),
    ("boxes-outside", lambda c: _segment(c, None, None, None, "--boxes", _boxes(c, [{"label": "tumor", "ijk_min": [0, 0, 0], "ijk_max": [80, 5, 2]}])),
     ["boxes.json", "[0]"]),
    # ---- segment: the model folder (classes 5, 6)
    ("model-missing", lambda c: _segment(c, model=c["tmp"] / "nomodel"), ["nomodel", "not found"]),
    ("model-json-malformed", lambda c: _segment(c, model=(lambda m: ((m / "model.json").write_text("{"), m)[1])(_model(c))), ["model.json", "not valid JSON"]),
    ("model-networks-null", lambda c: _segment(c, model=_model(c, lambda d: d.update(networks=None))), ["model.json", "networks", "None"]),
    ("model-network-missing", lambda c: _segment(c, model=_model(c, lambda d: d["networks"].pop("student"))), ["model.json", "'student'"]),
    ("model-hu-window", lambda c: _segment(c, model=_model(c, lambda d: d["input"].update(hu_window=["soft", 250]))), ["model.json", "input.hu_window"]),
    ("model-spacing", lambda c: _segment(c, model=_model(c, lambda d: d["input"].update(spacing_mm=[-1, 1.5]))), ["model.json", "input.spacing_mm"]),
    ("model-context", lambda c: _segment(c, model=_model(c, lambda d: d["input"].update(context_slices="one"))), ["model.json", "input.context_slices"]),
    ("model-unknown-recipe", lambda c: _segment(c, model=_model(c, lambda d: d.update(recipe="unet9"))), ["model.json", "recipe", "unet9"]),
    ("model-wrong-shape-weights", lambda c: _segment(c, model=_model(c, lambda d: d["networks"]["student"]["kwargs"].update(channels=[4, 8, 8, 16]))),
     ["student.safetensors", "networks.student", "size mismatch for", "file has", "needs"]),
    # ---- pseudo / evaluate / phantom
    ("pseudo-bad-store", lambda c: ["pseudo", "--model", c["model"], "--dataset", _store(c, _mask_edit(_grid(origin=(9.0, 0.0, 0.0)))),
                                    "--out", c["tmp"] / "p", "--progress", "none"], [MASKED, "mask", "origin"]),
    ("pseudo-out-under-file", lambda c: ["pseudo", "--model", c["model"], "--dataset", c["cohort"], "--out", _file(c) / "p", "--progress", "none"],
     ["--out", "afile", "is a file"]),
    ("evaluate-pred-missing", lambda c: ["evaluate", "--pred", c["tmp"] / "nopred", "--truth", c["cohort"], "--out", c["tmp"] / "m.json"], ["nopred"]),
    ("phantom-existing", lambda c: ["phantom", "--out", _store(c), "--cases", 1, "--progress", "none"], ["dataset.json", "already exists", "choose a new folder"]),
]


@pytest.fixture(scope="module")
def interrupted(cohort, tmp_path_factory):
    """A train run of the cohort stopped before it wrote its model: its checkpoint stays for --resume."""
    from WeakLiverSegLib.errors import Cancelled
    from WeakLiverSegLib.recipes.o2l import training as o2l_training

    base = tmp_path_factory.mktemp("interrupted")
    ds, out = _copy(cohort, base / "ds"), base / "m"

    def stop(*a, **k):
        raise Cancelled("stopped before the model was written")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(o2l_training, "save_model", stop)
        assert cli("train", "--dataset", ds, "--out", out, "--steps", 4, "--set", "checkpoint_every=1", *TRAIN_SETTINGS) == 130
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    Dataset.load(ds).update_labels(WEAK, split="val")   # its store changes after the interruption
    return out


def test_the_table_is_large_enough():
    assert len(BAD_INPUTS) >= 40 and len({row[0] for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("name,build,expected", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_exits_2_naming_it_and_changes_nothing(name, build, expected, cohort, model, interrupted, tmp_path, capsys):
    ctx = {"cohort": cohort, "model": model, "interrupted": interrupted, "tmp": tmp_path}
    argv = build(ctx)
    watched = [cohort, model, interrupted, tmp_path]
    before = {str(p): _snapshot(p) for p in watched}
    capsys.readouterr()
    rc = cli(*argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for part in expected:
        assert part in lines[0], f"{part!r} not in: {lines[0]}"
    assert {str(p): _snapshot(p) for p in watched} == before      # nothing written, nothing changed


@pytest.mark.parametrize("name", ["input-dicom-seg", "input-itk-warning", "mask-label-7", "model-networks-null"])
def test_bad_input_through_the_real_command(name, cohort, model, interrupted, tmp_path):
    build, expected = next((b, e) for n, b, e in BAD_INPUTS if n == name)
    argv = [str(a) for a in build({"cohort": cohort, "model": model, "interrupted": interrupted, "tmp": tmp_path})]
    proc = subprocess.run([sys.executable, "-m", "WeakLiverSegLib", *argv], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "WARNING" not in proc.stderr   # ITK's own warning blocks are folded into the one line
    assert all(part in proc.stderr for part in expected), proc.stderr



# ----------------------------------------------------------------------------- kill -9 during train, then --resume


@pytest.mark.slow
def test_kill_9_during_train_then_resume_finishes_with_a_valid_model(cohort, tmp_path):
    import random

    from WeakLiverSegLib.learn.modelstore import load_model

    out = tmp_path / "m"
    ckpt = out / "checkpoint" / "checkpoint.json"
    base = [sys.executable, "-m", "WeakLiverSegLib", "train", "--dataset", str(cohort), "--out", str(out),
            "--steps", "8", "--set", "checkpoint_every=1", *map(str, TRAIN_SETTINGS)]
    rng = random.Random(16)
    kills = 0
    for _ in range(2):   # two kill points at random moments after a checkpoint, then the resume that finishes
        argv = base + (["--resume"] if ckpt.exists() else [])
        proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = ckpt.stat().st_mtime if ckpt.exists() else 0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:   # wait for this run's first checkpoint
            if ckpt.exists() and ckpt.stat().st_mtime != start:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        if proc.returncode == 0:
            break
    assert kills >= 1
    if ckpt.exists() or not (out / "model.json").exists():
        done = subprocess.run(base + (["--resume"] if ckpt.exists() else []), env=_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    model = load_model(out)
    assert set(model.networks) == {"student", "teacher"} and not ckpt.exists()
    assert not [p for p in out.rglob(".*")]   # no temp file of a killed write left in the model
    assert cli("segment", "--model", out, "--input", cohort / "images" / "case003_enhanced.nii.gz",
               "--out", tmp_path / "seg.nii.gz", "--progress", "none") == 0
