"""Segment names, colours, label values and SNOMED CT terminology of the WeakLiverSeg labels.

One source of truth, ``Resources/WeakLiverSeg.colors.json`` at the repository root, shared by
the ``.seg.nrrd`` writer and the Slicer bridge so that names and colours survive export to
Slicer and DICOM SEG.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

from ..errors import InputError

COLORS_FILE = Path(__file__).resolve().parents[2] / "Resources" / "WeakLiverSeg.colors.json"


def segment_styles() -> dict:
    """Label name (``"liver"``, ``"tumor"``) -> style dict, ordered by label value.

    Each style: ``label``, ``label_value`` (int), ``name`` (Slicer segment name), ``color``
    (RGB floats 0..1, as Slicer stores them), ``color_rgb`` (0..255 ints), ``terminology``
    (slicerio-style dict: contextName, category, type, [anatomicContextName, anatomicRegion])
    and ``terminology_entry`` (the Slicer ``TerminologyEntry`` tag string).
    A fresh copy on every call, so callers may modify it.
    """
    return copy.deepcopy(_load_styles(str(COLORS_FILE)))


def style_for_segment(segment: dict) -> str | None:
    """The WeakLiverSeg label (``"liver"`` / ``"tumor"``) a foreign segment stands for, or None.

    Matched on the SNOMED CT type code first (the terminology survives renaming), then on the
    segment name (case-insensitive; "tumour", "liver tumour", "neoplasm" accepted).
    """
    styles = segment_styles()
    terminology = segment.get("terminology") or {}
    code = list(terminology.get("type") or [])[:2]
    for label, style in styles.items():
        if code and code == style["terminology"]["type"][:2]:
            return label
    name = str(segment.get("name", "")).strip().lower().replace("tumour", "tumor")
    aliases = {"liver": {"liver"}, "tumor": {"tumor", "liver tumor", "neoplasm", "lesion", "liver lesion"}}
    for label, style in styles.items():
        if name == style["name"].lower() or name in aliases.get(label, ()):
            return label
    return None


def terminology_entry_string(terminology: dict) -> str:
    """Slicer ``TerminologyEntry`` tag text of a slicerio-style terminology dict."""
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(terminology)


@lru_cache(maxsize=4)
def _load_styles(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: segment colour/terminology file not found (the Resources folder is missing)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read segment colour/terminology file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "weakliverseg-colors" or data.get("version") != 1:
        raise InputError(f"{path}: not a version 1 weakliverseg-colors file")
    styles = {}
    for index, entry in enumerate(data.get("segments") or []):
        where = f"{path} segments[{index}]"
        try:
            label, value, name = str(entry["label"]), int(entry["labelValue"]), str(entry["name"])
            rgb = tuple(int(c) for c in entry["color"])
            terminology = dict(entry["terminology"])
            for key in ("category", "type"):
                terminology[key] = [str(v) for v in terminology[key]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: missing or invalid field ({exc})") from None
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise InputError(f"{where}: color must be three integers 0..255, got {entry['color']}")
        styles[label] = {
            "label": label,
            "label_value": value,
            "name": name,
            "color": tuple(round(c / 255.0, 6) for c in rgb),
            "color_rgb": rgb,
            "terminology": terminology,
            "terminology_entry": terminology_entry_string(terminology),
        }
    if not styles:
        raise InputError(f"{path}: no segments defined")
    return dict(sorted(styles.items(), key=lambda item: item[1]["label_value"]))
