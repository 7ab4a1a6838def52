"""Pseudo-masks: ACoL / CAM localization maps in each box, dense CRF (torch mean-field), in-box ignore region."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...learn.slices import cut_window, slice_groups
from ...learn.training import check_cancelled
from .fpn_classifier import FPNACoLClassifier
from .config import IGNORE, TUMOUR_VALUE
from .classifier import crop_side


def dense_crf(prob: torch.Tensor, image: torch.Tensor, iterations: int = 5, gaussian_weight: float = 3.0,
              gaussian_sxy: float = 3.0, bilateral_weight: float = 5.0, bilateral_sxy: float = 20.0,
              bilateral_sintensity: float = 0.05, unary_eps: float = 1e-5, max_pixels: int = 2500,
              **_ignored) -> torch.Tensor:
    """Two-label fully connected CRF (Kraehenbuehl & Koltun 2011), mean-field inference, Potts model.

    ``prob`` (h, w) foreground probability (unaries -log p and -log(1 - p), p clipped to
    [eps, 1 - eps]); ``image`` (C, h, w) appearance features.  Kernels between all pixel pairs
    (no self term): ``exp(-|dp|^2 / 2 sxy_g^2)`` (smoothness) and ``exp(-|dp|^2 / 2 sxy_b^2 -
    |dI|^2 / 2 s_I^2)`` (appearance), each normalised symmetrically (D^-1/2 K D^-1/2, as
    pydensecrf's default) and weighted.  A crop of more than ``max_pixels`` is solved on a shrunk
    grid (distances still in original pixels) and Q resized back.  Returns Q(foreground) (h, w).
    """
    h, w = prob.shape
    scale = min(1.0, math.sqrt(max_pixels / (h * w)))
    gh, gw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    p, img = prob.float(), image.float()
    if (gh, gw) != (h, w):
        p = F.interpolate(p[None, None], size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        img = F.interpolate(img[None], size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)[0]
    p = p.clamp(unary_eps, 1 - unary_eps).flatten()
    unary = -torch.log(torch.stack([1 - p, p], dim=1))              # (n, 2)
    ys = (torch.arange(gh, dtype=torch.float32, device=p.device) + 0.5) * (h / gh)
    xs = (torch.arange(gw, dtype=torch.float32, device=p.device) + 0.5) * (w / gw)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    feat = img.reshape(img.shape[0], -1).t()
    d_pos = torch.cdist(pos, pos).pow_(2)
    kernels = [(gaussian_weight, torch.exp(-d_pos / (2 * gaussian_sxy ** 2))),
               (bilateral_weight, torch.exp(-d_pos / (2 * bilateral_sxy ** 2)
                                            - torch.cdist(feat, feat).pow_(2) / (2 * bilateral_sintensity ** 2)))]
    del d_pos
    kernel = torch.zeros_like(kernels[0][1])
    for weight, k in kernels:
        k.fill_diagonal_(0.0)
        norm = k.sum(dim=1).clamp_min(1e-20).rsqrt()
        kernel += weight * (norm[:, None] * k * norm[None, :])
    del kernels
    q = torch.softmax(-unary, dim=1)
    for _ in range(int(iterations)):
        msg = kernel @ q                                             # (n, 2)
        pairwise = msg.sum(dim=1, keepdim=True) - msg               # Potts: the mass of the other label
        q = torch.softmax(-unary - pairwise, dim=1)
    q = q[:, 1].reshape(gh, gw)
    if (gh, gw) != (h, w):
        q = F.interpolate(q[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return q


@torch.no_grad()
def box_maps_of(net: FPNACoLClassifier, image_w: np.ndarray, rects: dict, crop: int = 128, context: int = 1,
                batch: int = 8, device="cpu") -> list:
    """Fused localization maps of every box: [(slice, rect (4,) int, map (S, S) float32 numpy)].

    Each box is classified in a ``crop`` window centred on it (larger when the box needs it), as
    in training; the map is the ACoL fusion (branch A alone for a CAM network).
    """
    dev = torch.device(device)
    net = net.to(dev).eval()
    by_side = {}
    for z, rs in rects.items():
        for r in rs:
            by_side.setdefault(crop_side(r, crop), []).append((int(z), np.asarray(r).astype(np.int64)))
    out = []
    for side, jobs in sorted(by_side.items()):
        for start in range(0, len(jobs), batch):
            group = jobs[start:start + batch]
            images, rois = [], []
            for b, (z, r) in enumerate(group):
                x0 = int((r[0] + r[2]) // 2 - side // 2)
                y0 = int((r[1] + r[3]) // 2 - side // 2)
                images.append(cut_window(slice_groups(image_w, [z], context)[0], y0, x0, side))
                rois.append([b, r[0] - x0, r[1] - y0, r[2] - x0, r[3] - y0])
            x = torch.from_numpy(np.stack(images)).to(dev)
            fused = net.localization(net(x, torch.tensor(rois, dtype=torch.float32, device=dev))).float().cpu().numpy()
            out += [(z, r, fused[n]) for n, (z, r) in enumerate(group)]
    return out


def mine_pseudo(net, image_w: np.ndarray, rects: dict, cfg: dict, device="cpu", progress=None,
                maps: list | None = None) -> tuple:
    """Working-grid pseudo-mask of one volume: (tumour probability (z, h, w) float32, in-box (z, h, w) bool).

    The probability is the CRF's Q(tumour) inside the boxes (max over overlapping boxes), 0 outside.
    ``maps`` (from ``box_maps_of``) can be given to reuse the classifier pass.
    """
    crf = cfg["crf"]
    prob = np.zeros(image_w.shape, np.float32)
    inbox = np.zeros(image_w.shape, bool)
    if cfg["classifier"]["mode"] == "box":
        for z, rs in rects.items():
            for x0, y0, x1, y1 in np.asarray(rs, np.int64):
                prob[z, y0:y1, x0:x1] = 1.0
                inbox[z, y0:y1, x0:x1] = True
        return prob, inbox
    if maps is None and cfg["classifier"]["mode"] == "centre":
        maps = [(z, np.asarray(r).astype(np.int64), centre_prior()) for z, rs in rects.items() for r in rs]
    elif maps is None:
        maps = box_maps_of(net, image_w, rects, cfg["classifier"]["crop"], cfg["context"],
                           cfg["segmenter"]["infer_batch"], device)
    for n, (z, r, fmap) in enumerate(maps):
        check_cancelled(progress)
        x0, y0, x1, y1 = (int(v) for v in r)
        q = box_probability(fmap, image_w[z, y0:y1, x0:x1], crf)
        prob[z, y0:y1, x0:x1] = np.maximum(prob[z, y0:y1, x0:x1], q)
        inbox[z, y0:y1, x0:x1] = True
    return prob, inbox


def centre_prior(size: int = 7, sigma: float = 0.5) -> np.ndarray:
    """A centred Gaussian in [0, 1] (``sigma`` in half-widths of the box): the ``centre`` control's map."""
    t = (np.arange(size) - (size - 1) / 2) / ((size - 1) / 2)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return ((g - g.min()) / (g.max() - g.min())).astype(np.float32)


def calibrate_fill(m: torch.Tensor, fill: float) -> torch.Tensor:
    """``m ** g`` with ``g`` (bisection on log2 g in [-7, 7]) such that its mean is ``fill``.

    The min-max normalised class map covers the most discriminative part of a tumour (a third
    of the box, where tumours fill two thirds); this calibrates the CRF unary to a filling rate
    while keeping the map's ranking.  An all-zero map becomes a flat ``fill``.
    """
    if float(m.max()) <= 0:
        return torch.full_like(m, fill)
    lo, hi = -7.0, 7.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if float((m ** (2.0 ** mid)).mean()) > fill:
            lo = mid
        else:
            hi = mid
    return m ** (2.0 ** ((lo + hi) / 2))


def box_probability(fused_map: np.ndarray, crop_image: np.ndarray, crf: dict) -> np.ndarray:
    """The fused map resized to the box (bilinear), calibrated to ``fill_prior`` -> dense CRF on the box
    crop -> Q(tumour) (h, w)."""
    h, w = crop_image.shape
    if min(h, w) < int(crf["min_side"]):
        return np.ones((h, w), np.float32)
    m = torch.from_numpy(np.asarray(fused_map, np.float32))[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    if crf.get("fill_prior") is not None:
        m = calibrate_fill(m, float(crf["fill_prior"]))
    if int(crf["iterations"]) == 0:
        return m.numpy()
    return dense_crf(m, torch.from_numpy(np.asarray(crop_image, np.float32))[None], **crf).numpy()


def pseudo_labels(prob: np.ndarray, inbox: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 (z, h, w): 2 tumour, 255 in-box background (ignored by the loss), 0 outside every box."""
    out = np.zeros(prob.shape, np.uint8)
    out[inbox] = IGNORE
    out[inbox & (prob > threshold)] = TUMOUR_VALUE
    return out
