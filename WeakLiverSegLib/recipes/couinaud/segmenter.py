"""couinaud final segmenter: trained on the refined pseudo-labels."""

from __future__ import annotations

import numpy as np

from ...learn.slices import Sampler
from .stages import _crop_size, _seg_batch_fn, _seg_loss, prepared_case, run_stage


def segmenter_cases(cases: list, tumours: dict) -> list:
    """PreparedCases for the final segmenter: liver + tumour (pixel labels, else pseudo-labels)."""
    out = []
    for case in cases:
        tumour = case.tumour if case.tumour is not None else tumours.get(case.case_id)
        if tumour is None:
            tumour = np.zeros(case.liver.shape, bool)
        out.append(prepared_case(case.case_id, case.image, case.liver, tumour))
    return out


def train_segmenter(net, opt, prepared: list, cfg, rng, device, start=0, save=None, progress=None, curves=None):
    scfg = cfg["segmenter"]
    sampler = Sampler(prepared, _crop_size(prepared, scfg["crop"]), scfg["batch_size"], rng, cfg["context"])
    run_stage("segmenter", net, opt, _seg_batch_fn(sampler, device), _seg_loss(scfg["dice_weight"], scfg["dice_classes"]),
              scfg, scfg["steps"], start, save, cfg["checkpoint_every"], progress, curves)
