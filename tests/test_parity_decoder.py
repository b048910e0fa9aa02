"""Prompt encoder, two-way transformer and mask decoder against PyTorch SAM 2.1 (perturbed random init).

Reference: ``medsam2_jax.interop.torch_models.perturbed_torch_model("sam2.1_hiera_t", 256)`` (image embedding
16x16, low-res masks 64x64). Inputs (image embeddings, high-resolution features) are random N(0, 1) maps, so
every weight of the decoder matters. float32, matmul precision "highest" (conftest).

Tolerances, by kind of output (measured maxima in brackets, `pytest tests/test_parity_decoder.py`):
* prompt embeddings, dense PE, 1x1 convs: sin/cos of float32 arguments up to ~30 in magnitude
  (2*pi * coords @ G) carry ~1 ulp(30) = 2e-6 of argument error; a 256-term conv dot product a few ulps
  -> 1e-5 [2.4e-7; conv_s1 1.4e-6].
* transformer outputs and SAM output tokens (|x| <= ~5 after LayerNorm): two blocks of 256/2048-wide
  matmuls, softmax and five LayerNorms, a few float32 ulps relative each -> 2e-5 [1.9e-6].
* mask logits (|x| <= ~4): a 32-term dot product of the hypernetwork outputs (3 MLP layers on a token)
  with the upscaled features (two transposed convs, LayerNorm, GELU, skip features), both sides carrying
  the token error -> 1e-4 [2.4e-6].
* IoU (after a sigmoid, slope <= 1/4) and object-score logits (3-layer MLP on a token, |x| < 1)
  -> 1e-5 [2e-7].
The stability-based selection is a discontinuity: its decisions are compared exactly on given logits.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch  # noqa: E402  (a hard requirement: parity must never be skipped silently)

from medsam2_jax.interop.torch_models import (nchw_to_nhwc, perturb_, perturbed_torch_model,  # noqa: E402
                                             state_dict_numpy, to_numpy)
from medsam2_jax.interop.weights import export_state_dict, load_state_dict  # noqa: E402
from medsam2_jax.model.mask_decoder import MaskDecoder  # noqa: E402
from medsam2_jax.model.prompt_encoder import PromptEncoder, check_prompts  # noqa: E402
from medsam2_jax.model.transformer import Attention, TwoWayTransformer  # noqa: E402

S = 256  # image size
E = S // 16  # image-embedding size
C = 256

TOL_EMBED = 1e-5
TOL_TOKENS = 2e-5
TOL_LOGITS = 1e-4
TOL_SCORES = 1e-5


def assert_close(ours, ref, atol, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != torch {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g} (torch max |x| {np.abs(ref).max():.3g})"


# ------------------------------------------------------------------------------------------------------
# Fixtures: one torch model, one Flax prompt encoder and decoder for the module.


@pytest.fixture(scope="module")
def tmodel():
    return perturbed_torch_model("sam2.1_hiera_t", S)


@pytest.fixture(scope="module")
def sd(tmodel):
    return state_dict_numpy(tmodel)


def make_prompt_encoder(sd):
    pe = PromptEncoder(C, (E, E), (S, S), 16, rngs=nnx.Rngs(0))
    load_state_dict(pe, sd, prefix="sam_prompt_encoder.")
    return pe


def make_decoder(sd, **kw):
    # transformer=None: the default is SAM 2's TwoWayTransformer (the strict load checks its keys and shapes).
    dec = MaskDecoder(
        transformer_dim=C, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
        use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True, rngs=nnx.Rngs(0), **kw,
    )
    load_state_dict(dec, sd, prefix="sam_mask_decoder.")
    return dec


@pytest.fixture(scope="module")
def pe(sd):
    return make_prompt_encoder(sd)


@pytest.fixture(scope="module")
def dec(sd):
    return make_decoder(sd)


def features(b, seed):
    """Random image embedding and high-res features (NHWC numpy), as after conv_s0 / conv_s1."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((b, E, E, C), np.float32)
    s0 = rng.standard_normal((b, 4 * E, 4 * E, C // 8), np.float32)
    s1 = rng.standard_normal((b, 2 * E, 2 * E, C // 4), np.float32)
    return img, s0, s1


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


TRACES = {"n": 0}


def _predict(pe, dec, coords, labels, boxes, box_valid, masks, mask_valid, img, s0, s1, multimask):
    TRACES["n"] += 1  # runs only while tracing
    points = None if coords is None else (coords, labels)
    sparse, sparse_mask, dense = pe(points, boxes, masks, box_valid=box_valid, mask_valid=mask_valid)
    return dec(img, pe.get_dense_pe(), sparse, sparse_mask, dense, multimask, False, [s0, s1])


predict_jit = nnx.jit(_predict, static_argnames=("multimask",))


def predict(pe, dec, img, s0, s1, *, coords=None, labels=None, boxes=None, box_valid=None, masks=None,
            mask_valid=None, multimask=True):
    arr = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    out = predict_jit(pe, dec, arr(coords), arr(labels), arr(boxes), arr(box_valid), arr(masks), arr(mask_valid),
                      jnp.asarray(img), jnp.asarray(s0), jnp.asarray(s1), multimask=multimask)
    return [np.asarray(o) for o in out]


def torch_predict(tmodel, img, s0, s1, *, coords=None, labels=None, boxes=None, masks=None, multimask=True):
    with torch.no_grad():
        points = None if coords is None else (torch.from_numpy(coords), torch.from_numpy(labels))
        sparse, dense = tmodel.sam_prompt_encoder(
            points, None if boxes is None else torch.from_numpy(boxes), None if masks is None else nchw(masks)
        )
        out = tmodel.sam_mask_decoder(
            image_embeddings=nchw(img), image_pe=tmodel.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=False, high_res_features=[nchw(s0), nchw(s1)],
        )
    return [to_numpy(o) for o in out]


def assert_decoder_close(ours, ref, what):
    for o, r, name, tol in zip(ours, ref, ("masks", "iou", "sam_tokens", "object_score"),
                               (TOL_LOGITS, TOL_SCORES, TOL_TOKENS, TOL_SCORES)):
        assert_close(o, r, tol, f"{what} {name}")


# ------------------------------------------------------------------------------------------------------
# Prompt encoder


def test_points_with_torch_pad(pe, tmodel):
    rng = np.random.default_rng(1)
    coords = (rng.random((2, 3, 2)) * S).astype(np.float32)
    labels = np.array([[1, 0, 2], [3, 1, 1]], np.int32)
    with torch.no_grad():
        ref, ref_dense = tmodel.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    sparse, mask, dense = pe((jnp.asarray(coords), jnp.asarray(labels)), None, None)
    # Layout [3 points, torch's pad]: identical to torch's sequence, all attended.
    assert_close(sparse, to_numpy(ref), TOL_EMBED, "point embeddings")
    assert np.asarray(mask).all() and mask.shape == (2, 4)
    assert_close(dense, nchw_to_nhwc(ref_dense), 0.0, "no-mask dense embedding (a broadcast copy)")


def test_box_prompt(pe, tmodel):
    rng = np.random.default_rng(2)
    coords = (rng.random((2, 2, 2)) * S).astype(np.float32)
    labels = np.array([[1, -1], [0, 1]], np.int32)  # row 0 has a caller pad
    boxes = np.array([[10.0, 20.0, 200.0, 180.0], [0.0, 0.0, 256.0, 256.0]], np.float32)
    with torch.no_grad():
        ref_box_only, _ = tmodel.sam_prompt_encoder(None, torch.from_numpy(boxes), None)
        ref_both, _ = tmodel.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)),
                                                torch.from_numpy(boxes), None)
    sparse, mask, _ = pe(None, jnp.asarray(boxes), None)
    assert_close(sparse, to_numpy(ref_box_only), TOL_EMBED, "box corner embeddings")
    assert np.asarray(mask).all()

    # Points + box: [2 slots, appended pad, 2 corners]; torch has no pad when a box is given.
    sparse, mask, _ = pe((jnp.asarray(coords), jnp.asarray(labels)), jnp.asarray(boxes), None)
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 0, 1, 1], [1, 1, 0, 1, 1]])
    keep = [0, 1, 3, 4]
    assert_close(np.asarray(sparse)[1, keep], to_numpy(ref_both)[1], TOL_EMBED, "points + box embeddings")
    assert_close(np.asarray(sparse)[0, [0, 3, 4]], to_numpy(ref_both)[0, [0, 2, 3]], TOL_EMBED, "points + box")


