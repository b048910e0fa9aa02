"""Position encodings of SAM 2 (``sam2/modeling/position_encoding.py``), NHWC.

* :func:`sine_position_encoding` — ``PositionEmbeddingSine`` (FPN levels, memory encoder): channels
  interleave sin/cos pairs, y-half first.
* :class:`PositionEmbeddingRandom` — random Fourier features of the prompt encoder, with the Gaussian
  matrix as a checkpoint buffer.
* :func:`get_1d_sine_pe` — the object-pointer temporal encoding: ``[sin(all), cos(all)]`` (not interleaved).

All are pure functions of static shapes (or of the buffer), computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import Buffer

Array = jax.Array


def sine_position_encoding(
    height: int,
    width: int,
    num_pos_feats: int,
    *,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float | None = None,
) -> np.ndarray:
    """``PositionEmbeddingSine(num_pos_feats)`` for an (H, W) map, returned as (H, W, num_pos_feats) float32.

    Computed in NumPy float32 at trace time (it depends only on static shapes), so it costs nothing at
    run time and is a constant in the compiled program.
    """
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    scale = 2 * math.pi if scale is None else scale
    npf = num_pos_feats // 2
    y_embed = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, axis=1)
    x_embed = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, axis=0)
    if normalize:
        eps = np.float32(1e-6)
        y_embed = y_embed / (y_embed[-1:, :] + eps) * np.float32(scale)
        x_embed = x_embed / (x_embed[:, -1:] + eps) * np.float32(scale)
    dim_t = np.arange(npf, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(npf))
    pos_x = x_embed[:, :, None] / dim_t
    pos_y = y_embed[:, :, None] / dim_t
    pos_x = np.stack((np.sin(pos_x[:, :, 0::2]), np.cos(pos_x[:, :, 1::2])), axis=3).reshape(height, width, -1)
    pos_y = np.stack((np.sin(pos_y[:, :, 0::2]), np.cos(pos_y[:, :, 1::2])), axis=3).reshape(height, width, -1)
    return np.concatenate((pos_y, pos_x), axis=2).astype(np.float32)


def get_1d_sine_pe(pos_inds: Array, dim: int, temperature: float = 10000.0) -> Array:
    """``sam2_utils.get_1d_sine_pe``: (N,) positions -> (N, dim) as ``[sin(p/t), cos(p/t)]``."""
    pe_dim = dim // 2
    dim_t = jnp.arange(pe_dim, dtype=jnp.float32)
    dim_t = jnp.float32(temperature) ** (2 * (dim_t // 2) / pe_dim)
    pos_embed = pos_inds[..., None].astype(jnp.float32) / dim_t
    return jnp.concatenate([jnp.sin(pos_embed), jnp.cos(pos_embed)], axis=-1)


class PositionEmbeddingRandom(nnx.Module):
    """``PositionEmbeddingRandom``: random spatial frequencies, (2, num_pos_feats) Gaussian buffer."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None, *, rngs: nnx.Rngs):
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.positional_encoding_gaussian_matrix = Buffer(
            scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        )

    def _pe_encoding(self, coords: Array) -> Array:
        """Points normalised to [0, 1] (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix[...]
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> Array:
        """Dense encoding for an (h, w) grid -> (h, w, C)."""
        h, w = size
        y_embed = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x_embed = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x_embed[None, :], y_embed[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords_input: Array, image_size: tuple[int, int]) -> Array:
        """Pixel coordinates (x, y) (..., 2) in an image of ``image_size`` = (H, W)."""
        coords = coords_input.astype(jnp.float32)
        coords = coords / jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self._pe_encoding(coords)
