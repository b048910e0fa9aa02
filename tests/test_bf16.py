"""bfloat16 compute for the whole model (``tracking.cast_model(model, jnp.bfloat16, tracking.WHOLE_MODEL)``,
``compute_dtype="bfloat16"`` in training) against float32, and the attention implementations.

Tolerances come from bfloat16's 8-bit significand: one rounding to bf16 has a relative error of at most
u = 2^-9 ~ 2e-3 (round to nearest). A matmul's bf16 output is one rounding of a float32 accumulation, and its
bf16 inputs carry the roundings of everything before them; through a network the relative error of an
activation grows roughly like u times the square root of the number of roundings it depends on (random signs),
times the layers' gains. The bounds below are set from that scale (stated per quantity, in units of u where it
helps) with room over the values measured on CPU (printed with ``-s``; the report lists them):

* encoder features (relative RMS error per FPN level): ~20 sequential roundings through the 12 Hiera blocks
  and the neck -> order sqrt(20) u ~ 1e-2; bound 16 u = 3.1e-2.
* mask logits: float32 outputs of the decoder computed from bf16 activations; their error is the features'
  relative error times the logits' scale. Bounded relative to the clip's largest |logit|: 4e-2.
* binarised masks: only pixels whose logit lies within the logit error of 0 can flip, a thin band along the
  mask's edges -> IoU >= 0.95 on every frame of the clip (measured ~0.99).
* object scores: |bf16 - f32| <= 4e-2 * max(|score|, 1), and every sign agrees (the scores here are ~2, far
  from 0 relative to that error).

Measured on CPU (2026-12-04): features 6.3e-3 / 8.0e-3 / 1.05e-2 relative RMS (3.2 / 4.1 / 5.4 u) for FPN
levels 0 / 1 / 2; mask logits 1.2e-2 of max|logit|; binarised IoU >= 0.9897 per frame; object scores 1.2e-3;
IoU predictions 3.3e-4; bf16 share of matmul/conv FLOPs 0.9996 (encode), 0.9957 (propagate). One compiled
train step (once, by hand: XLA:CPU needs about ten minutes to compile it in bf16, so the test only traces it):
loss 3.1e-5 and gradient norm 1.3e-3 relative to float32.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medsam2_jax import api, tracking
from medsam2_jax.model import common
from medsam2_jax.model.memory_attention import RoPEAttention
from medsam2_jax.model.sam2 import normalize_images
from medsam2_jax.train.step import init_state, make_train_step, tracker_config, train_mode

S, T = 256, 4
U = 2.0 ** -9  # bfloat16's unit roundoff (round to nearest)
TOL_FEATURES = 16 * U
TOL_LOGITS = 4e-2
MIN_MASK_IOU = 0.95
TOL_SCORE = 4e-2
REPORT: dict[str, float] = {}


def _clip() -> np.ndarray:
    """(T, S, S, 3) normalised: a shaded background and a bright disc moving right and down, with noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S].astype(np.float32) + 0.5
    out = []
    for t in range(T):
        img = 0.25 + 0.3 * (yy / S)[..., None] * np.array([1.0, 0.8, 0.6], np.float32)
        d = np.sqrt((xx - 80.0 - 9.0 * t) ** 2 + (yy - 100.0 - 5.0 * t) ** 2)
        disc = np.clip(38.5 - d, 0.0, 1.0)[..., None]
        img = img * (1 - disc) + disc * np.array([0.95, 0.85, 0.7], np.float32)
        out.append(np.clip(img + 0.04 * rng.standard_normal((S, S, 3)), 0.0, 1.0))
    return np.asarray(normalize_images(np.asarray(out, np.float32)), np.float32)


@pytest.fixture(scope="module")
def models():
    """A random tiny model whose object-score bias is raised by 2 (the object is present on every frame, so
    the mask logits are real, not the -1024 fill), and its whole-model bfloat16 copy."""
    m = api.random_model("sam2.1_hiera_t", S, seed=0)
    bias = m.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias.get_value() + 2.0)
    return m, tracking.cast_model(m, jnp.bfloat16, tracking.WHOLE_MODEL)


@pytest.fixture(scope="module")
def clip():
    return _clip()


CFG = tracking.TrackerConfig(bank=tracking.bank_lib.BankConfig.sam2_fifo(), encode_batch=T)


def _prompts():
    return tracking.make_prompts([[{"frame": 0, "points": [[80.0, 100.0], [200.0, 40.0]], "labels": [1, 0]}]],
                                 num_frames=T, image_size=S, config=CFG)