def test_mask_prompt_and_mask_valid(pe, tmodel):
    rng = np.random.default_rng(3)
    masks = (4 * rng.standard_normal((2, 4 * E, 4 * E, 1))).astype(np.float32)
    with torch.no_grad():
        _, ref = tmodel.sam_prompt_encoder(None, None, nchw(masks))
        _, ref_none = tmodel.sam_prompt_encoder(None, None, None)
    _, mask, dense = pe(None, None, jnp.asarray(masks))
    assert mask.shape == (2, 0)
    # Two 2x2 convs with LayerNorm2d + GELU and a 1x1 conv on O(4) logits: embedding-level tolerance.
    assert_close(dense, nchw_to_nhwc(ref), TOL_EMBED, "mask prompt dense embedding")
    # Per-example flag: row 1 has no mask -> no_mask_embed, as torch's masks=None.
    _, _, dense = pe(None, None, jnp.asarray(masks), mask_valid=jnp.array([True, False]))
    assert_close(np.asarray(dense)[0], nchw_to_nhwc(ref)[0], TOL_EMBED, "mask_valid row 0")
    assert_close(np.asarray(dense)[1], nchw_to_nhwc(ref_none)[0], 0.0, "mask_valid row 1")


def test_dense_pe(pe, tmodel):
    with torch.no_grad():
        ref = tmodel.sam_prompt_encoder.get_dense_pe()
    assert_close(pe.get_dense_pe(), nchw_to_nhwc(ref)[0], TOL_EMBED, "dense PE")


