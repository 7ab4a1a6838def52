"""Images, label maps, boxes and the weak-label store: volume, imageio, terminology, boxes, store.

Imports nothing of ours but ``errors`` (the bottom layer: everything else may import it).
"""
