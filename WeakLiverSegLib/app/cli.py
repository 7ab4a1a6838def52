"""``weakliverseg`` command line: the contract used by the Slicer module, tests and benchmarks.

Exit codes: 0 ok, 2 bad input (one line naming the file and the problem), 1 internal error,
130 cancelled.  ``--progress jsonl`` prints one JSON event a line (see ``progress.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from .. import __version__
from ..errors import Cancelled, InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weakliverseg", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"weakliverseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def progress_arg(sp, default="bar"):
        sp.add_argument("--progress", choices=("bar", "jsonl", "none"), default=default,
                        help="progress display: bar (terminal), jsonl (one JSON event per line, for programs), none")

    def device_arg(sp):
        sp.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")

    sp = sub.add_parser("phantom", help="write a synthetic abdominal cohort with known truth")
    sp.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    sp.add_argument("--cases", type=int, default=20)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    sp.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm")
    sp.add_argument("--noise", type=float, help="Gaussian noise sigma in HU")
    sp.add_argument("--tumors", type=int, nargs=2, metavar=("MIN", "MAX"), help="tumours per pathological case")
    sp.add_argument("--tumor-radius", type=float, nargs=2, metavar=("MIN", "MAX"), help="tumour radius range in mm")
    sp.add_argument("--plain-contrast", type=float, help="tumour minus liver HU in the non-enhanced phase")
    sp.add_argument("--enhanced-contrast", type=float, help="tumour minus liver HU in the enhanced phase")
    sp.add_argument("--healthy-fraction", type=float)
    sp.add_argument("--mix", help="label mix, e.g. strong=0.3,box=0.6,test=0.1 "
                    "(keys: strong, box, couinaud, volume, unlabelled, test)")
    sp.add_argument("--preview", action="store_true", help="also write preview.png, a montage of cases")
    sp.add_argument("--randomize", metavar="PRESET|JSON",
                    help="domain randomisation: none (default), intensity, all, or a JSON object of knobs "
                         "(synth/phantom.py Randomization), e.g. '{\"intensities\": true, \"arms\": 0.5}'")
    progress_arg(sp)

    sp = sub.add_parser("train", help="train a recipe on a weak-label store")
    sp.add_argument("--dataset", required=True, type=Path)
    sp.add_argument("--recipe", default="o2l", help="o2l (default), wsts, couinaud, acol, sdnet")
    sp.add_argument("--out", required=True, type=Path, help="model folder to write")
    sp.add_argument("--init", type=Path, help="fine-tune from this earlier model folder")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint in --out")
    device_arg(sp)
    sp.add_argument("--steps", type=int, help="scale all training stages to about N steps in total")
    sp.add_argument("--config", type=Path, help="JSON file with recipe settings overriding the defaults")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting, e.g. --set student.lr=1e-3 (repeatable; VALUE is JSON or text)")
    sp.add_argument("--seed", type=int, default=0)
    progress_arg(sp)

    sp = sub.add_parser("pseudo", help="write the teacher's pseudo-labels for the weak cases of a store")
    sp.add_argument("--model", required=True, type=Path)
    sp.add_argument("--dataset", required=True, type=Path)
    sp.add_argument("--out", required=True, type=Path, help="folder for the pseudo-labelled store")
    device_arg(sp)
    progress_arg(sp)

    sp = sub.add_parser("segment", help="segment one volume (or a folder / list of them) with a trained model",
                        description="Segment one volume with a trained model.  Batch: --input a folder (NIfTI / NRRD / "
                                    "MHA files, DICOM series one case per folder) or a .txt list of paths, --out a "
                                    "folder: every case -> OUT/<case>.nii.gz, OUT/batch_summary.json (per case: input, "
                                    "output, seconds, status ok | skipped | failed, message); cases whose output exists "
                                    "are skipped (rerun to resume).  Exit codes: 0 all cases ok or skipped, 2 some "
                                    "failed (or bad input), 130 cancelled.")
    sp.add_argument("--model", type=Path,
                    help="model folder (default: the shipped starter model, Resources/models/starter)")
    sp.add_argument("--input", required=True, action="append", metavar="[PHASE=]IMAGE_OR_DICOM_DIR",
                    help="image file or DICOM folder; repeat as PHASE=PATH for multi-phase models")
    sp.add_argument("--boxes", type=Path, help="JSON list of boxes (store format) for teacher models")
    sp.add_argument("--out", required=True, type=Path, help="label map: .nii.gz, .nii, .nrrd, .seg.nrrd, or .dcm (DICOM SEG; needs a DICOM series --input)")
    sp.add_argument("--probabilities", type=Path, help="also write the tumour probability map here")
    sp.add_argument("--refine", metavar="ANNOTATOR",
                    help="redraw each object found (the liver, each tumour) with a box annotator from its bounding "
                         "box: litemedsam or a model folder (single image only)")
    sp.add_argument("--uncertainty", type=Path, help="also write the predictive-entropy map here")
    sp.add_argument("--jobs", type=int, default=1,
                    help="batch only: worker processes, each loading the model once (default 1)")
    sp.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                    help="float type of the network: auto (default: bfloat16 on CPUs with AMX, about 3x faster "
                         "there; labels differ from float32 at a few boundary voxels), float32, bfloat16")
    device_arg(sp)
    progress_arg(sp)

    sp = sub.add_parser("annotate", help="turn boxes into a label map with a box annotator (LiteMedSAM by default)")
    sp.add_argument("--input", type=Path, metavar="IMAGE_OR_DICOM_DIR", help="the image the boxes were drawn on")
    sp.add_argument("--boxes", type=Path, help="boxes JSON (store format: a list, or {\"boxes\": [...], \"liver_box\": {...}})")
    sp.add_argument("--out", type=Path, help="label map: .nii.gz, .nii, .nrrd or .seg.nrrd (1 liver, 2 tumour)")
    sp.add_argument("--annotator", default="litemedsam",
                    help="litemedsam (default, pretrained), fill (box filling), fused (litemedsam + --teacher), "
                         "or a model folder (fine-tuned LiteMedSAM, or a trained model whose teacher annotates)")
    sp.add_argument("--teacher", type=Path, help="trained model folder whose teacher is fused with LiteMedSAM")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="LiteMedSAM setting: view=crop|slice, input_size, stride, window=LO,HI (HU), batch_size, "
                         "margin, min_contrast, ... (see annotate/propagate.py)")
    sp.add_argument("--serve", action="store_true",
                    help="stay loaded: read one JSON request a line on stdin ({\"id\", \"input\", \"boxes\" or "
                         "\"boxes_file\", \"out\"}), answer with jsonl events (the Slicer module's warm worker)")
    device_arg(sp)
    progress_arg(sp)

    sp = sub.add_parser("evaluate", help="score predictions against truth, write metrics.json")
    sp.add_argument("--pred", required=True, type=Path, help="label map file or folder")
    sp.add_argument("--truth", required=True, type=Path, help="label map file, folder or dataset folder")
    sp.add_argument("--labels", default="liver=1,tumor=2")
    sp.add_argument("--probabilities", type=Path, help="tumour probability file or folder (adds ROC AUC)")
    sp.add_argument("--out", required=True, type=Path)
    progress_arg(sp, default="none")

    sp = sub.add_parser("demo", help="the main job: synthetic cohort -> teacher -> student -> report.html")
    sp.add_argument("--out", required=True, type=Path)
    device_arg(sp)
    sp.add_argument("--cases", type=int, help="cohort size (default depends on the device)")
    sp.add_argument("--steps", type=int, help="training steps (default depends on the device)")
    sp.add_argument("--seed", type=int, default=0)
    progress_arg(sp)

    sp = sub.add_parser("bench", help="speed and memory benchmarks, JSON out")
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--which", default="all", help="comma list of benchmarks (default all)")
    device_arg(sp)
    progress_arg(sp, default="none")

    sp = sub.add_parser("export", help="write a store as an nnU-Net v2, MSD (MONAI) or plain NIfTI dataset")
    sp.add_argument("--dataset", required=True, type=Path, help="weak-label store to export")
    sp.add_argument("--format", required=True, choices=("nnunet", "msd", "nifti"))
    sp.add_argument("--out", required=True, type=Path, help="new folder (nnU-Net: nnUNet_raw/DatasetNNN_Name)")
    sp.add_argument("--include-pseudo", type=Path, metavar="MODEL",
                    help="give weak-only cases this model's teacher pseudo-labels (marked pseudo in the export)")
    sp.add_argument("--phases", help="comma list of phases to export, in channel order (default: those all cases have)")
    device_arg(sp)
    progress_arg(sp)

    sp = sub.add_parser("import", help="read an nnU-Net v2 raw dataset or an MSD-style folder into a new store")
    sp.add_argument("--source", required=True, type=Path, help="folder with dataset.json (nnU-Net or MSD)")
    sp.add_argument("--out", required=True, type=Path, help="new weak-label store")
    sp.add_argument("--format", choices=("auto", "nnunet", "msd"), default="auto")
    sp.add_argument("--name", help="dataset name (default: the source's)")
    progress_arg(sp)

    sp = sub.add_parser("dicomseg", help="write a label map (pseudo-label, store mask) as a DICOM SEG of its CT series")
    sp.add_argument("--labels", required=True, type=Path, help="label map (0/1/2) on the grid of the series")
    sp.add_argument("--dicom", required=True, type=Path, help="the source CT DICOM series folder")
    sp.add_argument("--out", required=True, type=Path, help="DICOM SEG file (.dcm)")
    sp.add_argument("--algorithm-type", choices=("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"), default="SEMIAUTOMATIC",
                    help="AUTOMATIC (a model alone), SEMIAUTOMATIC (box-derived, the default), MANUAL (expert mask)")
    sp.add_argument("--recipe", help="recipe that made the labels (recorded in the algorithm identification)")
    progress_arg(sp, default="none")

    sp = sub.add_parser("add-case", help="add one case (image(s), optional mask: NIfTI, .seg.nrrd or DICOM SEG) to a store")
    sp.add_argument("--dataset", required=True, type=Path, help="weak-label store (created if absent)")
    sp.add_argument("--case", required=True, help="case id")
    sp.add_argument("--image", required=True, action="append", metavar="[PHASE=]IMAGE_OR_DICOM_DIR")
    sp.add_argument("--mask", type=Path, help="label map of the first image: NIfTI / NRRD / .seg.nrrd / DICOM SEG")
    sp.add_argument("--boxes", type=Path, help="JSON list of boxes (store format)")
    sp.add_argument("--split", choices=("train", "val", "test"), default="train")
    sp.add_argument("--overwrite", action="store_true")
    progress_arg(sp, default="none")
    return p


def parse_overrides(items) -> dict:
    """``["a.b=1", "c=text"]`` -> ``{"a": {"b": 1}, "c": "text"}``."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _load_config(args) -> dict:
    cfg: dict = {}
    if getattr(args, "config", None):
        try:
            cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{args.config}: config file not found") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{args.config}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{args.config}: expected a JSON object")
    from ..learn.config import deep_update

    return deep_update(cfg, parse_overrides(getattr(args, "set", [])))