@pytest.fixture(scope="module")
def tracked(models, clip):
    m32, m16 = models
    o32 = tracking.track(m32, jnp.asarray(clip), _prompts(), direction="forward", config=CFG)
    o16 = tracking.track(m16, jnp.asarray(clip, jnp.bfloat16), _prompts(), direction="forward", config=CFG)
    return o32, o16


def _kind(path) -> str:
    return type(path[-1]).__name__


def test_cast_whole_model_keeps_buffers_and_the_source_float32(models):
    m32, m16 = models
    p16 = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert p16 and all(a.dtype == jnp.bfloat16 for a in p16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(m32, nnx.Param)))
    # constants (the prompt encoder's random-Fourier matrix) stay float32
    buf = m16.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix[...]
    assert buf.dtype == jnp.float32
    assert tracking.compute_model(m32, "float32") is m32
    enc_only = tracking.compute_model(m32, "bfloat16", "image_encoder")
    assert enc_only.image_encoder.trunk.patch_embed.proj.kernel[...].dtype == jnp.bfloat16
    assert enc_only.memory_attention.norm.scale[...].dtype == jnp.float32


def _dot_flops(fn, *args) -> Counter:
    """FLOPs of the dot_generals and convolutions in ``fn``'s jaxpr by operand dtypes (scan bodies once)."""
    flops: Counter = Counter()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                lhs, rhs = (v.aval for v in e.invars[:2])
                out = e.outvars[0].aval
                if e.primitive.name == "dot_general":
                    (lc, _), _ = e.params["dimension_numbers"]
                    k = int(np.prod([lhs.shape[i] for i in lc]))
                else:  # HWIO kernel: every output element reads kh * kw * (in / groups) inputs
                    k = int(np.prod(rhs.shape)) // rhs.shape[-1]
                flops[(str(lhs.dtype), str(rhs.dtype))] += 2 * int(np.prod(out.shape)) * k
            for v in e.params.values():
                for w in v if isinstance(v, (tuple, list)) else [v]:
                    inner = getattr(w, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return flops


@pytest.mark.slow
def test_matmuls_and_convolutions_run_in_bf16(models, clip):
    """At least 99 % of the matmul/convolution FLOPs of encoding and of a tracking pass have bf16 operands
    (what stays float32: position encodings, resizes of the float32 mask logits, the bank's dissimilarity)."""
    _, m16 = models
    graphdef, state = nnx.split(m16)
    x = jnp.asarray(clip, jnp.bfloat16)
    feats = tracking.encode_frames(m16, x, batch=T)
    enc = _dot_flops(lambda st, x: nnx.merge(graphdef, st).encode_image(x), state, x)
    prop = _dot_flops(lambda st, f: tracking.propagate(nnx.merge(graphdef, st), f, _prompts(), jax.random.key(0),
                                                       CFG, "forward"), state, feats)
    for name, fl in (("encode", enc), ("propagate", prop)):
        share = fl[("bfloat16", "bfloat16")] / sum(fl.values())
        REPORT[f"bf16 FLOP share, {name}"] = share
        print(f"{name}: bf16 share of dot/conv FLOPs {share:.5f}; {dict(fl)}")
        assert share >= 0.99, (name, dict(fl))


@pytest.mark.slow
def test_encoder_features_agree(models, clip):
    m32, m16 = models
    f32 = tracking.encode_frames(m32, jnp.asarray(clip), batch=T)
    f16 = tracking.encode_frames(m16, jnp.asarray(clip, jnp.bfloat16), batch=T)
    for i, (a, b) in enumerate(zip(f32["fpn"], f16["fpn"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = float(np.sqrt(np.mean((a - b) ** 2) / np.mean(a ** 2)))
        REPORT[f"features level {i} rel RMS"] = rel
        print(f"fpn level {i}: relative RMS error {rel:.2e} ({rel / U:.1f} u)")
        assert 0 < rel < TOL_FEATURES, (i, rel)


@pytest.mark.slow
def test_tracked_clip_agrees(tracked):
    o32, o16 = tracked
    assert all(o16[k].dtype == jnp.float32 for k in ("mask_logits", "iou", "object_score_logits"))
    a, b = np.asarray(o32["mask_logits"]), np.asarray(o16["mask_logits"])
    assert np.isfinite(b).all() and np.asarray(o16["visited"]).all()
    pos = a > 0
    assert 0.05 < pos.mean() < 0.95, "the masks are trivial: the test would prove nothing"
    err = float(np.abs(a - b).max() / np.abs(a).max())
    iou = ((a > 0) & (b > 0)).sum((2, 3)) / np.maximum(((a > 0) | (b > 0)).sum((2, 3)), 1)
    s32, s16 = np.asarray(o32["object_score_logits"]), np.asarray(o16["object_score_logits"])
    serr = float(np.max(np.abs(s32 - s16) / np.maximum(np.abs(s32), 1.0)))
    ierr = float(np.abs(np.asarray(o32["iou"]) - np.asarray(o16["iou"])).max())
    REPORT.update({"mask logits max err / max|logit|": err, "min mask IoU": float(iou.min()),
                   "object score rel err": serr, "predicted IoU abs err": ierr})
    print(f"mask logits: max err {err:.2e} of max|logit|; binarised IoU per frame {np.round(iou, 4).tolist()}; "
          f"object scores rel err {serr:.2e}; predicted IoU abs err {ierr:.2e}; foreground {pos.mean():.2f}")
    assert err < TOL_LOGITS
    assert iou.min() >= MIN_MASK_IOU
    assert np.array_equal(s32 > 0, s16 > 0)
    assert serr < TOL_SCORE
    assert ierr < TOL_LOGITS  # IoU predictions are sigmoids in [0, 1]: absolute error of the same order


# ------------------------------------------------------------------------------------------ training
TS, TT, TB = 64, 2, 2


def _train_batch():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:TS, :TS]
    masks = np.zeros((TB, TT, TS, TS), bool)
    pc = np.zeros((TB, TT, 4, 2), np.float32)
    pl = -np.ones((TB, TT, 4), np.int32)
    for b in range(TB):
        cy, cx, r = rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(8, 12)
        for t in range(TT):
            masks[b, t] = (yy - cy - 2 * t) ** 2 + (xx - cx) ** 2 < r * r
        pc[b, 0, 0], pl[b, 0, 0] = [cx, cy], 1
    images = rng.normal(size=(TB, TT, TS, TS, 3)).astype(np.float32) + masks[..., None] * 2.0
    return dict(images=images, masks=masks, frame_valid=np.ones((TB, TT), bool), point_coords=pc,
                point_labels=pl, mask_inputs=np.zeros((TB, TT, TS, TS), np.float32),
                mask_valid=np.zeros((TB, TT), bool), prompted=np.eye(TT, dtype=bool)[0][None].repeat(TB, 0))


def test_bf16_train_step_keeps_float32_params_and_runs_in_bf16():
    """compute_dtype=bfloat16 (whole model), traced but not compiled (XLA:CPU takes about ten minutes to
    compile the bf16 training step, too long for CI; its numbers are those of the tracker and encoder checked
    above, and the device suite runs the step): the new train state's parameters and optimiser state are
    float32, the loss and gradient norm are float32 scalars, and at least 90 % of the step's matmul and
    convolution FLOPs (forward and backward; scan bodies once) have two bf16 operands. The float32 step has
    none. Measured at 64 px: 87.6 % bf16 x bf16, 12.3 % float32 x bf16 (backward products of the float32
    cotangents of the products that return float32 -- attention scores, the mask-logit product -- with bf16
    operands; XLA runs them in float32: a known cost, not an error), 0.05 % float32 x float32. The count
    walks the jaxpr and counts a loop body once: training encodes the B*T = 4 frames at once, so all four
    count (with the former per-image lax.map the encoder counted once, and the share read 91.7 %); the
    encoder's own share is lower (~85 %: its attention-score products), hence the 0.85 bound."""
    model = api.random_model("sam2.1_hiera_t", TS, seed=1)
    train_mode(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-4)
    tcfg = tracker_config(tracking.TrackerConfig(max_cond_frames=1, cond_slots="max",
                                                 bank=tracking.bank_lib.BankConfig(policy="fifo")))
    batch = {k: jnp.asarray(v) for k, v in _train_batch().items()}
    state0 = init_state(params, tx, 0)
    shares = {}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        step = make_train_step(graphdef, rest, tx, tcfg, compute_dtype=dtype)
        new_state, metrics = jax.eval_shape(step, state0, batch)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new_state.params)), name
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new_state.opt_state)
                   if jnp.issubdtype(a.dtype, jnp.floating)), name
        for k in ("loss", "grad_norm"):
            assert metrics[k].shape == () and metrics[k].dtype == jnp.float32, (name, k, metrics[k])
        fl = _dot_flops(step, state0, batch)
        shares[name] = fl[("bfloat16", "bfloat16")] / sum(fl.values())
    REPORT["bf16 FLOP share, train step"] = shares["bfloat16"]
    print(f"train step: bf16 share of dot/conv FLOPs {shares}; {dict(fl)}")
    assert shares["float32"] == 0.0
    assert shares["bfloat16"] >= 0.85


