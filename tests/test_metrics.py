"""Known-answer and brute-force tests of medsam2_jax.metrics (Dice, IoU, surface distances, HD95)."""

import itertools
import math

import numpy as np
import pytest

from medsam2_jax import metrics


def box_mask(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + n) for a, n in zip(lo, size))] = True
    return m


# ---------------------------------------------------------------------------------------------- Dice / IoU
def test_dice_iou_known_overlaps():
    shape = (4, 20)
    a = box_mask(shape, (0, 0), (4, 10))  # 40 voxels
    b = box_mask(shape, (0, 5), (4, 10))  # 40 voxels, 20 shared
    assert metrics.dice(a, b) == pytest.approx(0.5, abs=0)  # 2 * 20 / 80
    assert metrics.iou(a, b) == pytest.approx(1 / 3, abs=1e-15)  # 20 / 60
    c = box_mask(shape, (0, 0), (4, 5))  # a subset of a: 20 of its 40 voxels
    assert metrics.dice(c, a) == pytest.approx(2 * 20 / 60, abs=1e-15)
    assert metrics.iou(c, a) == pytest.approx(0.5, abs=0)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0 and metrics.iou(a, ~a) == 0.0
    # Non-zero means foreground, whatever the dtype (logits must be thresholded by the caller).
    assert metrics.dice(a.astype(np.uint8) * 7, b.astype(np.float32)) == 0.5


def test_dice_iou_relation_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, g = rng.random((2, 6, 7, 5)) < rng.uniform(0.05, 0.6)
        d, j = metrics.dice(p, g), metrics.iou(p, g)
        assert d == pytest.approx(2 * j / (1 + j), abs=1e-12)  # exact identity between the two


def test_empty_mask_conventions():
    z = np.zeros((5, 6, 7), bool)
    a = box_mask(z.shape, (1, 1, 1), (2, 2, 2))
    assert (metrics.dice(z, z), metrics.iou(z, z), metrics.hd95(z, z, (1, 1, 3))) == (1.0, 1.0, 0.0)
    for p, g in ((a, z), (z, a)):
        assert metrics.dice(p, g) == 0.0 and metrics.iou(p, g) == 0.0
        assert metrics.hd95(p, g, (1, 1, 3)) == math.inf
    with pytest.raises(ValueError, match="non-empty"):
        metrics.surface_distances(a, z)


def test_per_slice_overlap_matches_loop():
    rng = np.random.default_rng(1)
    p = rng.random((6, 9, 8)) < 0.3
    g = rng.random((6, 9, 8)) < 0.3
    p[2] = g[2] = False  # both empty on one slice -> 1 by convention
    g[4] = False  # gt empty, prediction not -> 0
    for axis in (0, 1, 2):
        out = metrics.per_slice_overlap(p, g, axis=axis)
        for i in range(p.shape[axis]):
            ps, gs = np.take(p, i, axis), np.take(g, i, axis)
            assert out["dice"][i] == pytest.approx(metrics.dice(ps, gs), abs=1e-15)
            assert out["iou"][i] == pytest.approx(metrics.iou(ps, gs), abs=1e-15)
            assert out["pred_area"][i] == ps.sum() and out["gt_area"][i] == gs.sum()
    out = metrics.per_slice_overlap(p, g)
    assert out["dice"][2] == 1.0 and out["dice"][4] == 0.0


# ---------------------------------------------------------------------------------------------- HD95 known answers
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 6])  # 1 and 3 overlap the cube of side 4, 6 leaves a gap
def test_cubes_offset_along_an_axis(axis, k):
    """Cube B = cube A shifted by k voxels along ``axis``. Every voxel of B has a coordinate >= k along the
    axis (relative to A's first face), so A's first face (16 of its 56 surface voxels, 29 % > 5 %) is exactly
    k * spacing from B's surface, and no surface voxel of A is farther; by symmetry the same holds from B to A.
    Hence HD95 = HD = k * spacing[axis] exactly, whatever the other axes' spacings."""
    spacing = (0.7, 1.3, 2.5)
    n = 4
    shape = (16, 16, 16)
    lo = [2, 2, 2]
    a = box_mask(shape, lo, (n,) * 3)
    lo[axis] += k
    b = box_mask(shape, lo, (n,) * 3)
    want = k * spacing[axis]
    assert metrics.hd95(a, b, spacing) == pytest.approx(want, rel=1e-12)
    assert metrics.hausdorff(a, b, spacing, 100) == pytest.approx(want, rel=1e-12)
    assert metrics.hd95(b, a, spacing) == pytest.approx(want, rel=1e-12)


