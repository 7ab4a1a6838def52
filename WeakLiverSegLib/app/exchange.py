"""``weakliverseg export`` / ``import`` / ``dicomseg``: the application side of data.exchange and
data.dicom_seg.  Here (not in data/) because pseudo-labels for weak-only cases need a recipe's
``pseudo()``, looked up from the model's recipe name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InputError


def pseudo_label_files(dataset, model_dir, workdir, device="cpu", progress=None) -> tuple:
    """Run the model's teacher on ``dataset``: ``({case id: label file}, source)`` for the cases
    without an expert mask (files live in ``workdir``, which must outlive the export)."""
    from .. import recipes
    from ..data.store import Dataset
    from ..learn.modelstore import load_model

    model = load_model(model_dir, device=device)
    recipe = recipes.get(model.recipe)
    if not hasattr(recipe, "pseudo"):
        raise InputError(f"--include-pseudo {model_dir}: recipe {model.recipe!r} has no teacher to make pseudo-labels")
    store = Dataset.load(recipe.pseudo(model, dataset, Path(workdir) / "pseudo_store", device, progress))
    files = {}
    for case in dataset.cases.values():
        other = store.cases.get(case.id)
        if case.mask is None and case.split != "test" and other is not None and other.mask is not None:
            files[case.id] = store.root / other.mask
    return files, {"model": str(Path(model_dir).resolve()), "recipe": model.recipe}


def run_export(dataset_dir, out, fmt, include_pseudo=None, phases=None, device="cpu", progress=None) -> dict:
    """Export a store (``data.exchange.export_dataset``), with a model's pseudo-labels if asked."""
    from ..data.exchange import check_target, export_dataset
    from ..data.store import Dataset

    check_target(out)  # before any long pseudo-labelling
    dataset = Dataset.load(dataset_dir)
    if include_pseudo is None:
        return export_dataset(dataset, out, fmt, phases=phases, progress=progress)
    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wls-pseudo-", dir=Path(out).resolve().parent) as work:
        files, source = pseudo_label_files(dataset, include_pseudo, work, device=device, progress=progress)
        return export_dataset(dataset, out, fmt, pseudo=files, pseudo_source=source, phases=phases, progress=progress)
