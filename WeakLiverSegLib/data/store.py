"""The weak-label store: one folder = one cohort, ``dataset.json`` + image / label files.

Every label kind of the five papers lives here: co-registered phases, optional pixel masks,
2D / 3D lesion boxes and an organ box, Couinaud segments, volume-level labels, a split.
``load`` checks every field without opening image files (fast for hundreds of cases);
``validate(deep=True)`` opens them.  Writes never lose saved labels: image files are staged
and swapped in with backups, ``dataset.json`` is replaced atomically (temp + fsync + rename),
and any failure restores both the files and the in-memory state.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from .boxes import Box
from ..errors import InputError
from .imageio import check_finite, check_same_grid, itk_messages
from .imageio import read_image as _read_image_file
from .imageio import write_image as _write_image_file
from .safeio import file_lock, os_reason, replace_verified
from .volume import Volume

FORMAT = "weakliverseg-dataset"
VERSION = 1
DATASET_FILE = "dataset.json"
LOCK_FILE = ".dataset.lock"   # the store lock: held around every load-modify-save (safeio.file_lock)
LABELS = {"background": 0, "liver": 1, "tumor": 2}
SPLITS = ("train", "val", "test")
VOLUME_LABELS = ("tumour", "healthy")
LABEL_KINDS = ("mask", "boxes", "couinaud", "volume")
UPDATABLE = ("boxes", "liver_box", "couinaud", "volume_label", "split", "mask")

_VOLUME_LABEL_ALIASES = {"tumor": "tumour"}
_TOP_KEYS = ("format", "version", "name", "labels", "cases")
_CASE_KEYS = ("id", "images", "reference", "mask", "boxes", "liver_box", "couinaud", "volume_label", "split", "truth")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # ids / phases / truth keys end up in file names
# Allowed voxel values of label files: masks 0/1/2, Couinaud maps 0..8.
_LABEL_VALUES = {"mask": (0, 1, 2), "couinaud_map": tuple(range(9))}


@dataclass
class Case:
    id: str
    images: dict
    reference: str
    mask: str | None = None
    boxes: list = field(default_factory=list)
    liver_box: Box | None = None
    couinaud: list | None = None
    volume_label: str | None = None
    split: str = "train"
    truth: dict | None = None

    @property
    def label_kinds(self) -> set:
        """Which kinds of label this case carries: subset of mask / boxes / couinaud / volume."""
        kinds = set()  # "boxes": lesion boxes and / or an organ box (a healthy box case has only the latter)
        if self.mask is not None:
            kinds.add("mask")
        if self.boxes or self.liver_box is not None:
            kinds.add("boxes")
        if self.couinaud is not None:
            kinds.add("couinaud")
        if self.volume_label is not None:
            kinds.add("volume")
        return kinds

    def files(self) -> list:
        """Every file this case references (relative paths)."""
        return list(self.images.values()) + ([self.mask] if self.mask else []) + list((self.truth or {}).values())

    def to_json(self) -> dict:
        out = {
            "id": self.id,
            "images": dict(self.images),
            "reference": self.reference,
            "mask": self.mask,
            "boxes": [b.to_json() for b in self.boxes],
            "liver_box": self.liver_box.to_json() if self.liver_box is not None else None,
            "couinaud": list(self.couinaud) if self.couinaud is not None else None,
            "volume_label": self.volume_label,
            "split": self.split,
        }
        if self.truth is not None:
            out["truth"] = dict(self.truth)
        return out


# ----------------------------------------------------------------------------- field parsing


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InputError(f"{what} {value!r} is not a valid name (letters, digits, '.', '_', '-'; no leading '.' or '-')")
    return value


def _rel_path(value, where: str, root: Path) -> str:
    """A path relative to the dataset folder that stays inside it and exists."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected a file path relative to the dataset folder, got {value!r}")
    rel = PurePosixPath(value)
    if rel.is_absolute() or Path(value).is_absolute() or ".." in rel.parts:
        raise InputError(f"{where}: path {value!r} must be relative to the dataset folder and stay inside it")
    if not (root / value).exists():
        raise InputError(f"{where}: file {value} not found in {root}")
    return value