def test_sparse_mask_rule(pe):
    coords = jnp.zeros((4, 3, 2))
    labels = jnp.array([[1, -1, -1], [-1, 0, 1], [-1, -1, -1], [-1, -1, -1]], jnp.int32)
    _, mask, _ = pe((coords, labels), None, None)
    # real slots + the appended pad; an all-pad row is SAM 2's dummy-point call: slot 0 + the pad.
    np.testing.assert_array_equal(
        np.asarray(mask), [[1, 0, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1]]
    )
    boxes = jnp.full((4, 4), 8.0)
    _, mask, _ = pe((coords, labels), boxes, None, box_valid=jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(
        np.asarray(mask),
        [[1, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0]],
    )


# ------------------------------------------------------------------------------------------------------
# Transformer and attention


def test_two_way_transformer(sd, tmodel):
    ours = TwoWayTransformer(2, C, 8, 2048, attention_downsample_rate=2, rngs=nnx.Rngs(0))
    load_state_dict(ours, sd, prefix="sam_mask_decoder.transformer.")
    rng = np.random.default_rng(4)
    img = rng.standard_normal((2, E, E, C), np.float32)
    img_pe = rng.standard_normal((1, E, E, C), np.float32)
    tokens = rng.standard_normal((2, 9, C), np.float32)
    with torch.no_grad():
        rq, rk = tmodel.sam_mask_decoder.transformer(nchw(img), nchw(img_pe), torch.from_numpy(tokens))
    run = nnx.jit(lambda m, *a: m(*a))
    q, k = run(ours, jnp.asarray(img), jnp.asarray(img_pe[0]), jnp.asarray(tokens))
    assert_close(q, to_numpy(rq), TOL_TOKENS, "transformer queries")
    assert_close(k, to_numpy(rk), TOL_TOKENS, "transformer keys")
    # Padding tokens appended and masked: real rows and keys unchanged.
    pad = rng.standard_normal((2, 3, C), np.float32) * 5
    qp, kp = run(ours, jnp.asarray(img), jnp.asarray(img_pe), jnp.asarray(np.concatenate([tokens, pad], 1)),
                 jnp.asarray(np.arange(12)[None].repeat(2, 0) < 9))
    assert_close(np.asarray(qp)[:, :9], to_numpy(rq), TOL_TOKENS, "masked transformer queries")
    assert_close(kp, to_numpy(rk), TOL_TOKENS, "masked transformer keys")


def test_attention_kv_in_dim_and_key_mask():
    from sam2.modeling.sam.transformer import Attention as TorchAttention

    torch.manual_seed(5)
    ref = TorchAttention(256, 1, downsample_rate=1, kv_in_dim=64)
    perturb_(ref, seed=5)
    ours = Attention(256, 1, kv_in_dim=64, rngs=nnx.Rngs(0))
    load_state_dict(ours, state_dict_numpy(ref))
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 7, 256), np.float32)
    kv = rng.standard_normal((2, 11, 64), np.float32)
    with torch.no_grad():
        r = to_numpy(ref(torch.from_numpy(q), torch.from_numpy(kv[:, :8]), torch.from_numpy(kv[:, :8])))
    key_mask = jnp.asarray(np.arange(11)[None].repeat(2, 0) < 8)
    out = ours(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(kv), key_mask=key_mask)
    # One 256-wide head, three projections: token-level tolerance.
    assert_close(out, r, TOL_TOKENS, "attention with kv_in_dim=64 and 3 masked keys")
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, N_keys\) = \(2, 11\)"):
        ours(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(kv), key_mask=key_mask[:, :5])


