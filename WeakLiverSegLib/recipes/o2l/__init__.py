"""Recipe ``o2l`` (default): box-attention teacher, localization-branch student.

Sun et al., "A Teacher-Student Framework for Semi-supervised Medical Image Segmentation From
Mixed Supervision" (../shared/papers/o2l_teacher_student_mixed_supervision_lits.txt).

1. Teacher annotator: a 2D U-Net on three consecutive slices with the hierarchical
   organ-to-lesion attention of Eq. 1-2 at each of the 4 encoder scales, cross-entropy (Eq. 3),
   trained on the strong set (cases with a mask, split train).  Its boxes are derived from the
   masks as in the paper: tumour boxes per lesion per slice (2D) and the organ box of the liver.
2. Pseudo-labels: the teacher's softmax for every weak case (boxes, no mask, split train),
   computed from the case's own boxes.  ``teacher.annotator`` (not in the paper) can hand this to a
   box annotator instead: ``litemedsam`` = LiteMedSAM's annotation of the case's liver box and
   lesions (per-slice boxes stacked per lesion, tumour clipped back to the per-slice boxes; one-hot;
   ``teacher.annotator_model`` = a fine-tuned LiteMedSAM folder, default the pretrained one),
   ``fused`` = LiteMedSAM's and this teacher's tumour probabilities averaged inside the boxes
   (``annotate.annotators.FusedAnnotator``).  ``box_constraint`` / ``pseudo_temperature`` apply to
   ``trained`` only.
3. Student segmentor: the same backbone plus the localization branch; loss Eq. 4 =
   cross-entropy with the strong masks and the soft pseudo-labels + ``alpha`` x class-weighted
   cross-entropy of the box one-hot map (background / liver box / lesion box, lesion wins).
4. Inference: every three-slice group of the volume (batched), at the working in-plane spacing,
   back to the input grid, then post-processing (largest liver component, hole filling, no
   lesion outside the liver).  The localization branch is never computed there.

Ablations (``config``): ``teacher.attention`` none | multichannel | o2l_noshortcut | o2l;
``student.variant`` strong_only | mixed | mixed_loc | full.  ``full`` (the upper bound) trains on
the *truth* masks of the weak cases (``truth`` in the store), which no other code path reads.

Deviations from the paper, for a CPU budget of a few minutes (all are config fields):

* Adam (lr 1e-3) instead of SGD (teacher lr 1e-3, student 3e-4, momentum 0.9): SGD at those
  rates does not converge in a few hundred steps.  The paper's setting is
  ``{"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9}`` (teacher) / ``3e-4`` (student).
* Steps, not epochs: ``teacher.steps`` (300) / ``student.steps`` (600) optimisation steps of 8
  three-slice groups; the learning rate is multiplied by 0.95 every step over the last 15 %
  (the paper: every epoch after 3000 of 4000 for the student, which anneals to ~0 within about
  100 epochs; the teacher keeps it constant there).  The student gets twice the teacher's
  steps: without box input it needs them to pick up the small tumours.
* Images are resampled in-plane to ``spacing_mm`` (1.5 mm) so 512x512 CT runs on a CPU; random
  crops of ``crop`` pixels (160 = 240 mm, about the paper's 320 px at 0.7 mm; smaller images
  are used whole); ``roi_prob`` of the crops are centred on a slice inside the organ box (half
  of them on a lesion slice) instead of uniformly anywhere.
* Localization loss class weights: lesion 1 and liver 0.1 as in the paper; background (not
  given in the paper) 0.1: like the liver box it is a large region, and the paper's point is
  that the small lesion boxes should dominate this loss.
* The attention's ``conv`` is two 3x3 convolutions with batch norm (the paper: "convolutional
  layers followed by batch normalization"); attended encoder features also feed the next
  encoder level.
* A soft Dice term is added to both cross-entropies (``dice_weight`` 1.0; 0 = the paper's
  cross-entropy only).  With a few hundred steps, tumours (< 1 % of the pixels) stay
  under-confident under cross-entropy alone: on the 20-case phantom (300 teacher steps) the
  O2L teacher's median tumour probability inside tumours was 0.6 (pseudo-label tumour Dice
  0.87, box filling 0.85), with Dice 0.97 (Dice 0.905); a plain U-Net on the strong set alone
  reached tumour Dice 0.09 without and 0.53 with it.
* ``teacher.box_constraint`` (default off, the paper has none) can clip pseudo-labels to the
  boxes; ``teacher.pseudo_temperature`` (default 1 = the paper's soft labels) can sharpen them.

Files: ``config.py`` (DEFAULTS, validation), ``data.py`` (case -> working grid, box maps),
``inference.py`` (teacher / student probabilities, ``segment``, ``pseudo``, ``box_annotator``), ``training.py`` (teacher,
pseudo-labels, student).  The networks are shared: ``learn/networks/unet2d.py``.
May import data, anatomy, learn, evaluation (and annotate); another recipe only through ``recipes.get``.
"""

from .config import NAME, RECIPE_VERSION, NETWORK_CLASS, LABELS, PHASES, STUDENT_VARIANTS, DEFAULTS, resolve_config
from .data import mask_boxes
from .inference import constrain_to_boxes, sharpen, segment, pseudo
from .training import train
