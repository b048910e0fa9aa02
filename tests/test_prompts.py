"""Prompt simulation: §4.3 training mix, corrective clicks, evaluation prompts, fixed-shape padding."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from medsam2_jax.data import prompts as P

S = 32


def _blob_sequence(T=4, seed=0):
    """T frames with a disc of varying radius; frame 2 is empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    masks = np.zeros((T, S, S), bool)
    for t in range(T):
        if t == 2:
            continue
        cy, cx = rng.integers(10, 22, size=2)
        r = 3 + t
        masks[t] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return masks


def _inside(mask2d, xy):
    return bool(mask2d[int(xy[1]), int(xy[0])])


def _bound(n, p, k=5.0):
    return k * np.sqrt(n * p * (1 - p))


def test_training_prompt_mix_and_fixed_shapes():
    masks = _blob_sequence()
    cfg = P.PromptConfig(num_points=6)
    n = 2000
    kinds = np.zeros(3, int)
    n_corr = np.zeros(3, int)
    for seed in range(n):
        pr = P.training_prompts(masks, np.random.default_rng(seed), cfg)
        # fixed shapes and dtypes whatever the draw
        assert pr.point_coords.shape == (4, 6, 2) and pr.point_coords.dtype == np.float32
        assert pr.point_labels.shape == (4, 6) and pr.point_labels.dtype == np.int32
        assert pr.mask_inputs.shape == (4, S, S) and pr.mask_inputs.dtype == np.float32
        assert pr.mask_valid.shape == pr.prompted.shape == pr.correct_frames.shape == (4,)
        kinds[pr.prompt_kind] += 1
        # padding: real points first, then -1 with zero coordinates
        for t in range(4):
            lab = pr.point_labels[t]
            k = int((lab != P.LABEL_PAD).sum())
            assert (lab[k:] == P.LABEL_PAD).all() and (pr.point_coords[t, k:] == 0).all()
        assert pr.prompted[0]
        if pr.prompt_kind == P.PROMPT_MASK:
            np.testing.assert_array_equal(pr.mask_inputs[0], masks[0].astype(np.float32))
            assert pr.mask_valid[0] and not pr.mask_valid[1:].any()
            assert not pr.correct_frames.any() and (pr.point_labels == -1).all()
        else:
            assert not pr.mask_valid.any() and (pr.mask_inputs == 0).all()
            assert pr.correct_frames[0]
            n_corr[int(pr.correct_frames.sum())] += 1
            if pr.prompt_kind == P.PROMPT_CLICK:
                assert pr.point_labels[0, 0] == P.LABEL_POS and _inside(masks[0], pr.point_coords[0, 0])
            else:
                assert list(pr.point_labels[0, :2]) == [P.LABEL_BOX_TOP_LEFT, P.LABEL_BOX_BOTTOM_RIGHT]
    # §4.3: mask 50%, click 25%, box 25% (5-sigma binomial bounds)
    for k, p in ((P.PROMPT_MASK, 0.5), (P.PROMPT_CLICK, 0.25), (P.PROMPT_BOX, 0.25)):
        assert abs(kinds[k] - n * p) <= _bound(n, p), (k, kinds)
    # "up to 2 frames (including the first)": 1 or 2 correction frames, equally likely
    m = n_corr[1] + n_corr[2]
    assert n_corr[0] == 0 and abs(n_corr[1] - m / 2) <= _bound(m, 0.5)


def test_simulated_corrections_follow_the_empty_prediction_rule():
    masks = _blob_sequence()
    cfg = P.PromptConfig(p_mask=0.0, p_click=1.0, p_box=0.0, correction_points_per_frame=2)
    seen_empty_frame = False
    for seed in range(200):
        pr = P.training_prompts(masks, np.random.default_rng(seed), cfg)
        for t in np.flatnonzero(pr.correct_frames):
            start = 1 if t == 0 else 0  # frame 0 holds the initial click first
            labels = pr.point_labels[t, start:start + 2]
            coords = pr.point_coords[t, start:start + 2]
            assert pr.prompted[t]
            for xy, lab in zip(coords, labels):
                if masks[t].any():  # empty prediction: the error is the whole target -> positive inside it
                    assert lab == P.LABEL_POS and _inside(masks[t], xy)
                else:  # nothing to miss, nothing wrong: a negative click in the background
                    seen_empty_frame = True
                    assert lab == P.LABEL_NEG and not _inside(masks[t], xy)
        # frames that are neither prompted nor corrected carry nothing
        quiet = ~pr.prompted
        assert (pr.point_labels[quiet] == -1).all() and not pr.correct_frames[quiet].any()
    assert seen_empty_frame
    # with predictions given, corrections come from their error regions
    pred = np.zeros_like(masks)
    pred[:, :8, :8] = True  # a false positive block
    cfg2 = dataclasses.replace(cfg, correction_mode="uniform")
    for seed in range(100):
        pr = P.training_prompts(masks, np.random.default_rng(seed), cfg2, pred_masks=pred)
        for t in np.flatnonzero(pr.correct_frames):
            start = 1 if t == 0 else 0
            for xy, lab in zip(pr.point_coords[t, start:start + 2], pr.point_labels[t, start:start + 2]):
                fn, fp = masks[t] & ~pred[t], ~masks[t] & pred[t]
                assert (lab == P.LABEL_POS and _inside(fn, xy)) or (lab == P.LABEL_NEG and _inside(fp, xy))
    # a loop that samples its own corrections: frames are chosen but left empty
    pr = P.training_prompts(masks, np.random.default_rng(1), dataclasses.replace(cfg, simulate_corrections=False))
    assert pr.correct_frames[0] and (pr.point_labels[0, 1:] == -1).all()
    assert not pr.prompted[1:].any()


