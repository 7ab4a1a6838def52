"""couinaud training stages' shared loop, losses and segmentation batches."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...learn.slices import PreparedCase
from ...learn.training import check_cancelled, lr_at, optimizer_step, set_lr, soft_cross_entropy


def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes) -> torch.Tensor:
    """Mean over ``classes`` of 1 - batch Dice between softmax and (soft) one-hot targets."""
    p = torch.softmax(logits.float(), dim=1)
    losses = []
    for c in classes:
        inter = (p[:, c] * target[:, c]).sum()
        losses.append(1.0 - (2 * inter + 1.0) / (p[:, c].sum() + target[:, c].sum() + 1.0))
    return torch.stack(losses).mean()


def run_stage(stage, net, opt, next_batch, loss_fn, scfg, total, start=0, save=None, every=50, progress=None,
              curves=None):
    """Optimisation steps ``start..total`` of one stage; ``save(stage, step)`` checkpoints on the way."""
    net.train()
    curve = [] if curves is None else curves.setdefault(stage, [])
    for step in range(start, total):
        check_cancelled(progress)
        set_lr(opt, lr_at(step, total, scfg))
        loss = loss_fn(net, next_batch())
        value = optimizer_step(opt, loss, stage, step)
        if (step + 1) % 10 == 0 or step + 1 == total:
            curve.append([step + 1, round(value, 5)])
        if progress is not None:
            progress.update(stage, step + 1, total, loss=round(value, 4))
        if save is not None and (step + 1) % every == 0 and step + 1 < total:
            save(stage, step + 1)
    net.eval()
    if save is not None and total > start:
        save(stage, total)


def _crop_size(cases, want: int) -> int:
    biggest = max(max(c.image.shape[1:]) for c in cases)
    return int(math.ceil(min(want, biggest) / 16) * 16)


def _seg_batch_fn(sampler, device):
    dev = _device(device)

    def next_batch():
        b = sampler.sample()
        return b["image"].to(dev), b["target"].to(dev)
    return next_batch


def _seg_loss(dice_weight: float, classes):
    def loss_fn(net, batch):
        x, target = batch
        logits = net(x)
        loss = soft_cross_entropy(logits, target)            # Eq. 1
        if dice_weight:
            loss = loss + dice_weight * soft_dice_loss(logits, target, classes)
        return loss
    return loss_fn


def prepared_case(case_id, image, liver, tumour) -> PreparedCase:
    """A PreparedCase with one-hot targets; its "boxes" are the liver / tumour masks so the sampler's
    crops centre on the liver (the segmenter has no attention: they are never a network input)."""
    tumour = tumour & liver
    target = np.stack([~liver, liver & ~tumour, tumour], axis=1).astype(np.float16)
    maps = np.stack([liver, tumour], axis=1).astype(np.uint8)
    return PreparedCase(case_id, image, target, maps, kind="weak")
