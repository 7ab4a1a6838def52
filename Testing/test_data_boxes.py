"""Boxes: JSON, grid checks, world <-> voxel on rotated grids, boxes from masks, perturbation."""

import numpy as np
import pytest

from WeakLiverSegLib.data.boxes import (
    Box,
    box_mask,
    boxes_from_mask,
    liver_box_from_mask,
    perturb_box,
)
from WeakLiverSegLib.errors import InputError
from WeakLiverSegLib.data.volume import Volume


def rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


@pytest.fixture
def rotated_volume():
    """Anisotropic grid, off origin, direction = two rotations and an axis flip (det -1)."""
    direction = rotation(2, 30) @ rotation(0, 20) @ np.diag([1.0, -1.0, 1.0])
    return Volume(np.zeros((9, 20, 24), np.int16), spacing=(0.8, 1.1, 2.5), origin=(-40.0, 12.5, 300.0), direction=direction)


def two_lesion_map():
    """Liver block with two tumours: a 3D blob over 3 slices and a small one over 2 slices."""
    lm = np.zeros((8, 30, 30), np.uint8)
    lm[1:7, 4:26, 3:27] = 1
    lm[2:5, 6:12, 5:10] = 2  # lesion A: k 2..4, j 6..11, i 5..9
    lm[5:7, 18:21, 20:25] = 2  # lesion B: k 5..6, j 18..20, i 20..24
    return lm


def test_json_round_trip_and_alias():
    box = Box.from_json({"label": "tumour", "ijk_min": [1, 2, 3], "ijk_max": [4, 5, 3]}, "case000 boxes[0]")
    assert box.label == "tumor" and box.is_2d and box.source == "manual"
    assert box.size_ijk == (4, 4, 1)
    again = Box.from_json(box.to_json(), "x")
    assert again == box
    assert not Box("liver", (0, 0, 0), (1, 1, 1)).is_2d


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"label": "tumor", "ijk_min": [5, 2, 3], "ijk_max": [4, 5, 3]}, "ijk_min [5, 2, 3] > ijk_max [4, 5, 3] on axis i"),
        ({"label": "tumor", "ijk_min": [1, 2], "ijk_max": [4, 5, 3]}, "ijk_min: expected a list of 3 integers"),
        ({"label": "tumor", "ijk_min": [1, 2, 2.5], "ijk_max": [4, 5, 3]}, "ijk_min: expected a list of 3 integers"),
        ({"label": "tumor", "ijk_max": [4, 5, 3]}, "missing field 'ijk_min'"),
        ({"label": "kidney", "ijk_min": [1, 2, 3], "ijk_max": [4, 5, 3]}, "label 'kidney'"),
        ({"label": "tumor", "ijk_min": [1, 2, 3], "ijk_max": [4, 5, 3], "color": 1}, "unknown field(s) ['color']"),
        ({"label": "tumor", "ijk_min": [1, 2, 3], "ijk_max": [4, 5, 3], "source": "guess"}, "source 'guess'"),
        ({"label": "tumor", "ijk_min": [1, 2, 3], "ijk_max": [4, 5, 3], "lps_min": [1, "a", 2]}, "lps_min: expected"),
        ([1, 2, 3], "expected an object"),
    ],
)
def test_malformed_box_json_names_the_box(payload, expected):
    with pytest.raises(InputError) as err:
        Box.from_json(payload, "case007 boxes[2]")
    assert str(err.value).startswith("case007 boxes[2]")
    assert expected in str(err.value)


def test_validate_outside_grid_message():
    volume = Volume(np.zeros((10, 64, 64), np.uint8))
    with pytest.raises(InputError) as err:
        Box("tumor", (60, 30, 5), (70, 40, 12)).validate(volume, "case007 boxes[2]")
    assert str(err.value) == "case007 boxes[2]: ijk_max [70, 40, 12] outside the image grid (64, 64, 10)"
    Box("tumor", (0, 0, 0), (63, 63, 9)).validate(volume, "ok")  # the whole grid is inside


def test_validate_detects_world_corners_of_another_image(rotated_volume):
    box = Box("tumor", (2, 3, 1), (10, 12, 4)).with_world(rotated_volume)
    box.validate(rotated_volume, "case000 boxes[0]")
    moved = Volume(rotated_volume.array, rotated_volume.spacing, (0.0, 0.0, 0.0), rotated_volume.direction)
    with pytest.raises(InputError, match=r"case000 boxes\[0\]: lps_min .* \(box and image disagree\)"):
        box.validate(moved, "case000 boxes[0]")


