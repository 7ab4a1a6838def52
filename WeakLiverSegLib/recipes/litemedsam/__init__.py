"""Recipe ``litemedsam``: the LiteMedSAM box annotator as a model folder, and its fine-tuning.

Ma et al., "Segment anything in medical images" (Nat. Commun. 2024), LiteMedSAM variant (CVPR 2024
efficient MedSAM challenge): TinyViT image encoder + SAM prompt encoder + SAM mask decoder,
prompted with one box per slice.  The network, its preprocessing and the slice-by-slice
propagation live in ``annotate/``; this recipe makes it an ordinary recipe:

1. ``segment`` with boxes annotates them (``annotate.annotators.LiteMedSAMAnnotator``): a liver box
   -> label 1, each tumour box -> label 2.
2. ``train`` fine-tunes the mask decoder (and, with ``train_prompt_encoder``, the prompt encoder)
   on the store's strong cases (mask, split train) as MedSAM trains: one box per object per slice
   (the liver, and each tumour component) derived from the mask, each side enlarged by a random
   0..``box_jitter_px`` model pixels (MedSAM's ``bbox_shift``) plus 0..``box_grow`` of its side
   (the margin the propagation adds to its prompts); loss = Dice + BCE on the 256x256 low-res
   logits plus the MSE of the predicted IoU (LiteMedSAM's).  The image encoder is frozen, so every
   (slice, view) is encoded once and kept in memory; an optimisation step costs only the decoder.
   Views are the ones the annotator encodes: a square around the object's 3D box (``view: crop``)
   or the whole slice.  Start: ``--init`` (a LiteMedSAM model folder), default the pretrained model
   converted from the wheel (``annotate.convert.pretrained_dir``).

The result is a model folder (recipe ``litemedsam``, network ``LiteMedSAM``) usable as
``weakliverseg annotate --annotator MODEL``, ``segment --model MODEL --boxes B`` and as an o2l
pseudo-label annotator (``--set teacher.annotator=litemedsam --set teacher.annotator_model=MODEL``).

Files: ``config.py`` (DEFAULTS, validation), ``training.py`` (slice items, cached embeddings, the
fine-tuning loop), ``inference.py`` (``segment``).  Network: ``annotate/litemedsam.py``.
May import data, anatomy, learn, evaluation and annotate; another recipe only through ``recipes.get``.
"""

from ...annotate import litemedsam as _network  # noqa: F401  (registers the LiteMedSAM network class)
from .config import DEFAULTS, NAME, PHASES, RECIPE_VERSION, resolve_config
from .inference import segment
from .training import slice_items, train