def check_out_folder(path, option: str) -> None:
    """An output folder must be a folder or creatable: InputError naming the file in the way."""
    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"{option} {path}: cannot create the folder, {blocker} is a file")


def _randomization_arg(text):
    """--randomize: a preset name or a JSON object of knobs (None when not given)."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--randomize: not a preset name or valid JSON ({exc})") from None
    return value


def cmd_phantom(args, progress):
    from ..synth import phantom

    kwargs = {k: v for k, v in {
        "shape": tuple(args.shape) if args.shape else None,
        "spacing": tuple(args.spacing) if args.spacing else None,
        "noise": args.noise,
        "tumors": tuple(args.tumors) if args.tumors else None,
        "tumor_radius_mm": tuple(args.tumor_radius) if args.tumor_radius else None,
        "plain_contrast": args.plain_contrast,
        "enhanced_contrast": args.enhanced_contrast,
        "healthy_fraction": args.healthy_fraction,
        "mix": args.mix,
        "randomization": _randomization_arg(args.randomize),
    }.items() if v is not None}
    ds = phantom.generate_cohort(args.out, cases=args.cases, seed=args.seed, preview=args.preview,
                                 progress=progress, **kwargs)
    progress.done(dataset=str(ds.root), cases=len(ds.cases))
    if progress.mode != "jsonl":
        print(f"wrote {len(ds.cases)} cases to {ds.root}")


DISTRIBUTED_RECIPES = ("o2l",)   # recipes whose training loop wraps its networks in DDP (torchrun)


def cmd_train(args, progress):
    from .. import recipes
    from ..data.store import Dataset
    from ..learn.training import select_device

    check_out_folder(args.out, "--out")
    ds = Dataset.load(args.dataset).check()   # the one validation of a store, before any work
    recipe = recipes.get(args.recipe)
    device = select_device(args.device)
    from ..learn.distributed import init_from_env, is_main, shutdown

    device = init_from_env(device)   # torchrun: join the process group (no-op otherwise)
    if not is_main():
        from .progress import Progress

        progress = Progress("none")   # rank 0 alone reports
    try:
        out = _train_in_group(args, progress, ds, recipe, device)
    finally:
        shutdown()                   # torchrun: leave the group on every way out
    progress.done(model=str(out))
    if progress.mode != "jsonl":
        print(f"model written to {out}")


def _train_in_group(args, progress, ds, recipe, device):
    """cmd_train's work once this process is in its torchrun group (or alone)."""
    from ..learn.distributed import world_size

    if world_size() > 1 and args.recipe not in DISTRIBUTED_RECIPES:
        raise InputError(f"--recipe {args.recipe}: does not train with torchrun yet (only "
                         f"{', '.join(DISTRIBUTED_RECIPES)}); run it as one process")
    config = _load_config(args)
    if args.steps is not None:
        if args.steps < 1:
            raise InputError(f"--steps must be positive, got {args.steps}")
        config["steps"] = args.steps
    config["seed"] = args.seed
    if args.resume and args.init:
        raise InputError("--resume and --init cannot be combined: resume continues the run in --out")
    return recipe.train(ds, args.out, config, device, progress, init=args.init, resume=args.resume)


