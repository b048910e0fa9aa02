"""Hiera, the SAM 2 image trunk (``sam2/modeling/backbones/hieradet.py``), in Flax NNX on NHWC maps.

Attribute names mirror PyTorch (``patch_embed.proj``, ``pos_embed``, ``pos_embed_window``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.{0,1},proj}``) so that the key map in
:mod:`medsam2_jax.interop.weights` needs no special case; ``pos_embed`` and ``pos_embed_window`` are raw
``nnx.Param`` in PyTorch layout (1, C, h, w).

Numerics follow the reference exactly:

* windowed attention runs over windows of a map that is **zero-padded after** ``norm1`` (so padded tokens
  carry the qkv bias) and the padded keys take part in attention without a mask;
* q-pooling (2x2 max pool of the queries) happens inside each (padded) window, and the window size "lags"
  a block: the first block of a stage keeps the previous stage's window and pools it;
* the background position embedding is resized with torch's bicubic kernel (A = -0.75, clamped border
  indices, ``align_corners=False``), written as two interpolation matrices built in NumPy at trace time.

Speed: window partition/unpartition are reshapes and transposes (no gathers); when a map needs no padding
the (narrower) input is partitioned before the qkv projection; when it does, the qkv projection runs on the
real tokens only and the padding is filled with the qkv bias (identical to projecting zero tokens); the
output projection runs after the padded tokens are cropped away; attention is two batched matmuls.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import MLP, Conv2d, LayerNorm, Linear, as_compute, attention, gelu
from .sizes import ModelSpec

Array = jax.Array

_EPS = 1e-6  # Hiera's LayerNorms: partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------------------------
# torch-exact bicubic resize as a matrix
# --------------------------------------------------------------------------------------------------------
def _cubic_weights(t: np.ndarray, a: np.float32) -> np.ndarray:
    """The four Keys-kernel weights for taps x-1, x, x+1, x+2 at fractional offset ``t`` (float32)."""
    one = np.float32(1.0)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


@lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out_size, in_size) float32 matrix ``M`` with ``M @ v`` = torch 1-D bicubic resize of ``v``.

    Mirrors ``F.interpolate(mode="bicubic", align_corners=False)`` given an output ``size``: source
    coordinate ``(i + 0.5) * in/out - 0.5`` in float32 (not clamped at 0 for cubic), floor and fraction,
    Keys weights with ``A = a``, tap indices clamped to ``[0, in_size - 1]`` (clamped taps accumulate).
    A 2-D resize of a (h_in, w_in) map is ``M_h @ P @ M_w.T`` (the kernel is separable).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic_matrix needs positive sizes, got in_size={in_size}, out_size={out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    w = _cubic_weights(t, np.float32(a))  # (out, 4)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, k].astype(np.float64))
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


# --------------------------------------------------------------------------------------------------------
# window helpers (pure reshapes / transposes)
# --------------------------------------------------------------------------------------------------------
def window_partition(x: Array, ws: int) -> Array:
    """(B, Hp, Wp, C) with Hp, Wp multiples of ``ws`` -> (B * nH * nW, ws, ws, C), row-major windows."""
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_unpartition(windows: Array, ws: int, hp: int, wp: int) -> Array:
    """Inverse of :func:`window_partition`: (B * nH * nW, ws, ws, C) -> (B, Hp, Wp, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.reshape(b, hp // ws, wp // ws, ws, ws, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)


def _max_pool_2x2(x: Array) -> Array:
    """``nn.MaxPool2d(2, 2)`` on (..., H, W, C) with even H, W, as a reshape and a max."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2, c).max(axis=(-4, -2))


def _pad_to(n: int, ws: int) -> int:
    return n + (ws - n % ws) % ws


# --------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------
class PatchEmbed(nnx.Module):
    """``PatchEmbed``: Conv2d(in_chans -> embed_dim, k7, s4, p3); NHWC in, NHWC out.

    Computed as one matmul over 8x8 patches gathered by reshapes (space-to-depth by 4, then the 2x2
    neighbouring 4x4 blocks side by side; the 7x7 kernel is zero-extended to 8x8). Same sum as the conv,
    and several times faster than XLA's CPU convolution for this 3-channel, stride-4 case.
    """

    def __init__(self, embed_dim: int, in_chans: int = 3, *, rngs: nnx.Rngs):
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        if h % 4 or w % 4:
            return self.proj(x)
        n_h, n_w = h // 4, w // 4
        # out[i, j] = sum_{a,b<7} x[4i-3+a, 4j-3+b] K[a, b]; with xp = pad(x, 3 before, 1 after), rows
        # 4i..4i+7 of xp are its 4x4-blocks i and i+1.
        xp = jnp.pad(x, ((0, 0), (3, 1), (3, 1), (0, 0)))
        blocks = xp.reshape(b, n_h + 1, 4, n_w + 1, 4, c).transpose(0, 1, 3, 2, 4, 5)
        blocks = blocks.reshape(b, n_h + 1, n_w + 1, 16 * c)
        patches = jnp.concatenate(
            [blocks[:, di : di + n_h, dj : dj + n_w] for di in (0, 1) for dj in (0, 1)], axis=-1
        )  # (B, n_h, n_w, [di, dj, r, c, ch])
        k = jnp.pad(self.proj.kernel[...], ((0, 1), (0, 1), (0, 0), (0, 0)))  # (8, 8, C_in, C_out)
        k = k.reshape(2, 4, 2, 4, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(64 * c, -1)
        return jnp.einsum("bhwk,ko->bhwo", as_compute(patches, k), k) + self.proj.bias[...]


class MultiScaleAttention(nnx.Module):
    """``MultiScaleAttention`` fused with the window partition of its block.

    Takes the *normed, unpadded* map (B, H, W, dim) and the block's window size (0 = global); returns
    (B, H', W', dim_out) with H' = H / 2 when ``q_pool`` (else H), equal to PyTorch's
    partition -> attn -> unpartition -> crop.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool = False, *, rngs: nnx.Rngs):
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = Linear(dim, 3 * dim_out, rngs=rngs)
        self.proj = Linear(dim_out, dim_out, rngs=rngs)

    def __call__(self, x: Array, window_size: int) -> Array:
        b, h, w, _ = x.shape
        heads, hd = self.num_heads, self.dim_out // self.num_heads
        ws = window_size
        if ws <= 0:  # global attention
            hp, wp, wh, ww = h, w, h, w
            qkv = self.qkv(x)
        else:
            hp, wp, wh, ww = _pad_to(h, ws), _pad_to(w, ws), ws, ws
            if (hp, wp) == (h, w):
                # no padding: partition the input (narrower than qkv), then project the windows
                qkv = self.qkv(window_partition(x, ws))
            else:
                # PyTorch zero-pads the normed map, so padded tokens project to the qkv bias alone:
                # qkv(pad(x)) == pad(x @ W) + b. Project the real tokens only, then partition.
                qkv = jnp.einsum("bhwc,cd->bhwd", as_compute(x, self.qkv.kernel[...]), self.qkv.kernel[...])
                qkv = jnp.pad(qkv, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))) + self.qkv.bias[...]
                qkv = window_partition(qkv, ws)  # (B * nW, ws, ws, 3 * dim_out)
        nb = qkv.shape[0]
        qkv = qkv.reshape(nb, wh, ww, 3, heads, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.q_pool:  # max-pool the queries inside each (padded) window
            q = _max_pool_2x2(q.reshape(nb, wh, ww, heads * hd)).reshape(nb, wh // 2, ww // 2, heads, hd)
            wh, ww = wh // 2, ww // 2
        q = q.reshape(nb, wh * ww, heads, hd)
        k = k.reshape(nb, -1, heads, hd)
        v = v.reshape(nb, -1, heads, hd)
        o = attention(q, k, v).reshape(nb, wh, ww, self.dim_out)
        if ws > 0:
            f = 2 if self.q_pool else 1
            o = window_unpartition(o, wh, hp // f, wp // f)[:, : h // f, : w // f, :]
        return self.proj(o)  # after the crop: padded tokens are never projected


class MultiScaleBlock(nnx.Module):
    """``MultiScaleBlock``: pre-norm windowed attention (+ q-pool at stage changes) and a GELU MLP."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        q_stride: bool = False,
        window_size: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = LayerNorm(dim, eps=_EPS, rngs=rngs)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=q_stride, rngs=rngs)
        self.norm2 = LayerNorm(dim_out, eps=_EPS, rngs=rngs)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, activation=gelu, rngs=rngs)
        self.proj = Linear(dim, dim_out, rngs=rngs) if dim != dim_out else None

    def __call__(self, x: Array) -> Array:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = _max_pool_2x2(shortcut)
        x = shortcut + self.attn(x, self.window_size)
        return x + self.mlp(self.norm2(x))


class Hiera(nnx.Module):
    """Hiera trunk. ``__call__(x: (B, H, W, 3))`` -> one NHWC map per stage, highest resolution first.

    H and W must be multiples of 32 (the tiled 8x8 window position embedding needs S/4 divisible by 8,
    and the three q-pool halvings need exact halving).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        *,
        rngs: nnx.Rngs,
    ):
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {tuple(stages)} and window_spec {tuple(window_spec)} differ in length")
        if tuple(q_stride) != (2, 2):
            raise ValueError(f"only q_stride (2, 2) is supported (as in every SAM 2 config), got {q_stride}")
        self.window_spec = tuple(int(w) for w in window_spec)
        self.stage_ends = tuple(sum(stages[: i + 1]) - 1 for i in range(len(stages)))
        if not 0 <= q_pool <= len(self.stage_ends) - 1:
            raise ValueError(f"q_pool must be in [0, {len(self.stage_ends) - 1}], got {q_pool}")
        self.q_pool_blocks = tuple(e + 1 for e in self.stage_ends[:-1])[:q_pool]
        self.global_att_blocks = tuple(int(b) for b in global_att_blocks)
        self.window_pos_embed_bkg_spatial_size = tuple(int(s) for s in window_pos_embed_bkg_spatial_size)

        self.patch_embed = PatchEmbed(embed_dim, rngs=rngs)
        bh, bw = self.window_pos_embed_bkg_spatial_size
        # PyTorch initialises both to zeros (no init call); kept in PyTorch layout (1, C, h, w).
        self.pos_embed = nnx.Param(jnp.zeros((1, embed_dim, bh, bw), jnp.float32))
        w0 = self.window_spec[0]
        self.pos_embed_window = nnx.Param(jnp.zeros((1, embed_dim, w0, w0), jnp.float32))

        blocks = []
        cur_stage = 1
        for i in range(sum(stages)):
            dim_out = embed_dim
            # the window size lags by a block: the first block of a stage uses the previous stage's window
            window_size = self.window_spec[cur_stage - 1]
            if i in self.global_att_blocks:
                window_size = 0
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                cur_stage += 1
            q = i in self.q_pool_blocks
            if q and window_size % 2:
                raise ValueError(f"block {i} pools queries inside windows of odd size {window_size}")
            blocks.append(
                MultiScaleBlock(embed_dim, dim_out, num_heads, q_stride=q, window_size=window_size, rngs=rngs)
            )
            embed_dim = dim_out
        self.blocks = nnx.List(blocks)
        self.channel_list = tuple(self.blocks[i].dim_out for i in self.stage_ends[::-1])

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, rngs: nnx.Rngs) -> "Hiera":
        return cls(
            embed_dim=spec.embed_dim,
            num_heads=spec.num_heads,
            stages=spec.stages,
            window_pos_embed_bkg_spatial_size=spec.window_pos_embed_bkg_spatial_size,
            window_spec=spec.window_spec,
            global_att_blocks=spec.global_att_blocks,
            rngs=rngs,
        )

    def _get_pos_embed(self, h: int, w: int) -> Array:
        """Bicubic-resized background embedding + tiled window embedding, (h, w, C)."""
        bh, bw = self.window_pos_embed_bkg_spatial_size
        mh = jnp.asarray(bicubic_matrix(bh, h))
        mw = jnp.asarray(bicubic_matrix(bw, w))
        pe = jnp.transpose(self.pos_embed[...][0], (1, 2, 0))  # (bh, bw, C)
        # M_h P M_w^T, contracted in the order that leaves (h, w, C) in its natural layout (no transpose)
        pos = jnp.einsum("wb,hbc->hwc", mw, jnp.einsum("ha,abc->hbc", mh, pe))
        win = jnp.transpose(self.pos_embed_window[...][0], (1, 2, 0))  # (w0, w0, C)
        w0 = win.shape[0]
        return pos + jnp.tile(win, (h // w0, w // w0, 1))

    def check_input(self, x) -> None:
        """Raise a clear error unless ``x`` is a float (B, H, W, 3) array with H, W multiples of 32."""
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"images must be an array of shape (B, H, W, 3), got {type(x).__name__}")
        if len(shape) != 4:
            raise ValueError(f"images must have rank 4 (B, H, W, 3) NHWC, got shape {tuple(shape)} (rank {len(shape)})")
        if shape[-1] != 3:
            raise ValueError(
                f"images must have 3 channels last (B, H, W, 3) NHWC, got shape {tuple(shape)}; "
                "for an NCHW array transpose it with x.transpose(0, 2, 3, 1)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"images must be floating point (normalised with the ImageNet mean/std), got dtype {dtype}"
            )
        h, w = shape[1], shape[2]
        if h % 32 or w % 32 or h == 0 or w == 0:
            raise ValueError(
                f"image size must be a positive multiple of 32, got {h}x{w} (e.g. use {max(32, round(h / 32) * 32)})"
            )

    def __call__(self, x: Array) -> list[Array]:
        self.check_input(x)
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1], x.shape[2]).astype(x.dtype)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.stage_ends:
                outputs.append(x)
        return outputs


__all__ = [
    "Hiera",
    "MultiScaleBlock",
    "MultiScaleAttention",
    "PatchEmbed",
    "bicubic_matrix",
    "window_partition",
    "window_unpartition",
]