# ------------------------------------------------------------------------------------------ attention
# (B, Nq, Nk, H, D): a Hiera window (8x8 tokens, tiny's stage-1 heads), Hiera global attention (stage 3 at
# 256 px), the decoder's token-to-image attention, memory self-attention and cross-attention (one head of 256).
ATTN_SHAPES = {
    "hiera_window": (16, 64, 64, 1, 96),
    "hiera_global": (1, 256, 256, 8, 48),
    "decoder_token_to_image": (2, 7, 256, 8, 16),
    "memory_self": (1, 256, 256, 1, 256),
    "memory_cross": (1, 256, 7 * 256 + 64, 1, 256),
}


def _qkv(shape, dtype, seed=0):
    b, nq, nk, h, d = shape
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, nq, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, nk, h, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, nk, h, d), jnp.float32)
    mask = jax.random.bernoulli(ks[3], 0.7, (b, nk)).at[:, 0].set(True)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(ATTN_SHAPES))
def test_xla_attention_matches_einsum(name, masked):
    """jax.nn.dot_product_attention (impl="xla") = the einsum path: float32 to float32 rounding (the two sum in
    different orders: <= 2e-6 of the values' scale), bfloat16 to a few bf16 roundings of the output (both
    round the probabilities to bf16 before the value product: 4 u)."""
    q, k, v, mask = _qkv(ATTN_SHAPES[name], jnp.float32)
    key_mask = mask if masked else None
    a = common.attention(q, k, v, key_mask=key_mask, impl="einsum")
    b = common.attention(q, k, v, key_mask=key_mask, impl="xla")
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=0)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    a = common.attention(q, k, v, key_mask=key_mask, impl="einsum")
    b = common.attention(q, k, v, key_mask=key_mask, impl="xla")
    assert a.dtype == b.dtype == jnp.bfloat16
    ref = common.attention(*(x.astype(jnp.float32) for x in (q, k, v)), key_mask=key_mask, impl="einsum")
    scale = float(jnp.abs(ref).max())
    for out in (a, b):
        assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) <= 4 * U * scale


