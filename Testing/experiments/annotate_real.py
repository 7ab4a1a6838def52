"""Box -> mask annotators on real CT (issue 21): Dice and seconds per annotator setting.

Boxes are drawn as a radiologist would, from the expert mask: one 3D box per connected tumour
(26-connected) and one liver box, each 1 mm larger than the object on every side ("tight"); the
"loose" set enlarges every side further by a random 0-5 mm (seeded); the "2d" set is one 2D box on
each tumour's largest slice. ``ircadb/p01`` is development data (settings are chosen on it);
``ircadb/p17`` is only measured, never tuned on.

    .venv/bin/python Testing/experiments/annotate_real.py --case p01 --runs litemedsam,fill \
        --out docs/results/annotate_p01.json

A run is ``NAME[:key=value,...]`` with keys of ``PropagationSettings`` (view, stride, margin, ...) plus
``window=LO/HI``, ``size=N`` (model input side), ``boxes=tight|loose|2d``; NAME is litemedsam, fill,
trained (needs --teacher) or fused (needs --teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from WeakLiverSegLib import recipes  # noqa: E402
from WeakLiverSegLib.annotate.annotators import load_annotator  # noqa: E402
from WeakLiverSegLib.annotate.propagate import PropagationSettings  # noqa: E402
from WeakLiverSegLib.data.boxes import box_mask, radiologist_boxes  # noqa: E402
from WeakLiverSegLib.data.imageio import read_image  # noqa: E402


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def parse_run(text):
    name, _, rest = text.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, opts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="p01")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ircadb")
    ap.add_argument("--runs", default="litemedsam,fill")
    ap.add_argument("--teacher", type=Path, help="trained model folder (trained / fused runs)")
    ap.add_argument("--only", default="all", help="liver, tumor or all boxes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.case == "p17":
        print("note: p17 is evaluation data: measure only, never choose a setting on it", file=sys.stderr)
    ct = read_image(args.data / args.case / "ct.nii.gz")
    truth = read_image(args.data / args.case / "label.nii.gz").array
    results = []
    annotators = {}     # one per (name, predictor settings): later runs reuse its embedding cache
    for text in args.runs.split(";") if ";" in args.runs else args.runs.split(" "):
        if not text:
            continue
        name, opts = parse_run(text)
        kind = opts.pop("boxes", "tight")
        boxes = radiologist_boxes(truth, ct.spacing, kind, args.seed)
        if args.only != "all":
            boxes = [b for b in boxes if b.label == args.only]
        kwargs = {}
        if "window" in opts:
            kwargs["window"] = tuple(float(v) for v in opts.pop("window").split("/"))
        if "size" in opts:
            kwargs["input_size"] = int(opts.pop("size"))
        if "batch" in opts:
            kwargs["batch_size"] = int(opts.pop("batch"))
        defaults = PropagationSettings()
        def value(k, v):
            d = getattr(defaults, k)
            if d is None or isinstance(d, str):
                return v
            return v.lower() in ("1", "true", "yes") if isinstance(d, bool) else type(d)(v)

        settings = PropagationSettings(**{k: value(k, v) for k, v in opts.items()})
        t0 = time.perf_counter()
        key = (name, tuple(sorted(kwargs.items())))
        if key not in annotators:
            spec = args.teacher if name == "trained" else name     # the trained teacher: its model folder
            annotators[key] = load_annotator(spec, device="cpu", teacher=args.teacher, settings=settings,
                                             recipe_lookup=recipes.get,
                                             **(kwargs if name in ("litemedsam", "fused") else {}))
        ann = annotators[key]
        if hasattr(ann, "settings"):
            ann.settings = settings
        t_load = time.perf_counter() - t0
        res = ann.annotate(ct, boxes, **({"image_key": args.case} if name == "litemedsam" else {}))
        lab = res.labels.array
        row = {"run": text, "annotator": name, "boxes": kind, "n_boxes": len(boxes), "load_s": round(t_load, 2),
               "seconds": round(res.seconds, 2), "encoded_slices": res.encoded_slices,
               "s_per_encoded_slice": round(res.seconds / res.encoded_slices, 3) if res.encoded_slices else None,
               "liver_dice": round(dice(lab >= 1, truth >= 1), 4) if args.only != "tumor" else None,
               "tumor_dice": round(dice(lab == 2, truth == 2), 4) if args.only != "liver" else None,
               "load": os.getloadavg()[0]}
        if args.only != "liver":
            comps, n = ndimage.label(truth == 2, structure=np.ones((3, 3, 3), bool))
            # per tumour: the prediction inside that tumour's own box against the tumour
            row["per_tumor_dice"] = [round(dice((lab == 2) & box_mask(lab.shape, [b]), comps == i), 3)
                                     for i, b in enumerate([b for b in boxes if b.label == "tumor"], start=1)]
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"case": args.case, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