# ------------------------------------------------------------------------------------------------------
# Mask decoder


def test_decoder_weights_round_trip(dec, sd):
    ours = export_state_dict(dec, prefix="sam_mask_decoder.")
    ref = {k: v for k, v in sd.items() if k.startswith("sam_mask_decoder.")}
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_conv_s0_s1(dec, tmodel):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 8, 8, C), np.float32)
    with torch.no_grad():
        r0 = nchw_to_nhwc(tmodel.sam_mask_decoder.conv_s0(nchw(x)))
        r1 = nchw_to_nhwc(tmodel.sam_mask_decoder.conv_s1(nchw(x)))
    # 1x1 convs: a 256-term dot product per output.
    assert_close(dec.conv_s0(jnp.asarray(x)), r0, TOL_EMBED, "conv_s0")
    assert_close(dec.conv_s1(jnp.asarray(x)), r1, TOL_EMBED, "conv_s1")


@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_points(pe, dec, tmodel, multimask):
    img, s0, s1 = features(2, 7)
    rng = np.random.default_rng(7)
    coords = (rng.random((2, 2, 2)) * S).astype(np.float32)
    labels = np.array([[1, 0], [1, 1]], np.int32)
    ours = predict(pe, dec, img, s0, s1, coords=coords, labels=labels, multimask=multimask)
    ref = torch_predict(tmodel, img, s0, s1, coords=coords, labels=labels, multimask=multimask)
    m = 3 if multimask else 1
    assert ours[0].shape == (2, m, 4 * E, 4 * E) and ours[2].shape == (2, m, C) and ours[3].shape == (2, 1)
    assert_decoder_close(ours, ref, f"points multimask={multimask}")


