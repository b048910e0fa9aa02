"""medsam2_jax.metrics against MONAI (``monai.metrics``), the reference implementation of medical-imaging metrics.

What MONAI computes (read in monai 1.6.1, ``monai/metrics/utils.py``, ``hausdorff_distance.py``, ``meandice.py``):

* Dice (``compute_dice`` / ``DiceMetric``, binary channel): ``2 |P ∩ G| / (|G| + |P|)`` in float32, the same
  definition as ours. Voxel counts are exact in float32 below 2**24 voxels and the one division rounds to
  float32 (relative error <= 2**-24 ~ 6e-8), so the values agree to ``1e-6`` absolute; a miscounted voxel
  changes Dice by >= 1 / (|P| + |G|) ~ 1e-3 here.
* Surfaces (``get_mask_edges`` without sub-voxel areas): ``mask XOR scipy.ndimage.binary_erosion(mask)`` with
  scipy's default face-connectivity structure and ``border_value=0``, on the union's bounding box grown by one
  voxel and zero-padded where that box leaves the array. That is exactly our surface: foreground voxels with a
  background face-neighbour, the outside of the array counting as background (checked below, also on masks
  touching and filling the array border).
* Directed distances (``get_surface_distance``, euclidean, CPU): for each surface voxel of one mask, the
  distance to the nearest surface-voxel centre of the other, from a KD-tree on the voxel coordinates multiplied
  by ``spacing`` (per array axis, as ours), returned as float32. Ours is the exact EDT of the other surface's
  complement with ``sampling=spacing``: the same numbers, in float64.
* Percentile (``_compute_percentile_hausdorff_distance``): ``torch.quantile(d, percentile / 100)``, whose
  default interpolation is linear, i.e. NumPy's default percentile; per direction, then the larger of the two
  (``directed=False``). The same as ours. With ``percentile=None`` it is the maximum (classical Hausdorff);
  so is ``percentile=0`` (MONAI tests ``if not percentile``), where ours is the 0th percentile, the minimum
  (asserted in ``test_percentile_zero_differs``; 0 is not a percentile anyone reports).
  The only differences are float32 distances and float32 interpolation: a few float32 ulps, hence
  ``rtol 1e-5`` (measured: 1.4e-7 relative at most over the cases below; Dice 2.6e-8 absolute). A wrong
  spacing order, surface connectivity, border convention or percentile rule moves HD95 by more than 100 times
  the tolerance on some case (0.01-0.9 mm): ``test_comparison_can_fail`` checks that the tolerances separate
  them.

Empty masks: MONAI's conventions differ from ours (module docstring of medsam2_jax.metrics) and are asserted as
documented differences:

================================  =================  =================================================
case                              ours               MONAI
================================  =================  =================================================
Dice, both empty                  1.0                NaN (default ``ignore_empty=True``); 1.0 with ``False``
Dice, gt empty, pred not          0.0                NaN (default); 0.0 with ``ignore_empty=False``
Dice, pred empty, gt not          0.0                0.0
HD95, both empty                  0.0                NaN
HD95, exactly one empty           inf                NaN (its directed distances are all ``inf`` and
                                                     ``torch.quantile``'s linear interpolation gives
                                                     ``inf - inf``)
Hausdorff (max), one empty        inf                inf (``percentile=None``)
Hausdorff (max), both empty       0.0                NaN
================================  =================  =================================================

So with ``ignore_empty=False`` MONAI's Dice equals ours in every case; MONAI's NaNs mean "not counted" (its
``DiceMetric``/``HausdorffDistanceMetric`` reductions skip NaNs), where ours scores an empty-vs-empty case as
correct and a missed or hallucinated object as the worst case.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from medsam2_jax import metrics

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

DICE_ATOL = 1e-6
HD_RTOL = 1e-5
HD_ATOL = 1e-6


def _blobs(shape, seed: int, fill: float = 0.4, sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth and a prediction of random smooth blobs (several components, often touching the array
    border): thresholded Gaussian-filtered noise; the prediction's field is the truth's plus filtered noise."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma / 2, mode="wrap")
    gt_field, pred_field = base, base + 0.6 * noise * base.std() / max(noise.std(), 1e-12)
    gt = gt_field > np.quantile(gt_field, 1 - fill)
    pred = pred_field > np.quantile(pred_field, 1 - fill)
    assert gt.any() and pred.any() and not np.array_equal(gt, pred)
    return pred, gt


def _t(a: np.ndarray) -> "torch.Tensor":
    """(B=1, C=1, *spatial) float tensor, MONAI's one-hot layout for one binary channel."""
    return torch.from_numpy(np.asarray(a, np.float32)[None, None])


def _monai_dice(pred, gt, **kw) -> float:
    return float(monai_metrics.compute_dice(_t(pred), _t(gt), include_background=True, **kw)[0, 0])


def _monai_hd(pred, gt, spacing, percentile) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; the values are what is tested
        out = monai_metrics.compute_hausdorff_distance(
            _t(pred), _t(gt), include_background=True, percentile=percentile, spacing=list(spacing))
    return float(out[0, 0])