def _parse_couinaud(value, where: str):
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise InputError(f"{where} couinaud: expected a list of segments 1..8 ([] = healthy) or null, got {value!r}")
    segments = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= 8:
            raise InputError(f"{where} couinaud: segment {v!r} is not an integer in 1..8")
        if int(v) in segments:
            raise InputError(f"{where} couinaud: segment {int(v)} listed twice")
        segments.append(int(v))
    return sorted(segments)


def _parse_volume_label(value, where: str):
    if value is None:
        return None
    value = _VOLUME_LABEL_ALIASES.get(value, value) if isinstance(value, str) else value
    if value not in VOLUME_LABELS:
        raise InputError(f"{where} volume_label: {value!r} is not one of 'tumour', 'healthy' (or null)")
    return value


def _parse_split(value, where: str) -> str:
    if value not in SPLITS:
        raise InputError(f"{where} split: {value!r} is not one of {list(SPLITS)}")
    return value


def _parse_box(value, where: str, liver: bool = False):
    box = Box.from_json(value, where)
    if liver and box.label != "liver":
        raise InputError(f"{where}: label must be 'liver', got {box.label!r}")
    return box


def _check_consistency(case: Case, where: str) -> None:
    """Labels of one case must not contradict each other."""
    tumour_boxes = [b for b in case.boxes if b.label == "tumor"]
    if case.volume_label == "healthy" and case.couinaud:
        raise InputError(f"{where}: volume_label 'healthy' contradicts couinaud {case.couinaud}")
    if case.volume_label == "tumour" and case.couinaud == []:
        raise InputError(f"{where}: volume_label 'tumour' contradicts couinaud [] (healthy)")
    if tumour_boxes and (case.volume_label == "healthy" or case.couinaud == []):
        raise InputError(f"{where}: has {len(tumour_boxes)} tumour box(es) but is labelled healthy")


def _parse_case(d, index: int, root: Path) -> Case:
    if not isinstance(d, dict):
        raise InputError(f"cases[{index}]: expected an object, got {type(d).__name__}")
    if "id" not in d:
        raise InputError(f"cases[{index}]: missing field 'id'")
    cid = _check_name(d["id"], f"cases[{index}] id")
    unknown = sorted(set(d) - set(_CASE_KEYS))
    if unknown:
        raise InputError(f"{cid}: unknown field(s) {unknown} (allowed: {list(_CASE_KEYS)})")
    for key in ("images", "reference"):
        if key not in d:
            raise InputError(f"{cid}: missing field '{key}'")
    images = d["images"]
    if not isinstance(images, dict) or not images:
        raise InputError(f"{cid} images: expected a non-empty object phase -> file, got {images!r}")
    for phase, path in images.items():
        _check_name(phase, f"{cid} images: phase")
        _rel_path(path, f"{cid} images['{phase}']", root)
    if not isinstance(d["reference"], str) or d["reference"] not in images:
        raise InputError(f"{cid} reference: phase {d['reference']!r} is not one of the images {list(images)}")
    mask = d.get("mask")
    if mask is not None:
        _rel_path(mask, f"{cid} mask", root)
    boxes = d.get("boxes", [])
    if not isinstance(boxes, list):
        raise InputError(f"{cid} boxes: expected a list, got {type(boxes).__name__}")
    liver_box = d.get("liver_box")
    truth = d.get("truth")
    if truth is not None:
        if not isinstance(truth, dict):
            raise InputError(f"{cid} truth: expected an object key -> file or null, got {truth!r}")
        for key, path in truth.items():
            _check_name(key, f"{cid} truth: key")
            _rel_path(path, f"{cid} truth['{key}']", root)
    case = Case(
        id=cid,
        images=dict(images),
        reference=d["reference"],
        mask=mask,
        boxes=[_parse_box(b, f"{cid} boxes[{n}]") for n, b in enumerate(boxes)],
        liver_box=None if liver_box is None else _parse_box(liver_box, f"{cid} liver_box", liver=True),
        couinaud=_parse_couinaud(d.get("couinaud"), cid),
        volume_label=_parse_volume_label(d.get("volume_label"), cid),
        split=_parse_split(d.get("split", "train"), cid),
        truth=None if truth is None else dict(truth),
    )
    _check_consistency(case, cid)
    return case


