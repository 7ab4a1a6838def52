"""CouinaudNet: the network, its tumour-injection sampler and training, its pseudo-labels on pathological slices."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ...learn.modelstore import register_network
from ...learn.networks.unet2d import BoxAttentionUNet2D
from ...learn.slices import cut_window, slice_groups
from .refine import plr
from .injection import inject_tumour
from .cases import WeakCase
from .stages import _crop_size, _device, run_stage, soft_dice_loss


@register_network("CouinaudNet")
class CouinaudNet(nn.Module):
    """(B, 2c+1, H, W) slices + (B, 1, H, W) region mask -> (B, 2, H, W) logits (background, tumour)."""

    def __init__(self, context: int = 1, channels=(8, 16, 32, 64)):
        super().__init__()
        self.unet = BoxAttentionUNet2D(in_channels=2 * int(context) + 2, out_channels=2, channels=list(channels))

    def forward(self, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([image, region.to(image.dtype)], dim=1))



# ----------------------------------------------------------------------------- CouinaudNet
def healthy_pool(cases: list, labels: dict, min_px: int) -> list:
    """(case index, slice) of every slice labelled healthy that holds at least ``min_px`` liver pixels."""
    pool = []
    for i, case in enumerate(cases):
        lab = labels[case.case_id]
        area = case.liver.sum(axis=(1, 2))
        for z in np.flatnonzero((lab == 0) & (area >= min_px)):
            pool.append((i, int(z)))
    return pool


class InjectionSampler:
    """CouinaudNet batches: a healthy slice, a random present segment (or the whole liver), a synthetic
    tumour injected there (consistent over the three slices); input (slices, region), target mask."""

    def __init__(self, cases, pool, crop, batch_size, rng, cfg):
        if not pool:
            raise InputError("no healthy liver slice to train CouinaudNet on: add healthy cases "
                             "(couinaud [] or volume_label healthy) or enable ILR")
        self.cases, self.pool, self.crop, self.batch_size, self.rng = cases, pool, int(crop), int(batch_size), rng
        self.context = int(cfg["context"])
        self.inj = cfg["injection"]
        self.pixel_mm = float(cfg["spacing_mm"])
        lo, hi = cfg["hu_window"]
        self.hu_per_unit = float(hi - lo)

    def one(self):
        rng, crop = self.rng, self.crop
        for _ in range(20):
            ci, z = self.pool[int(rng.integers(len(self.pool)))]
            case = self.cases[ci]
            cm = case.couinaud[z]
            segs, counts = np.unique(cm[cm > 0], return_counts=True)
            segs = segs[counts >= self.inj["min_segment_px"]]
            if rng.random() < self.inj["whole_liver_prob"] or not len(segs):
                seg = 0
                if (cm > 0).sum() < self.inj["min_segment_px"]:
                    continue
            else:
                seg = int(segs[rng.integers(len(segs))])
            region = cm > 0 if seg == 0 else cm == seg
            ys, xs = np.nonzero(region)
            n = rng.integers(len(ys))
            y0 = int(ys[n] + rng.integers(-crop // 4, crop // 4 + 1)) - crop // 2
            x0 = int(xs[n] + rng.integers(-crop // 4, crop // 4 + 1)) - crop // 2
            idx = np.clip(np.arange(z - self.context, z + self.context + 1), 0, case.image.shape[0] - 1)
            img = cut_window(case.image[idx], y0, x0, crop)
            cms = cut_window(case.couinaud[idx], y0, x0, crop)
            if not ((cms[self.context] == seg) if seg else (cms[self.context] > 0)).any():
                continue
            img, mask = inject_tumour(img, cms, seg, rng, self.pixel_mm, case.slice_mm, self.hu_per_unit,
                                      self.inj["radius_mm"], self.inj["contrast_hu"])
            reg = (cms[self.context] == seg) if seg else (cms[self.context] > 0)
            return img, reg, mask[self.context]
        raise InputError("could not place a synthetic tumour in 20 tries: the healthy liver slices are too small")

    def sample(self):
        imgs, regs, tgts = [], [], []
        for _ in range(self.batch_size):
            img, reg, tgt = self.one()
            flips = [a for a in (-1, -2) if self.rng.random() < 0.5]
            if flips:
                img, reg, tgt = (np.flip(a, axis=flips) for a in (img, reg, tgt))
            imgs.append(np.ascontiguousarray(img))
            regs.append(np.ascontiguousarray(reg)[None])
            tgts.append(np.ascontiguousarray(tgt))
        return (torch.from_numpy(np.stack(imgs)).float(), torch.from_numpy(np.stack(regs)).float(),
                torch.from_numpy(np.stack(tgts)).long())


def train_couinaudnet(net, opt, cases, labels, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    """CouinaudNet on the healthy slices of ``labels`` (case id -> slice labels) with injected tumours."""
    scfg = cfg["couinaudnet"]
    pool = healthy_pool(cases, labels, cfg["injection"]["min_segment_px"])
    sampler = InjectionSampler(cases, pool, _crop_size(cases, scfg["crop"]), scfg["batch_size"], rng, cfg)
    dev = _device(device)

    def next_batch():
        x, r, t = sampler.sample()
        return x.to(dev), r.to(dev), t.to(dev)

    def loss_fn(net, batch):
        x, r, t = batch
        logits = net(x, r)
        onehot = F.one_hot(t, 2).permute(0, 3, 1, 2).float()
        return F.cross_entropy(logits.float(), t) + soft_dice_loss(logits, onehot, (1,))

    run_stage("couinaudnet", net, opt, next_batch, loss_fn, scfg, scfg["steps"], start, save,
              cfg["checkpoint_every"], progress, curves)
    return len(pool)


@torch.inference_mode()
def couinaudnet_probs(net, case: WeakCase, slice_labels, context=1, batch=8, device="cpu",
                      clip: bool = True) -> np.ndarray:
    """CouinaudNet tumour probability o_k on the pathological slices.

    ``clip`` (default): zero outside the labelled region, so a slice whose region is empty gets
    none.  ``clip=False`` is the vanilla CouinaudNet of the paper's ablation: the network's raw
    output inside the liver, also on pathological slices whose labelled segment is absent (its
    region input is then empty) -- the label noise that ILR (Eq. 2) removes.
    """
    dev = _device(device)
    net = net.to(dev).eval()
    out = np.zeros(case.image.shape, np.float32)
    zs = [z for z in np.flatnonzero(np.asarray(slice_labels) > 0)
          if (case.region(z).any() if clip else case.liver[z].any())]
    for b0 in range(0, len(zs), batch):
        centres = np.asarray(zs[b0:b0 + batch])
        regions = np.stack([case.region(z) for z in centres])
        x = torch.from_numpy(np.ascontiguousarray(slice_groups(case.image, centres, context))).to(dev)
        r = torch.from_numpy(regions[:, None].astype(np.float32)).to(dev)
        p = torch.softmax(net(x, r).float(), dim=1)[:, 1].cpu().numpy()
        out[centres] = p * (regions if clip else case.liver[centres])
    return out


def pseudo_masks(probs: np.ndarray, cfg, use_plr: bool) -> tuple:
    """(tumour masks, CI or None) from CouinaudNet probabilities: Eq. 3, or Eq. 3-6 with PLR."""
    r = cfg["refine"]
    if use_plr:
        return plr(probs, r["c"], r["tau"])
    return probs >= r["tau"], None