# (shape, spacing in mm per array axis): anisotropic everywhere, 2D and 3D, odd and non-square sizes
CASES = [
    ((32, 32), (1.0, 1.0)),
    ((48, 40), (0.7, 1.3)),
    ((17, 63), (2.5, 0.45)),
    ((64, 64), (0.8, 0.8)),
    ((16, 24, 20), (2.5, 0.8, 0.8)),
    ((10, 32, 28), (5.0, 0.7, 0.9)),
    ((24, 12, 30), (1.0, 3.0, 0.6)),
]
SEEDS = (0, 1, 2)
PARAMS = [pytest.param(shape, sp, seed, id=f"{'x'.join(map(str, shape))}-s{seed}")
          for shape, sp in CASES for seed in SEEDS]


@pytest.mark.parametrize("shape,spacing,seed", PARAMS)
def test_dice_equals_monai(shape, spacing, seed):
    pred, gt = _blobs(shape, seed)
    ours = metrics.dice(pred, gt)
    assert abs(ours - _monai_dice(pred, gt)) <= DICE_ATOL
    assert abs(ours - _monai_dice(pred, gt, ignore_empty=False)) <= DICE_ATOL


@pytest.mark.parametrize("shape,spacing,seed", PARAMS)
def test_hd95_and_hausdorff_equal_monai(shape, spacing, seed):
    pred, gt = _blobs(shape, seed)
    ours = metrics.hd95(pred, gt, spacing)
    theirs = _monai_hd(pred, gt, spacing, 95)
    np.testing.assert_allclose(ours, theirs, rtol=HD_RTOL, atol=HD_ATOL)
    assert ours > 0
    # classical Hausdorff: our percentile=100 and MONAI's maximum (percentile=None)
    np.testing.assert_allclose(metrics.hausdorff(pred, gt, spacing, 100.0), _monai_hd(pred, gt, spacing, None),
                               rtol=HD_RTOL, atol=HD_ATOL)
    # another percentile, same rule
    np.testing.assert_allclose(metrics.hausdorff(pred, gt, spacing, 50.0), _monai_hd(pred, gt, spacing, 50),
                               rtol=HD_RTOL, atol=HD_ATOL)


@pytest.mark.parametrize("shape,spacing", [((20, 24), (0.6, 1.7)), ((8, 12, 10), (3.0, 0.9, 0.7))])
def test_border_touching_masks_equal_monai(shape, spacing):
    """The array's outside is background in both: a mask filling the array has the whole border as surface."""
    full = np.ones(shape, bool)
    _, blob = _blobs(shape, 7)
    edge = np.zeros(shape, bool)
    edge[(slice(0, 3),) + (slice(None),) * (len(shape) - 1)] = True  # a slab on the first face
    edge[(slice(None),) * (len(shape) - 1) + (slice(-2, None),)] = True  # and one on the last axis's far face
    for pred, gt in ((full, blob), (blob, full), (edge, blob), (full, edge)):
        np.testing.assert_allclose(metrics.hd95(pred, gt, spacing), _monai_hd(pred, gt, spacing, 95),
                                   rtol=HD_RTOL, atol=HD_ATOL)
        assert abs(metrics.dice(pred, gt) - _monai_dice(pred, gt)) <= DICE_ATOL


def test_dice_metric_and_hausdorff_metric_batches():
    """The cumulative metric classes on a batch: per-case values are ours, their mean is our mean."""
    shape, spacing = (12, 20, 16), (2.0, 0.75, 1.1)
    pairs = [_blobs(shape, s) for s in range(4)]
    preds = torch.from_numpy(np.stack([p for p, _ in pairs])[:, None].astype(np.float32))
    gts = torch.from_numpy(np.stack([g for _, g in pairs])[:, None].astype(np.float32))
    dm = monai_metrics.DiceMetric(include_background=True, reduction="none")
    dm(preds, gts)
    ours_d = np.array([metrics.dice(p, g) for p, g in pairs])
    np.testing.assert_allclose(dm.aggregate().numpy()[:, 0], ours_d, rtol=0, atol=DICE_ATOL)
    dm_mean = monai_metrics.DiceMetric(include_background=True, reduction="mean")
    dm_mean(preds, gts)
    assert abs(float(dm_mean.aggregate()) - ours_d.mean()) <= DICE_ATOL
    hm = monai_metrics.HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own internal use of a deprecated argument
        hm(preds, gts, spacing=list(spacing))
    ours_h = np.array([metrics.hd95(p, g, spacing) for p, g in pairs])
    np.testing.assert_allclose(hm.aggregate().numpy()[:, 0], ours_h, rtol=HD_RTOL, atol=HD_ATOL)


def _hd_variant(pred, gt, spacing, *, structure_full=False, border_value=0, method="linear") -> float:
    """HD95 under a wrong convention: full-connectivity surfaces, the outside as foreground, or another
    percentile rule."""
    def surf(m):
        st = np.ones((3,) * m.ndim, bool) if structure_full else ndimage.generate_binary_structure(m.ndim, 1)
        return m & ~ndimage.binary_erosion(m, structure=st, border_value=border_value)

    sp_p, sp_g = surf(pred), surf(gt)
    d_pg = ndimage.distance_transform_edt(~sp_g, sampling=spacing)[sp_p]
    d_gp = ndimage.distance_transform_edt(~sp_p, sampling=spacing)[sp_g]
    return float(max(np.percentile(d_pg, 95, method=method), np.percentile(d_gp, 95, method=method)))