def test_predict_all(pe, dec, tmodel):
    """All four mask tokens without selection, as torch's predict_masks (what the model selects from as data)."""
    img, s0, s1 = features(2, 15)
    coords = np.array([[[50.0, 60.0]], [[200.0, 10.0]]], np.float32)
    labels = np.array([[1], [0]], np.int32)

    @nnx.jit
    def run(pe, dec, coords, labels, img, s0, s1):
        sparse, sparse_mask, dense = pe((coords, labels), None, None)
        return dec.predict_all(img, pe.get_dense_pe(), sparse, sparse_mask, dense, [s0, s1])

    ours = run(pe, dec, *(jnp.asarray(a) for a in (coords, labels, img, s0, s1)))
    with torch.no_grad():
        sp, de = tmodel.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
        ref = tmodel.sam_mask_decoder.predict_masks(nchw(img), tmodel.sam_prompt_encoder.get_dense_pe(), sp, de,
                                                    False, [nchw(s0), nchw(s1)])
    assert ours[0].shape == (2, 4, 4 * E, 4 * E) and ours[2].shape == (2, 4, C)
    assert_decoder_close(ours, [to_numpy(r) for r in ref], "predict_all")


def test_decoder_box_and_mask_prompt(pe, dec, tmodel):
    img, s0, s1 = features(2, 8)
    rng = np.random.default_rng(8)
    boxes = np.array([[30.0, 40.0, 150.0, 220.0], [5.0, 100.0, 250.0, 130.0]], np.float32)
    masks = (4 * rng.standard_normal((2, 4 * E, 4 * E, 1))).astype(np.float32)
    ours = predict(pe, dec, img, s0, s1, boxes=boxes, masks=masks)
    ref = torch_predict(tmodel, img, s0, s1, boxes=boxes, masks=masks)
    assert_decoder_close(ours, ref, "box + mask prompt")


def test_decoder_repeat_image(pe, dec, tmodel):
    img, s0, s1 = features(1, 9)
    rng = np.random.default_rng(9)
    coords = (rng.random((3, 1, 2)) * S).astype(np.float32)
    labels = np.ones((3, 1), np.int32)

    @nnx.jit
    def run(pe, dec, coords, labels, img, s0, s1):
        sparse, sparse_mask, dense = pe((coords, labels), None, None)
        return dec(img, pe.get_dense_pe(), sparse, sparse_mask, dense, True, True, [s0, s1])

    ours = run(pe, dec, *(jnp.asarray(a) for a in (coords, labels, img, s0, s1)))
    with torch.no_grad():
        sp, de = tmodel.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
        ref = tmodel.sam_mask_decoder(nchw(img), tmodel.sam_prompt_encoder.get_dense_pe(), sp, de, True, True,
                                      [nchw(s0), nchw(s1)])
    assert_decoder_close(ours, [to_numpy(r) for r in ref], "repeat_image")


@pytest.mark.parametrize("pred_obj_scores", [True, False])
def test_decoder_without_high_res_features(pe, pred_obj_scores):
    """The other constructor options: plain upscaling (no skip features), a linear object-score head or none,
    no IoU sigmoid, single-mask token for the pointer."""
    from sam2.modeling.sam.mask_decoder import MaskDecoder as TorchMaskDecoder
    from sam2.modeling.sam.transformer import TwoWayTransformer as TorchTwoWayTransformer

    torch.manual_seed(14)
    kw = dict(use_high_res_features=False, iou_prediction_use_sigmoid=False, pred_obj_scores=pred_obj_scores,
              pred_obj_scores_mlp=False, use_multimask_token_for_obj_ptr=False)
    ref = TorchMaskDecoder(transformer_dim=C, transformer=TorchTwoWayTransformer(2, C, 8, 2048), **kw).eval()
    perturb_(ref, seed=14)
    ours = MaskDecoder(transformer_dim=C, transformer=TwoWayTransformer(2, C, 8, 2048, rngs=nnx.Rngs(0)),
                       rngs=nnx.Rngs(0), **kw)
    load_state_dict(ours, state_dict_numpy(ref))
    rng = np.random.default_rng(14)
    img = rng.standard_normal((2, E, E, C), np.float32)
    dense = rng.standard_normal((2, E, E, C), np.float32)
    img_pe = np.asarray(pe.get_dense_pe())
    sparse = rng.standard_normal((2, 3, C), np.float32)
    with torch.no_grad():
        r = ref(nchw(img), nchw(img_pe[None]), torch.from_numpy(sparse), nchw(dense), True, False)
    run = nnx.jit(lambda m, *a: m(*a, None, jnp.asarray(dense), True, False))
    out = run(ours, jnp.asarray(img), jnp.asarray(img_pe), jnp.asarray(sparse))
    assert_decoder_close(out, [to_numpy(x) for x in r], f"no high-res, pred_obj_scores={pred_obj_scores}")
    assert out[2].shape == (2, 1, C)  # single-mask token even in multimask mode
    if not pred_obj_scores:
        np.testing.assert_array_equal(np.asarray(out[3]), np.full((2, 1), 10.0, np.float32))