def test_cubes_offset_diagonally_max_hausdorff():
    """Shifted by (k0, k1, k2): A's corner voxel is at the full offset from B's nearest (corner) voxel, and
    every point of B lies beyond it on each axis, so the classical Hausdorff distance is the offset's length."""
    spacing = (0.7, 1.3, 2.5)
    a = box_mask((16, 16, 16), (2, 2, 2), (4, 4, 4))
    b = box_mask((16, 16, 16), (4, 3, 5), (4, 4, 4))
    want = math.sqrt((2 * 0.7) ** 2 + (1 * 1.3) ** 2 + (3 * 2.5) ** 2)
    assert metrics.hausdorff(a, b, spacing, 100) == pytest.approx(want, rel=1e-12)
    assert metrics.hd95(a, b, spacing) < want  # a single corner voxel: above the 95th percentile


@pytest.mark.parametrize("axis", [0, 1])
def test_squares_offset_2d(axis):
    """2D: the first edge of a 4 x 4 square is 4 of its 12 perimeter pixels (33 %), so HD95 = k * spacing."""
    spacing = (0.5, 3.0)
    lo = [3, 3]
    a = box_mask((20, 20), lo, (4, 4))
    lo[axis] += 5
    b = box_mask((20, 20), lo, (4, 4))
    assert metrics.hd95(a, b, spacing) == pytest.approx(5 * spacing[axis], rel=1e-12)


def test_identical_masks_and_isotropic_default():
    a = box_mask((10, 10, 10), (2, 3, 4), (5, 4, 3))
    assert metrics.hd95(a, a, (1.0, 2.0, 3.0)) == 0.0
    b = box_mask((10, 10, 10), (2, 3, 6), (5, 4, 3))
    assert metrics.hd95(a, b) == pytest.approx(2.0, rel=1e-12)  # spacing None = 1 mm
    assert metrics.hd95(a, b, 2.0) == pytest.approx(4.0, rel=1e-12)  # a scalar applies to every axis


# ---------------------------------------------------------------------------------------------- brute force
def brute_surface(m):
    """Foreground voxels with a background face-neighbour, outside the array counting as background."""
    pad = np.pad(m, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    all_fg_neighbours = np.ones_like(m)
    for ax in range(m.ndim):
        for step in (-1, 1):
            all_fg_neighbours &= np.roll(pad, step, axis=ax)[inner]
    return m & ~all_fg_neighbours


def brute_directed(src, dst, spacing):
    a = np.argwhere(brute_surface(src)) * spacing
    b = np.argwhere(brute_surface(dst)) * spacing
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


@pytest.mark.parametrize("shape,spacing", [((13, 11), (0.8, 2.0)), ((7, 9, 8), (0.7, 1.1, 2.5))])
def test_against_all_pairs_brute_force(shape, spacing):
    """Random blobby shapes (including ones touching the array's border): the EDT-based directed distances
    equal an all-pairs search over the surface voxels. Both use float64 coordinates; the EDT is exact, so the
    only difference is rounding (1e-12 relative)."""
    rng = np.random.default_rng(len(shape))
    from scipy import ndimage

    sp = np.asarray(spacing)
    for trial in range(12):
        fields = ndimage.gaussian_filter(rng.standard_normal((2,) + shape), sigma=(0,) + (1.2,) * len(shape))
        p, g = fields[0] > 0.15, fields[1] > 0.15
        if not p.any() or not g.any():
            continue
        np.testing.assert_array_equal(metrics.surface(p), brute_surface(p))
        d_pg, d_gp = metrics.surface_distances(p, g, spacing)
        want_pg, want_gp = brute_directed(p, g, sp), brute_directed(g, p, sp)
        # Same voxel order (both are C-order scans of the surface), so compare element-wise.
        np.testing.assert_allclose(d_pg, want_pg, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(d_gp, want_gp, rtol=1e-12, atol=1e-12)
        for q in (50, 95, 100):
            want = max(np.percentile(want_pg, q), np.percentile(want_gp, q))
            assert metrics.hausdorff(p, g, spacing, q) == pytest.approx(want, rel=1e-12, abs=1e-12), (trial, q)


def test_orientation_invariance():
    """Flipping and permuting the axes (with the spacing permuted alike) changes no metric: a file-oriented
    and a canonical copy of the same volume give the same numbers."""
    rng = np.random.default_rng(3)
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal((2, 9, 10, 7)), sigma=(0, 1.5, 1.5, 1.5))
    p, g = f[0] > 0.1, f[1] > 0.1
    spacing = np.array([0.8, 1.2, 2.5])
    ref = metrics.binary_metrics(p, g, spacing)
    for perm in itertools.permutations(range(3)):
        pp, gg = np.transpose(p, perm)[::-1, :, ::-1], np.transpose(g, perm)[::-1, :, ::-1]
        got = metrics.binary_metrics(pp, gg, spacing[list(perm)])
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-12), (perm, key)


