"""BackgroundRunner against real child processes: ordered events, tree-wide cancel, clear errors;
and the argv the Slicer logic builds for it."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from WeakLiverSegLib.slicer.runner import BackgroundRunner
from WeakLiverSegLib.slicer.slicer_logic import WeakLiverSegLogic, progress_view

REPO_ROOT = Path(__file__).resolve().parent.parent
POSIX = not sys.platform.startswith("win")


def script(tmp_path, name, body) -> list:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def drain(runner, timeout=20.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += runner.poll()
        if events and events[-1]["event"] == "exit":
            return events
        time.sleep(0.02)
    raise AssertionError(f"no exit event within {timeout} s; got {events}")


def test_events_arrive_in_order_with_stderr_and_exit_last(tmp_path):
    argv = script(tmp_path, "child.py", """
        import json, sys, time
        for step in range(1, 6):
            print(json.dumps({"event": "progress", "stage": "train", "step": step, "total": 5,
                              "loss": 1.0 / step, "eta_s": 5 - step}), flush=True)
            time.sleep(0.02)
        print("plain text line", flush=True)
        print(json.dumps({"stage": "bare", "step": 1, "total": 1}), flush=True)
        print("a warning", file=sys.stderr, flush=True)
        print(json.dumps({"event": "done", "model": "m"}), flush=True)
    """)
    runner = BackgroundRunner(argv).start()
    events = drain(runner)
    stdout_events = [e for e in events if e.get("stream") != "stderr"]
    assert [e["step"] for e in stdout_events if e["event"] == "progress" and e["stage"] == "train"] == [1, 2, 3, 4, 5]
    assert [e["event"] for e in stdout_events] == ["progress"] * 5 + ["log", "progress", "done", "exit"]
    assert stdout_events[5]["message"] == "plain text line"
    assert stdout_events[6]["stage"] == "bare"                     # bare progress objects are progress
    assert {"event": "log", "message": "a warning", "stream": "stderr"} in events
    assert events[-1] == {"event": "exit", "returncode": 0, "cancelled": False, "error": None}
    assert runner.returncode == 0 and runner.error_message is None and not runner.running
    views = [progress_view(e) for e in events]
    assert views[0]["percent"] == 20 and views[0]["eta"] == "ETA 4 s" and "loss 1" in views[0]["status"]
    assert views[-1]["finished"] and views[-1]["error"] is None


@pytest.mark.skipif(not POSIX, reason="process-group checks use POSIX signals and /proc")
@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigkill-after-grace"])
def test_cancel_ends_the_whole_process_tree(tmp_path, ignore_term):
    argv = script(tmp_path, "parent.py", f"""
        import json, signal, subprocess, sys, time
        if {ignore_term}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if {ignore_term} else None; time.sleep(120)"])
        print(json.dumps({{"event": "log", "message": "grandchild %d" % grandchild.pid}}), flush=True)
        step = 0
        while True:
            step += 1
            print(json.dumps({{"event": "progress", "stage": "train", "step": step, "total": 10**6}}), flush=True)
            time.sleep(0.05)
    """)
    runner = BackgroundRunner(argv, grace_s=0.5).start()
    events, grandchild, deadline = [], None, time.monotonic() + 20
    while (grandchild is None or len(events) < 4) and time.monotonic() < deadline:
        events += runner.poll()
        for e in events:
            if e.get("message", "").startswith("grandchild "):
                grandchild = int(e["message"].split()[1])
        time.sleep(0.02)
    assert grandchild is not None and alive(grandchild)

    started = time.monotonic()
    runner.cancel()                                   # returns at once (GUI thread)
    assert time.monotonic() - started < 0.5
    assert runner.wait(timeout=10) is not None
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the grandchild survived cancel()"
    events += drain(runner)
    assert events[-1]["event"] == "exit" and events[-1]["cancelled"] is True
    assert runner.error_message == "cancelled by the user"
    assert progress_view(events[-1])["status"] == "cancelled"


def test_failing_child_surfaces_its_error_event(tmp_path):
    argv = script(tmp_path, "bad.py", """
        import json, sys
        print(json.dumps({"event": "progress", "stage": "prepare", "step": 1, "total": 3}), flush=True)
        print(json.dumps({"event": "error", "message": "store/dataset.json: case007 boxes[0]: ijk_max outside the grid"}), flush=True)
        print("error: store/dataset.json: case007 ...", file=sys.stderr)
        sys.exit(2)
    """)
    runner = BackgroundRunner(argv).start()
    events = drain(runner)
    message = "store/dataset.json: case007 boxes[0]: ijk_max outside the grid"
    assert runner.returncode == 2 and runner.error_message == message
    assert events[-1]["error"] == message
    view = progress_view(events[-1])
    assert view["finished"] and view["error"] == message and view["status"] == "failed"


def test_crashing_child_surfaces_its_last_stderr_line(tmp_path):
    argv = script(tmp_path, "crash.py", """
        raise ValueError("boom in the data loader")
    """)
    runner = BackgroundRunner(argv).start()
    events = drain(runner)
    assert runner.returncode == 1
    assert runner.error_message == "ValueError: boom in the data loader"
    assert any(e.get("stream") == "stderr" and "Traceback" in e["message"] for e in events)


def test_missing_program_and_double_start_are_errors(tmp_path):
    with pytest.raises(OSError):
        BackgroundRunner([str(tmp_path / "no-such-program")]).start()
    runner = BackgroundRunner([sys.executable, "-c", "pass"]).start()
    with pytest.raises(RuntimeError):
        runner.start()
    runner.wait(10)


def test_windows_children_get_no_console_window_and_their_own_group(monkeypatch):
    """Issue 20, defect 5: PythonSlicer is a console program; hide its window as Slicer's
    launchConsoleProcess does (STARTUPINFO + SW_HIDE), also CREATE_NO_WINDOW, for the job and taskkill."""
    import subprocess
    import types

    from WeakLiverSegLib.slicer import runner as runner_module

    class StartupInfo:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    fake = dict(STARTUPINFO=StartupInfo, STARTF_USESHOWWINDOW=0x1, SW_HIDE=0, CREATE_NO_WINDOW=0x08000000,
                CREATE_NEW_PROCESS_GROUP=0x200)
    for name, value in fake.items():
        monkeypatch.setattr(subprocess, name, value, raising=False)
    monkeypatch.setattr(runner_module, "_IS_WINDOWS", True)
    kwargs = runner_module.popen_platform_kwargs()
    assert kwargs["creationflags"] == 0x08000000 | 0x200 and "start_new_session" not in kwargs
    assert kwargs["startupinfo"].dwFlags & 0x1 and kwargs["startupinfo"].wShowWindow == 0
    assert runner_module.popen_platform_kwargs(new_group=False)["creationflags"] == 0x08000000

    # start() and cancel() really pass them to Popen / run.
    calls = []

    class Stop(Exception):
        pass

    def fake_popen(argv, **kw):
        calls.append(("popen", kw))
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    with pytest.raises(Stop):
        BackgroundRunner(["PythonSlicer", "-c", "pass"]).start()
    assert calls[0][1]["creationflags"] & 0x08000000 and calls[0][1]["startupinfo"].wShowWindow == 0
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(("run", kw)))
    pending = BackgroundRunner(["x"])
    pending.process = types.SimpleNamespace(pid=4242)
    pending.cancel()
    assert calls[-1][0] == "run" and calls[-1][1]["creationflags"] == 0x08000000

    monkeypatch.setattr(runner_module, "_IS_WINDOWS", False)
    assert runner_module.popen_platform_kwargs() == {"start_new_session": True}


# ----------------------------------------------------------------------------- commands built by the logic


def test_commands_run_the_library_cli_with_this_python_outside_slicer(tmp_path):
    logic = WeakLiverSegLogic(scene=object())
    train = logic.build_train_command(tmp_path / "d", "o2l", tmp_path / "m", device="cpu", steps=2)
    assert train[:3] == [sys.executable, "-m", "WeakLiverSegLib"]
    assert train[3:] == ["train", "--dataset", str(tmp_path / "d"), "--recipe", "o2l", "--out", str(tmp_path / "m"),
                         "--device", "cpu", "--progress", "jsonl", "--steps", "2"]
    tune = logic.build_train_command("d", "wsts", "m2", init="m1", resume=True)
    assert tune[tune.index("--init") + 1] == "m1" and "--resume" in tune and "--steps" not in tune
    seg = logic.build_segment_command("m", {"enhanced": "a.nii.gz", "plain": "b.nii.gz"}, "out.nii.gz",
                                      probabilities="p.nii.gz", uncertainty="u.nii.gz", device="cuda")
    assert seg[3:] == ["segment", "--model", "m", "--input", "enhanced=a.nii.gz", "--input", "plain=b.nii.gz",
                       "--out", "out.nii.gz", "--probabilities", "p.nii.gz", "--uncertainty", "u.nii.gz",
                       "--device", "cuda", "--progress", "jsonl"]
    single = logic.build_segment_command("m", "ct.nii.gz", "o.nii.gz")
    assert single[single.index("--input") + 1] == "ct.nii.gz" and "--probabilities" not in single
    assert "--refine" not in single
    refined = logic.build_segment_command("m", "ct.nii.gz", "o.nii.gz", refine=True)
    assert refined[refined.index("--refine") + 1] == "litemedsam"
    env = logic.subprocess_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert logic.finetune_output_folder(tmp_path / "model") == tmp_path / "model-ft1"
    (tmp_path / "model-ft1").mkdir()
    assert logic.finetune_output_folder(tmp_path / "model") == tmp_path / "model-ft2"


def test_commands_use_pythonslicer_inside_the_slicer_application(tmp_path, monkeypatch):
    import types

    from WeakLiverSegLib.slicer import slicer_bridge

    fake = tmp_path / "bin" / "PythonSlicer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    monkeypatch.setenv("PATH", str(fake.parent) + os.pathsep + os.environ.get("PATH", ""))
    assert slicer_bridge.inside_slicer_app()
    argv = WeakLiverSegLogic(scene=object()).build_train_command("d", "o2l", "m")
    assert argv[:3] == [str(fake), "-m", "WeakLiverSegLib"]


# ----------------------------------------------------------------------------- the real CLI


@pytest.mark.slow
@pytest.mark.skipif(not POSIX, reason="process-group checks use POSIX signals")
def test_real_weakliverseg_train_reports_progress_and_cancels(tmp_path, monkeypatch):
    lib = REPO_ROOT / "WeakLiverSegLib"
    if not ((lib / "app" / "cli.py").is_file() and (lib / "recipes" / "o2l" / "__init__.py").is_file()):
        pytest.skip("training CLI not available yet")
    from WeakLiverSegLib.synth.phantom import generate_cohort

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared 2-core machine
    logic = WeakLiverSegLogic(scene=object())
    cohort = generate_cohort(tmp_path / "cohort", cases=3, seed=3, shape=(40, 40, 12)).root

    # A real training run with many steps: progress arrives, then Cancel stops it quickly.
    runner = logic.start_training(cohort, "o2l", tmp_path / "model", device="cpu", steps=100000)
    events, deadline = [], time.monotonic() + 120
    while not any(e["event"] == "progress" and e.get("stage") not in (None, "prepare") for e in events):
        assert time.monotonic() < deadline, f"no training progress within 120 s: {events[-5:]}"
        assert not runner.finished, f"training ended early: {runner.error_message}"
        events += logic.poll()
        time.sleep(0.1)
    progress = [e for e in events if e["event"] == "progress"]
    assert all(0 <= e["step"] <= e["total"] for e in progress)
    started = time.monotonic()
    logic.cancel()
    assert runner.wait(timeout=15) is not None and time.monotonic() - started < 5
    events += drain(runner)
    assert events[-1]["cancelled"] and not logic.busy
    assert not alive(runner.pid)


# ----------------------------------------------------------------------------- logic helpers (no MRML needed)


def test_recipes_offered_depend_on_the_number_of_phases(monkeypatch):
    from WeakLiverSegLib.slicer import slicer_logic

    assert slicer_logic.implemented_recipes()[0] == "o2l" or not slicer_logic.implemented_recipes()
    monkeypatch.setattr(slicer_logic, "implemented_recipes", lambda: ["o2l", "couinaud", "acol", "sdnet", "wsts"])
    one, two = object(), object()
    assert slicer_logic.recipes_for([one, None]) == ["o2l", "couinaud", "acol", "sdnet"]
    assert slicer_logic.recipes_for([one, two]) == ["o2l", "couinaud", "acol", "sdnet", "wsts"]
    assert slicer_logic.recipes_for(2)[-1] == "wsts" and "wsts" not in slicer_logic.recipes_for(1)
    monkeypatch.setattr(slicer_logic, "implemented_recipes", lambda: ["o2l", "wsts"])
    assert slicer_logic.recipes_for([one]) == ["o2l"] and slicer_logic.recipes_for([one, two]) == ["o2l", "wsts"]


def test_form_labels_map_to_store_fields():
    from WeakLiverSegLib.errors import InputError
    from WeakLiverSegLib.slicer.slicer_logic import labels_from_form

    assert labels_from_form([], "unknown") == (None, None)
    assert labels_from_form([], "healthy") == ([], "healthy")
    assert labels_from_form([], "tumour") == (None, "tumour")
    assert labels_from_form([7, 6, 7], "unknown") == ([6, 7], "tumour")
    with pytest.raises(InputError, match="healthy"):
        labels_from_form([2], "healthy")
    with pytest.raises(InputError, match="I..VIII"):
        labels_from_form([9], "tumour")


def test_progress_view_formats_eta_and_errors():
    from WeakLiverSegLib.slicer.slicer_logic import format_eta

    assert [format_eta(s) for s in (None, 4.4, 75, 7322)] == ["", "ETA 4 s", "ETA 1 min 15 s", "ETA 2 h 02 min"]
    view = progress_view({"event": "progress", "stage": "student", "step": 3, "total": 12, "eta_s": None})
    assert (view["percent"], view["eta"], view["status"]) == (25, "", "student: 3/12")
    failed = progress_view({"event": "exit", "returncode": 1, "cancelled": False, "error": None})
    assert failed["finished"] and "status 1" in failed["error"]


def test_dependency_list_matches_the_package_requirements():
    """What the Slicer module pip-installs is exactly what pyproject.toml requires."""
    import re

    from WeakLiverSegLib.slicer.slicer_logic import DEPENDENCIES, missing_dependencies

    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):]
    block = block[:block.index("]")]
    required = {re.split(r"[<>=!~ ]", r)[0].lower() for r in re.findall(r'"([^"]+)"', block)}
    offered = {re.split(r"[<>=!~ ]", req)[0].lower() for _, req in DEPENDENCIES}
    assert offered == required
    assert missing_dependencies() == []  # this test environment has them all