def _scatter(rows, slots, rng):
    """Place each row's clicks at random slots of a (B, slots) array padded with label -1 at random coords."""
    b = len(rows)
    coords = (rng.random((b, slots, 2)) * 1000 - 500).astype(np.float32)  # pads: garbage coordinates
    labels = np.full((b, slots), -1, np.int32)
    for i, (c, l) in enumerate(rows):
        idx = np.sort(rng.permutation(slots)[: len(l)])
        coords[i, idx] = c
        labels[i, idx] = l
    return coords, labels


ROW_CLICKS_ONE = [
    (np.array([[40.0, 200.0]], np.float32), np.array([1], np.int32)),
    (np.array([[128.5, 17.25]], np.float32), np.array([0], np.int32)),
]
ROW_CLICKS_MIXED = [
    (np.array([[40.0, 200.0], [90.0, 91.0]], np.float32), np.array([1, 0], np.int32)),
    (np.array([[20.0, 30.0], [160.0, 250.0], [100.0, 100.0]], np.float32), np.array([2, 3, 1], np.int32)),
    (np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)),  # no click: SAM 2's dummy point
]


@pytest.mark.parametrize(
    "rows,slots",
    [(ROW_CLICKS_ONE, 1), (ROW_CLICKS_ONE, 2), (ROW_CLICKS_ONE, 5), (ROW_CLICKS_ONE, 9),
     (ROW_CLICKS_MIXED, 3), (ROW_CLICKS_MIXED, 5), (ROW_CLICKS_MIXED, 9)],
    ids=["one-1", "one-2", "one-5", "one-9", "mixed-3", "mixed-5", "mixed-9"],
)
def test_padding_invariance(pe, dec, tmodel, rows, slots):
    """Clicks padded to any static slot count equal PyTorch run per example on exactly its clicks (+ its pad)."""
    b = len(rows)
    img, s0, s1 = features(b, 10)
    coords, labels = _scatter(rows, slots, np.random.default_rng(slots))
    ours = predict(pe, dec, img, s0, s1, coords=coords, labels=labels, multimask=True)
    for i, (c, l) in enumerate(rows):
        if len(l) == 0:  # SAM2Base._forward_sam_heads with no points: one (0, 0) point labelled -1
            c, l = np.zeros((1, 2), np.float32), np.full((1,), -1, np.int32)
        ref = torch_predict(tmodel, img[i:i + 1], s0[i:i + 1], s1[i:i + 1], coords=c[None], labels=l[None])
        assert_decoder_close([o[i:i + 1] for o in ours], ref, f"{slots} slots, row {i}")


