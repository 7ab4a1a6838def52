"""PNG pictures of volumes with label contours and boxes (Pillow only, no matplotlib).

``overlay_slice`` renders one axial slice; ``montage`` lays out a few cases, one row per case
and one tile per phase, on the slice through the most tumour (else the most liver).
Axial slices are shown as radiologists read them: rows j (anterior at the top), columns i
(with LPS, the patient's right on the image left).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WINDOW = (-200.0, 250.0)
COLOURS = {1: (60, 220, 90), 2: (255, 60, 60)}                  # liver green, tumour red
BOX_COLOURS = {"liver": (80, 200, 255), "tumor": (255, 220, 40)}  # liver cyan, tumour yellow
OTHER_COLOUR = (200, 120, 255)


def _array(v):
    return np.asarray(getattr(v, "array", v))


def overlay_slice(image2d, label2d=None, boxes2d=None, window=WINDOW, scale=3, contour=True) -> Image.Image:
    """One 2D slice (rows = j, columns = i) windowed to grey, label contours and boxes on top.

    ``label2d``: 0 background, 1 liver, 2 tumour (other values get a purple contour).
    ``boxes2d``: ``Box`` objects (their i/j extent is drawn) or tuples
    ``(i_min, j_min, i_max, j_max[, label])``, inclusive voxel indices.
    ``scale``: integer magnification (nearest neighbour) so thin contours stay readable.
    ``contour=False`` fills labels with a translucent colour instead.
    """
    img = np.asarray(image2d, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"overlay_slice: expected a 2D slice, got shape {img.shape}")
    lo, hi = window
    grey = (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    if label2d is not None:
        lab = np.asarray(label2d)
        if lab.shape != img.shape:
            raise ValueError(f"overlay_slice: label shape {lab.shape} differs from image {img.shape}")
        lab = np.repeat(np.repeat(lab, scale, axis=0), scale, axis=1)
        for value in [v for v in np.unique(lab) if v != 0]:
            colour = np.array(COLOURS.get(int(value), OTHER_COLOUR), np.float32)
            region = lab == value
            if contour:
                region = region & ~_erode(region)
                rgb[region] = colour
            else:
                rgb[region] = 0.6 * rgb[region] + 0.4 * colour
    out = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if boxes2d:
        draw = ImageDraw.Draw(out)
        for box in boxes2d:
            if hasattr(box, "ijk_min"):
                (i0, j0), (i1, j1), name = box.ijk_min[:2], box.ijk_max[:2], box.label
            else:
                i0, j0, i1, j1 = box[:4]
                name = box[4] if len(box) > 4 else "tumor"
            # Inclusive voxel extent [i0 - 0.5, i1 + 0.5] in magnified pixels.
            draw.rectangle([i0 * scale, j0 * scale, (i1 + 1) * scale - 1, (j1 + 1) * scale - 1],
                           outline=BOX_COLOURS.get(name, OTHER_COLOUR))
    return out


def _erode(mask):
    """4-neighbour binary erosion (edges count as outside), for 1-pixel contours."""
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def best_slice(label_zyx) -> int:
    """Axial slice with the most tumour, else the most liver, else the middle one."""
    lab = _array(label_zyx)
    for value in (2, 1):
        area = (lab == value).sum(axis=(1, 2))
        if area.any():
            return int(np.argmax(area))
    return lab.shape[0] // 2


def boxes_on_slice(boxes, k):
    """The boxes (3D ones spanning it, 2D ones on it) that cross axial slice ``k``."""
    return [b for b in boxes or () if b.ijk_min[2] <= k <= b.ijk_max[2]]


def montage(rows, path, window=WINDOW, scale=3, title_height=14) -> Path:
    """Write a PNG: one row per case, one tile per image, on one axial slice each.

    ``rows``: sequence of dicts ``{"title": str, "images": {name: Volume | array (z, y, x)},
    "label": Volume | array | None, "boxes": [Box] | None, "slice": int | None}``.
    The slice defaults to ``best_slice(label)``; boxes crossing it are drawn.
    Written atomically (temp file + rename); returns the path.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("montage: nothing to draw")
    font = ImageFont.load_default()
    tiles = []
    for row in rows:
        images = {name: _array(v) for name, v in row["images"].items()}
        label = row.get("label")
        label = None if label is None else _array(label)
        first = next(iter(images.values()))
        k = row.get("slice")
        if k is None:
            k = best_slice(label) if label is not None else first.shape[0] // 2
        boxes = boxes_on_slice(row.get("boxes"), k)
        tiles.append([(f"{row.get('title', '')} {name} k={k}",
                       overlay_slice(img[k], None if label is None else label[k], boxes, window, scale))
                      for name, img in images.items()])
    width = max(sum(t.width for _, t in r) for r in tiles)
    height = sum(max(t.height for _, t in r) + title_height for r in tiles)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for r in tiles:
        x = 0
        for text, tile in r:
            draw.text((x + 2, y + 1), text, fill=(255, 255, 255), font=font)
            canvas.paste(tile, (x, y + title_height))
            x += tile.width
        y += max(t.height for _, t in r) + title_height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
