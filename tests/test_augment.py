"""Augmentation rules of appendix C.2, each on a case whose answer is known."""

import dataclasses

import numpy as np
import pytest

from medsam2_jax.data.augment import AugmentConfig, augment_sequence

OFF = AugmentConfig.off()


def only(**kw) -> AugmentConfig:
    """Everything off except the given fields (per-modality sub-probabilities at 1 so p is exact)."""
    return dataclasses.replace(OFF, p_blur_per_modality=1.0, p_low_res_per_modality=1.0, **kw)


def _l_shape(T=3, S=16, C=3):
    """An asymmetric L (so a rotation's direction and a flip's axis are visible), same on every slice."""
    m = np.zeros((T, S, S), bool)
    m[:, 2:4, 3:12] = True
    m[:, 2:10, 3:5] = True
    img = np.where(m[..., None], 1.0, 0.0).astype(np.float32).repeat(C, -1)
    return img, m


def test_zero_probability_config_is_identity_and_inputs_untouched():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    m = rng.random((4, 16, 16)) > 0.5
    img0, m0 = img.copy(), m.copy()
    for seed in range(5):
        out, om = augment_sequence(img, m, np.random.default_rng(seed), OFF)
        np.testing.assert_array_equal(out, img)
        np.testing.assert_array_equal(om, m)
        assert out.dtype == np.float32 and om.dtype == bool
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(m, m0)
    # and with the paper's probabilities the inputs are still not modified in place
    augment_sequence(img, m, np.random.default_rng(1), dataclasses.replace(AugmentConfig(), p_flip=1.0))
    np.testing.assert_array_equal(img, img0)


def test_flip_moves_a_known_pixel():
    img = np.zeros((2, 8, 8, 3), np.float32)
    img[:, 1, 2] = 5.0
    m = img[..., 0] > 0
    out, om = augment_sequence(img, m, np.random.default_rng(0), only(p_flip=1.0))
    # p_flip = 1: both in-plane axes flipped, pixel (1, 2) -> (8-1-1, 8-1-2) = (6, 5), on every slice
    assert (out[:, 6, 5] == 5.0).all() and out.sum() == 2 * 3 * 5.0
    assert om[:, 6, 5].all() and om.sum() == 2


def test_flip_probability_per_axis():
    img, m = _l_shape(T=1)
    counts = {"rows": 0, "cols": 0}
    n = 400
    for seed in range(n):
        _, om = augment_sequence(img, m, np.random.default_rng(seed), only(p_flip=0.5))
        if np.array_equal(om, m[:, ::-1]) or np.array_equal(om, m[:, ::-1, ::-1]):
            counts["rows"] += 1
        if np.array_equal(om, m[:, :, ::-1]) or np.array_equal(om, m[:, ::-1, ::-1]):
            counts["cols"] += 1
    # each axis flips with p = 0.5 (paper C.2 item 8): Binomial(400, 0.5) mean 200, sd 10; 5 sd bound
    for k, c in counts.items():
        assert abs(c - 200) <= 50, (k, c)


def test_rotation_by_90_degrees_of_an_l_shape_matches_rot90():
    img, m = _l_shape()
    out, om = augment_sequence(img, m, np.random.default_rng(0), only(p_rotation=1.0, rotation_deg=(90, 90)))
    # +90 deg = counter-clockwise as displayed = np.rot90(k=1) on the (row, col) axes. Masks (nearest) are
    # exact; the image goes through a cubic spline evaluated at integer points up to cos(90deg) ~ 6e-17
    # rounding, so it reproduces the samples to float32 round-off.
    np.testing.assert_array_equal(om, np.rot90(m, 1, axes=(1, 2)))
    np.testing.assert_allclose(out, np.rot90(img, 1, axes=(1, 2)), atol=1e-5)
    out, om = augment_sequence(img, m, np.random.default_rng(0), only(p_rotation=1.0, rotation_deg=(-90, -90)))
    np.testing.assert_array_equal(om, np.rot90(m, -1, axes=(1, 2)))


def test_scaling_above_one_zooms_in():
    S = 32
    m = np.zeros((1, S, S), bool)
    m[:, 12:20, 12:20] = True  # an 8x8 square centred on the image centre (15.5, 15.5)
    img = m[..., None].astype(np.float32).repeat(3, -1)
    _, om = augment_sequence(img, m, np.random.default_rng(0), only(p_scale=1.0, scale=(2.0, 2.0)))
    # paper: s > 1 is a zoom in; about the centre the square doubles to 16x16 = rows/cols 8..23
    expected = np.zeros_like(m)
    expected[:, 8:24, 8:24] = True
    np.testing.assert_array_equal(om, expected)
    _, om = augment_sequence(img, m, np.random.default_rng(0), only(p_scale=1.0, scale=(0.5, 0.5)))
    assert om.sum() == 16  # zoom out: 4x4