def test_jit_reuse_across_click_counts(pe, dec, tmodel):
    """One compiled function serves 1..4 clicks in 5 slots, with and without a mask prompt."""
    img, s0, s1 = features(2, 11)
    rng = np.random.default_rng(11)
    masks = (4 * rng.standard_normal((2, 4 * E, 4 * E, 1))).astype(np.float32)
    traces = []
    for n in (1, 2, 4):
        rows = [((rng.random((n, 2)) * S).astype(np.float32), rng.integers(0, 2, n).astype(np.int32))
                for _ in range(2)]
        coords, labels = _scatter(rows, 5, rng)
        mask_valid = np.array([n % 2 == 0, True])
        ours = predict(pe, dec, img, s0, s1, coords=coords, labels=labels, masks=masks, mask_valid=mask_valid)
        for i, (c, l) in enumerate(rows):
            ref = torch_predict(tmodel, img[i:i + 1], s0[i:i + 1], s1[i:i + 1], coords=c[None], labels=l[None],
                                masks=masks[i:i + 1] if mask_valid[i] else None)
            assert_decoder_close([o[i:i + 1] for o in ours], ref, f"jit {n} clicks row {i}")
        traces.append(TRACES["n"])
    assert traces[0] == traces[1] == traces[2], f"retraced for new click counts: trace counter {traces}"


def test_dynamic_multimask_selection_matches_torch(tmodel, dec):
    """The stability fallback on given logits (pure function): decisions and outputs identical to torch."""
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    logits[0, 0] = 10.0  # stable single mask
    logits[1, 0] = -10.0  # empty union -> stability 1
    ious = rng.random((4, 4)).astype(np.float32)
    tdec = tmodel.sam_mask_decoder
    with torch.no_grad():
        rm, ri = tdec._dynamic_multimask_via_stability(torch.from_numpy(logits), torch.from_numpy(ious))
        rs = tdec._get_stability_scores(torch.from_numpy(logits[:, :1]))
    om, oi = dec._dynamic_multimask_via_stability(jnp.asarray(logits), jnp.asarray(ious))
    np.testing.assert_array_equal(np.asarray(dec._get_stability_scores(jnp.asarray(logits[:, :1]))), to_numpy(rs))
    assert 0 < int((to_numpy(rs)[:, 0] >= 0.98).sum()) < 4  # both branches exercised
    np.testing.assert_array_equal(np.asarray(om), to_numpy(rm))
    np.testing.assert_array_equal(np.asarray(oi), to_numpy(ri))


def test_dynamic_multimask_end_to_end(pe, sd, tmodel):
    """Single-mask output with dynamic_multimask_via_stability on both sides, threshold placed so that some
    examples fall back to the best multimask output and some do not."""
    b = 4
    img, s0, s1 = features(b, 13)
    rng = np.random.default_rng(13)
    coords = (rng.random((b, 2, 2)) * S).astype(np.float32)
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], np.int32)
    tdec = tmodel.sam_mask_decoder
    # Stability of the single-mask output per example, from torch's own predict_masks.
    with torch.no_grad():
        sp, de = tmodel.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
        all_masks = tdec.predict_masks(nchw(img), tmodel.sam_prompt_encoder.get_dense_pe(), sp, de, False,
                                       [nchw(s0), nchw(s1)])[0]
        scores = np.sort(to_numpy(tdec._get_stability_scores(all_masks[:, :1]))[:, 0])
    gaps = np.diff(scores)
    j = int(np.argmax(gaps))
    thresh = float((scores[j] + scores[j + 1]) / 2)
    assert gaps[j] > 1e-3, f"stability scores too close to split: {scores}"

    ours_dec = make_decoder(sd, dynamic_multimask_via_stability=True, dynamic_multimask_stability_thresh=thresh)
    saved = (tdec.dynamic_multimask_via_stability, tdec.dynamic_multimask_stability_thresh)
    try:
        tdec.dynamic_multimask_via_stability = True
        tdec.dynamic_multimask_stability_thresh = thresh
        ref = torch_predict(tmodel, img, s0, s1, coords=coords, labels=labels, multimask=False)
    finally:
        tdec.dynamic_multimask_via_stability, tdec.dynamic_multimask_stability_thresh = saved
    ours = predict(pe, ours_dec, img, s0, s1, coords=coords, labels=labels, multimask=False)
    assert_decoder_close(ours, ref, "dynamic multimask")
    # The fallback must have changed something relative to plain token 0, in some rows only.
    plain = predict(pe, make_decoder(sd), img, s0, s1, coords=coords, labels=labels, multimask=False)
    changed = np.abs(ours[1] - plain[1])[:, 0] > 0
    assert 0 < changed.sum() < b, f"expected a mix of stable and fallback rows, got {changed}"
    # Training mode turns the fallback off, as torch's `not self.training`.
    ours_dec.train()
    assert ours_dec.deterministic is False
    trained = predict(pe, ours_dec, img, s0, s1, coords=coords, labels=labels, multimask=False)
    assert_decoder_close(trained, plain, "dynamic multimask in train mode = token 0")


