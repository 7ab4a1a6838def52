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
