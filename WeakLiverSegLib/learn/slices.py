"""2.5D data for slice networks: HU window, in-plane working grid, three-slice groups, boxes, samples.

A volume ``(z, y, x)`` is windowed to ``[0, 1]`` (HU ``[-200, 250]`` as in the O2L paper) and
resampled *in-plane* to the recipe's working spacing (z is untouched: the networks see
consecutive native slices).  The working grid keeps the field of view: its pixel edges coincide
with the original grid's edges, so going there and back is ``F.interpolate`` with
``align_corners=False`` both ways and no world geometry is needed.  A 512x512 CT at 0.7 mm and
a 96x96 phantom at 1.5 mm therefore both land near the same physical scale.

Boxes (store ``Box``, indices of the original grid) are rasterized straight onto the working
grid per slice: organ map = union of the liver box and the lesion boxes (the paper's b_og),
lesion map = union of the lesion boxes (b_le).  3D boxes cover every slice of their z range,
2D boxes only their own slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

HU_WINDOW = (-200.0, 250.0)
N_CLASSES = 3          # background, liver, tumour
_CHUNK = 16            # slices resampled at a time (bounds the temporary memory)


# ----------------------------------------------------------------------------- intensities / grid


def window(array, hu_window=HU_WINDOW) -> np.ndarray:
    """Clip to the HU window and scale to [0, 1] (float32)."""
    lo, hi = (float(v) for v in hu_window)
    out = np.clip(np.asarray(array, dtype=np.float32), lo, hi)   # a new array: the input is untouched
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def working_size(shape_yx, spacing_xy, target_mm: float) -> tuple:
    """In-plane size (h, w) of the working grid for ``target_mm`` pixels (same field of view)."""
    ny, nx = (int(n) for n in shape_yx)
    sx, sy = (float(s) for s in spacing_xy)
    return (max(1, int(round(ny * sy / target_mm))), max(1, int(round(nx * sx / target_mm))))


def resize_slices(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """(Z, C, H, W) -> (Z, C, h, w), in chunks of slices; antialiased when shrinking (bilinear)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    out = torch.empty((x.shape[0], x.shape[1]) + size, dtype=x.dtype, device=x.device)
    kwargs = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(align_corners=False, antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
    for z0 in range(0, x.shape[0], _CHUNK):
        out[z0:z0 + _CHUNK] = F.interpolate(x[z0:z0 + _CHUNK], size=size, **kwargs)
    return out


def _window_torch(array, hu_window) -> torch.Tensor:
    """``window`` in torch (same float32 values; several times faster than ``np.clip`` on int16 CT)."""
    lo, hi = (float(v) for v in hu_window)
    return torch.from_numpy(np.asarray(array)).to(torch.float32).clamp_(lo, hi).sub_(lo).mul_(1.0 / (hi - lo))


def image_to_working(array_zyx, spacing_xy, target_mm: float, hu_window=HU_WINDOW) -> np.ndarray:
    """HU volume (z, y, x) -> windowed float32 (z, h, w) on the working grid, a few slices at a time
    (a full-size float copy of a 512x512 CT would be the largest array of ``segment``)."""
    size = working_size(array_zyx.shape[1:], spacing_xy, target_mm)
    out = torch.empty((array_zyx.shape[0], 1) + size, dtype=torch.float32)
    for z0 in range(0, array_zyx.shape[0], _CHUNK):
        out[z0:z0 + _CHUNK] = resize_slices(_window_torch(array_zyx[z0:z0 + _CHUNK], hu_window)[:, None], size)
    return out[:, 0].numpy()


def labels_to_working(labels_zyx, size) -> np.ndarray:
    """Label map 0/1/2 (z, y, x) -> class probabilities (z, 3, h, w) float32 (exact one-hot when no resampling).

    Resampling the one-hot maps bilinearly keeps thin structures and partial-volume edges soft.
    """
    labels = torch.from_numpy(np.asarray(labels_zyx, dtype=np.int64))
    out = torch.empty((labels.shape[0], N_CLASSES) + tuple(size), dtype=torch.float32)
    for z0 in range(0, labels.shape[0], _CHUNK):
        onehot = F.one_hot(labels[z0:z0 + _CHUNK].clamp(0, N_CLASSES - 1), N_CLASSES).permute(0, 3, 1, 2).float()
        out[z0:z0 + _CHUNK] = resize_slices(onehot, size)
    return out.numpy()


def to_input_grid(probs: torch.Tensor, size) -> torch.Tensor:
    """Class probabilities (Z, C, h, w) on the working grid -> (Z, C, H, W) on the input grid."""
    return resize_slices(probs, size)


def input_grid_labels(probs: np.ndarray, size) -> np.ndarray:
    """Softmax (Z, 3, h, w) on the working grid -> uint8 labels (Z, H, W): the arg-max of the
    bilinearly resampled probabilities (ties to the lower class, like ``argmax``).

    Resampling is linear, so the two resampled differences p1 - p0 and p2 - p0 decide it: two
    full-size channels instead of three, and two comparisons instead of a slow strided arg-max.
    """
    out = np.empty((probs.shape[0],) + tuple(int(s) for s in size), np.uint8)
    for z0 in range(0, probs.shape[0], _CHUNK):
        p = torch.from_numpy(probs[z0:z0 + _CHUNK])
        d = resize_slices(p[:, 1:] - p[:, :1], size)
        d1, d2 = d[:, 0], d[:, 1]
        lab = (d1 > 0).to(torch.uint8)
        lab.masked_fill_((d2 > 0) & (d2 > d1), 2)
        out[z0:z0 + _CHUNK] = lab.numpy()
    return out


# ----------------------------------------------------------------------------- boxes


def _axis_range(lo: int, hi: int, n: int, m: int) -> tuple:
    """Inclusive voxel range [lo, hi] of an axis of n voxels -> pixel range on an axis of m pixels.

    The range covers [lo - 0.5, hi + 0.5] in continuous index; the working pixels whose centres
    fall inside are kept (at least the one nearest the range's centre).
    """
    if m == n:
        return max(lo, 0), min(hi, n - 1)
    scale = m / n
    a = lo * scale - 0.5          # (lo - 0.5 + 0.5) * scale - 0.5
    b = (hi + 1) * scale - 0.5
    p0, p1 = int(np.ceil(a - 1e-9)), int(np.floor(b + 1e-9))
    if p1 < p0:
        p0 = p1 = int(np.floor((a + b) / 2 + 0.5))
    return max(p0, 0), min(p1, m - 1)


def box_maps(shape_zyx, size, liver_box=None, tumor_boxes=()) -> np.ndarray:
    """Binarized (z, 2, h, w) uint8 box maps on the working grid: [organ = liver box U lesion boxes, lesion]."""
    nz, ny, nx = (int(n) for n in shape_zyx)
    h, w = (int(s) for s in size)
    maps = np.zeros((nz, 2, h, w), np.uint8)

    def paint(box, channel):
        i0, i1 = _axis_range(box.ijk_min[0], box.ijk_max[0], nx, w)
        j0, j1 = _axis_range(box.ijk_min[1], box.ijk_max[1], ny, h)
        k0, k1 = max(box.ijk_min[2], 0), min(box.ijk_max[2], nz - 1)
        maps[k0:k1 + 1, channel, j0:j1 + 1, i0:i1 + 1] = 1

    if liver_box is not None:
        paint(liver_box, 0)
    for box in tumor_boxes:
        paint(box, 0)
        paint(box, 1)
    return maps


def loc_target(maps: np.ndarray) -> np.ndarray:
    """Box one-hot classes for the localization branch: 0 background, 1 liver box, 2 lesion box (lesion wins).

    ``maps`` is (..., 2, h, w) [organ, lesion]; returns (..., h, w) int64.
    """
    maps = np.asarray(maps)
    out = (maps[..., 0, :, :] > 0).astype(np.int64)
    out[maps[..., 1, :, :] > 0] = 2
    return out


def split_boxes(boxes) -> tuple:
    """A list of store boxes -> (liver box or None, [tumour boxes]); several liver boxes are merged."""
    from ..data.boxes import Box

    livers = [b for b in boxes if b.label == "liver"]
    tumors = [b for b in boxes if b.label != "liver"]
    liver = None
    if livers:
        lo = tuple(min(b.ijk_min[a] for b in livers) for a in range(3))
        hi = tuple(max(b.ijk_max[a] for b in livers) for a in range(3))
        liver = Box("liver", lo, hi, source=livers[0].source)
    return liver, tumors


def lesion_boxes_for_slices(boxes) -> list:
    """The tumour boxes to rasterize: every 2D (per-slice) box, plus each 3D box that no 2D box refines.

    Stores may hold both a 3D box per lesion and 2D boxes per slice of it; the 2D ones are the
    tighter annotation (the paper's per-slice boxes), so a 3D box is used only where no 2D box
    lies within its extent.
    """
    tumors = [b for b in boxes if b.label != "liver"]
    flat = [b for b in tumors if b.is_2d]

    def refined(b3):
        return any(b3.ijk_min[2] <= b.ijk_min[2] <= b3.ijk_max[2]
                   and all(b.ijk_min[a] <= b3.ijk_max[a] and b.ijk_max[a] >= b3.ijk_min[a] for a in (0, 1))
                   for b in flat)

    return flat + [b for b in tumors if not b.is_2d and not refined(b)]


# ----------------------------------------------------------------------------- three-slice groups


def group_indices(centres, n_slices: int, context: int = 1) -> np.ndarray:
    """(B, 2*context+1) slice indices around each centre, edges replicated."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.asarray(centres)[:, None] + offsets[None, :], 0, n_slices - 1)


def slice_groups(volume_zhw, centres, context: int = 1) -> np.ndarray:
    """(B, 2*context+1, h, w) stacks of consecutive slices around each centre (edge replication)."""
    return np.asarray(volume_zhw)[group_indices(centres, volume_zhw.shape[0], context)]


# ----------------------------------------------------------------------------- training samples


@dataclass
class PreparedCase:
    """One training case on the working grid."""
    case_id: str
    image: np.ndarray                    # (z, h, w) float32 in [0, 1]
    target: np.ndarray | None = None     # (z, 3, h, w) float16 class probabilities (one-hot or soft)
    boxes: np.ndarray | None = None      # (z, 2, h, w) uint8 [organ, lesion]
    kind: str = "strong"                 # strong | weak
    roi: np.ndarray = field(default=None)        # slices where the organ box (else liver) is present
    tumor: np.ndarray = field(default=None)      # slices holding lesion boxes (else tumour)

    def __post_init__(self):
        if self.target is not None:
            self.target = self.target.astype(np.float16, copy=False)
        if self.roi is None:
            self.roi = self._slices(0, 1)
        if self.tumor is None:
            self.tumor = self._slices(1, 2)

    def _slices(self, box_channel: int, label: int) -> np.ndarray:
        if self.boxes is not None and self.boxes[:, box_channel].any():
            return np.flatnonzero(self.boxes[:, box_channel].any(axis=(1, 2)))
        if self.target is not None:
            mass = self.target[:, label:].astype(np.float32).sum(axis=1) > 0.5
            return np.flatnonzero(mass.any(axis=(1, 2)))
        return np.zeros(0, np.int64)


def cut_window(array, y0, x0, size):
    """array[..., y0:y0+size, x0:x0+size] with zero padding outside."""
    h, w = array.shape[-2:]
    out = np.zeros(array.shape[:-2] + (size, size), array.dtype)
    ys, ye, xs, xe = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[..., ys - y0:ye - y0, xs - x0:xe - x0] = array[..., ys:ye, xs:xe]
    return out


class Sampler:
    """Random training batches of three-slice groups from prepared cases.

    Each batch holds ``batch_size`` crops of ``groups_per_crop`` consecutive three-slice groups
    (the paper crops 6 x 320 x 320 subvolumes: 4 groups).  Augmentation as in the paper:
    random scaling 0.8-1.2 (a window of ``crop / scale`` pixels resized to ``crop``) and flips.
    ``roi_prob`` of the crops are centred on a slice inside the organ box (half of those on a
    lesion slice when there is one), the rest anywhere: the focus lets a small CPU budget see
    enough liver and tumour.
    """

    def __init__(self, cases, crop: int, batch_size: int, rng: np.random.Generator, context: int = 1,
                 groups_per_crop: int = 1, scale_range=(0.8, 1.2), flip_prob: float = 0.5, roi_prob: float = 0.8):
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases = list(cases)
        self.crop = int(crop)
        self.batch_size = int(batch_size)
        self.rng = rng
        self.context = int(context)
        self.groups = max(1, int(groups_per_crop))
        self.scale_range = tuple(scale_range)
        self.flip_prob = float(flip_prob)
        self.roi_prob = float(roi_prob)

    def _centre_slice(self, case: PreparedCase) -> tuple:
        rng, nz = self.rng, case.image.shape[0]
        focus = None
        if rng.random() < self.roi_prob and len(case.roi):
            pool = case.tumor if (len(case.tumor) and rng.random() < 0.5) else case.roi
            focus = int(pool[rng.integers(len(pool))])
        z = focus if focus is not None else int(rng.integers(nz))
        z0 = int(np.clip(z - rng.integers(self.groups), 0, max(nz - self.groups, 0)))
        return z0, focus is not None

    def _window(self, case: PreparedCase, z: int, focus: bool, size: int) -> tuple:
        """Top-left (y, x) of a size x size window (may reach outside the image: zero padded)."""
        rng = self.rng
        _, h, w = case.image.shape
        if focus and case.boxes is not None and case.boxes[z, 0].any():
            ys, xs = np.nonzero(case.boxes[z, 0])
            n = rng.integers(len(ys))
            cy, cx = ys[n] + rng.integers(-size // 4, size // 4 + 1), xs[n] + rng.integers(-size // 4, size // 4 + 1)
            y0, x0 = cy - size // 2, cx - size // 2
        else:
            y0 = int(rng.integers(min(0, h - size), max(0, h - size) + 1))
            x0 = int(rng.integers(min(0, w - size), max(0, w - size) + 1))
        # keep as much image in the window as possible
        y0 = int(np.clip(y0, min(0, h - size), max(0, h - size)))
        x0 = int(np.clip(x0, min(0, w - size), max(0, w - size)))
        return y0, x0

    def sample(self) -> dict:
        """A batch: ``image`` (B, 2c+1, crop, crop), ``boxes`` (B, 2, ..) float, ``target`` (B, 3, ..)
        class probabilities, ``loc`` (B, crop, crop) int64 box classes; B = batch_size * groups_per_crop."""
        rng, crop = self.rng, self.crop
        images, boxes, targets = [], [], []
        for _ in range(self.batch_size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            nz = case.image.shape[0]
            z0, focus = self._centre_slice(case)
            centres = np.clip(np.arange(z0, z0 + self.groups), 0, nz - 1)
            scale = float(rng.uniform(*self.scale_range))
            size = max(8, int(round(crop / scale)))
            y0, x0 = self._window(case, int(centres[len(centres) // 2]), focus, size)
            flips = [d for d, p in ((-1, self.flip_prob), (-2, self.flip_prob)) if rng.random() < p]
            img = cut_window(slice_groups(case.image, centres, self.context), y0, x0, size)
            if case.boxes is not None:
                box = cut_window(case.boxes[centres], y0, x0, size).astype(np.float32)
            else:
                box = np.zeros((len(centres), 2, size, size), np.float32)
            if case.target is not None:
                tgt = cut_window(case.target[centres].astype(np.float32), y0, x0, size)
                outside = tgt.sum(axis=1) == 0          # padding is background
                tgt[:, 0][outside] = 1.0
            else:
                tgt = np.zeros((len(centres), N_CLASSES, size, size), np.float32)
            t_img, t_box, t_tgt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (img, box, tgt))
            if size != crop:
                t_img = F.interpolate(t_img, size=(crop, crop), mode="bilinear", align_corners=False)
                t_tgt = F.interpolate(t_tgt, size=(crop, crop), mode="bilinear", align_corners=False)
                t_box = F.interpolate(t_box, size=(crop, crop), mode="nearest")
            if flips:
                t_img, t_box, t_tgt = (t.flip(flips) for t in (t_img, t_box, t_tgt))
            images.append(t_img)
            boxes.append(t_box)
            targets.append(t_tgt)
        box = torch.cat(boxes)
        from .distributed import shard_rows   # torchrun: every rank draws the same batch, keeps its rows

        return shard_rows({
            "image": torch.cat(images),
            "boxes": box,
            "target": torch.cat(targets),
            "loc": torch.from_numpy(loc_target(box.numpy())),
        })


# ----------------------------------------------------------------------------- box annotators as pseudo-labellers


def stack_slice_boxes(boxes) -> list:
    """Tumour boxes for a box annotator: every 3D box, plus the 2D (per-slice) boxes stacked into one
    3D box per lesion (2D boxes on consecutive slices whose in-plane extents overlap), so that the
    annotator carries each lesion through its slices instead of growing every 2D box on its own.
    2D boxes that lie inside a given 3D box are dropped (the 3D box covers them)."""
    from ..data.boxes import Box

    tumors = [b for b in boxes if b.label != "liver"]
    solid = [b for b in tumors if not b.is_2d]
    flat = [b for b in tumors if b.is_2d and not any(
        s.ijk_min[2] <= b.ijk_min[2] <= s.ijk_max[2]
        and all(b.ijk_min[a] <= s.ijk_max[a] and b.ijk_max[a] >= s.ijk_min[a] for a in (0, 1)) for s in solid)]
    stacks: list = []          # [lo, hi] lists, grown slice by slice
    for b in sorted(flat, key=lambda b: b.ijk_min[2]):
        for st in stacks:
            lo, hi = st[0], st[1]
            if hi[2] == b.ijk_min[2] - 1 or lo[2] <= b.ijk_min[2] <= hi[2]:
                if all(b.ijk_min[a] <= hi[a] and b.ijk_max[a] >= lo[a] for a in (0, 1)):
                    st[0] = [min(lo[a], b.ijk_min[a]) for a in range(3)]
                    st[1] = [max(hi[a], b.ijk_max[a]) for a in range(3)]
                    break
        else:
            stacks.append([list(b.ijk_min), list(b.ijk_max), b.source])
    return solid + [Box("tumor", tuple(lo), tuple(hi), source=src) for lo, hi, src in stacks]


def annotate_case(annotator, image, liver_box, boxes, progress=None, where: str = "") -> np.ndarray:
    """A weak case's pseudo-label map (uint8 0/1/2, the image's grid) from a box annotator
    (``annotate.annotators``: litemedsam, fused, fill ...): the liver box and the lesions' stacked
    boxes (``stack_slice_boxes``) are annotated; tumour outside the case's own tumour boxes (the
    tighter per-slice ones where given) becomes liver.  A box the annotator finds empty is left out
    (logged) instead of failing the whole case."""
    from ..data.boxes import box_mask
    from ..errors import InputError

    tumors = [b for b in boxes if b.label != "liver"]
    todo = ([liver_box] if liver_box is not None else []) + stack_slice_boxes(tumors)
    if not todo:
        return np.zeros(image.array.shape, np.uint8)
    kwargs = {"image_key": where or id(image.array)} if getattr(annotator, "name", "") in ("litemedsam", "fused") else {}
    try:
        labels = annotator.annotate(image, todo, **kwargs).labels.array.copy()
    except InputError:
        labels = np.zeros(image.array.shape, np.uint8)
        for box in sorted(todo, key=lambda b: b.label != "liver"):      # one by one, the tumour winning
            try:
                part = annotator.annotate(image, [box], **kwargs).labels.array
            except InputError as exc:
                if progress is not None:
                    progress.log(f"{where}: {exc}; left out of the pseudo-label")
                continue
            labels[part == 2] = 2
            labels[(part == 1) & (labels == 0)] = 1
    if tumors:
        outside = (labels == 2) & ~box_mask(labels.shape, tumors)
        labels[outside] = 1
    return labels.astype(np.uint8)
