"""``weakliverseg evaluate``: pair predictions with truth, score them, write ``metrics.json``.

Pairing: ``--pred`` and ``--truth`` are each a label-map file or a folder of them. A case id
is the file name without its extension (``.seg.nrrd``, ``.nii.gz``, ``.nii``, ``.nrrd``,
``.nhdr``, ``.mha``, ``.mhd``) and without one optional suffix among ``_pred``,
``_prediction``, ``_label``, ``_labels``, ``_seg``, ``_mask``, ``_truth``, ``_prob``,
``_probabilities`` — so ``case007_pred.nii.gz`` pairs with ``case007.seg.nrrd``. Two folders
must hold the same ids. ``--truth`` may also be a weak-label store folder (with
``dataset.json``): each predicted id is looked up there and scored against the case's
``truth.mask`` or, failing that, its ``mask``. ``--probabilities`` (tumour probability maps) is
a file or folder paired the same way.

Cases are read and scored one at a time (only running sums are kept), so big cohorts fit in
memory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..data.dicom_seg import is_dicom_seg, place_on_grid
from ..data.imageio import read_image, read_label_map
from .metrics import DEFAULT_LABELS, GlobalSums, case_metrics, summarize

EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")  # .dcm: DICOM SEG
ID_SUFFIXES = ("_pred", "_prediction", "_label", "_labels", "_seg", "_mask", "_truth", "_prob",
               "_probabilities")
STORE_MANIFEST = "dataset.json"


def parse_labels(text) -> dict:
    """``"liver=1,tumor=2"`` -> ``{"liver": 1, "tumor": 2}``; None or "" -> the defaults."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return dict(DEFAULT_LABELS)
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise InputError(f"--labels: expected NAME=VALUE pairs like liver=1,tumor=2, got {part.strip()!r}")
            items.append((name.strip(), value.strip()))
    labels = {}
    for name, value in items:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InputError(f"--labels: value of {name!r} must be an integer 1..255, got {value!r}") from None
        if not 1 <= number <= 255:
            raise InputError(f"--labels: value of {name!r} must be 1..255 (0 is background), got {number}")
        if name in labels:
            raise InputError(f"--labels: label {name!r} given twice")
        if number in labels.values():
            raise InputError(f"--labels: value {number} given to two labels")
        labels[name] = number
    return labels


def case_id(path) -> str | None:
    """Case id of a label / probability file name; None when it is not an image file."""
    name = Path(path).name
    lower = name.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    for suffix in ID_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def list_cases(folder, role: str) -> dict:
    """``{case id: path}`` of the image files of a folder (hidden and other files ignored)."""
    folder = Path(folder)
    found: dict = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        cid = case_id(path)
        if cid is None:
            continue
        if cid in found:
            raise InputError(f"{role} {folder}: case id {cid!r} is given by two files, {found[cid].name} and {path.name}")
        found[cid] = path
    if not found:
        raise InputError(f"{role} {folder}: no label files ({', '.join(EXTENSIONS)}) in this folder")
    return found


def evaluate(pred, truth, labels=None, probabilities=None, progress=None) -> dict:
    """Score predictions against truth: the ``metrics.json`` dict (see DESIGN.md, CLI).

    ``{"labels": {...}, "cases": {id: {"liver": {...}, "tumor": {...}}}, "summary": {...}}``;
    metric definitions and empty-set conventions are those of ``metrics``.
    """
    labels = parse_labels(labels)
    pairs = _pair(Path(pred), Path(truth), None if probabilities is None else Path(probabilities))
    accum = GlobalSums(labels=dict(labels))
    per_case = {}
    for step, (cid, pred_path, truth_source, prob_path) in enumerate(pairs):
        if progress is not None:
            progress.check_cancelled()
            progress.update("evaluate", step, len(pairs), case=cid)
        pred_volume = read_label_map(pred_path)
        truth_volume, truth_name = truth_source()
        if not pred_volume.same_grid(truth_volume) and is_dicom_seg(truth_name):
            truth_volume = place_on_grid(truth_volume, pred_volume, truth_name)  # a SEG may omit empty frames
        if not pred_volume.same_grid(truth_volume):
            raise InputError(f"{pred_path} and {truth_name}: prediction and truth grids differ "
                             f"({pred_volume.grid_difference(truth_volume)})")
        _check_values(pred_volume.array, labels, pred_path)
        _check_values(truth_volume.array, labels, truth_name)
        prob = _read_probabilities(prob_path, truth_volume, truth_name) if prob_path else None
        per_case[cid] = case_metrics(pred_volume.array, truth_volume.array, truth_volume.spacing,
                                     labels=labels, probabilities=prob, accum=accum)
    if progress is not None:
        progress.update("evaluate", len(pairs), len(pairs))
    return {"labels": dict(labels), "cases": per_case, "summary": summarize(per_case, accum)}


