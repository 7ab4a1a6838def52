"""Box detectors of the ``wsts`` recipe (issue 19): IoU / recall with the true tumour box, learning curves.

Not a pytest module.  Run from the repository root:

    .venv/bin/python Testing/experiments/wsts_detectors.py --out /tmp/wsts_det --jobs 2
    .venv/bin/python Testing/experiments/wsts_detectors.py --out /tmp/wsts_det --variants paper-dual,warm-dual --seeds 0,1,2

The cohort and the detector settings are ``wsts_experiments``'s (the same phantoms, 16 training
cases whose every tumour slice carries its box).  Each variant trains a detector -- DDRL (two
agents) or one agent on the enhanced phase, with the SDDRL / single student on the plain phase
learning from the same transitions -- and every ``--eval-every`` rounds measures, deterministic
policies from the fixed start boxes, the mean IoU and recall of the union box with the slice's
(dominant) tumour box on the test cases' tumour slices: the teacher on the enhanced phase, the
student on the plain phase.  Variants (``VARIANTS``) are config overrides of the detector; ``paper``
keeps the recipe's SAC setting, ``warm`` adds the behaviour-cloning warm start from the greedy expert
(``detector.warm_start``), ``expert`` also keeps the expert's action in the SAC policy loss afterwards
(``detector.expert``).  Writes ``wsts_detectors.{json,md}`` to ``--results``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import wsts_experiments as study  # noqa: E402
from WeakLiverSegLib.recipes import wsts  # noqa: E402

PAPER = {"warm_start": 0.0, "expert": 0.0}          # SAC from the start, the paper's objective
VARIANTS = {
    "paper-dual": {**PAPER, "agents": 2},
    "paper-single": {**PAPER, "agents": 1},
    "warm-dual": {"agents": 2, "warm_start": 0.3, "expert": 0.0},     # short warm start, then the paper's SAC
    "warm-single": {"agents": 1, "warm_start": 0.3, "expert": 0.0},
    "expert-dual": {"agents": 2, "warm_start": 0.3, "expert": 1.0},   # ... then SAC + the expert's action
    "expert-single": {"agents": 1, "warm_start": 0.3, "expert": 1.0},
    "late-dual": {"agents": 2, "warm_start": 0.7, "expert": 1.0},     # the recipe's default
    "late-single": {"agents": 1, "warm_start": 0.7, "expert": 1.0},
    "bconly-dual": {"agents": 2, "warm_start": 1.0},                  # cloning alone, no SAC
    "bconly-single": {"agents": 1, "warm_start": 1.0},
}


def run_variant(ds_root: str, config: dict, name: str, overrides: dict, seed: int, eval_every: int, device: str,
                t_start: float) -> dict:
    torch.set_num_threads(1)
    from WeakLiverSegLib.data.store import Dataset

    cfg = wsts.resolve_config({**config, "seed": int(seed), "detector": {**config.get("detector", {}), **overrides}})
    train, test = study.prepare(Dataset.load(Path(ds_root)), cfg)
    cases = study.with_kinds(train, len(train), 0)
    test_cases = [t[0] for t in test]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = wsts.box_env(cfg)
    phases = (cfg["teacher_phase"], cfg["student_phase"])
    images, targets, _ = wsts.rl_slices(cases, phases, env.size)
    det = wsts.make_detector(cfg, images, targets, rng, device, *phases)
    steps = cfg["detector"]["steps"]
    curve, t0 = [], time.monotonic()
    for step in range(steps):
        wsts.detector_round(det, cfg, step, steps)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            m = study.detection(det, test_cases, cfg, device)
            curve.append({"round": step + 1, **{f"{r}_{k}": m[r][k] for r in m for k in ("iou", "recall")}})
            print(f"[{time.monotonic() - t_start:6.0f}s] {name} seed {seed} round {step + 1}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in curve[-1].items() if k != "round"), flush=True)
    seconds = round(time.monotonic() - t0, 1)
    final = study.detection(det, test_cases, cfg, device)
    train_m = study.detection(det, cases, cfg, device)
    return {"variant": name, "seed": int(seed), "overrides": overrides, "test": final, "train": train_m,
            "curve": curve, "seconds": seconds}


def markdown(res: dict) -> str:
    lines = ["# wsts detectors (issue 19)", "", f"Command: `{res['command']}`  ",
             f"Wall time: {res['seconds']:.0f} s, {res['jobs']} runs at a time (one CPU thread each).", "",
             "Mean IoU / recall (%) of the union box with the true tumour box on the test cases' tumour slices "
             "(teacher: enhanced phase, student: plain phase), deterministic policies from the fixed starts.", "",
             "| variant | overrides | seed | teacher IoU | teacher recall | student IoU | student recall | train IoU (teacher) | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"   # noqa: E731
    for r in res["runs"]:
        t, s = r["test"]["teacher"], r["test"].get("student", {})
        lines.append(f"| {r['variant']} | `{json.dumps(r['overrides'])}` | {r['seed']} | {pct(t['iou'])} | {pct(t['recall'])} "
                     f"| {pct(s.get('iou'))} | {pct(s.get('recall'))} | {pct(r['train']['teacher']['iou'])} | {r['seconds']:.0f} |")
    by = {}
    for r in res["runs"]:
        by.setdefault(r["variant"], []).append(r)
    lines += ["", "## Mean over seeds", "", "| variant | seeds | teacher IoU | teacher recall | student IoU | student recall |",
              "|---|---|---|---|---|---|"]
    for name, rs in by.items():
        def mean(role, key):
            vals = [r["test"][role][key] for r in rs if role in r["test"] and r["test"][role][key] is not None]
            return float(np.mean(vals)) if vals else None
        lines.append(f"| {name} | {len(rs)} | {pct(mean('teacher', 'iou'))} | {pct(mean('teacher', 'recall'))} "
                     f"| {pct(mean('student', 'iou'))} | {pct(mean('student', 'recall'))} |")
    lines += ["", "## Learning curves (test IoU %, teacher / student, every evaluation)", ""]
    for r in res["runs"]:
        pts = ", ".join(f"{c['round']}: {pct(c['teacher_iou'])}/{pct(c.get('student_iou'))}" for c in r["curve"])
        lines.append(f"- {r['variant']} seed {r['seed']}: {pts}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work folder (the cohort)")
    ap.add_argument("--results", default=str(REPO / "docs" / "results"))
    ap.add_argument("--variants", default="paper-dual,paper-single,warm-dual,warm-single,expert-dual,expert-single")
    ap.add_argument("--set", default=None, help="JSON merged into every variant's detector settings")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--plain-contrast", type=float, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stem", default="wsts_detectors")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.monotonic()
    plan = copy.deepcopy(study.FULL)
    if args.plain_contrast is not None:
        plan["cohort"]["plain_contrast"] = float(args.plain_contrast)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds_root = out / "cohort"
    if not (ds_root / "dataset.json").exists():
        study.make_cohort(ds_root, plan["cohort"])
        (ds_root / "study_cohort.json").write_text(json.dumps(plan["cohort"]))
    elif json.loads((ds_root / "study_cohort.json").read_text()) != json.loads(json.dumps(plan["cohort"])):
        raise SystemExit(f"{ds_root}: holds a cohort with other settings; use another --out")
    extra = json.loads(args.set) if args.set else {}
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(n, {**VARIANTS[n], **extra}, s) for s in seeds for n in names]
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
           "jobs": args.jobs, "cohort": {k: list(v) if isinstance(v, tuple) else v for k, v in plan["cohort"].items()},
           "config_overrides": plan["config"], "runs": [], "seconds": 0.0}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)

    def collect(r):
        res["runs"].append(r)
        res["runs"].sort(key=lambda x: (names.index(x["variant"]), x["seed"]))
        res["seconds"] = time.monotonic() - t_start
        (results / f"{args.stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (results / f"{args.stem}.md").write_text(markdown(res))

    call = lambda n, o, s: (str(ds_root), plan["config"], n, o, s, args.eval_every, args.device, t_start)   # noqa: E731
    if args.jobs <= 1:
        for n, o, s in todo:
            collect(run_variant(*call(n, o, s)))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_variant, *call(n, o, s)) for n, o, s in todo]):
                collect(fut.result())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
