"""torchrun training (learn/distributed.py) on the CPU with gloo and 2 processes: the loss of the
global batch matches a single process, rank 0 alone writes, and a DDP checkpoint resumes in one process."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from WeakLiverSegLib.app.progress import Progress
from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
from WeakLiverSegLib.data.store import Dataset
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import Cancelled

# per-shard BatchNorm statistics are the one difference from a single process (not synchronised on gloo)
TOLERANCE = 0.05   # relative, on every logged loss
CFG = {"channels": [4, 8, 8, 8], "crop": 32, "batch_size": 4, "infer_batch": 4, "checkpoint_every": 2,
       "teacher": {"steps": 3}, "student": {"steps": 3}}
GEO = dict(spacing=(1.5, 1.5, 3.0), origin=(0, 0, 0))


def _store(root):
    ds = Dataset.create(root, name="tiny")
    rng = np.random.default_rng(0)
    shape = (8, 32, 32)
    for n in range(3):
        z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
        cy, cx = 14 + rng.integers(-2, 3), 12 + rng.integers(-2, 3)
        labels = ((((y - cy) / 8) ** 2 + ((x - cx) / 9) ** 2 < 1) & (z >= 1) & (z <= 6)).astype(np.uint8)
        labels[(((y - cy) / 3) ** 2 + ((x - cx - 2) / 3) ** 2 < 1) & (z >= 2) & (z <= 4)] = 2
        hu = (np.where(labels == 1, 120, 40) + np.where(labels == 2, 20, 0) + rng.normal(0, 5, shape)).astype(np.int16)
        ds.add_case(f"c{n}", {"enhanced": Volume(hu, **GEO)}, mask=Volume(labels, **GEO) if n < 2 else None,
                    boxes=boxes_from_mask(labels, 2), liver_box=liver_box_from_mask(labels))
    return ds


class _CancelAt(Progress):
    def __init__(self, stage, step):
        super().__init__("none")
        self.at = (stage, step)

    def update(self, stage, step, total, **fields):
        super().update(stage, step, total, **fields)
        if (stage, step) == self.at:
            self.cancelled = True


def _worker(rank, world, port, store, out, cancel_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from WeakLiverSegLib.learn.distributed import init_from_env
    from WeakLiverSegLib.recipes import o2l

    device = init_from_env("cpu")
    progress = _CancelAt(*cancel_at) if cancel_at else Progress("none")
    try:
        o2l.train(Dataset.load(store), out, dict(CFG), device, progress)
    except Cancelled:
        pass
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curves(model):
    return json.loads((model / "model.json").read_text())["training"]["curves"]


def _close(a, b):
    for stage in ("teacher", "student"):
        sa, sb = np.array(a[stage]), np.array(b[stage])
        assert sa.shape == sb.shape and (sa[:, 0] == sb[:, 0]).all(), stage
        np.testing.assert_allclose(sb[:, 1], sa[:, 1], rtol=TOLERANCE, err_msg=stage)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_one_and_resume_in_one(tmp_path):
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.recipes import o2l

    torch.set_num_threads(1)
    store = _store(tmp_path / "ds")
    single = o2l.train(store, tmp_path / "single", dict(CFG), "cpu", Progress("none"))

    mp.spawn(_worker, args=(2, _free_port(), str(store.root), str(tmp_path / "ddp"), None), nprocs=2)
    ddp = tmp_path / "ddp"
    assert not (ddp / "checkpoint").exists()           # cleared by rank 0 after the model
    _close(_curves(single), _curves(ddp))
    assert load_model(ddp).networks["student"] is not None

    # interrupted after teacher step 2 on 2 processes (rank 0 wrote the checkpoint) -> --resume on 1
    part = tmp_path / "part"
    mp.spawn(_worker, args=(2, _free_port(), str(store.root), str(part), ("teacher", 2)), nprocs=2)
    meta = json.loads((part / "checkpoint" / "checkpoint.json").read_text())
    assert (meta["stage"], meta["step"]) == ("teacher", 2) and not (part / "model.json").exists()
    resumed = o2l.train(store, part, dict(CFG), "cpu", Progress("none"), resume=True)
    _close(_curves(single), _curves(resumed))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_command_trains_and_rank0_alone_reports(tmp_path):
    """The command the README gives: torchrun (torch.distributed.run) on the CLI, 2 CPU processes."""
    import subprocess
    import sys

    store = _store(tmp_path / "ds")
    (tmp_path / "o2l.json").write_text(json.dumps(CFG))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "WeakLiverSegLib", "train", "--dataset", str(store.root), "--recipe", "o2l",
            "--out", str(tmp_path / "m"), "--config", str(tmp_path / "o2l.json"), "--device", "cpu",
            "--progress", "jsonl"]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    done = [json.loads(line) for line in run.stdout.splitlines() if '"event": "done"' in line]
    assert len(done) == 1 and done[0]["model"] == str(tmp_path / "m")    # rank 0 alone reports
    assert not (tmp_path / "m" / "checkpoint").exists()
    assert len(_curves(tmp_path / "m")["student"]) == CFG["student"]["steps"]
