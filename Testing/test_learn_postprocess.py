"""Post-processing of liver / tumour label maps on hand-made volumes."""

import numpy as np

from WeakLiverSegLib.learn.postprocess import fill_holes, largest_component, postprocess


def _liver(shape=(10, 20, 20)):
    labels = np.zeros(shape, np.uint8)
    labels[2:8, 4:16, 4:16] = 1
    return labels


def test_largest_liver_component_kept_and_its_lesions_only():
    labels = _liver()
    labels[3:5, 1:3, 17:19] = 1          # a small stray liver blob
    labels[6:8, 17:19, 1:3] = 2          # a tumour blob outside the liver
    labels[4:6, 8:11, 8:11] = 2          # a real lesion
    before = labels.copy()
    out = postprocess(labels)
    np.testing.assert_array_equal(labels, before)           # input untouched
    assert out.dtype == np.uint8
    assert not out[3:5, 1:3, 17:19].any()
    assert not out[6:8, 17:19, 1:3].any()
    assert (out[4:6, 8:11, 8:11] == 2).all()
    assert (out[2:8, 4:16, 4:16] >= 1).all()
    assert set(np.unique(out)) == {0, 1, 2}


def test_lesion_touching_the_liver_is_kept_but_clipped_outside_nothing():
    labels = _liver()
    labels[4:6, 14:18, 8:10] = 2          # lesion bulging out of the liver block, connected to it
    out = postprocess(labels)
    # tumour voxels belong to the liver region (labels >= 1), so the bulge stays
    assert (out[4:6, 14:18, 8:10] == 2).all()


def test_holes_filled_in_2d_per_slice_and_in_3d():
    labels = _liver()
    labels[4:6, 8:11, 8:11] = 0           # enclosed cavity: a 3D hole
    labels[2:8, 13, 13] = 0               # a channel through all liver slices: open in 3D, a hole in 2D
    out = postprocess(labels)
    assert (out[4:6, 8:11, 8:11] == 1).all()
    assert (out[2:8, 13, 13] == 1).all()
    assert not out[0:2].any() and not out[8:].any()


def test_tumour_holes_filled_and_tumour_stays_inside_liver():
    labels = _liver()
    labels[3:7, 7:12, 7:12] = 2
    labels[4:6, 9, 9] = 1                 # liver voxels enclosed by tumour
    out = postprocess(labels)
    assert (out[3:7, 7:12, 7:12] == 2).all()
    assert ((out == 2) <= (out >= 1)).all()


def test_liver_only_and_empty_maps():
    labels = _liver()
    labels[4:6, 8:11, 8:11] = 2
    out = postprocess(labels, tumor=False)
    assert set(np.unique(out)) == {0, 1}
    empty = np.zeros((4, 5, 6), np.uint8)
    np.testing.assert_array_equal(postprocess(empty), empty)
    assert not largest_component(empty.astype(bool)).any()
    assert not fill_holes(empty.astype(bool)).any()


def test_largest_component_uses_full_connectivity():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True   # diagonal chain: one 26-connected component
    mask[0, 4, 0] = True
    out = largest_component(mask)
    assert out.sum() == 3 and not out[0, 4, 0]


def test_fill_holes_equals_scipy_per_slice_then_3d():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    masks = [rng.random((6, 30, 40)) < f for f in (0.3, 0.6, 0.8)]
    masks.append(ndimage.binary_dilation(rng.random((8, 40, 40)) < 0.02, iterations=2))
    for mask in masks:
        expected = mask.copy()
        for k in range(mask.shape[0]):
            expected[k] = ndimage.binary_fill_holes(mask[k])
        expected = ndimage.binary_fill_holes(expected)
        np.testing.assert_array_equal(fill_holes(mask), expected)
