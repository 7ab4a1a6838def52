"""Batch segmentation: a folder / list of images, one model load per worker, resumable, JSON summary."""

import json

import numpy as np
import pytest
import torch

from WeakLiverSegLib.app import cli
from WeakLiverSegLib.app.batch import find_cases, is_batch_input, run_batch
from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
from WeakLiverSegLib.data.imageio import read_label_map, write_image
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume

torch.set_num_threads(1)  # tiny networks; the machine is shared

TINY = {"channels": [4, 8, 8, 8], "crop": 32, "batch_size": 2, "infer_batch": 4, "checkpoint_every": 2,
        "teacher": {"steps": 2}, "student": {"steps": 2}}
GEO = dict(spacing=(1.5, 1.5, 3.0), origin=(0, 0, 0))


def _phantom(rng, shape=(8, 32, 32)):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 16) / 14) ** 2 + ((x - 16) / 15) ** 2 < 1
    cy, cx = 14 + rng.integers(-2, 3), 12 + rng.integers(-2, 3)
    labels = ((((y - cy) / 8) ** 2 + ((x - cx) / 9) ** 2 < 1) & (z >= 1) & (z <= 6)).astype(np.uint8)
    labels[(((y - cy) / 3) ** 2 + ((x - cx - 2) / 3) ** 2 < 1) & (z >= 2) & (z <= 4)] = 2
    hu = np.where(body, 40, -1000) + np.where(labels == 1, 80, 0) + np.where(labels == 2, 20, 0)
    return (hu + rng.normal(0, 5, shape)).astype(np.int16), labels


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from WeakLiverSegLib.recipes import o2l

    root = tmp_path_factory.mktemp("store")
    ds = Dataset.create(root / "ds", name="tiny")
    rng = np.random.default_rng(0)
    for n in range(3):
        hu, labels = _phantom(rng)
        lab = Volume(labels, **GEO)
        ds.add_case(f"c{n}", {"enhanced": Volume(hu, **GEO)}, mask=lab if n < 2 else None,
                    boxes=boxes_from_mask(labels, 2), liver_box=liver_box_from_mask(labels))
    return o2l.train(ds, root / "model", dict(TINY), "cpu", Progress("none"))


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for path in (src / "a.nii.gz", src / "b.nrrd", src / "sub" / "c.nii.gz"):
        write_image(Volume(_phantom(rng)[0], **GEO), path)
    (src / "bad.nii.gz").write_bytes(b"this is not an image" * 10)
    return src


def _run(*argv):
    return cli.main(["segment", *map(str, argv), "--device", "cpu", "--progress", "none"])


def test_folder_batch_summary_resume_and_jobs(tiny_model, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("--model", tiny_model, "--input", folder, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of 4 cases failed") and "bad.nii.gz" in err[0]
    summary = json.loads((out / "batch_summary.json").read_text())
    status = {r["id"]: r["status"] for r in summary["cases"]}
    assert status == {"a": "ok", "b": "ok", "bad": "failed", "sub_c": "ok"}
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 1, "pending": 0}
    bad = next(r for r in summary["cases"] if r["id"] == "bad")
    assert "bad.nii.gz" in bad["message"] and not (out / "bad.nii.gz").exists()
    for r in summary["cases"]:
        assert set(r) >= {"id", "input", "output", "seconds", "status", "message"}
    first = {k: read_label_map(out / f"{k}.nii.gz").array for k in ("a", "b", "sub_c")}
    assert all(set(np.unique(v)) <= {0, 1, 2} for v in first.values())

    # rerun: the 3 done cases are skipped (untouched), the corrupt one fails again
    mtimes = {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in first}
    assert _run("--model", tiny_model, "--input", folder, "--out", out) == 2
    again = json.loads((out / "batch_summary.json").read_text())
    assert again["counts"] == {"ok": 0, "skipped": 3, "failed": 1, "pending": 0}
    assert mtimes == {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in first}

    # a damaged output is redone, not skipped
    (out / "a.nii.gz").write_bytes(b"truncated")
    summary = run_batch(tiny_model, folder, out, jobs=1, device="cpu")
    assert {r["id"]: r["status"] for r in summary["cases"]}["a"] == "ok"

    # --jobs 2: same outputs
    out2 = tmp_path / "out2"
    assert _run("--model", tiny_model, "--input", folder, "--out", out2, "--jobs", 2) == 2
    summary2 = json.loads((out2 / "batch_summary.json").read_text())
    assert summary2["counts"] == {"ok": 3, "skipped": 0, "failed": 1, "pending": 0} and summary2["jobs"] == 2
    for k, arr in first.items():
        np.testing.assert_array_equal(read_label_map(out2 / f"{k}.nii.gz").array, arr)


def test_list_file_progress_and_exit_0(tiny_model, folder, tmp_path, capsys):
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# two cases\n{folder / 'a.nii.gz'}\n\nin/b.nrrd\n")
    assert is_batch_input([str(listing)]) and is_batch_input([str(folder)])
    assert not is_batch_input([str(folder / "a.nii.gz")])
    out = tmp_path / "out"
    code = cli.main(["segment", "--model", str(tiny_model), "--input", str(listing), "--out", str(out),
                     "--device", "cpu", "--progress", "jsonl"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    batch = [e for e in events if e.get("stage") == "batch"]
    assert batch[-1]["step"] == 2 and batch[-1]["total"] == 2 and batch[-1]["ok"] == 2
    assert events[-1]["event"] == "done" and events[-1]["ok"] == 2 and events[-1]["failed"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "batch_summary.json"]


def test_case_ids_are_unique_and_output_folder_is_not_an_input(tmp_path):
    src = tmp_path / "in"
    (src / "x").mkdir(parents=True)
    for p in (src / "x" / "a.nii.gz", src / "x_a.nii.gz"):
        p.write_bytes(b"")
    (src / "out").mkdir()
    (src / "out" / "old.nii.gz").write_bytes(b"")
    ids = [c["id"] for c in find_cases(src, out_dir=src / "out")]
    assert ids == ["x_a", "x_a-2"]


def test_single_file_segment_unchanged(tiny_model, folder, tmp_path):
    out = tmp_path / "one.nii.gz"
    assert _run("--model", tiny_model, "--input", folder / "a.nii.gz", "--out", out) == 0
    assert read_label_map(out).array.shape == (8, 32, 32)


def test_batch_refuses_per_case_options(tiny_model, folder, tmp_path, capsys):
    assert _run("--model", tiny_model, "--input", folder, "--out", tmp_path / "o",
                "--probabilities", tmp_path / "p.nii.gz") == 2
    assert "--probabilities: not available in batch" in capsys.readouterr().err
