"""medsam2_jax.data.preprocess: each rule of appendix C.1 on a case whose answer is known, and the round
trip back to the original grid (exact on phantoms and on a crop of the real CT)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medsam2_jax.data import realct
from medsam2_jax.data.errors import DataError
from medsam2_jax.data.io import Volume, load_labels, load_volume, save_volume
from medsam2_jax.data.phantoms import write_phantom_dataset
from medsam2_jax.data.preprocess import (
    WINDOWS,
    CTStats,
    Target,
    apply_window,
    bounding_box,
    choose_slice_axis,
    compute_ct_stats,
    crop_removes_enough,
    nearest_indices,
    normalize_ct,
    normalize_per_image,
    preprocess_case,
    preprocess_image_2d,
    resize_stack,
    split_targets,
    to_original_grid,
)

# The normalised images are float32 computed from float64 statistics: 1e-5 relative covers the final cast.
F32 = dict(rtol=1e-5, atol=1e-5)


def _clipped_std_0_to_1000() -> float:
    """Population std of 0..1000 clipped to [5, 995] (mean 500 by symmetry), in exact integer arithmetic:
    deviations -495..495 once each, plus the 5 values below 5 and the 5 above 995 at -495 / +495."""
    ss = 2 * sum(d * d for d in range(1, 496)) + 10 * 495 * 495
    return (ss / 1001) ** 0.5


# --------------------------------------------------------------------------------------------- intensities


def test_ct_window():
    hu = np.array([-1000.0, -161.0, -160.0, 0.0, 40.0, 240.0, 241.0, 3000.0])
    np.testing.assert_array_equal(apply_window(hu, "soft_tissue"), [-160, -160, -160, 0, 40, 240, 240, 240])
    np.testing.assert_array_equal(apply_window(hu, (-600, 1500)), [-1000, -161, -160, 0, 40, 150, 150, 150])
    assert WINDOWS["soft_tissue"] == (40.0, 400.0)
    np.testing.assert_array_equal(apply_window(hu, None), hu)
    with pytest.raises(ValueError, match="window='abdominal'.*soft_tissue"):
        apply_window(hu, "abdominal")
    with pytest.raises(ValueError, match="width must be > 0"):
        apply_window(hu, (40, 0))


def test_ct_stats_use_foreground_percentiles_and_are_global():
    values = np.arange(1001, dtype=np.float64)  # foreground 0..1000 HU
    image = np.concatenate([values, [-3000.0, 5000.0, 9999.0]])  # background voxels must not count
    labels = np.concatenate([np.ones(1001, np.int32), np.zeros(3, np.int32)])
    st = compute_ct_stats([(image, labels)], window=None)
    # np.percentile (linear) of 0..1000: position 0.005 * 1000 = 5 and 0.995 * 1000 = 995.
    assert (st.low, st.high) == (5.0, 995.0)
    assert st.mean == pytest.approx(500.0, abs=1e-9)
    assert st.std == pytest.approx(_clipped_std_0_to_1000(), rel=1e-12)
    # Global: two cases are pooled (the halves give the same as the whole).
    halves = [(image[:500], labels[:500]), (image[500:], labels[500:])]
    assert compute_ct_stats(halves, window=None) == st
    # The window is applied before the statistics: soft tissue clips 0..1000 to 0..240.
    w = compute_ct_stats([(image, labels)], window="soft_tissue")
    assert w.window == (40.0, 400.0) and w.high == 240.0 and w.low == 5.0
    with pytest.raises(DataError, match="no foreground voxel"):
        compute_ct_stats([(image, np.zeros_like(labels))])


def test_normalize_ct_by_hand():
    st = CTStats(low=-100.0, high=200.0, mean=50.0, std=25.0, window=(40.0, 400.0))
    hu = np.array([-1000.0, -150.0, -100.0, 50.0, 100.0, 200.0, 230.0, 2000.0])
    # window [-160, 240] then clip [-100, 200] then (x - 50) / 25
    expected = (np.array([-100, -100, -100, 50, 100, 200, 200, 200]) - 50) / 25
    np.testing.assert_allclose(normalize_ct(hu, st), expected, **F32)


def test_per_image_clip_and_zscore_by_hand():
    x = np.arange(1001, dtype=np.float64)
    out, info = normalize_per_image(x, clip=True)
    assert (info.low, info.high, info.used_mask) == (5.0, 995.0, False)
    std = _clipped_std_0_to_1000()
    np.testing.assert_allclose(out[[0, 5, 500, 995, 1000]], np.array([-495, -495, 0, 495, 495]) / std, **F32)
    # No clipping (PET, colour modalities): a plain z-score.
    out, info = normalize_per_image(np.array([1.0, 2.0, 3.0, 4.0]), clip=False)
    assert info.low is None and info.mean == 2.5 and info.std == pytest.approx(1.25**0.5)
    np.testing.assert_allclose(out, (np.array([1, 2, 3, 4]) - 2.5) / 1.25**0.5, **F32)
    # With a mask: statistics inside only, zero outside.
    out, info = normalize_per_image(np.array([1.0, 2.0, 3.0, 100.0]), np.array([1, 1, 1, 0], bool), clip=False)
    np.testing.assert_allclose(out, [-(1.5**0.5), 0.0, 1.5**0.5, 0.0], **F32)
    with pytest.raises(DataError, match="constant intensity"):
        normalize_per_image(np.full(10, 7.0))


def _image_2d_for_25_percent_rule(rows: int) -> np.ndarray:
    """A 12 x 12 image: rows [0, rows) non-zero (values 1..), except a zero notch in the last non-zero row
    (cols 0-5) that opens to the edge (not a hole, so never part of the non-zero mask)."""
    img = np.zeros((12, 12), np.float32)
    img[:rows] = np.arange(1, rows * 12 + 1, dtype=np.float32).reshape(rows, 12)
    img[rows - 1, :6] = 0
    return img


def test_25_percent_rule_both_ways():
    assert crop_removes_enough((12, 12), ((0, 9), (0, 12)))  # 108 / 144 kept: exactly 25 % removed
    assert not crop_removes_enough((12, 12), ((0, 10), (0, 12)))  # 16.7 % removed
    assert crop_removes_enough((1, 4, 4), ((0, 1), (0, 3), (0, 4)))

    # 25 % removed -> statistics over the non-zero mask only, zeros outside the mask stay 0.
    img = _image_2d_for_25_percent_rule(9)
    pre = preprocess_image_2d(img, None, "MRI", size=12)
    assert pre.grid.crop == ((0, 1), (0, 9), (0, 12)) and pre.norm.used_mask
    inside = img[:9][img[:9] != 0].astype(np.float64)
    lo, hi = np.percentile(inside, (0.5, 99.5))
    clipped = np.clip(inside, lo, hi)
    assert (pre.norm.low, pre.norm.high) == pytest.approx((lo, hi))
    assert (pre.norm.mean, pre.norm.std) == pytest.approx((clipped.mean(), clipped.std()))
    # size 12 from a 9 x 12 crop: rows are resampled, so check the normalisation before resizing instead.
    normed, _ = normalize_per_image(img[:9], img[:9] != 0, clip=True)
    assert np.all(normed[8, :6] == 0) and np.all(normed[8, 6:] != 0)

    # 16.7 % removed -> statistics over the whole crop, zeros included.
    img = _image_2d_for_25_percent_rule(10)
    pre = preprocess_image_2d(img, None, "MRI", size=12)
    assert pre.grid.crop == ((0, 1), (0, 10), (0, 12)) and not pre.norm.used_mask
    every = img[:10].astype(np.float64).ravel()
    lo, hi = np.percentile(every, (0.5, 99.5))
    assert pre.norm.mean == pytest.approx(np.clip(every, lo, hi).mean())


def test_holes_inside_the_nonzero_region_belong_to_the_mask():
    img = np.zeros((10, 10), np.float32)
    img[:6, :6] = 5.0
    img[:6, :6][1::2, ::2] = 10.0
    img[2:4, 2:4] = 0.0  # an enclosed hole: inside the body (nnU-Net fills it)
    pre = preprocess_image_2d(img, None, "MRI", size=6)
    assert pre.grid.crop == ((0, 1), (0, 6), (0, 6)) and pre.norm.used_mask
    vals = img[:6, :6].astype(np.float64).ravel()  # all 36 pixels, the hole's 4 zeros included
    assert pre.norm.mean == pytest.approx(np.clip(vals, *np.percentile(vals, (0.5, 99.5))).mean())
    assert pre.image[0, 2, 2, 0] == pytest.approx((0.0 - pre.norm.mean) / pre.norm.std, rel=1e-5)


def test_modalities_without_clipping_and_ct_needs_stats():
    img = np.zeros((8, 8), np.float32)
    img[:, :] = np.arange(64).reshape(8, 8) + 1
    img[0, 0] = 1000.0  # an outlier the percentile clip would remove
    pet = preprocess_image_2d(img, None, "PET", size=8)
    mri = preprocess_image_2d(img, None, "MRI", size=8)
    assert pet.norm.low is None and pet.norm.mean == pytest.approx(img.mean())
    assert mri.norm.high < 1000.0
    unlabelled = preprocess_image_2d(img, None, "CT", size=8)  # default window and statistics, no labels
    assert unlabelled.norm.window == (40.0, 400.0)
    assert (unlabelled.norm.mean, unlabelled.norm.std) == (40.0, 100.0)
    st = CTStats(0.0, 100.0, 50.0, 10.0, WINDOWS["soft_tissue"])
    ct = preprocess_image_2d(img, None, "CT", size=8, ct_stats=st)
    np.testing.assert_allclose(ct.image[0, 0, 0, 0], (100.0 - 50.0) / 10.0, **F32)
    with pytest.raises(ValueError, match="differs from the window"):
        preprocess_image_2d(img, None, "CT", size=8, ct_stats=st, window="lung")
    lung = CTStats(-1000.0, 100.0, -450.0, 110.0, WINDOWS["lung"])
    ct = preprocess_image_2d(img, None, "CT", size=8, ct_stats=lung, window="stats")  # the stats' own window
    assert ct.norm.window == (-600.0, 1500.0)
    np.testing.assert_allclose(ct.image[0, 0, 1, 0], (2.0 + 450.0) / 110.0, **F32)
    with pytest.raises(DataError, match="unknown modality 'sonar'.*CT, MRI"):
        preprocess_image_2d(img, None, "sonar", size=8)
    with pytest.raises(DataError, match="all zero"):
        preprocess_image_2d(np.zeros((8, 8)), None, "MRI", size=8)


# --------------------------------------------------------------------------------------------- geometry


def test_slice_axis_choice():
    assert choose_slice_axis((0.8, 0.8, 2.5)) == 2  # usual CT: axial
    assert choose_slice_axis((2.5, 0.8, 0.8)) == 0
    assert choose_slice_axis((0.8, 3.0, 0.8)) == 1
    assert choose_slice_axis((1.0, 1.0, 1.0)) == 2  # isotropic: the paper's two trailing (y, x) axes
    assert choose_slice_axis((1.0000001, 1.0, 1.0)) == 2  # float noise is a tie
    assert choose_slice_axis((2.0, 2.0, 1.0)) == 1  # tie between the coarsest: the later one
    with pytest.raises(ValueError, match="spacing"):
        choose_slice_axis((1.0, 0.0, 1.0))


def test_anisotropic_volume_is_sliced_along_its_coarse_axis():
    data = np.zeros((5, 7, 9), np.float32)
    data[1:4, 2:6, 3:8] = np.arange(60).reshape(3, 4, 5) + 1
    vol = Volume.from_array(data, np.diag([3.0, 1.0, 1.0, 1.0]))  # x is the coarse axis: sagittal slices
    pre = preprocess_case(vol, None, "MRI", size=8)
    assert pre.grid.slice_axis == 0 and pre.image.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(pre.grid.slice_indices, [1, 2, 3])
    # Sagittal view: rows = z reversed (superior up), cols = y reversed (anterior on the left).
    assert pre.grid.crop == ((1, 4), (9 - 8, 9 - 3), (7 - 6, 7 - 2))


def test_crop_box_in_stack_coordinates_includes_labels():
    shape = (10, 12, 6)
    data = np.zeros(shape, np.float32)
    data[2:7, 3:9, 1:5] = 1.0 + np.arange(120).reshape(5, 6, 4)
    labels = np.zeros(shape, np.int32)
    labels[3:5, 4:6, 2:4] = 1
    vol = Volume.from_array(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    pre = preprocess_case(vol, labels, "MRI", size=16, min_target_fraction=0)
    # axial: stack[k, r, c] = vol[X-1-c, Y-1-r, k]; x in [2, 7) -> c in [3, 8); y in [3, 9) -> r in [3, 9)
    assert pre.grid.slice_axis == 2 and pre.grid.crop == ((1, 5), (3, 9), (3, 8))
    labels[8, 5, 2] = 2  # a labelled voxel outside the non-zero region widens the crop: x = 8 -> c = 1
    pre = preprocess_case(vol, labels, "MRI", size=16, min_target_fraction=0)
    assert pre.grid.crop == ((1, 5), (3, 9), (1, 8))
    np.testing.assert_array_equal(to_original_grid(pre.labels, pre.grid), labels)
    assert bounding_box(np.pad(np.ones((2, 3), bool), ((1, 4), (5, 0)))) == ((1, 3), (5, 8))


def test_labels_can_be_kept_out_of_the_image():
    """``labels_touch_image=False`` (held-out evaluation): the image and its grid are exactly those of the
    unlabelled case, while the default lets the labels widen the crop and set the CT statistics."""
    shape = (10, 12, 6)
    rng = np.random.default_rng(0)
    data = np.zeros(shape, np.float32)
    data[2:7, 3:9, 1:5] = rng.uniform(-200, 300, (5, 6, 4))
    labels = np.zeros(shape, np.int32)
    labels[3:5, 4:6, 2:4] = 1
    labels[8, 5, 2] = 2  # outside the non-zero region
    vol = Volume.from_array(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    unlabelled = preprocess_case(vol, None, "CT", size=16)
    blind = preprocess_case(vol, labels, "CT", size=16, min_target_fraction=0, labels_touch_image=False)
    aware = preprocess_case(vol, labels, "CT", size=16, min_target_fraction=0)
    np.testing.assert_array_equal(blind.image, unlabelled.image)
    assert blind.grid.crop == unlabelled.grid.crop == ((1, 5), (3, 9), (3, 8))
    assert blind.norm == unlabelled.norm
    # the default is the paper's training preprocessing: the labels move the crop and the statistics
    assert aware.grid.crop == ((1, 5), (3, 9), (1, 8)) and aware.norm != unlabelled.norm
    # the labels follow the image's crop: label 1 intact, label 2 (outside the image) cut away
    back = to_original_grid(blind.labels, blind.grid)
    np.testing.assert_array_equal(back == 1, labels == 1)
    assert not (back == 2).any()
    g2 = preprocess_image_2d(data[..., 2], labels[..., 2], "CT", 16, labels_touch_image=False)
    np.testing.assert_array_equal(g2.image, preprocess_image_2d(data[..., 2], None, "CT", 16).image)


def test_axial_view_is_radiological():
    """Anterior at the top and the patient's right on the image's left, for canonical RAS data."""
    data = np.ones((4, 5, 3), np.float32)
    data[3, 0, :] = 9.0  # most right (x max), most posterior (y min)
    pre = preprocess_case(Volume.from_array(data, np.diag([1.0, 1.0, 2.0, 1.0])), None, "PET", size=5)
    stack = pre.grid.to_stack(data)
    assert stack.shape == (3, 5, 4) and stack[0, 4, 0] == 9.0  # bottom row (posterior), left column (right)
    np.testing.assert_array_equal(pre.grid.from_stack(stack), data)


def test_resize_matches_pillow():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(37, 23)).astype(np.float32)
    for out_hw in [(16, 11), (64, 50), (37, 40)]:
        ref = np.asarray(Image.fromarray(img).resize(out_hw[::-1], Image.BICUBIC))
        ours = resize_stack(img[None], out_hw, "bicubic")[0]
        # Pillow accumulates in float64 per axis and rounds to float32 in between; values are O(1).
        np.testing.assert_allclose(ours, ref, atol=2e-5)
        ref_n = np.asarray(Image.fromarray(img).resize(out_hw[::-1], Image.NEAREST))
        np.testing.assert_array_equal(resize_stack(img[None], out_hw, "nearest")[0], ref_n)
    np.testing.assert_allclose(resize_stack(np.full((1, 9, 7), 3.5), (20, 5), "bicubic"), 3.5, rtol=1e-6)
    np.testing.assert_allclose(resize_stack(np.full((1, 9, 7), 3.5), (20, 5), "linear"), 3.5, rtol=1e-6)


# --------------------------------------------------------------------------------------------- targets


def test_split_into_classes_and_components():
    lab = np.zeros((3, 16, 16), np.int32)
    lab[0, 1:4, 1:4] = 1
    lab[0, 10:14, 10:14] = 1  # class 1: two components
    lab[1, 5:9, 5:9] = 2
    lab[2, 9:11, 9:11] = 2  # touches the slice-1 block only through a 3D corner (26-connectivity)
    lab[0, 5:7, 1:3] = 3
    lab[0, 7:9, 3:5] = 3  # touches the other class-3 block only diagonally in-plane
    targets, inst = split_targets(lab, {1: "one", 2: "two"}, min_fraction=0)
    got = [(t.class_id, t.component_id, t.name, t.area, t.slice_range) for t in targets]
    assert got == [(1, 1, "one", 9, (0, 1)), (1, 2, "one", 16, (0, 1)), (2, 1, "two", 20, (1, 3)),
                   (3, 1, "class_3", 8, (0, 1))]
    assert inst.dtype == np.int32 and set(np.unique(inst)) == {0, 1, 2, 3, 4}
    for t in targets:
        assert t.mask.shape == lab.shape and t.mask.dtype == bool and np.all(lab[t.mask] == t.class_id)
    # Faces-only connectivity separates the corner and diagonal contacts.
    targets, _ = split_targets(lab, min_fraction=0, connectivity=1)
    assert [(t.class_id, t.component_id) for t in targets] == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    # A single-component class keeps the original mask.
    assert np.array_equal(split_targets(lab, min_fraction=0)[0][2].mask, lab == 2)


def test_small_target_threshold_at_the_boundary():
    """0.153 % of 256 x 256 = 100.27 pixels: 100 pixels are dropped, 101 kept."""
    lab = np.zeros((1, 256, 256), np.int32)
    lab[0, 10:20, 10:20] = 1  # 100 pixels
    lab[0, 50:60, 50:60] = 2
    lab[0, 60, 50] = 2  # 101 pixels
    targets, inst = split_targets(lab)
    assert [(t.class_id, t.area) for t in targets] == [(2, 101)]
    assert not inst[lab == 1].any()
    # 3D: the rule is on the largest cross-section, not the total volume.
    lab3 = np.zeros((6, 256, 256), np.int32)
    lab3[:, 10:20, 10:20] = 1  # 6 x 100 pixels: total 600, largest slice 100 -> dropped
    lab3[2, 50:60, 50:60] = 2
    lab3[2, 60, 50] = 2  # one slice of 101 -> kept
    assert [(t.class_id, t.max_area) for t in split_targets(lab3)[0]] == [(2, 101)]


def test_target_from_a_mask():
    m = np.zeros((4, 8, 8), bool)
    m[1:3, 2:5, 2:5] = True
    t = Target(7, 1, m)
    assert t.slice_range == (1, 3) and t.area == 18 and t.max_area == 9 and t.name == "class_7"
    with pytest.raises(ValueError, match="exactly one of mask"):
        Target(1, 1)


# --------------------------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root / "ct", 1, "ct", seed=3)
    write_phantom_dataset(root / "mri", 1, "mri", seed=4)
    return root


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_round_trip_on_phantom_is_exact(phantom_files, tmp_path, kind):
    img_path = phantom_files / kind / "imagesTr" / "phantom_000.nii.gz"
    lab_path = phantom_files / kind / "labelsTr" / "phantom_000.nii.gz"
    vol = load_volume(img_path)
    labels = load_labels(lab_path, vol)
    assert vol.orientation == ("L", "A", "S")
    pre = preprocess_case(vol, labels, "CT" if kind == "ct" else "MRI", size=256)
    n = pre.grid.n_slices
    assert pre.image.shape == (n, 256, 256, 3) and pre.image.dtype == np.float32
    assert pre.labels.shape == (n, 256, 256) and pre.grid.exact_round_trip
    assert np.array_equal(pre.image[..., 0], pre.image[..., 2])
    if kind == "mri":  # zeros outside the body: the crop removed >= 25 % and the mask rule applied
        assert pre.norm.used_mask and pre.grid.crop_hw[0] < vol.shape[1]
    else:  # the foreground of this single case is normalised to mean 0, std 1 (before resizing)
        fg = normalize_ct(vol.data[labels > 0], CTStats(pre.norm.low, pre.norm.high, pre.norm.mean, pre.norm.std,
                                                        pre.norm.window))
        assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-4
    # Every class of the phantom is a kept target; the class map and each target come back unchanged.
    assert {t.class_id for t in pre.targets} == set(np.unique(labels)) - {0}
    back = to_original_grid(pre.labels, pre.grid)
    assert back.dtype == pre.labels.dtype and np.array_equal(back, labels)
    # A target is a connected component of its class (26-connected) in the original grid too: nearest
    # upsampling neither joins nor splits components.
    full = ndimage.generate_binary_structure(3, 3)
    for t in pre.targets:
        m = to_original_grid(t.mask, pre.grid)
        comp, _ = ndimage.label(labels == t.class_id, structure=full)
        assert m.dtype == bool and np.array_equal(m, comp == comp[tuple(np.argwhere(m)[0])])
    # ... and written on the file's own grid, it equals the label file voxel for voxel, with its affine.
    out = nib.load(str(save_volume(tmp_path / "pred.nii.gz", back, vol)))
    raw = nib.load(str(lab_path))
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(raw.dataobj))
    np.testing.assert_allclose(out.affine, raw.affine, atol=1e-6)
    # Probabilities go back with linear interpolation, inside [0, 1] and close to the mask.
    big = max(pre.targets, key=lambda t: t.area)
    prob = to_original_grid(big.mask.astype(np.float32), pre.grid)
    truth = labels == big.class_id
    assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1 + 1e-6
    dice = 2 * ((prob > 0.5) & truth).sum() / ((prob > 0.5).sum() + truth.sum())
    assert dice > 0.97


def test_round_trip_when_downsampling(phantom_files):
    """Crop larger than S: exact for masks at the S grid's resolution, else each voxel's label comes from a
    voxel at most floor(h / (2 S) + 1/2) away along each in-plane axis."""
    vol = load_volume(phantom_files / "ct" / "imagesTr" / "phantom_000.nii.gz")
    labels = load_labels(phantom_files / "ct" / "labelsTr" / "phantom_000.nii.gz", vol)
    size = 40
    pre = preprocess_case(vol, labels, "CT", size=size)
    h, w = pre.grid.crop_hw
    assert min(h, w) > size and not pre.grid.exact_round_trip
    back = to_original_grid(pre.labels, pre.grid)
    assert not np.array_equal(back, labels)  # information was lost, as it must be
    stack, back_s = pre.grid.to_stack(labels), pre.grid.to_stack(back)
    dr, dc = int(np.floor(h / (2 * size) + 0.5)), int(np.floor(w / (2 * size) + 0.5))
    found = np.zeros(back_s.shape, bool)
    padded = np.pad(stack, ((0, 0), (dr, dr), (dc, dc)), constant_values=-1)
    for a in range(-dr, dr + 1):
        for b in range(-dc, dc + 1):
            found |= padded[:, dr + a : dr + a + stack.shape[1], dc + b : dc + b + stack.shape[2]] == back_s
    assert found.all()
    # A mask at the S grid's resolution survives: nearest up to (h, w) then down to S is the identity.
    d = np.random.default_rng(0).integers(0, 4, (3, size, size))
    np.testing.assert_array_equal(resize_stack(resize_stack(d, (h, w), "nearest"), (size, size), "nearest"), d)
    up = nearest_indices(size, h)[nearest_indices(h, size)]
    np.testing.assert_array_equal(up, np.arange(size))


def test_round_trip_on_real_ct_crop(tmp_path):
    box = ((150, 330), (190, 370), (30, 70))
    ct = realct.load_realct(box=box)
    pre = preprocess_case(ct.volume, ct.labels, "CT", size=256, label_names=ct.label_names)
    assert pre.grid.slice_axis == 2 and pre.grid.exact_round_trip
    names = {t.name for t in pre.targets}
    assert {"liver", "aorta", "stomach"} <= names, names
    back = to_original_grid(pre.labels, pre.grid)
    np.testing.assert_array_equal(back, ct.labels)
    # The liver's main target is its largest 26-connected component in the original grid (the label map,
    # model output, has a few stray liver voxels elsewhere).
    liver = max((t for t in pre.targets if t.name == "liver"), key=lambda t: t.area)
    comp, k = ndimage.label(ct.labels == 5, structure=ndimage.generate_binary_structure(3, 3))
    largest = comp == 1 + np.argmax(np.bincount(comp.ravel())[1:])
    np.testing.assert_array_equal(to_original_grid(liver.mask, pre.grid), largest)
    # On the file grid: the cropped region of mask.nii.gz, which is stored LAS (x reversed).
    out = nib.load(str(save_volume(tmp_path / "pred.nii.gz", back, ct.volume)))
    raw = nib.load(str(realct.realct_paths()[1]))
    nx = raw.shape[0]
    (x0, x1), (y0, y1), (z0, z1) = box
    file_crop = np.asanyarray(raw.dataobj[nx - x1 : nx - x0, y0:y1, z0:z1])
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), file_crop)
    np.testing.assert_allclose(out.affine[:3, :3], raw.affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(out.affine[:3, 3], (raw.affine @ [nx - x1, y0, z0, 1])[:3], atol=1e-4)


def test_2d_colour_and_grey(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(1, 256, (30, 40, 3)).astype(np.float32)
    mask = np.zeros((30, 40), np.int32)
    mask[5:20, 8:30] = 1
    mask[22:28, 2:6] = 2
    pre = preprocess_image_2d(rgb, mask, "dermoscopy", size=64, label_names={1: "lesion"})
    assert pre.image.shape == (1, 64, 64, 3) and not np.array_equal(pre.image[..., 0], pre.image[..., 1])
    assert pre.norm.low is None and pre.norm.mean == pytest.approx(rgb.mean())  # joint z-score, no clipping
    assert [(t.class_id, t.name) for t in pre.targets] == [(1, "lesion"), (2, "class_2")]
    np.testing.assert_array_equal(to_original_grid(pre.labels, pre.grid), mask)
    np.testing.assert_array_equal(to_original_grid(pre.labels[0], pre.grid), mask)
    grey = preprocess_image_2d(rgb[..., :1], mask, "X-ray", size=64)
    assert np.array_equal(grey.image[..., 0], grey.image[..., 2]) and grey.norm.high is not None
    with pytest.raises(DataError, match=r"mask of shape \(30, 41\)"):
        preprocess_image_2d(rgb, np.zeros((30, 41)), "dermoscopy", size=64)
    with pytest.raises(DataError, match="NaN/inf"):
        preprocess_image_2d(np.full((4, 4), np.nan), None, "MRI", size=8)
    with pytest.raises(ValueError, match=r"pred has shape \(1, 32, 32\).*\(1, 64, 64\)"):
        to_original_grid(np.zeros((1, 32, 32), bool), pre.grid)


def test_labels_must_match_the_volume():
    vol = Volume.from_array(np.ones((4, 5, 6), np.float32), np.eye(4), path="scan.nii.gz")
    with pytest.raises(DataError, match=r"scan.nii.gz: labels of shape \(4, 5, 7\)"):
        preprocess_case(vol, np.zeros((4, 5, 7), np.int32), "MRI", size=8)