def test_clicks_inside_the_mask_and_center_is_deepest():
    mask = np.zeros((S, S), bool)
    mask[5:20, 8:14] = True
    mask[12:16, 14:30] = True
    for seed in range(50):
        xy = P.click_in_region(mask, np.random.default_rng(seed), "uniform")
        assert _inside(mask, xy)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    for seed in range(10):
        xy = P.click_in_region(mask, np.random.default_rng(seed), "center")
        assert dist[int(xy[1]), int(xy[0])] == dist.max()
    # a square's deepest pixels are its centre ones
    sq = np.zeros((S, S), bool)
    sq[10:21, 4:15] = True  # 11x11, centre (15, 9)
    np.testing.assert_array_equal(P.click_in_region(sq, np.random.default_rng(0), "center"), [9, 15])


def test_uniform_clicks_cover_the_mask_evenly():
    mask = np.zeros((S, S), bool)
    mask[4:6, 4:6] = True  # 4 pixels
    n = 2000
    hits = np.zeros((S, S), int)
    for seed in range(n):
        xy = P.click_in_region(mask, np.random.default_rng(seed), "uniform")
        hits[int(xy[1]), int(xy[0])] += 1
    assert hits.sum() == n and (hits[mask] > 0).all() and hits[~mask].sum() == 0
    assert np.all(np.abs(hits[mask] - n / 4) <= _bound(n, 0.25))


def test_box_contains_the_mask_and_jitter_is_bounded():
    masks = _blob_sequence()
    m = masks[0]
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    coords, labels = P.box_prompt(m, np.random.default_rng(0))
    np.testing.assert_array_equal(coords, [[cols[0], rows[0]], [cols[-1], rows[-1]]])
    np.testing.assert_array_equal(labels, [2, 3])
    # every mask pixel lies inside the exact box
    ys, xs = np.nonzero(m)
    assert (xs >= coords[0, 0]).all() and (xs <= coords[1, 0]).all()
    assert (ys >= coords[0, 1]).all() and (ys <= coords[1, 1]).all()
    w, h = cols[-1] - cols[0], rows[-1] - rows[0]
    moved = False
    for seed in range(100):
        jc, _ = P.box_prompt(m, np.random.default_rng(seed), noise=0.1, noise_bound=0.5)
        d = np.abs(jc - coords)
        assert (d[:, 0] <= min(0.1 * w, 0.5) + 1e-6).all() and (d[:, 1] <= min(0.1 * h, 0.5) + 1e-6).all()
        assert (jc >= 0).all() and (jc <= S - 1).all()
        moved |= bool(d.max() > 0)
    assert moved


def test_corrective_click_labels_and_regions():
    rng = np.random.default_rng(0)
    gt = np.zeros((S, S), bool)
    gt[4:20, 4:20] = True  # 256 px
    pred = np.zeros((S, S), bool)
    pred[4:20, 4:12] = True  # FN = 128 px
    pred[24:28, 24:28] = True  # FP = 16 px
    fn, fp = gt & ~pred, ~gt & pred
    n = 1500
    pos = 0
    for _ in range(n):
        xy, lab = P.corrective_click(gt, pred, rng, "uniform")
        assert (lab == 1 and _inside(fn, xy)) or (lab == 0 and _inside(fp, xy))
        pos += lab
    p = 128 / 144  # uniform over the error pixels
    assert abs(pos - n * p) <= _bound(n, p)
    # center: the deepest error region wins (the FN block is 16x8, deeper than the 4x4 FP block)
    xy, lab = P.corrective_click(gt, pred, rng, "center")
    assert lab == 1 and _inside(fn, xy)
    big_fp = pred.copy()
    big_fp[22:32, 0:16] = True
    xy, lab = P.corrective_click(gt, big_fp, rng, "center")
    assert lab == 0 and _inside(~gt & big_fp, xy)
    # no error: a negative click in the background
    xy, lab = P.corrective_click(gt, gt, rng, "uniform")
    assert lab == 0 and not _inside(gt, xy)


def test_add_points_fills_padding_and_refuses_overflow():
    coords = np.zeros((3, 2), np.float32)
    labels = np.full(3, -1, np.int32)
    c, l = P.add_points(coords, labels, [[1, 2], [3, 4]], [2, 3])
    np.testing.assert_array_equal(l, [2, 3, -1])
    np.testing.assert_array_equal(c, [[1, 2], [3, 4], [0, 0]])
    assert (labels == -1).all()  # copies
    with pytest.raises(ValueError, match="num_points=3"):
        P.add_points(c, l, [[0, 0], [1, 1]], [1, 1])


