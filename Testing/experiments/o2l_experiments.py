"""O2L paper Tables I-II and the perturbed-box study on synthetic cohorts (not collected by pytest).

    python Testing/experiments/o2l_experiments.py --out DIR [--device cuda] [--seeds 0 1 2]
        [--cases 60] [--test-cases 20] [--jobs 7] [--set key=value ...]

Per seed: a phantom cohort (30:60:10 strong:box:test, ``--cases``), a second held-out cohort of
``--test-cases`` (another seed), and a copy of the cohort whose weak boxes are perturbed with the
paper's protocol (section IV-F, ``boxes.perturb_box``).  Runs (each a full ``o2l.train``):

    teacher_none / teacher_multichannel / o2l  -- Table I (the ``o2l`` run is the default recipe)
    strong_only / mixed / (o2l = mixed_loc) / full -- Table II (``full`` reads the truth masks)
    perturbed_boxes                             -- the default recipe trained on the perturbed copy

Reported: teacher pseudo-label Dice on the weak (box) cases against their truth, with the boxes the
run trained with, plus the default teacher fed perturbed boxes at inference; student Dice on the
held-out cases (test split + the extra cohort).  Writes ``DIR/o2l_experiments.json`` and ``.md``.
Nothing here is tuned on ``ircadb/p17``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RUNS = {
    "teacher_none": {"teacher": {"attention": "none"}},
    "teacher_multichannel": {"teacher": {"attention": "multichannel"}},
    "o2l": {},
    "strong_only": {"student": {"variant": "strong_only"}},
    "mixed": {"student": {"variant": "mixed"}},
    "full": {"student": {"variant": "full"}},
    "perturbed_boxes": {},
}


def perturbed_copy(ds, out, seed):
    """Copy ``ds`` to ``out`` with every weak case's liver box and tumour boxes perturbed."""
    from WeakLiverSegLib.data.boxes import perturb_box
    from WeakLiverSegLib.data.store import Dataset

    rng = np.random.default_rng(seed)
    target = Dataset.create(out, name="perturbed", exist_ok=False)
    for case in ds.cases.values():
        images = {p: ds.read_image(case.id, p) for p in case.images}
        shape_xyz = images[case.reference].array.shape[::-1]
        weak = case.mask is None and case.liver_box is not None
        liver_box = perturb_box(case.liver_box, rng, shape_xyz=shape_xyz) if weak else case.liver_box
        boxes = [perturb_box(b, rng, shape_xyz=shape_xyz) for b in case.boxes] if weak else case.boxes
        truth = {k: ds.read_truth(case.id, k) for k in (case.truth or {})} or None
        target.add_case(case.id, images, reference=case.reference, mask=ds.read_mask(case.id), boxes=boxes,
                        liver_box=liver_box, couinaud=case.couinaud, volume_label=case.volume_label,
                        split=case.split, truth=truth)
    return target


def make_cohorts(root: Path, seed: int, cases: int, test_cases: int, shape):
    from WeakLiverSegLib.synth import phantom
    from WeakLiverSegLib.data.store import Dataset

    extra = {"shape": tuple(shape)} if shape else {}
    main = root / f"seed{seed}" / "cohort"
    if not (main / "dataset.json").exists():
        phantom.generate_cohort(main, cases=cases, seed=seed, **extra)
    test = root / f"seed{seed}" / "test_cohort"
    if not (test / "dataset.json").exists():
        phantom.generate_cohort(test, cases=test_cases, seed=10_000 + seed, mix="test=1.0", **extra)
    pert = root / f"seed{seed}" / "perturbed"
    if not (pert / "dataset.json").exists():
        perturbed_copy(Dataset.load(main), pert, seed)
    return main, test, pert


def score(model, ds, ids, teacher: bool, device, boxes_from=None):
    """Liver / tumour Dice (global, per case) of teacher pseudo-labels or student segmentations."""
    from WeakLiverSegLib.evaluation.metrics import GlobalSums, case_metrics, summarize
    from WeakLiverSegLib.recipes import o2l

    acc, per = GlobalSums(), {}
    for cid in ids:
        case = (boxes_from or ds).cases[cid]
        image = ds.read_image(cid)
        boxes = [case.liver_box] + list(case.boxes) if teacher else None
        result = o2l.segment(model, {"enhanced": image}, boxes=boxes, device=device, use_teacher=teacher)
        per[cid] = case_metrics(result.labels.array, ds.read_truth(cid).array, image.spacing, accum=acc)
    s = summarize(per, acc)
    return {k: {"dice_global": round(float(s[k]["dice_global"]), 4),
                "dice_per_case": round(float(s[k]["dice_per_case"]), 4)} for k in ("liver", "tumor")}