def test_with_world_gives_voxel_centres(rotated_volume):
    box = Box("liver", (1, 2, 3), (20, 15, 7)).with_world(rotated_volume)
    np.testing.assert_allclose(box.lps_min, rotated_volume.index_to_world([1, 2, 3]), atol=1e-4)
    np.testing.assert_allclose(box.lps_max, rotated_volume.index_to_world([20, 15, 7]), atol=1e-4)
    # Cross-check against SimpleITK's own geometry.
    image = rotated_volume.to_sitk()
    np.testing.assert_allclose(box.lps_max, image.TransformIndexToPhysicalPoint((20, 15, 7)), atol=1e-4)


@pytest.mark.parametrize("lo, hi", [((3, 4, 1), (17, 12, 6)), ((0, 0, 0), (23, 19, 8)), ((5, 5, 4), (9, 11, 4))])
def test_from_world_maps_back_to_same_voxels_on_rotated_grid(rotated_volume, lo, hi):
    vol = rotated_volume
    image = vol.to_sitk()
    # Opposite corners other than min/max (the other diagonal), nudged by < half a voxel.
    a_ijk = np.array([lo[0], hi[1], lo[2]], float) + [0.3, -0.4, 0.2]
    b_ijk = np.array([hi[0], lo[1], hi[2]], float) + [-0.45, 0.1, -0.3]
    lps_a, lps_b = vol.index_to_world(a_ijk), vol.index_to_world(b_ijk)
    # SimpleITK independently agrees on which voxels those world points fall in.
    assert image.TransformPhysicalPointToIndex(tuple(lps_a)) == (lo[0], hi[1], lo[2])
    box = Box.from_world(lps_b, lps_a, vol, "tumor")
    assert box.ijk_min == lo and box.ijk_max == hi
    np.testing.assert_allclose(box.lps_min, vol.index_to_world(lo), atol=1e-4)


def test_from_world_tolerates_half_voxel_and_rejects_beyond(rotated_volume):
    vol = rotated_volume
    inside = vol.index_to_world([-0.49, 0.0, 0.0])
    box = Box.from_world(inside, vol.index_to_world([3, 3, 3]), vol, "liver")
    assert box.ijk_min == (0, 0, 0)
    edge = vol.index_to_world([23.49, 19.0, 8.0])
    assert Box.from_world(edge, vol.index_to_world([3, 3, 3]), vol, "liver").ijk_max == (23, 19, 8)
    outside = vol.index_to_world([5.0, 5.0, 9.8])
    with pytest.raises(InputError, match=r"case003 liver_box: world corner .* outside the image grid \(24, 20, 9\)"):
        Box.from_world(outside, vol.index_to_world([1, 1, 1]), vol, "liver", where="case003 liver_box")


def test_boxes_from_mask_two_lesions():
    lm = two_lesion_map()
    boxes = boxes_from_mask(lm)
    assert [(b.ijk_min, b.ijk_max) for b in boxes] == [((5, 6, 2), (9, 11, 4)), ((20, 18, 5), (24, 20, 6))]
    assert all(b.label == "tumor" and b.source == "derived" for b in boxes)
    # Every tumour voxel is covered, and each box is tight (touches the lesion on every face).
    covered = box_mask(lm.shape, boxes)
    assert covered[lm == 2].all()
    for b in boxes:
        sub = lm[b.ijk_min[2] : b.ijk_max[2] + 1, b.ijk_min[1] : b.ijk_max[1] + 1, b.ijk_min[0] : b.ijk_max[0] + 1] == 2
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        assert sub[:, :, 0].any() and sub[:, :, -1].any()


def test_boxes_from_mask_per_slice():
    lm = two_lesion_map()
    boxes = boxes_from_mask(lm, per_slice=True)
    assert all(b.is_2d for b in boxes)
    assert [b.ijk_min[2] for b in boxes] == [2, 3, 4, 5, 6]  # 3 slices of A, 2 of B
    for b in boxes:
        k = b.ijk_min[2]
        j, i = np.nonzero(lm[k] == 2)
        assert b.ijk_min[:2] == (i.min(), j.min()) and b.ijk_max[:2] == (i.max(), j.max())