def cmd_pseudo(args, progress):
    from ..learn.modelstore import load_model
    from ..data.store import Dataset
    from ..learn.training import select_device

    device = select_device(args.device)
    model = load_model(args.model, device=device)
    recipe = model_recipe(model)
    if not hasattr(recipe, "pseudo"):
        raise InputError(f"{args.model}: recipe {model.recipe!r} has no teacher to make pseudo-labels")
    check_out_folder(args.out, "--out")
    out = recipe.pseudo(model, Dataset.load(args.dataset).check(), args.out, device, progress)
    progress.done(dataset=str(out))


def parse_inputs(items) -> dict:
    """``["ct.nii.gz"]`` or ``["enhanced=a.nii.gz", "plain=b.nii.gz"]`` -> {phase: path}."""
    out = {}
    for item in items:
        phase, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            phase, path = None, item
        if phase in out:
            raise InputError(f"--input: phase {phase!r} given twice")
        out[phase] = Path(path)
    if None in out and len(out) > 1:
        raise InputError("--input: give either one image, or PHASE=PATH for every image")
    return out


def model_recipe(model):
    """The recipe a loaded model names; an unknown one is an error about model.json, not --recipe."""
    from .. import recipes

    try:
        return recipes.get(model.recipe)
    except InputError as exc:
        raise InputError(f"{model.path / 'model.json'} recipe: {str(exc).replace('--recipe: ', '')}; "
                         f"the model was made by another version or is corrupt") from None


