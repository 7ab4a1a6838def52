"""ACoL region-mining studies of issue 7 (recipe ``acol``), sized for a shared 2-core CPU.  Not a pytest file.

Studies (``--studies``, comma-separated):

* ``table2``: the paper's Table 2 on a synthetic boxes-only cohort (``--cases`` cases, 75 % train
  with boxes only, 25 % held out): box fill / CAM / ACoL, as pseudo-mask tumour Dice against the
  truth on the training cases and as the final segmentation Dice of the student on the held-out
  cases.  Beside them the ``o2l`` teacher's pseudo-masks: ``o2l`` needs a strong set, so it
  trains on a copy of the cohort in which ``--o2l-strong`` of the training cases carry their
  truth mask; its pseudo-masks (and, for a like-for-like row, ACoL's) are scored on the other
  training cases only.
* ``ircadb``: pseudo-mask Dice on the real tumours of ../shared/data/ircadb p01 and p17 from
  per-slice boxes derived from their masks (box fill: 0.804 / 0.858).  The miner is trained on
  p01's boxes (development data) and applied to p01 and to p17; a second miner, with the same
  settings, is trained on p17's own boxes (boxes only: what the teacher is for).  Nothing is
  tuned on p17: the settings come from a separate synthetic cohort (seed 11) and p01.

Every trained model stays in ``--work`` (a rerun reuses it); results go to ``--out`` as JSON and
a markdown table.  Run::

    .venv/bin/python Testing/experiments/acol_experiments.py --work /tmp/acolx --studies table2,ircadb \\
        --out docs/results/acol_experiments
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from WeakLiverSegLib.synth import phantom  # noqa: E402
from WeakLiverSegLib.data.boxes import box_mask, boxes_from_mask  # noqa: E402
from WeakLiverSegLib.learn.config import deep_update  # noqa: E402
from WeakLiverSegLib.data.imageio import read_image  # noqa: E402
from WeakLiverSegLib.learn.modelstore import load_model  # noqa: E402
from WeakLiverSegLib.app.progress import Progress  # noqa: E402
from WeakLiverSegLib.recipes import acol  # noqa: E402
from WeakLiverSegLib.learn.slices import lesion_boxes_for_slices  # noqa: E402
from WeakLiverSegLib.data.store import Dataset  # noqa: E402

SHARED = REPO.parent / "shared" / "data"

# The CPU setting of every study (a few minutes per training on one shared core).
CPU_CONFIG = {
    "classifier": {"size": "cpu", "width": 0.125, "fpn_channels": 32, "head_channels": 64, "roi_size": 7,
                   "negatives": 32, "batch_size": 8, "steps": 400},
    "segmenter": {"crop": 128, "batch_size": 4, "steps": 300},
}


class Counts:
    """Running global Dice sums plus per-case values."""

    def __init__(self):
        self.inter = self.pred = self.truth = 0
        self.cases = {}
        self.sums = {}          # case -> (intersection, predicted, true) voxels: global Dice of any subset

    def add(self, case_id, pred, truth):
        pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
        sums = (int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))
        self.inter += sums[0]
        self.pred += sums[1]
        self.truth += sums[2]
        self.sums[case_id] = sums
        self.cases[case_id] = acol.dice(pred, truth)

    def subset(self, ids) -> "Counts":
        out = Counts()
        for case_id in ids:
            inter, pred, truth = self.sums[case_id]
            out.inter, out.pred, out.truth = out.inter + inter, out.pred + pred, out.truth + truth
            out.sums[case_id], out.cases[case_id] = self.sums[case_id], self.cases[case_id]
        return out

    def summary(self) -> dict:
        values = [v for v in self.cases.values() if v is not None]
        total = self.pred + self.truth
        return {"dice_global": None if total == 0 else round(2 * self.inter / total, 4),
                "dice_per_case": None if not values else round(float(np.mean(values)), 4),
                "cases": {k: None if v is None else round(v, 4) for k, v in self.cases.items()}}


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train_acol(dataset, out, mode, config, progress=None, device="cpu") -> tuple:
    """Train (or reuse) an acol model; returns (LoadedModel, seconds or None when reused)."""
    out = Path(out)
    seconds = None
    if not (out / "model.json").exists():
        t0 = time.perf_counter()
        acol.train(dataset, out, deep_update(config, {"classifier": {"mode": mode}}), device,
                   progress or Progress("none"))
        seconds = round(time.perf_counter() - t0, 1)
    model = load_model(out)
    return model, seconds or model.meta["training"]["seconds"].get("total")


def tumour_boxes(case):
    return lesion_boxes_for_slices(case.boxes)


def raw_unary(model):
    """The same model with the paper's unary (the raw fused map, no fill prior)."""
    meta = json.loads(json.dumps(model.meta))
    meta["training"]["config"]["crf"]["fill_prior"] = None
    return type(model)(model.path, meta, model.networks)


