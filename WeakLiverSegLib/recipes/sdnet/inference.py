"""sdnet inference: sliding-window liver probability of the VNet / ResVNet pair, ``segment``, ``liver_mask``."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ...data.imageio import resample_to
from ...data.volume import Volume
from ...errors import InputError, ModelError
from ...learn.modelstore import LoadedModel, load_model
from ...learn.postprocess import fill_holes, largest_component
from ...learn.training import SegmentResult, check_cancelled
from .config import NAME
from .grid import image_to_working


def _model_input(meta: dict) -> dict:
    inp = meta.get("input", {}) or {}
    try:
        return {"phases": list(inp.get("phases") or []), "hu_window": [float(v) for v in inp["hu_window"]],
                "spacing_mm": [float(v) for v in inp["spacing_mm"]], "patch": [int(v) for v in inp["patch"]],
                "overlap": float(inp.get("overlap", 0.25)), "inference": str(inp.get("inference", "mean")),
                "postprocess": bool(inp.get("postprocess", True))}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model.json input: missing or bad field ({exc})") from None


def _pick_image(images: dict, phases) -> Volume:
    if not images:
        raise InputError("segment: no input image")
    for want in phases:
        if want in images:
            return images[want]
    if len(images) == 1:
        return next(iter(images.values()))
    raise InputError(f"--input: this model reads one of the phases {phases}; got phases {sorted(map(str, images))}")


def _members(networks: dict, which: str) -> list:
    if which == "mean":
        return [networks[k] for k in ("vnet", "resvnet") if k in networks]
    if which not in networks:
        raise InputError(f"inference member {which!r} is not in this model (it has {sorted(networks)})")
    return [networks[which]]


@torch.inference_mode()
def working_probabilities(nets: list, work: np.ndarray, patch_zyx, device="cpu", overlap=0.25, sw_batch=4,
                          progress=None) -> np.ndarray:
    """Liver probability (z, y, x) float32 of a windowed working-grid volume: MONAI sliding window,
    softmax averaged over ``nets``."""
    dev = torch.device(device)
    nets = [net.to(dev).eval() for net in nets]
    check_cancelled(progress)

    def predictor(x):
        return sum(torch.softmax(net(x).float(), dim=1) for net in nets) / len(nets)

    x = torch.from_numpy(np.ascontiguousarray(work, dtype=np.float32))[None, None].to(dev)
    probs = sliding_window_inference(x, tuple(patch_zyx), sw_batch, predictor, overlap=overlap, mode="gaussian")
    return probs[0, 1].float().cpu().numpy()


def predict_liver_probability(model: LoadedModel, image: Volume, device="cpu", member=None, progress=None) -> Volume:
    """The liver probability of ``image`` on its own grid (float32 Volume)."""
    inp = _model_input(model.meta)
    work, grid = image_to_working(image, inp["spacing_mm"], inp["hu_window"])
    nets = _members(model.networks, member or inp["inference"])
    prob = working_probabilities(nets, work, inp["patch"][::-1], device, inp["overlap"], progress=progress)
    back = resample_to(grid.with_array(prob.astype(np.float32)), image, "linear", default=0.0)
    return image.with_array(np.clip(back.array, 0.0, 1.0).astype(np.float32))


def labels_from_probability(prob: np.ndarray, do_postprocess: bool = True) -> np.ndarray:
    """0/1 uint8 liver labels: probability >= 0.5, then (optionally) the largest component, holes filled."""
    liver = np.asarray(prob) >= 0.5
    if do_postprocess:
        liver = fill_holes(largest_component(liver))
    return liver.astype(np.uint8)


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Predictive entropy in bits (0 = certain, 1 = p 0.5) of a two-class probability."""
    p = np.clip(np.asarray(prob, np.float32), 1e-7, 1 - 1e-7)
    return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).astype(np.float32)


def segment(model, images: dict, boxes=None, device="cpu", progress=None, member=None,
            do_postprocess=None) -> SegmentResult:
    """Liver segmentation of one volume: labels 0/1, liver probability, entropy (bits), on the input grid.

    ``boxes`` are not used (the recipe needs none; a liver box is ignored).  ``member``: mean |
    vnet | resvnet (default: the model's ``inference`` setting).
    """
    inp = _model_input(model.meta)
    image = _pick_image(images, inp["phases"])
    if image.array.ndim != 3:
        raise InputError(f"segment: expected a 3D image, got shape {image.array.shape}")
    if boxes and progress is not None:
        progress.log("sdnet needs no boxes: the boxes are ignored")
    prob = predict_liver_probability(model, image, device, member, progress)
    post = inp["postprocess"] if do_postprocess is None else bool(do_postprocess)
    labels = labels_from_probability(prob.array, post)
    return SegmentResult(image.with_array(labels), prob, image.with_array(binary_entropy(prob.array)))


def liver_mask(model_dir_or_loaded, volume: Volume, device="cpu") -> Volume:
    """The liver (uint8 0/1 Volume on ``volume``'s grid) from an sdnet model folder or LoadedModel,
    for other recipes (organ box, Couinaud frame, post-processing mask)."""
    model = model_dir_or_loaded
    if not isinstance(model, LoadedModel):
        model = load_model(model, device=device)
    if model.recipe != NAME:
        raise ModelError(f"{model.path}: is a {model.recipe!r} model; liver_mask needs an {NAME!r} model")
    return segment(model, {"image": volume}, device=device).labels
