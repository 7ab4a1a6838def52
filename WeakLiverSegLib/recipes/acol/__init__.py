"""Recipe ``acol``: tumour pseudo-masks from boxes by anchor-based region mining (ACoL + dense CRF).

Fan et al., "Weakly Supervised Liver Tumor Segmentation Based on Anchor Box and Adversarial
Complementary Learning" (../shared/papers/anchor_box_acol_region_mining.txt).  A second
box-to-mask teacher that needs no pixel label at all (``o2l``'s teacher needs a strong set).

1. Region-mining classifier (``fpn_classifier.py``): ResNet-50 + FPN on three-slice
   crops around the tumour boxes; positives = the tumour boxes of the store (2D per-slice boxes
   preferred, 3D boxes on every slice they cover), negatives = FPN anchors (areas 32^2..256^2,
   ratios 1:1, 1:2, 2:1, one set per level P2..P5) that do not overlap any box, the 10 % nearest
   to a box centre per level, ``N`` of them drawn at random (256 in the paper).  Box features
   come from the level of Eq. 2.  Two branches A / B (ACoL, delta 0.6); ``mode: cam`` keeps
   branch A only (the paper's CAM baseline).
2. Pseudo-masks: for each tumour box, the fused map max(norm A, norm B) resized to the box is the
   tumour unary of a dense CRF run inside the box (mean-field in torch: Gaussian + bilateral
   kernels, Potts compatibility); background outside the boxes; in-box pixels left background
   are *ignored* by the segmentation loss (label 255).
3. Segmentation network on the pseudo-masks: the project's 2D U-Net on three-slice groups,
   masked two-class soft Dice loss (MONAI ``MaskedDiceLoss``: ignored pixels count nowhere;
   background and tumour Dice averaged, see below), poly learning rate
   ``lr (1 - it / max_it) ** 0.9``.  Cases with a real mask use it (no ignored pixel).

The recipe is tumour-only: labels are 0 (not tumour) and 2 (tumour); nothing here knows the
liver.  ``segment`` runs the student; given tumour boxes it returns the teacher's pseudo-mask
inside them instead (the box-to-mask tool); a liver box, if given, limits the student's output.

Deviations from the paper (all config fields):

* No ImageNet weights (nothing can be downloaded; MONAI has no 2D ResNet-50 weights): the
  classifier trains from scratch.  ``classifier.size``: ``paper`` (width 1, FPN 256, heads 512,
  RoI 14, N 256, batch 8), ``cpu`` (width 0.25, FPN 64, heads 128, RoI 8, N 64, batch 4) or
  ``auto`` (paper on a GPU, cpu otherwise); each of those fields can be set on its own.
* The positive / negative loss is class-balanced (mean over the positives + mean over the
  negatives): one to three boxes face N anchors per crop; the paper does not say how it balances.
* Steps, not epochs; Adam (lr 1e-3) by default for both networks, as in ``o2l``, for
  from-scratch training in a few hundred steps (SGD was not tried here).  The paper's settings:
  ``classifier: {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}``,
  ``segmenter: {"optimizer": "sgd", "lr": 5e-3, "momentum": 0.9, "weight_decay": 1e-4}``
  (the poly schedule applies to the segmenter either way).
* The segmentation network is the project's 2D U-Net, not DeepLab-v3 (no torchvision here).
* Segmenter Dice over both classes (``segmenter.dice_background``, default true; false = the
  tumour-only Dice used before): a tumour-only Dice is exactly 1 with zero gradient on a batch
  without tumour (healthy slices, crops beside the tumour), so it cannot say "no tumour here".
  Not yet shown to help on its own: on a 12-case phantom (true masks, 300 steps of 4 crops of
  128 px) it scored 0.14 held-out tumour Dice against 0.34 for the tumour-only Dice.  What did
  help there was training longer (900 steps of 4: 0.64): the old 300 steps left the student
  far from converged, hence 600 steps of 8 crops by default now (as ``o2l``'s student).
* Images are resampled in-plane to ``spacing_mm`` = 0.8 mm (about LiTS's 512 px pixels, so the
  anchor sizes mean what they mean in the paper); crops of ``classifier.crop`` pixels around a box.
* Dense CRF: exact mean-field on the box crop (all pixel pairs, symmetric kernel normalisation as
  in pydensecrf; no CRF package installs here), the crop shrunk to at most ``crf.max_pixels``
  pixels first; boxes with a side under ``crf.min_side`` working pixels are filled (nothing to
  mine).  Kernel settings (``crf.*``) were chosen on a synthetic cohort (seed 11) and ircadb/p01.
* Fill prior (``crf.fill_prior``, 0.6; ``null`` = the paper's raw unary): before the CRF the
  fused map ``m`` becomes ``m ** g``, ``g`` chosen so that its mean over the box is 0.6.  The
  min-max normalised maps of a from-scratch miner cover about a third of a box where tumours
  fill two thirds, and the raw unary then loses to box fill (p01: 0.47-0.59 vs 0.80); with the
  prior, p01 reaches 0.86 (see docs/results/acol_experiments.md).
* ``classifier.mode``: ``box`` (Table 2's baseline: the filled boxes are the pseudo-masks) and
  ``centre`` (a centred Gaussian instead of a mined map: how much the mining adds over the CRF
  and the fill prior alone) train no classifier.
* ``pseudo.annotator: litemedsam`` (not in the paper) replaces mining + CRF by LiteMedSAM's annotation
  of the boxes (``learn.slices.annotate_case``; the liver box, when the case has one, prompts too;
  ``pseudo.annotator_model`` = a fine-tuned LiteMedSAM folder): hard 0 / tumour masks without an
  ignore region, and no classifier is trained.  ``segment`` / ``pseudo`` of such a model annotate too.

Files: ``config.py`` (DEFAULTS, validation), ``fpn_classifier.py`` (ResNet-50 + FPN region miner with
ACoL branches), ``anchor_boxes.py`` (anchors, negatives), ``classifier.py`` (its batches and loss), ``mining.py``
(localization maps + dense CRF -> pseudo-masks), ``segmenter.py`` (targets, loss, LR), ``data.py``, ``training.py``,
``inference.py`` (``pseudo_mask``, ``segment``, ``pseudo``).
May import data, anatomy, learn, evaluation (and annotate); another recipe only through ``recipes.get``.
"""

from .config import (NAME, RECIPE_VERSION, LABELS, TUMOUR_VALUE, IGNORE, PHASES, MODES, MINING_MODES, DEFAULTS,
                     resolve_config)
from .anchor_boxes import anchors, overlaps_any, sample_negatives
from .classifier import BoxCase, classifier_batch
from .mining import dense_crf, mine_pseudo, calibrate_fill, box_probability, pseudo_labels
from .segmenter import encode_target, decode_target, masked_dice_loss, poly_lr
from .training import train, dice
from .inference import pseudo_mask, segment, pseudo
