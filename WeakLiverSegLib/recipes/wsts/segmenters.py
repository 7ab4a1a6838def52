"""wsts segmentation networks: USSE teacher and SDUNet student batches, loss, networks, pseudo-labels, prediction."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...learn.postprocess import postprocess
from ...learn.slices import resize_slices, slice_groups
from .dense_unet import DenseUNet2D, set_output_prior
from .rl_boxes import BoxEnv, detect, jitter_boxes
from .usse import MeanTeacher, seg_loss, with_attention
from .data import WCase
from .detector import to_rl


def _inputs(case: WCase, phase: str, ks, context: int) -> np.ndarray:
    """(B, 2c+1, h, w) slice groups of one case."""
    return slice_groups(case.images[phase], np.asarray(ks), context)


def _jitter(boxes, rng, cfg, case):
    h, w = case.shape[1:]
    b = jitter_boxes(boxes, rng, cfg["box_noise"]["shift"], cfg["box_noise"]["scale"])
    b[:, 0] = np.clip(b[:, 0], 0, w)
    b[:, 1] = np.clip(b[:, 1], 0, h)
    return b


def _group_by_shape(items):
    """Batches must share a slice size: keep only the items whose case has the first item's size."""
    shape = items[0][0].shape[1:]
    return [it for it in items if it[0].shape[1:] == shape]


def sample_usse_batch(cases, cfg, rng, phase, device) -> dict:
    """Tumour slices (pixel-labelled share ``labelled_fraction``) with their jittered teacher detection boxes."""
    ucfg = cfg["usse"]
    pixel = [c for c in cases if c.kind == "pixel" and len(c.tumour_slices)]
    box = [c for c in cases if c.kind == "box" and len(c.tumour_slices)]
    items = []
    for _ in range(ucfg["batch"]):
        pool = pixel if (not box or (pixel and rng.random() < ucfg["labelled_fraction"])) else box
        case = pool[int(rng.integers(len(pool)))]
        k = int(case.tumour_slices[int(rng.integers(len(case.tumour_slices)))])
        items.append((case, k))
    items = _group_by_shape([(c, k) for c, k in items])
    ks_img = np.concatenate([_inputs(c, phase, [k], cfg["context"]) for c, k in items])
    boxes = np.concatenate([_jitter(c.det["usse"][[k]], rng, cfg, c) for c, k in items])
    target = np.stack([c.tumour[k] if c.kind == "pixel" else np.zeros(c.shape[1:], np.float32) for c, k in items])
    return {"image": torch.from_numpy(ks_img).to(device), "box": boxes,
            "target": torch.from_numpy(target[:, None]).to(device),
            "labelled": torch.tensor([c.kind == "pixel" for c, _ in items], device=device)}


def sample_student_batch(cases, cfg, rng, phase, device) -> dict:
    """Slices (``tumour_fraction`` from tumour slices) with jittered SDDRL boxes, masks or pseudo masks."""
    scfg = cfg["student"]
    items = []
    for _ in range(scfg["batch"]):
        case = cases[int(rng.integers(len(cases)))]
        ts = case.tumour_slices
        if len(ts) and rng.random() < scfg["tumour_fraction"]:
            k = int(ts[int(rng.integers(len(ts)))])
        else:
            k = int(rng.integers(case.shape[0]))
        items.append((case, k))
    items = _group_by_shape(items)
    img = np.concatenate([_inputs(c, phase, [k], cfg["context"]) for c, k in items])
    boxes = np.concatenate([_jitter(c.det["student"][[k]], rng, cfg, c) for c, k in items])
    tumour, liver, is_pixel = [], [], []
    for c, k in items:
        zero = np.zeros(c.shape[1:], np.float32)
        if c.kind == "pixel":
            tumour.append(c.tumour[k]); liver.append(c.liver[k]); is_pixel.append(True)
        else:
            pseudo = zero if c.pseudo is None else c.pseudo[k]
            if scfg["pseudo"] == "hard":
                pseudo = (pseudo > 0.5).astype(np.float32)
            tumour.append(pseudo); liver.append(zero); is_pixel.append(False)
    t = lambda a: torch.from_numpy(np.stack(a)[:, None]).to(device)  # noqa: E731
    return {"image": torch.from_numpy(img).to(device), "box": boxes, "tumour": t(tumour), "liver": t(liver),
            "pixel": torch.tensor(is_pixel, device=device)}


