"""The assembled model end to end against perturbed random-init PyTorch SAM 2 (the ``sam2`` package).

For each (model, image size): the PyTorch model is built as SAM 2's predictors build it
(``torch_models.build_torch_model``: eval, ``apply_postprocessing=True`` so the decoder's dynamic multimask choice
is on in both frameworks), every parameter is perturbed (zero / one / 1e-6 initialisations hide bugs), the
object-score head's bias is raised by 2 so that the object is present (otherwise the pointer is the constant
``no_obj_ptr`` and the pointer MLP would go untested), and the state dict is converted with
``torch_checkpoint.convert_state_dict``. Then:

* ``parity.image_path_rows``: every Hiera stage, FPN level and position encoding, ``forward_image``, the
  prompt embeddings of two clicks, the three mask logits, IoU, object score and object pointer. Every
  row must pass.
* (tiny at 256) ``predict_masks`` against ``SAM2ImagePredictor._predict``'s prompt-encoder and mask-decoder
  calls, via ``parity.predict_rows``: box, box + click, mask input + click, mask input alone, one mask
  (dynamic multimask), the object-absent path, and static padding with several slot counts.

Tolerances are those of ``medsam2_jax.interop.parity`` (float32, "highest" matmul precision on both sides), each
justified there: embeddings ``1e-4 * max(1, max|ref|)`` (summation-order error grows with depth and scale;
measured <= 1e-5), logits ``1e-3 * max(1, max|ref|)`` (a 32-channel dot product of upscaled features;
measured ~1e-6), scores 1e-4 absolute, position encodings 1e-5 absolute (measured 2.4e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medsam2_jax.interop import parity, torch_checkpoint, torch_models  # noqa: E402
from medsam2_jax.interop.torch_models import perturb_  # noqa: E402
from medsam2_jax.model.sam2 import normalize_images  # noqa: E402

pytestmark = pytest.mark.torch

OBJECT_BIAS = 2.0


def _build(name: str, size: int, seed: int = 0):
    tm = torch_models.build_torch_model(name, size)
    perturb_(tm, seed)
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias += OBJECT_BIAS
    sd = {k: v.detach().float().numpy() for k, v in tm.state_dict().items()}
    return tm, torch_checkpoint.convert_state_dict(sd, name, size, source=f"perturbed {name}")


def _images(size: int, batch: int, seed: int) -> np.ndarray:
    """``batch - 1`` random normalised noise images, then the generated smooth image (a disk on a gradient)."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(normalize_images(parity.smooth_image(size)), np.float32)
    noise = [rng.standard_normal((size, size, 3)).astype(np.float32) for _ in range(batch - 1)]
    return np.stack(noise + [smooth])


def _clicks(size: int, batch: int):
    pts = np.array([[0.4, 0.45], [0.8, 0.2]], np.float32) * size  # on the disk, then off it
    return np.tile(pts, (batch, 1, 1)), np.tile(np.array([[1, 0]], np.int32), (batch, 1))


def _assert_rows(rows):
    assert rows, "no comparison was made"
    bad = [r for r in rows if not r.ok]
    assert not bad, "rows over tolerance:\n" + parity.format_rows(bad) + "\n\nall rows:\n" + parity.format_rows(rows)


