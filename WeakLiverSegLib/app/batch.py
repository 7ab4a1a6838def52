"""Batch segmentation: ``weakliverseg segment --input DIR_OR_LIST --out DIR [--jobs N]``.

The input is a folder (NIfTI / NRRD / MHA files anywhere under it, and DICOM series: one case per
folder holding a series) or a text file listing image files / DICOM folders, one a line (blank
lines and ``#`` comments ignored, relative paths relative to the list file).  Every case is
segmented into ``DIR/<case id>.nii.gz``; the model is loaded once per worker (``--jobs`` worker
processes, 1 = in this process).  A case whose output already exists and reads back as a valid
label map is skipped, so an interrupted batch is resumed by running the same command again.  A
failing case is recorded with its message and the others go on.  ``DIR/batch_summary.json``
(rewritten atomically after every case) lists per case ``id``, ``input``, ``output``,
``seconds``, ``status`` (ok | skipped | failed) and ``message``; overall progress goes through
the usual Progress protocol (stage ``batch``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import Cancelled, InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LIST_SUFFIXES = (".txt", ".lst", ".list")
SUMMARY_NAME = "batch_summary.json"
OUTPUT_SUFFIX = ".nii.gz"


def _image_suffix(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):   # a segmentation, not an image
        return None
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def _has_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    if not any(p.is_file() and _image_suffix(p) is None for p in folder.iterdir()):
        return False
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def is_batch_input(items) -> bool:
    """``segment --input X`` is a batch when X (given once, without PHASE=) is a list file, or a
    folder that is not itself one DICOM series (it holds image files, or series in sub-folders)."""
    if len(items) != 1:
        return False
    path = Path(items[0])
    if path.is_file():
        return path.name.lower().endswith(LIST_SUFFIXES)
    if not path.is_dir():
        return False
    if any(p.is_file() and _image_suffix(p) for p in path.iterdir()):
        return True
    return not _has_dicom_series(path) and any(p.is_dir() for p in path.iterdir())


def find_cases(source, out_dir=None) -> list[dict]:
    """``[{"id", "input"}]`` for a folder or a list file, in a stable (sorted) order; ids are unique
    (relative path without the image suffix, ``/`` -> ``_``; ``-2``, ``-3`` on collisions)."""
    source = Path(source)
    entries = []   # (name for the id, path)
    if source.is_file():
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = Path(line).expanduser()
            if not path.is_absolute():
                path = source.parent / path
            suffix = _image_suffix(path)
            name = path.name[: -len(suffix)] if suffix else path.name
            entries.append((name or f"line{n}", path))
    else:
        out_dir = Path(out_dir).resolve() if out_dir is not None else None
        for folder, dirs, files in os.walk(source):
            folder = Path(folder)
            if out_dir is not None and (folder.resolve() == out_dir or out_dir in folder.resolve().parents):
                dirs[:] = []
                continue
            dirs.sort()
            rel = folder.relative_to(source)
            for f in sorted(files):
                suffix = _image_suffix(Path(f))
                if suffix:
                    name = "_".join([*rel.parts, f[: -len(suffix)]])
                    entries.append((name, folder / f))
            if folder != source and _has_dicom_series(folder):
                entries.append(("_".join(rel.parts), folder))
    if not entries:
        raise InputError(f"--input {source}: no images found (NIfTI / NRRD / MHA files or DICOM series)")
    cases, seen = [], {}
    for name, path in entries:
        seen[name] = seen.get(name, 0) + 1
        cid = name if seen[name] == 1 else f"{name}-{seen[name]}"
        cases.append({"id": cid, "input": str(path)})
    return cases


def output_is_valid(path) -> bool:
    """An earlier run's output: present and readable as a label map (written atomically, so present
    means complete unless it was damaged since)."""
    from ..data.imageio import read_label_map

    path = Path(path)
    if not path.is_file():
        return False
    try:
        read_label_map(path)
        return True
    except Exception:
        return False


class _Segmenter:
    """A model loaded once; ``run(case)`` segments one image and writes its label map."""

    def __init__(self, model_path, device):
        from ..learn.modelstore import load_model
        from .cli import model_recipe

        self.device = device
        self.model = load_model(model_path, device=device)
        self.recipe = model_recipe(self.model)
        inp = self.model.meta.get("input", {}) or {}
        phases = list(inp.get("inference_phases") or inp.get("phases") or [])
        if len(phases) > 1:
            raise InputError(f"--input: batch segmentation gives one image per case, but the model "
                             f"({Path(model_path) / 'model.json'}) reads phases {phases}; segment its cases one by one "
                             f"with --input PHASE=PATH")
        self.phase = phases[0] if phases else "ct"

    def run(self, case: dict) -> dict:
        from ..data.imageio import check_finite, read_image, write_label_map
        from .progress import Progress

        start = time.monotonic()
        try:
            image = read_image(case["input"])
            check_finite(image, where=case["input"])
            result = self.recipe.segment(self.model, {self.phase: image}, boxes=None, device=self.device,
                                         progress=Progress("none"))
            write_label_map(result.labels, case["output"])
            status, message = "ok", None
        except (Cancelled, KeyboardInterrupt):
            raise
        except InputError as exc:
            status, message = "failed", str(exc).replace("\n", " ")
        except Exception as exc:  # a bug or an odd file: reported per case, the batch goes on
            status, message = "failed", f"internal error: {type(exc).__name__}: {exc}".replace("\n", " ")
        return dict(case, seconds=round(time.monotonic() - start, 3), status=status, message=message)


_WORKER: _Segmenter | None = None


def _worker_init(model_path, device, threads):
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    _WORKER = _Segmenter(model_path, device)


def _worker_run(case):
    return _WORKER.run(case)


def _write_summary(path: Path, summary: dict) -> None:
    from ..data.safeio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"), what="batch summary")


def run_batch(model_path, source, out_dir, jobs: int = 1, device: str = "cpu", progress=None) -> dict:
    """Segment every case of ``source`` into ``out_dir``; returns the summary (also written to
    ``out_dir/batch_summary.json``).  Per-case failures are in the summary, not raised."""
    from .progress import Progress

    progress = progress or Progress("none")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: must be 1 or more")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: batch segmentation writes a folder, and this is a file")
    cases = find_cases(source, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / SUMMARY_NAME
    start = time.monotonic()
    results: dict[str, dict] = {}
    todo = []
    for case in cases:
        case["output"] = str(out_dir / f"{case['id']}{OUTPUT_SUFFIX}")
        if output_is_valid(case["output"]):
            results[case["id"]] = dict(case, seconds=0.0, status="skipped", message="output exists")
        else:
            todo.append(case)

    def summary():
        rows = [results[c["id"]] for c in cases if c["id"] in results]
        counts = {k: sum(r["status"] == k for r in rows) for k in ("ok", "skipped", "failed")}
        counts["pending"] = len(cases) - len(rows)
        return {"format": "weakliverseg-batch", "version": 1, "model": str(model_path), "input": str(source),
                "out": str(out_dir), "jobs": jobs, "device": device, "cases": rows, "counts": counts,
                "seconds": round(time.monotonic() - start, 3)}

    def record(result):
        results[result["id"]] = result
        _write_summary(summary_path, summary())
        c = summary()["counts"]
        progress.update("batch", len(results), len(cases), case=result["id"], status=result["status"],
                        ok=c["ok"], skipped=c["skipped"], failed=c["failed"])
        if result["status"] == "failed":
            progress.log(f"{result['id']}: failed: {result['message']}")

    _write_summary(summary_path, summary())
    progress.update("batch", len(results), len(cases), ok=0, skipped=len(results), failed=0)
    if todo and jobs == 1:
        segmenter = _Segmenter(model_path, device)
        for case in todo:
            progress.check_cancelled()
            record(segmenter.run(case))
    elif todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        _check_model(model_path, device)  # a bad model: one clear error, not N broken workers
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(str(model_path), device, threads)) as pool:
            futures = {pool.submit(_worker_run, case): case for case in todo}
            try:
                for fut in as_completed(futures):
                    progress.check_cancelled()
                    try:
                        record(fut.result())
                    except (Cancelled, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # the worker died (out of memory, killed)
                        case = futures[fut]
                        record(dict(case, seconds=None, status="failed",
                                    message=f"worker failed: {type(exc).__name__}: {exc}"))
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    final = summary()
    _write_summary(summary_path, final)
    return final


def _check_model(model_path, device) -> None:
    """Load the model once here so a bad model is one clear error, not N dead workers."""
    _Segmenter(model_path, device)
