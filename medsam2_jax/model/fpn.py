"""FPN neck and the image encoder (``sam2/modeling/backbones/image_encoder.py``), NHWC.

``FpnNeck.convs.{j}.conv`` is a 1x1 conv; as in PyTorch ``convs.0`` reads the *lowest*-resolution trunk
level (``backbone_channel_list`` is deepest first). Levels are processed from low to high resolution;
only the levels in ``fpn_top_down_levels`` (SAM 2: [2, 3], the two lowest resolutions) add the nearest x2
upsampled running feature, the others are lateral only. Each output level gets the sine position
encoding (a trace-time constant).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .common import Conv2d, as_compute
from .hiera import Hiera
from .position import sine_position_encoding
from .sizes import ModelSpec, get_spec

Array = jax.Array


class _ConvSeq(nnx.Module):
    """``nn.Sequential`` with one module named ``conv`` (so the key is ``convs.{j}.conv.weight``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, padding, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


def _composed_pointwise(x: Array, first: Conv2d, second: Conv2d) -> Array:
    """``second(first(x))`` for two 1x1 convs, as one matmul with the composed weight and bias."""
    hi = jax.lax.Precision.HIGHEST
    w2 = second.kernel[...][0, 0]
    w = jnp.matmul(first.kernel[...][0, 0], w2, precision=hi)
    y = jnp.einsum("...c,co->...o", as_compute(x, w), w)
    if first.bias is not None:
        y = y + jnp.matmul(first.bias[...], w2, precision=hi)
    return y if second.bias is None else y + second.bias[...]


def _upsample_nearest_2x(x: Array) -> Array:
    """``F.interpolate(scale_factor=2.0, mode="nearest")`` on NHWC: each pixel repeated 2x2 (exact)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class FpnNeck(nnx.Module):
    """``FpnNeck(d_model, backbone_channel_list, fpn_interp_model="nearest", fuse_type="sum")``."""

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fuse_type: str = "sum",
        fpn_top_down_levels: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.d_model = d_model
        self.backbone_channel_list = tuple(int(c) for c in backbone_channel_list)
        self.fuse_type = fuse_type
        self.convs = nnx.List(
            [_ConvSeq(c, d_model, kernel_size, stride, padding, rngs=rngs) for c in self.backbone_channel_list]
        )
        n = len(self.backbone_channel_list)
        self.fpn_top_down_levels = tuple(range(n) if fpn_top_down_levels is None else fpn_top_down_levels)

    def __call__(
        self, xs: Sequence[Array], heads: Mapping[int, Conv2d] | None = None
    ) -> tuple[list[Array], list[Array]]:
        """Trunk levels (highest resolution first) -> (features, position encodings), same order.

        ``heads`` optionally maps an output level to a conv applied to it (SAM 2 passes the mask decoder's
        ``conv_s0`` / ``conv_s1`` for levels 0 and 1); the level's feature is then the head's output. Where
        the level is lateral only, no other level reads it and both convs are 1x1, the two are one matmul
        with the composed weight ``W_lat @ W_head`` and bias ``b_lat @ W_head + b_head`` (exact up to float
        rounding), so the d_model-channel map of the high-resolution levels is never made: at 512 px that
        skips a (128, 128, 256) map and 87 % of those levels' FLOPs (tiny).
        """
        heads = dict(heads or {})
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"FpnNeck expects {n} trunk levels, got {len(xs)}")
        out: list[Array | None] = [None] * n
        pos: list[Array | None] = [None] * n
        prev = None
        for i in range(n - 1, -1, -1):
            x = xs[i]
            if x.shape[-1] != self.backbone_channel_list[n - 1 - i]:
                raise ValueError(
                    f"trunk level {i} has {x.shape[-1]} channels, expected {self.backbone_channel_list[n - 1 - i]}"
                )
            lat_conv = self.convs[n - 1 - i].conv
            top_down = i in self.fpn_top_down_levels and prev is not None
            read_below = i > 0 and (i - 1) in self.fpn_top_down_levels
            head = heads.pop(i, None)
            if head is not None and not top_down and not read_below and lat_conv.pointwise and head.pointwise:
                prev = None  # no level below reads this one
                out[i] = _composed_pointwise(x, lat_conv, head)
            else:
                lateral = lat_conv(x)
                if top_down:
                    prev = lateral + _upsample_nearest_2x(prev.astype(jnp.float32))
                    if self.fuse_type == "avg":
                        prev = prev / 2
                else:
                    prev = lateral
                out[i] = prev if head is None else head(prev)
            b, h, w, _ = x.shape
            # (the dtype the lateral map has, or would have had when composed away)
            dtype = prev.dtype if prev is not None else jnp.result_type(x.dtype, lat_conv.kernel.dtype)
            pe = jnp.asarray(sine_position_encoding(h, w, self.d_model), dtype=dtype)
            pos[i] = jnp.broadcast_to(pe[None], (b, h, w, self.d_model))
        if heads:
            raise ValueError(f"heads for levels {sorted(heads)}: the neck has levels 0..{n - 1}")
        return out, pos  # type: ignore[return-value]


class ImageEncoder(nnx.Module):
    """``ImageEncoder(trunk, neck, scalp)``: returns a dict like PyTorch's, with NHWC maps.

    ``{"vision_features": (B, S/16, S/16, d_model), "vision_pos_enc": [...], "backbone_fpn": [...]}``,
    lists highest resolution first, the ``scalp`` lowest-resolution levels dropped.

    ``images_per_step`` sets how many images of a batch go through the network at once (a ``lax.map``
    over chunks; the result does not depend on it beyond float32 rounding). ``None`` (default) picks 1 on
    CPU, where one image's activations stay cache-resident and a batch of 8 at 512 px runs ~20% faster
    than all at once, and the whole batch on GPU/TPU; ``0`` always takes the whole batch.
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 0, *, images_per_step: int | None = None):
        if tuple(trunk.channel_list) != tuple(neck.backbone_channel_list):
            raise ValueError(
                f"channel dims of trunk and neck do not match: trunk {list(trunk.channel_list)}, "
                f"neck {list(neck.backbone_channel_list)}"
            )
        if not 0 <= scalp < len(neck.convs):
            raise ValueError(f"scalp must be in [0, {len(neck.convs) - 1}], got {scalp}")
        if images_per_step is not None and (not isinstance(images_per_step, int) or images_per_step < 0):
            raise ValueError(f"images_per_step must be None or an int >= 0, got {images_per_step!r}")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        self.images_per_step = images_per_step
        # Training: recompute each chunk's activations in the backward pass instead of keeping them (memory
        # then holds the images and features, not every block's activations, whatever the frame count).
        self.remat = False

    def _encode(self, x: Array, heads: Mapping[int, Conv2d] | None = None) -> dict:
        features, pos = self.neck(self.trunk(x), heads)
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}

    def __call__(self, x: Array, heads: Mapping[int, Conv2d] | None = None) -> dict:
        """``heads``: per FPN level, a conv applied to that level's output (see :meth:`FpnNeck.__call__`)."""
        self.trunk.check_input(x)
        b = x.shape[0]
        step = self.images_per_step
        if step is None:
            step = 1 if jax.default_backend() == "cpu" else 0
        encode = lambda xi: self._encode(xi, heads)
        if self.remat:
            encode = jax.checkpoint(encode)
        if step == 0 or step >= b:
            return encode(x)
        n = -(-b // step)
        if n * step != b:  # pad the batch to whole chunks; the padded images are dropped below
            x = jnp.concatenate([x, jnp.zeros((n * step - b, *x.shape[1:]), x.dtype)], axis=0)
        out = jax.lax.map(encode, x.reshape(n, step, *x.shape[1:]))
        return jax.tree.map(lambda a: a.reshape(n * step, *a.shape[2:])[:b], out)


def image_encoder_from_spec(spec: ModelSpec, *, rngs: nnx.Rngs) -> ImageEncoder:
    trunk = Hiera.from_spec(spec, rngs=rngs)
    neck = FpnNeck(
        spec.d_model,
        spec.backbone_channel_list,
        fpn_top_down_levels=spec.fpn_top_down_levels,
        rngs=rngs,
    )
    return ImageEncoder(trunk, neck, scalp=spec.scalp)


def build_image_encoder(model_name: str, *, rngs: nnx.Rngs) -> ImageEncoder:
    """The image encoder of a SAM 2 / 2.1 size (``sam2.1_hiera_t``, ``sam2_hiera_b+``, ``sam2.1_hiera_large`` ...)."""
    return image_encoder_from_spec(get_spec(model_name), rngs=rngs)


__all__ = ["FpnNeck", "ImageEncoder", "build_image_encoder", "image_encoder_from_spec"]
