"""Studies of the ``wsts`` recipe (issue 5) on a paired synthetic cohort; writes JSON + markdown.

Not a pytest module (no ``test_`` prefix).  Run from the repository root:

    .venv/bin/python Testing/experiments/wsts_experiments.py --out /tmp/wsts_exp
    .venv/bin/python Testing/experiments/wsts_experiments.py --out /tmp/wsts_smoke --smoke   # minutes, meaningless numbers

What it measures, on the plain (non-enhanced) phase of held-out test cases (tumour: per-case
Dice, HD95 mm, recall, kappa at threshold 0.75, mean +- std; raw thresholded predictions, no
post-processing, as in the paper):

* control experiments (section 4.4.1) with half the training cases pixel-labelled, half box-labelled:
  baseline (a single DRL agent + plain self-ensembling, both on the plain phase, no teacher),
  TCH-ST (single-agent teacher/student + SE), TCH-ST + DDRL, TCH-ST + USSE, WSTS;
* label-mix table (Table C.6): WSTS with pixel + box labels at several ratios, WSTS's student
  with the pixel-labelled cases only, and a plain U-Net (MONAI BasicUNet) on the plain phase with
  the pixel-labelled cases;
* detection: IoU / recall of the union box with the true (dominant) tumour box on the test
  tumour slices: DDRL vs a single agent on the enhanced phase, SDDRL (and the single student)
  on the plain phase, the baseline's plain-phase agent.

With ``--seeds 0,1,2`` the runs named in ``--seed-runs`` (default: the three the issue's
must-show compares: WSTS half/half, WSTS all pixel, the student on the pixel half alone) are
repeated for every further training seed; the tables show the first seed, a "Seeds" table each
repeated run per seed and the mean over seeds, and the checks are made on those means.

The cohort is generated with every training case fully labelled; an experiment then treats the
first n of them as pixel-labelled and the next m as box-labelled (their masks dropped, their
per-slice boxes kept: the phantom's box labels are those very boxes).  Detectors depend only on
the boxes, so one DDRL / single-agent training serves every split with the same boxed cases.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from WeakLiverSegLib.synth import phantom  # noqa: E402
from WeakLiverSegLib.evaluation.metrics import binary_metrics  # noqa: E402
from WeakLiverSegLib.learn.slices import slice_groups  # noqa: E402
from WeakLiverSegLib.recipes.wsts.dense_unet import set_output_prior  # noqa: E402
from WeakLiverSegLib.recipes import wsts  # noqa: E402
from WeakLiverSegLib.recipes.wsts.usse import add_noise, seg_loss  # noqa: E402

FULL = {
    "cohort": {"cases": 22, "test": 6, "shape": (64, 64, 24), "spacing": (2.25, 2.25, 4.0), "noise": 10.0,
               "plain_contrast": -25.0, "enhanced_contrast": -45.0, "tumor_radius_mm": (7.0, 16.0), "seed": 5},
    "config": {
        "spacing_mm": 2.25, "context": 0,
        "network": {"stem": 8, "growth": 6, "layers": 2, "levels": 3},
        # the RL grid is the working grid (64 px): on a 32-px grid the phantom tumours are 1-5 px boxes and
        # cloned detectors reached IoU 0.36 instead of 0.52 (docs/results/wsts_detectors_diagnostics.md)
        "detector": {"size": 64, "steps": 1000, "envs": 8, "batch": 48, "memory": 20000, "width": 16, "features": 128},
        "usse": {"steps": 600, "batch": 8},
        "student": {"steps": 1200, "batch": 8},
    },
    "mix": [(4, 12), (8, 8), (12, 4), (16, 0)],
    "pixel_only": [8],
    "unet": [4, 8, 16],
}
SMOKE = {
    "cohort": {"cases": 6, "test": 2, "shape": (32, 32, 8), "spacing": (4.5, 4.5, 8.0), "noise": 10.0,
               "plain_contrast": -7.0, "enhanced_contrast": -45.0, "tumor_radius_mm": (8.0, 14.0), "seed": 5},
    "config": {
        "spacing_mm": 4.5, "context": 0,
        "network": {"stem": 4, "growth": 4, "layers": 1, "levels": 2},
        "detector": {"size": 16, "steps": 20, "envs": 4, "batch": 8, "memory": 500, "width": 4, "features": 16,
                     "episode_steps": 8},
        "usse": {"steps": 4, "batch": 2},
        "student": {"steps": 4, "batch": 2},
    },
    "mix": [(2, 2), (4, 0)],
    "pixel_only": [2],
    "unet": [2],
}


# ----------------------------------------------------------------------------- data


def make_cohort(root: Path, c: dict):
    mix = f"strong={(c['cases'] - c['test']) / c['cases']:.6f},test={c['test'] / c['cases']:.6f}"
    return phantom.generate_cohort(root, cases=c["cases"], seed=c["seed"], shape=c["shape"], spacing=c["spacing"],
                                   noise=c["noise"], tumors=(1, 1), tumor_radius_mm=c["tumor_radius_mm"],
                                   plain_contrast=c["plain_contrast"], enhanced_contrast=c["enhanced_contrast"],
                                   healthy_fraction=0.0, mix=mix)


def prepare(ds, cfg):
    phases = (cfg["teacher_phase"], cfg["student_phase"])
    train, test = [], []
    for case in ds.cases.values():
        vols = {p: ds.read_image(case.id, p) for p in phases}
        truth = ds.read_truth(case.id).array
        w = wsts.prepare_case(case.id, vols, cfg, "pixel" if case.split == "train" else "test", labels=truth)
        if case.split == "train":
            train.append(w)
        else:
            test.append((w, truth, vols[cfg["student_phase"]].spacing))
    return train, test


def with_kinds(cases, n_pixel: int, n_box: int) -> list:
    """Copies of the first n_pixel cases as pixel-labelled and the next n_box as box-labelled (no mask)."""
    out = []
    for n, c in enumerate(cases[:n_pixel + n_box]):
        if n < n_pixel:
            out.append(replace(c, det={}, pseudo=None))
        else:
            out.append(replace(c, kind="box", tumour=None, liver=None, det={}, pseudo=None))
    return out


# ----------------------------------------------------------------------------- evaluation


def summarize(per_case: list) -> dict:
    out = {}
    for key in ("dice", "hd95_mm", "recall", "kappa", "liver_dice"):
        vals = [m[key] for m in per_case if m.get(key) is not None]
        out[key] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None,
                    "n": len(vals)}
    return out


def score(tumour_probs_w, liver_probs_w, test_item, cfg) -> dict:
    """Working-grid probabilities of one test case -> tumour metrics on its input grid (raw threshold)."""
    w, truth, spacing = test_item
    maps = np.stack([liver_probs_w if liver_probs_w is not None else np.zeros_like(tumour_probs_w),
                     tumour_probs_w], axis=1)
    labels, tumour, _ = wsts.labels_from_probs(maps, truth.shape, cfg["threshold"], cfg["liver_threshold"],
                                               do_postprocess=False)
    m = binary_metrics(tumour > cfg["threshold"], truth == 2, spacing)
    out = {k: m[k] for k in ("dice", "hd95_mm", "recall", "kappa")}
    if liver_probs_w is not None:
        out["liver_dice"] = binary_metrics(labels >= 1, truth >= 1, spacing)["dice"]
    return out


def eval_student(stages, test, cfg) -> dict:
    env, pols = stages.env, stages.detector.policies("student")
    per = []
    for item in test:
        probs, _ = wsts.predict_case(stages.student, pols, item[0].images[cfg["student_phase"]], cfg, env,
                                     stages.dev, cfg["infer_batch"])
        per.append(score(probs[:, 1], probs[:, 0], item, cfg))
    return {"cases": per, "summary": summarize(per)}


def eval_self_ensembling(stages, test, cfg, phase) -> dict:
    """The baseline: the SE target model with the baseline agent's boxes, on the plain phase."""
    env, pols = stages.env, stages.detector.policies("teacher")
    per = []
    for item in test:
        w = item[0]
        boxes = wsts.detect_case(pols, w, phase, env, stages.dev)
        img = torch.from_numpy(wsts._inputs(w, phase, np.arange(w.shape[0]), cfg["context"]))
        probs = stages.usse.predict(img.to(stages.dev), boxes, cfg["infer_batch"])[:, 0].cpu().numpy()
        per.append(score(probs, None, item, cfg))
    return {"cases": per, "summary": summarize(per)}