def _parse_dataset(data, root: Path):
    """(name, {id: Case}) from the parsed JSON; InputError naming the field otherwise."""
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object at the top level, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise InputError(f"unknown format {data.get('format')!r} (expected {FORMAT!r})")
    version = data.get("version")
    if "version" not in data:
        raise InputError(f"missing field 'version' (this software reads version {VERSION})")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"version {version!r} is not a valid version number (this software reads version {VERSION})")
    if version > VERSION:
        raise InputError(
            f"version {version} is newer than this software reads (version {VERSION}); update WeakLiverSeg"
        )
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise InputError(f"unknown top-level field(s) {unknown} (allowed: {list(_TOP_KEYS)})")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise InputError(f"name: expected a string, got {name!r}")
    if data.get("labels", LABELS) != LABELS:
        raise InputError(f"labels: {data['labels']!r} differ from the values this software uses {LABELS}")
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list):
        raise InputError(f"cases: expected a list of cases, got {type(raw_cases).__name__}")
    cases = {}
    for index, d in enumerate(raw_cases):
        case = _parse_case(d, index, root)
        if case.id in cases:
            raise InputError(f"cases[{index}]: duplicate case id {case.id!r}")
        cases[case.id] = case
    return name, cases


# ----------------------------------------------------------------------------- volume checks


def _check_volume(volume, where: str) -> None:
    """A real 3D (several slices), numeric, finite volume."""
    if not isinstance(volume, Volume):
        raise InputError(f"{where}: expected a Volume, got {type(volume).__name__}")
    a = volume.array
    if a.ndim != 3:
        raise InputError(f"{where}: expected a 3D image, got a {a.ndim}D array of shape {a.shape}")
    if min(a.shape) == 0:
        raise InputError(f"{where}: image is empty (size {volume.shape_xyz})")
    if a.shape[0] == 1:
        raise InputError(f"{where}: a single slice (2D image, size {volume.shape_xyz}); a 3D volume is needed")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise InputError(f"{where}: voxel type {a.dtype} is not a real number type")
    check_finite(volume, where)


def _check_same_grid(volume: Volume, reference: Volume, where: str, reference_name: str) -> None:
    check_same_grid(reference, volume, f"{where} (reference phase {reference_name!r})")


def _check_label_values(volume: Volume, allowed, where: str) -> None:
    a = volume.array
    ok = np.isin(a, allowed)
    if not ok.all():
        found = np.unique(a[~ok])
        shown = ", ".join(f"{v:g}" for v in found[:10].astype(float)) + (", ..." if found.size > 10 else "")
        raise InputError(
            f"{where}: label values {shown} found; only {', '.join(map(str, allowed))} are allowed"
        )


def _grid_only(volume: Volume) -> Volume:
    """Geometry without voxel data (a zero-cost broadcast array), for box / grid checks."""
    return Volume(np.broadcast_to(np.zeros((), np.uint8), volume.array.shape), volume.spacing, volume.origin, volume.direction)


