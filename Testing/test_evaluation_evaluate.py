"""weakliverseg evaluate: pairing, metrics.json contract, strict JSON, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.evaluation.evaluate import case_id, evaluate, format_table, parse_labels, write_metrics
from WeakLiverSegLib.data.imageio import write_image, write_label_map
from WeakLiverSegLib.evaluation.metrics import LESION_KEYS, METRIC_KEYS, case_metrics, tumor_burden
from WeakLiverSegLib.data.volume import Volume

SPACING = (0.8, 0.8, 2.0)
SUMMARY_KEYS = {"dice_per_case", "dice_global"} | set(METRIC_KEYS[1:])


def _truth(shift=0, tumors=((4, 5, 5),), last_slice=10):
    array = np.zeros((12, 20, 20), np.uint8)
    array[2:last_slice, 3 + shift:17 + shift, 3:17] = 1
    for k, j, i in tumors:
        array[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 2
    return array


def _volume(array, origin=(10.0, -5.0, 3.0)):
    return Volume(array, SPACING, origin, np.eye(3))


@pytest.fixture
def folders(tmp_path):
    """Two cases: pred/ named '<id>_pred.nii.gz', truth/ named '<id>.nii.gz'."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    cases = {"case001": (_truth(shift=1, tumors=((4, 6, 5), (7, 14, 12)), last_slice=11), _truth(tumors=((4, 5, 5), (8, 9, 9)))),
             "case002": (_truth(tumors=()), _truth(tumors=()))}
    for cid, (p, t) in cases.items():
        write_image(_volume(p), pred / f"{cid}_pred.nii.gz")
        write_image(_volume(t), truth / f"{cid}.nii.gz")
    (truth / "notes.txt").write_text("ignored")
    return pred, truth, cases


def test_folder_pair_writes_metrics_json_with_the_design_keys(folders, tmp_path):
    pred, truth, cases = folders
    out = write_metrics(evaluate(pred, truth), tmp_path / "out" / "metrics.json")
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(data) == {"labels", "cases", "summary"}
    assert data["labels"] == {"liver": 1, "tumor": 2}
    assert list(data["cases"]) == ["case001", "case002"]
    for cid, (p, t) in cases.items():
        assert set(data["cases"][cid]) == {"liver", "tumor"}
        assert set(data["cases"][cid]["liver"]) == set(METRIC_KEYS)
        assert set(data["cases"][cid]["tumor"]) == set(METRIC_KEYS) | set(LESION_KEYS)
        expected = case_metrics(p, t, SPACING)
        for label in ("liver", "tumor"):
            for key, value in expected[label].items():
                assert data["cases"][cid][label][key] == pytest.approx(value), (cid, label, key)
    assert set(data["summary"]["liver"]) == SUMMARY_KEYS
    assert set(data["summary"]["tumor"]) == SUMMARY_KEYS | set(LESION_KEYS) | {"burden_rmse"}
    c1 = data["cases"]["case001"]["tumor"]
    assert (c1["lesions_tp"], c1["lesions_fp"], c1["lesions_fn"]) == (1, 1, 1)
    assert data["cases"]["case002"]["tumor"]["dice"] == 1.0      # healthy, nothing predicted
    assert data["summary"]["tumor"]["dice_per_case"] == pytest.approx((c1["dice"] + 1.0) / 2)
    assert 0.0 < data["summary"]["liver"]["dice_global"] < 1.0
    burden_error = tumor_burden(cases["case001"][0]) - tumor_burden(cases["case001"][1])
    assert burden_error != 0.0
    assert data["summary"]["tumor"]["burden_rmse"] == pytest.approx(abs(burden_error) / np.sqrt(2))
    table = format_table(data)
    assert "case001" in table and "case002" in table and "dice global" in table and "1/1/1" in table


def test_single_file_pair_id_is_the_stem_and_probabilities_add_auc(tmp_path):
    truth = _truth()
    write_image(_volume(truth), tmp_path / "p17_label.nii.gz")
    write_image(_volume(truth), tmp_path / "p17.nrrd")
    prob = np.where(truth == 2, 0.8, 0.1).astype(np.float32)
    write_image(_volume(prob), tmp_path / "p17_prob.nii.gz")
    metrics = evaluate(tmp_path / "p17.nrrd", tmp_path / "p17_label.nii.gz",
                       probabilities=tmp_path / "p17_prob.nii.gz")
    assert list(metrics["cases"]) == ["p17"]
    assert metrics["cases"]["p17"]["tumor"]["auc"] == pytest.approx(1.0)
    assert metrics["summary"]["tumor"]["auc"] == pytest.approx(1.0)
    assert metrics["summary"]["liver"]["dice_global"] == 1.0
    # a Slicer segmentation as the prediction: segments mapped back to liver=1 / tumour=2
    write_label_map(_volume(truth), tmp_path / "p17.seg.nrrd")
    from_seg = evaluate(tmp_path / "p17.seg.nrrd", tmp_path / "p17_label.nii.gz")
    assert from_seg["cases"]["p17"]["tumor"]["dice"] == 1.0 and from_seg["cases"]["p17"]["liver"]["dice"] == 1.0


