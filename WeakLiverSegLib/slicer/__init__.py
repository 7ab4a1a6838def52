"""The only place that knows Slicer: slicer_bridge (MRML <-> Volume/Box, imports slicer/vtk lazily),
slicer_logic (everything the widget does, without Qt), runner (background CLI process).

May import every package below it (data, anatomy, learn, ..., app: the panel's background steps run the CLI's commands).
"""
