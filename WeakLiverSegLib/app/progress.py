"""The one progress protocol shared by the CLI, the Slicer module and the tests.

``bar``: a single updating line on stderr for people; ``jsonl``: one JSON object a line on
stdout for programs (the Slicer module's background runner parses exactly these);
``none``: silent.  Events:

* ``{"event": "progress", "stage", "step", "total", "eta_s", ...extra}`` (``loss`` when training)
* ``{"event": "log", "message"}``
* ``{"event": "done", ...}`` and ``{"event": "error", "message"}``
"""

from __future__ import annotations

import json
import math
import sys
import time


class Progress:
    def __init__(self, mode: str = "none", stream=None):
        if mode not in ("bar", "jsonl", "none"):
            raise ValueError(f"progress mode must be bar, jsonl or none, not {mode!r}")
        self.mode = mode
        self.stream = stream
        self._stage = None
        self._stage_start = 0.0
        self._stage_step0 = 0
        self.cancelled = False
        self.history: list[dict] = []   # every progress event, for reports and curves

    def _out(self):
        if self.stream is not None:
            return self.stream
        return sys.stdout if self.mode == "jsonl" else sys.stderr

    def _emit(self, obj: dict):
        if self.mode == "jsonl":
            out = self._out()
            out.write(json.dumps(obj, default=_jsonable) + "\n")
            out.flush()

    def update(self, stage: str, step: int, total: int, **fields):
        """Report that ``step`` of ``total`` units of ``stage`` are done."""
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_start, self._stage_step0 = stage, now, step
        done = step - self._stage_step0
        eta = None
        if done > 0 and total:
            eta = (now - self._stage_start) / done * max(0, total - step)
        event = {"event": "progress", "stage": stage, "step": int(step), "total": int(total),
                 "eta_s": None if eta is None else round(eta, 1)}
        event.update({k: _jsonable(v) for k, v in fields.items()})
        self.history.append(event)
        if self.mode == "jsonl":
            self._emit(event)
        elif self.mode == "bar":
            width = 30
            frac = step / total if total else 0.0
            bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
            extra = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
            eta_s = "" if eta is None else f" eta {eta:5.0f}s"
            end = "\n" if step >= total else ""
            self._out().write(f"\r{stage:>14} [{bar}] {step}/{total}{eta_s} {extra}\033[K{end}")
            self._out().flush()

    def log(self, message: str):
        if self.mode == "jsonl":
            self._emit({"event": "log", "message": message})
        elif self.mode == "bar":
            self._out().write(f"{message}\n")
            self._out().flush()

    def done(self, **fields):
        self._emit({"event": "done", **{k: _jsonable(v) for k, v in fields.items()}})

    def error(self, message: str, **fields):
        self._emit({"event": "error", **{k: _jsonable(v) for k, v in fields.items()}, "message": message})

    def check_cancelled(self):
        from ..errors import Cancelled

        if self.cancelled:
            raise Cancelled("cancelled by the user")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(v):
    """numpy / torch scalars to plain numbers, non-finite floats to None (strict JSON)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