def test_warp_fills_with_the_background_minimum():
    img = np.full((1, 16, 16, 3), 3.0, np.float32)
    img[:, 4:12, 4:12] = 7.0
    m = np.zeros((1, 16, 16), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_scale=1.0, scale=(0.5, 0.5), image_order=1))
    assert out[0, 0, 0, 0] == 3.0  # came from outside the image: the minimum, not zero


def test_gamma_of_a_known_value():
    img = np.array([0.0, 0.25, 0.5, 1.0], np.float32).reshape(1, 2, 2, 1).repeat(3, -1)
    m = np.zeros((1, 2, 2), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_gamma=1.0, gamma=(2.0, 2.0)))
    # range already [0, 1]: x -> x ** 2
    np.testing.assert_allclose(out[..., 0].ravel(), [0.0, 0.0625, 0.25, 1.0], atol=1e-7)
    # on a range [-1, 3]: scale to [0, 1], square, scale back: 1.0 -> 0.5 -> 0.25 -> 0.0
    img2 = np.array([-1.0, 1.0, 3.0, 3.0], np.float32).reshape(1, 2, 2, 1).repeat(3, -1)
    out2, _ = augment_sequence(img2, m, np.random.default_rng(0), only(p_gamma=1.0, gamma=(2.0, 2.0)))
    np.testing.assert_allclose(out2[..., 0].ravel(), [-1.0, 0.0, 3.0, 3.0], atol=1e-6)


def test_inversion_is_one_minus_image_on_unit_range():
    rng = np.random.default_rng(0)
    img = rng.random((2, 8, 8, 3)).astype(np.float32)
    img[0, 0, 0], img[0, 0, 1] = 0.0, 1.0  # range exactly [0, 1]
    m = np.zeros((2, 8, 8), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_invert=1.0))
    np.testing.assert_allclose(out, 1.0 - img, atol=1e-7)
    out, _ = augment_sequence(img * 4 - 2, m, np.random.default_rng(0), only(p_invert=1.0))
    np.testing.assert_allclose(out, -(img * 4 - 2), atol=1e-6)  # range [-2, 2]: x -> -x


def test_brightness_and_contrast_clip_to_the_original_range():
    img = np.array([-1.0, 0.0, 0.5, 1.0], np.float32).reshape(1, 2, 2, 1).repeat(3, -1)
    m = np.zeros((1, 2, 2), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_brightness=1.0, brightness=(1.5, 1.5)))
    np.testing.assert_allclose(out[..., 0].ravel(), [-1.0, 0.0, 0.75, 1.0])  # 1.5 and -1.5 clipped
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_contrast=1.0, contrast=(2.0, 2.0)))
    # mean 0.125: (x - 0.125) * 2 + 0.125 = [-2.125, -0.125, 0.875, 1.875] -> clipped to [-1, 1]
    np.testing.assert_allclose(out[..., 0].ravel(), [-1.0, -0.125, 0.875, 1.0], atol=1e-6)


def test_noise_variance_and_channels_share_the_field():
    img = np.zeros((4, 64, 64, 3), np.float32)
    m = np.zeros((4, 64, 64), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_noise=1.0, noise_variance=(0.04, 0.04)))
    # variance 0.04 -> sd 0.2; 16384 samples: the sample sd is within ~0.6% (1 sd); allow 3%
    assert abs(out[..., 0].std() - 0.2) < 0.006
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_blur_of_an_impulse_has_the_drawn_sigma():
    S = 33
    img = np.zeros((1, S, S, 3), np.float32)
    img[0, 16, 16] = 1.0
    m = np.zeros((1, S, S), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_blur=1.0, blur_sigma=(1.2, 1.2)))
    k = out[0, :, :, 0]
    yy, xx = np.mgrid[:S, :S]
    # a normalised Gaussian: mass 1, centred, per-axis variance sigma^2 (the 4-sigma truncated sampled
    # kernel loses < 1e-4 of the variance)
    assert abs(k.sum() - 1.0) < 1e-5
    assert abs((k * (yy - 16) ** 2).sum() - 1.44) < 1e-3 and abs((k * (xx - 16) ** 2).sum() - 1.44) < 1e-3
    assert out[0, 16, 16, 0] == k.max()


