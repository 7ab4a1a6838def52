"""Couinaud constructor: the eight liver segments from a contrast-enhanced CT and a liver mask.

An anatomical-landmark method (no training, so nothing is learned from the synthetic
generator): the Couinaud scheme is defined by the vessels, and the vessels are bright in the
enhanced (portal-venous) phase.

1. *Vessels*: the CT is smoothed (Gaussian, ``smooth_mm``); voxels brighter than the liver
   parenchyma (median of the eroded liver) by ``max(k * MAD, min_contrast_hu)`` are vessel.
2. *IVC*: on every axial slice, the round, cava-sized, vessel-bright blobs in a ``band_mm``
   shell around the liver that touch it vote with their centre; the retro-hepatic cava is the
   place voted for on the most slices (a vertical tube along the liver), and a line x(z), y(z)
   is fitted through those votes.
3. *Portal plane*: the portal branches run horizontally at the hilum, so the axial level with
   the largest intrahepatic vessel area is the portal level (area-weighted around the peak).
4. *Hepatic-vein planes*: the hepatic veins drain into the IVC above the portal plane; the
   angles of the intrahepatic vessel voxels there around the IVC axis (0 deg = anterior,
   positive towards the patient's left) form three peaks: right, middle and left hepatic vein.
   Each vein defines a vertical plane through the IVC axis.
5. *Segments* (Couinaud / Bismuth): right of the right vein 7 (above the portal plane) / 6;
   between right and middle 8 / 5; between middle and left 4; left of the left vein 2 / 3;
   segment 1 (caudate) is the paracaval liver to the left of the middle-vein plane near the
   portal level, and all liver behind the IVC's coronal plane on its left.

Any landmark that cannot be found falls back to a liver-shape default and is reported in
``Landmarks.found``.  Coordinates are world LPS millimetres, so any direction matrix works.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..data.volume import Volume

SEGMENTS = tuple(range(1, 9))

DEFAULTS = {
    "smooth_mm": 1.0,           # Gaussian sigma before thresholding vessels
    "vessel_k": 3.0,            # vessels: > median + max(k * MAD, min_contrast_hu)
    "min_contrast_hu": 15.0,
    "band_mm": 12.0,            # shell around the liver searched for the IVC
    "contact_mm": 3.0,          # an IVC voxel this close to the liver "touches" it
    "ivc_k": 2.0,               # second, lower IVC threshold (the cava enhances less)
    "ivc_wander_mm": 6.0,       # votes this close (in-plane) are the same vertical tube
    "ivc_radius_mm": [2.5, 20.0],   # cava cross-section, equivalent radius
    "max_vessel_hu": 320.0,     # brighter than this is bone, not a vessel
    "vein_min_r": 0.15,         # hepatic-vein voxels at least this x liver radius from the IVC axis
    "vein_margin_mm": 6.0,      # ... and this far above the portal plane
    "peak_sigma_deg": 4.0,      # smoothing of the angle histogram
    "peak_min_sep_deg": 12.0,   # two vein planes are at least this far apart
    "caudate_r": 0.45,          # paracaval caudate zone: within this x liver radius of the IVC axis
    "caudate_below": 0.15,      # caudate z range: from portal level - this x liver height ...
    "caudate_above": 0.35,      # ... to portal level + this x liver height
}


@dataclass
class Landmarks:
    """What the constructor found, in world LPS mm / degrees (for reports and debugging)."""
    ivc_xy: tuple            # IVC axis at z = 0: (x, y)
    ivc_slope: tuple         # d(x, y)/dz of the IVC axis
    portal_z: float          # height of the portal plane
    vein_angles: tuple       # (right, middle, left) hepatic-vein plane angles, degrees
    liver_radius_mm: float   # sqrt(largest axial liver area / pi)
    liver_z: tuple           # (lowest, highest) liver level
    found: dict = field(default_factory=dict)   # landmark -> True (from the image) / False (fallback)

    def to_json(self) -> dict:
        out = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def ivc_at(self, z):
        z = np.asarray(z, dtype=np.float32)
        return (np.float32(self.ivc_xy[0]) + np.float32(self.ivc_slope[0]) * z,
                np.float32(self.ivc_xy[1]) + np.float32(self.ivc_slope[1]) * z)


# ----------------------------------------------------------------------------- public API


def construct_couinaud(image: Volume, liver, config: dict | None = None, where: str = "image",
                       return_landmarks: bool = False):
    """Couinaud map (uint8 Volume on the image grid: 0 outside the liver, 1..8 inside).

    ``image``: contrast-enhanced CT in HU; ``liver``: boolean / label array (z, y, x) on the same
    grid or a Volume (labels >= 1 are liver).  ``where`` names the case in error messages.
    """
    cfg = dict(DEFAULTS)
    cfg.update(config or {})
    if isinstance(liver, Volume):
        if not liver.same_grid(image):
            raise InputError(f"{where}: liver mask grid differs from the image ({image.grid_difference(liver)})")
        liver = liver.array
    liver = np.asarray(liver) >= 1
    if liver.shape != image.array.shape:
        raise InputError(f"{where}: liver mask shape {liver.shape[::-1]} does not match the image {image.shape_xyz}")
    if liver.sum() < 64:
        raise InputError(f"{where}: liver mask has {int(liver.sum())} voxels; the Couinaud constructor needs a liver")
    crop, world, sub_img, sub_liver = _crop(image, liver, cfg["band_mm"] + 3 * cfg["smooth_mm"] + 2)
    lm = find_landmarks(sub_img, sub_liver, world, _sampling(image), cfg)
    seg = assign_segments(sub_liver, world, lm, cfg)
    out = np.zeros(liver.shape, np.uint8)
    out[crop] = seg
    vol = image.with_array(out)
    return (vol, lm) if return_landmarks else vol


def segment_of_component(couinaud_map, component_mask) -> int:
    """The Couinaud segment holding most of a component (0 when it lies outside the liver)."""
    cm = np.asarray(couinaud_map.array if isinstance(couinaud_map, Volume) else couinaud_map)
    comp = np.asarray(component_mask.array if isinstance(component_mask, Volume) else component_mask).astype(bool)
    if cm.shape != comp.shape:
        raise InputError(f"component mask shape {comp.shape} does not match the Couinaud map {cm.shape}")
    values = cm[comp]
    values = values[values > 0]
    if values.size == 0:
        return 0
    return int(np.argmax(np.bincount(values, minlength=9)))


def segment_dice(pred, truth) -> dict:
    """Per-segment Dice {1..8: float or None (segment absent from both)} of two Couinaud maps."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    out = {}
    for s in SEGMENTS:
        p, t = pred == s, truth == s
        n = int(p.sum()) + int(t.sum())
        out[s] = None if n == 0 else 2.0 * int((p & t).sum()) / n
    return out


