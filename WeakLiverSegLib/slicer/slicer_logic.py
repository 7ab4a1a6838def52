"""Everything the Slicer module does, without Qt: the widget only forwards clicks here.

Importable with the standard library alone (numpy, SimpleITK, the store and the MRML bridge
are imported inside the methods), so the Slicer module can load, show its panel and offer
to install missing packages before any of them is needed.

Background jobs (train, fine-tune, segment) run ``python -m WeakLiverSegLib ...`` through
``runner.BackgroundRunner``; inside Slicer the interpreter is ``PythonSlicer``.  The widget
polls ``poll()`` from a timer and shows ``progress_view(event)``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .runner import BackgroundRunner

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
)

ONE_PHASE_RECIPES = ("o2l", "couinaud", "acol", "sdnet")   # o2l first: the default
TWO_PHASE_RECIPES = ("wsts",)                              # enhanced teacher, non-enhanced student
DEVICES = ("auto", "cpu", "cuda")
VOLUME_LABELS = ("unknown", "tumour", "healthy")
SPLITS = ("train", "val", "test")
SINGLE_PHASE = "ct"                                        # phase name of a one-volume case
ENHANCED_PHASE, PLAIN_PHASE = "enhanced", "plain"


def missing_dependencies() -> list:
    """``[(import name, pip requirement), ...]`` of the packages this Python lacks (nothing imported)."""
    importlib.invalidate_caches()  # see packages pip-installed a moment ago
    return [(name, req) for name, req in DEPENDENCIES if importlib.util.find_spec(name) is None]


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
    couinaud_node: object = None


class WeakLiverSegLogic:
    """All behaviour of the Slicer module (no Qt).  ``scene`` defaults to ``slicer.mrmlScene``."""

    def __init__(self, scene=None):
        self._scene = scene
        self.runner: BackgroundRunner | None = None
        self.job_kind: str | None = None          # "train" | "segment" while a job runs
        self._segment_job: _SegmentJob | None = None

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
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        bridge.mark_roi(roi, label, two_d=two_d)
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
        """
        from . import slicer_bridge as bridge
        from ..data.imageio import resample_to
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
        else:
            # A new store: nothing is written until add_case has checked the whole case.
            dataset = Dataset(dataset_dir, name=dataset_dir.name)

        reference = ENHANCED_PHASE if ENHANCED_PHASE in volumes else next(iter(volumes))
        reference_node = volumes[reference]
        images = {reference: bridge.volume_from_node(reference_node)}
        grid = images[reference]
        for phase, node in volumes.items():
            if phase == reference:
                continue
            volume = bridge.volume_from_node(node)
            images[phase] = volume if volume.same_grid(grid) else resample_to(volume, grid, "linear")

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

        return dataset.add_case(
            case_id, images, reference=reference, mask=mask, boxes=boxes,
            liver_box=liver_boxes[0] if liver_boxes else None, couinaud=couinaud,
            volume_label=None if volume_label in (None, "", "unknown") else volume_label,
            split=split, overwrite=overwrite,
        )

    # ------------------------------------------------------------------ commands

    @staticmethod
    def python_executable() -> str:
        from .slicer_bridge import python_executable

        return python_executable()

    def _cli(self) -> list:
        return [self.python_executable(), "-m", "WeakLiverSegLib"]

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
                              device="auto") -> list:
        """argv of ``weakliverseg segment``; ``inputs`` is one path or ``{phase: path}``."""
        if not model:
            raise InputError("model folder: choose a trained model")
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
        argv += ["--device", str(device or "auto"), "--progress", "jsonl"]
        return argv

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
        return self.runner

    def start_training(self, dataset, recipe, out, device="auto", steps=None, finetune_from=None,
                       overwrite: bool = False) -> BackgroundRunner:
        """Train (or, with ``finetune_from``, fine-tune) in the background.

        A folder that already holds a model is never overwritten silently: pass ``overwrite``.
        """
        if out and (Path(out) / "model.json").is_file() and not overwrite:
            raise InputError(f"{out}: already holds a model; choose another folder, fine-tune, or confirm overwriting")
        argv = self.build_train_command(dataset, recipe, out, device=device, init=finetune_from, steps=steps)
        return self._start(argv, "fine-tune" if finetune_from else "train")

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
                           name=None, couinaud: bool = False) -> BackgroundRunner:
        """Write the input volume(s) to a temp folder and run ``segment`` on them in the background.

        ``couinaud``: when the result is loaded, estimate each tumour's Couinaud segment from the
        enhanced (or only) phase (the landmark constructor; about 10 s on a 512x512x130 CT).
        """
        from . import slicer_bridge as bridge
        from ..data.imageio import write_image

        if not model:
            raise InputError("model folder: choose a trained model")
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
                              couinaud_node=(volumes.get(ENHANCED_PHASE) or volumes.get(SINGLE_PHASE)) if couinaud else None)
            inputs = next(iter(paths.values())) if len(paths) == 1 else paths
            argv = self.build_segment_command(model, inputs, job.labels, job.probabilities, job.uncertainty,
                                              device=device)
            runner = self._start(argv, "segment")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._segment_job = job
        return runner

    def poll(self) -> list:
        return self.runner.poll() if self.runner is not None else []

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()

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
                                            couinaud_node=job.couinaud_node)
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
                            name: str | None = None, couinaud_node=None) -> SegmentOutput:
        """Label map file -> segmentation node (``Liver``, ``Liver tumor``) + tumour table node,
        and optional probability / uncertainty volume nodes, on the reference volume's grid.

        ``couinaud_node``: the contrast-enhanced volume; when given, the Couinaud constructor
        assigns each tumour its segment (else the table says "n/a").
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
