"""Recipe ``sdnet``: semi-supervised liver segmentation from a few masks and many unlabelled volumes.

Huang et al., "SD-Net: a semi-supervised double-cooperative network for liver segmentation from
computed tomography (CT) images" (../shared/papers/sdnet_double_cooperative_semi_supervised_liver.txt).

Two 3D networks, a VNet and a residual VNet (``learn/networks/vnet3d.py``), see the same batch: half
labelled patches (cases with a mask, split train) and half unlabelled (split-train cases without
a mask) (Eq. 1-2).  Per step:

1. Adaptive mask fine-tuning (labelled half): the disagreement region is where the two argmax
   predictions differ (Eq. 3); each network's supervised loss is CE + Dice + the MSE between its
   softmax and the one-hot mask over that region only (Eq. 6-7).
2. Dynamic pseudo-labels (unlabelled half, Algorithm 1): the network with the lower Dice loss on
   the labelled half is the teacher; its softmax, sharpened with T = 0.1, is the soft target of
   the other network's MSE loss (Eq. 8).  The teacher gets no unsupervised loss that step.

Both networks are kept; inference averages their softmax (``inference`` in the config: mean |
vnet | resvnet) with MONAI's sliding-window inference on the working grid, then resamples the
liver probability to the input grid, thresholds at 0.5 and keeps the largest component with its
holes filled.  The recipe predicts the liver only (label 1); tumour is not predicted.
``liver_mask(model, volume)`` gives other recipes that liver (organ box, Couinaud frame,
post-processing mask).

``method: "vnet"`` trains the single-VNet baseline instead (labelled cases only, CE + Dice, the
same schedule), and ``disagreement_loss`` (mse | wce | none) gives the loss ablation of Table 2.

Deviations from the paper (config fields; the paper's values in brackets):

* Working grid: the volume is resampled to ``spacing_mm`` (3 mm isotropic) and trained on random
  ``patch`` crops (32^3 voxels = 96 mm; the paper trains full-resolution LiTS volumes on a V100).
  ``foreground_fraction`` of the labelled crops are centred near a liver voxel.
* Networks at CPU size: ``VNet`` base width 4, 3 levels (MONAI's VNet blocks; base 16 / 4 levels
  is exactly MONAI's VNet, ``class: "monai.VNet"`` uses MONAI's class itself) and ``ResVNet``
  base 8, 3 levels.  Dropout off (tiny batches).
* Optimiser: SGD, momentum 0.9, weight decay 1e-4, lr 0.01 divided by 10 every ``lr_step`` of
  ``iterations`` (200 of 1200) [same]; ``steps`` scales both together.  For short CPU runs set
  ``iterations`` = ``steps`` and ``lr_step`` yourself (docs/results/sdnet_experiments.md uses
  300 / 200): 1200 compressed into a few hundred steps leaves too few at lr 0.01.
* The Dice loss is on the liver channel (MONAI ``include_background=False``): Eq. 5 pooled over
  both classes is dominated by the background and barely moves, which makes a poor teacher
  criterion.  CE is over both classes.
* Augmentation: random in-plane rotation (``rotate_deg``); random flips [the paper flips] are
  off by default (``flip_prob``) because a left-right flip puts the liver on the spleen's side.
* Post-processing (largest component, hole filling; ``postprocess``) is not in the paper.

Files: ``config.py`` (DEFAULTS, validation), ``cooperative.py`` (disagreement losses, dynamic pseudo-labels,
the SD-Net step), ``grid.py`` (working grid), ``sampling.py`` (3D patches), ``inference.py`` (``segment``,
``liver_mask``), ``training.py``.  The networks are shared (the liver model of other recipes): ``learn/networks/vnet3d.py``.
May import data, anatomy, learn, evaluation (and annotate); another recipe only through ``recipes.get``.
"""

from .config import (NAME, RECIPE_VERSION, LABELS, LABELS_NOTE, PHASES, METHODS, DISAGREEMENT_LOSSES, INFERENCE_MEMBERS,
                     NETWORK_CLASSES, DEFAULTS, resolve_config, lr_for)
from .cooperative import (disagreement_region, one_hot, disagreement_mse, disagreement_wce, dice_loss, supervised_loss,
                          sharpen, pick_teacher, sdnet_step)
from .grid import working_grid, image_to_working, mask_to_working
from .inference import binary_entropy, segment, liver_mask
from .training import train