def one_run(args):
    name, seed, cohorts, config, out, device, threads = args
    import torch

    torch.set_num_threads(threads)
    from WeakLiverSegLib.learn.modelstore import load_model
    from WeakLiverSegLib.app.progress import Progress
    from WeakLiverSegLib.learn.config import deep_update
    from WeakLiverSegLib.recipes import o2l
    from WeakLiverSegLib.data.store import Dataset

    main, test, pert = (Dataset.load(p) for p in cohorts)
    train_ds = pert if name == "perturbed_boxes" else main
    cfg = deep_update(deep_update({"seed": seed}, RUNS[name]), config)
    model_dir = Path(out) / f"seed{seed}" / name
    t0 = time.monotonic()
    if not (model_dir / "model.json").exists():
        o2l.train(train_ds, model_dir, cfg, device, Progress("none"))
    train_s = time.monotonic() - t0
    model = load_model(model_dir)
    weak = [c.id for c in main.cases.values() if c.mask is None and c.liver_box is not None and c.split == "train"]
    held = [c.id for c in main.cases.values() if c.split == "test"]
    result = {"run": name, "seed": seed, "config": cfg, "train_seconds": round(train_s, 1),
              "weak_cases": len(weak), "test_cases": len(held) + len(test.cases)}
    if "teacher" in model.networks:
        result["teacher_pseudo"] = score(model, main, weak, True, device, boxes_from=train_ds)
        if name == "o2l":
            result["teacher_pseudo_perturbed_boxes_at_inference"] = score(model, main, weak, True, device,
                                                                          boxes_from=pert)
    # held-out: the cohort's test split and the extra cohort, pooled
    from WeakLiverSegLib.evaluation.metrics import GlobalSums, case_metrics, summarize

    acc, per = GlobalSums(), {}
    for ds, ids in ((main, held), (test, list(test.cases))):
        for cid in ids:
            image = ds.read_image(cid)
            r = o2l.segment(model, {"enhanced": image}, device=device)
            per[f"{ds.root.name}/{cid}"] = case_metrics(r.labels.array, ds.read_truth(cid).array, image.spacing,
                                                        accum=acc)
    s = summarize(per, acc)
    result["student_test"] = {k: {"dice_global": round(float(s[k]["dice_global"]), 4),
                                  "dice_per_case": round(float(s[k]["dice_per_case"]), 4)} for k in ("liver", "tumor")}
    result["seconds"] = round(time.monotonic() - t0, 1)
    (model_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"[{name} seed {seed}] {json.dumps({k: v for k, v in result.items() if k != 'config'})}", flush=True)
    return result


def mean_sd(values):
    a = np.asarray(values, float)
    return f"{100 * a.mean():.1f}" + (f" ± {100 * a.std(ddof=1):.1f}" if len(a) > 1 else "")


