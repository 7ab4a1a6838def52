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
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from WeakLiverSegLib.annotate.annotators import load_annotator  # noqa: E402
from WeakLiverSegLib.annotate.propagate import PropagationSettings  # noqa: E402
from WeakLiverSegLib.data.boxes import Box  # noqa: E402
from WeakLiverSegLib.data.imageio import read_image  # noqa: E402


def _grow(lo, hi, mm_lo, mm_hi, spacing, shape_xyz):
    lo = [max(0, int(a - math.ceil(m / s))) for a, m, s in zip(lo, mm_lo, spacing)]
    hi = [min(n - 1, int(b + math.ceil(m / s))) for b, m, s, n in zip(hi, mm_hi, spacing, shape_xyz)]
    return tuple(lo), tuple(hi)


def radiologist_boxes(label, spacing, kind="tight", seed=0, margin_mm=1.0, loose_mm=5.0):
    """Liver box + tumour boxes from an expert label map (z, y, x), as described in the docstring."""
    rng = np.random.default_rng(seed)
    shape_xyz = label.shape[::-1]
    boxes = []

    def add(name, sl, flat_k=None):
        lo = [sl[2].start, sl[1].start, sl[0].start if flat_k is None else flat_k]
        hi = [sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1 if flat_k is None else flat_k]
        m_lo = np.full(3, margin_mm)
        m_hi = np.full(3, margin_mm)
        if kind == "loose":
            m_lo = m_lo + rng.uniform(0, loose_mm, 3)
            m_hi = m_hi + rng.uniform(0, loose_mm, 3)
        if flat_k is not None:
            m_lo[2] = m_hi[2] = 0
        lo, hi = _grow(lo, hi, m_lo, m_hi, spacing, shape_xyz)
        boxes.append(Box(name, lo, hi, source="derived"))

    add("liver", ndimage.find_objects((label >= 1).astype(np.uint8))[0])
    comps, n = ndimage.label(label == 2, structure=np.ones((3, 3, 3), bool))
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        if kind == "2d":
            areas = (comps[sl] == i).sum(axis=(1, 2))
            k = sl[0].start + int(np.argmax(areas))
            plane = comps[k] == i
            add("tumor", (slice(k, k + 1),) + ndimage.find_objects(plane.astype(np.uint8))[0], flat_k=k)
        else:
            add("tumor", sl)
    return boxes


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
        fields = PropagationSettings.__dataclass_fields__
        settings = PropagationSettings(**{k: (fields[k].type == "str" and v) or type(getattr(PropagationSettings(), k))(v)
                                          for k, v in opts.items()})
        t0 = time.perf_counter()
        ann = load_annotator(name, device="cpu", teacher=args.teacher, settings=settings, **(kwargs if name in ("litemedsam", "fused") else {}))
        t_load = time.perf_counter() - t0
        res = ann.annotate(ct, boxes)
        lab = res.labels.array
        row = {"run": text, "annotator": name, "boxes": kind, "n_boxes": len(boxes), "load_s": round(t_load, 2),
               "seconds": round(res.seconds, 2), "encoded_slices": res.encoded_slices,
               "s_per_encoded_slice": round(res.seconds / res.encoded_slices, 3) if res.encoded_slices else None,
               "liver_dice": round(dice(lab >= 1, truth >= 1), 4) if args.only != "tumor" else None,
               "tumor_dice": round(dice(lab == 2, truth == 2), 4) if args.only != "liver" else None,
               "load": os.getloadavg()[0]}
        if args.only != "liver":
            comps, n = ndimage.label(truth == 2, structure=np.ones((3, 3, 3), bool))
            row["per_tumor_dice"] = [round(dice((lab == 2) & (comps == i) | ((lab == 2) & ndimage.binary_dilation(comps == i, iterations=3)), comps == i), 3) for i in range(1, n + 1)]
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"case": args.case, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
