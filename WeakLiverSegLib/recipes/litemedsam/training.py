"""litemedsam fine-tuning: per-slice boxes from the strong masks, embeddings encoded once, the mask
decoder (optionally the prompt encoder) trained with Dice + BCE + IoU MSE, image encoder frozen."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ... import __version__
from ...errors import InputError
from ...learn.modelstore import load_model, save_model
from ...learn.training import (check_cancelled, lr_at, make_optimizer, most_common_phase, open_run, optimizer_step,
                               set_lr)
from .config import LABELS, NAME, PHASES, RECIPE_VERSION, resolve_config


@dataclass
class SliceItem:
    """One object on one slice: its view (row0, col0, rows, cols), its box (r0, c0, r1, c1, slice
    pixels, inclusive) and its mask inside the view."""
    case: str
    k: int
    view: tuple
    label: str
    box_rc: tuple
    mask: np.ndarray


def _bbox2d(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def slice_items(case_id: str, labels_zyx: np.ndarray, objects=("liver", "tumor"), view: str = "crop",
                crop_context: float = 0.5, crop_min_px: int = 64, min_pixels: int = 4) -> list:
    """The training objects of one masked case: the liver on each slice (one box around all of it),
    and each tumour component on each slice.  ``view`` crop: a square around the object's 3D box
    in-plane (the liver's, or the 3D tumour's), as the annotator encodes a 3D box; slice: whole slice."""
    from ...annotate.propagate import square_view

    labels = np.asarray(labels_zyx)
    nz, ny, nx = labels.shape
    items = []

    def view_of(mask3d):
        if view == "slice":
            return (0, 0, ny, nx)
        r0, c0, r1, c1 = _bbox2d(mask3d.any(axis=0))
        return tuple(int(v) for v in square_view((r0, c0, r1, c1), crop_context, crop_min_px, (ny, nx)))

    def add(k, v, label, mask2d):
        if mask2d.sum() < min_pixels:
            return
        r0, c0, h, w = v
        items.append(SliceItem(case_id, int(k), v, label, _bbox2d(mask2d), mask2d[r0:r0 + h, c0:c0 + w].copy()))

    if "liver" in objects and (labels >= 1).any():
        liver = labels >= 1
        v = view_of(liver)
        for k in np.flatnonzero(liver.any(axis=(1, 2))):
            add(k, v, "liver", liver[k])
    if "tumor" in objects and (labels == 2).any():
        lesions, n = ndimage.label(labels == 2)
        for lesion in range(1, n + 1):
            m3 = lesions == lesion
            v = view_of(m3)
            for k in np.flatnonzero(m3.any(axis=(1, 2))):
                comps, m = ndimage.label(m3[k])
                for c in range(1, m + 1):
                    add(k, v, "tumor", comps == c)
    return items


class _Encoded:
    """Items turned into model-grid tensors with their (shared) embeddings."""

    def __init__(self, items, embeddings: dict, input_size: int):
        self.emb = []            # one tensor per item (shared between items of the same slice and view)
        self.target = []         # (S, S) uint8
        self.box = []            # x0, y0, x1, y1 in model pixels
        self.limit = []          # nw, nh (the image part of the padded input)
        self.labels = []
        S = input_size
        for it in items:
            r0, c0, h, w = it.view
            s = S / max(h, w)
            nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
            t = torch.from_numpy(it.mask.astype(np.float32))[None, None]
            t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=nh < h or nw < w)[0, 0] > 0.5
            if not t.any():
                continue
            target = torch.zeros((S, S), dtype=torch.uint8)
            target[:nh, :nw] = t
            br0, bc0, br1, bc1 = it.box_rc
            self.box.append(((bc0 - c0) * s, (br0 - r0) * s, (bc1 - c0) * s, (br1 - r0) * s))
            self.limit.append((nw, nh))
            self.target.append(target)
            self.emb.append(embeddings[(it.case, it.k, it.view)])
            self.labels.append(it.label)

    def __len__(self):
        return len(self.target)

    def batch(self, idx, rng, jitter_px: int, grow: float, device):
        boxes = []
        for i in idx:
            x0, y0, x1, y1 = self.box[i]
            nw, nh = self.limit[i]
            if rng is not None:
                bw, bh = x1 - x0 + 1, y1 - y0 + 1
                j = rng.integers(0, jitter_px + 1, size=4) + rng.uniform(0, grow, size=4) * np.array([bw, bh, bw, bh])
                x0, y0, x1, y1 = x0 - j[0], y0 - j[1], x1 + j[2], y1 + j[3]
            boxes.append([max(x0, 0.0), max(y0, 0.0), min(x1, nw - 1.0), min(y1, nh - 1.0)])
        emb = torch.cat([self.emb[i] for i in idx]).to(device=device, dtype=torch.float32)
        target = torch.stack([self.target[i] for i in idx])[:, None].to(device=device, dtype=torch.float32)
        return emb, torch.tensor(boxes, dtype=torch.float32, device=device), target


def _encode(net, cases, window, input_size, cfg, device, progress, stage) -> dict:
    """Embeddings of every (case, slice, view) the items need, encoded once (BN folded into a copy)."""
    from ...annotate.litemedsam import SlicePredictor, fuse_batchnorm

    enc = fuse_batchnorm(copy.deepcopy(net).eval())
    pred = SlicePredictor(enc, device=device, window=window, input_size=input_size,
                          batch_size=cfg["encode_batch"], cache_slices=max(cfg["encode_batch"], 1))
    need = {}
    for case_id, array, items in cases:
        for it in items:
            need.setdefault((case_id, it.view), set()).add(it.k)
    total = sum(len(ks) for ks in need.values())
    arrays = {case_id: array for case_id, array, _ in cases}
    out, done = {}, 0
    for (case_id, view), ks in need.items():
        pred.set_image(arrays[case_id], key=case_id)
        ks = sorted(ks)
        for i in range(0, len(ks), cfg["encode_batch"]):
            check_cancelled(progress)
            chunk = ks[i:i + cfg["encode_batch"]]
            for k, e in pred.embeddings(chunk, view).items():
                out[(case_id, k, view)] = e.detach().to(torch.float16)
            done += len(chunk)
            if progress is not None:
                progress.update(stage, done, total)
    return out


def _case_items(dataset, cases, cfg, rng_subset):
    prepared = []
    for case in cases:
        phase = cfg["phase"] or case.reference
        if phase not in case.images:
            raise InputError(f"{case.id}: no image phase {phase!r} (phases: {list(case.images)}); set 'phase' in the config")
        image = dataset.read_image(case.id, phase)
        labels = dataset.read_mask(case.id).array
        items = slice_items(case.id, labels, cfg["objects"], cfg["view"], cfg["crop_context"], cfg["crop_min_px"],
                            cfg["min_pixels"])
        prepared.append([case.id, image.array, items])
    if cfg["max_views"] is not None and rng_subset is not None:
        views = sorted({(c, it.k, it.view) for c, _, items in prepared for it in items})
        if len(views) > cfg["max_views"]:
            keep = {views[i] for i in rng_subset.choice(len(views), cfg["max_views"], replace=False)}
            for p in prepared:
                p[2] = [it for it in p[2] if (p[0], it.k, it.view) in keep]
    return [tuple(p) for p in prepared]


def _losses(net, data: _Encoded, idx, rng, cfg, device):
    from monai.losses import DiceLoss

    emb, boxes, target = data.batch(idx, rng, cfg["box_jitter_px"], cfg["box_grow"], device)
    logits, iou_pred = net.decode(emb, boxes)
    logits = logits.float()
    dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    with torch.no_grad():
        hard = (logits > 0).float()
        inter = (hard * target).sum(dim=(1, 2, 3))
        union = hard.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) - inter
        iou_true = inter / union.clamp_min(1.0)
    iou = F.mse_loss(iou_pred[:, 0].float(), iou_true)
    return cfg["dice_weight"] * dice + cfg["bce_weight"] * bce + cfg["iou_weight"] * iou


@torch.no_grad()
def evaluate_items(net, data: _Encoded, device, batch: int = 8) -> dict:
    """Per-item Dice of the decoded mask (exact boxes, no jitter) on the model grid, mean per label."""
    scores = {}
    for i0 in range(0, len(data), batch):
        idx = list(range(i0, min(i0 + batch, len(data))))
        emb, boxes, target = data.batch(idx, None, 0, 0.0, device)
        hard = net.decode(emb, boxes)[0] > 0
        t = target > 0.5
        d = 2 * (hard & t).sum(dim=(1, 2, 3)).float() / (hard.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))).clamp_min(1)
        for i, v in zip(idx, d.tolist()):
            scores.setdefault(data.labels[i], []).append(v)
    return {label: {"slice_dice_mean": round(float(np.mean(v)), 4), "objects": len(v)} for label, v in scores.items()}


def train(dataset, out, config, device="cpu", progress=None, init=None, resume=False) -> Path:
    """Fine-tune LiteMedSAM's mask decoder on the strong cases; writes the model folder ``out``."""
    from ...annotate.convert import DEFAULT_WINDOW, pretrained_dir

    t_start = time.monotonic()
    out = Path(out)
    cfg = resolve_config(config)
    ckpt, saved, init = open_run(out, cfg, resume, init, dataset=dataset, recipe=NAME)
    init = Path(init) if init is not None else pretrained_dir()
    init_model = load_model(init, device="cpu")
    if init_model.recipe != NAME or "litemedsam" not in init_model.networks:
        raise InputError(f"{init}: --init model is of recipe {init_model.recipe!r}, not a LiteMedSAM model ({NAME!r})")
    net = init_model.networks["litemedsam"]
    window = list(cfg["hu_window"] or init_model.meta.get("input", {}).get("hu_window") or DEFAULT_WINDOW)
    input_size = int(cfg["input_size"] or net.image_size)

    strong = dataset.cases_with("mask", split="train")
    val = dataset.cases_with("mask", split="val")
    if not strong:
        raise InputError(f"{dataset.root}: no strong case (mask and split train) to fine-tune LiteMedSAM on")

    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    dev = torch.device(device)
    net.to(dev)
    for p in net.parameters():
        p.requires_grad_(False)
    trained = {"mask_decoder": net.mask_decoder}
    if cfg["train_prompt_encoder"]:
        trained["prompt_encoder"] = net.prompt_encoder
    params = [p for m in trained.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params, cfg, "optimizer")
    opts = {"decoder": opt}
    state = {"curves": {}, "seconds": {}}
    step0 = 0
    if saved is not None:
        _, step0 = ckpt.resume(saved, trained, opts, rng, state, progress)

    # -- items and their embeddings (recomputed on --resume: the encoder is frozen, so they are the same)
    t0 = time.monotonic()
    cases = _case_items(dataset, strong, cfg, np.random.default_rng(int(cfg["seed"]) + 1))
    embeddings = _encode(net, cases, window, input_size, cfg, dev, progress, "encode")
    data = _Encoded([it for _, _, items in cases for it in items], embeddings, input_size)
    state["seconds"]["encode"] = round(time.monotonic() - t0, 2)
    if len(data) == 0:
        raise InputError(f"{dataset.root}: the strong cases hold no liver or tumour object of at least "
                         f"{cfg['min_pixels']} pixels on any slice")
    data_summary = {"dataset": str(dataset.root), "strong": [c.id for c in strong], "val": [c.id for c in val],
                    "objects": {label: data.labels.count(label) for label in sorted(set(data.labels))},
                    "encoded_views": len(embeddings)}

    def save_ckpt(step):
        ckpt.save("decoder", step, trained, opts, rng, extra={
            "config": cfg, "init": str(init), "curves": state["curves"], "seconds": state["seconds"]})

    total = cfg["train_steps"]
    curve = state["curves"].setdefault("decoder", [])
    t0 = time.monotonic()
    net.train()
    for step in range(step0, total):
        check_cancelled(progress)
        set_lr(opt, lr_at(step, total, cfg))
        idx = rng.integers(0, len(data), size=cfg["batch_size"]).tolist()
        value = optimizer_step(opt, _losses(net, data, idx, rng, cfg, dev), "decoder", step)
        curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update("decoder", step + 1, total, loss=round(value, 4))
        if ckpt.due(step + 1) and step + 1 < total:
            save_ckpt(step + 1)
    state["seconds"]["decoder"] = round(state["seconds"].get("decoder", 0) + time.monotonic() - t0, 2)
    net.eval()
    for p in params:
        p.requires_grad_(False)

    metrics = {}
    if val:
        t0 = time.monotonic()
        vcases = _case_items(dataset, val, cfg, None)
        vemb = _encode(net, vcases, window, input_size, cfg, dev, progress, "validate")
        metrics["val"] = evaluate_items(net, _Encoded([it for _, _, items in vcases for it in items], vemb,
                                                      input_size), dev)
        state["seconds"]["validate"] = round(time.monotonic() - t0, 2)
    state["seconds"]["total"] = round(time.monotonic() - t_start, 2)
    phase = cfg["phase"] or most_common_phase(strong, PHASES["inference"][0])
    meta = {
        "recipe": NAME,
        "recipe_version": RECIPE_VERSION,
        "kind": "annotator",
        "software": f"weakliverseg {__version__}",
        "labels": dict(LABELS),
        "input": {"phases": [phase], "inference_phases": [phase], "hu_window": window, "image_size": net.image_size,
                  "input_size": input_size, "view": cfg["view"]},
        "source": init_model.meta.get("source"),
        "training": {
            "fine_tuned": True,
            "trained": sorted(trained),
            "init": str(init),
            "config": copy.deepcopy(cfg),
            "data": data_summary,
            "steps": total,
            "device": str(device),
            "seconds": state["seconds"],
            "curves": state["curves"],
        },
        "metrics": metrics,
    }
    save_model(out, meta, {"litemedsam": ("LiteMedSAM", {}, net.cpu())})
    ckpt.clear()
    return out
