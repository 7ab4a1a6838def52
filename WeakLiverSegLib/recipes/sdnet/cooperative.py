"""The paper's pieces: disagreement region and losses (adaptive mask fine-tuning), sharpened dynamic
pseudo-labels from the better network, one SD-Net (or single VNet) training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from .config import DEFAULTS, DISAGREEMENT_LOSSES


def disagreement_region(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Eq. 3: boolean ``(B, 1, ...)`` mask of the voxels where the two predictions' argmax differ.

    ``p1`` / ``p2``: ``(B, C, ...)`` probabilities or logits (argmax is the same for both).
    """
    if p1.shape != p2.shape:
        raise ValueError(f"predictions differ in shape: {tuple(p1.shape)} vs {tuple(p2.shape)}")
    return (p1.argmax(dim=1, keepdim=True) != p2.argmax(dim=1, keepdim=True))


def one_hot(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """``(B, 1, ...)`` integer labels -> ``(B, C, ...)`` float one-hot."""
    return F.one_hot(labels[:, 0].long(), n_classes).movedim(-1, 1).float()


def disagreement_mse(prob: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean squared error between ``prob`` and ``target`` (both ``(B, C, ...)``) over ``region``.

    The mean runs over the region's voxels and the classes; an empty region gives 0 (still a
    tensor attached to the graph).
    """
    mask = region.to(prob.dtype)
    n = mask.sum() * prob.shape[1]
    return ((prob - target) ** 2 * mask).sum() / n.clamp_min(1.0)


def disagreement_wce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Table 2's alternative: class-balanced cross-entropy over ``region`` (weights = inverse class
    frequency of ``target`` inside the region); 0 for an empty region."""
    mask = region.to(logits.dtype)
    counts = (target * mask).flatten(2).sum(dim=(0, 2))              # voxels per class in the region
    present = counts > 0
    weight = torch.where(present, counts.sum() / (present.sum().clamp_min(1) * counts.clamp_min(1.0)),
                         torch.zeros_like(counts)).detach()
    logp = F.log_softmax(logits.float(), dim=1)
    w = (target * weight.view(1, -1, *([1] * (logits.dim() - 2)))).sum(dim=1, keepdim=True) * mask
    return -(w * (target * logp).sum(dim=1, keepdim=True)).sum() / w.sum().clamp_min(1e-12)


_DICE_CE = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
_DICE = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")


def dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 lines 5-8: the liver Dice loss averaged over the labelled samples (scalar)."""
    return _DICE(logits.float(), labels).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, region: torch.Tensor | None,
                    kind: str = "mse", weight: float = 1.0) -> tuple:
    """Eq. 7: ``L_CE + L_Dice + L_MSE`` on the labelled half -> (total, {"dice_ce", "region"}).

    ``labels``: ``(B, 1, ...)`` 0/1; ``region``: the disagreement mask (None or ``kind="none"``:
    no region term); ``kind`` ``"wce"`` swaps the MSE for class-balanced CE (the ablation).
    """
    base = _DICE_CE(logits.float(), labels)
    if region is None or kind == "none":
        extra = logits.new_zeros(())
    elif kind == "mse":
        extra = disagreement_mse(torch.softmax(logits.float(), dim=1), one_hot(labels, logits.shape[1]), region)
    elif kind == "wce":
        extra = disagreement_wce(logits, one_hot(labels, logits.shape[1]), region)
    else:
        raise ValueError(f"disagreement loss must be one of {DISAGREEMENT_LOSSES}, got {kind!r}")
    return base + weight * extra, {"dice_ce": float(base.detach()), "region": float(extra.detach())}


def sharpen(p: torch.Tensor, T: float = 0.1, dim: int = 1) -> torch.Tensor:
    """Algorithm 1 lines 11/14: ``P^(1/T) / sum_c P_c^(1/T)`` over the class axis ``dim``.

    For two classes this is the paper's ``P^(1/T) / (P^(1/T) + (1-P)^(1/T))``; computed in log
    space so T = 0.1 does not underflow.
    """
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    return torch.softmax(torch.log(p.clamp_min(1e-12)) / T, dim=dim)


def pick_teacher(dice_loss_a, dice_loss_b) -> int:
    """Algorithm 1 line 9: 0 (network a teaches) when ``dice_loss_a < dice_loss_b``, else 1."""
    return 0 if float(dice_loss_a) < float(dice_loss_b) else 1


def unsupervised_mse(prob: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Eq. 8: MSE between the student's softmax and the (detached) sharpened pseudo-label."""
    return F.mse_loss(prob, pseudo.detach())


def sdnet_step(nets: dict, opts: dict, x_l, y_l, x_u=None, cfg: dict | None = None) -> dict:
    """One SD-Net optimisation step of both networks; returns the losses and the teacher.

    ``nets`` / ``opts``: ``{"vnet", "resvnet"}``; ``x_l`` ``(B, 1, ...)`` images with labels ``y_l``
    ``(B, 1, ...)`` 0/1; ``x_u`` unlabelled images or None (no unsupervised term).
    """
    cfg = cfg or DEFAULTS
    names = ("vnet", "resvnet")
    n_l = x_l.shape[0]
    x = x_l if x_u is None or x_u.shape[0] == 0 else torch.cat([x_l, x_u])
    logits = {k: nets[k](x) for k in names}                                   # Eq. 1-2
    lab = {k: logits[k][:n_l] for k in names}
    region = disagreement_region(lab["vnet"].detach(), lab["resvnet"].detach())   # Eq. 3
    losses, parts = {}, {}
    for k in names:
        losses[k], parts[k] = supervised_loss(lab[k], y_l, region, cfg["disagreement_loss"],
                                              float(cfg["disagreement_weight"]))      # Eq. 7
    with torch.no_grad():
        dice = {k: float(dice_loss(lab[k], y_l)) for k in names}
    teacher = pick_teacher(dice["vnet"], dice["resvnet"])
    sup = {k: float(losses[k].detach()) for k in names}
    uns = None
    if x.shape[0] > n_l:
        t_name, s_name = names[teacher], names[1 - teacher]
        with torch.no_grad():
            pseudo = sharpen(torch.softmax(logits[t_name][n_l:].float(), dim=1), float(cfg["temperature"]))
        uns = unsupervised_mse(torch.softmax(logits[s_name][n_l:].float(), dim=1), pseudo)   # Eq. 8
        losses[s_name] = losses[s_name] + float(cfg["unsupervised_weight"]) * uns
    total = losses["vnet"] + losses["resvnet"]
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    total.backward()
    for opt in opts.values():
        opt.step()
    return {"loss": float(total.detach()), "sup_vnet": sup["vnet"], "sup_resvnet": sup["resvnet"],
            "dice_vnet": dice["vnet"], "dice_resvnet": dice["resvnet"], "teacher": names[teacher],
            "unsup": None if uns is None else float(uns.detach()),
            "region_fraction": float(region.float().mean()), "region_loss_vnet": parts["vnet"]["region"]}


def vnet_step(net, opt, x_l, y_l) -> dict:
    """One step of the single-VNet baseline: CE + Dice on the labelled patches."""
    loss, _ = supervised_loss(net(x_l), y_l, None, "none")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach())}
