"""Axial 2-D rotary position encoding (RoPE) of SAM 2's memory attention, real-valued.

SAM 2 (``sam2/modeling/position_encoding.py``) builds complex "cis" tables and rotates consecutive
channel pairs ``(x0, x1), (x2, x3), ...`` of each head as complex numbers ``x0 + i x1``. Here the same
rotation is written with real cos/sin tables (no complex dtypes, so it exports and shards like any other
op):

* the table for an ``end_x`` x ``end_y`` grid (row-major tokens, ``t_x = t % end_x``, ``t_y = t // end_x``)
  has ``dim // 2`` angles per token: the first ``dim // 4`` are ``t_x * f_j``, the next ``dim // 4`` are
  ``t_y * f_j``, with ``f_j = 1 / theta ** (4 j / dim)``;
* pair ``j`` of a head, ``(a, b) = (x[2j], x[2j+1])``, becomes ``(a cos - b sin, a sin + b cos)``.

Tables depend on static shapes only, so they are NumPy float32 constants computed at trace time, with the
same float32 operation order as PyTorch.

Layout: token tensors are ``(B, N, heads, head_dim)`` (the layout of :func:`medsam2_jax.model.common.attention`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def axial_rope_tables(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of the axial RoPE angles for an ``end_x`` (width) x ``end_y`` (height) grid.

    Equal to ``compute_axial_cis(dim, end_x, end_y, theta)`` as ``(real, imag)``. Returns two float32
    arrays of shape ``(end_x * end_y, dim // 2)``.
    """
    if dim <= 0 or dim % 4:
        raise ValueError(f"axial RoPE needs a head dimension divisible by 4, got dim={dim}")
    if end_x <= 0 or end_y <= 0:
        raise ValueError(f"axial RoPE needs a non-empty grid, got end_x={end_x}, end_y={end_y}")
    exponent = np.arange(0, dim, 4, dtype=np.float32)[: dim // 4] / np.float32(dim)
    # theta ** exponent correctly rounded to float32 (via float64), as PyTorch's float32 pow gives it;
    # NumPy's float32 pow is off by one ulp on some exponents, which shows as ~2e-6 at 64 x 64 grids.
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    freqs = (np.float32(1.0) / power).astype(np.float32)
    t = np.arange(end_x * end_y, dtype=np.float32)
    t_x = (t % np.float32(end_x)).astype(np.float32)
    t_y = np.floor(t / np.float32(end_x)).astype(np.float32)
    angles = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def grid_for_tokens(num_tokens: int, feat_sizes: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(end_x, end_y)`` grid of ``num_tokens`` query tokens, as SAM 2's ``RoPEAttention`` picks it.

    ``feat_sizes`` (``[w, h]`` as in the SAM 2 configs) is used when it has exactly ``num_tokens`` cells;
    otherwise the grid is taken as square (PyTorch recomputes its table with ``w = h = sqrt(N)``).
    """
    if feat_sizes is not None and int(feat_sizes[0]) * int(feat_sizes[1]) == num_tokens:
        return int(feat_sizes[0]), int(feat_sizes[1])
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"RoPE attention needs the query tokens to form a grid: got {num_tokens} tokens, which is "
            f"neither feat_sizes={tuple(feat_sizes) if feat_sizes is not None else None} nor a square"
        )
    return side, side


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved channel pairs of ``x`` (..., D) by angles with ``cos``/``sin`` (..., D/2).

    Computed in float32 (as PyTorch does) and cast back to ``x``'s dtype.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)


def apply_rope(x: Array, cos: np.ndarray | Array, sin: np.ndarray | Array) -> Array:
    """Rotate ``x`` (B, N, heads, head_dim) with tables ``cos``/``sin`` of shape (N, head_dim // 2).

    Every head gets the same rotation, as in SAM 2.
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must be (B, N, heads, head_dim), got shape {tuple(x.shape)}")
    n, d = x.shape[1], x.shape[3]
    if tuple(cos.shape) != (n, d // 2) or tuple(sin.shape) != (n, d // 2):
        raise ValueError(
            f"apply_rope: tables must be (N, head_dim // 2) = {(n, d // 2)}, got cos {tuple(cos.shape)}, "
            f"sin {tuple(sin.shape)}"
        )
    return _rotate(x, jnp.asarray(cos)[:, None, :], jnp.asarray(sin)[:, None, :])


def apply_rope_keys(
    k: Array,
    cos: np.ndarray | Array,
    sin: np.ndarray | Array,
    *,
    num_k_exclude_rope: int = 0,
    repeat: bool = False,
) -> Array:
    """Rotate keys ``k`` (B, Nk, heads, head_dim) with the query grid's tables (Nq, head_dim // 2).

    The first ``Nk - num_k_exclude_rope`` keys are rotated; the last ``num_k_exclude_rope`` (SAM 2's object
    pointer tokens) are left as they are. With ``repeat`` (SAM 2's ``rope_k_repeat``) the rotated keys are
    ``r`` whole frames of ``Nq`` tokens each, every frame rotated with the same table; without it there
    must be exactly ``Nq`` of them. The frames are rotated at once (a reshape, no loop over frames).
    """
    if k.ndim != 4:
        raise ValueError(f"apply_rope_keys: k must be (B, Nk, heads, head_dim), got shape {tuple(k.shape)}")
    b, nk, h, d = k.shape
    nq = cos.shape[0]
    if tuple(cos.shape) != (nq, d // 2) or tuple(sin.shape) != (nq, d // 2):
        raise ValueError(
            f"apply_rope_keys: tables must be (Nq, head_dim // 2) with head_dim={d}, got cos "
            f"{tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if not 0 <= num_k_exclude_rope <= nk:
        raise ValueError(
            f"apply_rope_keys: num_k_exclude_rope must be in [0, {nk}] (the number of keys), "
            f"got {num_k_exclude_rope}"
        )
    n_rope = nk - num_k_exclude_rope
    if n_rope == 0:
        return k
    if repeat:
        if n_rope % nq:
            raise ValueError(
                f"apply_rope_keys: with repeat, the {n_rope} rotated keys must be whole frames of Nq={nq} "
                f"tokens (Nk={nk} minus num_k_exclude_rope={num_k_exclude_rope})"
            )
        r = n_rope // nq
    elif n_rope != nq:
        raise ValueError(
            f"apply_rope_keys: without repeat the rotated keys must number Nq={nq}, got {n_rope} "
            f"(Nk={nk} minus num_k_exclude_rope={num_k_exclude_rope}); pass repeat=True for memory frames"
        )
    else:
        r = 1
    spatial = k[:, :n_rope].reshape(b, r, nq, h, d)
    cos_b = jnp.asarray(cos)[None, :, None, :]  # (1, Nq, 1, D/2) broadcast over frames and heads
    sin_b = jnp.asarray(sin)[None, :, None, :]
    spatial = _rotate(spatial, cos_b, sin_b).reshape(b, n_rope, h, d)
    if num_k_exclude_rope == 0:
        return spatial
    return jnp.concatenate([spatial, k[:, n_rope:]], axis=1)
