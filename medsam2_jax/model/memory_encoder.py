"""SAM 2's memory encoder (``sam2/modeling/memory_encoder.py``), NHWC.

A frame's memory is its (un-conditioned) image features fused with its predicted mask:

    mask (B, S, S, 1) --MaskDownSampler (/16)--> (B, h, w, 256)
    pix_feat (B, h, w, 256) --pix_feat_proj--> + mask --Fuser (2 ConvNeXt blocks)--> out_proj --> (B, h, w, 64)

plus the 64-channel sine position encoding of the (h, w) grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .common import GELU, Conv2d, LayerNorm2d, Linear, gelu, run_sequential
from .position import sine_position_encoding

Array = jax.Array


class MaskDownSampler(nnx.Module):
    """``MaskDownSampler``: (conv k3 s2 p1 -> LayerNorm2d -> GELU) x log2(total_stride), then a 1x1 conv.

    ``encoder`` mirrors the PyTorch ``nn.Sequential``: parameterised at indices 0, 1, 3, 4, 6, 7, 9, 10, 12
    for SAM 2's settings; the GELUs are placeholders at 2, 5, 8, 11.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        *,
        rngs: nnx.Rngs,
    ):
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError(
                f"MaskDownSampler: total_stride={total_stride} must be a power of stride={stride}"
            )
        self.total_stride = total_stride
        layers = []
        in_ch = out_ch = 1
        for _ in range(num_layers):
            out_ch = in_ch * stride**2
            layers.append(Conv2d(in_ch, out_ch, kernel_size, stride, padding, rngs=rngs))
            layers.append(LayerNorm2d(out_ch, eps=1e-6, rngs=rngs))
            layers.append(GELU())
            in_ch = out_ch
        layers.append(Conv2d(out_ch, embed_dim, 1, rngs=rngs))
        self.encoder = nnx.List(layers)

    def __call__(self, x: Array) -> Array:
        """(B, S, S, 1) -> (B, S / total_stride, S / total_stride, embed_dim)."""
        return run_sequential(self.encoder, x)