# ----------------------------------------------------------------------------- landmarks


def find_landmarks(img: np.ndarray, liver: np.ndarray, world, sampling, cfg) -> Landmarks:
    """Landmarks of one liver (``img``, ``liver`` and ``world`` = (X, Y, Z) arrays of one crop)."""
    X, Y, Z = world
    found = {}
    sm = ndimage.gaussian_filter(img.astype(np.float32), sigma=[cfg["smooth_mm"] / s for s in sampling])
    core = ndimage.binary_erosion(liver, iterations=1)
    if core.sum() < 32:
        core = liver
    vals = sm[core]
    med = float(np.median(vals))
    mad = float(np.median(np.abs(vals - med))) * 1.4826
    vessels = (sm > med + max(cfg["vessel_k"] * mad, cfg["min_contrast_hu"])) & core

    zl = Z[liver]
    z_lo, z_hi = float(zl.min()), float(zl.max())
    dz = _level_step(Z)
    levels = np.round((Z - z_lo) / dz).astype(np.int32)
    n_levels = int(levels[liver].max()) + 1
    area = np.bincount(levels[liver], minlength=n_levels)
    radius = math.sqrt(float(area.max()) * _pixel_area(sampling, dz) / math.pi)

    axial = abs(float(np.take(Z, 1, axis=0).flat[0] - Z.flat[0])) > 0.9 * dz if Z.shape[0] > 1 else False
    ivc = _find_ivc(sm, liver, X, Y, Z, sampling, med, mad, cfg, axial)
    found["ivc"] = ivc is not None
    if ivc is None:   # posterior-medial corner of the liver's upper half
        up = liver & (Z > (z_lo + z_hi) / 2)
        ivc = ((float(np.percentile(X[up], 80)), float(np.percentile(Y[up], 85))), (0.0, 0.0))

    portal_z = _find_portal_level(vessels, levels, n_levels, z_lo, dz)
    found["portal"] = portal_z is not None
    if portal_z is None:
        portal_z = z_lo + 0.55 * (z_hi - z_lo)

    lm = Landmarks(ivc_xy=tuple(ivc[0]), ivc_slope=tuple(ivc[1]), portal_z=float(portal_z),
                   vein_angles=(), liver_radius_mm=radius, liver_z=(z_lo, z_hi), found=found)
    angles = _find_vein_angles(vessels, X, Y, Z, lm, cfg)
    found["veins"] = angles is not None
    if angles is None:
        angles = _default_angles(liver, X, Y, Z, lm)
    lm.vein_angles = tuple(float(a) for a in angles)
    return lm