# (model, image size, batch)
CASES = [
    pytest.param(("sam2.1_hiera_t", 256, 2), id="tiny-256"),
    pytest.param(("sam2.1_hiera_t", 512, 1), id="tiny-512"),
    pytest.param(("sam2.1_hiera_b+", 256, 1), id="base_plus-256"),
    pytest.param(("sam2_hiera_t", 256, 1), id="sam2.0-tiny-256"),
    pytest.param(("sam2.1_hiera_t", 1024, 1), id="tiny-1024", marks=pytest.mark.slow),
    pytest.param(("sam2.1_hiera_l", 256, 1), id="large-256", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    name, size, batch = request.param
    tm, model = _build(name, size)
    yield name, size, batch, tm, model
    del tm, model


def test_image_path_end_to_end(case):
    name, size, batch, tm, model = case
    assert model.model_name == name and model.image_size == size
    images = _images(size, batch, seed=size)
    points, labels = _clicks(size, batch)
    rows = parity.image_path_rows(tm, model, images, points, labels)
    print(f"\n{name} at {size}, batch {batch}\n" + parity.format_rows(rows))
    _assert_rows(rows)
    # Every module kind was compared (a silently skipped stage would shrink this list).
    names = " ".join(r.name for r in rows)
    for part in ("trunk stage 3", "neck level 3", "pos_enc 3", "backbone_fpn 2", "sparse", "dense",
                 "mask logits", "iou", "object score", "obj_ptr"):
        assert part in names
    # The raised bias makes the object present, so the pointer went through obj_ptr_proj, not no_obj_ptr.
    obj = next(r for r in rows if r.name == "sam_mask_decoder object score logits")
    assert obj.ref_max > 0


# ------------------------------------------------------------------------------------------------ prompts
S = 256


@pytest.fixture(scope="module")
def tiny():
    """tiny at 256 with the features of two images computed once in each framework."""
    tm, model = _build("sam2.1_hiera_t", S, seed=1)
    images = _images(S, 2, seed=3)
    return tm, model, parity.torch_image_features(tm, images), parity.jax_encode(model, images)


BOXES = np.array([[0.22, 0.27, 0.58, 0.63], [0.1, 0.5, 0.45, 0.9]], np.float32) * S
CLICK = np.array([[[0.4, 0.45]], [[0.3, 0.7]]], np.float32) * S
CLICK_LABEL = np.array([[1], [1]], np.int32)


def _object_present(tm, tfeats, **prompt):
    return parity.torch_predict(tm, tfeats, **prompt)["object_score_logits"].reshape(-1) > 0


def test_predict_box(tiny):
    tm, model, tfeats, feats = tiny
    rows = parity.predict_rows(tm, model, tfeats, feats, "box", boxes=BOXES)
    _assert_rows(rows)
    assert _object_present(tm, tfeats, boxes=BOXES).all()


def test_predict_box_and_click(tiny):
    tm, model, tfeats, feats = tiny
    _assert_rows(parity.predict_rows(tm, model, tfeats, feats, "box + click", boxes=BOXES, points=CLICK,
                                     labels=CLICK_LABEL, extra_padding=3))


def test_predict_mask_input(tiny):
    """A previous prediction's best low-res logits fed back with a new click (SAM's refinement loop)."""
    tm, model, tfeats, feats = tiny
    first = parity.torch_predict(tm, tfeats, points=CLICK, labels=CLICK_LABEL)
    best = first["masks"][np.arange(2), np.argmax(first["iou"], axis=1)]  # (B, S/4, S/4)
    assert best.shape == (2, S // 4, S // 4)
    neg = np.array([[[0.7, 0.2]], [[0.9, 0.9]]], np.float32) * S
    rows = parity.predict_rows(tm, model, tfeats, feats, "mask input + click", points=neg,
                               labels=np.zeros((2, 1), np.int32), mask_inputs=best, extra_padding=2)
    _assert_rows(rows)
    # The mask input matters: without it the logits differ (so the row above could fail).
    without = parity.torch_predict(tm, tfeats, points=neg, labels=np.zeros((2, 1), np.int32))
    assert np.abs(without["masks"] - parity.torch_predict(
        tm, tfeats, points=neg, labels=np.zeros((2, 1), np.int32), mask_inputs=best)["masks"]).max() > 1e-2


def test_predict_mask_input_alone(tiny):
    """No click, no box: ``predict_masks`` follows ``SAM2Base._forward_sam_heads`` (one dummy point, label
    -1, plus the encoder's pad; ``parity.torch_predict`` does the same)."""
    tm, model, tfeats, feats = tiny
    mask = np.where(np.hypot(*np.mgrid[:S // 4, :S // 4] - S // 8) < S // 16, 8.0, -8.0).astype(np.float32)
    _assert_rows(parity.predict_rows(tm, model, tfeats, feats, "mask input alone",
                                     mask_inputs=np.stack([mask, -mask]), extra_padding=0))
    _assert_rows(parity.predict_rows(tm, model, tfeats, feats, "mask input alone, padded",
                                     mask_inputs=np.stack([mask, -mask]), extra_padding=4))


@pytest.mark.parametrize("prompt", ["click", "box"])
def test_predict_single_mask_dynamic(tiny, prompt):
    """``multimask=False``: SAM 2's decoder returns token 0's mask, or the best multimask output when token
    0's mask is unstable (dynamic multimask via stability, on in SAM 2's predictors)."""
    tm, model, tfeats, feats = tiny
    kw = {"points": CLICK, "labels": CLICK_LABEL} if prompt == "click" else {"boxes": BOXES}
    _assert_rows(parity.predict_rows(tm, model, tfeats, feats, f"{prompt}, one mask", multimask=False,
                                     extra_padding=1, **kw))
    # Exercise the fallback: on this random model at least one example's token-0 mask is unstable, so the
    # single mask PyTorch returns is not token 0's.
    one = parity.torch_predict(tm, tfeats, multimask=False, **kw)["masks"][:, 0]
    with torch.no_grad():
        dec = tm.sam_mask_decoder
        dec.dynamic_multimask_via_stability = False
        try:
            token0 = parity.torch_predict(tm, tfeats, multimask=False, **kw)["masks"][:, 0]
        finally:
            dec.dynamic_multimask_via_stability = True
    assert (np.abs(one - token0).reshape(2, -1).max(axis=1) > 0).any()


def test_predict_object_absent(tiny):
    """Object score <= 0 (bias lowered in both models): the pointer is ``no_obj_ptr`` in both frameworks."""
    tm, model, tfeats, feats = tiny
    t_bias = tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    j_bias = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    t_keep, j_keep = t_bias.detach().clone(), j_bias.get_value()
    try:
        with torch.no_grad():
            t_bias -= 2 * OBJECT_BIAS
        j_bias.set_value(j_keep - 2 * OBJECT_BIAS)
        assert not _object_present(tm, tfeats, boxes=BOXES).any()
        rows = parity.predict_rows(tm, model, tfeats, feats, "box, object absent", boxes=BOXES)
        _assert_rows(rows)
        out = parity.jax_predict(model, feats, boxes=BOXES)
        np.testing.assert_array_equal(np.asarray(out["obj_ptr"]),
                                      np.broadcast_to(np.asarray(model.no_obj_ptr.get_value()), (2, 256)))
    finally:
        with torch.no_grad():
            t_bias.copy_(t_keep)
        j_bias.set_value(j_keep)


def test_static_padding_counts(tiny):
    """Clicks padded to several static slot counts (label -1) give PyTorch's result every time: the extra
    slots are masked out of attention, while PyTorch's own single padding point takes part."""
    tm, model, tfeats, feats = tiny
    points = np.array([[[0.4, 0.45], [0.2, 0.2]], [[0.3, 0.7], [0.6, 0.3]]], np.float32) * S
    labels = np.array([[1, 0], [1, 1]], np.int32)
    outs = []
    for extra in (0, 1, 3, 6):
        _assert_rows(parity.predict_rows(tm, model, tfeats, feats, f"clicks + {extra} pad", points=points,
                                         labels=labels, extra_padding=extra))
        pts, lab = parity.pad_points(points, labels, 2, extra)
        outs.append(parity.jax_predict(model, feats, points=pts, labels=lab))
    for o in outs[1:]:
        for k in ("masks", "iou", "object_score_logits", "obj_ptr"):
            # Only the length of the masked key axis differs between the programs: float32 summation order
            # at most (measured 0 to ~1e-6); a padding slot that leaked into attention changes logits by O(0.1).
            np.testing.assert_allclose(np.asarray(o[k]), np.asarray(outs[0][k]), rtol=0, atol=1e-5, err_msg=k)
    # A padding slot that is NOT masked (label 0 instead of -1) changes the result: the check can fail.
    pts, lab = parity.pad_points(points, labels, 2, 1)
    lab[:, -1] = 0
    leaked = parity.jax_predict(model, feats, points=pts, labels=lab)
    assert np.abs(np.asarray(leaked["masks"]) - np.asarray(outs[0]["masks"])).max() > 1e-3
