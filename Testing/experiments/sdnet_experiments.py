"""SD-Net studies of issue 8 (recipe ``sdnet``), sized for a shared 2-core CPU.  Not a pytest file.

Studies (``--studies``, comma-separated):

* ``ratio``: the strong:weak ratio study of the paper's Fig. 5 on one synthetic cohort (20 train
  cases, 6 test): 20:80, 50:50, 80:20, 100:0 labelled:unlabelled, SD-Net beside a single VNet
  trained on the same labelled cases alone (the same steps, patches and optimiser).  Nested
  labelled sets (the 4 cases of 20:80 are among the 10 of 50:50, ...).
* ``ablation``: Table 2 at 20:80: MSE (the paper) vs class-balanced weighted CE vs no loss on
  the disagreement region; and SD-Net without the unlabelled half (the value of the unlabelled data).
* ``seeds``: 20:80 with seeds 1 and 2 (SD-Net and the single VNet): the run-to-run spread.
* ``real``: ircadb/p01 labelled + unlabelled ircadb/p17 (its mask never read for training),
  totalseg/ct.nii.gz and synthetic volumes -> liver metrics on p17; beside a single VNet on p01
  alone.  Nothing is tuned on p17: the settings are those of the synthetic studies.

Every trained model stays in ``--work`` (a rerun reuses it); results go to ``--out`` as JSON and a
markdown table.  Run::

    .venv/bin/python Testing/experiments/sdnet_experiments.py --work /tmp/sdx --studies ratio,ablation,seeds,real \
        --out docs/results/sdnet_experiments
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from WeakLiverSegLib.synth import phantom  # noqa: E402
from WeakLiverSegLib.data.imageio import read_image  # noqa: E402
from WeakLiverSegLib.evaluation.metrics import overlap_counts  # noqa: E402
from WeakLiverSegLib.learn.modelstore import load_model  # noqa: E402
from WeakLiverSegLib.app.progress import Progress  # noqa: E402
from WeakLiverSegLib.recipes import sdnet  # noqa: E402
from WeakLiverSegLib.data.store import Dataset  # noqa: E402

SHARED = REPO.parent / "shared" / "data"

# The CPU experiment settings (everything else is sdnet.DEFAULTS: SGD lr 0.01, momentum 0.9, weight
# decay 1e-4, batch 2 labelled + 2 unlabelled, T = 0.1, MSE on the disagreement region).  4 mm
# voxels and 24^3 patches (96 mm, a whole phantom liver) keep one SD-Net step near 1 s on one core.
# The lr schedule is the paper's first 300 iterations (lr / 10 after 200) rather than its 1200
# compressed into 300 (which leaves only 50 steps at lr 0.01: under-trained in a probe).
RUN_CONFIG = {
    "steps": 300, "iterations": 300, "lr_step": 200,
    "spacing_mm": [4.0, 4.0, 4.0], "patch": [24, 24, 24],
}
RATIOS = {"20:80": 4, "50:50": 10, "80:20": 16, "100:0": 20}


# ----------------------------------------------------------------------------- data


def build_cohort(work: Path, cases: int, seed: int) -> Dataset:
    root = work / "cohort"
    if (root / "dataset.json").exists():
        return Dataset.load(root)
    # 20 train cases with masks (masks are hidden per ratio below), 6 test cases (truth only)
    frac = 20 / cases
    return phantom.generate_cohort(root, cases=cases, seed=seed, mix=f"strong={frac:.6f},test={1 - frac:.6f}")


def ratio_store(base: Dataset, root: Path, n_labelled: int, order: list) -> Dataset:
    """The train cases of ``base`` (enhanced phase), masks kept for the first ``n_labelled`` of ``order``."""
    if (root / "dataset.json").exists():
        return Dataset.load(root)
    ds = Dataset.create(root, name=root.name)
    keep = set(order[:n_labelled])
    for cid in order:
        case = base.cases[cid]
        mask = base.read_mask(cid) if cid in keep else None
        ds.add_case(cid, {case.reference: base.read_image(cid)}, mask=mask, split="train")
    return ds


def real_store(base: Dataset, root: Path, synthetic: list) -> Dataset:
    """p01 labelled; p17 (no mask), totalseg ct and ``synthetic`` phantom cases unlabelled."""
    if (root / "dataset.json").exists():
        return Dataset.load(root)
    ds = Dataset.create(root, name="real-p01-plus-unlabelled")
    ds.add_case("ircadb_p01", {"ct": read_image(SHARED / "ircadb/p01/ct.nii.gz")},
                mask=read_image(SHARED / "ircadb/p01/label.nii.gz"), split="train")
    ds.add_case("ircadb_p17", {"ct": read_image(SHARED / "ircadb/p17/ct.nii.gz")}, split="train")
    ds.add_case("totalseg_ct", {"ct": read_image(SHARED / "totalseg/ct.nii.gz")}, split="train")
    for cid in synthetic:
        ds.add_case(f"phantom_{cid}", {"ct": base.read_image(cid)}, split="train")
    return ds


def p01_only_store(root: Path) -> Dataset:
    if (root / "dataset.json").exists():
        return Dataset.load(root)
    ds = Dataset.create(root, name="real-p01")
    ds.add_case("ircadb_p01", {"ct": read_image(SHARED / "ircadb/p01/ct.nii.gz")},
                mask=read_image(SHARED / "ircadb/p01/label.nii.gz"), split="train")
    return ds


# ----------------------------------------------------------------------------- train / evaluate


def train(name: str, dataset: Dataset, cfg: dict, work: Path) -> tuple:
    out = work / "models" / name
    if (out / "model.json").exists():
        meta = json.loads((out / "model.json").read_text())
        return out, meta["training"]["seconds"].get("total")
    print(f"[{time.strftime('%H:%M:%S')}] train {name}: {json.dumps(cfg)}", flush=True)
    sdnet.train(dataset, out, cfg, "cpu", Progress("none"))
    meta = json.loads((out / "model.json").read_text())
    print(f"[{time.strftime('%H:%M:%S')}]   done in {meta['training']['seconds']['total']:.0f} s", flush=True)
    return out, meta["training"]["seconds"]["total"]


def case_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Table 1's columns for one case (liver = truth labels >= 1) + the raw counts."""
    tp, fp, fn, tn = overlap_counts(pred, truth)
    return {"dice": 2 * tp / max(1, 2 * tp + fp + fn), "jaccard": tp / max(1, tp + fp + fn),
            "sensitivity": tp / max(1, tp + fn), "specificity": tn / max(1, tn + fp),
            "accuracy": (tp + tn) / max(1, tp + tn + fp + fn), "counts": [tp, fp, fn, tn]}


