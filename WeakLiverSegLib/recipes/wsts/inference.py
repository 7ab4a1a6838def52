"""wsts ``segment``: SDDRL boxes + SDUNet on the non-enhanced phase."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import InputError
from ...learn.slices import image_to_working
from ...learn.training import SegmentResult
from .rl_boxes import BoxEnv, detect
from .config import RECIPE_VERSION
from .data import slice_boxes
from .detector import to_rl
from .segmenters import labels_from_probs, predict_case


def _model_settings(meta: dict) -> dict:
    version = meta.get("recipe_version")
    if version != RECIPE_VERSION:
        raise InputError(f"model.json: recipe_version {version!r} of wsts; this software reads version {RECIPE_VERSION} "
                         "(the box agents' state changed): retrain the model")
    inp = meta.get("input", {})
    d = inp.get("detector", {})
    try:
        return {
            "phase": (inp.get("inference_phases") or ["plain"])[0],
            "hu_window": [float(v) for v in inp["hu_window"]],
            "spacing_mm": float(inp["spacing_mm"][0]),
            "context": int(inp.get("context_slices", 0)),
            "env": BoxEnv(size=int(d["size"]), init_box=float(d["init_box"]), translate=float(d["translate"]),
                          scale=float(d["scale"]), episode_steps=int(d["episode_steps"])),
            "agents": int(d["agents"]),
            "threshold": float(inp.get("threshold", 0.75)),
            "liver_threshold": float(inp.get("liver_threshold", 0.5)),
            "postprocess": bool(inp.get("postprocess", True)),
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"model.json input: incomplete wsts settings ({exc!r})") from None


def segment(model, images: dict, boxes=None, device="cpu", progress=None) -> SegmentResult:
    """Segment liver and tumours from the non-enhanced phase alone (``images["plain"]``).

    Any other phase in ``images`` is ignored.  ``boxes`` (store tumour boxes on this grid),
    when given, replace the SDDRL detection on the slices they cover.
    """
    st = _model_settings(model.meta)
    phase = st["phase"]
    if phase in images:
        image = images[phase]
    elif len(images) == 1:
        image = next(iter(images.values()))
    else:
        raise InputError(f"--input: this wsts model reads the {phase!r} (non-enhanced) phase; got phases "
                         f"{sorted(map(str, images))}")
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    for name in ["student"] + [f"student_agent{i + 1}" for i in range(st["agents"])]:
        if name not in model.networks:
            raise InputError(f"{model.path}: wsts model lacks the network {name!r}")
    policies = [model.networks[f"student_agent{i + 1}"] for i in range(st["agents"])]
    work = image_to_working(image.array, image.spacing[:2], st["spacing_mm"], st["hu_window"])
    env = st["env"]
    h, w = work.shape[1:]
    img_rl = torch.from_numpy(to_rl(work, env.size)).to(device)
    union, _ = detect(policies, img_rl, env)
    boxes_w = union / np.array([env.size / w, env.size / h, env.size / w, env.size / h], np.float32)
    if boxes:
        given = slice_boxes([b for b in boxes if b.label != "liver"], image.array.shape, (h, w))
        for k, b in given.items():
            c = np.concatenate([b[:, 0:2] - b[:, 2:4] / 2, b[:, 0:2] + b[:, 2:4] / 2], axis=1)
            lo, hi = c[:, 0:2].min(axis=0), c[:, 2:4].max(axis=0)
            boxes_w[k] = np.concatenate([(lo + hi) / 2, hi - lo])
    if progress is not None:
        progress.update("detect", 1, 2)
    probs, _ = predict_case(model.networks["student"], policies, work, st, env, device, 16, boxes_w)
    if progress is not None:
        progress.update("detect", 2, 2)
    labels, tumour, entropy = labels_from_probs(probs, image.array.shape, st["threshold"], st["liver_threshold"],
                                                st["postprocess"])
    return SegmentResult(image.with_array(labels), image.with_array(tumour), image.with_array(entropy))
