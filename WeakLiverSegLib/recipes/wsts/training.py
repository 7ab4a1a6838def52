"""wsts training: detector -> USSE mean teacher -> SDDRL + SDUNet student, checkpointed by stage."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from ... import __version__
from ...errors import InputError
from ...learn.modelstore import LoadedModel, save_model
from ...learn.training import check_cancelled, open_run
from .usse import MeanTeacher, add_noise, ramp_up, with_attention
from .config import (LABELS, NAME, NETWORK_CLASS, POLICY_CLASS, RECIPE_VERSION, _set_lr, box_env, resolve_config,
                     stage_lr)
from .data import load_cases, select_cases
from .detector import detect_case, detection_iou, detector_round, make_detector, rl_slices, usse_boxes
from .segmenters import make_net, net_kwargs, pseudo_labels, sample_student_batch, sample_usse_batch, student_loss
from .inference import segment


class _Stages:
    """The three training stages over a list of WCases, shared by ``train`` and the experiment script."""

    def __init__(self, cfg: dict, cases: list, device="cpu", progress=None, rng=None, detector=None):
        self.cfg, self.cases, self.progress = cfg, cases, progress
        self.dev = torch.device(device)
        self.rng = rng if rng is not None else np.random.default_rng(int(cfg["seed"]))
        self.env = box_env(cfg)
        self.tp, self.sp = cfg["teacher_phase"], cfg["student_phase"]
        self.has_box = any(c.kind == "box" for c in cases)
        if detector is None:     # (the experiments pass one trained earlier on the same boxes)
            rl_images, targets, _ = rl_slices(cases, (self.tp, self.sp), self.env.size)
            if targets is None:
                raise InputError("no training slice with a tumour box: the detectors have nothing to learn from")
            detector = make_detector(cfg, rl_images, targets, self.rng, self.dev, self.tp, self.sp)
        self.detector = detector
        self.usse = None
        if self.has_box:
            online = make_net(cfg, "usse").to(self.dev)
            u = cfg["usse"]
            self.usse = MeanTeacher(online, torch.optim.Adam(online.parameters(), lr=u["lr"]), ema=u["ema"],
                                    noise_std=u["noise_std"], noise_clip=u["noise_clip"], consistency=u["consistency"],
                                    uncertainty=u["uncertainty"], rampup=u["rampup"], warmup=u["warmup"],
                                    bce=u["bce"])
        self.student = make_net(cfg, "student").to(self.dev)
        self.student_opt = torch.optim.Adam(self.student.parameters(), lr=cfg["student"]["lr"])
        self.curves = {}

    def modules(self) -> dict:
        out = dict(self.detector.modules())
        if self.usse is not None:
            out.update(usse_online=self.usse.online, usse_target=self.usse.target)
        out["student"] = self.student
        return out

    def optimizers(self) -> dict:
        out = {f"det_{k}": v for k, v in self.detector.opts.items()}
        if self.usse is not None:
            out["usse"] = self.usse.opt
        out["student"] = self.student_opt
        return out

    def _log(self, stage, step, total, logs, every=10):
        if step % every == 0 or step == total:
            self.curves.setdefault(stage, []).append([step] + [round(float(logs.get(k, 0.0)), 5) for k in sorted(logs)])
            self.curves.setdefault(stage + "_keys", sorted(logs))
        if self.progress is not None:
            self.progress.update(stage, step, total, loss=round(float(logs.get("loss", logs.get("t_q", 0.0))), 5))

    # -- stage 1
    def detector_step(self, step: int, total: int) -> dict:
        return detector_round(self.detector, self.cfg, step, total)

    def after_detector(self) -> None:
        """Detection boxes of every slice: teacher agents on the teacher phase, student agents on the student phase;
        the USSE attention boxes (``usse.attention``)."""
        for case in self.cases:
            case.det["teacher"] = detect_case(self.detector.policies("teacher"), case, self.tp, self.env, self.dev)
            if self.detector.student is not None:
                case.det["student"] = detect_case(self.detector.policies("student"), case, self.sp, self.env, self.dev)
            case.det["usse"] = usse_boxes(case, self.cfg["usse"]["attention"])

    # -- stage 2
    def usse_step(self, step: int, total: int) -> dict:
        _set_lr(self.usse.opt, stage_lr(self.cfg["usse"], step, total))
        batch = sample_usse_batch(self.cases, self.cfg, self.rng, self.tp, self.dev)
        return self.usse.step(batch, step, total)

    def after_usse(self) -> None:
        if self.usse is not None:
            pseudo_labels(self.usse, self.cases, self.cfg, self.tp, self.dev, self.cfg["infer_batch"])

    # -- stage 3
    def student_step(self, step: int, total: int) -> dict:
        s = self.cfg["student"]
        _set_lr(self.student_opt, stage_lr(s, step, total))
        self.student.train()
        batch = sample_student_batch(self.cases, self.cfg, self.rng, self.sp, self.dev)
        c = batch["image"].shape[1]
        x = add_noise(with_attention(batch["image"], batch["box"]), s["noise_std"], s["noise_clip"], c)
        gamma = s["box_weight"] * ramp_up(step, int(s["rampup"] * total))
        loss, lp, lb = student_loss(self.student(x), batch, gamma, s["bce"])
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.student_opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"student: loss became {value} at step {step + 1}")
        return {"loss": value, "pixel_dice_loss": lp, "box_dice_loss": lb, "gamma": gamma}

    def run(self, stage: str, total: int, start: int = 0, save=None, every: int = 100) -> None:
        step_fn = {"detector": self.detector_step, "usse": self.usse_step, "student": self.student_step}[stage]
        for step in range(start, total):
            check_cancelled(self.progress)
            logs = step_fn(step, total)
            self._log(stage, step + 1, total, logs)
            if save is not None and (step + 1) % every == 0 and step + 1 < total:
                save(stage, step + 1)
        if save is not None:
            save(stage, total)


STAGES = ("detector", "usse", "student")


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """DDRL + SDDRL -> USSE -> pseudo masks -> SDUNet; writes the model folder ``out``."""
    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    if init is not None:
        raise InputError("--init: recipe wsts does not support fine-tuning from a model yet; train from scratch")
    ckpt, saved, _ = open_run(out, cfg, resume, dataset=dataset, recipe=NAME)

    pixel, box, val = select_cases(dataset, cfg)
    if not pixel:
        raise InputError(f"{dataset.root}: recipe wsts needs at least one pixel-labelled case (a mask, split train)")
    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    total = len(pixel) + len(box)
    cases = load_cases(dataset, pixel, "pixel", cfg, progress, 0, total) + \
        load_cases(dataset, box, "box", cfg, progress, len(pixel), total)
    stages = _Stages(cfg, cases, device, progress, rng)
    data = {"dataset": str(dataset.root), "pixel": [c.id for c in pixel], "box": [c.id for c in box],
            "val": [c.id for c in val]}
    seconds = {}

    def save_ckpt(stage, step):
        ckpt.save(stage, step, stages.modules(), stages.optimizers(), rng,
                  extra={"config": cfg, "curves": stages.curves, "seconds": seconds})

    stage0, step0 = STAGES[0], 0
    if saved is not None:
        ckpt.restore(saved, stages.modules(), stages.optimizers(), rng)
        stages.curves = saved.meta["extra"].get("curves", {})
        seconds.update(saved.meta["extra"].get("seconds", {}))
        stage0, step0 = saved.stage, saved.step
        if progress is not None:
            progress.log(f"resuming from {stage0} step {step0}")
    every = cfg["checkpoint_every"]
    for stage in STAGES:
        done = STAGES.index(stage) < STAGES.index(stage0)   # trained before the interruption
        t0 = time.monotonic()
        steps = cfg[stage]["steps"] if (stage != "usse" or stages.usse is not None) else 0
        start = step0 if stage == stage0 else 0
        if not done and steps > 0 and start < steps:
            stages.run(stage, steps, start, save_ckpt, every)
        # the outputs of a stage (detection boxes, pseudo masks) are recomputed from its networks
        if stage == "detector":
            stages.after_detector()
        elif stage == "usse":
            stages.after_usse()
        seconds[stage] = round(seconds.get(stage, 0.0) + time.monotonic() - t0, 2)

    env = stages.env
    det = {"train_teacher": detection_iou(stages.detector.policies("teacher"), cases, stages.tp, env, device),
           "train_student": detection_iou(stages.detector.policies("student"), cases, stages.sp, env, device)}
    policy_kwargs = stages.detector.student[0].policy_kwargs()
    networks = {"student": (NETWORK_CLASS, net_kwargs(cfg, "student"), stages.student.eval())}
    for i, pi in enumerate(stages.detector.policies("student")):
        networks[f"student_agent{i + 1}"] = (POLICY_CLASS, policy_kwargs, pi.eval())
    meta = {
        "recipe": NAME, "recipe_version": RECIPE_VERSION, "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {
            "phases": [cfg["teacher_phase"], cfg["student_phase"]],
            "inference_phases": [cfg["student_phase"]],
            "hu_window": list(cfg["hu_window"][cfg["student_phase"]]),
            "spacing_mm": [float(cfg["spacing_mm"])] * 2,
            "spacing_note": "in-plane working spacing; slices stay native",
            "context_slices": int(cfg["context"]),
            "detector": {"agents": cfg["detector"]["agents"], "size": env.size, "init_box": env.init_box,
                         "translate": env.translate, "scale": env.scale, "episode_steps": env.episode_steps},
            "threshold": float(cfg["threshold"]), "liver_threshold": float(cfg["liver_threshold"]),
            "postprocess": bool(cfg["postprocess"]),
        },
        "training": {"config": copy.deepcopy(cfg), "data": data,
                     "steps": {k: cfg[k]["steps"] for k in STAGES}, "device": str(device),
                     "seconds": seconds, "curves": stages.curves, "detection": det},
        "metrics": {},
    }
    if val:
        model = LoadedModel(out, meta, {k: v[2] for k, v in networks.items()})
        meta["metrics"] = {"val": _validate(model, dataset, val, cfg, device, progress)}
    seconds["total"] = round(time.monotonic() - t_start, 2)
    save_model(out, meta, networks)
    ckpt.clear()
    return out


def _validate(model, dataset, val, cfg, device, progress) -> dict:
    from ...evaluation.metrics import GlobalSums, case_metrics, summarize

    accum, per_case = GlobalSums(), {}
    for n, case in enumerate(val):
        image = dataset.read_image(case.id, cfg["student_phase"])
        result = segment(model, {cfg["student_phase"]: image}, device=device)
        per_case[case.id] = case_metrics(result.labels.array, dataset.read_mask(case.id).array, image.spacing,
                                         accum=accum)
        if progress is not None:
            progress.update("validate", n + 1, len(val))
    return {"cases": per_case, "summary": summarize(per_case, accum)}