def check_phases(paths: dict, model) -> None:
    """``--input PHASE=PATH``: every phase name must be one the model reads, and the phases it needs
    at inference must all be given (a wsts model is not fed its enhanced phase as the plain one)."""
    inp = model.meta.get("input", {}) or {}
    needed = list(inp.get("inference_phases") or inp.get("phases") or [])
    known = set(needed) | set(inp.get("phases") or [])
    if not needed:
        return
    where = model.path / "model.json"
    for phase in paths:
        if phase not in known:
            raise InputError(f"--input {phase}=...: unknown phase {phase!r}; the model ({where}) reads "
                             f"{' + '.join(needed)} (give --input {needed[0]}=FILE, or the file alone)")
    missing = [p for p in needed if p not in paths]
    if missing:
        raise InputError(f"--input: the model ({where}) segments from phase(s) {needed}; {missing} not given "
                         f"(got {sorted(paths)})")


def read_boxes_json(path, reference) -> list:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: boxes file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return parse_boxes(raw, reference, str(path))


def cmd_segment(args, progress):
    from .batch import is_batch_input

    if args.precision:              # read by the recipes' inference; batch workers inherit it
        from ..learn.training import PRECISION_ENV

        os.environ[PRECISION_ENV] = args.precision
    if args.model is None:      # no --model: the shipped starter model (single and batch)
        from ..learn.modelstore import default_model

        args.model = default_model()
    if is_batch_input(args.input):
        if args.refine:
            raise InputError("--refine: segment one image at a time to refine it (not a folder or list)")
        return cmd_segment_batch(args, progress)
    from ..data.imageio import check_finite, check_same_grid, read_image, write_image, write_label_map
    from ..learn.modelstore import load_model
    from ..learn.training import select_device

    device = select_device(args.device)
    check_out_folder(Path(args.out).parent, "--out")
    model = load_model(args.model, device=device)
    recipe = model_recipe(model)
    paths = parse_inputs(args.input)
    phases = model.meta.get("input", {}).get("inference_phases") or model.meta.get("input", {}).get("phases") or []
    if None not in paths:
        check_phases(paths, model)
    if None in paths:
        images = {(phases[0] if phases else "ct"): read_image(paths[None])}
    else:
        images = {ph: read_image(p) for ph, p in paths.items()}
    ref = next(iter(images.values()))
    for phase, vol in images.items():
        check_finite(vol, where=str(paths.get(phase, paths.get(None))))
        check_same_grid(ref, vol, where=f"--input {phase}")
    boxes = read_boxes_json(args.boxes, ref) if args.boxes else None
    dicom_source = _dicom_seg_source(args.out, paths)
    refiner = None
    if args.refine:                 # loaded before the model runs: a missing annotator fails fast
        from .. import recipes
        from ..annotate.annotators import load_annotator

        if args.refine in ("fill", "fused"):
            raise InputError(f"--refine {args.refine}: use litemedsam or a model folder")
        refiner = load_annotator(args.refine, device=device, recipe_lookup=recipes.get)
    result = recipe.segment(model, images, boxes=boxes, device=device, progress=progress)
    if refiner is not None:
        from ..annotate.annotators import refine_labels

        result.labels = refine_labels(ref, result.labels, refiner, progress)
    if dicom_source is not None:
        from ..data.dicom_seg import write_dicom_seg

        write_dicom_seg(result.labels, args.out, dicom_source, recipe=model.recipe, model_name=Path(args.model).name,
                        algorithm_type="SEMIAUTOMATIC" if boxes else "AUTOMATIC")
    else:
        write_label_map(result.labels, args.out)
    written = {"labels": str(args.out)}
    if args.probabilities:
        if result.probabilities is None:
            raise InputError(f"--probabilities: recipe {model.recipe!r} gives no probability map")
        write_image(result.probabilities, args.probabilities)
        written["probabilities"] = str(args.probabilities)
    if args.uncertainty:
        if result.uncertainty is None:
            raise InputError(f"--uncertainty: recipe {model.recipe!r} gives no uncertainty map")
        write_image(result.uncertainty, args.uncertainty)
        written["uncertainty"] = str(args.uncertainty)
    progress.done(**written)
    if progress.mode != "jsonl":
        print(f"segmentation written to {args.out}")


