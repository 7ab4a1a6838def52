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

import errno
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.safeio import atomic_write_bytes, check_written, fsync_file, make_parent, os_reason, short_write_reason, temp_path
from ..errors import InputError, ModelError

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


class Networks(dict):
    """name -> network; a name the model does not hold is a ModelError naming model.json, not a KeyError."""

    def __init__(self, *args, where: str = "model.json", **kwargs):
        super().__init__(*args, **kwargs)
        self.where = where

    def __missing__(self, name):
        raise ModelError(f"{self.where} networks: no network {name!r} (this model has {sorted(self)}); "
                         f"the model folder is incomplete or of another kind")


def state_dict_problem(exc: Exception) -> str:
    """The informative part of a ``load_state_dict`` error: which tensors, which shapes."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    details = [ln.replace("copying a param with shape ", "file has ").replace(" from checkpoint, the shape in current model is ",
                                                                              ", the network needs ")
               .replace("torch.Size(", "(").rstrip(".") for ln in lines[1:]]
    if not details:
        return lines[0] if lines else type(exc).__name__
    more = f" (+{len(details) - 2} more)" if len(details) > 2 else ""
    return "; ".join(details[:2]) + more


@dataclass
class LoadedModel:
    path: Path
    meta: dict
    networks: dict = field(default_factory=Networks)   # name -> nn.Module (eval mode)

    @property
    def recipe(self) -> str:
        return self.meta["recipe"]


def save_model(path, meta: dict, networks: dict) -> Path:
    """Write ``networks`` (name -> (registry class name, kwargs, module)) and ``meta``.

    Every file is written to a temp name, read back (size from the safetensors header, the JSON
    byte for byte) and then renamed in, ``model.json`` last; a failed write (full disk) raises an
    InputError naming the file and the OS reason, leaves no temp file and never replaces a good file.
    """
    path = Path(path)
    from .distributed import barrier, is_main

    if not is_main():   # torchrun: rank 0 alone writes the model; the others wait until it is complete
        barrier()
        return path
    created = not path.exists()
    make_parent(path / "model.json", "model")
    meta = dict(meta)
    meta.update(format=FORMAT, version=VERSION)
    meta["networks"] = {}
    for stale in path.glob(".*.tmp*"):   # left by a save that was killed (kill -9, power loss)
        stale.unlink(missing_ok=True)
    try:
        for name, (cls_name, kwargs, module) in networks.items():
            if network_class(cls_name) is None:
                raise ValueError(f"network class {cls_name!r} is not registered")
            fname = f"{name}.safetensors"
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            write_safetensors(path / fname, state, {"format": FORMAT, "network": name})
            meta["networks"][name] = {"file": fname, "class": cls_name, "kwargs": kwargs}
        write_json_atomic(path / "model.json", meta)
    except InputError:
        if created:  # nothing good was there before: leave nothing half-made
            for name in meta["networks"].values():
                (path / name["file"]).unlink(missing_ok=True)
            try:
                path.rmdir()
            except OSError:
                pass
        raise
    barrier()
    return path


def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """safetensors file written to a temp name, checked (its header's size against the file's), renamed
    over ``path``; InputError naming ``path`` and the OS reason otherwise (``path`` unchanged)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_path(path, ".safetensors")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _verify_safetensors(tmp, tensors)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({os_reason(exc)}); "
                         f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _verify_safetensors(tmp: Path, tensors: dict) -> None:
    check_written(tmp)
    size = os.path.getsize(tmp)
    with open(tmp, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise OSError(short_write_reason(tmp.parent, size))
    expected = 8 + int.from_bytes(head, "little") + sum(t.numel() * t.element_size() for t in tensors.values())
    if size != expected:
        raise OSError(errno.EIO, short_write_reason(tmp.parent, size, expected))


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
    _check_meta_fields(meta, mj)
    return meta


def _is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta_fields(meta: dict, mj: Path) -> None:
    """The fields every recipe reads, typed: a corrupt model.json is a ModelError naming the field."""
    if not isinstance(meta["recipe"], str) or not meta["recipe"]:
        raise ModelError(f"{mj} recipe: expected a recipe name, got {meta['recipe']!r}")
    nets = meta["networks"]
    if not isinstance(nets, dict):
        raise ModelError(f"{mj} networks: expected an object name -> {{file, class, kwargs}}, got {nets!r}")
    for name, spec in nets.items():
        if not isinstance(spec, dict) or not {"file", "class", "kwargs"} <= set(spec) \
                or not isinstance(spec["kwargs"], dict) or not isinstance(spec["class"], str):
            raise ModelError(f"{mj} networks.{name}: needs file, class and kwargs (an object)")
    inp = meta.get("input", {})
    if not isinstance(inp, dict):
        raise ModelError(f"{mj} input: expected an object, got {inp!r}")
    window = inp.get("hu_window")
    if window is not None and not (isinstance(window, list) and len(window) == 2 and all(map(_is_number, window))
                                   and window[0] < window[1]):
        raise ModelError(f"{mj} input.hu_window: expected [low, high] numbers (HU), got {window!r}")
    spacing = inp.get("spacing_mm")
    if spacing is not None:
        values = spacing if isinstance(spacing, list) else [spacing]
        if not values or not all(_is_number(v) and v > 0 for v in values):
            raise ModelError(f"{mj} input.spacing_mm: expected positive numbers (mm), got {spacing!r}")
    context = inp.get("context_slices")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 0):
        raise ModelError(f"{mj} input.context_slices: expected a whole number >= 0, got {context!r}")
    for key in ("phases", "inference_phases"):
        phases = inp.get(key)
        if phases is not None and not (isinstance(phases, list) and all(isinstance(p, str) and p for p in phases)):
            raise ModelError(f"{mj} input.{key}: expected a list of phase names, got {phases!r}")


def load_model(path, device="cpu", names=None) -> LoadedModel:
    """Load a model folder: JSON metadata + safetensors weights into registered classes."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    model = LoadedModel(path, meta, Networks(where=str(path / "model.json")))
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
            raise ModelError(f"{wfile}: weights do not fit network {spec['class']} with the kwargs of "
                             f"model.json networks.{name} ({state_dict_problem(exc)})") from None
        model.networks[name] = net.to(torch.device(device)).eval()
    return model


def write_json_atomic(path, obj) -> None:
    """JSON written to a temp file, fsynced, read back, renamed (data.safeio); InputError naming the
    path and the OS reason on failure, the previous file unchanged."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), what=Path(path).name)


def models_dir() -> Path:
    """Where converted and downloaded-with-a-package models are cached: ``$WLS_MODELS_DIR``, else
    ``$XDG_CACHE_HOME/weakliverseg/models`` (``~/.cache/weakliverseg/models``)."""
    env = os.environ.get("WLS_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "weakliverseg" / "models"
