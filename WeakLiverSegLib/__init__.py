"""WeakLiverSeg: weakly-supervised liver and liver-tumour segmentation (pure-Python library).

Packages by concern, each importing only the ones below it (docs/ARCHITECTURE.md):
data < synth, anatomy, learn, evaluation < annotate < recipes < app, slicer.  This root holds
``__version__`` and ``errors`` (importable by all).  Nothing outside ``slicer/`` imports slicer,
qt or vtk, and ``slicer/`` only inside functions.
"""

__version__ = "0.1.0"