def _find_ivc(sm, liver, X, Y, Z, sampling, med, mad, cfg, axial: bool):
    """((x0, y0), (dx/dz, dy/dz)) of the IVC axis, or None.

    On every axial slice, the round, vessel-bright (not bone-bright) blobs of cava size in a
    shell around the liver that touch it vote with their centre; the cava is the place voted
    for on the most slices (a vertical tube), its axis a line through those votes.  Blobs are
    taken at the vessel threshold and at a lower one (the cava enhances less than the portal
    vein).  Non-axial grids have no slices to vote on: there each 3D candidate is scored instead.
    """
    dist_out = ndimage.distance_transform_edt(~liver, sampling=sampling)
    shell = (dist_out > 0) & (dist_out <= cfg["band_mm"]) & (sm < cfg["max_vessel_hu"])
    touch_zone = dist_out <= cfg["contact_mm"]
    thresholds = [med + max(k * mad, cfg["min_contrast_hu"] * k / cfg["vessel_k"]) for k in (cfg["vessel_k"], cfg["ivc_k"])]
    votes = []     # (slice, x, y, z)
    if axial:
        px_area = sampling[1] * sampling[2]
        r_lo, r_hi = cfg["ivc_radius_mm"]
        for k in np.flatnonzero(shell.any(axis=(1, 2))):
            for thr in thresholds:
                comp, n = ndimage.label(shell[k] & (sm[k] > thr))
                for c, sl in enumerate(ndimage.find_objects(comp), start=1):
                    m = comp[sl] == c
                    r_eq = math.sqrt(m.sum() * px_area / math.pi)
                    if not r_lo <= r_eq <= r_hi or not touch_zone[k][sl][m].any():
                        continue
                    xs, ys = X[k][sl][m], Y[k][sl][m]
                    cx, cy = float(xs.mean()), float(ys.mean())
                    if float(np.hypot(xs - cx, ys - cy).max()) > 1.8 * r_eq + max(sampling[1:]):
                        continue      # not round: a rib, a kidney, an oblique vessel
                    votes.append((int(k), cx, cy, float(Z[k][sl][m].mean())))
    else:
        for thr in thresholds:
            comp, n = ndimage.label(shell & (sm > thr), structure=np.ones((3, 3, 3), bool))
            for c, sl in enumerate(ndimage.find_objects(comp), start=1):
                m = comp[sl] == c
                if touch_zone[sl][m].any():
                    zz = np.round(Z[sl][m] / 2.0)
                    for u in np.unique(zz):
                        sel = zz == u
                        votes.append((int(u), float(X[sl][m][sel].mean()), float(Y[sl][m][sel].mean()),
                                      float(Z[sl][m][sel].mean())))
    if not votes:
        return None
    v = np.asarray(votes, float)
    near = np.hypot(v[:, 1, None] - v[None, :, 1], v[:, 2, None] - v[None, :, 2]) <= cfg["ivc_wander_mm"]
    support = np.array([np.unique(v[near[i], 0]).size for i in range(len(v))])
    best = int(np.argmax(support))
    if support[best] < 3:
        return None
    sel = v[near[best]]
    cx, cy, cz = sel[:, 1], sel[:, 2], sel[:, 3]
    if np.ptp(cz) > 0 and len(np.unique(cz)) >= 4:
        ax, bx = np.polyfit(cz, cx, 1)
        ay, by = np.polyfit(cz, cy, 1)
        if abs(ax) > 0.5 or abs(ay) > 0.5:       # a cava is close to vertical
            ax, bx, ay, by = 0.0, float(np.median(cx)), 0.0, float(np.median(cy))
    else:
        ax, bx, ay, by = 0.0, float(np.median(cx)), 0.0, float(np.median(cy))
    return (float(bx), float(by)), (float(ax), float(ay))