def pseudo_scores(model, dataset, cases, progress_name="", device="cpu") -> Counts:
    counts = Counts()
    for case in cases:
        image = dataset.read_image(case.id)
        truth = dataset.read_truth(case.id).array == 2
        fg, _ = acol.pseudo_mask(model, image, tumour_boxes(case), device)
        counts.add(case.id, fg, truth)
    log(f"  pseudo {progress_name}: {counts.summary()['dice_global']}")
    return counts


def box_fill_scores(dataset, cases) -> Counts:
    counts = Counts()
    for case in cases:
        truth = dataset.read_truth(case.id).array == 2
        counts.add(case.id, box_mask(truth.shape, tumour_boxes(case)), truth)
    return counts


def segment_scores(segment, dataset, cases) -> tuple:
    """(tumour Dice counts, the same with the prediction cut to the true liver: a diagnostic of how much
    of the error is false positives outside the liver, which a tumour-only 2.5D student cannot tell)."""
    counts, in_liver = Counts(), Counts()
    for case in cases:
        image = dataset.read_image(case.id)
        labels = segment(image)
        truth = dataset.read_truth(case.id).array
        counts.add(case.id, labels == 2, truth == 2)
        in_liver.add(case.id, (labels == 2) & (truth >= 1), truth == 2)
    return counts, in_liver


# ----------------------------------------------------------------------------- Table 2


def with_strong_cases(src: Dataset, out: Path, strong_ids) -> Dataset:
    """A copy of ``src`` in which ``strong_ids`` carry their truth mask (the o2l teacher's strong set)."""
    if (out / "dataset.json").exists():
        return Dataset.load(out)
    ds = Dataset.create(out, name=f"{src.name}-o2l")
    for case in src.cases.values():
        images = {p: src.read_image(case.id, p) for p in case.images}
        truth = {k: src.read_truth(case.id, k) for k in (case.truth or {})}
        ds.add_case(case.id, images, reference=case.reference,
                    mask=truth["mask"] if case.id in strong_ids else None,
                    boxes=case.boxes, liver_box=case.liver_box, split=case.split, truth=truth)
    return ds


