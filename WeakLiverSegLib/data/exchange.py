"""Dataset exchange: a weak-label store out to the layouts other tools train on, and back in.

``export_dataset(dataset, out, fmt, pseudo=...)`` writes one of

* ``nnunet``: an nnU-Net v2 raw dataset: ``imagesTr/{case}_{XXXX}.nii.gz`` (one channel per
  phase, ``_0000`` the first), ``labelsTr/{case}.nii.gz``, ``imagesTs/`` for the test split, and
  ``dataset.json`` with ``channel_names`` (``"CT"`` for every phase, so nnU-Net uses its CT
  normalisation), ``labels`` (background 0, liver 1, tumor 2), ``numTraining`` and
  ``file_ending``.  Name the folder ``DatasetNNN_Name`` inside ``nnUNet_raw``.
* ``msd``: a Medical Segmentation Decathlon style folder for MONAI (``load_decathlon_datalist``,
  Auto3DSeg, bundles): ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and ``dataset.json`` with
  ``modality``, ``labels`` and the ``training`` / ``validation`` / ``test`` lists (the store's
  splits); a multi-phase case lists one file per phase as its ``image`` (MONAI loads a list as
  channels).
* ``nifti``: plain ``images/{case}_{phase}.nii.gz`` and ``labels/{case}.nii.gz`` plus
  ``export.json``.

Which labels are expert and which pseudo: the store's masks are ``expert``; ``pseudo`` (case id
-> label file, e.g. from a teacher's ``pseudo`` store) fills cases without a mask and is marked
``pseudo``.  Every format records this in its JSON (``weakliverseg.label_sources``, and
``label_source`` in each MSD item); train / val cases with neither are skipped and listed
(``weakliverseg.skipped``).  The export is written to a temporary folder beside ``out`` and
renamed into place; an ``out`` that exists (other than an empty folder) is refused.

``import_dataset(source, out)`` reads an nnU-Net v2 raw dataset or an MSD-style folder (this
module's exports included) into a new store: phases from the channel / modality names, label
values mapped by name (liver; tumor / tumour / cancer / lesion / neoplasm), unknown label names
refused with their names; pseudo-labels of our own exports are not taken as masks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from .volume import Volume

FORMATS = ("nnunet", "msd", "nifti")
LABELS = {"background": 0, "liver": 1, "tumor": 2}
EXPORT_FORMAT = "weakliverseg-export"
_TUMOR_NAMES = {"tumor", "tumour", "liver tumor", "liver tumour", "cancer", "lesion", "liver lesion", "neoplasm",
                "liver cancer", "hcc", "metastasis"}


# ----------------------------------------------------------------------------------- export


def check_target(out) -> Path:
    """``out`` may be new or an empty folder; anything else is refused (never overwritten)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(f"{out}: export target already exists; choose a new folder (nothing was written)")
    return out