def cmd_segment_batch(args, progress):
    """``segment --input DIR_OR_LIST --out DIR``: every case; exit 2 (one line) when some failed."""
    from .batch import SUMMARY_NAME, run_batch
    from ..learn.training import select_device

    extra = [f"--{k}" for k in ("boxes", "probabilities", "uncertainty") if getattr(args, k)]
    if extra:
        raise InputError(f"{', '.join(extra)}: not available in batch segmentation (--input {args.input[0]} is a "
                         "folder or list); segment those cases one by one")
    check_out_folder(args.out, "--out")
    summary = run_batch(args.model, args.input[0], args.out, jobs=args.jobs, device=select_device(args.device),
                        progress=progress)
    counts = summary["counts"]
    where = Path(args.out) / SUMMARY_NAME
    if counts["failed"]:
        first = next(r for r in summary["cases"] if r["status"] == "failed")
        raise InputError(f"{counts['failed']} of {len(summary['cases'])} cases failed (first: {first['input']}: "
                         f"{first['message']}); {counts['ok']} ok, {counts['skipped']} skipped; summary in {where}")
    progress.done(summary=str(where), **{k: counts[k] for k in ("ok", "skipped", "failed")})
    if progress.mode != "jsonl":
        print(f"{counts['ok']} segmented, {counts['skipped']} skipped (already done) into {args.out}; summary {where}")