def _table2_method(work, mode, config, device, threads, o2l_steps=0, weak_ids=(), strong_ids=()) -> dict:
    """One Table 2 row (run in its own process with ``--jobs``): train (or reuse) the model, score it.

    Returns the row plus ``_pseudo_sums`` (per-case voxel sums) so the parent can score any subset."""
    torch.set_num_threads(threads)
    work = Path(work)
    ds = Dataset.load(work / "table2_cohort")
    train_cases = [c for c in ds.cases.values() if c.split == "train" and tumour_boxes(c)]
    test_cases = [c for c in ds.cases.values() if c.split == "test"]
    if mode == "o2l":
        from WeakLiverSegLib.recipes import o2l

        ds2 = Dataset.load(work / "table2_cohort_o2l")
        out = work / "table2_o2l"
        t0 = time.perf_counter()
        if not (out / "model.json").exists():
            log(f"table2: training o2l on {len(strong_ids)} strong + {len(weak_ids)} box cases")
            o2l.train(ds2, out, {"steps": o2l_steps or None, "seed": 0}, device, Progress("none"))
        model = load_model(out)
        seconds = model.meta["training"]["seconds"].get("total", round(time.perf_counter() - t0, 1))
        counts = Counts()
        for case in (c for c in train_cases if c.id in set(weak_ids)):
            image = ds2.read_image(case.id)
            res = o2l.segment(model, {"enhanced": image}, boxes=[case.liver_box] + list(case.boxes), device=device,
                              use_teacher=True)
            counts.add(case.id, res.labels.array == 2, ds2.read_truth(case.id).array == 2)
        seg, seg_liver = segment_scores(lambda im: o2l.segment(model, {"enhanced": im}, device=device).labels.array,
                                        ds2, test_cases)
        row = {"pseudo": counts.summary(), "segmentation": seg.summary(),
               "segmentation_in_true_liver": seg_liver.summary(), "train_s": seconds, "strong_cases": list(strong_ids)}
        # the acol segmenter (same settings as the other rows) on the o2l teacher's pseudo-masks (+ the strong masks)
        pseudo_dir = work / "table2_o2l_pseudo"
        if not (pseudo_dir / "dataset.json").exists():
            shutil.rmtree(pseudo_dir, ignore_errors=True)
            o2l.pseudo(model, ds2, pseudo_dir, device)
        seg_model, seg_s = train_acol(Dataset.load(pseudo_dir), work / "table2_o2l_acol_segmenter", "box", config,
                                      device=device)
        seg2, seg2_liver = segment_scores(
            lambda im: acol.segment(seg_model, {"enhanced": im}, device=device).labels.array, ds, test_cases)
        row["acol_segmenter"] = {"segmentation": seg2.summary(), "segmentation_in_true_liver": seg2_liver.summary(),
                                 "train_s": seg_s}
        log(f"table2: o2l: pseudo {row['pseudo']['dice_global']} seg (o2l student) {row['segmentation']['dice_global']}"
            f" seg (acol segmenter) {seg2.summary()['dice_global']}")
        return row
    log(f"table2: training {mode}")
    model, seconds = train_acol(ds, work / f"table2_{mode}", mode, config, device=device)
    pseudo = box_fill_scores(ds, train_cases) if mode == "box" else pseudo_scores(model, ds, train_cases, mode, device)
    seg, seg_liver = segment_scores(lambda im: acol.segment(model, {"enhanced": im}, device=device).labels.array, ds,
                                    test_cases)
    row = {"pseudo": pseudo.summary(), "segmentation": seg.summary(),
           "segmentation_in_true_liver": seg_liver.summary(), "train_s": seconds, "_pseudo_sums": pseudo.sums}
    if mode in ("cam", "acol"):
        row["pseudo_raw_unary"] = pseudo_scores(raw_unary(model), ds, train_cases, f"{mode} raw", device).summary()
    log(f"table2: {mode}: pseudo {row['pseudo']['dice_global']} seg {row['segmentation']['dice_global']}")
    return row


def study_table2(args, config) -> dict:
    work = Path(args.work)
    cohort_dir = work / "table2_cohort"
    if (cohort_dir / "dataset.json").exists():
        ds = Dataset.load(cohort_dir)
    else:
        ds = phantom.generate_cohort(cohort_dir, cases=args.cases, seed=args.seed, mix="box=0.75,test=0.25")
    train_cases = [c for c in ds.cases.values() if c.split == "train" and tumour_boxes(c)]
    test_cases = [c for c in ds.cases.values() if c.split == "test"]
    log(f"table2: {len(train_cases)} train cases with tumour boxes, {len(test_cases)} held out")
    modes = ["box", "centre", "cam", "acol"]
    k = max(1, int(round(args.o2l_strong * len(train_cases))))
    strong_ids = [c.id for c in train_cases[:k]]
    weak_ids = [c.id for c in train_cases[k:]]
    if not args.skip_o2l:
        with_strong_cases(ds, work / "table2_cohort_o2l", set(strong_ids))    # made here: the workers only read it
        modes.append("o2l")
    jobs = [(str(work), mode, config, args.device, args.threads, args.o2l_steps, weak_ids, strong_ids) for mode in modes]
    if args.jobs > 1:
        with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_table2_method, *zip(*jobs)))
    else:
        done = [_table2_method(*job) for job in jobs]
    rows = dict(zip(modes, done))
    extra = {}
    if not args.skip_o2l:
        # like-for-like: the box-only teachers on the o2l teacher's weak cases
        extra = {mode: counts_from_sums(rows[mode]["_pseudo_sums"]).subset(weak_ids).summary()
                 for mode in ("box", "centre", "cam", "acol")}
    for row in rows.values():
        row.pop("_pseudo_sums", None)
    return {"cohort": {"dir": str(cohort_dir), "cases": args.cases, "seed": args.seed, "mix": "box=0.75,test=0.25",
                       "train_with_tumour": [c.id for c in train_cases], "test": [c.id for c in test_cases]},
            "rows": rows, "same_cases_as_o2l": extra}


