"""3D mode (medsam2_jax.volume): orientation geometry, aggregation, and an end-to-end run on a phantom.

The model is a random SAM 2.1-tiny at S = 256 whose object-score bias is raised by 2 (so the object is
"present" and masks are not all -1024). Nothing here measures segmentation quality (a random model has
none); it checks shapes, exact inverses, that prompts are honoured, and that the 3D driver is the tracker.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from medsam2_jax import api, tracking, volume
from medsam2_jax.data.io import Volume
from medsam2_jax.data.phantoms import make_phantom
from medsam2_jax.data.preprocess import preprocess_case, to_original_grid

S = 256
N = 12  # slices of the preprocessed phantom
Z = 4  # prompted axial slice: N - Z = 8 slices forward = one length bucket (8 here), no padding
LABEL = 1


# ---------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("n", [5, 32, 40])
def test_orientation_transforms_are_exact_inverses(n):
    rng = np.random.default_rng(n)
    s = 32
    x = rng.normal(size=(n, s, s)).astype(np.float32)
    x3 = rng.normal(size=(n, s, s, 3)).astype(np.float32)
    for o in volume.ORIENTATIONS:
        f = volume.to_orientation(x, o, None, "nearest")
        t_full = n if o.startswith("axial") else s
        assert f.shape == (t_full, s, s)
        if n <= s:  # nearest there and back is the identity when n <= S
            assert np.array_equal(volume.from_orientation(f, o, n, "nearest"), x), o
            assert np.array_equal(volume.from_orientation(volume.to_orientation(x3, o, None, "nearest"), o, n,
                                                          "nearest"), x3), o
        if not o.startswith("axial"):
            for t in (1, 7, s):  # fewer frames than positions: the frames come back exactly
                ft = volume.to_orientation(x, o, t, "nearest")
                assert ft.shape == (t, s, s)
                back = volume.to_orientation(volume.from_orientation(ft, o, n, "nearest"), o, t, "nearest")
                assert np.array_equal(back, ft), (o, t)
    # Reversal is the reversed frame order; coronal frame t is stack row position t (all S positions).
    assert np.array_equal(volume.to_orientation(x, "axial_rev"), x[::-1])
    if n <= s:
        cor = volume.to_orientation(x, "coronal", None, "nearest")
        rows = np.take(x[:, 3, :], np.asarray(volume.prep.nearest_indices(n, s)), axis=0)
        assert np.array_equal(cor[3], rows)
        sag = volume.to_orientation(x, "sagittal", None, "nearest")
        assert np.array_equal(sag[5], np.take(x[:, :, 5], np.asarray(volume.prep.nearest_indices(n, s)), axis=0))


def test_linear_frames_and_errors():
    x = np.broadcast_to(np.linspace(0, 1, 6, dtype=np.float32)[:, None, None], (6, 16, 16)).copy()
    cor = volume.to_orientation(x, "coronal", 4, "linear")
    assert cor.shape == (4, 16, 16)
    # A volume that varies only along the slices: every coronal frame is the same ramp down its rows,
    # increasing (linear interpolation of increasing samples), constant along its columns.
    assert np.allclose(cor, cor[:1]) and np.all(np.diff(cor[0][:, 0]) >= 0) and np.allclose(cor[0], cor[0][:, :1])
    back = volume.from_orientation(cor, "coronal", 6, "linear")
    assert back.shape == x.shape
    with pytest.raises(ValueError, match="orientation must be one of"):
        volume.to_orientation(x, "oblique")
    with pytest.raises(ValueError, match="num_frames must be in"):
        volume.to_orientation(x, "sagittal", 17)
    with pytest.raises(ValueError, match="axial frames"):
        volume.to_orientation(x, "axial", 3)
    with pytest.raises(ValueError, match="VolumeConfig.aggregation"):
        volume.VolumeConfig(aggregation="max")
    with pytest.raises(ValueError, match="VolumeConfig.orientations"):
        volume.VolumeConfig(orientations=("axial", "axial"))


def test_bad_volume_inputs_are_named():
    from types import SimpleNamespace

    tiny = SimpleNamespace(image_size=16)  # the checks run before anything touches the model
    img = np.zeros((4, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match=r"prompt\['slice'\] must be an axial slice index in \[0, 3\], got 4"):
        volume.segment_volume(tiny, img, {"slice": 4, "points": [[1, 1]], "labels": [1]})
    with pytest.raises(ValueError, match="unknown keys"):
        volume.segment_volume(tiny, img, {"slice": 0, "point": [[1, 1]]})
    with pytest.raises(ValueError, match=r"prompt\['mask'\] must be 16x16"):
        volume.segment_volume(tiny, img, {"slice": 0, "mask": np.ones((8, 8))})
    with pytest.raises(ValueError, match=r"\(n, 16, 16, 3\)"):
        volume.segment_volume(tiny, img[..., :1], {"slice": 0, "mask": np.ones((16, 16))})


def test_aggregation_of_identical_predictions_is_identity():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4, 8, 8)).astype(np.float32)
    same = np.stack([p] * 6)
    assert np.array_equal(volume.aggregate(same, None, "mean"), p)
    assert np.array_equal(volume.aggregate(same, None, "vote"), (p > 0.5).astype(np.float32))
    # Known answers: only the orientations that saw a voxel count; unseen voxels are 0.
    q = rng.uniform(size=(4, 8, 8)).astype(np.float32)
    vis = np.zeros((2, 4, 8, 8), bool)
    vis[0, :2] = True
    vis[1, 1:3] = True
    m = volume.aggregate(np.stack([p, q]), vis, "mean")
    assert np.array_equal(m[0], p[0]) and np.array_equal(m[2], q[2]) and np.all(m[3] == 0)
    assert np.allclose(m[1], (p[1].astype(np.float64) + q[1]) / 2, atol=1e-7)
    v = volume.aggregate(np.stack([p, q, 1 - p]), None, "vote")
    assert np.allclose(v, ((p > 0.5).astype(float) + (q > 0.5) + ((1 - p) > 0.5)) / 3, atol=1e-7)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def model():
    return api.random_model("sam2.1_hiera_t", S, seed=0, init="flax", object_bias=2.0)


@pytest.fixture(scope="module")
def phantom():
    image, labels, affine = make_phantom(0, "ct", (40, 40, N), spacing=(1.0, 1.0, 4.0), orientation="RAS")
    pre = preprocess_case(Volume.from_array(image, affine), labels, "CT", size=S)
    mask = pre.labels[Z] == LABEL
    assert pre.image.shape == (N, S, S, 3) and mask.sum() > 1000
    return image.shape, pre, mask


# Defaults (six orientations, shared self-sorting bank, mean) but 4 frames per coronal/sagittal pass and
# runs padded to multiples of 8: the whole volume is 12 + 2 x 4 encoded frames and two compiled programs
# (8 and 24 frames; the 8-frame one, with the default tracker config, is also the one-prompt tests').
CFG = volume.VolumeConfig(frames=4, length_bucket=8)


@pytest.fixture(scope="module")
def result(model, phantom):
    _, pre, mask = phantom
    return volume.segment_volume_detailed(model, pre, {"slice": Z, "mask": mask}, CFG, key=jax.random.key(1))


def _agreement(probs: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    pred, mask = probs > 0.5, mask > 0
    union = (pred | mask).sum()
    return float((pred == mask).mean()), (float((pred & mask).sum() / union) if union else 1.0)


@pytest.mark.slow
def test_segment_volume_shapes_and_coverage(result, phantom):
    shape, pre, _ = phantom
    n = pre.image.shape[0]
    assert result.scope == "shared" and set(result.orientations) == set(volume.ORIENTATIONS)
    assert result.probs.shape == (n, S, S) and result.probs.dtype == np.float32
    assert np.all((result.probs >= 0) & (result.probs <= 1)) and np.isfinite(result.probs).all()
    for name, o in result.orientations.items():
        t = n if name.startswith("axial") else CFG.frames
        assert o.frame_probs.shape == (t, S, S) and o.frame_visited.shape == (t,)
        assert o.probs.shape == (n, S, S) and o.visited.shape == (n, S, S)
        # A prompted orientation runs from its prompted frame to its end (SAM 2's forward propagation).
        assert np.array_equal(np.flatnonzero(o.frame_visited), np.arange(o.prompt_frame, t)), name
    # Each axis's pair covers the whole volume: every voxel is seen by >= 3 orientations.
    assert result.count.min() >= 3 and result.count.shape == (n, S, S)
    # The result is the voxel-wise mean over the orientations that saw each voxel.
    names = list(result.orientations)
    ref = volume.aggregate(np.stack([result.orientations[o].probs for o in names]),
                           np.stack([result.orientations[o].visited for o in names]), "mean")
    assert np.array_equal(result.probs, ref)
    back = to_original_grid(result.probs > 0.5, pre.grid)
    assert back.shape == shape and back.dtype == bool
    # One bank across orientations: stage 1 (axial pair) and one combined pass whose bank, at the start of
    # a later block, still holds entries from the blocks before it.
    combined = result.runs[-1]
    assert len(result.runs) == 3 and combined["orientations"] == volume.ORIENTATIONS
    starts = {o: off for o, off, _ in combined["blocks"]}
    tr = combined["trace"]
    later = starts["coronal"]
    held = tr["bank_frame"][later - 1][tr["bank_valid"][later - 1]]
    assert held.size > 0 and np.all(held < later)  # entries of the axial block, carried into the coronal one


@pytest.mark.slow
def test_prompted_slices_honour_their_mask_prompts(result, phantom):
    mask = phantom[2]
    ax, ax_rev = result.orientations["axial"], result.orientations["axial_rev"]
    assert ax.prompt_mask is None and ax_rev.prompt_mask is None  # the user's prompt
    assert ax.prompt_frame == Z and ax_rev.prompt_frame == N - 1 - Z
    # Same frame, same conditioning output in both axial directions.
    assert np.array_equal(ax.frame_probs[Z], ax_rev.frame_probs[ax_rev.prompt_frame])
    acc, iou = _agreement(ax.frame_probs[Z], mask)
    # The mask prompt becomes the output (SAM 2's mask-as-output: +-10 logits, downsampled to S/4 with
    # antialiasing and upsampled back), so it differs from the mask only along its border.
    assert acc > 0.99 and iou > 0.9, (acc, iou)
    for name in ("coronal", "sagittal", "coronal_rev", "sagittal_rev"):
        o = result.orientations[name]
        assert o.prompt_mask is not None and o.frame_visited[o.prompt_frame]
        acc, iou = _agreement(o.frame_probs[o.prompt_frame], o.prompt_mask)
        assert acc > 0.98 and iou > 0.85, (name, acc, iou)


@pytest.mark.slow
def test_single_orientation_equals_plain_track(model, phantom):
    _, pre, mask = phantom
    cfg = dataclasses.replace(CFG, orientations=("axial",))
    key = jax.random.key(3)
    res = volume.segment_volume_detailed(model, pre, {"slice": Z, "mask": mask}, cfg, key=key)
    assert len(res.runs) == 1 and res.runs[0]["padded_length"] == N - Z
    prompts = tracking.make_prompts([[{"frame": 0, "mask": mask}]], num_frames=N - Z, image_size=S,
                                    config=cfg.tracker)
    ref = tracking.track(model, pre.image[Z:], prompts, direction="forward", config=cfg.tracker,
                         key=jax.random.fold_in(key, 0))
    ref_p = np.asarray(jax.nn.sigmoid(ref["mask_logits"][0]))
    # Same computation on the same frames (the encoder batches them differently: float32 rounding only).
    assert np.abs(res.probs[Z:] - ref_p).max() < 1e-5
    assert np.all(res.probs[:Z] == 0) and np.all(res.count[:Z] == 0) and np.all(res.count[Z:] == 1)


# ---------------------------------------------------------------------------------------------- fast path
def test_aggregate_takes_a_list_and_equals_the_stacked_form():
    rng = np.random.default_rng(1)
    ps = [rng.uniform(size=(3, 8, 8)).astype(np.float32) for _ in range(4)]
    vs = [rng.uniform(size=(3, 8, 8)) > 0.3 for _ in range(4)]
    for method in volume.AGGREGATIONS:
        stacked = volume.aggregate(np.stack(ps), np.stack(vs), method)
        assert np.array_equal(volume.aggregate(ps, vs, method), stacked)
        assert np.array_equal(volume.aggregate(ps, None, method), volume.aggregate(np.stack(ps), None, method))
    with pytest.raises(ValueError, match="visited has shape"):
        volume.aggregate(ps, vs[:3])


def test_max_frames_caps_the_sections_and_validates(phantom):
    _, pre, _ = phantom
    crop = pre.grid.crop_hw
    _, frames = volume._image_and_frames(pre, volume.VolumeConfig(max_frames=5), S)
    assert frames == {1: min(5, crop[0]), 2: min(5, crop[1])}
    _, frames = volume._image_and_frames(pre, volume.VolumeConfig(max_frames=10_000), S)
    assert frames == {1: min(crop[0], S), 2: min(crop[1], S)}  # never more than one per voxel of the crop
    _, frames = volume._image_and_frames(pre, volume.VolumeConfig(frames=3, max_frames=5), S)
    assert frames == {1: 3, 2: 3}  # an exact count wins
    for bad in ({"max_frames": 0}, {"reuse_axial": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            volume.VolumeConfig(**bad)


@pytest.fixture(scope="module")
def fast_result(model, phantom):
    """The command's fast path (the stage-1 axial pair reused) on the same volume, prompt and key as ``result``,
    counting the image-encoder calls and the tracker runs."""
    _, pre, mask = phantom
    calls = {"encode": [], "track": []}
    enc0, trk0 = volume.encode_frames, volume._track_blocks

    def enc(model, frames, *a, **kw):
        calls["encode"].append(int(frames.shape[0]))
        return enc0(model, frames, *a, **kw)

    def trk(model, feats, *a, **kw):
        calls["track"].append(int(feats["fpn"][0].shape[0]))
        return trk0(model, feats, *a, **kw)

    volume.encode_frames, volume._track_blocks = enc, trk
    try:
        res = volume.segment_volume_detailed(model, pre, {"slice": Z, "mask": mask},
                                             dataclasses.replace(CFG, reuse_axial=True), key=jax.random.key(1))
    finally:
        volume.encode_frames, volume._track_blocks = enc0, trk0
    return res, calls


@pytest.mark.slow
def test_fast_path_encodes_each_axis_once_and_reuses_the_axial_pair(fast_result, result):
    res, calls = fast_result
    t = CFG.frames
    # One encoder call per axis (both directions of an axis index the same features), n + 2T frames.
    assert calls["encode"] == [N, t, t]
    # Stage 1 (axial forward and backward from the prompt) is tracked once; the combined pass holds only the
    # coronal and sagittal blocks (2T frames: both directions of an axis share the prompted frame).
    assert calls["track"] == [N - Z, Z + 1, 2 * t]
    assert [r["orientations"] for r in res.runs] == [("axial",), ("axial_rev",),
                                                     ("coronal", "sagittal", "coronal_rev", "sagittal_rev")]
    # The axial orientations are the stage-1 runs, which are the old path's stage 1 bit for bit (same key).
    for i, o in enumerate(("axial", "axial_rev")):
        assert np.array_equal(res.runs[i]["probs"], result.runs[i]["probs"])
        run = res.runs[i]
        own = (N - 1 - run["frames"]) if o.endswith("_rev") else run["frames"]
        assert np.array_equal(res.orientations[o].frame_probs[own], run["probs"])
    # Same derived prompts as the old path (they come from the same stage 1).
    for o in ("coronal", "sagittal"):
        assert res.orientations[o].prompt_frame == result.orientations[o].prompt_frame
        assert np.array_equal(res.orientations[o].prompt_mask, result.orientations[o].prompt_mask)
    assert res.count.min() >= 3 and res.probs.shape == result.probs.shape