def write_metrics(metrics: dict, path) -> Path:
    """Write ``metrics`` as strict JSON (NaN / inf -> null), atomically (temp + fsync + rename)."""
    path = Path(path)
    text = json.dumps(_strict(metrics), indent=2, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write metrics ({exc.strerror or exc})") from None
    return path


def format_table(metrics: dict) -> str:
    """Terminal table: one row per case and label, then the cohort means and pooled figures."""
    columns = [("dice", "dice"), ("jaccard", "jacc"), ("recall", "recall"), ("precision", "prec"),
               ("specificity", "spec"), ("hd95_mm", "hd95mm"), ("assd_mm", "assdmm"), ("kappa", "kappa")]
    header = ["case", "label"] + [short for _, short in columns] + ["lesions tp/fp/fn"]
    cases = metrics.get("cases", {})
    summary = metrics.get("summary", {})
    case_rows = [[str(cid), name] + [_fmt(values.get(key)) for key, _ in columns] + [_lesions(values)]
                 for cid, per_label in cases.items() for name, values in per_label.items()]
    mean_rows = [["mean", name] + [_fmt(dict(values, dice=values.get("dice_per_case")).get(key)) for key, _ in columns]
                 + [_lesions(values)] for name, values in summary.items()]
    widths = [max(len(row[i]) for row in [header] + case_rows + mean_rows) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def line(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(header), rule] + [line(r) for r in case_rows] + [rule] + [line(r) for r in mean_rows]
    for name, values in summary.items():
        pooled = [f"dice global {_fmt(values.get('dice_global'))}"]
        if "burden_rmse" in values:
            pooled.append(f"burden RMSE {_fmt(values.get('burden_rmse'))}")
        if "auc" in values:
            pooled.append(f"AUC {_fmt(values.get('auc'))}")
        out.append(f"{name}: " + ", ".join(pooled) + f" over {len(cases)} case{'s' if len(cases) != 1 else ''}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------- pairing


def _pair(pred: Path, truth: Path, probabilities: Path | None) -> list:
    """``[(case id, pred path, truth reader () -> (Volume, name), prob path | None)]``."""
    if not pred.exists():
        raise InputError(f"--pred {pred}: no such file or folder")
    if not truth.exists():
        raise InputError(f"--truth {truth}: no such file or folder")
    if probabilities is not None and not probabilities.exists():
        raise InputError(f"--probabilities {probabilities}: no such file or folder")

    if pred.is_dir():
        preds = list_cases(pred, "--pred")
    else:
        cid = case_id(pred)
        if cid is None:
            raise InputError(f"--pred {pred}: not a label file (expected one of {', '.join(EXTENSIONS)})")
        preds = {cid: pred}

    if truth.is_dir() and (truth / STORE_MANIFEST).is_file():
        truths = _store_truths(truth, preds)
    elif truth.is_dir():
        files = list_cases(truth, "--truth")
        if pred.is_dir():
            _check_same_ids(preds, files, pred, truth)
        elif next(iter(preds)) not in files:
            raise InputError(f"--truth {truth}: no truth file for case {next(iter(preds))!r} (from {pred.name})")
        truths = {cid: _file_reader(files[cid]) for cid in preds}
    else:
        if pred.is_dir():
            raise InputError(f"--truth {truth} is a single file but --pred {pred} is a folder; give a truth folder")
        if case_id(truth) is None:
            raise InputError(f"--truth {truth}: not a label file (expected one of {', '.join(EXTENSIONS)})")
        truths = {cid: _file_reader(truth) for cid in preds}

    probs: dict = {}
    if probabilities is not None:
        if probabilities.is_dir():
            found = list_cases(probabilities, "--probabilities")
            missing = sorted(set(preds) - set(found))
            if missing:
                raise InputError(f"--probabilities {probabilities}: no probability file for cases {_ids(missing)}")
            probs = {cid: found[cid] for cid in preds}
        elif pred.is_dir():
            raise InputError(f"--probabilities {probabilities} is a single file but --pred {pred} is a folder")
        else:
            probs = {cid: probabilities for cid in preds}
    return [(cid, path, truths[cid], probs.get(cid)) for cid, path in preds.items()]


def _check_same_ids(preds: dict, truths: dict, pred: Path, truth: Path) -> None:
    no_truth = sorted(set(preds) - set(truths))
    no_pred = sorted(set(truths) - set(preds))
    if no_truth:
        raise InputError(f"--truth {truth}: no truth file for predicted cases {_ids(no_truth)} (from {pred})")
    if no_pred:
        raise InputError(f"--pred {pred}: no prediction for truth cases {_ids(no_pred)} (from {truth})")


def _file_reader(path: Path):
    return lambda: (read_label_map(path), str(path))


def _store_truths(root: Path, preds: dict) -> dict:
    """Truth readers from a weak-label store: each case's ``truth.mask``, else its ``mask``."""
    from ..data.store import Dataset

    dataset = Dataset.load(root)
    missing = sorted(set(preds) - set(dataset.cases))
    if missing:
        raise InputError(f"--truth {root}: dataset has no cases {_ids(missing)} (ids from --pred)")
    readers = {}
    for cid in preds:
        case = dataset.cases[cid]
        key = "truth.mask" if (case.truth or {}).get("mask") else "mask" if case.mask else None
        if key is None:
            raise InputError(f"--truth {root}: case {cid!r} has neither a truth mask nor a mask to score against")
        readers[cid] = _store_reader(dataset, cid, key, root)
    return readers


def _store_reader(dataset, cid: str, key: str, root: Path):
    def read():
        volume = dataset.read_truth(cid) if key == "truth.mask" else dataset.read_mask(cid)
        return volume, f"{root} case {cid} {key}"
    return read


# ---------------------------------------------------------------------------------- checking


def _check_values(array: np.ndarray, labels: dict, where) -> None:
    """Every voxel must be background or one of the scored label values."""
    if array.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        present = np.unique(array)
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in labels.values())
    if unknown:
        known = ",".join(f"{k}={v}" for k, v in labels.items())
        raise InputError(f"{where}: label values {unknown} are not among the scored labels ({known}); "
                         f"pass --labels with every value used")


def _read_probabilities(path: Path, reference, truth_name) -> np.ndarray:
    volume = read_image(path)
    if not volume.same_grid(reference):
        raise InputError(f"{path} and {truth_name}: probability and truth grids differ "
                         f"({volume.grid_difference(reference)})")
    prob = volume.array
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    low, high = float(np.min(prob)), float(np.max(prob))
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0.0 or high > 1.0:
        raise InputError(f"{path}: probabilities must lie in [0, 1], found {low:g}..{high:g}")
    return prob


# ---------------------------------------------------------------------------------- printing


def _strict(value):
    """numpy scalars / arrays to Python, non-finite floats to None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _lesions(values: dict) -> str:
    if "lesions_tp" not in values:
        return ""
    return f"{values['lesions_tp']}/{values['lesions_fp']}/{values['lesions_fn']}"


def _ids(ids) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:5])
    return f"[{shown}{', ...' if len(ids) > 5 else ''}] ({len(ids)})" if len(ids) > 5 else f"[{shown}]"
