"""Shared anatomical priors: couinaud_map (eight Couinaud segments from CT + liver mask).

May import ``data`` and ``errors``; used by the couinaud recipe and the Slicer tumour table.
"""