def test_comparison_can_fail():
    """The tolerances separate the conventions that matter: each wrong one below (spacing order, surface
    connectivity, border convention, percentile rule) misses MONAI by far more than the tolerance on some case
    (ties between voxel distances often hide a difference on a single case, hence the maximum over all)."""
    worst = {"spacing reversed": 0.0, "full-connectivity surface": 0.0, "outside is foreground": 0.0,
             "percentile 'higher'": 0.0}
    for shape, spacing in CASES:
        for seed in SEEDS:
            pred, gt = _blobs(shape, seed)
            theirs = _monai_hd(pred, gt, spacing, 95)
            # the right convention, recomputed here, agrees (so the variants differ only in the convention)
            assert abs(_hd_variant(pred, gt, spacing) - theirs) <= HD_ATOL + HD_RTOL * theirs
            for name, value in (("spacing reversed", metrics.hd95(pred, gt, spacing[::-1])),
                                ("full-connectivity surface", _hd_variant(pred, gt, spacing, structure_full=True)),
                                ("outside is foreground", _hd_variant(pred, gt, spacing, border_value=1)),
                                ("percentile 'higher'", _hd_variant(pred, gt, spacing, method="higher"))):
                worst[name] = max(worst[name], abs(value - theirs) / (HD_ATOL + HD_RTOL * theirs))
    assert all(w > 100 for w in worst.values()), worst
    # and a single flipped voxel moves Dice well past its tolerance
    pred, gt = _blobs((48, 40), 0)
    flipped = pred.copy()
    flipped[np.unravel_index(np.flatnonzero(~pred & gt)[0], pred.shape)] = True
    assert abs(metrics.dice(flipped, gt) - _monai_dice(pred, gt)) > 100 * DICE_ATOL


def test_percentile_zero_differs():
    """MONAI's ``percentile=0`` is its maximum (a falsy percentile means "none"); ours is the minimum."""
    pred, gt = _blobs((48, 40), 1)
    spacing = (0.7, 1.3)
    np.testing.assert_allclose(_monai_hd(pred, gt, spacing, 0), metrics.hausdorff(pred, gt, spacing, 100.0),
                               rtol=HD_RTOL, atol=HD_ATOL)
    d_pg, d_gp = metrics.surface_distances(pred, gt, spacing)
    assert metrics.hausdorff(pred, gt, spacing, 0.0) == max(d_pg.min(), d_gp.min())
    assert metrics.hausdorff(pred, gt, spacing, 0.0) < metrics.hausdorff(pred, gt, spacing, 100.0)


# ------------------------------------------------------------------------------------------- empty masks
@pytest.mark.parametrize("shape,spacing", [((16, 20), (0.8, 1.6)), ((6, 10, 12), (3.0, 0.7, 0.7))])
def test_empty_mask_conventions_against_monai(shape, spacing):
    """Documented differences (module docstring): asserted one by one, so a change on either side shows."""
    empty = np.zeros(shape, bool)
    _, blob = _blobs(shape, 3)

    # both empty: ours 1.0 / 0.0; MONAI Dice NaN by default (1.0 with ignore_empty=False), HD NaN
    assert metrics.dice(empty, empty) == 1.0
    assert np.isnan(_monai_dice(empty, empty))
    assert _monai_dice(empty, empty, ignore_empty=False) == 1.0
    assert metrics.hd95(empty, empty, spacing) == 0.0
    assert np.isnan(_monai_hd(empty, empty, spacing, 95))
    assert metrics.hausdorff(empty, empty, spacing, 100.0) == 0.0
    assert np.isnan(_monai_hd(empty, empty, spacing, None))

    # prediction empty, truth not: Dice 0.0 in both; HD95 ours inf, MONAI NaN; max-Hausdorff inf in both
    assert metrics.dice(empty, blob) == 0.0
    assert _monai_dice(empty, blob) == 0.0
    assert _monai_dice(empty, blob, ignore_empty=False) == 0.0
    assert metrics.hd95(empty, blob, spacing) == np.inf
    assert np.isnan(_monai_hd(empty, blob, spacing, 95))
    assert metrics.hausdorff(empty, blob, spacing, 100.0) == np.inf
    assert _monai_hd(empty, blob, spacing, None) == np.inf

    # truth empty, prediction not: Dice ours 0.0, MONAI NaN by default (0.0 with ignore_empty=False); HD as above
    assert metrics.dice(blob, empty) == 0.0
    assert np.isnan(_monai_dice(blob, empty))
    assert _monai_dice(blob, empty, ignore_empty=False) == 0.0
    assert metrics.hd95(blob, empty, spacing) == np.inf
    assert np.isnan(_monai_hd(blob, empty, spacing, 95))
    assert metrics.hausdorff(blob, empty, spacing, 100.0) == np.inf
    assert _monai_hd(blob, empty, spacing, None) == np.inf