def test_truth_from_a_weak_label_store(folders, tmp_path):
    store = pytest.importorskip("WeakLiverSegLib.data.store")
    pred, truth, cases = folders
    dataset = store.Dataset.create(tmp_path / "ds", name="t")
    ct = _volume(np.zeros((12, 20, 20), np.int16))
    dataset.add_case("case001", {"ct": ct}, truth={"mask": _volume(cases["case001"][1])})   # box-only case
    dataset.add_case("case002", {"ct": ct}, mask=_volume(cases["case002"][1]))              # strong case
    dataset.add_case("case003", {"ct": ct})                                                  # not predicted
    from_store = evaluate(pred, tmp_path / "ds")
    from_files = evaluate(pred, truth)
    assert from_store["cases"] == from_files["cases"]
    dataset.add_case("case004", {"ct": ct})
    write_image(_volume(cases["case002"][0]), pred / "case004_pred.nii.gz")
    with pytest.raises(InputError, match="case004.*neither a truth mask nor a mask"):
        evaluate(pred, tmp_path / "ds")


def test_strict_json_and_atomic_write(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}')
    write_metrics({"a": float("nan"), "b": [np.float32(np.inf), np.int64(3)], "c": np.float64(0.5)}, path)
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 3], "c": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]   # no temp file left


def test_case_ids_and_labels():
    assert case_id("case007_pred.nii.gz") == "case007"
    assert case_id("case007.seg.nrrd") == "case007"
    assert case_id("case007_label.mha") == "case007"
    assert case_id("_pred.nii.gz") == "_pred"
    assert case_id("notes.txt") is None
    assert parse_labels("liver=1, tumor=2") == {"liver": 1, "tumor": 2}
    assert parse_labels(None) == {"liver": 1, "tumor": 2}
    for bad, message in [("liver", "NAME=VALUE"), ("liver=x", "integer"), ("liver=0", "background"),
                         ("liver=1,tumor=1", "two labels")]:
        with pytest.raises(InputError, match=message):
            parse_labels(bad)


def test_pairing_errors_name_the_files_and_cases(folders, tmp_path):
    pred, truth, cases = folders
    (truth / "case001.nii.gz").rename(tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match=r"no truth file for predicted cases \['case001'\]"):
        evaluate(pred, truth)
    (tmp_path / "moved.nii.gz").rename(truth / "case001.nii.gz")
    write_image(_volume(_truth()), truth / "case003.nii.gz")
    with pytest.raises(InputError, match=r"no prediction for truth cases \['case003'\]"):
        evaluate(pred, truth)
    (truth / "case003.nii.gz").unlink()
    write_image(_volume(_truth()), truth / "case002_label.nrrd")
    with pytest.raises(InputError, match="case id 'case002' is given by two files"):
        evaluate(pred, truth)
    (truth / "case002_label.nrrd").unlink()
    with pytest.raises(InputError, match="single file but --pred .* is a folder"):
        evaluate(pred, truth / "case001.nii.gz")
    with pytest.raises(InputError, match="no such file or folder"):
        evaluate(pred, tmp_path / "absent")


def test_geometry_mismatch_and_unknown_labels(folders):
    pred, truth, cases = folders
    write_image(_volume(cases["case002"][0], origin=(11.0, -5.0, 3.0)), pred / "case002_pred.nii.gz")
    with pytest.raises(InputError, match=r"case002_pred\.nii\.gz and .*case002\.nii\.gz: .*grids differ.*origin"):
        evaluate(pred, truth)
    bad = cases["case002"][0].copy()
    bad[0, 0, 0] = 3
    write_image(_volume(bad), pred / "case002_pred.nii.gz")
    with pytest.raises(InputError, match=r"case002_pred\.nii\.gz: label values \[3\]"):
        evaluate(pred, truth)
    with pytest.raises(InputError, match=r"label values \[2\]"):
        evaluate(truth / "case001.nii.gz", truth / "case001.nii.gz", labels="liver=1")


def test_cli_evaluate(folders, tmp_path, capsys):
    from WeakLiverSegLib.app.cli import main

    pred, truth, _ = folders
    out = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)]) == 0
    assert "case001" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["cases"]) == {"case001", "case002"}
    assert main(["evaluate", "--pred", str(pred), "--truth", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error: --truth" in capsys.readouterr().err
