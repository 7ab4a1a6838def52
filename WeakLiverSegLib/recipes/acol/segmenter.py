"""The segmenter's target encoding, masked Dice loss and poly learning rate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import IGNORE, TUMOUR_VALUE


def encode_target(labels: np.ndarray) -> np.ndarray:
    """(z, h, w) 0 / 2 / 255 -> (z, 3, h, w) one-hot over [background, ignored, tumour] for ``slices.Sampler``.

    The sampler's middle class (its "liver") carries the ignore region, so its scaling / flips /
    padding (padding = background) apply to it like to the rest.
    """
    out = np.zeros((labels.shape[0], 3) + labels.shape[1:], np.float32)
    out[:, 0] = labels == 0
    out[:, 1] = labels == IGNORE
    out[:, 2] = labels == TUMOUR_VALUE
    return out


def decode_target(target: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sampler target -> (B, H, W) int64: 0 background, 1 tumour, 255 ignored."""
    cls = target.argmax(dim=1)
    out = torch.zeros_like(cls)
    out[cls == 2] = 1
    out[cls == 1] = IGNORE
    return out


def masked_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ce_weight: float = 0.0,
                     include_background: bool = True) -> torch.Tensor:
    """Soft Dice (over the batch) of a 2-class net, pixels labelled 255 excluded (+ optional CE).

    ``include_background``: mean of the background and tumour Dice.  The tumour Dice alone is a
    constant 1 with no gradient on a batch without tumour, so it cannot teach "no tumour here".
    """
    from monai.losses import MaskedDiceLoss

    valid = (labels != IGNORE)
    target = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), 2).permute(0, 3, 1, 2).float()
    loss = MaskedDiceLoss(include_background=bool(include_background), softmax=True, batch=True)(
        logits.float(), target, mask=valid[:, None].float())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    return loss


def poly_lr(step: int, total: int, lr: float, power: float = 0.9) -> float:
    """``lr (1 - step / total) ** power`` (DeepLab's poly schedule)."""
    return float(lr) * (1.0 - min(step, total) / max(total, 1)) ** float(power)
