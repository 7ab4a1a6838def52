"""couinaud liver: the liver net (trained on masked cases) or another model's liver."""

from __future__ import annotations

import numpy as np
import torch

from ...data.volume import Volume
from ...learn.modelstore import LoadedModel
from ...learn.postprocess import fill_holes, largest_component
from ...learn.slices import Sampler, slice_groups
from ...learn.training import check_cancelled
from .cases import labels_on_working
from .stages import _crop_size, _device, _seg_batch_fn, _seg_loss, prepared_case, run_stage


def train_liver_net(net, opt, loaded_masked: list, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    """Liver-only net (background / liver; the tumour counts as liver) on the masked cases."""
    cases = [prepared_case(cid, d["image"], d["mask"] >= 1, np.zeros_like(d["mask"], bool)) for cid, d in loaded_masked]
    scfg = cfg["liver_net"]
    sampler = Sampler(cases, _crop_size(cases, scfg["crop"]), scfg["batch_size"], rng, cfg["context"])
    run_stage("liver_net", net, opt, _seg_batch_fn(sampler, device), _seg_loss(scfg.get("dice_weight", 1.0), (1,)),
              scfg, scfg["steps"], start, save, cfg["checkpoint_every"], progress, curves)


@torch.inference_mode()
def predict_softmax(net, image_w: np.ndarray, context: int = 1, batch: int = 8, device="cpu",
                    progress=None, stage: str = "segment") -> np.ndarray:
    """Softmax (z, C, h, w) of a slice network over every three-slice group of a working volume."""
    dev = _device(device)
    net = net.to(dev).eval()
    nz = image_w.shape[0]
    out = None
    for z0 in range(0, nz, batch):
        check_cancelled(progress)
        centres = np.arange(z0, min(z0 + batch, nz))
        x = torch.from_numpy(np.ascontiguousarray(slice_groups(image_w, centres, context))).to(dev)
        p = torch.softmax(net(x).float(), dim=1).cpu().numpy()
        if out is None:
            out = np.empty((nz,) + p.shape[1:], np.float32)
        out[centres] = p
        if progress is not None:
            progress.update(stage, int(centres[-1]) + 1, nz)
    return out


def liver_from_softmax(probs: np.ndarray) -> np.ndarray:
    """Largest liver component, holes filled, from a (z, C, h, w) softmax (classes >= 1 are liver)."""
    return fill_holes(largest_component(probs[:, 1:].sum(axis=1) >= 0.5))


def liver_from_model(model: LoadedModel, image: Volume, size, device) -> np.ndarray:
    """Working-grid liver of one image from another project model (labels >= 1)."""
    from .. import get

    result = get(model.recipe).segment(model, {"image": image}, device=device)
    return labels_on_working((np.asarray(result.labels.array) >= 1).astype(np.uint8), size) >= 1