def summarize(per_case: dict) -> dict:
    tp, fp, fn, _ = np.sum([c["counts"] for c in per_case.values()], axis=0)
    out = {"dice_global": float(2 * tp / max(1, 2 * tp + fp + fn))}
    for key in ("dice", "jaccard", "sensitivity", "specificity", "accuracy"):
        out[key if key != "dice" else "dice_per_case"] = float(np.mean([c[key] for c in per_case.values()]))
    return out


def evaluate(model_dir: Path, tests: list, members=("default",)) -> dict:
    """{member: {"summary", "cases"}} on ``tests`` = [(id, image, truth labels)]; ``default`` is the
    model's own output (mean of both networks for SD-Net, post-processed); ``raw`` skips the
    post-processing; ``vnet`` / ``resvnet`` one network alone."""
    model = load_model(model_dir)
    out = {}
    for member in members:
        per_case = {}
        for cid, image, truth in tests:
            kwargs = {}
            if member == "raw":
                kwargs["do_postprocess"] = False
            elif member != "default":
                kwargs["member"] = member
            labels = sdnet.segment(model, {"image": image}, **kwargs).labels.array
            per_case[cid] = case_scores(labels >= 1, truth >= 1)
        out[member] = {"summary": summarize(per_case),
                       "cases": {k: {m: round(v, 4) for m, v in c.items() if m != "counts"} for k, c in per_case.items()}}
    return out


def synthetic_tests(base: Dataset) -> list:
    return [(c.id, base.read_image(c.id), base.read_truth(c.id).array) for c in base.cases.values() if c.split == "test"]


# ----------------------------------------------------------------------------- studies


def run_ratio(base, order, work, results, steps):
    tests = synthetic_tests(base)
    for ratio, n_l in RATIOS.items():
        ds = ratio_store(base, work / "stores" / f"ratio_{n_l:02d}", n_l, order)
        for method in ("sdnet", "vnet"):
            name = f"{method}_{n_l:02d}"
            if name in results["runs"]:          # trained and evaluated by an earlier invocation
                continue
            cfg = {**RUN_CONFIG, "steps": steps, "method": method}
            model, secs = train(name, ds, cfg, work)
            members = ("default", "raw", "vnet", "resvnet") if method == "sdnet" else ("default", "raw")
            results["runs"][name] = {"study": "ratio", "ratio": ratio, "labelled": n_l, "unlabelled": 20 - n_l,
                                     "method": method, "train_s": secs, "config": cfg,
                                     "eval": evaluate(model, tests, members)}
            save(results, work)


