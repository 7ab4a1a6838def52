"""The main job end to end at toy size: cohort -> o2l teacher + student -> predictions -> report."""

import json

from WeakLiverSegLib.app.demo import run_demo
from WeakLiverSegLib.app.progress import Progress


def test_demo_writes_report_predictions_and_metrics(tmp_path):
    progress = Progress("none")
    report = run_demo(tmp_path / "demo", device="cpu", cases=6, steps=4, seed=0, progress=progress,
                      shape=(48, 48, 16))
    html = report.read_text(encoding="utf-8")
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    test_ids = list(metrics["cases"])
    assert test_ids, "the held-out split must be segmented"
    for case_id in test_ids:
        assert (tmp_path / "demo" / "slicer" / f"{case_id}.seg.nrrd").exists()
        assert case_id in html
    assert {"liver", "tumor"} <= set(metrics["summary"])
    assert html.count("data:image/png;base64,") >= len(test_ids)   # overlays embedded
    assert "<svg" in html                                           # training curves
    assert any(e.get("stage") == "teacher" and e.get("loss") is not None for e in progress.history)
