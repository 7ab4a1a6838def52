"""Recipe settings: defaults merged with user overrides, checked for unknown keys."""

from __future__ import annotations

import copy

from ..errors import InputError


def deep_update(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_config(defaults: dict, user: dict, where: str = "config") -> dict:
    """``defaults`` updated by ``user``; a key that is not in the defaults is an error (typo guard)."""

    def check(d, u, path):
        for key, value in u.items():
            if key not in d:
                raise InputError(f"{where}: unknown setting {'.'.join(path + [key])!r} "
                                 f"(known: {', '.join(sorted(d))})")
            if isinstance(value, dict) and isinstance(d[key], dict):
                check(d[key], value, path + [key])

    check(defaults, user, [])
    return deep_update(defaults, user)