def run_ablation(base, order, work, results, steps):
    """Table 2 at 20:80, plus a control: SD-Net on the 4 labelled cases with no unlabelled batch
    half (what the two cooperating networks give without the unlabelled data)."""
    tests = synthetic_tests(base)
    ds = ratio_store(base, work / "stores" / "ratio_04", 4, order)
    variants = {"sdnet_04_wce": {"disagreement_loss": "wce"}, "sdnet_04_none": {"disagreement_loss": "none"},
                "sdnet_04_nounlab": {"unlabelled_per_batch": 0}}
    for name, extra in variants.items():
        if name in results["runs"]:
            continue
        cfg = {**RUN_CONFIG, "steps": steps, **extra}
        model, secs = train(name, ds, cfg, work)
        results["runs"][name] = {"study": "ablation", "ratio": "20:80", "labelled": 4,
                                 "unlabelled": 0 if "unlabelled_per_batch" in extra else 16,
                                 "method": "sdnet", "variant": extra, "train_s": secs, "config": cfg,
                                 "eval": evaluate(model, tests, ("default", "raw", "vnet", "resvnet"))}
        save(results, work)


def run_seeds(base, order, work, results, steps, seeds=(1, 2)):
    """20:80 again with other seeds (network initialisation and patch sampling): the spread."""
    tests = synthetic_tests(base)
    ds = ratio_store(base, work / "stores" / "ratio_04", 4, order)
    for seed in seeds:
        for method in ("sdnet", "vnet"):
            name = f"{method}_04_seed{seed}"
            if name in results["runs"]:
                continue
            cfg = {**RUN_CONFIG, "steps": steps, "method": method, "seed": seed}
            model, secs = train(name, ds, cfg, work)
            members = ("default", "raw", "vnet", "resvnet") if method == "sdnet" else ("default", "raw")
            results["runs"][name] = {"study": "seeds", "ratio": "20:80", "labelled": 4, "unlabelled": 16,
                                     "method": method, "seed": seed, "train_s": secs, "config": cfg,
                                     "eval": evaluate(model, tests, members)}
            save(results, work)


def run_real(base, work, results, steps):
    if not SHARED.is_dir():
        print(f"skipping the real-data study: {SHARED} is absent")
        return
    synthetic = [c.id for c in base.cases.values() if c.split == "train"][:6]
    truth17 = read_image(SHARED / "ircadb/p17/label.nii.gz").array
    tests = [("ircadb_p17", read_image(SHARED / "ircadb/p17/ct.nii.gz"), truth17)]
    for name, ds, method in (("real_sdnet", real_store(base, work / "stores" / "real", synthetic), "sdnet"),
                             ("real_vnet", p01_only_store(work / "stores" / "real_p01"), "vnet")):
        if name in results["runs"]:
            continue
        cfg = {**RUN_CONFIG, "steps": steps, "method": method}
        model, secs = train(name, ds, cfg, work)
        members = ("default", "raw", "vnet", "resvnet") if method == "sdnet" else ("default", "raw")
        results["runs"][name] = {"study": "real", "method": method, "train_s": secs, "config": cfg,
                                 "data": json.loads((model / "model.json").read_text())["training"]["data"],
                                 "eval": evaluate(model, tests, members)}
        save(results, work)


# ----------------------------------------------------------------------------- output


def save(results, work):
    (work / "results.json").write_text(json.dumps(results, indent=1))


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def table(results) -> str:
    cols = ("dice_global", "dice_per_case", "specificity", "sensitivity", "accuracy", "jaccard")
    head = "| run | labelled:unlabelled | output | " + " | ".join(cols) + " | train s |\n"
    head += "|---" * (len(cols) + 4) + "|\n"
    rows = []
    for name, run in results["runs"].items():
        for member, ev in run["eval"].items():
            s = ev["summary"]
            lu = f"{run.get('labelled', '-')}:{run.get('unlabelled', '-')}" if run["study"] != "real" else \
                f"{len(run['data']['labelled'])}:{len(run['data']['unlabelled'])}"
            if run["method"] == "vnet":
                lu += " (single VNet: labelled only)"
            label = {"default": "model output", "raw": "no post-processing", "vnet": "VNet member",
                     "resvnet": "ResVNet member"}[member]
            rows.append(f"| {name} | {lu} | {label} | " + " | ".join(pct(s[c]) for c in cols)
                        + f" | {run['train_s'] or 0:.0f} |")
    return head + "\n".join(rows) + "\n"