def _find_portal_level(vessels, levels, n_levels, z_lo, dz):
    """Height of the level with the most intrahepatic vessel (area-weighted around the peak)."""
    prof = np.bincount(levels[vessels], minlength=n_levels).astype(float)
    if prof.sum() < 10:
        return None
    # ignore the top and bottom tenth of the liver: the dome and the tip hold no hilum
    lo, hi = int(0.1 * n_levels), max(int(math.ceil(0.9 * n_levels)), int(0.1 * n_levels) + 1)
    inner = prof.copy()
    inner[:lo] = 0
    inner[hi:] = 0
    peak = int(np.argmax(inner))
    if inner[peak] <= 0:
        return None
    sel = [peak]
    for step in (-1, 1):          # neighbouring levels of the same horizontal slab
        k = peak + step
        while 0 <= k < n_levels and inner[k] >= 0.5 * inner[peak]:
            sel.append(k)
            k += step
    w = inner[sel]
    return z_lo + dz * float(np.dot(sel, w) / w.sum())


def _angles(X, Y, Z, lm):
    cx, cy = lm.ivc_at(Z)
    return np.degrees(np.arctan2(X - cx, -(Y - cy))), np.hypot(X - cx, Y - cy)


def _find_vein_angles(vessels, X, Y, Z, lm, cfg):
    """(right, middle, left) hepatic-vein plane angles from the angle histogram, or None."""
    sel = vessels & (Z > lm.portal_z + cfg["vein_margin_mm"])
    if sel.sum() < 10:
        return None
    theta, r = _angles(X[sel], Y[sel], Z[sel], lm)
    keep = (r > cfg["vein_min_r"] * lm.liver_radius_mm) & (theta > -150) & (theta < 90)
    if keep.sum() < 10:
        return None
    hist = np.bincount(np.floor(theta[keep] + 180).astype(int) % 360, weights=r[keep], minlength=360)
    hist = ndimage.gaussian_filter1d(hist, cfg["peak_sigma_deg"], mode="wrap")
    order = np.argsort(hist)[::-1]
    peaks = []
    for b in order:
        if hist[b] <= 0.05 * hist[order[0]]:
            break
        if b > 0 and hist[b - 1] > hist[b] or b < 359 and hist[b + 1] > hist[b]:
            continue   # not a local maximum
        if all(min(abs(b - p), 360 - abs(b - p)) >= cfg["peak_min_sep_deg"] for p in peaks):
            peaks.append(int(b))
        if len(peaks) == 3:
            break
    if len(peaks) < 3:
        return None
    return tuple(sorted(p - 180 + 0.5 for p in peaks))