def export_dataset(dataset, out, fmt: str, pseudo: dict | None = None, pseudo_source: dict | None = None,
                   phases=None, progress=None) -> dict:
    """Write ``dataset`` (a ``store.Dataset``) to ``out`` in format ``fmt``; returns the summary.

    ``pseudo``: case id -> label file (on the case's reference grid) for cases without a mask;
    ``pseudo_source``: what made them (model folder, recipe), recorded in the export.
    ``phases``: the phases to export, in channel order (default: those every case has, in the
    first case's order).  Summary: ``{"format", "out", "training", "validation", "test",
    "label_sources": {id: "expert" | "pseudo"}, "skipped": {id: reason}, "phases"}``.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    out = check_target(out)
    pseudo = dict(pseudo or {})
    cases = list(dataset.cases.values())
    if not cases:
        raise InputError(f"{dataset.root}: the dataset has no cases to export")
    if phases is None:
        phases = [p for p in cases[0].images if all(p in c.images for c in cases)]
        if not phases:
            raise InputError(f"{dataset.root}: no phase is common to all cases ({sorted({p for c in cases for p in c.images})}); "
                             "choose the phases to export")
    else:
        phases = list(phases)
        lacking = [c.id for c in cases if any(p not in c.images for p in phases)]
        if lacking:
            raise InputError(f"{dataset.root}: cases {lacking[:10]} lack one of the phases {phases}")
    unknown = sorted(set(pseudo) - set(dataset.cases))
    if unknown:
        raise InputError(f"pseudo-labels given for cases {unknown[:10]} that are not in {dataset.root}")

    plan = []  # (case, label source file or None, "expert" | "pseudo" | None, role)
    skipped = {}
    for case in cases:
        if case.split == "test":
            plan.append((case, None, None, "test"))
            continue
        if case.mask is not None:
            plan.append((case, dataset.root / case.mask, "expert", case.split))
        elif case.id in pseudo:
            plan.append((case, Path(pseudo[case.id]), "pseudo", case.split))
        else:
            skipped[case.id] = ("no mask and no pseudo-label" if pseudo_source
                                else "no mask (weak labels only; --include-pseudo MODEL gives them pseudo-labels)")
    if not any(role != "test" for _, _, _, role in plan):
        raise InputError(f"{dataset.root}: no case has a mask{' or a pseudo-label' if pseudo else ''}; nothing to train on "
                         "(use --include-pseudo MODEL for weak-only cases)")

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = {"nnunet": _write_nnunet, "msd": _write_msd, "nifti": _write_nifti}[fmt]
        summary = writer(dataset, tmp, plan, phases, progress)
        provenance = {
            "exported_from": str(Path(dataset.root).resolve()),
            "software": f"WeakLiverSeg {__version__}",
            "phases": list(phases),
            "label_sources": {case.id: source for case, _, source, role in plan if role != "test"},
            "validation": [case.id for case, _, _, role in plan if role == "val"],
            "pseudo_labels": pseudo_source,
            "skipped": skipped,
        }
        meta_path = tmp / ("export.json" if fmt == "nifti" else "dataset.json")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["weakliverseg"] = provenance
        meta_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # the empty folder check_target accepted
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.update(format=fmt, out=str(out), label_sources=provenance["label_sources"], skipped=skipped,
                   phases=list(phases))
    return summary


def _copy(src: Path, dst: Path) -> None:
    """Copy a store file (NIfTI already); other formats are converted to NIfTI."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.lower().endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        from .imageio import read_image, write_image

        write_image(read_image(src), dst)


def _copy_label(src: Path, dst: Path, where: str) -> None:
    """Labels must hold 0 / 1 / 2 only (a pseudo store's masks do; anything else is refused)."""
    from .imageio import read_label_map, write_image

    if src.name.lower().endswith(".nii.gz"):
        volume = read_label_map(src)
        bad = sorted(set(np.unique(volume.array).tolist()) - set(LABELS.values()))
        if bad:
            raise InputError(f"{where} ({src}): label values {bad}; only 0, 1, 2 are exported")
        _copy(src, dst)
    else:
        write_image(read_label_map(src), dst)


def _step(progress, n, total, cid):
    if progress is not None:
        progress.check_cancelled()
        progress.update("export", n, total, case=cid)