def cmd_annotate(args, progress):
    from ..annotate.annotators import load_annotator
    from ..learn.training import select_device
    from .. import recipes

    if not args.serve:
        missing = [f"--{k}" for k in ("input", "boxes", "out") if getattr(args, k) is None]
        if missing:
            raise InputError(f"annotate: {', '.join(missing)} required (or --serve)")
    device = select_device(args.device)
    settings, sam_kwargs = annotator_settings(parse_overrides(args.set))
    annotator = load_annotator(args.annotator, device=device, teacher=args.teacher, recipe_lookup=recipes.get,
                               settings=settings, **sam_kwargs)
    if args.serve:
        return _serve_annotations(annotator, progress)
    written = _annotate_once(annotator, args.input, args.boxes, args.out, progress)
    progress.done(**written)
    if progress.mode != "jsonl":
        print(f"labels written to {args.out} ({written['seconds']} s)")


def annotator_settings(values: dict) -> tuple:
    """``--set`` values -> (PropagationSettings, keyword arguments of the LiteMedSAM annotator)."""
    from ..annotate.propagate import PropagationSettings

    defaults = PropagationSettings()
    fields, kwargs = {}, {}
    for key, value in values.items():
        where = f"--set {key}"
        if key == "window":
            parts = value.split(",") if isinstance(value, str) else value
            try:
                lo, hi = (float(v) for v in parts)
            except (TypeError, ValueError):
                raise InputError(f"{where}: expected LO,HI in HU, e.g. -160,240") from None
            if not lo < hi:
                raise InputError(f"{where}: the window's low end must be below its high end")
            kwargs["window"] = (lo, hi)
        elif key in ("input_size", "batch_size"):
            if not isinstance(value, int) or value < 1 or (key == "input_size" and value % 16):
                raise InputError(f"{where}: expected a positive integer{' (a multiple of 16)' if key == 'input_size' else ''}")
            kwargs[key] = value
        elif hasattr(defaults, key):
            want = str if key == "view" else type(getattr(defaults, key))   # view's default is None
            if want is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                raise InputError(f"{where}: expected a {want.__name__}, got {value!r}")
            fields[key] = value
        else:
            raise InputError(f"{where}: unknown annotator setting (window, input_size, batch_size, "
                             f"{', '.join(defaults.__dataclass_fields__)})")
    settings = PropagationSettings(**fields)
    settings.check("--set")
    return settings, kwargs


def _annotate_once(annotator, input_path, boxes, out, progress, image_cache=None) -> dict:
    """Read, annotate, write; ``boxes`` a JSON file or an already parsed list. Nothing is written on error."""
    from ..data.imageio import check_finite, read_image, write_label_map

    input_path = Path(input_path)
    key = (str(input_path.resolve()), input_path.stat().st_mtime_ns if input_path.exists() else None)
    if image_cache is not None and image_cache.get("key") == key:
        image = image_cache["image"]
    else:
        image = read_image(input_path)
        check_finite(image, where=str(input_path))
        if image_cache is not None:
            image_cache.update(key=key, image=image)
    box_list = read_boxes_json(boxes, image) if not isinstance(boxes, list) else parse_boxes(boxes, image, "boxes")
    kwargs = {"image_key": key} if hasattr(annotator, "predictor") else {}
    result = annotator.annotate(image, box_list, progress, **kwargs)
    write_label_map(result.labels, out)
    return {"labels": str(out), "seconds": round(result.seconds, 2), "encoded_slices": result.encoded_slices,
            "boxes": result.per_box}


