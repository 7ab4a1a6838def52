"""WeakLiverSeg: weakly-supervised liver and liver-tumour segmentation (pure-Python library).

Nothing here imports slicer, qt or vtk; the Slicer side lives in ``slicer_bridge``.
"""

__version__ = "0.1.0"