def detection(det, cases, cfg, device="cpu") -> dict:
    """IoU / recall of the detector's teacher (its acting phase) and student (its imitating phase) on the cases."""
    env = wsts.box_env(cfg)
    out = {"teacher": wsts.detection_iou(det.policies("teacher"), cases, det.act_phase, env, device)}
    if det.student is not None:
        out["student"] = wsts.detection_iou(det.policies("student"), cases, det.imitate_phase, env, device)
    return out


# ----------------------------------------------------------------------------- runs


class Runner:
    def __init__(self, cfg, train, test, log, device="cpu"):
        self.cfg, self.train, self.test, self.log, self.dev = cfg, train, test, log, device
        self.detectors = {}
        self.seconds = {}
        self.truths = {c.id: c.tumour for c in train}

    def detector(self, key, cases, agents, act_phase, imitate_phase, relative_entropy=1.0):
        if key in self.detectors:
            return self.detectors[key]
        t0 = time.monotonic()
        cfg = copy.deepcopy(self.cfg)
        cfg["detector"]["agents"] = agents
        cfg["detector"]["relative_entropy"] = relative_entropy
        torch.manual_seed(cfg["seed"])
        rng = np.random.default_rng(cfg["seed"])
        env = wsts.box_env(cfg)
        images, targets, _ = wsts.rl_slices(cases, (act_phase,) + ((imitate_phase,) if imitate_phase else ()), env.size)
        det = wsts.make_detector(cfg, images, targets, rng, self.dev, act_phase, imitate_phase)
        steps = cfg["detector"]["steps"]
        rewards = []
        for step in range(steps):
            logs = wsts.detector_round(det, cfg, step, steps)     # as in training: same lr schedule
            rewards.append(logs["reward"])
            if (step + 1) % max(1, steps // 5) == 0:
                self.log(f"  detector {key} step {step + 1}/{steps} reward {np.mean(rewards[-50:]):.3f} "
                         + " ".join(f"{k}={v:.3g}" for k, v in sorted(logs.items()) if k != "reward"))
        self.seconds[f"detector {key}"] = round(time.monotonic() - t0, 1)
        self.detectors[key] = det
        return det

    def wsts_run(self, name, n_pixel, n_box, det_key, agents=2, uncertainty="multiscale"):
        t0 = time.monotonic()
        cfg = copy.deepcopy(self.cfg)
        cfg["detector"]["agents"] = agents
        cfg["usse"]["uncertainty"] = uncertainty
        cases = with_kinds(self.train, n_pixel, n_box)
        boxed = with_kinds(self.train, n_pixel + n_box, 0)     # the boxes the detector learns from
        det = self.detector(det_key, boxed, agents, cfg["teacher_phase"], cfg["student_phase"])
        torch.manual_seed(cfg["seed"])
        stages = wsts._Stages(cfg, cases, self.dev, None, np.random.default_rng(cfg["seed"] + 1), detector=det)
        stages.after_detector()
        if stages.usse is not None:
            stages.run("usse", cfg["usse"]["steps"])
            stages.after_usse()
        stages.run("student", cfg["student"]["steps"])
        result = eval_student(stages, self.test, cfg)
        result["pseudo_dice"] = pseudo_quality(cases, self.truths)
        self.seconds[name] = round(time.monotonic() - t0, 1)
        self.log(f"  {name}: tumour Dice {result['summary']['dice']['mean']:.3f} "
                 f"(pseudo-label Dice {result['pseudo_dice']}) [{self.seconds[name]} s]")
        return result

    def baseline_run(self, name, n_pixel, n_box):
        """DRL + SE directly on the plain phase: one agent exploring plain slices, plain SE (no uncertainty)."""
        t0 = time.monotonic()
        cfg = copy.deepcopy(self.cfg)
        plain = cfg["student_phase"]
        cfg["detector"]["agents"] = 1
        cfg["usse"]["uncertainty"] = "none"
        cfg["teacher_phase"], cfg["student_phase"] = plain, cfg["teacher_phase"]   # the "teacher" works on plain
        cases = with_kinds(self.train, n_pixel, n_box)
        boxed = with_kinds(self.train, n_pixel + n_box, 0)
        det = self.detector("plain-single", boxed, 1, plain, None)
        stages = wsts._Stages(cfg, cases, self.dev, None, np.random.default_rng(cfg["seed"] + 1), detector=det)
        stages.after_detector()
        stages.run("usse", cfg["usse"]["steps"])
        result = eval_self_ensembling(stages, self.test, cfg, plain)
        self.seconds[name] = round(time.monotonic() - t0, 1)
        self.log(f"  {name}: tumour Dice {result['summary']['dice']['mean']:.3f} [{self.seconds[name]} s]")
        return result

    def unet_run(self, name, n_pixel):
        """Plain U-Net (MONAI BasicUNet) on the plain phase, pixel labels only, same loss / steps / sampling / prior."""
        from monai.networks.nets import BasicUNet

        t0 = time.monotonic()
        cfg = copy.deepcopy(self.cfg)
        cases = with_kinds(self.train, n_pixel, 0)
        for c in cases:
            c.det["student"] = np.zeros((c.shape[0], 4), np.float32)
        torch.manual_seed(cfg["seed"])
        rng = np.random.default_rng(cfg["seed"] + 1)
        net = BasicUNet(2, 2 * cfg["context"] + 1, 2, features=(8, 16, 32, 64, 128, 8), dropout=0.1)
        set_output_prior(net.final_conv, 1, cfg["network"]["tumour_prior"])     # as the WSTS networks
        net = net.to(self.dev)
        opt = torch.optim.Adam(net.parameters(), lr=cfg["student"]["lr"])
        s = cfg["student"]
        for step in range(s["steps"]):
            wsts._set_lr(opt, wsts.stage_lr(s, step, s["steps"]))
            net.train()
            batch = wsts.sample_student_batch(cases, cfg, rng, cfg["student_phase"], self.dev)
            x = add_noise(batch["image"], s["noise_std"], s["noise_clip"])
            logits = net(x).float()
            loss = seg_loss(logits[:, 1:2], batch["tumour"], s["bce"]) + seg_loss(logits[:, 0:1], batch["liver"], s["bce"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        per = []
        with torch.no_grad():
            for item in self.test:
                img = item[0].images[cfg["student_phase"]]
                x = torch.from_numpy(slice_groups(img, np.arange(img.shape[0]), cfg["context"])).to(self.dev)
                p = torch.sigmoid(net(x).float()).cpu().numpy()
                per.append(score(p[:, 1], p[:, 0], item, cfg))
        result = {"cases": per, "summary": summarize(per)}
        self.seconds[name] = round(time.monotonic() - t0, 1)
        self.log(f"  {name}: tumour Dice {result['summary']['dice']['mean']:.3f} [{self.seconds[name]} s]")
        return result


def pseudo_quality(cases, truths: dict) -> float | None:
    """Dice of the USSE pseudo masks (> 0.5) of the box cases with their hidden true tumour masks (None: no box case)."""
    inter = total = 0.0
    for c in cases:
        if c.kind != "box" or c.pseudo is None:
            continue
        p, t = c.pseudo > 0.5, truths[c.id] > 0.5
        inter += float((p & t).sum())
        total += float(p.sum() + t.sum())
    return None if total == 0 else round(2 * inter / total, 4)


# ----------------------------------------------------------------------------- report


def fmt(s: dict, key: str, pct=True) -> str:
    v = s[key]
    if v["mean"] is None:
        return "n/a"
    k = 100 if pct else 1
    return f"{k * v['mean']:.1f} ± {k * v['std']:.1f}"


def markdown(res: dict) -> str:
    lines = ["# WSTS studies (issue 5)", "",
             f"Command: `{res['command']}`  ", f"Wall time: {res['seconds']['total']:.0f} s, device {res.get('device', 'cpu')}, "
             f"{res.get('jobs', 1)} runs in parallel (one CPU thread each).", "",
             "Cohort: " + json.dumps(res["cohort"]), "", "Config overrides: `" + json.dumps(res["config_overrides"]) + "`", "",
             "Tumour metrics on the **plain (non-enhanced) phase** of the test cases, threshold 0.75, per case mean ± std "
             "(Dice, recall, kappa in %, HD95 in mm; HD95 only where both masks are non-empty).", ""]

    def table(title, rows):
        lines.extend([f"## {title}", "", "| method | pixel | box | Dice | HD95 mm | recall | kappa |",
                      "|---|---|---|---|---|---|---|"])
        for name, npix, nbox, r in rows:
            s = r["summary"]
            lines.append(f"| {name} | {npix} | {nbox} | {fmt(s, 'dice')} | {fmt(s, 'hd95_mm', False)} | "
                         f"{fmt(s, 'recall')} | {fmt(s, 'kappa')} |")
        lines.append("")

    table("Control experiments (section 4.4.1)", [(r["name"], r["pixel"], r["box"], r) for r in res["control"]])
    table("Label mix (Table C.6)", [(r["name"], r["pixel"], r["box"], r) for r in res["mix"]])
    lines.extend(["## Detection (IoU / recall with the true tumour box, test tumour slices)", "",
                  "| detector | phase | IoU | recall |", "|---|---|---|---|"])
    for name, d in res["detection"].items():
        for role, v in d.items():
            if v["iou"] is not None:
                lines.append(f"| {name} {role} | {v['phase']} | {100 * v['iou']:.1f} | {100 * v['recall']:.1f} |")
    lines.append("")
    seeds = res.get("seeds", [])
    if len(seeds) > 1:
        lines.extend([f"## Seeds (training seeds {seeds}; tumour Dice %, per-case mean of each seed)", "",
                      "| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                      "|---|" + "---|" * (len(seeds) + 1)])
        for run in sorted({r["run"] for r in res["runs"] if r["seed"] != seeds[0]}):
            d = seed_dice(res["runs"], run)
            cells = [f"{100 * d[s]:.1f}" if s in d else "" for s in seeds]
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {100 * np.mean(list(d.values())):.1f} |")
        lines.append("")
        for seed, dets in res.get("seed_detection", {}).items():
            for name, d in dets.items():
                lines.append(f"- seed {seed} detector {name}: " + "; ".join(
                    f"{role} on {v['phase']} IoU {100 * v['iou']:.1f} / recall {100 * v['recall']:.1f}"
                    for role, v in d.items() if v["iou"] is not None))
        lines.append("")
    lines.extend(["## Checks", ""] + [f"- {c}" for c in res["checks"]] + [""])
    lines.extend(["## Seconds", "", "```", json.dumps(res["seconds"], indent=1), "```", ""])
    return "\n".join(lines)


def job_list(n: int, plan: dict) -> list:
    """Every run of the study as (table, row name, kind, arguments); each job trains its own detectors."""
    half = n // 2
    jobs = [("both", "WSTS", "wsts", ("wsts", half, n - half, "dual"), {}),
            ("mix", "WSTS", "wsts", (f"wsts {n}+0", n, 0, "dual"), {})]
    for npix in plan["pixel_only"]:
        npix = min(npix, n)
        key = "dual" if npix == n else f"dual-pixel{npix}"
        jobs.append(("mix", "WSTS student, pixel labels only", "wsts", (f"wsts {npix}+0 alone", npix, 0, key), {}))
    for npix in plan["unet"]:
        jobs.append(("mix", "U-Net (plain phase)", "unet", (f"unet {min(npix, n)}", min(npix, n)), {}))
    for name, key, agents, unc in (("TCH-ST", "single", 1, "none"), ("TCH-ST + DDRL", "dual", 2, "none"),
                                   ("TCH-ST + USSE", "single", 1, "multiscale")):
        jobs.append(("control", name, "wsts", (name.lower(), half, n - half, key), {"agents": agents, "uncertainty": unc}))
    jobs.append(("control", "Baseline (DRL + SE on plain)", "baseline", ("baseline", half, n - half), {}))
    for npix, nbox in plan["mix"]:
        npix = min(npix, n)
        nbox = min(nbox, n - npix)
        if (npix, nbox) not in ((half, n - half), (n, 0)):
            jobs.append(("mix", "WSTS", "wsts", (f"wsts {npix}+{nbox}", npix, nbox, "dual"), {}))
    return jobs


SEED_RUNS = ("wsts", "wsts {n}+0", "wsts {half}+0 alone")   # the must-show's three runs ({n}: training cases)
CONTROL_ORDER = ["Baseline (DRL + SE on plain)", "TCH-ST", "TCH-ST + DDRL", "TCH-ST + USSE", "WSTS"]


def seed_dice(runs: list, run: str) -> dict:
    """{seed: per-case mean tumour Dice} of one run name."""
    return {r["seed"]: r["summary"]["dice"]["mean"] for r in runs if r["run"] == run}


def must_show_checks(res: dict, n: int, seeds: list) -> list:
    """The issue's must-show comparisons, per seed and on the mean over the seeds that ran all three runs."""
    half = n // 2
    d_half, d_alone, d_full = (seed_dice(res["runs"], name) for name in ("wsts", f"wsts {half}+0 alone", f"wsts {n}+0"))
    checks = []
    both = [s for s in seeds if s in d_half and s in d_alone]
    for s in both:
        checks.append(f"seed {s}: WSTS {half} pixel + {n - half} box vs the same student on the {half} pixel cases alone: "
                      f"Dice {d_half[s]:.3f} vs {d_alone[s]:.3f} -> {'beats' if d_half[s] > d_alone[s] else 'does NOT beat'} it")
    full = [s for s in seeds if s in d_half and s in d_full and d_full[s] > 0]
    for s in full:
        checks.append(f"seed {s}: WSTS half/half reaches {100 * d_half[s] / d_full[s]:.1f}% of the all-pixel student's Dice "
                      f"({d_half[s]:.3f} / {d_full[s]:.3f}); target >= 90% -> {'met' if d_half[s] >= 0.9 * d_full[s] else 'NOT met'}")
    if len(both) > 1:
        mh, ma = np.mean([d_half[s] for s in both]), np.mean([d_alone[s] for s in both])
        checks.append(f"mean over seeds {both}: WSTS half/half {mh:.3f} vs pixel half alone {ma:.3f} -> "
                      f"{'beats' if mh > ma else 'does NOT beat'} it")
    if len(full) > 1:
        mh, mf = np.mean([d_half[s] for s in full]), np.mean([d_full[s] for s in full])
        checks.append(f"mean over seeds {full}: WSTS half/half reaches {100 * mh / mf:.1f}% of the all-pixel student "
                      f"({mh:.3f} / {mf:.3f}); target >= 90% -> {'met' if mh >= 0.9 * mf else 'NOT met'}")
    det = res["detection"]
    if "dual" in det and "single" in det:
        checks.append(f"DDRL vs single agent, enhanced test slices: IoU {det['dual']['teacher']['iou']:.3f} vs "
                      f"{det['single']['teacher']['iou']:.3f}; SDDRL on plain: {det['dual']['student']['iou']:.3f}")
    return checks


def run_job(ds_root: str, config: dict, job: tuple, device: str, t_start: float, seed: int) -> dict:
    """One study run in its own process: load the cohort, train, evaluate; detection of the detectors it trained."""
    torch.set_num_threads(1)
    from WeakLiverSegLib.data.store import Dataset

    table, name, kind, args, kwargs = job
    cfg = wsts.resolve_config({**config, "seed": int(seed)})
    train, test = prepare(Dataset.load(Path(ds_root)), cfg)

    def log(msg):
        print(f"[{time.monotonic() - t_start:7.0f}s] seed {seed} {msg}", flush=True)

    runner = Runner(cfg, train, test, log, device)
    fn = {"wsts": runner.wsts_run, "unet": runner.unet_run, "baseline": runner.baseline_run}[kind]
    result = fn(*args, **kwargs)
    det = {}
    for key, d in runner.detectors.items():
        r = detection(d, [t[0] for t in test], cfg, device)
        for role in r:
            r[role]["phase"] = d.act_phase if role == "teacher" else d.imitate_phase
        det[key] = r
    npix = args[1]
    nbox = args[2] if kind != "unet" else 0
    return {"table": table, "row": {"name": name, "pixel": npix, "box": nbox, "run": args[0], "seed": int(seed),
                                     **result},
            "seconds": {f"{k} (seed {seed})": v for k, v in runner.seconds.items()}, "detection": det}


def merge_results(paths: list) -> dict:
    """Several runs of this study on one cohort and config (e.g. the seed runs, then the remaining rows) -> one result."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]

    def same_config(cfg):      # the training seed may differ; detector.warm_start was once given in rounds (700 of 1000: 0.7)
        d = dict(cfg["detector"])
        if d.get("warm_start", 0) > 1:
            d["warm_start"] = d["warm_start"] / d["steps"]
        return {**{k: v for k, v in cfg.items() if k != "seed"}, "detector": d}

    for p, part in zip(paths, parts):
        if part["cohort"] != first["cohort"] or same_config(part["config"]) != same_config(first["config"]):
            raise SystemExit(f"{p}: another cohort or config than {paths[0]}; not merged")
    res = {**first, "command": " ; ".join(part["command"] for part in parts), "control": [], "mix": [], "runs": [],
           "detection": {}, "seed_detection": {}, "seconds": {}, "merged_from": [str(p) for p in paths]}
    res["seeds"] = first["seeds"] + sorted({s for part in parts for s in part["seeds"]} - set(first["seeds"]))
    for part in parts:      # the tables show the first seed; a part run with another seed feeds the seed tables only
        res["control"] += [r for r in part["control"] if r["seed"] == res["seeds"][0]]
        res["mix"] += [r for r in part["mix"] if r["seed"] == res["seeds"][0]]
        res["runs"] += part["runs"]
        own = part["seeds"][0]
        for k, v in part["detection"].items():
            if own == res["seeds"][0]:
                res["detection"].setdefault(k, v)
            else:
                res["seed_detection"].setdefault(str(own), {}).setdefault(k, v)
        for seed, dets in part.get("seed_detection", {}).items():
            for k, v in dets.items():
                res["seed_detection"].setdefault(seed, {}).setdefault(k, v)
        res["seconds"].update({k: v for k, v in part["seconds"].items() if k != "total"})
        res["complete"] = res.get("complete", True) and part["complete"]
    res["seconds"]["total"] = round(sum(part["seconds"]["total"] for part in parts), 1)
    res["control"].sort(key=lambda r: CONTROL_ORDER.index(r["name"]) if r["name"] in CONTROL_ORDER else 99)
    res["mix"].sort(key=lambda r: (r["name"] != "WSTS", r["name"], r["pixel"], r["box"]))
    res["runs"].sort(key=lambda r: (r["run"], r["seed"]))
    n = first["cohort"]["cases"] - first["cohort"]["test"]
    res["checks"] = must_show_checks(res, n, res["seeds"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge earlier results of this study (same cohort and config) into --results/--stem")
    ap.add_argument("--out", default=None, help="work folder (cohort); results go to docs/results/ too")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, numbers mean nothing")
    ap.add_argument("--results", default=str(REPO / "docs" / "results"), help="where to write wsts_experiments.{json,md}")
    ap.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (each one thread)")
    ap.add_argument("--plain-contrast", type=float, default=None,
                    help="plain-phase tumour minus liver HU of the cohort (default: the plan's)")
    ap.add_argument("--only", default=None,
                    help="comma-separated run names to do, e.g. 'wsts,wsts 16+0,wsts 8+0 alone,unet 16' (default: all)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated training seeds of the networks and agents, e.g. '0,1,2': every run with the "
                         "first, --seed-runs with all (default: the plan's seed)")
    ap.add_argument("--seed-runs", default=",".join(SEED_RUNS),
                    help=f"runs repeated for the further --seeds (default: {','.join(SEED_RUNS)!r})")
    ap.add_argument("--stem", default=None, help="file name of the results (default: wsts_experiments)")
    ap.add_argument("--set", default=None, help="JSON merged into the plan's config, e.g. '{\"student\": {\"pseudo\": \"soft\"}}'")
    args = ap.parse_args(argv)
    if args.merge:
        res = merge_results(args.merge)
        stem = args.stem or "wsts_experiments"
        (Path(args.results) / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        (Path(args.results) / f"{stem}.md").write_text(markdown(res))
        return 0
    if not args.out:
        ap.error("--out is required (except with --merge)")
    torch.set_num_threads(1)
    t_start = time.monotonic()
    plan = copy.deepcopy(SMOKE if args.smoke else FULL)
    if args.set:
        from WeakLiverSegLib.learn.config import deep_update
        plan["config"] = deep_update(plan["config"], json.loads(args.set))   # checked by wsts.resolve_config below
    if args.seeds:
        plan["config"]["seed"] = int(args.seeds.split(",")[0])
    if args.plain_contrast is not None:
        plan["cohort"]["plain_contrast"] = float(args.plain_contrast)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.monotonic() - t_start:7.0f}s] {msg}", flush=True)

    ds_root = out / "cohort"
    if (ds_root / "dataset.json").exists():
        from WeakLiverSegLib.data.store import Dataset
        ds = Dataset.load(ds_root)
        if json.loads((ds_root / "study_cohort.json").read_text()) != json.loads(json.dumps(plan["cohort"])):
            raise SystemExit(f"{ds_root}: holds a cohort with other settings; use another --out")
    else:
        ds = make_cohort(ds_root, plan["cohort"])
        (ds_root / "study_cohort.json").write_text(json.dumps(plan["cohort"]))
    cfg = wsts.resolve_config(plan["config"])
    train, test = prepare(ds, cfg)
    n = len(train)
    half = n // 2
    log(f"cohort: {len(train)} train, {len(test)} test cases; plain contrast {plan['cohort']['plain_contrast']} HU")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("wsts_experiments_smoke" if args.smoke else "wsts_experiments")
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [int(cfg["seed"])]   # cfg: the first seed
    seconds = {}
    res = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
           "device": args.device, "jobs": args.jobs, "seeds": seeds,
           "cohort": {k: list(v) if isinstance(v, tuple) else v for k, v in plan["cohort"].items()},
           "config_overrides": plan["config"], "config": cfg, "control": [], "mix": [], "detection": {},
           "runs": [], "seed_detection": {}, "checks": [], "seconds": seconds, "smoke": bool(args.smoke),
           "complete": False}

    def save():
        seconds["total"] = round(time.monotonic() - t_start, 1)
        res["control"].sort(key=lambda r: CONTROL_ORDER.index(r["name"]) if r["name"] in CONTROL_ORDER else 99)
        res["mix"].sort(key=lambda r: (r["name"] != "WSTS", r["name"], r["pixel"], r["box"]))
        res["runs"].sort(key=lambda r: (r["run"], r["seed"]))
        (results / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        (results / f"{stem}.md").write_text(markdown(res))

    def collect(done):
        row = done["row"]
        res["runs"].append({k: row[k] for k in ("run", "name", "pixel", "box", "seed", "summary")})
        if row["seed"] == seeds[0]:
            if done["table"] in ("both", "control"):
                res["control"].append(row)
            if done["table"] in ("both", "mix"):
                res["mix"].append(row)
            for key, d in done["detection"].items():
                res["detection"].setdefault(key, d)
        else:
            for key, d in done["detection"].items():
                res["seed_detection"].setdefault(str(row["seed"]), {}).setdefault(key, d)
        seconds.update(done["seconds"])
        log(f"done: seed {row['seed']} {row['name']} {row['pixel']}+{row['box']}: Dice {row['summary']['dice']['mean']}")
        save()

    jobs = job_list(n, plan)
    names = [job[3][0] for job in jobs]
    wanted = [name.strip() for name in args.only.split(",")] if args.only else names
    repeated = [name.strip().format(n=n, half=half) for name in args.seed_runs.split(",")]
    unknown = sorted((set(wanted) | (set(repeated) if len(seeds) > 1 else set())) - set(names))
    if unknown:
        raise SystemExit(f"--only/--seed-runs: no run named {unknown}; runs: {names}")
    todo = [(job, seeds[0]) for job in jobs if job[3][0] in wanted]
    todo += [(job, seed) for seed in seeds[1:] for job in jobs if job[3][0] in wanted and job[3][0] in repeated]
    # runs with box-labelled cases (a USSE / SE stage) take about twice as long: start them first, so the
    # parallel pool does not end on one long run
    todo.sort(key=lambda js: js[0][2] == "unet" or js[0][3][2] == 0)
    log(f"{len(todo)} runs (seeds {seeds}), {args.jobs} at a time, device {args.device}")
    if args.jobs <= 1:
        for job, seed in todo:
            collect(run_job(str(ds_root), plan["config"], job, args.device, t_start, seed))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_job, str(ds_root), plan["config"], job, args.device, t_start, seed)
                       for job, seed in todo]
            for f in as_completed(futures):
                collect(f.result())

    res["checks"], res["complete"] = must_show_checks(res, n, seeds), True
    save()
    for c in res["checks"]:
        log(c)
    log(f"wrote {results / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