# ---------------------------------------------------------------------------------------------- batched, errors
def test_per_class_metrics():
    gt = np.zeros((12, 12, 6), np.int16)
    gt[1:5, 1:5, 1:4] = 1
    gt[6:10, 6:10, 2:5] = 2
    pred = np.zeros_like(gt)
    pred[1:5, 1:5, 1:4] = 1  # class 1 exact
    pred[6:10, 6:10, 3:5] = 2  # class 2: one slice of three missing
    pred[0, 11, 0] = 3  # class 3 only in the prediction
    out = metrics.per_class_metrics(pred, gt, (1.0, 1.0, 2.0))
    assert sorted(out) == [1, 2, 3]
    assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0
    assert out[2]["dice"] == pytest.approx(2 * 32 / (32 + 48), abs=1e-15)
    assert out[2]["iou"] == pytest.approx(32 / 48, abs=1e-15)
    assert out[3]["dice"] == 0.0 and out[3]["hd95"] == math.inf
    assert out[3]["pred_voxels"] == 1 and out[3]["gt_voxels"] == 0
    only = metrics.per_class_metrics(pred, gt, (1.0, 1.0, 2.0), classes=[2])
    assert list(only) == [2] and only[2] == out[2]
    with pytest.raises(ValueError, match="background"):
        metrics.per_class_metrics(pred, gt, classes=[0, 1])
    with pytest.raises(TypeError, match="integer label map"):
        metrics.per_class_metrics(pred.astype(np.float32), gt)


def test_spacing_from_affine():
    aff = np.diag([-0.8, 0.8, 2.5, 1.0])
    np.testing.assert_allclose(metrics.spacing_from_affine(aff), [0.8, 0.8, 2.5])
    rot = np.array([[0.0, 0.0, 2.5, 0], [0.8, 0, 0, 0], [0, -0.7, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(metrics.spacing_from_affine(rot), [0.8, 0.7, 2.5])


def test_bad_inputs_are_named():
    a = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 4\).*\(4, 4\)"):
        metrics.dice(a, np.ones((4, 4)))
    with pytest.raises(ValueError, match="spacing must give one value per axis"):
        metrics.hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be finite and > 0"):
        metrics.hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="pred contains NaN"):
        metrics.iou(np.full((3, 3), np.nan), np.ones((3, 3)))
    with pytest.raises(ValueError, match="2D or 3D"):
        metrics.hd95(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff(a, a, None, 101)
    with pytest.raises(ValueError, match="axis=3"):
        metrics.per_slice_overlap(a, a, axis=3)