def _write_nnunet(dataset, root: Path, plan, phases, progress) -> dict:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir()
    training = test = 0
    for n, (case, label, source, role) in enumerate(plan):
        _step(progress, n, len(plan), case.id)
        images = "imagesTs" if role == "test" else "imagesTr"
        for channel, phase in enumerate(phases):
            _copy(dataset.root / case.images[phase], root / images / f"{case.id}_{channel:04d}.nii.gz")
        if role == "test":
            test += 1
        else:
            _copy_label(label, root / "labelsTr" / f"{case.id}.nii.gz", f"{case.id} {source} label")
            training += 1
    meta = {
        "name": dataset.name or Path(dataset.root).name,
        "description": "exported from a WeakLiverSeg weak-label store",
        "channel_names": {str(i): "CT" for i in range(len(phases))},
        "labels": dict(LABELS),
        "numTraining": training,
        "file_ending": ".nii.gz",
        "channel_phases": {str(i): phase for i, phase in enumerate(phases)},
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return {"training": training, "validation": 0, "test": test}


def _write_msd(dataset, root: Path, plan, phases, progress) -> dict:
    lists = {"training": [], "validation": [], "test": []}
    for n, (case, label, source, role) in enumerate(plan):
        _step(progress, n, len(plan), case.id)
        folder = "imagesTs" if role == "test" else "imagesTr"
        files = []
        for phase in phases:
            rel = f"{folder}/{case.id}.nii.gz" if len(phases) == 1 else f"{folder}/{case.id}_{phase}.nii.gz"
            _copy(dataset.root / case.images[phase], root / rel)
            files.append(rel)
        item = {"id": case.id, "image": files[0] if len(files) == 1 else files}
        if role != "test":
            rel = f"labelsTr/{case.id}.nii.gz"
            _copy_label(label, root / rel, f"{case.id} {source} label")
            item.update(label=rel, label_source=source)
        lists[{"train": "training", "val": "validation", "test": "test"}[role]].append(item)
    meta = {
        "name": dataset.name or Path(dataset.root).name,
        "description": "exported from a WeakLiverSeg weak-label store",
        "tensorImageSize": "3D",
        "modality": {str(i): phase for i, phase in enumerate(phases)},
        "labels": {str(v): k for k, v in LABELS.items()},
        "numTraining": len(lists["training"]),
        "numValidation": len(lists["validation"]),
        "numTest": len(lists["test"]),
        **lists,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return {k: len(v) for k, v in lists.items()}


def _write_nifti(dataset, root: Path, plan, phases, progress) -> dict:
    items = []
    for n, (case, label, source, role) in enumerate(plan):
        _step(progress, n, len(plan), case.id)
        images = {}
        for phase in phases:
            rel = f"images/{case.id}_{phase}.nii.gz"
            _copy(dataset.root / case.images[phase], root / rel)
            images[phase] = rel
        rel = None
        if label is not None:
            rel = f"labels/{case.id}.nii.gz"
            _copy_label(label, root / rel, f"{case.id} {source} label")
        items.append({"id": case.id, "split": case.split, "images": images, "label": rel, "label_source": source})
    meta = {"format": EXPORT_FORMAT, "version": 1, "name": dataset.name, "labels": dict(LABELS), "cases": items}
    (root / "export.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    counts = {"train": 0, "val": 0, "test": 0}
    for item in items:
        counts[item["split"]] += 1
    return {"training": counts["train"], "validation": counts["val"], "test": counts["test"]}


# ----------------------------------------------------------------------------------- import


def detect_format(source) -> str:
    """``"nnunet"`` or ``"msd"`` from the ``dataset.json`` of ``source``; InputError otherwise."""
    meta = _read_json(Path(source) / "dataset.json")
    if "channel_names" in meta and "file_ending" in meta:
        return "nnunet"
    if isinstance(meta.get("training"), list):
        return "msd"
    raise InputError(f"{Path(source) / 'dataset.json'}: neither an nnU-Net v2 dataset.json (channel_names, file_ending) "
                     "nor an MSD datalist (training list)")


def import_dataset(source, out, name: str | None = None, fmt: str | None = None, progress=None) -> dict:
    """Read an nnU-Net v2 raw dataset or an MSD-style folder into a new store at ``out``.

    Returns ``{"format", "dataset", "cases", "masks", "pseudo_not_imported": [...]}``.
    """
    from .store import Dataset

    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: dataset folder not found")
    fmt = fmt or detect_format(source)
    if fmt not in ("nnunet", "msd"):
        raise InputError(f"--format {fmt!r}: import reads nnunet or msd")
    meta = _read_json(source / "dataset.json")
    entries = (_nnunet_entries if fmt == "nnunet" else _msd_entries)(source, meta)
    remap = _label_lookup(meta.get("labels"), fmt, source / "dataset.json")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: import target already exists and is not empty; choose a new folder")
    provenance = meta.get("weakliverseg") or {}
    sources = provenance.get("label_sources") or {}
    validation = set(provenance.get("validation") or [])
    dataset = Dataset.create(out, name=name or str(meta.get("name") or source.name))
    masks, pseudo_kept_out = 0, []
    from .imageio import read_image, read_label_map

    for n, entry in enumerate(entries):
        if progress is not None:
            progress.check_cancelled()
            progress.update("import", n, len(entries), case=entry["id"])
        images = {phase: read_image(path) for phase, path in entry["images"].items()}
        mask = None
        if entry.get("label") is not None:
            if sources.get(entry["source_id"]) == "pseudo" or entry.get("label_source") == "pseudo":
                pseudo_kept_out.append(entry["id"])
            else:
                labels = read_label_map(entry["label"])
                mask = labels.with_array(_apply_lookup(labels.array, remap, entry["label"]))
                masks += 1
        split = entry.get("split") or ("val" if entry["source_id"] in validation else "train")
        dataset.add_case(entry["id"], images, reference=next(iter(images)), mask=mask, split=split)
    if progress is not None:
        progress.update("import", len(entries), len(entries))
    return {"format": fmt, "dataset": str(out), "cases": len(entries), "masks": masks,
            "pseudo_not_imported": pseudo_kept_out}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found (an nnU-Net or MSD dataset folder has a dataset.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def _case_id(text: str) -> str:
    cid = _BAD_CHARS.sub("_", text).lstrip(".-_") or "case"
    return cid


def _phase_name(text: str, taken: set) -> str:
    base = _case_id(str(text).strip().lower()) or "ct"
    name, n = base, 1
    while name in taken:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


def _nnunet_entries(source: Path, meta: dict) -> list:
    where = source / "dataset.json"
    ending = meta.get("file_ending")
    channels = meta.get("channel_names")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(f"{where}: file_ending must be a string like '.nii.gz', got {ending!r}")
    if not isinstance(channels, dict) or not channels:
        raise InputError(f"{where}: channel_names must be an object like {{\"0\": \"CT\"}}")
    try:
        order = sorted(int(k) for k in channels)
    except ValueError:
        raise InputError(f"{where}: channel_names keys must be channel numbers, got {list(channels)}") from None
    named = meta.get("channel_phases") or {}
    taken: set = set()
    phases = {k: _phase_name(named.get(str(k)) or channels[str(k)], taken) for k in order}
    entries = []
    for folder, split in (("imagesTr", None), ("imagesTs", "test")):
        if not (source / folder).is_dir():
            if folder == "imagesTr":
                raise InputError(f"{source}: no imagesTr folder (not an nnU-Net raw dataset)")
            continue
        found: dict = {}
        for path in sorted((source / folder).iterdir()):
            match = re.match(r"^(.+)_(\d{4})" + re.escape(ending) + "$", path.name)
            if match:
                found.setdefault(match.group(1), {})[int(match.group(2))] = path
        for ident, files in found.items():
            missing = [k for k in order if k not in files]
            if missing:
                raise InputError(f"{source / folder}: case {ident!r} lacks channel(s) {missing} ({ident}_{missing[0]:04d}{ending})")
            entry = {"id": _case_id(ident), "source_id": ident, "images": {phases[k]: files[k] for k in order}, "split": split}
            if split is None:
                label = source / "labelsTr" / f"{ident}{ending}"
                if not label.is_file():
                    raise InputError(f"{label}: label file of training case {ident!r} not found")
                entry["label"] = label
            entries.append(entry)
    if not entries:
        raise InputError(f"{source}: no images named CASE_XXXX{ending} in imagesTr / imagesTs")
    return entries


def _msd_entries(source: Path, meta: dict) -> list:
    where = source / "dataset.json"
    modality = meta.get("modality") or {}
    taken: set = set()
    try:
        phases = [_phase_name(modality[k], taken) for k in sorted(modality, key=int)]
    except (ValueError, TypeError):
        raise InputError(f"{where}: modality keys must be channel numbers, got {list(modality)}") from None
    entries, seen = [], set()
    for key, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        items = meta.get(key) or []
        if not isinstance(items, list):
            raise InputError(f"{where}: {key} must be a list")
        for n, item in enumerate(items):
            item = {"image": item} if isinstance(item, str) else item
            if not isinstance(item, dict) or "image" not in item:
                raise InputError(f"{where}: {key}[{n}] needs an 'image'")
            files = item["image"] if isinstance(item["image"], list) else [item["image"]]
            names = phases if len(phases) == len(files) else (["ct"] if len(files) == 1 else
                                                               [f"channel{i}" for i in range(len(files))])
            paths = {}
            for phase, rel in zip(names, files):
                path = (source / str(rel)).resolve()
                if not path.is_file():
                    raise InputError(f"{where}: {key}[{n}] image {rel} not found")
                paths[phase] = path
            stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha)$", "", Path(str(files[0])).name)
            if len(files) > 1 and "_" in stem:
                stem = stem.rsplit("_", 1)[0]
            source_id = str(item.get("id") or stem)
            cid = _case_id(source_id)
            if cid in seen:
                raise InputError(f"{where}: case id {cid!r} appears twice ({key}[{n}])")
            seen.add(cid)
            entry = {"id": cid, "source_id": source_id, "images": paths, "split": split,
                     "label_source": item.get("label_source")}
            if key != "test":
                if "label" not in item:
                    raise InputError(f"{where}: {key}[{n}] has no 'label'")
                label = (source / str(item["label"])).resolve()
                if not label.is_file():
                    raise InputError(f"{where}: {key}[{n}] label {item['label']} not found")
                entry["label"] = label
            entries.append(entry)
    if not entries:
        raise InputError(f"{where}: the training / validation / test lists are empty")
    return entries


def _label_lookup(labels, fmt: str, where) -> np.ndarray:
    """256-entry table: source label value -> WeakLiverSeg value (255 = not declared)."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{where}: 'labels' must name the label values")
    pairs = []  # (name, value)
    for k, v in labels.items():
        name, value = (k, v) if fmt == "nnunet" else (v, k)
        if isinstance(value, (list, tuple)):
            raise InputError(f"{where}: label {name!r} is a region {value}; only plain label values can be imported")
        try:
            pairs.append((str(name), int(value)))
        except (TypeError, ValueError):
            raise InputError(f"{where}: label {name!r} has value {value!r}, not an integer") from None
    table = np.full(256, 255, np.uint8)
    unknown = []
    for name, value in pairs:
        key = name.strip().lower()
        if not 0 <= value <= 255:
            raise InputError(f"{where}: label {name!r} has value {value}, outside 0..255")
        if key in ("background", "bg") or value == 0:
            table[value] = 0
        elif key == "liver":
            table[value] = 1
        elif key in _TUMOR_NAMES:
            table[value] = 2
        else:
            unknown.append(f"{name!r} ({value})")
    if unknown:
        raise InputError(f"{where}: labels {', '.join(unknown)} are neither liver nor liver tumour; "
                         "only background, liver and tumour (tumor, cancer, lesion) can be imported")
    return table


def _apply_lookup(array: np.ndarray, table: np.ndarray, where) -> np.ndarray:
    values = np.unique(array)
    if values.size and (values.min() < 0 or values.max() > 255 or np.any(table[values.astype(np.int64)] == 255)):
        bad = [int(v) for v in values if not 0 <= v <= 255 or table[int(v)] == 255]
        raise InputError(f"{where}: label values {bad} are not declared in dataset.json's labels")
    return table[array.astype(np.int64)]
