"""FPN output heads (SAM 2's ``conv_s0`` / ``conv_s1``) composed with the neck's 1x1 lateral convs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medsam2_jax.model.common import Conv2d
from medsam2_jax.model.fpn import FpnNeck

D = 32
CHANNELS = [64, 32, 16, 8]  # deepest first, as backbone_channel_list
SIZES = [32, 16, 8, 4]  # trunk levels, highest resolution first


def _setup(top_down):
    rngs = nnx.Rngs(0)
    neck = FpnNeck(D, CHANNELS, fpn_top_down_levels=top_down, rngs=rngs)
    # Random biases too (the default init zeroes them, which would hide a dropped bias term).
    for conv in [c.conv for c in neck.convs]:
        conv.bias[...] = jax.random.normal(rngs.params(), conv.bias[...].shape)
    heads = {0: Conv2d(D, D // 8, 1, rngs=rngs), 1: Conv2d(D, D // 4, 1, rngs=rngs)}
    for h in heads.values():
        h.bias[...] = jax.random.normal(rngs.params(), h.bias[...].shape)
    keys = jax.random.split(jax.random.key(1), 4)
    xs = [jax.random.normal(k, (2, s, s, c)) for k, s, c in zip(keys, SIZES, reversed(CHANNELS))]
    return neck, heads, xs


def _has_full_map(fn, level_shape) -> bool:
    """Whether ``fn`` computes a d_model-channel feature map at ``level_shape`` (a matmul or conv output;
    the position encoding has that shape too, but is a broadcast constant)."""
    jaxpr = jax.make_jaxpr(fn)()
    return any(tuple(v.aval.shape) == (*level_shape, D) for eq in jaxpr.eqns for v in eq.outvars
               if eq.primitive.name in ("dot_general", "conv_general_dilated", "add"))


@pytest.mark.parametrize("top_down", [(2, 3), (0, 1, 2, 3)])
def test_heads_equal_applying_them_to_the_neck_output(top_down):
    neck, heads, xs = _setup(top_down)
    plain, pos_plain = neck(xs)
    fused, pos_fused = neck(xs, heads)
    for lvl in (0, 1):
        want = np.asarray(heads[lvl](plain[lvl]))
        got = np.asarray(fused[lvl])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for lvl in (2, 3):
        np.testing.assert_array_equal(np.asarray(fused[lvl]), np.asarray(plain[lvl]))
    for a, b in zip(pos_fused, pos_plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_composition_skips_the_full_map_only_where_nothing_reads_it():
    level0 = (2, SIZES[0], SIZES[0])
    neck, heads, xs = _setup((2, 3))  # SAM 2: levels 0 and 1 lateral only -> composed
    assert not _has_full_map(lambda: neck(xs, heads)[0][0], level0)
    assert _has_full_map(lambda: neck(xs)[0][0], level0)
    neck, heads, xs = _setup((0, 1, 2, 3))  # level 0 adds level 1's map: both need the full maps
    assert _has_full_map(lambda: neck(xs, heads)[0][0], level0)


def test_a_head_for_a_missing_level_is_an_error():
    neck, heads, xs = _setup((2, 3))
    with pytest.raises(ValueError, match=r"heads for levels \[7\]"):
        neck(xs, {7: heads[0]})
