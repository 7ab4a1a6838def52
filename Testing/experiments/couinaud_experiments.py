"""Studies of issue 6 (recipe ``couinaud``): writes JSON + a markdown table under docs/results/.

Not a test (no ``test_`` prefix): run it by hand, it trains several networks.

1. ``constructor``: per-segment Dice of ``couinaud_map.construct_couinaud`` against the known
   Couinaud maps of a fresh synthetic cohort (given the true liver), at the default phantom
   size and at a coarser one; optional qualitative map of the real CT ircadb/p01 (PNG).
2. ``ablation``: a synthetic cohort whose training cases carry only Couinaud segments or a
   volume label for the tumour (the few masked cases give only their liver, ``use_masks=False``):
   Table 1 of the paper (no refinement / ILR / PLR / both), each a final segmenter scored on the
   held-out test cases (tumour Dice per case and global), the slice-label confusion before and
   after ILR (Fig. 5a), the pseudo-label Dice before and after PLR (Fig. 5b), and the same
   segmenter trained on the true pixel labels (upper bound).  The truth is read here, for
   scoring only (and for the upper bound's labels).

    .venv/bin/python Testing/experiments/couinaud_experiments.py --work /tmp/couinaud_exp --out docs/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from WeakLiverSegLib.synth import phantom  # noqa: E402
from WeakLiverSegLib.learn.config import deep_update  # noqa: E402
from WeakLiverSegLib.anatomy.couinaud_map import SEGMENTS, construct_couinaud, segment_dice  # noqa: E402
from WeakLiverSegLib.learn.modelstore import LoadedModel  # noqa: E402
from WeakLiverSegLib.learn.networks.unet2d import BoxAttentionUNet2D  # noqa: E402
from WeakLiverSegLib.recipes import couinaud  # noqa: E402
from WeakLiverSegLib.learn.training import make_optimizer  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = int(a.sum()) + int(b.sum())
    return None if n == 0 else 2.0 * int((a & b).sum()) / n


def mean(values):
    values = [v for v in values if v is not None]
    return None if not values else float(np.mean(values))


# ----------------------------------------------------------------------------- 1. constructor


def constructor_study(work: Path, seed: int, cases: int) -> dict:
    out = {}
    for name, shape, spacing in (("default 96x96x48 @ 1.5x1.5x3 mm", (96, 96, 48), (1.5, 1.5, 3.0)),
                                 ("coarse 64x64x32 @ 2.2x2.2x4.5 mm", (64, 64, 32), (2.2, 2.2, 4.5))):
        folder = work / f"constructor_{shape[0]}"
        ds = _cohort(folder, cases=cases, seed=seed, shape=shape, spacing=spacing, mix="test=1.0", healthy_fraction=0.3)
        per_seg = {s: [] for s in SEGMENTS}
        found = {"ivc": 0, "portal": 0, "veins": 0}
        per_case = {}
        t0 = time.monotonic()
        for case in ds.cases.values():
            image, truth = ds.read_image(case.id), ds.read_truth(case.id, "mask")
            cm_true = ds.read_truth(case.id, "couinaud_map").array
            cm, lm = construct_couinaud(image, truth.array >= 1, return_landmarks=True)
            d = segment_dice(cm.array, cm_true)
            per_case[case.id] = {str(k): v for k, v in d.items()}
            for s, v in d.items():
                per_seg[s].append(v)
            for k in found:
                found[k] += int(lm.found[k])
        out[name] = {
            "cases": len(ds.cases), "seed": seed, "seconds_per_case": round((time.monotonic() - t0) / len(ds.cases), 3),
            "dice_mean": {str(s): mean(v) for s, v in per_seg.items()},
            "dice_min": {str(s): float(np.min([x for x in v if x is not None])) for s, v in per_seg.items()},
            "dice_all_segments_mean": mean([mean(v) for v in per_seg.values()]),
            "landmarks_found": found, "per_case": per_case,
        }
        log(f"constructor {name}: mean Dice {out[name]['dice_all_segments_mean']:.3f}")
    return out


def real_ct_figure(out_png: Path) -> dict | None:
    """Qualitative Couinaud map of ircadb/p01 (development data) with its expert liver mask."""
    from PIL import Image

    from WeakLiverSegLib.data.imageio import read_image

    folder = REPO.parent / "shared" / "data" / "ircadb" / "p01"
    if not folder.is_dir():
        log("real CT figure skipped: ../shared/data/ircadb/p01 absent")
        return None
    img, lab = read_image(folder / "ct.nii.gz"), read_image(folder / "label.nii.gz")
    t0 = time.monotonic()
    cm, lm = construct_couinaud(img, lab.array >= 1, return_landmarks=True)
    seconds = time.monotonic() - t0
    pal = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48],
                    [70, 240, 240], [240, 50, 230], [145, 30, 180]], np.uint8)
    zs = np.flatnonzero(cm.array.any(axis=(1, 2)))
    tiles = []
    for z in np.linspace(zs.min(), zs.max(), 8).astype(int)[1:-1][::-1]:
        g = (np.clip((img.array[z].astype(np.float32) + 200) / 450, 0, 1) * 255).astype(np.uint8)
        g3 = np.stack([g] * 3, -1)
        ov = np.where(cm.array[z][..., None] > 0, (0.55 * g3 + 0.45 * pal[cm.array[z]]).astype(np.uint8), g3)
        tiles.append(ov[::-1][::2, ::2] if img.direction[1, 1] < 0 else ov[::2, ::2])
    grid = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_png)
    counts = np.bincount(cm.array.ravel(), minlength=9)[1:]
    return {"png": str(out_png.relative_to(REPO)) if out_png.is_relative_to(REPO) else str(out_png),
            "seconds": round(seconds, 1), "landmarks": lm.to_json(),
            "segment_volume_ml": {str(s + 1): round(float(c) * img.voxel_volume_mm3 / 1000, 1) for s, c in enumerate(counts)}}


# ----------------------------------------------------------------------------- 2. ablation


def _cohort(folder: Path, **kwargs):
    from WeakLiverSegLib.data.store import Dataset

    if (folder / "dataset.json").exists():
        return Dataset.load(folder)
    return phantom.generate_cohort(folder, **kwargs)


def _seeded(seed):
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def evaluate_segmenter(net, ds, test_cases, cfg) -> dict:
    meta = {"input": {"hu_window": cfg["hu_window"], "spacing_mm": [cfg["spacing_mm"]] * 2,
                      "context_slices": cfg["context"], "phases": ["enhanced"]}}
    model = LoadedModel(Path("."), meta, {"segmenter": net.eval()})
    per_case, inter, total, liver = {}, 0, 0, []
    fp_healthy = {}
    for case in test_cases:
        image = ds.read_image(case.id)
        truth = ds.read_truth(case.id, "mask").array
        pred = couinaud.segment(model, {"enhanced": image}).labels.array
        p, t = pred == 2, truth == 2
        inter += int((p & t).sum())
        total += int(p.sum()) + int(t.sum())
        liver.append(dice(pred >= 1, truth >= 1))
        if t.any():
            per_case[case.id] = dice(p, t)
        else:
            fp_healthy[case.id] = int(p.sum())
    return {"tumour_dice_per_case": mean(per_case.values()), "tumour_dice_global": 2 * inter / total if total else None,
            "liver_dice_per_case": mean(liver), "per_case": per_case, "false_positive_voxels_healthy": fp_healthy}


def slice_confusion(weak, labels, truth_tumour) -> dict:
    """Image-level labels vs truth over the liver slices of the weak (non-mask) cases."""
    c = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for case in weak:
        if case.tumour is not None:
            continue
        on = case.liver.any(axis=(1, 2))
        lab = labels[case.case_id][on] > 0
        tru = truth_tumour[case.case_id].any(axis=(1, 2))[on]
        c["tp"] += int((lab & tru).sum())
        c["fp"] += int((lab & ~tru).sum())
        c["fn"] += int((~lab & tru).sum())
        c["tn"] += int((~lab & ~tru).sum())
    return c


def pseudo_quality(tumours, truth_tumour, weak) -> dict:
    per_case, inter, total = {}, 0, 0
    for case in weak:
        if case.tumour is not None or not case.pathological:
            continue
        p, t = tumours[case.case_id], truth_tumour[case.case_id]
        per_case[case.case_id] = dice(p, t)
        inter += int((p & t).sum())
        total += int(p.sum()) + int(t.sum())
    return {"dice_per_case": mean(per_case.values()), "dice_global": 2 * inter / total if total else None,
            "per_case": per_case}


def ablation_study(work: Path, seed: int, cases: int, train_seeds: list, overrides: dict,
                   upper_bound: bool = True) -> dict:
    from WeakLiverSegLib.recipes.couinaud import labels_on_working

    ds = _cohort(work / "cohort", cases=cases, seed=seed, healthy_fraction=0.3,
                 mix="strong=0.1,couinaud=0.45,volume=0.25,test=0.2")
    config = {"use_masks": False, "liver_net": {"crop": 64}, "segmenter": {"crop": 64}}
    config = deep_update(config, overrides)
    cfg = couinaud.resolve_config(config)
    kwargs = couinaud.network_kwargs(cfg)
    result = {"cohort": {"cases": cases, "seed": seed, "mix": "strong=0.1,couinaud=0.45,volume=0.25,test=0.2",
                         "healthy_fraction": 0.3, "shape": [96, 96, 48], "spacing": [1.5, 1.5, 3.0]},
              "config": cfg, "train_seeds": train_seeds, "seconds": {}}
    cases_train = couinaud.select_cases(ds, cfg)
    test_cases = [c for c in ds.cases.values() if c.split == "test"]
    loaded = {c.id: couinaud.load_case(ds, c, cfg) for c in cases_train}
    masked = [(c.id, loaded[c.id]) for c in cases_train if loaded[c.id]["mask"] is not None]

    # liver: store masks (strong cases), a liver net trained on them for the others
    t0 = time.monotonic()
    rng = _seeded(train_seeds[0])
    liver_net = BoxAttentionUNet2D(**kwargs["liver_net"])
    couinaud.train_liver_net(liver_net, make_optimizer(liver_net.parameters(), cfg["liver_net"]), masked, cfg, rng, "cpu")
    result["seconds"]["liver_net"] = round(time.monotonic() - t0, 1)
    weak, truth_tumour, truth_liver, liver_dice, cm_dice = [], {}, {}, {}, {s: [] for s in SEGMENTS}
    for case in cases_train:
        d = loaded[case.id]
        if d["mask"] is not None:
            liver, source = d["mask"] >= 1, "mask"
        else:
            liver = couinaud.liver_from_softmax(couinaud.predict_softmax(liver_net, d["image"], cfg["context"]))
            source = "liver_net"
        wc = couinaud.make_weak_case(case, d, liver, source, cfg)
        weak.append(wc)
        truth = labels_on_working(ds.read_truth(case.id, "mask").array, d["image"].shape[1:])
        truth_tumour[case.id], truth_liver[case.id] = truth == 2, truth >= 1
        liver_dice[case.id] = dice(liver, truth >= 1)
        cm_true = ds.read_truth(case.id, "couinaud_map").array      # same grid: spacing = working spacing
        if cm_true.shape == wc.couinaud.shape:
            both = (cm_true > 0) & liver     # segment labels where both livers agree: the constructor's part
            for s, v in segment_dice(np.where(both, wc.couinaud, 0), np.where(both, cm_true, 0)).items():
                cm_dice[s].append(v)
    result["liver"] = {"sources": {w.case_id: w.liver_source for w in weak},
                       "liver_net_dice_mean": mean(v for k, v in liver_dice.items() if loaded[k]["mask"] is None)}
    result["constructor_on_training_livers"] = {str(s): mean(v) for s, v in cm_dice.items()}
    result["training_cases"] = {k: [w.case_id for w in weak if w.kind == k] for k in ("couinaud", "volume")}
    result["pathological_training_cases"] = sum(w.pathological for w in weak)
    log(f"liver net: Dice {result['liver']['liver_net_dice_mean']:.3f}; constructor on these livers: "
        f"{mean(result['constructor_on_training_livers'].values()):.3f}")

    r = cfg["refine"]
    labels_none = {w.case_id: w.image_labels() for w in weak}
    labels_ilr = {w.case_id: w.refined_labels(True, r["ilr_min_pixels"]) for w in weak}
    result["ilr_slice_labels"] = {"before": slice_confusion(weak, labels_none, truth_tumour),
                                  "after": slice_confusion(weak, labels_ilr, truth_tumour)}
    log(f"ILR confusion before {result['ilr_slice_labels']['before']} after {result['ilr_slice_labels']['after']}")

    result["runs"] = {}
    for n, seed_t in enumerate(train_seeds):
        result["runs"][str(seed_t)] = run_variants(ds, test_cases, weak, labels_none, labels_ilr, truth_tumour,
                                                   truth_liver, cfg, kwargs, seed_t, upper_bound=upper_bound and n == 0)
    result["summary"] = summarize_runs(result["runs"])
    return result


def run_variants(ds, test_cases, weak, labels_none, labels_ilr, truth_tumour, truth_liver, cfg, kwargs, seed,
                 upper_bound) -> dict:
    """The four refinement variants (and the pixel-label upper bound) with every network seeded by ``seed``."""
    run = {"variants": {}, "pseudo_labels": {}}
    for use_ilr in (False, True):
        labels = labels_ilr if use_ilr else labels_none
        t0 = time.monotonic()
        rng = _seeded(seed)
        net = couinaud.CouinaudNet(**kwargs["couinaudnet"])
        pool = couinaud.train_couinaudnet(net, make_optimizer(net.parameters(), cfg["couinaudnet"]), weak, labels,
                                          cfg, rng, "cpu")
        secs = round(time.monotonic() - t0, 1)
        clip = cfg["refine"]["clip_to_region"]
        probs = {w.case_id: couinaud.couinaudnet_probs(net, w, labels[w.case_id], cfg["context"], clip=clip)
                 for w in weak}
        log(f"seed {seed}: CouinaudNet (ILR={use_ilr}): {pool} healthy slices, {secs} s")
        for use_plr in (False, True):
            name = VARIANT_NAMES[(use_ilr, use_plr)]
            tumours = {w.case_id: couinaud.pseudo_masks(probs[w.case_id], cfg, use_plr)[0] & w.liver for w in weak}
            run["pseudo_labels"][name] = pseudo_quality(tumours, truth_tumour, weak)
            t1 = time.monotonic()
            rng = _seeded(seed)
            seg = BoxAttentionUNet2D(**kwargs["segmenter"])
            couinaud.train_segmenter(seg, make_optimizer(seg.parameters(), cfg["segmenter"]),
                                     couinaud.segmenter_cases(weak, tumours), cfg, rng, "cpu")
            ev = evaluate_segmenter(seg, ds, test_cases, cfg)
            ev.update(healthy_pool_slices=pool, couinaudnet_seconds=secs,
                      segmenter_seconds=round(time.monotonic() - t1, 1))
            run["variants"][name] = ev
            log(f"seed {seed} {name}: pseudo Dice {_f(run['pseudo_labels'][name]['dice_per_case'])} / "
                f"{_f(run['pseudo_labels'][name]['dice_global'])}; test tumour Dice per case "
                f"{_f(ev['tumour_dice_per_case'])}, global {_f(ev['tumour_dice_global'])}")
    if upper_bound:   # the same segmenter on the true pixel labels of the same training cases
        t1 = time.monotonic()
        rng = _seeded(seed)
        seg = BoxAttentionUNet2D(**kwargs["segmenter"])
        prepared = [couinaud.prepared_case(w.case_id, w.image, truth_liver[w.case_id], truth_tumour[w.case_id])
                    for w in weak]
        couinaud.train_segmenter(seg, make_optimizer(seg.parameters(), cfg["segmenter"]), prepared, cfg, rng, "cpu")
        ev = evaluate_segmenter(seg, ds, test_cases, cfg)
        ev["segmenter_seconds"] = round(time.monotonic() - t1, 1)
        run["variants"][UPPER] = ev
        log(f"seed {seed} upper bound: test tumour Dice per case {_f(ev['tumour_dice_per_case'])}, "
            f"global {_f(ev['tumour_dice_global'])}")
    return run


VARIANT_NAMES = {(False, False): "none", (True, False): "ILR", (False, True): "PLR", (True, True): "ILR+PLR"}
UPPER = "pixel labels (upper bound)"


def summarize_runs(runs: dict) -> dict:
    """Per variant: every metric as {"values": [per seed], "mean", "sd"}."""
    out = {}
    for name in list(VARIANT_NAMES.values()) + [UPPER]:
        rows = {}
        for key in ("tumour_dice_per_case", "tumour_dice_global", "liver_dice_per_case"):
            rows[key] = [r["variants"][name][key] for r in runs.values() if name in r["variants"]]
        for key in ("dice_per_case", "dice_global"):
            rows["pseudo_" + key] = [r["pseudo_labels"][name][key] for r in runs.values() if name in r["pseudo_labels"]]
        out[name] = {k: {"values": v, "mean": mean(v), "sd": float(np.std(v)) if len(v) > 1 else None}
                     for k, v in rows.items() if v}
    return out


def _cell(stat) -> str:
    if not stat:
        return ""
    vals = ", ".join(_f(v) for v in stat["values"])
    if stat["sd"] is None:
        return _f(stat["mean"])
    return f"**{_f(stat['mean'])}** ± {_f(stat['sd'])} ({vals})"


def _f(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- report


def markdown(res: dict, command: str) -> str:
    lines = ["# Recipe `couinaud` — studies of issue 6", "", f"Command: `{command}`", "",
             f"Machine: CPU, torch threads = {res['threads']}; total {res['seconds_total']:.0f} s.", ""]
    if "constructor" in res:
        lines += ["## Couinaud constructor: per-segment Dice against the known synthetic maps", "",
                  "Given the true liver mask; anatomical landmarks from the enhanced CT (no training).", "",
                  "| cohort | cases | " + " | ".join(f"seg {s}" for s in SEGMENTS) + " | mean | landmarks found (IVC / portal / veins) |",
                  "|---|---|" + "---|" * len(SEGMENTS) + "---|---|"]
        for name, r in res["constructor"].items():
            f = r["landmarks_found"]
            lines.append(f"| {name} | {r['cases']} | " + " | ".join(_f(r["dice_mean"][str(s)], 2) for s in SEGMENTS)
                         + f" | **{_f(r['dice_all_segments_mean'])}** | {f['ivc']} / {f['portal']} / {f['veins']} |")
            lines.append("| (worst case) | | " + " | ".join(_f(r["dice_min"][str(s)], 2) for s in SEGMENTS) + " | | |")
        lines.append("")
    if res.get("real_ct"):
        rc = res["real_ct"]
        lines += [f"Real CT (ircadb/p01, expert liver mask, development data, no Couinaud truth): landmarks found "
                  f"{rc['landmarks']['found']}, {rc['seconds']} s; qualitative map: `{rc['png']}`.", ""]
    if "ablation" in res:
        a = res["ablation"]
        co = a["cohort"]
        clip = a["config"]["refine"]["clip_to_region"]
        lines += ["## Weak labels only: ablation (paper Table 1) on a synthetic cohort", "",
                  "Pseudo-labels " + ("clipped to the labelled Couinaud segments (the recipe's default)." if clip else
                                      "NOT clipped to the labelled segments (`refine.clip_to_region=false`: the "
                                      "paper's vanilla CouinaudNet output on every slice of a pathological volume)."), "",
                  f"Cohort: {co['cases']} cases (seed {co['seed']}, {co['shape']} voxels at {co['spacing']} mm), mix "
                  f"`{co['mix']}`, healthy fraction {co['healthy_fraction']}.  Training cases: "
                  f"{len(a['training_cases']['couinaud'])} with Couinaud segments, {len(a['training_cases']['volume'])} "
                  f"with a volume label only ({a['pathological_training_cases']} pathological); the strong cases give "
                  f"only their liver (`use_masks=False`) and count as Couinaud cases.  Liver of the other cases from a "
                  f"liver net trained on the strong cases (Dice {_f(a['liver']['liver_net_dice_mean'])}); constructor "
                  f"per-segment Dice on those livers (inside the overlap of true and used liver) "
                  f"{_f(mean(a['constructor_on_training_livers'].values()))}.  Steps: CouinaudNet "
                  f"{a['config']['couinaudnet']['steps']}, segmenter {a['config']['segmenter']['steps']}, liver net "
                  f"{a['config']['liver_net']['steps']}.  Every network of a run starts from the same seed; "
                  f"runs with seeds {a['train_seeds']} (upper bound: seed {a['train_seeds'][0]} only).  "
                  f"Cells: mean ± sd over the seeds, then the per-seed values.", "",
                  "| ILR | PLR | test tumour Dice per case | test tumour Dice global | liver Dice | "
                  "pseudo-label Dice per case (train) | pseudo-label Dice global (train) |",
                  "|---|---|---|---|---|---|---|"]
        sm = a["summary"]
        for name in list(VARIANT_NAMES.values()) + [UPPER]:
            row = sm[name]
            if not row:
                continue
            flags = f"{'✓' if 'ILR' in name else ''} | {'✓' if 'PLR' in name else ''}" if name != UPPER else f"{name} |"
            lines.append(f"| {flags} | " + " | ".join(_cell(row.get(k)) for k in (
                "tumour_dice_per_case", "tumour_dice_global", "liver_dice_per_case", "pseudo_dice_per_case",
                "pseudo_dice_global")) + " |")
        pools = {name: a["runs"][str(a["train_seeds"][0])]["variants"][name]["healthy_pool_slices"] for name in ("none", "ILR")}
        lines += ["", f"CouinaudNet's healthy training slices: {pools['none']} without ILR, {pools['ILR']} with ILR."]
        b, af = a["ilr_slice_labels"]["before"], a["ilr_slice_labels"]["after"]
        lines += ["", "Image-level labels of the weak training cases' liver slices against the truth (paper Fig. 5a):", "",
                  "| | labelled tumour, has tumour | labelled tumour, healthy (wrong) | labelled healthy, has tumour (wrong) | labelled healthy, healthy |",
                  "|---|---|---|---|---|",
                  f"| before ILR | {b['tp']} | {b['fp']} | {b['fn']} | {b['tn']} |",
                  f"| after ILR | {af['tp']} | {af['fp']} | {af['fn']} | {af['tn']} |",
                  "", f"ILR corrected {b['fp'] - af['fp']} of {b['fp']} wrongly pathological slices and made "
                  f"{af['fn'] - b['fn']} tumour slices healthy by mistake.", "",
                  "Test tumour Dice per case: mean over the test cases holding a tumour; global: all test cases pooled. "
                  "Pseudo-label Dice: pathological weak training cases, working grid (paper Fig. 5b).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder for cohorts")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--studies", default="constructor,ablation")
    p.add_argument("--constructor-cases", type=int, default=20)
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--seed", type=int, default=1, help="cohort seed")
    p.add_argument("--train-seeds", default="0,1,2", help="network seeds: one run of every variant per seed")
    p.add_argument("--set", default="{}", help="JSON recipe overrides for the ablation, e.g. '{\"segmenter\": {\"steps\": 400}}'")
    p.add_argument("--no-upper-bound", action="store_true", help="skip the pixel-label segmenter")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="couinaud_experiments")
    p.add_argument("--render", type=Path, help="only rewrite the markdown of an earlier JSON result")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(res, res["command"]))
        return
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    studies = set(args.studies.split(","))
    res = {"threads": args.threads}
    args.work.mkdir(parents=True, exist_ok=True)
    if "constructor" in studies:
        res["constructor"] = constructor_study(args.work, seed=11, cases=args.constructor_cases)
        res["real_ct"] = real_ct_figure(args.out / "couinaud_constructor_p01.png")
    if "ablation" in studies:
        seeds = [int(x) for x in args.train_seeds.split(",")]
        res["ablation"] = ablation_study(args.work, args.seed, args.cases, seeds, json.loads(args.set),
                                         upper_bound=not args.no_upper_bound)
    res["seconds_total"] = time.monotonic() - t0
    command = "python Testing/experiments/couinaud_experiments.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=_json))
    (args.out / f"{args.name}.md").write_text(markdown(res, command))
    log(f"wrote {args.out / (args.name + '.md')}")


def _json(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v))


if __name__ == "__main__":
    main()
