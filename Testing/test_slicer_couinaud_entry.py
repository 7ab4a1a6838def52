"""Issue 6: the store written by the Slicer module's Couinaud / volume-label entry trains ``couinaud``.

Real MRML nodes (the ``slicer-core`` wheel): a tiny phantom cohort is the "scanner archive";
each CT goes into the scene as a volume node and is annotated exactly as the widget's
"Add case" does it: Couinaud checkboxes + volume-label combo -> ``labels_from_form`` ->
``add_case_to_dataset`` (a Segment Editor mask only for the strongly labelled cases, which
the recipe's liver net needs; the weak cases have no liver mask).  The store then validates
deeply and trains ``--recipe couinaud`` in a background process, as the widget's Train
button starts it (the logic's argv and runner, jsonl progress).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from WeakLiverSegLib.errors import InputError

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is not installed")

from WeakLiverSegLib.synth import phantom  # noqa: E402
from WeakLiverSegLib.slicer import slicer_bridge as bridge  # noqa: E402
from WeakLiverSegLib.slicer import slicer_logic  # noqa: E402
from WeakLiverSegLib.slicer.runner import BackgroundRunner  # noqa: E402
from WeakLiverSegLib.slicer.slicer_logic import WeakLiverSegLogic  # noqa: E402
from WeakLiverSegLib.data.store import Dataset  # noqa: E402

# What the annotator enters: (tick the segments holding the tumour?, volume-label combo, Segment
# Editor mask?).  Tumour cases take the roles in order, healthy cases likewise.  A healthy entry
# (nothing ticked, combo healthy) is stored as couinaud [] (every segment healthy); "tumour"
# without ticks is a volume-level label.  The masked cases give the recipe's liver net its livers.
TUMOUR_ROLES = [(True, "unknown", True),      # strong: mask + ticked segments
                (True, "unknown", False),     # Couinaud: ticks imply tumour
                (True, "tumour", False),      # Couinaud: ticks + combo tumour
                (False, "tumour", False)]     # volume label only
HEALTHY_ROLES = [(False, "healthy", False),   # Couinaud [] (healthy)
                 (False, "healthy", False),
                 (False, "healthy", True)]    # strong, healthy: a liver-only mask
# Tiny networks and crops; the liver net gets most of the steps (it gives the weak cases a liver).
TINY = {"spacing_mm": 4.5, "channels": [4, 8, 8, 16], "checkpoint_every": 1000,
        "liver_net": {"steps": 100, "crop": 32, "batch_size": 4},
        "couinaudnet": {"steps": 10, "crop": 32, "batch_size": 2},
        "segmenter": {"steps": 10, "crop": 32, "batch_size": 2}}
STEPS = 120


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Seven unlabelled phantom CTs (32 x 32 x 12) with truth, and the entry of each: (dataset, entry)."""
    root = tmp_path_factory.mktemp("archive") / "ds"
    cases = len(TUMOUR_ROLES) + len(HEALTHY_ROLES)
    ds = phantom.generate_cohort(root, cases=cases, seed=5, shape=(32, 32, 12), spacing=(4.5, 4.5, 8.0),
                                 healthy_fraction=len(HEALTHY_ROLES) / cases, mix="unlabelled=1.0")
    tumour_roles, healthy_roles = list(TUMOUR_ROLES), list(HEALTHY_ROLES)
    entry = {}
    for case_id in ds.cases:
        tumour = bool((ds.read_truth(case_id, "mask").array == 2).any())
        roles = tumour_roles if tumour else healthy_roles
        assert roles, "the cohort must have 4 tumour and 3 healthy cases (seed 5 has)"
        entry[case_id] = roles.pop(0)
    assert not tumour_roles and not healthy_roles, "the cohort must have 4 tumour and 3 healthy cases"
    return ds, entry


def store_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ticked_segments(archive, case_id) -> list:
    """The segments a report names: those holding the case's tumour (truth Couinaud map)."""
    label = archive.read_truth(case_id, "mask").array
    return sorted(int(s) for s in np.unique(archive.read_truth(case_id, "couinaud_map").array[label == 2]))


def annotate(logic, archive, entry, store: Path) -> dict:
    """Every case through the widget's Add-case path; returns case id -> (couinaud, volume label) entered."""
    entered = {}
    for case_id, (ticks, combo, with_mask) in entry.items():
        node = bridge.volume_to_node(archive.read_image(case_id, "enhanced"), name=case_id)
        segmentation = None
        if with_mask:
            segmentation = bridge.labelmap_to_segmentation(archive.read_truth(case_id, "mask"), node,
                                                           name=f"{case_id} editor")
        checked = ticked_segments(archive, case_id) if ticks else []
        couinaud, volume_label = slicer_logic.labels_from_form(checked, combo)
        volumes = logic.phases_from_nodes(node, None)
        assert logic.next_case_id(store) == case_id     # the id the widget proposes
        logic.add_case_to_dataset(store, case_id, volumes, segmentation=segmentation, couinaud=couinaud,
                                  volume_label=volume_label, split="train")
        entered[case_id] = (couinaud, volume_label)
    return entered


