"""Uncertainty-Sifting Self-Ensembling (USSE): a mean teacher whose self-consistency is masked by a
multi-scale uncertainty (the WSTS paper, section 3.1.2, Eq. 18-20).

* Online and target networks (the same Dense U-Net); the target's weights are the exponential
  moving average of the online ones (``beta`` 0.99), updated after every online step.
* Input: image channel(s) + the hard attention map of the detection box, with Gaussian noise
  (clipped to [-clip, clip], the paper's [-0.1, 0.1]) on the image channels.
* Loss (Eq. 18): Dice (+ optional ``bce`` x cross-entropy, see ``seg_loss``) on the pixel-labelled samples + ``gamma(t)`` x self-consistency (Eq. 19):
  the squared difference of the online and target tumour probabilities, averaged over the
  pixels whose uncertainty ``u`` is below ``H``.
* ``u`` (Eq. 20): the target model sees nine inputs whose attention boxes are the detection
  box at sizes x1, x1.2, x1.4 and aspect ratios 1:1, 1:2, 2:1 (area kept), each with its own
  noise; ``u`` is the predictive entropy of their mean ``mu`` (the binary entropy
  ``-mu log mu - (1 - mu) log(1 - mu)``: the paper's ``-mu log mu`` summed over tumour and
  background).  ``H = beta' u_max + (1 - beta') u_min`` per input, ``beta'`` warming up from 0
  (nothing passes) to 1 (all but the most uncertain pixels pass).
* ``gamma`` and ``beta'`` follow the exponential ramp-up ``exp(-5 (1 - t)^2)`` of Laine & Aila,
  and are exactly 0 at the first step.
* ``uncertainty="none"`` is the plain self-ensembling (SE) of the paper's control experiments.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from .rl_boxes import attention_maps

SIZES = (1.0, 1.2, 1.4)
RATIOS = (1.0, 0.5, 2.0)          # width : height
UNCERTAINTY_KINDS = ("multiscale", "none")


def ramp_up(step: int, total: int) -> float:
    """Exponential ramp-up from 0 (step 0) to 1 (step >= total)."""
    if total <= 0 or step >= total:
        return 1.0
    if step <= 0:
        return 0.0
    t = step / total
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def nine_boxes(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) (cx, cy, w, h) -> (9, N, 4): sizes x1 / x1.2 / x1.4 times ratios 1:1 / 1:2 / 2:1 (area kept)."""
    b = np.asarray(boxes, np.float32)
    out = []
    for s in SIZES:
        for r in RATIOS:
            v = b.copy()
            v[:, 2] = b[:, 2] * s * math.sqrt(r)
            v[:, 3] = b[:, 3] * s / math.sqrt(r)
            out.append(v)
    return np.stack(out)


def add_noise(x: torch.Tensor, std: float, clip: float, channels: int | None = None) -> torch.Tensor:
    """Gaussian noise clipped to [-clip, clip] on the first ``channels`` channels (all when None)."""
    if std <= 0:
        return x
    c = x.shape[1] if channels is None else int(channels)
    noise = (torch.randn_like(x[:, :c]) * std).clamp(-clip, clip)
    return torch.cat([x[:, :c] + noise, x[:, c:]], dim=1)