class CXBlock(nnx.Module):
    """``CXBlock`` (ConvNeXt): depthwise conv k7 -> LayerNorm2d(1e-6) -> Linear 4x -> GELU -> Linear -> gamma.

    ``gamma`` is a raw parameter (dim,) as in PyTorch (None when ``layer_scale_init_value <= 0``). Only the
    inference setting ``drop_path=0`` is supported (as in every SAM 2 config).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        if drop_path != 0.0:
            raise ValueError(f"CXBlock: only drop_path=0.0 is supported (SAM 2's configs), got {drop_path}")
        self.dwconv = Conv2d(dim, dim, kernel_size, padding=padding, groups=dim if use_dwconv else 1, rngs=rngs)
        self.norm = LayerNorm2d(dim, eps=1e-6, rngs=rngs)
        self.pwconv1 = Linear(dim, 4 * dim, rngs=rngs)
        self.pwconv2 = Linear(4 * dim, dim, rngs=rngs)
        self.gamma = (
            nnx.Param(jnp.full((dim,), layer_scale_init_value, jnp.float32)) if layer_scale_init_value > 0 else None
        )

    def __call__(self, x: Array) -> Array:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        y = self.norm(self.dwconv(x))
        y = self.pwconv2(gelu(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma[...] * y
        return x + y


class Fuser(nnx.Module):
    """``Fuser``: optional 1x1 input projection (``proj``), then ``layers.{i}`` (CXBlocks).

    ``layer``, if given, is cloned ``num_layers`` times (PyTorch's ``get_clones``); otherwise each layer is
    a default ``CXBlock(dim)``.
    """

    def __init__(
        self,
        layer: CXBlock | None,
        num_layers: int,
        dim: int | None = None,
        input_projection: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        if (layer is None or input_projection) and dim is None:
            raise ValueError("Fuser: dim is required when layer is None or input_projection=True, got dim=None")
        self.proj = Conv2d(dim, dim, 1, rngs=rngs) if input_projection else None
        if layer is not None:
            self.layers = nnx.List([nnx.clone(layer) for _ in range(num_layers)])
        else:
            self.layers = nnx.List([CXBlock(dim, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x: Array) -> Array:
        if self.proj is not None:
            x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class SinePositionEncoding(nnx.Module):
    """``PositionEmbeddingSine(num_pos_feats)`` as a parameter-free module: (B, H, W, C) -> (B, H, W, feats)."""

    def __init__(self, num_pos_feats: int):
        self.num_pos_feats = num_pos_feats

    def __call__(self, x: Array) -> Array:
        b, h, w = x.shape[:3]
        pe = sine_position_encoding(h, w, self.num_pos_feats)
        return jnp.broadcast_to(jnp.asarray(pe, x.dtype)[None], (b, h, w, self.num_pos_feats))


class MemoryEncoder(nnx.Module):
    """``MemoryEncoder(out_dim, mask_downsampler, fuser, position_encoding, in_dim)`` with SAM 2.1's defaults.

    Submodules left as None are built with SAM 2.1's settings: ``MaskDownSampler(in_dim, kernel 3, stride 2,
    padding 1, total_stride 16)``, ``Fuser`` of 2 ``CXBlock(in_dim)``, sine encoding of ``out_dim`` features.
    ``out_proj`` is None (identity) when ``out_dim == in_dim``.
    """

    def __init__(
        self,
        out_dim: int = 64,
        mask_downsampler: MaskDownSampler | None = None,
        fuser: Fuser | None = None,
        position_encoding: SinePositionEncoding | None = None,
        in_dim: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_dim = in_dim
        self.out_dim = out_dim
        if mask_downsampler is None:
            mask_downsampler = MaskDownSampler(in_dim, kernel_size=3, stride=2, padding=1, total_stride=16, rngs=rngs)
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = Conv2d(in_dim, in_dim, 1, rngs=rngs)
        self.fuser = fuser if fuser is not None else Fuser(None, 2, dim=in_dim, rngs=rngs)
        self.position_encoding = position_encoding if position_encoding is not None else SinePositionEncoding(out_dim)
        self.out_proj = Conv2d(in_dim, out_dim, 1, rngs=rngs) if out_dim != in_dim else None

    def __call__(self, pix_feat: Array, masks: Array, skip_mask_sigmoid: bool = False) -> dict:
        """Encode one memory per batch element.

        Args:
          pix_feat: (B, h, w, in_dim) image features of the frame (not memory-conditioned).
          masks: (B, S, S, 1) mask logits (or, with ``skip_mask_sigmoid``, values used as they are), with
            S = h * total_stride.
          skip_mask_sigmoid: static; SAM 2 passes True with its own ``sigmoid * 20 - 10`` scaling.
        Returns:
          ``{"vision_features": (B, h, w, out_dim), "vision_pos_enc": [(B, h, w, out_dim)]}``.
        """
        ts = self.mask_downsampler.total_stride
        if pix_feat.ndim != 4 or pix_feat.shape[-1] != self.in_dim:
            raise ValueError(
                f"MemoryEncoder: pix_feat must be (B, h, w, {self.in_dim}) NHWC, got shape {tuple(pix_feat.shape)}"
            )
        b, h, w, _ = pix_feat.shape
        if tuple(masks.shape) != (b, h * ts, w * ts, 1):
            raise ValueError(
                f"MemoryEncoder: masks must be (B, h*{ts}, w*{ts}, 1) = {(b, h * ts, w * ts, 1)} for pix_feat "
                f"{tuple(pix_feat.shape)}, got {tuple(masks.shape)}"
            )
        if not skip_mask_sigmoid:
            masks = jax.nn.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat) + masks
        x = self.fuser(x)
        if self.out_proj is not None:
            x = self.out_proj(x)
        pos = self.position_encoding(x)
        return {"vision_features": x, "vision_pos_enc": [pos]}