# ------------------------------------------------------------------------------------------------------
# Bad input


def test_check_prompts_errors():
    pts = np.array([[[10.0, 20.0], [-5.0, 3.0]]], np.float32)
    check_prompts(pts, np.array([[1, -1]]), None, S)  # the pad's coordinates are ignored
    with pytest.raises(ValueError, match=r"points must lie inside the image: x in \[0, 256\]"):
        check_prompts(pts, np.array([[1, 0]]), None, S)
    with pytest.raises(ValueError, match=r"y in \[0, 100\]"):
        check_prompts(np.array([[[10.0, 120.0]]]), np.array([[1]]), None, (100, 300))
    with pytest.raises(ValueError, match=r"labels must be in \(-1, 0, 1, 2, 3\), got \[4\]"):
        check_prompts(pts, np.array([[1, 4]]), None, S)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, N\) = \(1, 2\)"):
        check_prompts(pts, np.array([1, 1]), None, S)
    with pytest.raises(ValueError, match=r"points must have shape \(B, N, 2\)"):
        check_prompts(pts[0], np.array([[1, 1]]), None, S)
    with pytest.raises(ValueError, match="labels must be integers"):
        check_prompts(pts, np.array([[1.0, 1.0]]), None, S)
    with pytest.raises(ValueError, match="boxes must lie inside the image"):
        check_prompts(None, None, np.array([[0.0, 0.0, 257.0, 10.0]]), S)
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\)"):
        check_prompts(None, None, np.array([0.0, 0.0, 10.0, 10.0]), S)
    with pytest.raises(ValueError, match="points contains NaN"):
        check_prompts(np.array([[[np.nan, 1.0]]]), np.array([[1]]), None, S)


def test_call_shape_errors(pe, dec):
    coords, labels = jnp.zeros((2, 3, 2)), jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=re.escape("masks must have shape (B, H/4, W/4, 1) = (2, 64, 64, 1)")):
        pe((coords, labels), None, jnp.zeros((2, 1, 64, 64)))
    with pytest.raises(ValueError, match=re.escape("points labels must have shape (B, N) = (2, 3)")):
        pe((coords, labels[:, :2]), None, None)
    with pytest.raises(ValueError, match="boxes must have shape"):
        pe((coords, labels), jnp.zeros((2, 2, 2)), None)
    sparse, sparse_mask, dense = pe((coords, labels), None, None)
    img, s0, s1 = (jnp.asarray(a) for a in features(2, 0))
    with pytest.raises(ValueError, match=re.escape("high_res_features feat_s1 must be (B, 32, 32, 64) NHWC")):
        dec(img, pe.get_dense_pe(), sparse, sparse_mask, dense, True, False, [s0, s0])
    with pytest.raises(ValueError, match="high_res_features must be"):
        dec(img, pe.get_dense_pe(), sparse, sparse_mask, dense, True, False, None)
    with pytest.raises(ValueError, match="image_embeddings must have batch 1"):
        dec(img, pe.get_dense_pe(), sparse, sparse_mask, dense, True, True, [s0, s1])
    with pytest.raises(ValueError, match=re.escape("sparse_mask must be (B, N) = (2, 4)")):
        dec(img, pe.get_dense_pe(), sparse, sparse_mask[:, :3], dense, True, False, [s0, s1])
