"""Recipes: one package per paper (recipes/<name>/, whose files are the paper's parts), one interface,
and the registry (``get``).  A recipe may import data, anatomy, learn, evaluation (and annotate);
nothing here imports a recipe until it is asked for (``get``), so a command loads only its own.

Each recipe package exposes
``train(dataset, out, config: dict, device, progress, init=None, resume=False) -> Path`` and
``segment(model: LoadedModel, images: dict[str, Volume], boxes=None, device="cpu", progress=None) -> SegmentResult``,
plus ``DEFAULTS`` (its config) and ``PHASES`` (the image phases it needs at training / at inference).
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from ..learn.modelstore import register_network_module

RECIPES = ("o2l", "wsts", "couinaud", "acol", "sdnet", "litemedsam")
_loaded = {}

# Network classes owned by one recipe -> their module: ``learn.modelstore.load_model`` imports just
# that module (and so its recipe) for a model that holds one.  The shared networks are listed in
# learn.modelstore itself.
RECIPE_NETWORKS = {
    "BoxPolicy2D": "wsts.rl_boxes",
    "DenseUNet2D": "wsts.dense_unet",
    "CouinaudNet": "couinaud.couinaudnet",
    "FPNACoLClassifier": "acol.fpn_classifier",
}
for _cls, _module in RECIPE_NETWORKS.items():
    register_network_module(_cls, f"{__name__}.{_module}")
register_network_module("LiteMedSAM", f"{__package__}.annotate.litemedsam")   # the litemedsam recipe's network


def available() -> list[str]:
    """Recipes whose module is present in this installation."""
    out = []
    for name in RECIPES:
        try:
            get(name)
            out.append(name)
        except InputError:
            pass
    return out


def get(name: str):
    if name not in RECIPES:
        raise InputError(f"--recipe: unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                raise InputError(f"--recipe: recipe {name!r} is not implemented in this version") from None
            raise
    return _loaded[name]
