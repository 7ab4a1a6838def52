"""Model folders: ``model.json`` + ``*.safetensors``.  The one model loader of the project.

Loading never unpickles: weights are safetensors, everything else is JSON, and a network is
rebuilt from a class name looked up in an explicit registry (never imported by name from the
file), so a foreign or tampered folder cannot run code.

The registry is filled lazily: ``NETWORK_MODULES`` names the module that defines each class, and
loading a model imports only the modules of the classes it holds.  The shared networks
(``learn/networks``) are listed here; ``recipes/__init__.py`` adds the classes that belong to
one recipe (``register_network_module``), so importing that registry is enough to load any model.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

FORMAT = "weakliverseg-model"
VERSION = 1

# name -> callable(**kwargs) -> torch.nn.Module ; a network module adds its classes when imported.
NETWORKS: dict = {}

# name -> the module defining it, imported on first use (see the module docstring).
NETWORK_MODULES: dict = {
    "BoxAttentionUNet2D": f"{__package__}.networks.unet2d",
    "monai.VNet": f"{__package__}.networks.vnet3d",
    "VNet": f"{__package__}.networks.vnet3d",
    "ResVNet": f"{__package__}.networks.vnet3d",
}


def register_network(name: str):
    """Class decorator adding a network class to the registry under ``name``."""

    def wrap(cls):
        NETWORKS[name] = cls
        return cls

    return wrap


def register_network_module(name: str, module: str) -> None:
    """Say which module defines network class ``name`` (imported when a model needs it)."""
    NETWORK_MODULES[name] = module


def network_class(name: str):
    """The registered class called ``name``, importing its module on first use; None if unknown."""
    if name not in NETWORKS and name in NETWORK_MODULES:
        importlib.import_module(NETWORK_MODULES[name])
    return NETWORKS.get(name)


@dataclass
class LoadedModel:
    path: Path
    meta: dict
    networks: dict = field(default_factory=dict)   # name -> nn.Module (eval mode)

    @property
    def recipe(self) -> str:
        return self.meta["recipe"]


def save_model(path, meta: dict, networks: dict) -> Path:
    """Write ``networks`` (name -> (registry class name, kwargs, module)) and ``meta``.

    Files go to a temp folder first and are then moved in, so an interrupted save never
    leaves a half-written model where a good one was.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.update(format=FORMAT, version=VERSION)
    meta["networks"] = {}
    for name, (cls_name, kwargs, module) in networks.items():
        if network_class(cls_name) is None:
            raise ValueError(f"network class {cls_name!r} is not registered")
        fname = f"{name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        tmp = path / f".{fname}.tmp"
        save_file(state, str(tmp), metadata={"format": FORMAT, "network": name})
        os.replace(tmp, path / fname)
        meta["networks"][name] = {"file": fname, "class": cls_name, "kwargs": kwargs}
    write_json_atomic(path / "model.json", meta)
    return path


def read_meta(path) -> dict:
    path = Path(path)
    mj = path / "model.json"
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    if not mj.is_file():
        raise ModelError(f"{path}: not a WeakLiverSeg model folder (no model.json)")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{mj}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{mj}: not a WeakLiverSeg model (format field is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ModelError(f"{mj}: model version {meta.get('version')!r} is not supported (this software reads version <= {VERSION})")
    for key in ("recipe", "networks"):
        if key not in meta:
            raise ModelError(f"{mj}: missing field {key!r}")
    return meta


def load_model(path, device="cpu", names=None) -> LoadedModel:
    """Load a model folder: JSON metadata + safetensors weights into registered classes."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    model = LoadedModel(path, meta)
    for name, spec in meta["networks"].items():
        if names is not None and name not in names:
            continue
        where = f"{path / 'model.json'} networks.{name}"
        if not isinstance(spec, dict) or not {"file", "class", "kwargs"} <= set(spec):
            raise ModelError(f"{where}: needs file, class and kwargs")
        cls = network_class(spec["class"])
        if cls is None:
            raise ModelError(f"{where}: unknown network class {spec['class']!r}")
        fname = Path(spec["file"])
        if fname.name != spec["file"] or fname.suffix != ".safetensors":
            raise ModelError(f"{where}: weights file must be a plain *.safetensors name, not {spec['file']!r}")
        wfile = path / fname
        if not wfile.is_file():
            raise ModelError(f"{wfile}: weights file missing")
        try:
            state = load_file(str(wfile), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{wfile}: not a valid safetensors file ({exc})") from None
        try:
            net = cls(**spec["kwargs"])
            net.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError, ValueError) as exc:
            msg = str(exc).splitlines()[0]
            raise ModelError(f"{wfile}: weights do not fit network {spec['class']} ({msg})") from None
        model.networks[name] = net.to(torch.device(device)).eval()
    return model


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def models_dir() -> Path:
    """Where converted and downloaded-with-a-package models are cached: ``$WLS_MODELS_DIR``, else
    ``$XDG_CACHE_HOME/weakliverseg/models`` (``~/.cache/weakliverseg/models``)."""
    env = os.environ.get("WLS_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "weakliverseg" / "models"


# The starter model shipped with the extension (issue 15): trained only on domain-randomised
# phantoms, used by ``weakliverseg segment`` without ``--model`` and by the Slicer "Segment"
# button when no model is selected.  ``$WLS_STARTER_MODEL`` points elsewhere (tests, packagers).
STARTER_MODEL = "starter"


def starter_model_dir() -> Path:
    """Folder of the shipped starter model: ``$WLS_STARTER_MODEL``, else ``Resources/models/starter``
    next to the package (the repository root, or the installed extension's share folder)."""
    env = os.environ.get("WLS_STARTER_MODEL")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "Resources" / "models" / STARTER_MODEL


def default_model() -> Path:
    """The starter model folder, or ModelError saying that none is installed."""
    path = starter_model_dir()
    if not (path / "model.json").is_file():
        raise ModelError(f"{path}: no model given (--model) and the starter model is not installed there")
    return path
