"""Recipes: one module per paper, one interface.

Each recipe module exposes
``train(dataset, out, config: dict, device, progress, init=None, resume=False) -> Path`` and
``segment(model: LoadedModel, images: dict[str, Volume], boxes=None, device="cpu", progress=None) -> SegmentResult``,
plus ``DEFAULTS`` (its config) and ``PHASES`` (the image phases it needs at training / at inference).
"""

from __future__ import annotations

import importlib

from ..errors import InputError

RECIPES = ("o2l", "wsts", "couinaud", "acol", "sdnet", "litemedsam")
_loaded = {}


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


def _register_all():
    """Import every present recipe so its networks land in the model-store registry."""
    for name in RECIPES:
        try:
            get(name)
        except InputError:
            pass


_register_all()
