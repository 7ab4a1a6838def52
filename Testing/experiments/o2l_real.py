"""O2L teacher on real CT: tumour pseudo-labels of 3D-IRCADb from per-slice boxes (not collected by pytest).

    python Testing/experiments/o2l_real.py --out DIR --target p17 --strong p01 [--synthetic 12] [--set k=v ...]
                                           [--init MODEL]   (fine-tune, e.g. from Resources/models/starter)

The teacher trains on the strong cases: ``--strong`` IRCADb patients (CT + expert mask) plus
``--synthetic`` phantom cases with masks.  The target patient enters the store as a weak case: its
CT, a liver box and per-slice tumour boxes derived from its mask (the mask itself is not stored).
The teacher's tumour pseudo-label is scored against the target's mask, beside filling the boxes.

Protocol: settings are chosen on p01 -- ``--target p01 --strong`` (synthetic strong cases only) or
``--target p01 --split-z 86`` (p01's lower slices strong, its upper slices weak); ``p17`` is only
measured, never tuned on (../shared/data/README.md).  Writes ``DIR/o2l_real_<target>.json``.

``--annotator A`` (repeatable; default ``trained`` = the teacher, as before) also scores box annotators
as pseudo-labellers of the weak case (``learn.slices.annotate_case``: liver box + per-slice tumour
boxes stacked per lesion, tumour clipped to the per-slice boxes; what ``--set teacher.annotator=...``
does inside o2l): ``litemedsam`` (pretrained), ``fused`` (litemedsam + the trained teacher),
``finetuned`` (LiteMedSAM fine-tuned by the litemedsam recipe on the strong *real* case(s) only,
``--finetune-steps`` steps), ``fill``, or a LiteMedSAM model folder.  The o2l model is trained only
when ``trained`` or ``fused`` is asked for.  The image encoder is frozen by fine-tuning, so the
fine-tuned annotator reuses the pretrained one's slice embeddings (same tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ircadb"


def dice(a, b) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def slab(volume, z0: int, z1: int):
    """Slices z0..z1-1 of a Volume as a Volume with the matching world origin."""
    from WeakLiverSegLib.data.volume import Volume

    origin = volume.index_to_world((0, 0, z0))
    return Volume(volume.array[z0:z1].copy(), volume.spacing, tuple(origin), volume.direction)


def build_split_store(out: Path, patient: str, synthetic, seed, split_z: int):
    """Development store from one patient: the slices below ``split_z`` strong (mask), the rest weak."""
    from WeakLiverSegLib.synth import phantom
    from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
    from WeakLiverSegLib.data.imageio import read_image, read_label_map
    from WeakLiverSegLib.data.store import Dataset

    if synthetic:
        phantom.generate_cohort(out, cases=synthetic, seed=seed, mix="strong=1.0")
        ds = Dataset.load(out)
    else:
        ds = Dataset.create(out, name="o2l-real-split")
    ct = read_image(DATA / patient / "ct.nii.gz")
    label = read_label_map(DATA / patient / "label.nii.gz")
    n = ct.array.shape[0]
    for name, (z0, z1), weak in (("lower", (0, split_z), False), ("upper", (split_z, n), True)):
        lab = slab(label, z0, z1)
        ds.add_case(f"ircadb_{patient}_{name}", {"enhanced": slab(ct, z0, z1)}, mask=None if weak else lab,
                    boxes=boxes_from_mask(lab.array, 2, per_slice=True), liver_box=liver_box_from_mask(lab.array))
    return ds


def build_store(out: Path, strong, target, synthetic, seed):
    from WeakLiverSegLib.synth import phantom
    from WeakLiverSegLib.data.boxes import boxes_from_mask, liver_box_from_mask
    from WeakLiverSegLib.data.imageio import read_image, read_label_map
    from WeakLiverSegLib.data.store import Dataset

    if synthetic:
        phantom.generate_cohort(out, cases=synthetic, seed=seed, mix="strong=1.0")
        ds = Dataset.load(out)
    else:
        ds = Dataset.create(out, name="o2l-real")
    for patient, weak in [(p, False) for p in strong] + [(target, True)]:
        ct = read_image(DATA / patient / "ct.nii.gz")
        label = read_label_map(DATA / patient / "label.nii.gz")
        boxes = boxes_from_mask(label.array, 2, per_slice=True)
        ds.add_case(f"ircadb_{patient}", {"enhanced": ct}, mask=None if weak else label, boxes=boxes,
                    liver_box=liver_box_from_mask(label.array))
    return ds


def score_annotators(a, annotators, ds, case, image, truth, model, out) -> dict:
    """Pseudo-label Dice of the weak case from each box annotator (not ``trained``: scored above)."""
    from WeakLiverSegLib import recipes
    from WeakLiverSegLib.annotate.annotators import FusedAnnotator, TrainedAnnotator, load_annotator
    from WeakLiverSegLib.app.cli import parse_overrides
    from WeakLiverSegLib.app.progress import Progress
    from WeakLiverSegLib.data.store import Dataset
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.learn.slices import annotate_case

    scores, sam = {}, None
    for name in [n for n in annotators if n != "trained"]:
        t0 = time.monotonic()
        extra = {}
        if name in ("litemedsam", "fused"):
            sam = sam or load_annotator("litemedsam", a.device)
            ann = sam if name == "litemedsam" else FusedAnnotator(
                sam, TrainedAnnotator(model, recipes.get(model.recipe), a.device))
        elif name == "finetuned":
            ft_dir = out / "litemedsam_ft"
            if not (ft_dir / "model.json").exists():
                real = out / "store_real"      # the strong real case(s) only: no phantoms
                if not (real / "dataset.json").exists():
                    if a.split_z is not None:
                        build_split_store(real, a.target, 0, a.seed, a.split_z)
                    else:
                        build_store(real, a.strong, a.target, 0, a.seed)
                ftcfg = dict({"train_steps": a.finetune_steps, "seed": a.seed}, **parse_overrides(a.finetune_set))
                recipes.get("litemedsam").train(Dataset.load(real), ft_dir, ftcfg, a.device, Progress("bar"))
            ann = load_annotator(ft_dir, a.device)
            if sam is not None:     # frozen encoder: the pretrained annotator's embeddings are the same
                ann.predictor._cache, ann.predictor._image_key = sam.predictor._cache, sam.predictor._image_key
            meta = load_model(ft_dir).meta
            extra = {"finetune_seconds": meta["training"]["seconds"], "finetune_data": meta["training"]["data"],
                     "finetune_config": meta["training"]["config"]}
        else:
            ann = load_annotator(name, a.device)
        encoded0 = getattr(getattr(ann, "predictor", None) or getattr(getattr(ann, "sam", None), "predictor", None),
                           "encoded", 0)
        labels = annotate_case(ann, image, case.liver_box, case.boxes, Progress("none"), where=case.id)
        pred = getattr(ann, "predictor", None) or getattr(getattr(ann, "sam", None), "predictor", None)
        scores[name] = dict({"tumour_dice": round(dice(labels == 2, truth == 2), 4),
                             "liver_dice": round(dice(labels >= 1, truth >= 1), 4),
                             "seconds": round(time.monotonic() - t0, 1),
                             "encoded_slices": (pred.encoded - encoded0) if pred is not None else 0}, **extra)
        print(name, json.dumps(scores[name])[:300], flush=True)
    return scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="p17")
    ap.add_argument("--strong", nargs="*", default=["p01"])
    ap.add_argument("--synthetic", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--init", default=None, help="start from this model (train --init), e.g. the starter")
    ap.add_argument("--annotator", action="append", default=None,
                    help="trained (default) | litemedsam | fused | finetuned | fill | MODEL_DIR; repeat to compare")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--finetune-set", action="append", default=[], help="litemedsam recipe setting k=v")
    ap.add_argument("--split-z", type=int, default=None,
                    help="development mode: slices of --target below this index are the strong case, the rest "
                         "the weak one (use with p01 only)")
    a = ap.parse_args()
    from WeakLiverSegLib.data.boxes import box_mask
    from WeakLiverSegLib.app.cli import parse_overrides
    from WeakLiverSegLib.learn.config import deep_update
    from WeakLiverSegLib.data.imageio import read_label_map
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.app.progress import Progress
    from WeakLiverSegLib.recipes import o2l

    from WeakLiverSegLib.data.store import Dataset

    out = Path(a.out)
    annotators = a.annotator or ["trained"]
    need_o2l = bool({"trained", "fused"} & set(annotators))
    # The student is not part of this study: one step keeps the pipeline whole and cheap.
    cfg = deep_update({"seed": a.seed, "student": {"steps": 1}}, parse_overrides(a.set))
    if (out / "store" / "dataset.json").exists():     # re-score an earlier run (e.g. new metrics)
        ds = Dataset.load(out / "store")
    else:
        ds = (build_split_store(out / "store", a.target, a.synthetic, a.seed, a.split_z) if a.split_z is not None
              else build_store(out / "store", a.strong, a.target, a.synthetic, a.seed))
    if need_o2l and not (out / "model" / "model.json").exists():
        o2l.train(ds, out / "model", cfg, a.device, Progress("bar"), init=a.init)
    model = load_model(out / "model") if need_o2l else None
    cfg = model.meta["training"]["config"] if need_o2l else cfg
    if a.split_z is not None:
        if a.target == "p17":
            raise SystemExit("--split-z is for development on p01, never on p17")
        case = ds.cases[f"ircadb_{a.target}_upper"]
        truth = read_label_map(DATA / a.target / "label.nii.gz").array[a.split_z:]
    else:
        case = ds.cases[f"ircadb_{a.target}"]
        truth = read_label_map(DATA / a.target / "label.nii.gz").array
    image = ds.read_image(case.id)
    tumour = truth == 2
    result = {
        "command": "python " + " ".join(sys.argv),
        "target": a.target, "strong": a.strong, "init": a.init, "synthetic_strong_cases": a.synthetic, "config": cfg,
        "tumour_boxes": len(case.boxes),
        "tumour_dice_box_fill": round(dice(box_mask(truth.shape, case.boxes), tumour), 4),
        "train_seconds": model.meta["training"]["seconds"].get("total") if model else None,   # as recorded when it was trained
    }
    # The paper's teacher output, and the same clipped to the boxes (teacher.box_constraint).
    for constrained in ((False, True) if "trained" in annotators else ()):
        model.meta["training"]["config"]["teacher"]["box_constraint"] = constrained
        t0 = time.monotonic()
        r = o2l.segment(model, {"enhanced": image}, boxes=[case.liver_box] + list(case.boxes), device=a.device,
                        use_teacher=True)
        key = "box_constrained" if constrained else "teacher"
        result[f"pseudo_label_seconds_{key}"] = round(time.monotonic() - t0, 1)
        result[f"tumour_dice_{key}"] = round(dice(r.labels.array == 2, tumour), 4)
        result[f"liver_dice_{key}"] = round(dice(r.labels.array >= 1, truth >= 1), 4)
    result["annotators"] = score_annotators(a, annotators, ds, case, image, truth, model, out)
    (out / f"o2l_real_{a.target}{'' if a.split_z is None else f'_split{a.split_z}'}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