def per_case_table(results, study) -> str:
    runs = {k: v for k, v in results["runs"].items() if v["study"] == study}
    if not runs:
        return ""
    ids = sorted(next(iter(runs.values()))["eval"]["default"]["cases"])
    out = "| run | " + " | ".join(ids) + " |\n" + "|---" * (len(ids) + 1) + "|\n"
    for name, run in runs.items():
        cases = run["eval"]["default"]["cases"]
        out += f"| {name} | " + " | ".join(pct(cases[i]["dice"]) for i in ids) + " |\n"
    return out


def resolution_ceiling(base: Dataset, spacing) -> float:
    """Dice global of the test truth masks taken to the working grid and back (what a perfect
    network at that voxel size would score)."""
    from WeakLiverSegLib.data.imageio import resample_to

    per_case = {}
    for cid, image, truth in synthetic_tests(base):
        grid = sdnet.working_grid(image, spacing)
        work = sdnet.mask_to_working(image.with_array(truth), grid).astype(np.float32)
        back = resample_to(grid.with_array(work), image, "linear", default=0.0).array >= 0.5
        per_case[cid] = case_scores(back, truth >= 1)
    return summarize(per_case)["dice_global"]


def seeds_summary(results) -> str:
    """Liver Dice global at 20:80 over the seeds run (mean, min, max): SD-Net beside the single VNet."""
    rows = []
    for method in ("sdnet", "vnet"):
        names = [n for n in (f"{method}_04", f"{method}_04_seed1", f"{method}_04_seed2") if n in results["runs"]]
        members = ("default", "vnet", "resvnet") if method == "sdnet" else ("default",)
        for member in members:
            vals = [results["runs"][n]["eval"][member]["summary"]["dice_global"] for n in names
                    if member in results["runs"][n]["eval"]]
            if vals:
                rows.append(f"| {method} | {member} | {len(vals)} | {pct(np.mean(vals))} | {pct(min(vals))} | "
                            f"{pct(max(vals))} | " + ", ".join(pct(v) for v in vals) + " |")
    if not rows:
        return ""
    return ("| method | output | seeds | mean Dice global | min | max | per seed (0, 1, 2) |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="cohorts, stores and models (reused on rerun)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "sdnet_experiments",
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--studies", default="ratio,ablation,seeds,real")
    ap.add_argument("--steps", type=int, default=RUN_CONFIG["steps"])
    ap.add_argument("--cases", type=int, default=26)
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    base = build_cohort(args.work, args.cases, args.seed)
    train_ids = [c.id for c in base.cases.values() if c.split == "train"]
    order = [train_ids[i] for i in np.random.default_rng(args.seed).permutation(len(train_ids))]
    rpath = args.work / "results.json"
    results = json.loads(rpath.read_text()) if rpath.exists() else {"runs": {}}
    results.update({"cohort": {"root": str(base.root), "cases": args.cases, "seed": args.seed,
                               "train": len(train_ids), "order": order},
                    "run_config": RUN_CONFIG, "steps": args.steps})
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if "ratio" in studies:
        run_ratio(base, order, args.work, results, args.steps)
    if "ablation" in studies:
        run_ablation(base, order, args.work, results, args.steps)
    if "seeds" in studies:
        run_seeds(base, order, args.work, results, args.steps)
    if "real" in studies:
        run_real(base, args.work, results, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = ["# SD-Net experiments (generated by Testing/experiments/sdnet_experiments.py)\n",
          f"Command: `.venv/bin/python Testing/experiments/sdnet_experiments.py --work {args.work} "
          f"--studies {args.studies} --steps {args.steps}`\n",
          f"Training settings beyond `sdnet.DEFAULTS`: `{json.dumps(RUN_CONFIG)}` (steps {args.steps}).\n",
          "Liver metrics in %, test cases only (synthetic: 6 held-out phantoms; real: ircadb/p17); Dice global "
          "pools the voxels of all test cases.  `train s`: wall-clock seconds on a 2-core CPU shared with other "
          "jobs (load 5-9), one torch thread.  SD-Net's model output averages its two networks; the VNet / "
          "ResVNet member rows are one network alone.\n",
          f"Resolution ceiling: the synthetic test truth taken to the {RUN_CONFIG['spacing_mm'][0]:g} mm working grid "
          f"and back scores {pct(resolution_ceiling(base, RUN_CONFIG['spacing_mm']))} Dice global.\n",
          table(results)]
    for study in ("ratio", "real"):
        pc = per_case_table(results, study)
        if pc:
            md += [f"\nPer-case liver Dice ({study}, model output):\n", pc]
    ss = seeds_summary(results)
    if ss:
        md += ["\n20:80 over seeds (network initialisation and patch sampling), Dice global:\n", ss]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print(table(results))


if __name__ == "__main__":
    main()