def student_loss(logits: torch.Tensor, batch: dict, gamma: float, bce: float = 0.0) -> tuple:
    """Eq. 21: Dice(tumour, mask) + liver Dice on pixel-labelled slices + gamma' Dice(tumour, pseudo) on box slices.

    ``bce`` > 0 adds that weight of pixel cross-entropy to every term (``usse.seg_loss``)."""
    logits = logits.float()
    pix, box = batch["pixel"], ~batch["pixel"]
    lp = torch.zeros((), device=logits.device)
    lb = torch.zeros((), device=logits.device)
    if bool(pix.any()):
        lp = seg_loss(logits[pix, 1:2], batch["tumour"][pix], bce) + seg_loss(logits[pix, 0:1], batch["liver"][pix], bce)
    if bool(box.any()):
        lb = seg_loss(logits[box, 1:2], batch["tumour"][box], bce)
    return lp + gamma * lb, float(lp.detach()), float(lb.detach())


# ----------------------------------------------------------------------------- networks


def net_kwargs(cfg: dict, role: str) -> dict:
    """``usse``: image slices + box map -> tumour; ``student``: image slices + box map -> (liver, tumour)."""
    n = cfg["network"]
    return {"in_channels": 2 * cfg["context"] + 2, "out_channels": 1 if role == "usse" else 2,
            "stem": n["stem"], "growth": n["growth"], "layers": n["layers"], "levels": n["levels"],
            "dropout": n["dropout"]}


def make_net(cfg: dict, role: str) -> DenseUNet2D:
    """A new USSE / student network, its tumour output started at ``network.tumour_prior``."""
    net = DenseUNet2D(**net_kwargs(cfg, role))
    set_output_prior(net.head, 0 if role == "usse" else 1, cfg["network"]["tumour_prior"])
    return net


# ----------------------------------------------------------------------------- pipeline pieces


def pseudo_labels(teacher: MeanTeacher, cases, cfg, phase, device, batch=16) -> None:
    """USSE target model on the box-labelled slices of the box cases -> ``case.pseudo`` (0 on unmarked slices)."""
    for case in cases:
        if case.kind != "box":
            continue
        case.pseudo = np.zeros(case.shape, np.float32)
        ks = case.tumour_slices
        if not len(ks):
            continue
        img = torch.from_numpy(_inputs(case, phase, ks, cfg["context"])).to(device)
        probs = teacher.predict(img, case.det["usse"][ks], batch)
        case.pseudo[ks] = probs[:, 0].cpu().numpy()


@torch.no_grad()
def predict_case(net: nn.Module, policies, images_zhw: np.ndarray, cfg_like: dict, env: BoxEnv, device="cpu",
                 batch: int = 16, boxes_w: np.ndarray | None = None) -> tuple:
    """Plain-phase working volume -> (probabilities (z, C, h, w), detection boxes (z, 4) working pixels)."""
    dev = torch.device(device)
    h, w = images_zhw.shape[1:]
    if boxes_w is None:
        img_rl = torch.from_numpy(to_rl(images_zhw, env.size)).to(dev)
        union, _ = detect(policies, img_rl, env)
        boxes_w = union / np.array([env.size / w, env.size / h, env.size / w, env.size / h], np.float32)
    net = net.to(dev).eval()
    out = []
    nz = images_zhw.shape[0]
    for z0 in range(0, nz, batch):
        ks = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(slice_groups(images_zhw, ks, cfg_like["context"])).to(dev)
        out.append(torch.sigmoid(net(with_attention(x, boxes_w[ks])).float()).cpu().numpy())
    return np.concatenate(out), boxes_w


def labels_from_probs(probs_w: np.ndarray, shape_zyx, threshold: float, liver_threshold: float,
                      do_postprocess: bool = True) -> tuple:
    """Working-grid (z, 2, h, w) sigmoid maps [liver, tumour] -> (labels, tumour prob, entropy) on the input grid."""
    nz, ny, nx = shape_zyx
    p = resize_slices(torch.from_numpy(np.ascontiguousarray(probs_w)), (ny, nx)).numpy()
    liver, tumour = p[:, 0], p[:, 1]
    labels = (liver > liver_threshold).astype(np.uint8)
    labels[tumour > threshold] = 2
    if do_postprocess:
        labels = postprocess(labels)
    t = np.clip(tumour, 1e-6, 1 - 1e-6)
    entropy = -(t * np.log(t) + (1 - t) * np.log(1 - t))
    return labels, tumour.astype(np.float32), entropy.astype(np.float32)
