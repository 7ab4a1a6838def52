"""``weakliverseg bench``: speed and peak memory of the main commands, written as JSON.

Each measured command runs as its own child process (the real CLI), timed with a wall clock and
measured with ``os.wait4`` (that child's peak resident memory), so the figures are what a user sees.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def measure(argv, env=None) -> dict:
    """Run ``argv``; return wall seconds, peak RSS (MB) of that process and its exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    peak_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return {"seconds": round(wall, 2), "peak_rss_mb": round(peak_mb, 1), "cpu_user_s": round(usage.ru_utime, 2)}


def _cli(*args):
    return [sys.executable, "-m", "WeakLiverSegLib", *map(str, args)]


def _env(threads):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def bench_phantom(work: Path, device, threads) -> dict:
    out = work / "phantom20"
    r = measure(_cli("phantom", "--out", out, "--cases", 20, "--seed", 1, "--progress", "none"), _env(threads))
    return {"what": "weakliverseg phantom --cases 20 --seed 1 (default shape 96x96x48)", **r}


def _tiny_model(work: Path, device) -> Path:
    """A real o2l model folder at the default architecture (weights barely trained: speed only)."""
    data, model = work / "tiny", work / "model"
    if not (model / "model.json").exists():
        subprocess.run(_cli("phantom", "--out", data, "--cases", 4, "--seed", 0, "--shape", 48, 48, 16,
                            "--mix", "strong=0.5,box=0.5", "--progress", "none"), check=True)
        subprocess.run(_cli("train", "--dataset", data, "--recipe", "o2l", "--out", model, "--steps", 2,
                            "--device", device, "--progress", "none"), check=True)
    return model


def bench_segment_p17(work: Path, device, threads) -> dict:
    ct = SHARED / "ircadb" / "p17" / "ct.nii.gz"
    if not ct.exists():
        return {"skipped": f"{ct} not found"}
    model = _tiny_model(work, device)
    r = measure(_cli("segment", "--model", model, "--input", ct, "--out", work / "p17_pred.nii.gz",
                     "--device", device, "--progress", "none"), _env(threads))
    return {"what": "weakliverseg segment (o2l student) on ircadb/p17 CT 512x512x119, incl. reading/writing",
            "threads": threads, **r, "target": {"seconds": 10, "peak_rss_mb": 1536}}


def bench_evaluate_p17(work: Path, device, threads) -> dict:
    label = SHARED / "ircadb" / "p17" / "label.nii.gz"
    if not label.exists():
        return {"skipped": f"{label} not found"}
    r = measure(_cli("evaluate", "--pred", label, "--truth", label, "--out", work / "m.json"), _env(threads))
    return {"what": "weakliverseg evaluate on the p17 512x512x119 label map against itself", **r}


# LiteMedSAM inference choices timed by ``annotate_p01`` (their Dice: Testing/experiments/annotate_real.py)
ANNOTATE_CHOICES = {
    "default (whole slice, 256 px)": [],
    "crop 128": ["view=crop", "input_size_tumor=128"],
    "crop 128, stride 2": ["view=crop", "input_size_tumor=128", "stride=2"],
    "crop 256": ["view=crop"],
}