def _read_grid(path: Path) -> Volume:
    """Geometry of an image file from its header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with itk_messages([]):  # a warning here is repeated by read_image's error if it matters
            reader.ReadImageInformation()
    except RuntimeError:
        return _grid_only(_read_image_file(path))  # DICOM folder or odd format: read it whole
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got {reader.GetDimension()}D")
    size = reader.GetSize()
    return Volume(
        np.broadcast_to(np.zeros((), np.uint8), size[::-1]),
        reader.GetSpacing(),
        reader.GetOrigin(),
        np.array(reader.GetDirection()).reshape(3, 3),
    )


def _storage_array(volume: Volume, kind: str) -> Volume:
    """What goes on disk: label maps as uint8; images keep their type (float64 -> float32)."""
    a = volume.array
    if kind == "label":
        return volume.with_array(a.astype(np.uint8, copy=False))
    if a.dtype == bool:
        return volume.with_array(a.astype(np.uint8))
    if a.dtype in (np.float64, np.float16):
        return volume.with_array(a.astype(np.float32))
    return volume


# ----------------------------------------------------------------------------- atomic writes


_NUMBER_LIST = re.compile(r"\[\s+(-?[0-9.eE+-]+(?:,\s+-?[0-9.eE+-]+)*)\s+\]")


def _format_json(data) -> str:
    """Indented JSON with number lists (voxel / world corners, segments) kept on one line."""
    text = json.dumps(data, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _atomic_write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, whole
    (temp + fsync + read back + rename); a failed write (full disk) raises and changes nothing."""
    try:
        replace_verified(path, _format_json(data).encode("utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: could not save ({os_reason(exc)}); the previous {path.name} is unchanged") from exc


class _FileSwap:
    """Stage new image files next to their targets, swap them in keeping backups, undo on failure."""

    def __init__(self, root: Path):
        self.root = root
        self.staged = []  # (target, staging file)
        self.done = []  # (target, backup or None)

    def stage(self, rel: str, volume: Volume) -> None:
        target = self.root / rel
        staging = target.with_name(f".staging{os.getpid()}_{target.name}")
        self.staged.append((target, staging))
        try:
            _write_image_file(volume, staging)
        except InputError as exc:  # name the store's file, not the staging name
            raise InputError(str(exc).replace(str(staging), str(target))) from None
        except (OSError, RuntimeError) as exc:
            raise InputError(f"{target}: could not write ({exc})") from exc

    def swap_in(self) -> None:
        for target, staging in self.staged:
            backup = None
            if target.exists():
                backup = target.with_name(f".backup{os.getpid()}_{target.name}")
                os.replace(target, backup)
            self.done.append((target, backup))
            os.replace(staging, target)

    def undo(self) -> None:
        for target, backup in reversed(self.done):
            if backup is not None and backup.exists():
                os.replace(backup, target)
            elif backup is None and target.exists():
                target.unlink()
        for _, staging in self.staged:
            if staging.exists():
                staging.unlink()

    def finish(self) -> None:
        for _, backup in self.done:
            if backup is not None and backup.exists():
                backup.unlink()
        self.done, self.staged = [], []


# ----------------------------------------------------------------------------- the dataset


class Dataset:
    """A dataset folder: ``root/dataset.json`` plus ``images/``, ``labels/``, ``truth/``."""

    def __init__(self, root, name: str = "", cases: dict | None = None):
        self.root = Path(root)
        self.name = name
        self.cases = dict(cases or {})

    @property
    def path(self) -> Path:
        return self.root / DATASET_FILE

    def __len__(self) -> int:
        return len(self.cases)

    def __contains__(self, case_id) -> bool:
        return case_id in self.cases

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, name={self.name!r}, {len(self.cases)} cases)"

    # -- create / load / save

    @classmethod
    def create(cls, root, name: str = "", exist_ok: bool = False) -> "Dataset":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: exists and is not a folder")
        if (root / DATASET_FILE).exists() and not exist_ok:
            raise InputError(f"{root / DATASET_FILE}: a dataset already exists here; choose a new folder "
                             f"(nothing was changed)")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{root}: cannot create the dataset folder ({os_reason(exc)})") from None
        with file_lock(root / LOCK_FILE):
            if (root / DATASET_FILE).exists():
                if not exist_ok:  # created by another process meanwhile
                    raise InputError(f"{root / DATASET_FILE}: a dataset already exists here; choose a new folder")
                return cls.load(root)
            dataset = cls(root, name=name)
            dataset.save()
        return dataset

    def lock(self, timeout=None):
        """The store lock (``with dataset.lock(): ...``): every load-modify-save of ``dataset.json``
        holds it, so writers in other processes (another Slicer, a script) never lose each other's cases."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.root}: cannot create the dataset folder ({os_reason(exc)})") from None
        return file_lock(self.root / LOCK_FILE, timeout=timeout, what=f"the dataset {self.root}")

    def refresh(self) -> None:
        """Re-read ``dataset.json`` (what other processes saved meanwhile); a new, unsaved store stays empty."""
        if self.path.is_file():
            fresh = Dataset.load(self.root)
            self.name, self.cases = fresh.name, fresh.cases

    @classmethod
    def load(cls, root) -> "Dataset":
        """Read and validate ``dataset.json`` (a folder or the file itself); image files are not opened."""
        root = Path(root)
        if root.is_file():
            if root.name != DATASET_FILE:
                raise InputError(f"{root}: is a file, not a dataset folder (give the folder holding {DATASET_FILE})")
            root = root.parent
        path = root / DATASET_FILE
        if not path.is_file():
            raise InputError(f"{path}: not found ({root} is not a WeakLiverSeg dataset folder)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        try:
            name, cases = _parse_dataset(data, root)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        return cls(root, name=name, cases=cases)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "labels": dict(LABELS),
            "cases": [case.to_json() for case in self.cases.values()],
        }

    def save(self) -> None:
        """Atomic: write a temp file in the same folder, fsync, rename over ``dataset.json``.

        Writes this object's cases as they are; ``add_case`` / ``update_labels`` re-read the file
        under the store lock first, so cases saved by other processes are kept."""
        data = self.to_json()
        try:
            _parse_dataset(data, self.root)  # never write a file that load() would reject
        except InputError as exc:
            raise InputError(f"{self.path}: not saved: {exc}") from None
        with self.lock():
            _atomic_write_json(self.path, data)

    # -- reading

    def case(self, case_id) -> Case:
        try:
            return self.cases[case_id]
        except (KeyError, TypeError):
            raise InputError(f"{self.path}: unknown case {case_id!r} ({len(self.cases)} cases)") from None

    def cases_with(self, kind: str, split: str | None = None) -> list:
        """Cases carrying a label kind (mask / boxes / couinaud / volume), optionally of one split."""
        if kind not in LABEL_KINDS:
            raise InputError(f"label kind {kind!r} is not one of {list(LABEL_KINDS)}")
        if split is not None:
            _parse_split(split, "cases_with")
        return [c for c in self.cases.values() if kind in c.label_kinds and (split is None or c.split == split)]

    def _read(self, rel: str, where: str) -> Volume:
        try:
            return _read_image_file(self.root / rel)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None

    def read_image(self, case_id, phase: str | None = None) -> Volume:
        case = self.case(case_id)
        phase = case.reference if phase is None else phase
        if phase not in case.images:
            raise InputError(f"{case_id}: no phase {phase!r} (phases: {list(case.images)})")
        return self._read(case.images[phase], f"{case_id} images['{phase}']")

    def read_mask(self, case_id) -> Volume | None:
        """The case's mask as uint8 0/1/2; its label values are checked here, while it is read
        (InputError naming the case and file: a 7, a 1.5, a NaN)."""
        case = self.case(case_id)
        if case.mask is None:
            return None
        mask = self._read(case.mask, f"{case_id} mask")
        _check_label_values(mask, _LABEL_VALUES["mask"], f"{case_id} mask ({case.mask})")
        return mask.with_array(mask.array.astype(np.uint8, copy=False))

    def read_truth(self, case_id, key: str = "mask") -> Volume | None:
        case = self.case(case_id)
        if not case.truth or key not in case.truth:
            return None
        return self._read(case.truth[key], f"{case_id} truth['{key}']")

    # -- writing

    def _prepare_box(self, box, grid: Volume, where: str, liver: bool = False) -> Box:
        if isinstance(box, dict):
            box = Box.from_json(box, where)
        if not isinstance(box, Box):
            raise InputError(f"{where}: expected a Box, got {type(box).__name__}")
        if liver and box.label != "liver":
            raise InputError(f"{where}: label must be 'liver', got {box.label!r}")
        box = replace(box, lps_min=None, lps_max=None)  # corners come from the reference grid
        box.validate(grid, where)
        return box.with_world(grid)

    def _check_label_volume(self, volume, grid: Volume, where: str, reference: str, kind: str) -> None:
        _check_volume(volume, where)
        _check_same_grid(volume, grid, where, reference)
        if kind in _LABEL_VALUES:
            _check_label_values(volume, _LABEL_VALUES[kind], where)

    def add_case(
        self,
        case_id,
        images: dict,
        reference: str | None = None,
        mask: Volume | None = None,
        boxes=(),
        liver_box=None,
        couinaud=None,
        volume_label=None,
        split: str = "train",
        truth: dict | None = None,
        overwrite: bool = False,
    ) -> Case:
        """Check everything, then write the files and save ``dataset.json``; nothing is written on bad input."""
        _check_name(case_id, "case id")
        if case_id in self.cases and not overwrite:
            raise InputError(f"{case_id}: case already exists in {self.path} (pass overwrite=True to replace it)")
        if not isinstance(images, dict) or not images:
            raise InputError(f"{case_id} images: expected a non-empty dict phase -> Volume")
        reference = next(iter(images)) if reference is None else reference
        if reference not in images:
            raise InputError(f"{case_id} reference: phase {reference!r} is not one of the images {list(images)}")
        for phase, volume in images.items():
            _check_name(phase, f"{case_id} images: phase")
            _check_volume(volume, f"{case_id} images['{phase}']")
        grid = _grid_only(images[reference])
        for phase, volume in images.items():
            if phase != reference:
                _check_same_grid(volume, grid, f"{case_id} images['{phase}']", reference)
        if mask is not None:
            self._check_label_volume(mask, grid, f"{case_id} mask", reference, "mask")
        if truth is not None:
            if not isinstance(truth, dict):
                raise InputError(f"{case_id} truth: expected a dict key -> Volume")
            for key, volume in truth.items():
                _check_name(key, f"{case_id} truth: key")
                self._check_label_volume(volume, grid, f"{case_id} truth['{key}']", reference, key)
        case = Case(
            id=case_id,
            images={phase: f"images/{case_id}_{phase}.nii.gz" for phase in images},
            reference=reference,
            mask=None if mask is None else f"labels/{case_id}.nii.gz",
            boxes=[self._prepare_box(b, grid, f"{case_id} boxes[{n}]") for n, b in enumerate(boxes or ())],
            liver_box=None if liver_box is None else self._prepare_box(liver_box, grid, f"{case_id} liver_box", liver=True),
            couinaud=_parse_couinaud(couinaud, case_id),
            volume_label=_parse_volume_label(volume_label, case_id),
            split=_parse_split(split, case_id),
            truth=None if truth is None else {key: f"truth/{case_id}_{key}.nii.gz" for key in truth},
        )
        _check_consistency(case, case_id)
        writes = {case.images[p]: _storage_array(v, "image") for p, v in images.items()}
        if mask is not None:
            writes[case.mask] = _storage_array(mask, "label")
        for key, volume in (truth or {}).items():
            writes[case.truth[key]] = _storage_array(volume, "label" if key in _LABEL_VALUES else "image")
        self._commit(case, writes, overwrite=overwrite)
        return case

    def update_labels(self, case_id, **fields) -> Case:
        """Change boxes / liver_box / couinaud / volume_label / split / mask (a Volume, or None to drop it)."""
        case = self.case(case_id)
        unknown = sorted(set(fields) - set(UPDATABLE))
        if unknown:
            raise InputError(f"{case_id}: cannot update field(s) {unknown} (updatable: {list(UPDATABLE)})")
        new = replace(case, boxes=list(case.boxes), truth=None if case.truth is None else dict(case.truth))
        grid = None
        if {"boxes", "liver_box", "mask"} & set(fields):
            try:
                grid = _read_grid(self.root / case.images[case.reference])
            except InputError as exc:
                raise InputError(f"{case_id} images['{case.reference}']: {exc}") from None
        writes = {}
        if "boxes" in fields:
            new.boxes = [self._prepare_box(b, grid, f"{case_id} boxes[{n}]") for n, b in enumerate(fields["boxes"] or ())]
        if "liver_box" in fields:
            lb = fields["liver_box"]
            new.liver_box = None if lb is None else self._prepare_box(lb, grid, f"{case_id} liver_box", liver=True)
        if "couinaud" in fields:
            new.couinaud = _parse_couinaud(fields["couinaud"], case_id)
        if "volume_label" in fields:
            new.volume_label = _parse_volume_label(fields["volume_label"], case_id)
        if "split" in fields:
            new.split = _parse_split(fields["split"], case_id)
        if "mask" in fields:
            mask = fields["mask"]
            if mask is None:
                new.mask = None
            else:
                self._check_label_volume(mask, grid, f"{case_id} mask", case.reference, "mask")
                new.mask = f"labels/{case_id}.nii.gz"
                writes[new.mask] = _storage_array(mask, "label")
        _check_consistency(new, case_id)
        self._commit(new, writes, overwrite=True)
        return new

    def _commit(self, case: Case, writes: dict, overwrite: bool) -> None:
        """Stage the files, then under the store lock: re-read ``dataset.json`` (cases other processes
        added meanwhile), swap the files in, save; on any failure put files and memory back as they were."""
        swap = _FileSwap(self.root)
        try:
            for rel, volume in writes.items():  # the slow part (compression) outside the lock
                swap.stage(rel, volume)
            with self.lock():
                self.refresh()
                if case.id in self.cases and not overwrite:
                    raise InputError(f"{case.id}: case already exists in {self.path} (added by another process "
                                     f"meanwhile; pass overwrite=True to replace it)")
                old = self.cases.get(case.id)
                before = dict(self.cases)
                try:
                    swap.swap_in()
                    self.cases[case.id] = case
                    self.save()
                except BaseException:
                    self.cases.clear()
                    self.cases.update(before)
                    raise
                swap.finish()
                # Files the replaced case used and the new one does not (a dropped phase / mask).
                for rel in set(old.files() if old else ()) - set(case.files()):
                    try:
                        (self.root / rel).unlink()
                    except OSError:
                        pass
        except BaseException:
            swap.undo()
            raise

    # -- validation

    def check(self) -> "Dataset":
        """The one check every command runs on a store before any work (train, --resume, pseudo, the
        Slicer panel's Train): every field (as ``load``), and from the file headers only -- fast, no
        voxel is read -- every phase, mask and truth file a 3D image on the reference phase's grid
        (size, spacing, origin, direction) and every box inside it.  Label values are checked when
        a mask is read (``read_mask``).  Returns the dataset; InputError naming case, field and file."""
        self.validate(deep=False)
        for case in self.cases.values():
            cid = case.id
            grid = self._header(case.images[case.reference], f"{cid} images['{case.reference}']")
            others = [(case.images[p], f"{cid} images['{p}']") for p in case.images if p != case.reference]
            others += [(case.mask, f"{cid} mask")] if case.mask else []
            others += [(rel, f"{cid} truth['{k}']") for k, rel in (case.truth or {}).items()]
            for rel, where in others:
                _check_same_grid(self._header(rel, where), grid, f"{where} ({rel})", case.reference)
            for n, box in enumerate(case.boxes):
                box.validate(grid, f"{self.path}: {cid} boxes[{n}]")
            if case.liver_box is not None:
                case.liver_box.validate(grid, f"{self.path}: {cid} liver_box")
        return self

    def _header(self, rel: str, where: str) -> Volume:
        try:
            grid = _read_grid(self.root / rel)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if grid.array.shape[0] < 2 or min(grid.array.shape) < 1:
            raise InputError(f"{where} ({rel}): a single slice (size {grid.shape_xyz}); a 3D volume is needed")
        return grid

    def validate(self, deep: bool = False) -> None:
        """Check every field and that files exist; ``deep`` also opens every file and checks
        3D-ness, NaNs, geometry of phases / masks against the reference phase, label values
        and that boxes lie inside the reference grid."""
        try:
            _parse_dataset(self.to_json(), self.root)
        except InputError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        if not deep:
            return
        for case in self.cases.values():
            cid = case.id
            grid = None
            for phase in [case.reference] + [p for p in case.images if p != case.reference]:
                volume = self._read(case.images[phase], f"{cid} images['{phase}']")  # names the file
                where = f"{cid} images['{phase}'] ({case.images[phase]})"
                _check_volume(volume, where)
                if grid is None:
                    grid = _grid_only(volume)
                else:
                    _check_same_grid(volume, grid, where, case.reference)
                del volume
            labels = [("mask", case.mask, f"{cid} mask")] if case.mask else []
            labels += [(k, p, f"{cid} truth['{k}']") for k, p in (case.truth or {}).items()]
            for kind, rel, where in labels:
                volume = self._read(rel, where)
                self._check_label_volume(volume, grid, f"{where} ({rel})", case.reference, kind)
            for n, box in enumerate(case.boxes):
                box.validate(grid, f"{cid} boxes[{n}]")
            if case.liver_box is not None:
                case.liver_box.validate(grid, f"{cid} liver_box")