def test_low_resolution_removes_the_finest_detail():
    S = 32
    yy, xx = np.mgrid[:S, :S]
    board = ((yy + xx) % 2).astype(np.float32)  # 1-pixel checkerboard
    img = board[None, ..., None].repeat(3, -1)
    m = np.zeros((1, S, S), bool)
    out, _ = augment_sequence(img, m, np.random.default_rng(0), only(p_low_res=1.0, low_res=(2.0, 2.0)))
    # nearest downsampling by 2 samples pixels (1, 3, 5, ...) x (1, 3, 5, ...): all (odd + odd) % 2 = 0, so
    # the small image is constant 0 and the cubic resampling of a constant is that constant
    np.testing.assert_allclose(out, 0.0, atol=1e-6)
    const = np.full((2, S, S, 3), 0.7, np.float32)
    out, _ = augment_sequence(const, np.zeros((2, S, S), bool), np.random.default_rng(0),
                              only(p_low_res=1.0, low_res=(1.5, 1.5)))
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_spatial_parameters_are_shared_by_all_slices():
    img, m = _l_shape(T=4, S=24)
    cfg = only(p_rotation=1.0, p_scale=1.0, p_flip=0.5, p_blur=1.0, p_brightness=1.0, p_contrast=1.0,
               p_low_res=1.0, p_invert=0.5, p_gamma=1.0, image_order=0)
    for seed in range(6):
        out, om = augment_sequence(img, m, np.random.default_rng(seed), cfg)
        # identical input slices -> identical output slices: one draw per sequence
        for t in range(1, 4):
            np.testing.assert_array_equal(out[t], out[0])
            np.testing.assert_array_equal(om[t], om[0])
    # image and mask stay aligned: a binary image warped with nearest equals the warped mask
    geo = only(p_rotation=1.0, p_scale=1.0, p_flip=0.5, image_order=0)
    for seed in range(6):
        out, om = augment_sequence(img, m, np.random.default_rng(seed), geo)
        np.testing.assert_array_equal(out[..., 0] > 0.5, om)


def test_independent_frames_draw_per_frame():
    img, m = _l_shape(T=4, S=24)
    out, om = augment_sequence(img, m, np.random.default_rng(0), only(p_rotation=1.0), independent_frames=True)
    assert any(not np.array_equal(om[t], om[0]) for t in range(1, 4))


def test_deterministic_from_the_generator():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(3, 24, 24, 3)).astype(np.float32)
    m = rng.random((3, 24, 24)) > 0.7
    cfg = dataclasses.replace(AugmentConfig(), **{f.name: 0.6 for f in dataclasses.fields(AugmentConfig)
                                                  if f.name.startswith("p_")})
    a = augment_sequence(img, m, np.random.default_rng(11), cfg)
    b = augment_sequence(img, m, np.random.default_rng(11), cfg)
    c = augment_sequence(img, m, np.random.default_rng(12), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "field,p",
    [
        ("p_rotation", 0.15), ("p_scale", 0.15), ("p_noise", 0.15), ("p_blur", 0.15 * 0.5),
        ("p_brightness", 0.15), ("p_contrast", 0.15), ("p_low_res", 0.25 * 0.5), ("p_invert", 0.15),
        ("p_gamma", 0.15),
    ],
)
def test_paper_probabilities(field, p):
    """Each transform alone at the paper's probability changes the image in that fraction of draws."""
    default = AugmentConfig()
    kept = {field: getattr(default, field), "p_blur_per_modality": default.p_blur_per_modality,
            "p_low_res_per_modality": default.p_low_res_per_modality}
    cfg = dataclasses.replace(OFF, **kept)
    S = 32
    yy, xx = np.mgrid[:S, :S]
    base = (np.sin(yy / 3.0) + np.cos(xx / 5.0) + 0.02 * yy * xx / S).astype(np.float32)
    img = base[None, ..., None].repeat(3, -1)
    m = np.zeros((1, S, S), bool)
    n = 600
    changed = sum(not np.array_equal(augment_sequence(img, m, np.random.default_rng(s), cfg)[0], img)
                  for s in range(n))
    # low-res with a factor < 32/31.5 rounds back to full size (no change): ~3% of its draws
    mean = n * p * (0.97 if field == "p_low_res" else 1.0)
    sd = np.sqrt(n * p * (1 - p))
    assert abs(changed - mean) <= 5 * sd, (field, changed, mean)


def test_bad_inputs_name_the_argument():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="images must have shape"):
        augment_sequence(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), bool), rng)
    with pytest.raises(ValueError, match="masks must have shape"):
        augment_sequence(np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 9), bool), rng)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        augment_sequence(np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8), bool), 0)
    with pytest.raises(ValueError, match="p_gamma"):
        AugmentConfig(p_gamma=1.5)
    with pytest.raises(ValueError, match="rotation_deg"):
        AugmentConfig(rotation_deg=(10, -10))