def counts_from_sums(sums: dict) -> Counts:
    """Counts rebuilt from per-case (intersection, predicted, true) sums."""
    out = Counts()
    for case_id, (inter, pred, truth) in sums.items():
        out.inter, out.pred, out.truth = out.inter + inter, out.pred + pred, out.truth + truth
        out.sums[case_id] = (inter, pred, truth)
        out.cases[case_id] = None if pred + truth == 0 else 2.0 * inter / (pred + truth)
    return out


# ----------------------------------------------------------------------------- IRCADb


def ircadb_store(work: Path, patient: str) -> Dataset:
    """A one-case store of ircadb/<patient>: the CT and per-slice tumour boxes from its mask (no mask)."""
    out = work / f"ircadb_{patient}"
    if (out / "dataset.json").exists():
        return Dataset.load(out)
    image = read_image(SHARED / "ircadb" / patient / "ct.nii.gz")
    label = read_image(SHARED / "ircadb" / patient / "label.nii.gz")
    boxes = boxes_from_mask(label.array, 2, per_slice=True)
    ds = Dataset.create(out, name=f"ircadb-{patient}-boxes")
    ds.add_case(patient, {"ct": image}, boxes=boxes, split="train",
                truth={"mask": label.with_array(label.array.astype(np.uint8))})
    return ds


def study_ircadb(args, config) -> dict:
    if not (SHARED / "ircadb").is_dir():
        log(f"ircadb: {SHARED / 'ircadb'} is absent: skipped")
        return {"skipped": "no ../shared/data/ircadb"}
    work = Path(args.work)
    stores = {p: ircadb_store(work, p) for p in ("p01", "p17")}
    mine_only = deep_update(config, {"segmenter": {"steps": 0}})
    results = {"box_fill": {}, "miners": {}}
    for p, ds in stores.items():
        case = ds.cases[p]
        results["box_fill"][p] = box_fill_scores(ds, [case]).summary()["dice_global"]
    for p, ds in stores.items():
        model, _ = train_acol(ds, work / f"ircadb_centre_{p}", "centre", mine_only)
        score = pseudo_scores(model, ds, [ds.cases[p]], f"centre {p}").summary()["dice_global"]
        results["miners"][f"centre prior, applied to {p}"] = {"mode": "centre", "applied_to": p, "dice": score}
    for mode in ("cam", "acol"):
        for trained_on in ("p01", "p17"):
            log(f"ircadb: training {mode} on {trained_on}")
            model, seconds = train_acol(stores[trained_on], work / f"ircadb_{mode}_{trained_on}", mode, mine_only)
            targets = ("p01", "p17") if trained_on == "p01" else ("p17",)
            for p in targets:
                ds = stores[p]
                score = pseudo_scores(model, ds, [ds.cases[p]], f"{mode} {trained_on}->{p}").summary()["dice_global"]
                raw = pseudo_scores(raw_unary(model), ds, [ds.cases[p]], f"{mode} raw").summary()["dice_global"]
                results["miners"][f"{mode} trained on {trained_on}, applied to {p}"] = {
                    "mode": mode, "trained_on": trained_on, "applied_to": p, "dice": score, "dice_raw_unary": raw,
                    "train_s": seconds}
    return results


