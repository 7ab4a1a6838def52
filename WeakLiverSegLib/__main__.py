"""``python -m WeakLiverSegLib`` = ``weakliverseg`` (what Slicer's PythonSlicer runs)."""

import sys

from .app.cli import main

sys.exit(main())