def _serve_annotations(annotator, progress):
    """The warm worker: one request a line on stdin until EOF; a bad request answers an error event."""
    cache: dict = {}
    progress.log(f"annotator {annotator.name} ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        rid = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise InputError("request: expected a JSON object")
            rid = req.get("id")
            for key in ("input", "out"):
                if not req.get(key):
                    raise InputError(f"request {rid}: field {key!r} missing")
            boxes = req.get("boxes") if req.get("boxes") is not None else req.get("boxes_file")
            if boxes is None:
                raise InputError(f"request {rid}: give boxes (a list) or boxes_file")
            written = _annotate_once(annotator, req["input"], boxes, Path(req["out"]), progress, cache)
            progress.done(id=rid, **written)
        except json.JSONDecodeError as exc:
            progress.error(f"request: not valid JSON ({exc})")
        except InputError as exc:
            progress.error(str(exc).replace("\n", " "), id=rid)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - one failed request must not end the warm worker
            progress.error(f"internal error: {type(exc).__name__}: {exc}", id=rid)
            traceback.print_exc()


def parse_boxes(raw, reference, where) -> list:
    """Store-format boxes (a list, or {"boxes": [...], "liver_box": {...}}) -> validated ``Box`` list."""
    from ..data.boxes import Box

    if isinstance(raw, dict):
        raw = list(raw.get("boxes", [])) + ([raw["liver_box"]] if raw.get("liver_box") else [])
    if not isinstance(raw, list):
        raise InputError(f"{where}: expected a list of boxes")
    boxes = []
    for n, item in enumerate(raw):
        box = Box.from_json(item, where=f"{where} [{n}]")
        box.validate(reference, where=f"{where} [{n}]")
        boxes.append(box)
    return boxes
def _dicom_seg_source(out, paths) -> Path | None:
    """The DICOM series a ``segment --out FILE.dcm`` refers to (the first input), else None."""
    if Path(out).suffix.lower() != ".dcm":
        return None
    source = next(iter(paths.values()))
    if not Path(source).is_dir():
        raise InputError(f"--out {out}: a DICOM SEG needs a DICOM series as the (first) --input; {source} is a file "
                         "(write .nii.gz or .seg.nrrd instead)")
    return Path(source)


def cmd_export(args, progress):
    from .exchange import run_export
    from ..learn.training import select_device

    phases = [p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else None
    device = select_device(args.device) if args.include_pseudo else "cpu"
    summary = run_export(args.dataset, args.out, args.format, include_pseudo=args.include_pseudo, phases=phases,
                         device=device, progress=progress)
    sources = list(summary["label_sources"].values())
    progress.done(out=str(args.out), training=summary["training"], validation=summary["validation"],
                  test=summary["test"], expert=sources.count("expert"), pseudo=sources.count("pseudo"),
                  skipped=len(summary["skipped"]))
    if progress.mode != "jsonl":
        print(f"exported {summary['training']} training, {summary['validation']} validation, {summary['test']} test "
              f"cases ({sources.count('expert')} expert, {sources.count('pseudo')} pseudo labels; "
              f"{len(summary['skipped'])} skipped) to {args.out} ({args.format})")


def cmd_import(args, progress):
    from ..data.exchange import import_dataset

    summary = import_dataset(args.source, args.out, name=args.name,
                             fmt=None if args.format == "auto" else args.format, progress=progress)
    progress.done(**summary)
    if progress.mode != "jsonl":
        extra = f"; {len(summary['pseudo_not_imported'])} pseudo-labels left out" if summary["pseudo_not_imported"] else ""
        print(f"imported {summary['cases']} cases ({summary['masks']} masks) from {args.source} ({summary['format']}) "
              f"into {args.out}{extra}")


def cmd_dicomseg(args, progress):
    from ..data.dicom_seg import write_dicom_seg
    from ..data.imageio import read_label_map

    write_dicom_seg(read_label_map(args.labels), args.out, args.dicom, recipe=args.recipe,
                    algorithm_type=args.algorithm_type)
    progress.done(out=str(args.out))
    if progress.mode != "jsonl":
        print(f"DICOM SEG written to {args.out}")


def cmd_add_case(args, progress):
    from ..data.imageio import check_finite, read_image, read_label_map
    from ..data.store import Dataset

    paths = parse_inputs(args.image)
    images = {(phase or "ct"): read_image(path) for phase, path in paths.items()}
    for phase, volume in images.items():
        check_finite(volume, where=str(paths.get(phase, paths.get(None))))
    reference = next(iter(images.values()))
    mask = read_label_map(args.mask, reference=reference) if args.mask else None
    boxes = read_boxes_json(args.boxes, reference) if args.boxes else ()
    if args.dataset.exists() and (args.dataset / "dataset.json").exists():
        dataset = Dataset.load(args.dataset)
    else:
        dataset = Dataset.create(args.dataset)
    case = dataset.add_case(args.case, images, mask=mask, boxes=boxes, split=args.split, overwrite=args.overwrite)
    progress.done(dataset=str(args.dataset), case=case.id)
    if progress.mode != "jsonl":
        print(f"case {case.id} added to {args.dataset}")


def cmd_evaluate(args, progress):
    from ..evaluation.evaluate import evaluate, format_table, parse_labels, write_metrics

    metrics = evaluate(args.pred, args.truth, labels=parse_labels(args.labels),
                       probabilities=args.probabilities, progress=progress)
    write_metrics(metrics, args.out)
    if progress.mode == "jsonl":
        progress.done(metrics=str(args.out))
    else:
        print(format_table(metrics))
        print(f"metrics written to {args.out}")


def cmd_demo(args, progress):
    from .demo import run_demo
    from ..learn.training import select_device

    report = run_demo(args.out, device=select_device(args.device), cases=args.cases, steps=args.steps,
                      seed=args.seed, progress=progress)
    progress.done(report=str(report))
    if progress.mode != "jsonl":
        print(f"report written to {report}")


def cmd_bench(args, progress):
    from .bench import run_benchmarks
    from ..learn.training import select_device

    result = run_benchmarks(args.out, which=args.which, device=select_device(args.device), progress=progress)
    if progress.mode != "jsonl":
        print(json.dumps(result, indent=2))


COMMANDS = {"phantom": cmd_phantom, "train": cmd_train, "pseudo": cmd_pseudo, "segment": cmd_segment,
            "annotate": cmd_annotate,
            "evaluate": cmd_evaluate, "demo": cmd_demo, "bench": cmd_bench, "export": cmd_export,
            "import": cmd_import, "dicomseg": cmd_dicomseg, "add-case": cmd_add_case}


def main(argv=None) -> int:
    from .progress import Progress

    # Before torch starts OpenMP: idle worker threads sleep instead of spinning.  On a busy CPU
    # (Slicer, other jobs) a spinning thread takes the core its partner needs: the network of
    # ``segment`` ran 2-3x slower at load 5 on 2 cores.  A value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    progress = Progress(args.progress)
    return run_reporting(lambda: COMMANDS[args.command](args, progress), progress)


def run_reporting(call, progress) -> int:
    """Run ``call()`` with the exit-code contract: 0 ok (or ``call``'s own int), 2 bad input (one
    line), 130 cancelled (SIGTERM too), 1 internal error with the traceback; errors also as events."""

    def on_term(signum, frame):  # Cancel from the Slicer module: stop at the next check
        progress.cancelled = True
        raise Cancelled("cancelled by signal")

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        pass
    try:
        code = call()
        return code if isinstance(code, int) else 0
    except InputError as exc:
        msg = str(exc).replace("\n", " ")
        progress.error(msg)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        progress.error("cancelled")
        print("cancelled", file=sys.stderr)
        return 130
    except Exception as exc:  # internal error: full traceback for the bug report
        progress.error(f"internal error: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