def test_attention_impl_env_and_errors(monkeypatch):
    monkeypatch.setenv(common.ATTENTION_ENV, "xla")
    assert common.attention_impl() == "xla" and common.uses_fused_attention()
    assert common.attention_impl("einsum") == "einsum"
    monkeypatch.setenv(common.ATTENTION_ENV, "bogus")
    with pytest.raises(ValueError, match="MEDSAM2_ATTENTION"):
        common.attention_impl()
    monkeypatch.delenv(common.ATTENTION_ENV)
    assert common.attention_impl() == "auto"
    assert common.uses_fused_attention() == (jax.default_backend() != "cpu")
    # values narrower or wider than the keys: zero-padded for jax.nn.dot_product_attention (exact)
    q, k, v, mask = _qkv((2, 16, 24, 2, 32), jnp.float32)
    for vv in (v[..., :16], jnp.concatenate([v, v], -1)):
        a = common.attention(q, k, vv, key_mask=mask, impl="einsum")
        b = common.attention(q, k, vv, key_mask=mask, impl="xla")
        assert b.shape == a.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_rope_attention_fused_full_v_matches_low_rank(monkeypatch, masked):
    """Memory cross-attention (one head of 256, 64-channel memory): forced to jax.nn.dot_product_attention
    it applies the full v_proj before attending; equal to the einsum path's low-rank value product up to
    float32 rounding."""
    attn = RoPEAttention(256, 1, kv_in_dim=64, rope_k_repeat=True, feat_sizes=(16, 16), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 256, 256)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 2 * 256 + 4, 64)), jnp.float32)
    key_mask = jnp.asarray(rng.random((1, 2 * 256 + 4)) < 0.7) if masked else None
    monkeypatch.setenv(common.ATTENTION_ENV, "einsum")
    a = attn(q, kv, kv, num_k_exclude_rope=4, key_mask=key_mask)
    monkeypatch.setenv(common.ATTENTION_ENV, "xla")
    b = attn(q, kv, kv, num_k_exclude_rope=4, key_mask=key_mask)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * float(jnp.abs(a).max()), rtol=0)


def test_report():
    print("bf16 vs float32:", {k: f"{v:.3e}" for k, v in REPORT.items()})
