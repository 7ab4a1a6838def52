"""Shared training and inference parts: training, slices (2.5D data), config, modelstore, postprocess, networks/.

May import ``data`` and ``errors``; never a recipe (recipe-owned networks register themselves in modelstore).
"""