def test_boxes_from_mask_connectivity():
    lm = np.zeros((4, 10, 10), np.uint8)
    lm[1, 2, 2] = lm[2, 3, 3] = 2  # touch only by a corner in 3D: one lesion (26-connectivity)
    lm[1, 2, 7] = 2  # a separate lesion on slice 1
    lm[2, 3, 4:6] = 2  # joins the corner pair on slice 2
    boxes = boxes_from_mask(lm)
    assert [(b.ijk_min, b.ijk_max) for b in boxes] == [((2, 2, 1), (5, 3, 2)), ((7, 2, 1), (7, 2, 1))]
    # Per slice: the U-shaped lesion seen on a slice where it splits gives two 2D boxes.
    u = np.zeros((3, 10, 10), np.uint8)
    u[0, 2:8, 2] = u[0, 2:8, 7] = 2
    u[1, 7, 2:8] = 2  # bottom of the U joins the arms only through the next slice
    assert len(boxes_from_mask(u)) == 1
    per_slice = boxes_from_mask(u, per_slice=True)
    assert [(b.ijk_min, b.ijk_max) for b in per_slice] == [((2, 2, 0), (2, 7, 0)), ((7, 2, 0), (7, 7, 0)), ((2, 7, 1), (7, 7, 1))]
    assert boxes_from_mask(np.zeros((3, 4, 4), np.uint8)) == []
    liver = boxes_from_mask(two_lesion_map(), value=1)
    assert [b.label for b in liver] == ["liver"]


def test_liver_box_from_mask():
    lm = two_lesion_map()
    lm[6, 27, 28] = 2  # a tumour voxel outside the liver block still counts (labels >= 1)
    box = liver_box_from_mask(lm)
    k, j, i = np.nonzero(lm >= 1)
    assert box.label == "liver"
    assert box.ijk_min == (i.min(), j.min(), k.min()) and box.ijk_max == (i.max(), j.max(), k.max())
    assert box_mask(lm.shape, [box]).sum() == np.prod(box.size_ijk)
    assert liver_box_from_mask(np.zeros((3, 4, 4), np.uint8)) is None


def test_perturb_tumour_box_follows_paper_protocol():
    rng = np.random.default_rng(0)
    box = Box("tumor", (40, 30, 7), (79, 69, 7))  # 40 x 40, 2D
    shape = (200, 200, 20)
    sides, centres = [], []
    for _ in range(400):
        p = perturb_box(box, rng, (0.9, 1.2), 0.1, shape)
        assert p.is_2d and p.ijk_min[2] == p.ijk_max[2] == 7 and p.source == "perturbed" and p.label == "tumor"
        side = np.array(p.size_ijk[:2], float)
        # scale 0.9..1.2, each edge moved < 10 % of the scaled side: side in (0.72, 1.44) x 40, +-1 voxel rounding
        assert np.all(side >= 0.72 * 40 - 1) and np.all(side <= 1.44 * 40 + 1)
        centre = (np.array(p.ijk_min[:2]) + p.ijk_max[:2]) / 2
        assert np.all(np.abs(centre - [59.5, 49.5]) <= 0.12 * 40 + 1)
        sides.append(side)
        centres.append(centre)
    sides = np.array(sides)
    assert 1.02 < sides.mean() / 40 < 1.08  # mean scale 1.05, shifts are symmetric
    assert np.ptp(sides[:, 0]) > 10 and not np.allclose(sides[:, 0], sides[:, 1])  # edges move independently
    assert np.std(np.array(centres), axis=0).min() > 0.5


def test_perturb_defaults_clip_and_determinism():
    liver = Box("liver", (10, 10, 2), (49, 49, 11))
    p = [perturb_box(liver, np.random.default_rng(1), shape_xyz=(64, 64, 16)) for _ in range(2)]
    assert p[0] == p[1]  # same seed, same box
    for q in (perturb_box(liver, np.random.default_rng(s), shape_xyz=(64, 64, 16)) for s in range(100)):
        size = np.array(q.size_ijk, float)
        # liver defaults: scale 0.95..1.1, shift < 1/20 of a side, all three axes for a 3D box
        assert np.all(size >= np.array(liver.size_ijk) * 0.95 * 0.9 - 1)
        assert np.all(size <= np.array(liver.size_ijk) * 1.1 * 1.1 + 1)
    edge = Box("tumor", (0, 0, 0), (9, 9, 3))
    for s in range(50):
        q = perturb_box(edge, np.random.default_rng(s), (1.5, 2.0), 0.1, (10, 10, 4))
        assert q.ijk_min == (0, 0, 0) and q.ijk_max == (9, 9, 3)  # grown past the grid, clipped
    tiny = Box("tumor", (5, 5, 5), (5, 5, 5))
    q = perturb_box(tiny, np.random.default_rng(3), (0.5, 0.6), 0.0, (10, 10, 10))
    assert q.ijk_min == q.ijk_max == (5, 5, 5)  # never collapses below one voxel


def test_box_mask():
    boxes = [Box("tumor", (1, 1, 0), (3, 2, 0)), Box("liver", (5, 5, 1), (6, 7, 3))]
    mask = box_mask((4, 8, 8), boxes)
    assert mask.dtype == bool and mask.sum() == 3 * 2 * 1 + 2 * 3 * 3
    assert mask[0, 1:3, 1:4].all() and mask[1:4, 5:8, 5:7].all()