def test_evaluation_prompts_chosen_frame_and_frequency():
    T = 40
    masks = np.zeros((T, S, S), bool)
    for t in range(5, 36):  # frames 5..35: the middle is 20
        r = 2 + min(t - 5, 35 - t) // 3
        masks[t, 16 - r:16 + r, 16 - r:16 + r] = True
    area = masks.reshape(T, -1).sum(1)
    assert P.choose_prompt_frame(masks, "largest") == int(np.argmax(area))
    assert P.choose_prompt_frame(masks, "first") == 5
    assert P.choose_prompt_frame(masks, "middle") == 20
    for kind in ("click", "box", "mask"):
        pr = P.evaluation_prompts(masks, kind, np.random.default_rng(0), frame="largest", frequency=0.0)
        t0 = int(np.argmax(area))
        assert pr.prompted.sum() == 1 and pr.prompted[t0] and not pr.correct_frames.any()
        if kind == "mask":
            np.testing.assert_array_equal(pr.mask_inputs[t0], masks[t0])
            assert pr.mask_valid[t0] and pr.mask_valid.sum() == 1
        elif kind == "click":  # default center click: the middle of the square
            assert pr.point_labels[t0, 0] == 1 and _inside(masks[t0], pr.point_coords[t0, 0])
        else:
            np.testing.assert_array_equal(pr.point_coords[t0, :2], P.mask_to_box(masks[t0]).reshape(2, 2))
    # prompt frequency p: other frames WITH the target prompted with probability p; never without it
    n_frames = n_prompted = 0
    for seed in range(60):
        pr = P.evaluation_prompts(masks, "click", np.random.default_rng(seed), frequency=0.25)
        assert not pr.prompted[area == 0].any()
        others = (area > 0) & (np.arange(T) != int(np.argmax(area)))
        n_frames += int(others.sum())
        n_prompted += int(pr.prompted[others].sum())
    assert abs(n_prompted - 0.25 * n_frames) <= _bound(n_frames, 0.25)
    assert P.evaluation_prompts(masks, "box", np.random.default_rng(0), frequency=1.0).prompted.sum() == 31


def test_bad_inputs_name_the_argument():
    rng = np.random.default_rng(0)
    masks = _blob_sequence()
    with pytest.raises(ValueError, match=r"masks\[0\] is empty"):
        P.training_prompts(masks[[2, 0, 1]], rng)
    with pytest.raises(ValueError, match="num_points=2 is too small"):
        P.PromptConfig(num_points=2)
    with pytest.raises(ValueError, match="must be 1"):
        P.PromptConfig(p_mask=0.5, p_click=0.5, p_box=0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        P.evaluation_prompts(masks, "scribble", rng)
    with pytest.raises(ValueError, match="frame=2 does not contain the target"):
        P.choose_prompt_frame(masks, 2)
    with pytest.raises(ValueError, match="pred has shape"):
        P.corrective_click(masks[0], masks[0][:5], rng)
    with pytest.raises(ValueError, match="mask is empty"):
        P.mask_to_box(masks[2])


def test_jax_corrective_click_and_add_point_inside_jit():
    import jax
    import jax.numpy as jnp

    gt = np.zeros((S, S), bool)
    gt[4:20, 4:20] = True
    pred = np.zeros((S, S), bool)
    pred[4:20, 4:12] = True
    pred[24:28, 24:28] = True
    fn, fp = gt & ~pred, ~gt & pred

    @jax.jit
    def step(key, coords, labels):
        xy, lab = P.corrective_click_jax(key, gt, pred)
        return P.add_point_jax(coords, labels, xy, lab)

    coords = jnp.zeros((3, 2), jnp.float32)
    labels = jnp.array([1, -1, -1], jnp.int32)
    n_pos = 0
    keys = jax.random.split(jax.random.key(0), 300)
    for key in keys[:300]:
        c, l = step(key, coords, labels)
        c, l = np.asarray(c), np.asarray(l)
        assert l[0] == 1 and l[2] == -1 and (c[2] == 0).all()  # only the first free slot is written
        assert (l[1] == 1 and _inside(fn, c[1])) or (l[1] == 0 and _inside(fp, c[1]))
        n_pos += int(l[1])
    p = 128 / 144
    assert abs(n_pos - 300 * p) <= _bound(300, p)
    # no error: negative click in the background; full arrays come back unchanged
    xy, lab = jax.jit(P.corrective_click_jax)(keys[0], gt, gt)
    assert int(lab) == 0 and not _inside(gt, np.asarray(xy))
    full = jnp.array([1, 0, 1], jnp.int32)
    c, l = jax.jit(P.add_point_jax)(coords, full, jnp.array([5.0, 5.0]), jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(l), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(c), np.zeros((3, 2)))