@pytest.mark.slow
def test_couinaud_entry_store_trains_the_couinaud_recipe(scene, archive, tmp_path):
    from WeakLiverSegLib.learn.modelstore import load_model

    source, entry = archive
    logic = WeakLiverSegLogic(scene)
    store = tmp_path / "store"
    entered = annotate(logic, source, entry, store)

    dataset = Dataset.load(store)
    dataset.validate(deep=True)
    assert list(dataset.cases) == list(entry)
    for case_id, (ticks, combo, with_mask) in entry.items():
        case = dataset.cases[case_id]
        assert (case.couinaud, case.volume_label) == entered[case_id]
        assert case.images == {"ct": f"images/{case_id}_ct.nii.gz"} and case.boxes == [] and case.truth is None
        assert (case.mask is not None) == with_mask
        if ticks:
            assert case.couinaud == ticked_segments(source, case_id) != [] and case.volume_label == "tumour"
        elif combo == "healthy":
            assert (case.couinaud, case.volume_label) == ([], "healthy")
        else:
            assert (case.couinaud, case.volume_label) == (None, "tumour")
        assert np.array_equal(dataset.read_image(case_id).array, source.read_image(case_id, "enhanced").array)
        if with_mask:
            assert np.array_equal(dataset.read_mask(case_id).array, source.read_truth(case_id, "mask").array)

    # Train as the widget's Train button does: the logic's argv (+ tiny settings) and environment,
    # a background process whose jsonl progress the runner reads.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    model = tmp_path / "model"
    argv = logic.build_train_command(store, "couinaud", model, device="cpu", steps=STEPS) + ["--config", str(config)]
    assert argv[argv.index("--progress") + 1] == "jsonl"
    env = dict(logic.subprocess_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runner = BackgroundRunner(argv, env=env, cwd=tmp_path).start()
    try:
        assert runner.wait(240) == 0, runner.error_message
    finally:
        runner.cancel(wait=True)   # a no-op once finished; never leaves a child behind on failure
    events = runner.poll()
    assert events[-1] == {"event": "exit", "returncode": 0, "cancelled": False, "error": None}
    assert events[-2]["event"] == "done"
    stages = {e["stage"] for e in events if e["event"] == "progress"}
    assert {"prepare", "liver_net", "liver", "couinaud", "couinaudnet", "pseudo-labels", "segmenter"} <= stages, stages
    views = [slicer_logic.progress_view(e) for e in events]
    assert views[-1]["finished"] and views[-1]["status"] == "finished" and views[-1]["error"] is None
    assert any(v["percent"] is not None and 0 < v["percent"] < 100 for v in views)

    loaded = load_model(model)
    assert loaded.recipe == "couinaud" and set(loaded.networks) == {"segmenter", "couinaudnet"}
    meta = loaded.meta
    data = meta["training"]["data"]
    assert Path(data["dataset"]) == store
    # Which cases the recipe trained on, by kind: exactly the entered ones (none skipped for want of a liver).
    masked = [c for c, (_, _, m) in entry.items() if m]
    couinaud_cases = [c for c in entry if c not in masked and dataset.cases[c].couinaud is not None]
    volume_cases = [c for c in entry if c not in masked and dataset.cases[c].couinaud is None]
    assert (len(masked), len(couinaud_cases), len(volume_cases)) == (2, 4, 1)
    assert data["cases"] == {"couinaud": couinaud_cases, "volume": volume_cases, "mask": masked, "liver_only": []}
    assert data["liver_source"] == {c: ("mask" if c in masked else "liver_net") for c in entry}
    assert meta["input"]["phases"] == meta["input"]["inference_phases"] == ["ct"]
    steps = meta["training"]["steps"]
    assert all(steps[s] >= 1 for s in ("liver_net", "couinaudnet", "segmenter"))
    assert sum(steps.values()) == pytest.approx(STEPS, abs=3)
    assert 0 < data["pathological_slices_after_ilr"] <= data["pathological_slices_before_ilr"]
    assert data["healthy_pool_slices"] > 0


@pytest.mark.parametrize("ticked, combo", [([6], "healthy"), ([9], "tumour"), ([0, 3], "unknown")])
def test_bad_couinaud_entry_is_refused_and_the_store_stays_byte_for_byte(scene, archive, tmp_path, ticked, combo):
    source, _ = archive
    logic = WeakLiverSegLogic(scene)
    store = tmp_path / "store"
    node = bridge.volume_to_node(source.read_image("case002", "enhanced"), name="case002")
    couinaud, volume_label = slicer_logic.labels_from_form([5], "tumour")
    logic.add_case_to_dataset(store, "case000", {"ct": node}, couinaud=couinaud, volume_label=volume_label)
    before = store_bytes(store)

    # The widget's path: the form refuses the entry, naming the field.
    with pytest.raises(InputError, match="Couinaud segments"):
        slicer_logic.labels_from_form(ticked, combo)
    # A caller that skips the form: the store refuses the same labels, the case is not written.
    with pytest.raises(InputError, match="case001"):
        logic.add_case_to_dataset(store, "case001", {"ct": node}, couinaud=ticked, volume_label=combo)
    assert store_bytes(store) == before
    assert list(Dataset.load(store).cases) == ["case000"]
