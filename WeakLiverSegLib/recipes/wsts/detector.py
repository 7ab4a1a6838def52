"""wsts box detectors: RL grids, the DDRL (enhanced) / SDDRL (plain) trainers around ``rl_boxes``, detection and IoU."""

from __future__ import annotations

import numpy as np
import torch

from ...learn.slices import resize_slices
from .rl_boxes import BoxEnv, DetectorTrainer, SACSettings, detect, iou
from .config import box_env
from .data import WCase


def to_rl(images_zhw: np.ndarray, size: int) -> np.ndarray:
    """(z, h, w) working slices -> (z, size, size) on the RL grid."""
    return resize_slices(torch.from_numpy(np.ascontiguousarray(images_zhw))[:, None], (size, size))[:, 0].numpy()


def rl_scale(case: WCase, size: int) -> np.ndarray:
    """Multiply (cx, cy, w, h) working boxes by this to get RL-grid boxes."""
    h, w = case.shape[1:]
    return np.array([size / w, size / h, size / w, size / h], np.float32)


def rl_slices(cases, phases, size: int) -> tuple:
    """Every tumour slice of the cases -> ({phase: (S, size, size)}, targets (S, 4) RL grid, [(case index, slice)])."""
    stacks = {p: [] for p in phases}
    targets, where = [], []
    for ci, case in enumerate(cases):
        ks = case.tumour_slices
        if not len(ks):
            continue
        for p in phases:
            stacks[p].append(to_rl(case.images[p][ks], size))
        scale = rl_scale(case, size)
        for k in ks:
            targets.append(case.dominant(int(k)) * scale)
            where.append((ci, int(k)))
    if not targets:
        return None, None, []
    return {p: np.concatenate(v) for p, v in stacks.items()}, np.stack(targets).astype(np.float32), where


def make_detector(cfg, rl_images, targets, rng, device, act_phase, imitate_phase) -> DetectorTrainer:
    d = cfg["detector"]
    settings = SACSettings(zeta=d["zeta"], tau=d["tau"], relative_entropy=float(d["relative_entropy"]),
                           kl_clip=d["kl_clip"], auto_alpha=bool(d["auto_alpha"]), expert=float(d["expert"]))
    student = SACSettings(zeta=d["zeta"], tau=d["tau"], relative_entropy=float(d["relative_entropy"]),
                          kl_clip=d["kl_clip"], auto_alpha=bool(d["auto_alpha"]), imitation=float(d["imitation"]),
                          expert=float(d["expert"]))
    return DetectorTrainer(rl_images, targets, box_env(cfg), d["agents"], settings, rng, act_phase, imitate_phase,
                           lr=d["lr"], student_lr=d["student_lr"], memory=d["memory"], batch=d["batch"],
                           n_envs=d["envs"], width=d["width"], features=d["features"], alpha=d["alpha"],
                           alpha_lr=d["alpha_lr"], device=device, student_settings=student, updates=d["updates"],
                           random_starts=d["random_starts"], warm_start=int(round(d["warm_start"] * d["steps"])),
                           strided=d["strided"], pool=d["pool"])


def detector_round(detector: DetectorTrainer, cfg: dict, step: int, total: int) -> dict:
    """One detector training round: learning rates x 0.8 every tenth of the stage, one environment step, updates."""
    d = cfg["detector"]
    decay = 0.8 ** min(9, int(step / max(total, 1) * 10))
    detector.set_lr(max(1e-6, d["lr"] * decay), max(1e-6, d["student_lr"] * decay))
    reward = detector.env_step(step)
    logs = detector.update(step)
    logs["reward"] = reward
    return logs


def detect_case(policies, case: WCase, phase: str, env: BoxEnv, device="cpu") -> np.ndarray:
    """Union box of the agents on every slice of ``case`` -> (z, 4) in working pixels."""
    img = torch.from_numpy(to_rl(case.images[phase], env.size)).to(device)
    union, _ = detect(policies, img, env)
    return union / rl_scale(case, env.size)


def detection_iou(policies, cases, phase, env, device="cpu") -> dict:
    """Mean IoU / recall of the detection with the dominant tumour box over the cases' tumour slices."""
    from .rl_boxes import box_recall

    ious, recalls = [], []
    for case in cases:
        ks = case.tumour_slices
        if not len(ks):
            continue
        img = torch.from_numpy(to_rl(case.images[phase][ks], env.size)).to(device)
        union, _ = detect(policies, img, env)
        target = np.stack([case.dominant(int(k)) for k in ks]) * rl_scale(case, env.size)
        ious.append(iou(union, target))
        recalls.append(box_recall(union, target))
    if not ious:
        return {"iou": None, "recall": None, "slices": 0}
    ious, recalls = np.concatenate(ious), np.concatenate(recalls)
    return {"iou": float(ious.mean()), "recall": float(recalls.mean()), "slices": int(len(ious))}


def usse_boxes(case: WCase, attention: str) -> np.ndarray:
    """(z, 4) USSE attention boxes: the DDRL detections, or (``label``) the case's own tumour box where a slice has one."""
    boxes = case.det["teacher"].copy()
    if attention == "label":
        for k in case.boxes:
            boxes[k] = case.dominant(int(k))
    return boxes