def _serve(argv, env, requests) -> tuple:
    """Run ``annotate --serve``, send ``requests`` one at a time; seconds per request + the worker's peak RSS."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    answers = []
    for req in requests:
        t0 = time.perf_counter()
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("event") in ("done", "error") and event.get("id") == req["id"]:
                if event["event"] == "error":
                    proc.kill()
                    raise RuntimeError(f"annotate --serve: {event['message']}")
                answers.append({"seconds": round(time.perf_counter() - t0, 2),
                                "encoded_slices": event.get("encoded_slices")})
                break
    proc.stdin.close()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    proc.stderr.close()
    return answers, round(usage.ru_maxrss / 1024, 1)


def bench_annotate_p01(work: Path, device, threads) -> dict:
    """A warm LiteMedSAM worker on ircadb/p01: the tumour box nearest to 20 slices, per inference
    choice, after a warm-up box; the liver box with the default choice."""
    ct, label = SHARED / "ircadb" / "p01" / "ct.nii.gz", SHARED / "ircadb" / "p01" / "label.nii.gz"
    if not ct.exists():
        return {"skipped": f"{ct} not found"}
    from ..data.boxes import radiologist_boxes
    from ..data.imageio import read_image

    truth = read_image(label)
    boxes = radiologist_boxes(truth.array, truth.spacing)
    tumours = sorted((b for b in boxes if b.label == "tumor"), key=lambda b: b.size_ijk[2])
    timed = min(tumours, key=lambda b: abs(b.size_ijk[2] - 20))
    warm = tumours[0]
    after = tumours[-1] if tumours[-1] is not timed else tumours[-2]
    liver = next(b for b in boxes if b.label == "liver")
    out = {"what": "weakliverseg annotate --serve on ircadb/p01 (512x512x129): seconds from request to labels written",
           "threads": threads, "tumour_box": {"ijk_min": list(timed.ijk_min), "ijk_max": list(timed.ijk_max),
                                              "slices": timed.size_ijk[2]},
           "load_before": round(os.getloadavg()[0], 2), "choices": {}}
    for name, sets in ANNOTATE_CHOICES.items():
        argv = _cli("annotate", "--serve", "--progress", "jsonl", "--device", device,
                    *[a for kv in sets for a in ("--set", kv)])
        reqs = [{"id": "warm-up", "input": str(ct), "boxes": [warm.to_json()], "out": str(work / "warm.nii.gz")},
                {"id": "tumour", "input": str(ct), "boxes": [timed.to_json()], "out": str(work / "t.nii.gz")}]
        if not sets:   # then the liver box, and a tumour box whose slices the liver's already encoded
            reqs.append({"id": "liver", "input": str(ct), "boxes": [liver.to_json()], "out": str(work / "l.nii.gz")})
            reqs.append({"id": "after-liver", "input": str(ct), "boxes": [after.to_json()],
                         "out": str(work / "t2.nii.gz")})
        answers, peak = _serve(argv, _env(threads), reqs)
        row = {"tumour_box": answers[1], "peak_rss_mb": peak}
        row["s_per_encoded_slice"] = round(answers[1]["seconds"] / max(answers[1]["encoded_slices"] or 1, 1), 3)
        if len(answers) > 2:
            row["liver_box"] = answers[2]
            row["tumour_box_after_the_liver"] = {**answers[3], "slices": after.size_ijk[2]}
        out["choices"][name] = row
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["target"] = {"tumour_box_seconds": 8}
    return out


def _batch_input(work: Path, cases: int) -> Path:
    """``cases`` phantom CTs at a CT-like grid (256x256x80, 0.8 mm) as plain NIfTI files in one folder."""
    import shutil

    store, folder = work / "batch_store", work / "batch_in"
    if not folder.is_dir():
        subprocess.run(_cli("phantom", "--out", store, "--cases", cases, "--seed", 3, "--shape", 256, 256, 80,
                            "--spacing", 0.8, 0.8, 2.5, "--progress", "none"), check=True)
        folder.mkdir()
        for image in sorted((store / "images").glob("*_enhanced.nii.gz")):
            shutil.copy(image, folder / image.name)
    return folder


def _batch_summary(out: Path) -> dict:
    return json.loads((out / "batch_summary.json").read_text())["counts"]


def bench_batch(work: Path, device, threads) -> dict:
    """``segment --input DIR --out DIR --jobs N`` over 10 volumes: volumes per minute with 1 and 2 jobs
    (the threads shared out over the jobs), and a batch killed after its first volumes, resumed."""
    import signal

    n = 10
    folder, model = _batch_input(work, n), _tiny_model(work, device)
    out = {"what": f"weakliverseg segment --input DIR --jobs N, {n} phantom CTs 256x256x80 (o2l model)",
           "threads": threads, "load_before": round(os.getloadavg()[0], 2), "jobs": {}}
    for jobs in (1, 2):
        r = measure(_cli("segment", "--model", model, "--input", folder, "--out", work / f"batch_j{jobs}",
                         "--jobs", jobs, "--device", device, "--progress", "none"), _env(threads))
        out["jobs"][str(jobs)] = {**r, "volumes_per_minute": round(n * 60 / r["seconds"], 2),
                                  "statuses": _batch_summary(work / f"batch_j{jobs}")}
    # interrupted: SIGTERM once three outputs exist, then the same command again
    target = work / "batch_killed"
    argv = _cli("segment", "--model", model, "--input", folder, "--out", target, "--jobs", 1, "--device", device,
                "--progress", "none")
    proc = subprocess.Popen(argv, env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(target.glob("*.nii.gz"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    written = len(list(target.glob("*.nii.gz")))
    r = measure(argv, _env(threads))
    out["killed_then_resumed"] = {"outputs_before_resume": written, "exit_code_of_killed_run": proc.returncode,
                                  **r, "statuses": _batch_summary(target)}
    out["load_after"] = round(os.getloadavg()[0], 2)
    return out


def bench_ddp(work: Path, device, threads) -> dict:
    """o2l training steps per second with torchrun on 1 and on 2 CPU processes (gloo), the same
    global batch; each process gets threads / processes threads."""
    data = work / "ddp_store"
    if not data.is_dir():
        subprocess.run(_cli("phantom", "--out", data, "--cases", 6, "--seed", 0, "--shape", 96, 96, 32,
                            "--mix", "strong=0.5,box=0.5", "--progress", "none"), check=True)
    steps = 40
    out = {"what": f"torchrun -m WeakLiverSegLib train --recipe o2l, {steps} steps (teacher + student), "
                   f"batch 8, 6 phantom cases 96x96x32", "threads": threads,
           "load_before": round(os.getloadavg()[0], 2), "processes": {}}
    for procs in (1, 2):
        model = work / f"ddp_model_{procs}"
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                "-m", "WeakLiverSegLib", "train", "--dataset", str(data), "--recipe", "o2l", "--out", str(model),
                "--steps", str(steps), "--device", "cpu", "--progress", "none"]
        r = measure(argv, _env(max(1, threads // procs)))
        seconds = json.loads((model / "model.json").read_text())["training"]["seconds"]
        train_s = seconds.get("teacher", 0) + seconds.get("student", 0)
        out["processes"][str(procs)] = {**r, "train_seconds": round(train_s, 2),
                                        "steps_per_second": round(steps / train_s, 3) if train_s else None}
    out["load_after"] = round(os.getloadavg()[0], 2)
    return out


def bench_demo(work: Path, device, threads) -> dict:
    """``weakliverseg demo`` end to end: wall, peak memory, the stages' seconds and the held-out Dice."""
    r = measure(_cli("demo", "--out", work / "demo", "--device", device, "--progress", "none"), _env(threads))
    summary = json.loads((work / "demo" / "demo.json").read_text())
    return {"what": "weakliverseg demo (default cohort and steps)", "threads": threads, **r,
            "load_after": round(os.getloadavg()[0], 2), "demo": summary, "target": {"seconds": 360}}


BENCHMARKS = {"phantom": bench_phantom, "segment_p17": bench_segment_p17, "evaluate_p17": bench_evaluate_p17,
              "annotate_p01": bench_annotate_p01, "batch": bench_batch, "ddp": bench_ddp, "demo": bench_demo}


def run_benchmarks(out, which="all", device="cpu", progress=None, threads=2) -> dict:
    names = list(BENCHMARKS) if which == "all" else [w.strip() for w in which.split(",")]
    from ..errors import InputError

    for name in names:
        if name not in BENCHMARKS:
            raise InputError(f"--which: unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "device": str(device)},
              "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="wls-bench-") as tmp:
        for n, name in enumerate(names):
            result["benchmarks"][name] = BENCHMARKS[name](Path(tmp), str(device), threads)
            if progress is not None:
                progress.update("bench", n + 1, len(names), benchmark=name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