def tables(results, meta: dict, level: str = "#") -> list:
    """Markdown of Tables I-II for the runs of one study."""
    by = {}
    for r in results:
        by.setdefault(r["run"], []).append(r)
    lines = [f"{level} {meta['cases']}-case cohorts, student {meta.get('overrides', {}).get('student', {}).get('steps', 600)} steps",
             "", f"Command: `{meta['command']}`", "",
             f"Device {meta['device']}; seeds {meta['seeds']}; cohort {meta['cases']} cases (30:60:10) + "
             f"{meta['test_cases']} extra held-out cases per seed; Dice in %, mean ± sd over seeds.", "",
             f"{level}# Table I: teacher pseudo-labels on the weak (box) cases", "",
             "| teacher | liver global | liver per case | tumour global | tumour per case |", "|---|---|---|---|---|"]
    for run, label in (("teacher_none", "no attention (image only)"), ("teacher_multichannel", "multi-channel box input"),
                       ("o2l", "O2L attention"), ("perturbed_boxes", "O2L, trained + applied with perturbed boxes")):
        rs = [r for r in by.get(run, []) if "teacher_pseudo" in r]
        if rs:
            lines.append(f"| {label} | " + " | ".join(mean_sd([r["teacher_pseudo"][o][m] for r in rs])
                                                     for o in ("liver", "tumor")
                                                     for m in ("dice_global", "dice_per_case")) + " |")
    rs = [r for r in by.get("o2l", []) if "teacher_pseudo_perturbed_boxes_at_inference" in r]
    if rs:
        lines.append("| O2L, trained with exact boxes, applied with perturbed boxes | " + " | ".join(
            mean_sd([r["teacher_pseudo_perturbed_boxes_at_inference"][o][m] for r in rs])
            for o in ("liver", "tumor") for m in ("dice_global", "dice_per_case")) + " |")
    lines += ["", f"{level}# Table II: student on held-out cases", "",
              "| student | liver global | liver per case | tumour global | tumour per case |", "|---|---|---|---|---|"]
    for run, label in (("strong_only", "strong only"), ("mixed", "mixed (strong + pseudo)"),
                       ("o2l", "mixed + localization branch (default)"),
                       ("perturbed_boxes", "mixed + loc., perturbed boxes"), ("full", "full supervision (upper bound)"),
                       ("teacher_none", "mixed + loc. from the no-attention teacher"),
                       ("teacher_multichannel", "mixed + loc. from the multi-channel teacher")):
        rs = by.get(run, [])
        if rs:
            lines.append(f"| {label} | " + " | ".join(mean_sd([r["student_test"][o][m] for r in rs])
                                                     for o in ("liver", "tumor")
                                                     for m in ("dice_global", "dice_per_case")) + " |")
    if by.get("o2l") and by.get("full"):
        ratio = [a["student_test"]["tumor"]["dice_global"] / b["student_test"]["tumor"]["dice_global"]
                 for a in by["o2l"] for b in by["full"] if a["seed"] == b["seed"]]
        lines += ["", f"Mixed + localization / full supervision, tumour Dice global, per seed: "
                      f"{', '.join(f'{100 * x:.1f}%' for x in ratio)} (mean {100 * np.mean(ratio):.1f}%)."]
    if by.get("o2l") and by.get("strong_only"):
        gain = [(a["student_test"]["tumor"]["dice_global"] - b["student_test"]["tumor"]["dice_global"],
                 a["student_test"]["tumor"]["dice_per_case"] - b["student_test"]["tumor"]["dice_per_case"])
                for a in by["o2l"] for b in by["strong_only"] if a["seed"] == b["seed"]]
        wins = sum(g > 0 for g, _ in gain)
        lines += ["", f"Mixed + localization minus strong only, tumour Dice (global / per case), mean over seeds: "
                      f"{100 * np.mean([g for g, _ in gain]):+.1f} / {100 * np.mean([p for _, p in gain]):+.1f} points; "
                      f"higher global Dice in {wins} of {len(gain)} seeds."]
    lines += ["", "Training seconds per run (mean): " + ", ".join(
        f"{run} {np.mean([r['train_seconds'] for r in rs]):.0f}" for run, rs in by.items()), ""]
    return lines


def write_tables(results, out: Path, meta: dict):
    lines = tables(results, meta)
    (out / "o2l_experiments.md").write_text("\n".join(lines) + "\n")
    (out / "o2l_experiments.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    print("\n".join(lines))


def render(paths, md: Path, title: str):
    """One markdown page from several studies' JSON files (``--render``)."""
    lines = [f"# {title}", ""]
    for path in paths:
        data = json.loads(Path(path).read_text())
        lines += [f"Source: `{Path(path).name}`", ""] + tables(data["runs"], data["meta"], level="##")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="work folder (cohorts, models, results)")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only write --md from these studies' JSON files")
    ap.add_argument("--md", type=Path, help="markdown file for --render")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--test-cases", type=int, default=20)
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom shape x y z (default: phantom's)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per job")
    ap.add_argument("--set", action="append", default=[], help="recipe config override key=value (JSON value)")
    a = ap.parse_args()
    if a.render:
        return render(a.render, a.md, "o2l: Tables I-II and box perturbation on synthetic cohorts")
    if not a.out:
        ap.error("--out is required")
    from WeakLiverSegLib.app.cli import parse_overrides

    config = parse_overrides(a.set)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        cohorts = dict(zip(a.seeds, pool.map(make_cohorts, [out] * len(a.seeds), a.seeds,
                                             [a.cases] * len(a.seeds), [a.test_cases] * len(a.seeds),
                                             [a.shape] * len(a.seeds))))
        for seed in a.seeds:
            for name in a.runs:
                jobs.append((name, seed, [str(p) for p in cohorts[seed]], config, str(out), a.device, a.threads))
        results = list(pool.map(one_run, jobs))
    meta = {"command": "python " + " ".join(sys.argv), "device": a.device, "seeds": a.seeds, "cases": a.cases,
            "test_cases": a.test_cases, "overrides": config, "host_cpus": os.cpu_count()}
    write_tables(results, out, meta)


if __name__ == "__main__":
    main()