def with_attention(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """(B, C, H, W) images + (B, 4) boxes in the images' pixel units -> (B, C + 1, H, W)."""
    att = torch.from_numpy(attention_maps(boxes, images.shape[-2], images.shape[-1])).to(images)
    return torch.cat([images, att[:, None]], dim=1)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@torch.no_grad()
def multiscale_uncertainty(net: nn.Module, images: torch.Tensor, boxes: np.ndarray, std: float, clip: float,
                           channel: int = 0) -> tuple:
    """Eq. 20: nine attention boxes, noisy inputs, target model -> (mean probability, predictive entropy)."""
    probs = []
    c = images.shape[1]
    for variant in nine_boxes(boxes):
        x = add_noise(with_attention(images, variant), std, clip, channels=c)
        probs.append(torch.sigmoid(net(x)[:, channel:channel + 1].float()))
    mu = torch.stack(probs).mean(dim=0)
    return mu, binary_entropy(mu)


def uncertainty_mask(u: torch.Tensor, beta_prime: float) -> torch.Tensor:
    """Pixels with ``u < H``, ``H = beta' u_max + (1 - beta') u_min`` per input (B, 1, H, W) bool."""
    flat = u.flatten(1)
    umax = flat.max(dim=1).values.view(-1, *([1] * (u.dim() - 1)))
    umin = flat.min(dim=1).values.view(-1, *([1] * (u.dim() - 1)))
    threshold = beta_prime * umax + (1 - beta_prime) * umin
    return u < threshold


def masked_consistency(p_online: torch.Tensor, p_target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. 19: sum(mask * (p - q)^2) / sum(mask) (0 when nothing passes)."""
    sq = (p_online - p_target).pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (m * sq).sum() / m.sum().clamp_min(1.0)


def dice_loss(p: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over the whole batch (empty slices are fine: the batch is one set)."""
    inter = (p * target).sum()
    return 1.0 - (2.0 * inter + eps) / (p.sum() + target.sum() + eps)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, bce: float = 0.0) -> torch.Tensor:
    """Dice loss of ``sigmoid(logits)`` + ``bce`` x binary cross-entropy (pixel mean).

    Pure soft Dice (the paper) with the box as hard attention has a cheap optimum in a short run:
    "tumour = the whole box", on every slice, since false positives in a mostly empty batch cost
    Dice little.  The cross-entropy term supervises every pixel (outside the box and on
    tumour-free slices too) and keeps the probabilities calibrated for a fixed threshold.
    """
    target = target.to(logits.dtype)
    loss = dice_loss(torch.sigmoid(logits), target)
    if bce > 0:
        loss = loss + bce * nn.functional.binary_cross_entropy_with_logits(logits, target)
    return loss


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, beta: float) -> None:
    """target = beta * target + (1 - beta) * online (parameters); buffers (batch-norm statistics) likewise."""
    for pt, p in zip(target.parameters(), online.parameters()):
        pt.mul_(beta).add_(p.detach(), alpha=1.0 - beta)
    for bt, b in zip(target.buffers(), online.buffers()):
        if bt.dtype.is_floating_point:
            bt.mul_(beta).add_(b.detach(), alpha=1.0 - beta)
        else:
            bt.copy_(b)


class MeanTeacher:
    """Online + EMA target model trained with Eq. 18 (Dice + ramped, uncertainty-masked consistency).

    ``step(batch, t, total)``: ``batch`` = {"image": (B, C, H, W) tensor, "box": (B, 4) numpy
    boxes in pixels of H x W, "target": (B, 1, H, W) tumour target (any values where not
    labelled), "labelled": (B,) bool}.
    """

    def __init__(self, online: nn.Module, optimizer: torch.optim.Optimizer, ema: float = 0.99,
                 noise_std: float = 0.05, noise_clip: float = 0.1, consistency: float = 1.0,
                 uncertainty: str = "multiscale", rampup: float = 0.5, warmup: float = 0.5, bce: float = 0.0):
        if uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {uncertainty!r}")
        self.online = online
        self.target = copy.deepcopy(online).requires_grad_(False)
        self.opt = optimizer
        self.ema, self.noise_std, self.noise_clip = float(ema), float(noise_std), float(noise_clip)
        self.consistency, self.uncertainty = float(consistency), uncertainty
        self.rampup, self.warmup = float(rampup), float(warmup)
        self.bce = float(bce)

    def step(self, batch: dict, t: int, total: int) -> dict:
        self.online.train()
        self.target.eval()
        images, boxes = batch["image"], batch["box"]
        c = images.shape[1]
        x = with_attention(images, boxes)
        logits = self.online(add_noise(x, self.noise_std, self.noise_clip, c))[:, :1].float()
        p_on = torch.sigmoid(logits)
        lab = batch["labelled"]
        sup = torch.zeros((), device=images.device)
        if bool(lab.any()):
            sup = seg_loss(logits[lab], batch["target"][lab], self.bce)
        gamma = self.consistency * ramp_up(t, int(self.rampup * total))
        beta_p = ramp_up(t, int(self.warmup * total))
        with torch.no_grad():
            p_t = torch.sigmoid(self.target(add_noise(x, self.noise_std, self.noise_clip, c))[:, :1].float())
            mask = None
            if self.uncertainty == "multiscale":
                _, u = multiscale_uncertainty(self.target, images, boxes, self.noise_std, self.noise_clip)
                mask = uncertainty_mask(u, beta_p)
        cons = masked_consistency(p_on, p_t, mask)
        loss = sup + gamma * cons
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.target, self.online, self.ema)
        return {"loss": float(loss.detach()), "dice_loss": float(sup.detach()), "consistency": float(cons.detach()),
                "gamma": gamma, "beta_prime": beta_p,
                "kept": 1.0 if mask is None else float(mask.float().mean())}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, boxes: np.ndarray, batch: int = 32) -> torch.Tensor:
        """Tumour probability (B, 1, H, W) of the target model (no noise)."""
        self.target.eval()
        out = []
        for b0 in range(0, images.shape[0], batch):
            x = with_attention(images[b0:b0 + batch], boxes[b0:b0 + batch])
            out.append(torch.sigmoid(self.target(x)[:, :1].float()))
        return torch.cat(out) if out else images.new_zeros((0, 1) + tuple(images.shape[-2:]))
