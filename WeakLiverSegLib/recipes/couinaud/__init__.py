"""Recipe ``couinaud``: tumour segmentation from Couinaud-segment and volume-level labels only.

Lyu, Ma, Yuen, "Anatomical Prior-Inspired Label Refinement for Weakly Supervised Liver Tumor
Segmentation with Volume-Level Labels"
(../shared/papers/couinaud_volume_level_label_refinement.txt), built on CouinaudNet (Lyu et al.,
TMI 2022).

1. Liver and Couinaud map of every training case: the liver from the store mask, else from a
   liver model (``liver_model=PATH``), else from a small liver net trained here on the store's
   masked cases; the eight segments from ``couinaud_map.construct_couinaud`` (hepatic-vein and
   portal planes found in the enhanced CT).
2. Image-level labels: the volume label propagates to every slice (a Couinaud case "tumour in
   segments S", a volume-level case "tumour somewhere in the liver").  ILR (Eq. 2): a slice whose
   Couinaud map holds none of the labelled segments becomes healthy.
3. CouinaudNet: a 2D U-Net with input (three slices, region mask) -> tumour mask, trained only on
   healthy slices (healthy volumes, plus the slices ILR made healthy) in which a synthetic
   hypodense tumour is injected into a randomly chosen Couinaud segment (or, for the volume-level
   mode, anywhere in the liver).
4. Pixel pseudo-labels of the pathological slices: CouinaudNet's tumour probability ``o_k`` inside
   the labelled region; PLR (Eq. 3-6): ``m_k = o_k >= tau``, continuity index
   ``CI_k = c * max(Dice(m_k, m_k-1), Dice(m_k, m_k+1))``, refined ``o_k * CI_k >= tau``
   (c = 5, tau = 0.5).  Healthy slices get black masks.
5. A fully supervised segmenter (the project's 2.5D U-Net, background / liver / tumour) on the
   liver masks + refined tumour pseudo-labels with cross-entropy (Eq. 1) + the tumour's Dice
   (nnU-Net trains with CE + Dice).

Cases with a pixel mask (the strong set) give their true labels to the segmenter and their
tumour-free slices to CouinaudNet when ``use_masks`` is true; otherwise only their liver is used
and they count as Couinaud / volume cases.

Liver supervision (the paper assumes a liver is given): store masks where present; for the other
cases ``liver_model`` (any model folder of the project whose segment gives labels >= 1 for the
liver, e.g. an ``sdnet`` or ``o2l`` model), else ``liver_net`` trained on the store's masked
cases (train / val); with neither, training stops with an error naming the cases.

Deviations (CPU budget; all in the config): steps instead of epochs, Adam at 3e-3, a 2D U-Net
instead of nnU-Net, Dice on the tumour class only (``segmenter.dice_classes``), in-plane
resampling to ``spacing_mm``.  Synthetic tumours follow our own simple model
(elliptic, lobulated, soft edge, hypodense 15-90 HU with texture, optional necrosis / rim) since
the paper does not give CouinaudNet's generator.

Files: ``config.py`` (DEFAULTS, validation), ``cases.py`` (working-grid cases), ``liver.py`` (liver net),
``injection.py`` (synthetic tumours in a Couinaud segment), ``couinaudnet.py`` (CouinaudNet, its training and
pseudo-labels), ``refine.py`` (ILR / PLR), ``stages.py`` (shared training loop), ``segmenter.py`` (final
segmenter), ``training.py``, ``inference.py`` (``segment``, ``pseudo``).  The Couinaud constructor is shared:
``anatomy/couinaud_map.py``.
May import data, anatomy, learn, evaluation (and annotate); another recipe only through ``recipes.get``.
"""

from .config import (NAME, RECIPE_VERSION, LABELS, PHASES, STAGES, MIN_LIVER_PIXELS, DEFAULTS, resolve_config,
                     network_kwargs)
from .refine import volume_slice_labels, ilr, continuity_index, plr
from .injection import inject_tumour
from .cases import WeakCase, labels_on_working, select_cases, load_case, make_weak_case
from .stages import prepared_case
from .liver import train_liver_net, predict_softmax, liver_from_softmax
from .couinaudnet import CouinaudNet, healthy_pool, InjectionSampler, train_couinaudnet, couinaudnet_probs, pseudo_masks
from .segmenter import segmenter_cases, train_segmenter
from .training import train
from .inference import segment, pseudo
