"""Synthetic abdominal CT cohorts with known truth (``weakliverseg phantom``).

Every case is drawn from its own random stream: a tissue map (body, fat, muscle, spine, ribs,
aorta, IVC, kidneys, spleen, stomach, lung bases, liver with hepatic and portal veins,
gallbladder) rendered twice on the same grid, as an enhanced (portal-venous) and a
non-enhanced "plain" phase, plus 0..N irregular tumours inside the liver that are clearly
hypodense in the enhanced phase and only subtly different in the plain one.  Shading, blur
and Gaussian noise follow.  The Couinaud map (segments 1..8) comes from anatomical-style
planes: vertical planes through the IVC axis along the three hepatic veins, and a horizontal
portal plane holding the portal branches; segment 1 (caudate) is the paracaval region.

Anatomy is laid out in fractions of the field of view (so any shape / spacing gives a whole
abdomen); tumour radii are in millimetres.  Each tumour is centred deep inside one segment
(chosen uniformly) and shrunk until it stays there, so a case's Couinaud label (the segments
holding tumour voxels, exactly) is informative; radii also shrink where the liver is small.
Axes: arrays (z, y, x); world LPS with an identity direction, so x (i) increases towards the
patient's left (the liver sits at low i), y (j) posterior, z (k) superior.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..data.volume import Volume

MIX_KEYS = ("strong", "box", "couinaud", "volume", "unlabelled", "test")
DEFAULT_MIX = "strong=0.3,box=0.6,test=0.1"
PREVIEW_CASES = 4

# Tissue classes of the internal map, and their HU in (enhanced, plain).
AIR, FAT, MUSCLE, VFAT, BOWEL, CORTEX, MARROW, CANAL, DISC, RIB = range(10)
AORTA, IVC, PORTAL, HEPATIC, LIVER, SPLEEN, KCORTEX, KMEDULLA, GALL = range(10, 19)
GWALL, GFLUID, GGAS, LUNG, HEART, ARM_BONE, TABLE = range(19, 26)
_HU = {
    AIR: (-1000, -1000), FAT: (-105, -105), MUSCLE: (55, 50), VFAT: (-95, -95), BOWEL: (45, 32),
    CORTEX: (750, 750), MARROW: (260, 250), CANAL: (20, 20), DISC: (85, 85), RIB: (520, 520),
    AORTA: (200, 42), IVC: (140, 38), PORTAL: (170, 40), HEPATIC: (150, 38), LIVER: (110, 55),
    SPLEEN: (120, 48), KCORTEX: (195, 33), KMEDULLA: (140, 30), GALL: (8, 8),
    GWALL: (70, 40), GFLUID: (12, 12), GGAS: (-950, -950), LUNG: (-850, -850),
    HEART: (160, 40), ARM_BONE: (700, 700), TABLE: (150, 150),
}


# ----------------------------------------------------------------------------- domain randomisation

# Per-tissue HU ranges of the CT phases a randomised case draws from (SynthSeg-style: every case
# gets its own values inside these ranges).  Tissues not listed keep the table above (enhanced
# column for contrast phases, plain column for "non-contrast").
_PHASE_HU = {
    "non-contrast": {LIVER: (25, 70), SPLEEN: (38, 55), AORTA: (30, 50), IVC: (28, 48), PORTAL: (30, 50),
                     HEPATIC: (28, 48), KCORTEX: (25, 40), KMEDULLA: (22, 38), MUSCLE: (40, 60), BOWEL: (20, 45),
                     GWALL: (25, 45), HEART: (30, 50)},
    "arterial": {LIVER: (60, 90), SPLEEN: (80, 150), AORTA: (230, 400), IVC: (60, 120), PORTAL: (90, 170),
                 HEPATIC: (40, 80), KCORTEX: (180, 300), KMEDULLA: (50, 100), MUSCLE: (45, 65), BOWEL: (40, 90),
                 GWALL: (60, 110), HEART: (200, 350)},
    "portal-venous": {LIVER: (95, 135), SPLEEN: (100, 135), AORTA: (140, 230), IVC: (110, 170), PORTAL: (140, 200),
                      HEPATIC: (120, 180), KCORTEX: (150, 220), KMEDULLA: (120, 200), MUSCLE: (50, 70),
                      BOWEL: (40, 80), GWALL: (60, 100), HEART: (130, 220)},
    "delayed": {LIVER: (75, 105), SPLEEN: (75, 105), AORTA: (90, 140), IVC: (85, 135), PORTAL: (90, 135),
                HEPATIC: (85, 135), KCORTEX: (100, 160), KMEDULLA: (110, 200), MUSCLE: (50, 70), BOWEL: (35, 70),
                GWALL: (50, 90), HEART: (90, 140)},
}
PHASES = tuple(_PHASE_HU) + ("mr-like",)
RANDOMIZATION_PRESETS = ("none", "intensity", "all")


@dataclass(frozen=True)
class Randomization:
    """Domain-randomisation knobs of the phantom generator (SynthSeg-style).  The defaults (all off)
    keep the generator exactly as it was: same random draws, byte-identical files.

    Every draw of a knob comes from a stream of its own (spawned from the case's stream), so the
    image-only knobs (``intensities``, ``bias_field``, ``noise_hu``, ``blur_mm``,
    ``inplane_spacing_mm``) never change the label map, and a knob that is off draws nothing.

    * ``intensities``: each case draws a phase from ``phases`` (non-contrast, arterial,
      portal-venous, delayed: per-tissue HU ranges in ``_PHASE_HU``; "mr-like": every tissue an
      independent value in [-150, 250] HU, fat and air included) and its per-tissue values in
      it; the "enhanced" image gets that phase, the "plain" one a non-contrast draw.
    * ``bias_field``: maximum relative amplitude of a smooth multiplicative field on (HU + 1000).
    * ``noise_hu``: (lo, hi) Gaussian noise SD per case (replaces the cohort's ``noise``).
    * ``blur_mm``: (lo, hi) point-spread SD in mm per case (replaces the fixed 0.9 mm).
    * ``inplane_spacing_mm``: (lo, hi) simulated acquisition pixel size per case: the images are
      synthesised on the cohort's grid (the working resolution), the PSF is at least 0.42 x this
      pixel, and the drawn value is recorded in the case's ``params``.
    * ``slice_thickness_mm``: (lo, hi) slice spacing per case, drawn log-uniformly (the grid's z
      spacing changes; the number of slices follows, at most ``max_slices``).
    * ``partial_fov``: probability that the slab covers only part of the abdomen (40-80 % of its
      height, anywhere from below the liver to the lung bases and heart: the liver cut at the top
      or bottom).  Thin slices with few ``max_slices`` also give partial coverage.
    * ``patient_size``: (lo, hi) body size relative to the field of view (> 1: cut at the edges).
    * ``arms``: probability of arms beside the body (and a scanner table under it).
    * ``rotation_deg``: maximum in-plane rotation of the patient (uniform in +-).
    * ``heart``: probability of a heart (blood pool + myocardium) above the liver dome.
    * ``liver_shapes``: lobe proportions drawn widely (left lobe 0.3-1.6 x, right lobe 0.75-1.2 x),
      a Riedel lobe (25 %), small nodular cirrhotic livers (15 %: shrunken right lobe, big caudate,
      nodular surface), and an overall liver scale 0.8-1.15.
    * ``tumours``: per tumour a kind -- hypodense (45 %), hyperdense (15 %), rim enhancing (15 %),
      near-invisible (+-3-12 HU, 10 %), necrotic (15 %) -- and a radius drawn log-uniformly in the
      cohort's ``tumor_radius_mm`` (the cohort's contrasts are then not used).
    """

    intensities: bool = False
    phases: tuple = PHASES
    bias_field: float = 0.0
    noise_hu: tuple | None = None
    blur_mm: tuple | None = None
    inplane_spacing_mm: tuple | None = None
    slice_thickness_mm: tuple | None = None
    max_slices: int = 64
    partial_fov: float = 0.0
    patient_size: tuple | None = None
    arms: float = 0.0
    rotation_deg: float = 0.0
    heart: float = 0.0
    liver_shapes: bool = False
    tumours: bool = False

    @classmethod
    def preset(cls, name: str) -> "Randomization":
        """``none`` (today's phantoms), ``intensity`` (appearance only: intensities, bias, noise, blur),
        ``all`` (every knob; the starter model's training set)."""
        if name == "none":
            return cls()
        look = dict(intensities=True, bias_field=0.04, noise_hu=(2.0, 25.0), blur_mm=(0.5, 1.8),
                    inplane_spacing_mm=(0.5, 1.0))
        if name == "intensity":
            return cls(**look)
        if name == "all":
            return cls(**look, slice_thickness_mm=(0.6, 5.0), partial_fov=0.5, patient_size=(0.8, 1.15),
                       arms=0.5, rotation_deg=12.0, heart=0.7, liver_shapes=True, tumours=True)
        raise InputError(f"phantom randomisation: unknown preset {name!r} (allowed: {', '.join(RANDOMIZATION_PRESETS)})")

    @property
    def active(self) -> bool:
        return self != Randomization(phases=self.phases, max_slices=self.max_slices)

    def check(self) -> "Randomization":
        """Validated copy (InputError naming the knob)."""
        def rng_pair(name, lo_min, hi_max):
            v = getattr(self, name)
            if v is None:
                return None
            try:
                lo, hi = (float(x) for x in v)
            except (TypeError, ValueError):
                raise InputError(f"phantom randomisation {name}: expected (low, high), got {v!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo_min <= lo <= hi <= hi_max):
                raise InputError(f"phantom randomisation {name}: expected {lo_min} <= low <= high <= {hi_max}, got {v!r}")
            return (lo, hi)

        out = dict(intensities=bool(self.intensities), liver_shapes=bool(self.liver_shapes), tumours=bool(self.tumours))
        phases = tuple(self.phases)
        if not phases or any(p not in PHASES for p in phases):
            raise InputError(f"phantom randomisation phases: expected some of {list(PHASES)}, got {list(phases)}")
        out["phases"] = phases
        for name, lo, hi in (("noise_hu", 0, 500), ("blur_mm", 0, 20), ("inplane_spacing_mm", 0.05, 20),
                             ("slice_thickness_mm", 0.1, 20), ("patient_size", 0.3, 3)):
            out[name] = rng_pair(name, lo, hi)
        for name in ("bias_field", "partial_fov", "arms", "heart"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise InputError(f"phantom randomisation {name}: expected a number in [0, 1], got {v!r}")
            out[name] = float(v)
        if isinstance(self.rotation_deg, bool) or not isinstance(self.rotation_deg, (int, float)) \
                or not 0 <= self.rotation_deg <= 180:
            raise InputError(f"phantom randomisation rotation_deg: expected 0..180, got {self.rotation_deg!r}")
        out["rotation_deg"] = float(self.rotation_deg)
        if not _is_whole(self.max_slices) or self.max_slices < 4:
            raise InputError(f"phantom randomisation max_slices: expected an integer >= 4, got {self.max_slices!r}")
        out["max_slices"] = int(self.max_slices)
        return Randomization(**out)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_value(cls, value) -> "Randomization":
        """None / a preset name / a dict of knobs (unknown keys refused) / a Randomization -> checked knobs."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value.check()
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise InputError(f"phantom randomisation: unknown knob(s) {bad} (known: {sorted(known)})")
            conv = {k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
            return cls(**conv).check()
        raise InputError(f"phantom randomisation: expected a preset name or a dict of knobs, got {value!r}")


# ----------------------------------------------------------------------------- label mix

def parse_mix(text) -> dict:
    """``"strong=0.3,box=0.6,test=0.1"`` (or a dict) -> fractions for all MIX_KEYS, summing to 1."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"--mix: expected key=fraction pairs like {DEFAULT_MIX!r}, got {text!r}")
        items = []
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise InputError(f"--mix: {part.strip()!r} is not key=fraction (example: {DEFAULT_MIX!r})")
            items.append((key, value))
    mix = dict.fromkeys(MIX_KEYS, 0.0)
    seen = set()
    for key, value in items:
        key = str(key).strip()
        if key not in MIX_KEYS:
            raise InputError(f"--mix: unknown key {key!r} (allowed: {', '.join(MIX_KEYS)})")
        if key in seen:
            raise InputError(f"--mix: key {key!r} given twice")
        seen.add(key)
        try:
            frac = float(value)
        except (TypeError, ValueError):
            raise InputError(f"--mix: {key}={value!r} is not a number") from None
        if not math.isfinite(frac) or frac < 0 or frac > 1:
            raise InputError(f"--mix: {key}={value} must be a fraction between 0 and 1")
        mix[key] = frac
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise InputError(f"--mix: fractions sum to {total:g}, they must sum to 1 ({text!r})")
    return mix


def split_counts(mix: dict, cases: int) -> dict:
    """Whole numbers of cases per mix group (largest remainder, ties in MIX_KEYS order)."""
    return _largest_remainder({k: mix[k] * cases for k in MIX_KEYS}, cases)


def _largest_remainder(exact: dict, total: int) -> dict:
    """Round the values of ``exact`` to integers summing to ``total`` (ties in key order)."""
    keys = list(exact)
    counts = {k: int(math.floor(exact[k] + 1e-9)) for k in keys}
    order = sorted(keys, key=lambda k: (-(exact[k] - counts[k]), keys.index(k)))
    for k in order[: max(0, total - sum(counts.values()))]:
        counts[k] += 1
    return counts


# ----------------------------------------------------------------------------- cohort

def generate_cohort(out, cases=20, seed=0, shape=(96, 96, 48), spacing=(1.5, 1.5, 3.0), noise=10.0,
                    tumors=(0, 3), tumor_radius_mm=(4.0, 15.0), plain_contrast=-8.0, enhanced_contrast=-45.0,
                    healthy_fraction=0.2, mix=DEFAULT_MIX, preview=False, progress=None, randomization=None):
    """Write a synthetic cohort to the new dataset folder ``out`` and return its ``Dataset``.

    Every case has both phases ("enhanced" = reference, "plain"), and truth {"mask",
    "couinaud_map"} for evaluation.  Training labels follow the mix group of the case:
    strong = mask + tumour boxes (3D per lesion and 2D per slice) + liver box + Couinaud +
    volume label; box = boxes + liver box; couinaud = Couinaud segments + volume label;
    volume = volume label; unlabelled = none; test = split "test", no labels (truth only).
    Couinaud labels list exactly the segments holding tumour voxels ([] when healthy).
    Groups and healthy cases (``healthy_fraction``, spread over the groups, leaving each group
    of two or more cases at least one tumour case) are assigned in a seeded shuffled order;
    pathological cases get ``tumors`` = (min, max) tumours (at least 1).  Contrasts are tumour
    minus liver HU.  The same arguments give byte-identical files.

    ``randomization``: None / a preset name (``none``, ``intensity``, ``all``) / a dict of knobs /
    a ``Randomization`` (see there).  When any knob is on, the knobs and every case's drawn values
    (phase, noise, spacing, slab, ...) are written to ``randomization.json`` in the cohort folder.
    """
    from ..data.boxes import boxes_from_mask, liver_box_from_mask
    from ..data.store import Dataset

    params = _check_params(cases, seed, shape, spacing, noise, tumors, tumor_radius_mm, plain_contrast,
                           enhanced_contrast, healthy_fraction)
    mix = parse_mix(mix)
    rz = Randomization.from_value(randomization)
    drawn = {}
    streams = np.random.SeedSequence(params["seed"]).spawn(params["cases"] + 1)
    groups, healthy = _assign(np.random.default_rng(streams[0]), mix, params["cases"], params["healthy_fraction"])
    dataset = Dataset.create(out, name=f"phantom-seed{params['seed']}")
    lo, hi = params["tumors"]
    shown = []
    for index, (group, is_healthy) in enumerate(zip(groups, healthy)):
        if progress is not None:
            progress.check_cancelled()
        rng = np.random.default_rng(streams[index + 1])
        n_tumors = 0 if is_healthy or hi == 0 else int(rng.integers(max(1, lo), hi + 1))
        vols = generate_case(rng, params["shape"], params["spacing"], params["noise"], n_tumors,
                             params["tumor_radius_mm"], params["plain_contrast"], params["enhanced_contrast"],
                             randomization=rz)
        lab = vols["label"].array
        tumour = bool((lab == 2).any())       # a tiny liver may have had no room for a tumour
        couinaud = sorted(int(s) for s in np.unique(vols["couinaud_map"].array[lab == 2]))
        volume_label = "tumour" if tumour else "healthy"
        source = "derived" if group == "strong" else "phantom"
        boxes = [replace(b, source=source) for b in boxes_from_mask(lab, 2) + boxes_from_mask(lab, 2, per_slice=True)]
        liver_box = liver_box_from_mask(lab)
        liver_box = None if liver_box is None else replace(liver_box, source=source)
        labels = {
            "strong": dict(mask=vols["label"], boxes=boxes, liver_box=liver_box, couinaud=couinaud,
                           volume_label=volume_label),
            "box": dict(boxes=boxes, liver_box=liver_box),
            "couinaud": dict(couinaud=couinaud, volume_label=volume_label),
            "volume": dict(volume_label=volume_label),
            "unlabelled": {},
            "test": {},
        }[group]
        case_id = f"case{index:03d}"
        drawn[case_id] = vols.get("params", {})
        dataset.add_case(case_id, images={"enhanced": vols["enhanced"], "plain": vols["plain"]},
                         reference="enhanced", split="test" if group == "test" else "train",
                         truth={"mask": vols["label"], "couinaud_map": vols["couinaud_map"]}, **labels)
        if preview and _wanted_in_preview(shown, tumour):
            shown.append({"title": f"{case_id} {group} {volume_label}", "tumour": tumour,
                          "images": {"enhanced": vols["enhanced"], "plain": vols["plain"]}, "label": lab,
                          "boxes": [b for b in boxes if not b.is_2d] + ([liver_box] if liver_box else [])})
        if progress is not None:
            progress.update("phantom", index + 1, params["cases"])
    if rz.active:
        import json

        Path(out, "randomization.json").write_text(json.dumps({"knobs": rz.to_dict(), "cases": drawn}, indent=1) + "\n",
                                                   encoding="utf-8")
    if preview:
        from .preview import montage

        montage(sorted(shown, key=lambda r: not r["tumour"]), Path(out) / "preview.png")
    return dataset


def _wanted_in_preview(shown, tumour) -> bool:
    """Up to PREVIEW_CASES cases, keeping one place for a healthy case while tumour cases fill the rest."""
    n_tumour = sum(r["tumour"] for r in shown)
    n_healthy = len(shown) - n_tumour
    if len(shown) >= PREVIEW_CASES:
        return False
    return n_tumour < PREVIEW_CASES - 1 if tumour else n_healthy == 0


def _assign(rng, mix, cases, healthy_fraction):
    """Mix group and healthy flag of every case, in a seeded shuffled order."""
    counts = split_counts(mix, cases)
    groups = [k for k in MIX_KEYS for _ in range(counts[k])]
    groups = [groups[i] for i in rng.permutation(cases)]
    healthy = [False] * cases
    members = {key: [i for i, g in enumerate(groups) if g == key] for key in MIX_KEYS}
    total = int(math.floor(healthy_fraction * cases + 0.5))
    quota = _largest_remainder({k: healthy_fraction * len(members[k]) for k in MIX_KEYS}, total)
    for key in MIX_KEYS:
        n = quota[key]
        if healthy_fraction < 1 and len(members[key]) >= 2:
            n = min(n, len(members[key]) - 1)     # evaluation needs a tumour in every group of 2+
        for i in rng.permutation(members[key])[:n] if members[key] else ():
            healthy[int(i)] = True
    return groups, healthy


def _is_whole(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and float(v).is_integer())


def _check_params(cases, seed, shape, spacing, noise, tumors, tumor_radius_mm, plain_contrast,
                  enhanced_contrast, healthy_fraction) -> dict:
    """Validated, normalized knobs; InputError naming the knob otherwise."""
    def ints(value, n, name):
        try:
            vals = tuple(value)
        except TypeError:
            vals = ()
        if len(vals) != n or not all(_is_whole(v) for v in vals):
            raise InputError(f"phantom {name}: expected {n} integer(s), got {value!r}")
        return tuple(int(v) for v in vals)

    def floats(value, n, name):
        try:
            vals = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"phantom {name}: expected {n} numbers, got {value!r}") from None
        if len(vals) != n or not all(math.isfinite(v) for v in vals):
            raise InputError(f"phantom {name}: expected {n} finite numbers, got {value!r}")
        return vals

    def number(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise InputError(f"phantom {name}: expected a finite number, got {value!r}")
        return float(value)

    def integer(value, name):
        if not _is_whole(value):
            raise InputError(f"phantom {name}: expected an integer, got {value!r}")
        return int(value)

    cases = integer(cases, "cases")
    if cases < 1:
        raise InputError(f"phantom cases: must be at least 1, got {cases}")
    seed = integer(seed, "seed")
    if seed < 0:
        raise InputError(f"phantom seed: must be a non-negative integer, got {seed}")
    shape = ints(shape, 3, "shape")
    if min(shape[:2]) < 16 or shape[2] < 4:
        raise InputError(f"phantom shape: needs at least 16 x 16 voxels in-plane and 4 slices, got {shape}")
    spacing = floats(spacing, 3, "spacing")
    if min(spacing) <= 0:
        raise InputError(f"phantom spacing: must be positive millimetres, got {spacing}")
    noise = number(noise, "noise")
    if noise < 0:
        raise InputError(f"phantom noise: must be >= 0 HU, got {noise}")
    tumors = ints(tumors, 2, "tumors")
    if not 0 <= tumors[0] <= tumors[1]:
        raise InputError(f"phantom tumors: expected MIN MAX with 0 <= MIN <= MAX, got {tumors}")
    radius = floats(tumor_radius_mm, 2, "tumor radius")
    if not 0 < radius[0] <= radius[1]:
        raise InputError(f"phantom tumor radius: expected MIN MAX mm with 0 < MIN <= MAX, got {radius}")
    healthy_fraction = number(healthy_fraction, "healthy fraction")
    if not 0 <= healthy_fraction <= 1:
        raise InputError(f"phantom healthy fraction: must be between 0 and 1, got {healthy_fraction}")
    return dict(cases=cases, seed=seed, shape=shape, spacing=spacing, noise=noise, tumors=tumors,
                tumor_radius_mm=radius, plain_contrast=number(plain_contrast, "plain contrast"),
                enhanced_contrast=number(enhanced_contrast, "enhanced contrast"), healthy_fraction=healthy_fraction)


# ----------------------------------------------------------------------------- one case

def generate_case(rng, shape=(96, 96, 48), spacing=(1.5, 1.5, 3.0), noise=10.0, n_tumors=1,
                  tumor_radius_mm=(4.0, 15.0), plain_contrast=-8.0, enhanced_contrast=-45.0,
                  randomization=None) -> dict:
    """One synthetic case: {"enhanced", "plain"} int16 HU, {"label"} 0/1/2 and {"couinaud_map"} 0..8 uint8.

    ``shape`` is (nx, ny, nz) and ``spacing`` (sx, sy, sz) mm; contrasts are tumour minus liver HU
    (each tumour draws its own, 0.7-1.3 times the value).  ``n_tumors`` is how many are placed;
    fewer may fit in a small liver.  ``rng`` is a ``numpy.random.Generator``.
    ``randomization`` (see ``Randomization``; None = off) adds domain randomisation; the values
    drawn for the case are returned under ``"params"``.
    """
    rz = Randomization.from_value(randomization)
    knobs = None
    params = {}
    if rz.active:
        # one stream per knob, spawned without touching ``rng``: a knob that is off draws nothing
        names = [f.name for f in fields(Randomization)]
        knobs = dict(zip(names, rng.spawn(len(names))))
        shape, spacing, frame = _draw_geometry(rz, knobs, shape, spacing, params)
    else:
        frame = None
    a = _Anatomy(rng, shape, spacing, frame=frame, rz=rz if rz.active else None, knobs=knobs)
    tissue, liver_env = a.tissue_map()
    label = a.liver_label(tissue, liver_env)
    couinaud = a.couinaud(label)
    delta_e = np.zeros(label.shape, np.float32)
    delta_p = np.zeros(label.shape, np.float32)
    a.add_tumours(label, tissue, couinaud, n_tumors, tumor_radius_mm, enhanced_contrast, plain_contrast,
                  delta_e, delta_p)
    looks = (None, None)
    if rz.active:
        looks = _draw_looks(rz, knobs, a.spacing, noise, params)
        params.update(a.drawn)
    enhanced = a.render(tissue, delta_e, phase=0, noise=noise, look=looks[0])
    plain = a.render(tissue, delta_p, phase=1, noise=noise, look=looks[1])
    geo = dict(spacing=a.spacing, origin=a.origin, direction=np.eye(3))
    out = {
        "enhanced": Volume(enhanced, **geo),
        "plain": Volume(plain, **geo),
        "label": Volume(label, **geo),
        "couinaud_map": Volume(couinaud, **geo),
    }
    if rz.active:
        out["params"] = params
    return out


def _loguniform(rng, lo, hi) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_geometry(rz, knobs, shape, spacing, params):
    """Grid (shape, spacing) and anatomical frame of a randomised case: slab, thickness, size, rotation."""
    nx, ny, nz0 = shape
    sx, sy, sz0 = spacing
    Hz = nz0 * sz0 / 2                      # the nominal abdomen's half height, mm
    sz = sz0
    if rz.slice_thickness_mm is not None:
        sz = _loguniform(knobs["slice_thickness_mm"], *rz.slice_thickness_mm)
    height, z_centre = 2 * Hz, 0.0
    partial = rz.partial_fov > 0 and knobs["partial_fov"].random() < rz.partial_fov
    if partial:
        height = float(knobs["partial_fov"].uniform(0.4, 0.8)) * 2 * Hz
    nz = int(min(max(4, round(height / sz)), rz.max_slices if rz.active else nz0))
    if rz.slice_thickness_mm is None and not partial:
        nz = nz0
    height = nz * sz
    if partial:   # anywhere from below the liver to the lung bases / heart: the liver cut at top or bottom
        lo, hi = -1.05 * Hz + height / 2, 1.45 * Hz - height / 2
        z_centre = float(knobs["partial_fov"].uniform(lo, hi)) if hi > lo else 0.0
    elif height < 2 * Hz - 1e-6:   # thin slices, capped slab: somewhere over the liver
        z_centre = float(knobs["max_slices"].uniform(-0.45 * Hz, 0.75 * Hz))
    size = 1.0
    if rz.patient_size is not None:
        size = float(knobs["patient_size"].uniform(*rz.patient_size))
    angle = float(knobs["rotation_deg"].uniform(-rz.rotation_deg, rz.rotation_deg)) if rz.rotation_deg else 0.0
    params.update(slice_mm=round(sz, 3), slices=nz, slab_centre_mm=round(z_centre, 1), partial_fov=partial,
                  patient_size=round(size, 3), rotation_deg=round(angle, 2))
    frame = {"H": (nx * sx / 2 * size, ny * sy / 2 * size, Hz), "z_centre": z_centre, "angle": angle}
    return (nx, ny, nz), (sx, sy, sz), frame


def _phase_lut(rng, phase) -> np.ndarray:
    """Per-tissue HU of one case in a drawn phase."""
    col = 1 if phase == "non-contrast" else 0
    lut = np.array([_HU[c][col] for c in range(len(_HU))], np.float32)
    if phase == "mr-like":
        keep = {AIR, GGAS, LUNG}
        for c in range(len(_HU)):
            if c not in keep:
                lut[c] = rng.uniform(-150, 250)
        return lut
    for c, (lo, hi) in _PHASE_HU[phase].items():
        lut[c] = rng.uniform(lo, hi)
    lut[FAT] = lut[VFAT] = rng.uniform(-120, -70)
    return lut


def _draw_looks(rz, knobs, spacing, noise, params):
    """Appearance of the two images of a randomised case: LUT, bias, blur, noise."""
    looks = [{}, {}]
    if rz.intensities:
        r = knobs["intensities"]
        phase = str(r.choice(list(rz.phases)))
        looks[0]["lut"] = _phase_lut(r, phase)
        looks[1]["lut"] = _phase_lut(r, "non-contrast" if phase != "mr-like" else "mr-like")
        params["phase"] = phase
    acq = None
    if rz.inplane_spacing_mm is not None:
        acq = float(knobs["inplane_spacing_mm"].uniform(*rz.inplane_spacing_mm))
        params["acquired_pixel_mm"] = round(acq, 3)
    if rz.blur_mm is not None or acq is not None:
        b = float(knobs["blur_mm"].uniform(*rz.blur_mm)) if rz.blur_mm is not None else 0.9
        b_xy = max(b, 0.42 * acq) if acq is not None else b
        b_z = max(b, 0.42 * spacing[2]) if rz.blur_mm is not None else b
        for look in looks:
            look["blur_mm"] = (b_z, b_xy, b_xy)
        params["blur_mm"] = [round(b_z, 3), round(b_xy, 3)]
    if rz.noise_hu is not None:
        n = float(knobs["noise_hu"].uniform(*rz.noise_hu))
        for look in looks:
            look["noise"] = n
        params["noise_hu"] = round(n, 2)
    if rz.bias_field > 0:
        r = knobs["bias_field"]
        for look in looks:
            look["bias"] = (float(r.uniform(0, rz.bias_field)), np.random.default_rng(r.integers(2 ** 63)))
    return looks


def _smooth_field(rng, coords, modes, freq, amp):
    """Sum of random plane waves over normalized coordinates: a cheap smooth random field of RMS ``amp``."""
    out = None
    for _ in range(modes):
        d = rng.normal(size=3)
        d *= rng.uniform(*freq) / np.linalg.norm(d)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.cos(np.float32(d[0]) * coords[0] + np.float32(d[1]) * coords[1]
                      + np.float32(d[2]) * coords[2] + np.float32(phase))
        out = wave if out is None else out + wave
    return (out * np.float32(amp / math.sqrt(modes / 2))).astype(np.float32)


def _direction(theta_deg):
    """Unit (x, y) vector in the axial plane; 0 deg = anterior (-y), positive towards the patient's left (+x)."""
    t = math.radians(theta_deg)
    return np.array([math.sin(t), -math.cos(t)])


class _Anatomy:
    """Random anatomy of one case in deformed millimetre coordinates X, Y, Z (full 3D arrays)."""

    def __init__(self, rng, shape, spacing, frame=None, rz=None, knobs=None):
        self.rng = rng
        self.rz, self.knobs, self.drawn = rz, knobs, {}
        self.nx, self.ny, self.nz = (int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        sx, sy, sz = self.spacing
        self.origin = tuple(-(n - 1) / 2 * s for n, s in zip((self.nx, self.ny, self.nz), self.spacing))
        self.H = (self.nx * sx / 2, self.ny * sy / 2, self.nz * sz / 2)   # half extents, mm
        if frame is not None:       # randomised: the anatomy's frame differs from the grid (size, slab)
            self.H = tuple(float(h) for h in frame["H"])
        Hx, Hy, Hz = self.H
        self.S = min(Hx, Hy)                                             # in-plane size unit, mm
        x = ((np.arange(self.nx) - (self.nx - 1) / 2) * sx).astype(np.float32)[None, None, :]
        y = ((np.arange(self.ny) - (self.ny - 1) / 2) * sy).astype(np.float32)[None, :, None]
        z = ((np.arange(self.nz) - (self.nz - 1) / 2) * sz).astype(np.float32)[:, None, None]
        if frame is not None:
            z = z + np.float32(frame["z_centre"])
            if frame["angle"]:
                c, s_ = (np.float32(v) for v in (math.cos(math.radians(frame["angle"])),
                                                  math.sin(math.radians(frame["angle"]))))
                x, y = c * x + s_ * y, -s_ * x + c * y
        self.norm = (x / np.float32(Hx), y / np.float32(Hy), z / np.float32(Hz))
        # One smooth deformation moves every organ together, so anatomy varies case to case
        # while vessels, planes and organs stay consistent with each other.
        self.X = x + _smooth_field(rng, self.norm, 4, (1.0, 2.5), 0.03 * self.S)
        self.Y = y + _smooth_field(rng, self.norm, 4, (1.0, 2.5), 0.03 * self.S)
        self.Z = z + _smooth_field(rng, self.norm, 4, (1.0, 2.5), 0.03 * Hz)
        self.shape_zyx = self.X.shape

    # -- helpers
    def u(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    def ell(self, c, s):
        """Normalized squared radius of an ellipsoid (centre, semi-axes in mm); < 1 inside."""
        return ((self.X - np.float32(c[0])) / np.float32(s[0])) ** 2 + \
               ((self.Y - np.float32(c[1])) / np.float32(s[1])) ** 2 + \
               ((self.Z - np.float32(c[2])) / np.float32(s[2])) ** 2

    def ell2(self, c, s):
        """Same for an elliptic cylinder along z."""
        return ((self.X - np.float32(c[0])) / np.float32(s[0])) ** 2 + \
               ((self.Y - np.float32(c[1])) / np.float32(s[1])) ** 2

    def tube(self, p0, p1, r0, r1):
        """Voxels within a tapered tube from p0 to p1 (mm, 3D points)."""
        p0 = np.asarray(p0, np.float32)
        d = np.asarray(p1, np.float32) - p0
        dx, dy, dz = self.X - p0[0], self.Y - p0[1], self.Z - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / np.float32(d @ d), 0, 1)
        dist2 = (dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2
        r = np.float32(r0) + t * np.float32(r1 - r0)
        return dist2 < r * r

    # -- tissue map
    def tissue_map(self):
        u, rng = self.u, self.rng
        Hx, Hy, Hz = self.H
        S, X, Y, Z = self.S, self.X, self.Y, self.Z
        T = np.full(self.shape_zyx, AIR, np.uint8)

        # Body: ellipse flattened at the back (super-ellipse), subcutaneous fat, muscle wall.
        a, b, cy = u(0.86, 0.93) * Hx, u(0.64, 0.72) * Hy, u(-0.02, 0.04) * Hy
        self.cy, self.body_ab = cy, (a, b)
        p = np.where(Y > cy, np.float32(2.8), np.float32(2.0))
        rho = (np.abs(X / np.float32(a)) ** p + np.abs((Y - np.float32(cy)) / np.float32(b)) ** p) ** (1 / p)
        tf, tm = u(0.06, 0.14), 0.085
        body, wall, inner = rho < 1, rho < 1 - tf, rho < 1 - tf - tm
        T[body] = FAT
        T[wall] = MUSCLE
        # Visceral filler: bowel loops and mesenteric fat.
        bowel = _smooth_field(rng, self.norm, 8, (9.0, 16.0), 1.0) > u(-0.3, 0.1)
        T[inner] = np.where(bowel, BOWEL, VFAT)[inner]

        # Spine landmarks (the vertebral body centre anchors the retroperitoneum).
        vb = np.array([u(-0.02, 0.02) * Hx, cy + u(0.33, 0.38) * Hy])
        self.vb = vb
        ivc_c = vb + np.array([-0.21 * S, -0.19 * S]) + rng.uniform(-0.02, 0.02, 2) * S
        self.ivc = ivc_c

        # Lung bases at the top (painted once the liver is known), a soft-tissue diaphragm around them.
        lung = np.zeros(self.shape_zyx, bool)
        for side in (-1, 1):
            c = (side * 0.42 * Hx, cy + 0.2 * Hy, u(1.17, 1.27) * Hz)
            e = self.ell(c, (0.36 * Hx, 0.45 * Hy, 0.42 * Hz))
            T[(e < 1.25) & inner] = MUSCLE
            lung |= (e < 1) & inner

        # Stomach (left upper quadrant, anterior), often with an air-fluid level.
        cs = (u(0.26, 0.36) * Hx, cy - u(0.24, 0.32) * Hy, u(0.15, 0.35) * Hz)
        ss = (u(0.17, 0.22) * Hx, u(0.14, 0.19) * Hy, u(0.25, 0.35) * Hz)
        e = self.ell(cs, ss)
        stomach = (e < 1) & inner
        T[stomach] = GWALL
        T[(e < 0.7) & inner] = GFLUID
        if rng.random() < 0.8:
            T[(e < 0.7) & inner & (Y < cs[1] - u(0.3, 0.6) * ss[1])] = GGAS

        # Liver: right lobe + medial part + left lobe, a lobulated implicit surface.
        def jitter(c, s):
            c = [ci + rng.uniform(-0.03, 0.03) * h for ci, h in zip(c, self.H)]
            s = [si * rng.uniform(0.9, 1.1) for si in s]
            return c, s
        cR, sR = jitter((-0.40 * Hx, cy + 0.02 * Hy, 0.22 * Hz), (0.36 * Hx, 0.46 * Hy, 0.62 * Hz))
        cM, sM = jitter((-0.14 * Hx, cy - 0.12 * Hy, 0.32 * Hz), (0.22 * Hx, 0.28 * Hy, 0.42 * Hz))
        cL, sL = jitter((0.02 * Hx, cy - 0.27 * Hy, 0.42 * Hz), (0.27 * Hx, 0.17 * Hy, 0.30 * Hz))
        extra = None
        if self.rz is not None and self.rz.liver_shapes:
            (cR, sR), (cM, sM), (cL, sL), extra = self._vary_liver(cR, sR, cM, sM, cL, sL)
        F = np.maximum(np.maximum(1 - self.ell(cR, sR), 1 - self.ell(cM, sM)), 1 - self.ell(cL, sL))
        if extra is not None:
            F = np.maximum(F, 1 - self.ell(*extra["riedel"])) if extra.get("riedel") else F
        F += _smooth_field(rng, self.norm, 5, (3.0, 6.0), 0.08)
        if extra is not None and extra.get("nodular"):
            F += _smooth_field(self.knobs["liver_shapes"], self.norm, 8, (14.0, 26.0), extra["nodular"])
        inner_liver = rho < (1 - tf - tm) * 0.98
        liver_env = (F > 0) & inner_liver
        self.liver_top = cR[2] + 0.8 * sR[2]
        lung &= F < -0.35
        T[liver_env] = LIVER

        # Spleen (crescent), after the liver so it is not swallowed by the left lobe.
        cS = (u(0.52, 0.6) * Hx, cy + u(0.2, 0.3) * Hy, u(0.25, 0.45) * Hz)
        sS = (u(0.13, 0.17) * Hx, u(0.25, 0.31) * Hy, u(0.3, 0.4) * Hz)
        spleen = (self.ell(cS, sS) < 1) & (self.ell((cS[0] - 0.15 * Hx, cS[1] - 0.04 * Hy, cS[2]),
                                                     (sS[0], sS[1] * 0.8, sS[2])) > 1) & inner
        T[spleen] = SPLEEN
        lung &= self.ell(cS, sS) > 1.4
        T[lung & ~liver_env] = LUNG
        if self.rz is not None and self.rz.heart > 0 and self.knobs["heart"].random() < self.rz.heart:
            self._heart(T, liver_env, inner)

        # Kidneys: posterior, the right one lower (pushed down by the liver).
        for side, zc in ((-1, u(-0.55, -0.4)), (1, u(-0.42, -0.28))):
            c = (side * u(0.35, 0.41) * Hx, cy + u(0.32, 0.4) * Hy, zc * Hz)
            e = self.ell(c, (u(0.11, 0.13) * Hx, u(0.14, 0.17) * Hy, u(0.28, 0.34) * Hz))
            T[(e < 1) & inner] = KCORTEX
            T[(e < 0.45) & inner] = KMEDULLA

        # Psoas muscles, growing towards the pelvis.
        grow = np.clip((0.1 * Hz - Z) / Hz, 0, 1)
        for side in (-1, 1):
            r = np.float32(0.045 * S) + grow * np.float32(0.07 * S)
            T[(((X - np.float32(vb[0] + side * 0.16 * S)) ** 2 + (Y - np.float32(vb[1] - 0.02 * S)) ** 2) < r * r)
              & inner & (Z < 0.1 * Hz)] = MUSCLE

        # Gallbladder in the fossa on Cantlie's line, under the liver.
        self.theta = {"R": u(-75, -58), "M": u(-26, -12), "L": u(10, 22)}
        self.z_portal = cR[2] - u(0.0, 0.12) * Hz
        gall = np.zeros(self.shape_zyx, bool)
        if rng.random() < 0.7:
            g = ivc_c + u(0.45, 0.55) * S * _direction(self.theta["M"])
            gall = (self.ell((g[0], g[1], self.z_portal - u(0.15, 0.25) * Hz),
                             (u(0.06, 0.08) * S, u(0.1, 0.13) * S, u(0.14, 0.2) * Hz)) < 1) & liver_env
            T[gall] = GALL
        self.gall = gall

        # Vessels.  Hepatic veins: from the IVC at the dome, down and forward along the three
        # Couinaud vertical planes.  Portal veins: in the horizontal portal plane.
        top = np.array([ivc_c[0], ivc_c[1], self.liver_top])
        in_liver = liver_env & ~gall
        for key, length in (("R", 0.55), ("M", 0.5), ("L", 0.45)):
            dxy = _direction(self.theta[key]) * length * S
            end = top + np.array([dxy[0], dxy[1], -u(0.35, 0.5) * Hz])
            T[self.tube(top, end, 0.06 * S, 0.022 * S) & in_liver] = HEPATIC
        zp = self.z_portal
        hilum = np.append(ivc_c + 0.22 * S * _direction(u(-10, 5)), zp)
        self.hilum = hilum
        main_start = hilum + np.array([0.18 * S, 0.08 * S, -0.45 * Hz])
        portal = self.tube(main_start, hilum, 0.055 * S, 0.05 * S)
        r1 = hilum + np.append(0.22 * S * _direction(-90 + u(-10, 10)), 0)
        portal |= self.tube(hilum, r1, 0.045 * S, 0.04 * S)
        ant = r1 + np.append(0.26 * S * _direction((self.theta["R"] + self.theta["M"]) / 2), 0)
        post = r1 + np.append(0.28 * S * _direction(self.theta["R"] - 40), 0)
        portal |= self.tube(r1, ant, 0.04 * S, 0.02 * S) | self.tube(r1, post, 0.04 * S, 0.02 * S)
        l1 = hilum + np.append(0.3 * S * _direction(self.theta["L"] - 35), 0)
        portal |= self.tube(hilum, l1, 0.035 * S, 0.03 * S)
        portal |= self.tube(l1, l1 + np.append(0.22 * S * _direction(self.theta["L"] + 5), 0), 0.03 * S, 0.012 * S)
        T[portal & (in_liver | (~liver_env & inner & (Z < zp)))] = PORTAL

        # Great vessels and spine (they win over everything else).
        T[(self.ell2(ivc_c, (0.075 * S, 0.06 * S)) < 1) & inner] = IVC
        ao = vb + np.array([0.07 * S, -0.2 * S])
        T[(self.ell2(ao, (0.07 * S, 0.07 * S)) < 1) & inner] = AORTA
        self._spine(T, vb, wall)
        self._ribs(T, rho, tf, tm, body)
        if self.rz is not None and self.rz.arms > 0 and self.knobs["arms"].random() < self.rz.arms:
            self._arms_and_table(T)
        return T, liver_env

    # -- randomised anatomy (Randomization knobs; each draws from its own stream)
    def _vary_liver(self, cR, sR, cM, sM, cL, sL):
        """Lobe proportions, Riedel lobe, small nodular cirrhotic liver, overall scale."""
        r = self.knobs["liver_shapes"]
        Hx, Hy, Hz = self.H
        scale = r.uniform(0.8, 1.15)
        kR, kM, kL = r.uniform(0.75, 1.2), r.uniform(0.8, 1.25), r.uniform(0.3, 1.6)
        cirrhotic = r.random() < 0.15
        if cirrhotic:     # shrunken right lobe, hypertrophic caudate / left lobe, nodular surface
            scale, kR, kM, kL = r.uniform(0.65, 0.85), r.uniform(0.6, 0.8), r.uniform(1.0, 1.3), r.uniform(0.9, 1.4)
        extra = {"nodular": float(r.uniform(0.04, 0.1)) if cirrhotic else 0.0, "riedel": None,
                 "cirrhotic": bool(cirrhotic)}
        hinge = np.array(cM)

        def place(c, sz, k):
            c = hinge + (np.array(c) - hinge) * scale * (0.5 + 0.5 * k)
            return tuple(c), tuple(np.array(sz) * scale * k)

        cR, sR = place(cR, sR, kR)
        cM, sM = place(cM, sM, kM)
        cL, sL = place(cL, sL, kL)
        if not cirrhotic and r.random() < 0.25:   # Riedel lobe: a tongue of the right lobe reaching down
            c = (cR[0] + r.uniform(-0.05, 0.05) * Hx, cR[1] - r.uniform(0.0, 0.1) * Hy, cR[2] - r.uniform(0.5, 0.8) * sR[2])
            extra["riedel"] = (c, (r.uniform(0.12, 0.2) * Hx, r.uniform(0.15, 0.25) * Hy, r.uniform(0.35, 0.55) * Hz))
        self.drawn["liver"] = {"scale": round(float(scale), 3), "right": round(float(kR), 3),
                               "medial": round(float(kM), 3), "left": round(float(kL), 3),
                               "riedel": extra["riedel"] is not None, "cirrhotic": bool(cirrhotic)}
        return (cR, sR), (cM, sM), (cL, sL), extra

    def _heart(self, T, liver_env, inner):
        """Heart over the liver dome (left-anterior): myocardium around a blood pool."""
        r = self.knobs["heart"]
        Hx, Hy, Hz = self.H
        c = (r.uniform(0.02, 0.15) * Hx, self.cy - r.uniform(0.05, 0.2) * Hy, self.liver_top + r.uniform(0.25, 0.4) * Hz)
        sz = (r.uniform(0.3, 0.4) * Hx, r.uniform(0.3, 0.4) * Hy, r.uniform(0.3, 0.4) * Hz)
        e = self.ell(c, sz)
        free = inner & ~liver_env & (T != CORTEX) & (T != MARROW)
        T[(e < 1) & free] = MUSCLE
        T[(e < 0.55) & free] = HEART
        self.drawn["heart"] = True

    def _arms_and_table(self, T):
        """Arms at the sides of the body (fat, muscle, bone) and a scanner table under the back."""
        r = self.knobs["arms"]
        a, b = self.body_ab
        S = self.S
        air = T == AIR
        for side in (-1, 1):
            rad = r.uniform(0.12, 0.18) * S
            c = (side * (a + r.uniform(0.03, 0.2) * S + rad), self.cy + r.uniform(-0.15, 0.25) * b)
            e = self.ell2(c, (rad, rad * r.uniform(0.9, 1.2)))
            T[(e < 1) & air] = FAT
            T[(e < 0.65) & air] = MUSCLE
            T[(e < 0.05) & air] = ARM_BONE
            T[(e < 0.02) & air] = MARROW
        y0 = self.cy + b + r.uniform(0.01, 0.06) * self.H[1]
        T[(self.Y > y0) & (self.Y < y0 + 0.035 * S) & air] = TABLE
        self.drawn["arms"] = True

    def _spine(self, T, vb, wall):
        S, X, Y, Z, Hz = self.S, self.X, self.Y, self.Z, self.H[2]
        r = 0.12 * S
        d2 = (X - np.float32(vb[0])) ** 2 + (Y - np.float32(vb[1])) ** 2
        period, phase = 0.34 * Hz, self.u(0, 1)
        disc = np.abs(((Z / np.float32(period) + np.float32(phase)) % 1) - 0.5) > 0.42
        body_v = (d2 < r * r) & wall
        T[body_v] = CORTEX
        T[body_v & (d2 < (0.8 * r) ** 2)] = MARROW
        T[body_v & disc] = DISC
        canal = np.array([vb[0], vb[1] + r + 0.07 * S])
        dc2 = (X - np.float32(canal[0])) ** 2 + (Y - np.float32(canal[1])) ** 2
        arch = (dc2 < (0.1 * S) ** 2) | (self.ell2((canal[0], canal[1] + 0.13 * S), (0.03 * S, 0.08 * S)) < 1) \
            | (self.ell2((canal[0], canal[1] - 0.01 * S), (0.2 * S, 0.03 * S)) < 1)
        # Paraspinal muscles first, the arch over them.
        for side in (-1, 1):
            T[(self.ell2((canal[0] + side * 0.2 * S, canal[1] + 0.06 * S), (0.14 * S, 0.12 * S)) < 1) & wall] = MUSCLE
        T[arch & wall & ~disc] = CORTEX
        T[(dc2 < (0.055 * S) ** 2) & wall] = CANAL

    def _ribs(self, T, rho, tf, tm, body):
        """Oblique rib segments in the chest wall of the upper slices."""
        Hx, Hy, Hz = self.H
        phi = np.degrees(np.arctan2(self.X / np.float32(Hx), -(self.Y - np.float32(self.cy)) / np.float32(Hy)))
        aphi = np.abs(phi)
        lo, hi = 1 - tf - 0.8 * tm, 1 - tf - 0.25 * tm
        ring = (rho > lo) & (rho < hi) & (aphi > 35) & (aphi < 150) & (self.Z > -0.25 * Hz)
        period, phase = 0.22 * Hz, self.u(0, 1)
        band = np.cos(2 * np.pi * (self.Z / np.float32(period) + np.float32(phase) + aphi / np.float32(50.0))) > 0.55
        T[ring & band & body] = RIB

    # -- labels
    def liver_label(self, T, liver_env):
        liver = (T == LIVER) | (((T == PORTAL) | (T == HEPATIC)) & liver_env)
        comp, n = ndimage.label(liver)
        if n > 1:   # carving by other organs can leave crumbs; keep the liver itself
            sizes = np.bincount(comp.ravel())[1:]
            keep = comp == (1 + int(np.argmax(sizes)))
            T[liver & ~keep & (T == LIVER)] = VFAT
            liver = keep
        return liver.astype(np.uint8)

    def couinaud(self, label):
        """Segments 1..8 inside the liver from the hepatic-vein planes and the portal plane."""
        cm = np.zeros(label.shape, np.uint8)
        liver = label > 0
        X, Y, Z = self.X[liver], self.Y[liver], self.Z[liver]
        theta = np.degrees(np.arctan2(X - np.float32(self.ivc[0]), -(Y - np.float32(self.ivc[1]))))
        upper = Z >= np.float32(self.z_portal)
        th = self.theta
        seg = np.where(theta < th["R"], np.where(upper, 7, 6),
              np.where(theta < th["M"], np.where(upper, 8, 5),
              np.where(theta < th["L"], 4, np.where(upper, 2, 3))))
        # Caudate: paracaval liver left of / behind the IVC, between it and the hilum.
        c1 = np.append(self.ivc + 0.12 * self.S * _direction(40), self.z_portal + 0.1 * self.H[2])
        e1 = ((X - c1[0]) / (0.14 * self.S)) ** 2 + ((Y - c1[1]) / (0.11 * self.S)) ** 2 \
            + ((Z - c1[2]) / (0.25 * self.H[2])) ** 2
        seg = np.where((e1 < 1) | (theta > 100), 1, seg)
        cm[liver] = seg.astype(np.uint8)
        return cm

    # -- tumours
    def add_tumours(self, label, T, couinaud, n, radius_mm, c_e, c_p, delta_e, delta_p):
        """Place ``n`` tumours, each centred deep inside one Couinaud segment (chosen uniformly,
        so small segments get tumours too) and allowed to spill only a little into neighbours."""
        if n <= 0 or not label.any():
            return
        rng = self.rng
        sx, sy, sz = self.spacing
        zz, yy, xx = np.nonzero(label)
        crop = (slice(zz.min(), zz.max() + 1), slice(yy.min(), yy.max() + 1), slice(xx.min(), xx.max() + 1))
        # Distance (mm) from each liver voxel to the edge of its own segment (or of the liver).
        depth = np.zeros(label.shape, np.float32)
        for seg in range(1, 9):
            inside = couinaud[crop] == seg
            if inside.any():
                depth[crop] += ndimage.distance_transform_edt(inside, sampling=(sz, sy, sx)) * inside
        placed = []   # (centre mm (z, y, x), radius mm)
        kinds = self.knobs["tumours"] if self.rz is not None and self.rz.tumours else None
        for _ in range(int(n)):
            r = float(rng.uniform(*radius_mm)) if kinds is None else _loguniform(kinds, *radius_mm)
            if depth.max() < 0.8 * r:   # small liver: shrink the tumour to fit
                r = float(depth.max()) / 0.8 * 0.9
            if r < 1.2 * min(self.spacing):
                break
            cand = np.argwhere(depth >= 0.8 * r)
            for c, rc in placed:         # keep tumours apart (lobes reach about 1.4 r)
                cand = cand[np.linalg.norm(cand * np.array([sz, sy, sx]) - c, axis=1) > 1.5 * (r + rc)]
            if not len(cand):
                continue
            segs = couinaud[tuple(cand.T)]
            seg = rng.choice(np.unique(segs))
            pick = cand[segs == seg]
            centre = pick[rng.integers(len(pick))]
            placed.append((centre * np.array([sz, sy, sx]), r))
            self._one_tumour(label, T, couinaud, int(seg), centre, r, c_e, c_p, delta_e, delta_p)

    def _one_tumour(self, label, T, couinaud, seg, centre, r, c_e, c_p, delta_e, delta_p):
        rng, u = self.rng, self.u
        sx, sy, sz = self.spacing
        half = [int(math.ceil(1.9 * r / s)) + 1 for s in (sz, sy, sx)]   # lobes reach ~1.7 r
        sl = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, label.shape))
        dz = ((np.arange(sl[0].start, sl[0].stop) - centre[0]) * sz).astype(np.float32)[:, None, None]
        dy = ((np.arange(sl[1].start, sl[1].stop) - centre[1]) * sy).astype(np.float32)[None, :, None]
        dx = ((np.arange(sl[2].start, sl[2].stop) - centre[2]) * sx).astype(np.float32)[None, None, :]
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))         # random orientation
        axes = rng.uniform(0.75, 1.25, 3)
        axes = axes / np.prod(axes) ** (1 / 3) * r
        local = [np.float32(q[0, i]) * dx + np.float32(q[1, i]) * dy + np.float32(q[2, i]) * dz for i in range(3)]
        rho = np.sqrt(sum((local[i] / np.float32(axes[i])) ** 2 for i in range(3)))
        if rng.random() < 0.5:                                 # a second lobe
            off = rng.normal(size=3)
            off = off / np.linalg.norm(off) * u(0.45, 0.7) * r
            r2 = u(0.4, 0.65) * r
            rho2 = np.sqrt((dx - np.float32(off[0])) ** 2 + (dy - np.float32(off[1])) ** 2
                           + (dz - np.float32(off[2])) ** 2) / np.float32(r2)
            rho = np.minimum(rho, rho2)
        rho = rho + _smooth_field(rng, (dx / np.float32(r), dy / np.float32(r), dz / np.float32(r)), 4,
                                  (1.5, 3.5), 0.12)
        # Inside the liver and (nearly) inside the chosen segment: shrink the blob until at most
        # 2% spills into neighbours, so outlines stay natural; then drop small spills (< 10%).
        liver, own = label[sl] > 0, couinaud[sl] == seg
        for _ in range(5):
            inside = (rho < 1) & liver
            if (inside & ~own).sum() <= 0.02 * inside.sum():
                break
            rho = rho / np.float32(0.87)
        segs = couinaud[sl][inside]
        for other, count in zip(*np.unique(segs, return_counts=True)):
            if other != seg and count < 0.1 * segs.size:
                inside &= couinaud[sl] != other
        if not inside.any():
            return
        core = np.clip(1 - rho / 0.55, 0, 1)
        if self.rz is not None and self.rz.tumours:
            de, dp = self._tumour_contrast(rho, core)
        else:
            necrosis = u(0.2, 0.7) if r > 7 and rng.random() < 0.5 else 0.0
            de = c_e * u(0.7, 1.3) * (1 + necrosis * core)
            if rng.random() < 0.3:                                  # peripheral (rim) enhancement
                de = de + u(12, 30) * ((rho > 0.75) & (rho < 1))
            dp = c_p * u(0.7, 1.3) * (1 + 0.3 * necrosis * core)
        delta_e[sl] = np.where(inside, de, delta_e[sl])
        delta_p[sl] = np.where(inside, dp, delta_p[sl])
        label[sl][inside] = 2
        T[sl][inside] = LIVER          # the tumour displaces vessels inside it

    def _tumour_contrast(self, rho, core):
        """Randomised tumour look (HU relative to the liver) in the enhanced and plain images."""
        r = self.knobs["tumours"]
        kind = str(r.choice(["hypo", "hyper", "rim", "faint", "necrotic"], p=[0.45, 0.15, 0.15, 0.1, 0.15]))
        rim = ((rho > 0.7) & (rho < 1)).astype(np.float32)
        if kind == "hypo":
            de = -r.uniform(15, 70) + 0 * core
        elif kind == "hyper":
            de = r.uniform(15, 60) + 0 * core
        elif kind == "rim":
            de = -r.uniform(10, 50) + r.uniform(30, 80) * rim
        elif kind == "faint":
            de = r.choice([-1, 1]) * r.uniform(3, 12) + 0 * core
        else:
            de = -r.uniform(15, 40) * (1 + r.uniform(0.5, 1.5) * core)
        dp = de * r.uniform(0.15, 0.6)
        self.drawn.setdefault("tumours", []).append(kind)
        return np.asarray(de, np.float32), np.asarray(dp, np.float32)

    # -- images
    def render(self, T, delta, phase, noise, look=None):
        rng, u = self.rng, self.u
        look = look or {}
        lut = np.array([_HU[c][phase] for c in range(len(_HU))], np.float32)
        # Per-case enhancement varies like in real scans.
        if phase == 0:
            lut[LIVER] = u(100, 120); lut[AORTA] = u(170, 230); lut[PORTAL] = u(150, 185)
            lut[HEPATIC] = u(130, 165); lut[SPLEEN] = u(110, 130)
        else:
            lut[LIVER] = u(50, 62); lut[SPLEEN] = u(42, 52)
        if "lut" in look:
            lut = look["lut"]
        noise = look.get("noise", noise)
        img = lut[T]
        tissue = T != AIR
        img += np.where(tissue, _smooth_field(rng, self.norm, 6, (6.0, 14.0), 4.0)
                        + _smooth_field(rng, self.norm, 3, (0.5, 1.5), 6.0), 0).astype(np.float32)  # texture + shading
        img += np.where(T == BOWEL, _smooth_field(rng, self.norm, 6, (10.0, 20.0), 15.0), 0).astype(np.float32)
        img += delta
        if "bias" in look:      # smooth multiplicative field on the attenuation (HU + 1000)
            amp, brng = look["bias"]
            img = (img + 1000) * (1 + _smooth_field(brng, self.norm, 3, (0.5, 1.5), amp)) - 1000
        blur = look.get("blur_mm", (0.9, 0.9, 0.9))     # point-spread SD in mm (z, y, x)
        sigma = [b / s for b, s in zip(blur, self.spacing[::-1])]   # in voxels (z, y, x)
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
        if noise > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
