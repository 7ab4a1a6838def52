"""Recipe ``wsts``: an enhanced-phase teacher (DDRL + USSE) teaching a non-enhanced-phase student (SDDRL + SDUNet).

Weakly-supervised teacher-student network for liver tumour segmentation from non-enhanced
images (../shared/papers/wsts_weakly_supervised_teacher_student_nonenhanced_mri.txt).
Training needs both phases of every case ("enhanced" and "plain" in the store); ``segment``
reads the plain (non-enhanced) phase only.

Training (the paper's three steps, section 4.2), per 2D slice on an in-plane working grid:

1. ``detector``: DDRL (two relative-entropy-biased SAC agents, ``rl_boxes``) explores the
   enhanced slices holding a tumour box (pixel-labelled cases: boxes from their masks;
   box-labelled cases: their boxes) and learns to move a box onto the tumour (reward Eq. 11
   from the box label).  SDDRL, the same pair of agents on the plain slices, learns at the same
   time from the teacher's transitions (same actions and rewards, plain-phase states).
2. ``usse``: the teacher's mean teacher (``usse``) on the enhanced slices with a tumour, input =
   slice + DDRL detection box (with location / size noise), Dice on the pixel-labelled cases
   and uncertainty-sifted self-consistency on all; its target model then gives pseudo tumour
   masks of the box-labelled cases on the slices their boxes mark (other slices: no tumour).
3. ``student``: SDUNet (a Dense U-Net) on the plain slices, input = slice + SDDRL detection box
   (hard attention, with the same noise), loss Eq. 21: Dice with the masks (pixel cases) +
   ramped ``gamma'`` x Dice with the USSE pseudo masks (box cases).

Inference (plain phase only): SDDRL detects a box on every slice, SDUNet segments; tumour =
probability > 0.75 (the paper's threshold).

Additions / deviations (all config fields), mostly for a CPU budget:

* The student also predicts the liver (a second sigmoid channel, Dice on the pixel-labelled
  cases only; the paper segments tumours only), so the output is a full 0/1/2 label map;
  post-processing as in ``o2l`` (largest liver component, holes filled, tumour inside the liver).
* ``usse.bce`` / ``student.bce`` (1.0) add pixel cross-entropy to the Dice losses of Eq. 18 and
  Eq. 21.  With Dice alone and the box as hard attention, short runs settle on "tumour = the
  whole box" on every slice (tumour-free ones included): recall ~100 %, Dice ~5 % on whole
  volumes, and pseudo masks as large as the box.  0 restores the paper's losses.
* ``network.tumour_prior`` (0.01): USSE's and the student's tumour outputs start at that probability
  (``dense_unet.set_output_prior``).  Started near 0.5, 3 of 12 phantom students (one cached detector,
  different student seeds / variants) scored tumour Dice 0 at 0.75; the two inspected had every tumour
  head weight negative, their probability capped at 0.40 / 0.70.  With the prior the same seeds scored
  0.72 / 0.70 (all pixel-labelled) and 0.38 (pixel half alone).
* Adam for the segmentation networks (the paper: SGD), learning rate x ``lr_decay`` (0.8)
  ``lr_decays`` times over a stage, never below 1e-6.  Steps, not epochs.
* The RL grid is ``detector.size`` pixels (the paper: 256); box, step and scale sizes are
  given in pixels of a 256-pixel image (the paper's 24, 6, 4) and scaled to that grid.
  The agents see a box-centred view of the paper's state, share one small CNN per agent
  (the paper: three ResNet-18s), ``detector.reward_scale`` softens Eq. 11's exponent,
  ``detector.imitation`` adds behaviour cloning to SDDRL, ``detector.random_starts`` starts half
  the training episodes off the fixed start boxes: see ``rl_boxes``.
* ``detector.warm_start`` (0.7) / ``detector.expert`` (1.0): the agents first clone a greedy expert
  that moves the box towards the slice's box label (70 % of the rounds), then SAC takes over with
  the expert's action kept in the policy loss.  0 / 0 is the paper's SAC from the start, which on
  the phantom study's budget reached test IoU 3-7 % (boxes grown over the image); cloned, the DDRL
  union reaches 24-48 % (mean 36 % over 3 seeds; docs/results/wsts_detectors.md).  Discount 0.9 and student
  learning rate 1e-3 instead of the paper's 0.99 and 1e-4 (short runs); a fixed temperature
  0.05 instead of the paper's 1.0 (an entropy bonus of that size drowns Eq. 11's rewards; tuned
  automatically it collapsed and the boxes shrank to a pixel).
* ``usse.attention`` = ``label`` (default): on slices that carry a box label (every tumour
  slice of the training cases) USSE is trained and pseudo-labels with that box -- the one the
  radiologist drew, with the same location / size noise -- instead of the DDRL proposal
  (``detection``, the paper).  On a CPU budget the detectors reach IoU 0.07 (DDRL) to 0.18 (one
  agent) with the true box (docs/results/wsts_experiments.md), and pseudo masks drawn inside such
  proposals taught the student that box cases hold no tumour.  The student and inference still use SDDRL proposals.
* Slices with no tumour box are part of the student's training (the paper trains and tests on
  tumour slices only): the SDDRL box lands somewhere there and SDUNet learns to ignore it.
* ``hu_window`` per phase: the non-enhanced tumour contrast is a few HU, so the plain phase
  gets a narrower window than the enhanced one.
* A 3D variant of the detector (6 actions) is not implemented.

Files: ``config.py`` (DEFAULTS, validation, RL environment), ``data.py`` (two-phase cases),
``rl_boxes.py`` (DDRL / SDDRL soft actor-critic box agents), ``detector.py`` (their training and detection),
``usse.py`` (mean teacher with multi-scale box uncertainty), ``dense_unet.py`` (USSE / SDUNet backbone),
``segmenters.py`` (teacher / student batches, losses, pseudo-labels, prediction), ``training.py``, ``inference.py`` (``segment``).
May import data, anatomy, learn, evaluation (and annotate); another recipe only through ``recipes.get``.
"""

from .config import (NAME, RECIPE_VERSION, LABELS, PHASES, NETWORK_CLASS, POLICY_CLASS, USSE_ATTENTION, DEFAULTS,
                     resolve_config, box_env, stage_lr, _set_lr)
from .data import WCase, prepare_case
from .detector import rl_slices, make_detector, detector_round, detect_case, detection_iou, usse_boxes
from .segmenters import _inputs, sample_student_batch, student_loss, make_net, predict_case, labels_from_probs
from .training import _Stages, STAGES, train
from .inference import segment