# ----------------------------------------------------------------------------- report


def markdown(results: dict, command: str) -> str:
    commands = results.get("commands") or {"all": command}
    lines = ["# Recipe `acol`: region-mining studies (issue 7)", "",
             "Commands (from the repository root): "
             + "; ".join(f"{name}: `{cmd}`" for name, cmd in commands.items()), "",
             "Settings (the rest are `acol.DEFAULTS`, the full resolved config is in the JSON): "
             + json.dumps(results["config"]), "", "Every miner is trained from scratch (no pretrained weights).", ""]
    t2 = results.get("table2")
    if t2:
        lines += ["## Table 2 on a synthetic boxes-only cohort", "",
                  f"Cohort: {t2['cohort']['cases']} cases, seed {t2['cohort']['seed']}, mix {t2['cohort']['mix']}; "
                  f"{len(t2['cohort']['train_with_tumour'])} training cases with tumours, "
                  f"{len(t2['cohort']['test'])} held out. Device {t2.get('device', 'cpu')}, study wall time "
                  f"{t2.get('seconds')} s (methods in parallel processes when `--jobs` > 1).", "",
                  "| method | pseudo-mask Dice (global) | pseudo-mask Dice (per case) | segmentation Dice, held out (global) "
                  "| segmentation Dice (per case) | segmentation Dice inside the true liver (global) | train s |",
                  "|---|---|---|---|---|---|---|"]
        names = {"box": "box fill (baseline)", "centre": "centre prior + CRF (control, no mining)", "cam": "CAM + CRF",
                 "acol": "ACoL + CRF", "o2l": "o2l teacher (needs masks)"}
        for key, row in t2["rows"].items():
            liver = row.get("segmentation_in_true_liver", {}).get("dice_global")
            name = names.get(key, key) + (", o2l's own student" if "acol_segmenter" in row else "")
            lines.append(f"| {name} | {row['pseudo']['dice_global']} | {row['pseudo']['dice_per_case']} "
                         f"| {row['segmentation']['dice_global']} | {row['segmentation']['dice_per_case']} "
                         f"| {liver} | {row['train_s']} |")
            if "acol_segmenter" in row:
                a = row["acol_segmenter"]
                lines.append(f"| {names.get(key, key)}, acol segmenter on its pseudo-masks + the strong masks "
                             f"| {row['pseudo']['dice_global']} | {row['pseudo']['dice_per_case']} "
                             f"| {a['segmentation']['dice_global']} | {a['segmentation']['dice_per_case']} "
                             f"| {a['segmentation_in_true_liver']['dice_global']} | {a['train_s']} |")
        for key in ("cam", "acol"):
            if "pseudo_raw_unary" in t2["rows"].get(key, {}):
                r = t2["rows"][key]["pseudo_raw_unary"]
                lines.append(f"| {names[key]}, raw unary (paper, no fill prior) | {r['dice_global']} | {r['dice_per_case']} "
                             f"| - | - | - | - |")
        if t2.get("same_cases_as_o2l"):
            ids = ", ".join(sorted(next(iter(t2["same_cases_as_o2l"].values()))["cases"]))
            lines += ["", f"Pseudo-mask Dice (global) on o2l's weak cases only ({ids}): "
                      + ", ".join(f"{names[k]} {v['dice_global']}" for k, v in t2["same_cases_as_o2l"].items())
                      + f", o2l teacher {t2['rows']['o2l']['pseudo']['dice_global']}."]
    ir = results.get("ircadb")
    if ir and "skipped" not in ir:
        lines += ["", "## Real tumours: 3D-IRCADb p01 (development) and p17 (measured only)", "",
                  "Per-slice tumour boxes from the masks; pseudo-mask Dice against the expert tumour mask.", "",
                  "| pseudo-masks | p01 | p17 |", "|---|---|---|",
                  f"| box fill | {ir['box_fill']['p01']:.4f} | {ir['box_fill']['p17']:.4f} |",
                  f"| centre prior + CRF (control, no mining) | {ir['miners']['centre prior, applied to p01']['dice']} "
                  f"| {ir['miners']['centre prior, applied to p17']['dice']} |"]
        for mode in ("cam", "acol"):
            m, label = ir["miners"], {"cam": "CAM", "acol": "ACoL"}[mode]
            lines.append(f"| {label} + CRF, miner trained on p01 | {m[f'{mode} trained on p01, applied to p01']['dice']} "
                         f"| {m[f'{mode} trained on p01, applied to p17']['dice']} |")
            lines.append(f"| {label} + CRF, miner trained on p17's boxes | - "
                         f"| {m[f'{mode} trained on p17, applied to p17']['dice']} |")
            lines.append(f"| {label} + CRF, raw unary (paper), miner trained on p01 "
                         f"| {m[f'{mode} trained on p01, applied to p01']['dice_raw_unary']} "
                         f"| {m[f'{mode} trained on p01, applied to p17']['dice_raw_unary']} |")
    lines += ["", "## Notes", "",
              "* Pseudo-mask Dice: tumour voxels of the pseudo-masks (on the input grid, inside the boxes) against the "
              "truth, summed over the training cases (global) or averaged per case.",
              "* Fill prior (`crf.fill_prior` 0.6, the recipe's default) vs raw unary (`null`, the paper's "
              "-log of the min-max map): the same trained miner, two ways to feed the CRF.",
              "* Centre prior + CRF: no miner; a centred Gaussian in each box, the same fill prior and CRF. It "
              "measures what the mining adds beyond the box, the prior and the CRF.",
              "* Segmentation Dice inside the true liver: the student's tumour voxels outside the true liver removed "
              "before scoring (evaluation only; the recipe is tumour-only).  Before the segmenter fix (tumour-only "
              "Dice, 300 steps of 4 liver-centred 128 px crops) the students fired on the darker organs outside the "
              "liver and scored 0.20-0.40 held out; with the two-class Dice, whole-slice crops and 2000 steps the two "
              "columns agree.",
              "* o2l rows: the o2l teacher trains on a copy of the cohort in which the first 30 % of the training "
              "cases carry their mask; 'o2l's own student' is o2l's student (liver + tumour, its own defaults), "
              "'acol segmenter' is this recipe's segmenter trained on the o2l teacher's pseudo-masks plus those masks.",
              "* CRF kernels and the fill prior were chosen on a separate synthetic cohort (seed 11) and on p01; "
              "nothing was tuned on p17 or on the Table 2 cohort (seed 2026)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for cohorts and models (reused on a rerun)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "acol_experiments"),
                    help="results prefix: writes PREFIX.json and PREFIX.md")
    ap.add_argument("--studies", default="table2,ircadb")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--o2l-strong", type=float, default=0.3, help="fraction of training cases given masks for o2l")
    ap.add_argument("--o2l-steps", type=int, default=0, help="o2l's total steps (0: its own defaults)")
    ap.add_argument("--skip-o2l", action="store_true")
    ap.add_argument("--set", default="{}", help="JSON merged into the CPU config")
    ap.add_argument("--device", default="cpu", help="torch device for training and inference (cpu, cuda)")
    ap.add_argument("--jobs", type=int, default=1, help="Table 2 methods trained in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = deep_update(CPU_CONFIG, json.loads(args.set))
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    out = Path(args.out)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    if studies:              # the settings of the studies run now (a re-render keeps the recorded ones)
        results["config"] = config
        results["resolved_config"] = acol.resolve_config(deep_update(config, {"classifier": {"mode": "acol"}}), args.device)
    command = "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    for name, fn in (("table2", study_table2), ("ircadb", study_ircadb)):
        if name in studies:
            t0 = time.perf_counter()
            results[name] = fn(args, config)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            results[name]["device"] = args.device
            results.setdefault("commands", {})[name] = command
            out.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(results, command))
    if not studies:          # --studies "": re-render the markdown from the JSON (no training)
        out.with_suffix(".md").write_text(markdown(results, command))
    log(f"wrote {path} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
