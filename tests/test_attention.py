"""``common.attention``: the one softmax-attention kernel of the port (Hiera, two-way transformer, memory attention).

It is checked against a plain NumPy softmax(QK^T / sqrt(d)) V in float64, with a key mask, several heads and
values narrower than the keys (the memory attention's low-rank value product), and the CPU query blocking is
checked to give the single-block result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax.model import common
from medsam2_jax.model.common import attention, query_block


def reference(q, k, v, key_mask=None):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        s = np.where(np.asarray(key_mask)[:, None, None, :], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def inputs(seed, b=2, nq=64, nk=96, h=2, d=32, dv=16):
    r = np.random.default_rng(seed)
    f = lambda *s: r.normal(size=s).astype(np.float32)
    return f(b, nq, h, d), f(b, nk, h, d), f(b, nk, h, dv)


@pytest.mark.parametrize("dv", [32, 16])
def test_matches_float64_softmax_attention(dv):
    q, k, v = inputs(0, dv=dv)
    out = np.asarray(jax.jit(attention)(q, k, v))
    assert out.shape == (2, 64, 2, dv)
    # |out| <= 3; float32 rounding of 96-term sums (measured 3e-7).
    np.testing.assert_allclose(out, reference(q, k, v), atol=2e-6)


def test_key_mask_excludes_keys():
    q, k, v = inputs(1)
    mask = np.ones((2, 96), bool)
    mask[0, 10:50] = False
    mask[1, 90:] = False
    out = np.asarray(jax.jit(lambda *a: attention(*a[:3], key_mask=a[3]))(q, k, v, mask))
    np.testing.assert_allclose(out, reference(q, k, v, mask), atol=2e-6)
    # Masked keys' contents do not matter, even if not finite.
    k2, v2 = k.copy(), v.copy()
    k2[0, 10:50], v2[0, 10:50] = np.nan, 1e30
    out2 = np.asarray(jax.jit(lambda *a: attention(*a[:3], key_mask=a[3]))(q, k2, v2, mask))
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("block", [16, 32])
def test_query_blocks_give_the_single_block_result(block):
    q, k, v = inputs(2)
    mask = np.ones((2, 96), bool)
    mask[1, :7] = False
    f = jax.jit(lambda q, k, v, m, block: attention(q, k, v, key_mask=m, block=block), static_argnums=4)
    whole = np.asarray(f(q, k, v, mask, 64))
    blocked = np.asarray(f(q, k, v, mask, block))
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=0)  # the same sums per row (measured: equal)
    with pytest.raises(ValueError, match="block=48 must divide the 64 queries"):
        attention(q, k, v, block=48)


def test_gradients_through_blocks_equal_single_block():
    q, k, v = inputs(3, b=1, nq=32, nk=40, h=1, d=8, dv=8)

    def loss(q, k, v, block):
        return jnp.sum(jnp.sin(attention(q, k, v, block=block)))

    g1 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, 32)
    g2 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, 8)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_query_block_rule(monkeypatch):
    assert jax.default_backend() == "cpu"
    # Small score matrices: one block. The memory cross-attention at 512 px (1024 x 7232 scores): 256.
    assert query_block(1, 8, 64, 64) == 64
    assert query_block(1, 1, 1024, 7232) == 256
    assert query_block(1, 1, 4096, 28736) == 256
    # No divisor of nq in [64, 256] (nq = 2 * 263): one block, never a wrong split.
    assert query_block(1, 1, 526, 1 << 20) == 526
    assert query_block(1, 1, 600, 1 << 20) == 200
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert query_block(1, 1, 1024, 7232) == 1024
    assert common.CPU_SCORE_BLOCK == 1 << 22