def _default_angles(liver, X, Y, Z, lm):
    """No veins found: planes at fixed fractions of the liver's angular extent above the portal plane."""
    up = liver & (Z > lm.portal_z)
    if up.sum() < 10:
        up = liver
    theta, _ = _angles(X[up], Y[up], Z[up], lm)
    theta = theta[theta < 90]
    if theta.size < 10:
        return (-60.0, -20.0, 15.0)
    return tuple(float(np.percentile(theta, q)) for q in (30, 60, 80))


# ----------------------------------------------------------------------------- segments


def assign_segments(liver, world, lm: Landmarks, cfg) -> np.ndarray:
    """Couinaud labels (uint8, 0 outside the liver) from the landmarks."""
    X, Y, Z = (a[liver] for a in world)
    theta, r = _angles(X, Y, Z, lm)
    right, middle, left = lm.vein_angles
    upper = Z >= np.float32(lm.portal_z)
    seg = np.where(theta < right, np.where(upper, 7, 6),
          np.where(theta < middle, np.where(upper, 8, 5),
          np.where(theta < left, 4, np.where(upper, 2, 3))))
    height = lm.liver_z[1] - lm.liver_z[0]
    paracaval = ((r < cfg["caudate_r"] * lm.liver_radius_mm) & (theta >= middle)
                 & (Z > lm.portal_z - cfg["caudate_below"] * height)
                 & (Z < lm.portal_z + cfg["caudate_above"] * height))
    behind_left = theta > 90.0      # behind the IVC's coronal plane, on its left
    seg = np.where(paracaval | behind_left, 1, seg)
    out = np.zeros(liver.shape, np.uint8)
    out[liver] = seg.astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- geometry helpers


def _sampling(volume: Volume) -> tuple:
    """Voxel size in array order (z, y, x)."""
    return tuple(float(s) for s in volume.spacing[::-1])


def _crop(image: Volume, liver: np.ndarray, margin_mm: float):
    """Bounding box of the liver plus a margin; (slices, (X, Y, Z) world arrays, image, liver) of it."""
    zz, yy, xx = np.nonzero(liver)
    sp = _sampling(image)
    crop = []
    for lo, hi, s, n in zip((zz.min(), yy.min(), xx.min()), (zz.max(), yy.max(), xx.max()), sp, liver.shape):
        m = int(math.ceil(margin_mm / s))
        crop.append(slice(max(0, int(lo) - m), min(n, int(hi) + m + 1)))
    crop = tuple(crop)
    k = np.arange(crop[0].start, crop[0].stop, dtype=np.float32)
    j = np.arange(crop[1].start, crop[1].stop, dtype=np.float32)
    i = np.arange(crop[2].start, crop[2].stop, dtype=np.float32)
    m = (image.direction @ np.diag(image.spacing)).astype(np.float32)
    o = np.asarray(image.origin, np.float32)
    world = tuple(o[a] + m[a, 0] * i[None, None, :] + m[a, 1] * j[None, :, None] + m[a, 2] * k[:, None, None]
                  for a in range(3))
    return crop, world, image.array[crop], liver[crop]


def _level_step(Z) -> float:
    """Spacing of axial levels: the largest height step along one array axis."""
    steps = []
    for axis in range(3):
        if Z.shape[axis] > 1:
            steps.append(float(np.abs(np.take(Z, 1, axis=axis) - np.take(Z, 0, axis=axis)).max()))
    step = max(steps) if steps else 1.0
    return step if step > 1e-3 else 1.0


def _pixel_area(sampling, dz) -> float:
    """Area of one voxel's axial footprint (approximation for oblique grids: volume / level step)."""
    return float(np.prod(sampling)) / dz
