"""Building blocks shared by every SAM 2 module.

Each class here is a thin subclass of a Flax NNX layer that takes the *PyTorch* constructor arguments
(so a module reads like the PyTorch module it ports) and fixes the numeric settings that matter for
parity with PyTorch:

* convolutions use explicit symmetric padding (``"SAME"`` is asymmetric for stride > 1);
* layer norms use the two-pass variance (``use_fast_variance=False``) and an explicit epsilon;
* GELU is the exact erf form (PyTorch's default), not Flax's tanh approximation;
* the 2x2/stride-2 transposed convolution uses ``transpose_kernel=True`` so that the kernel is the
  PyTorch kernel transposed, without a spatial flip.

The weight converter (:mod:`medsam2_jax.weights`) dispatches on these classes: every parameterised leaf
module of the model must be one of them (or hold a raw :class:`nnx.Param` / :class:`Buffer`), which is what
makes the PyTorch <-> Flax key map a short table instead of a per-module list.

Layout convention: images and feature maps are NHWC, token sequences are (B, N, C).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


class Buffer(nnx.Variable):
    """A non-trainable constant that lives in the checkpoint (PyTorch ``register_buffer``)."""


def gelu(x: Array) -> Array:
    """Exact (erf) GELU written as torch does, ``x/2 (1 + erf(x/sqrt 2))`` (``torch.nn.GELU()``).

    Same values as ``jax.nn.gelu(approximate=False)`` (which goes through erfc) to float32 rounding, measured
    1.2e-6 from torch on [-12, 12], and ~6x faster on CPU (XLA's erfc goes through exp and a division).
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def relu(x: Array) -> Array:
    return jax.nn.relu(x)


class Activation(nnx.Module):
    """A parameter-free placeholder so that ``nnx.List`` indices match ``nn.Sequential`` indices."""

    def __init__(self, fn: Callable[[Array], Array]):
        self.fn = fn

    def __call__(self, x: Array) -> Array:
        return self.fn(x)


def GELU() -> Activation:  # noqa: N802 - mirrors torch.nn.GELU
    return Activation(gelu)


def ReLU() -> Activation:  # noqa: N802 - mirrors torch.nn.ReLU
    return Activation(relu)


class Linear(nnx.Linear):
    """``torch.nn.Linear``: kernel is (in, out) = ``weight.T``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=bias, rngs=rngs)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv2d(nnx.Conv):
    """``torch.nn.Conv2d`` on NHWC input: kernel is HWIO = ``weight.transpose(2, 3, 1, 0)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        *,
        groups: int = 1,
        bias: bool = True,
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=_pair(kernel_size),
            strides=_pair(stride),
            padding=((ph, ph), (pw, pw)),
            feature_group_count=groups,
            use_bias=bias,
            rngs=rngs,
        )
        self.depthwise = groups == in_channels == out_channels and groups > 1 and _pair(stride) == (1, 1)
        self.pointwise = _pair(kernel_size) == (1, 1) and _pair(stride) == (1, 1) and (ph, pw) == (0, 0) and \
            groups == 1

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...]
        if self.depthwise:
            return depthwise_conv2d(x, self.kernel[...], bias, self.padding)
        if self.pointwise:
            # A 1x1 conv is a matmul over channels; XLA:CPU's convolution runs it ~3x slower than its GEMM rate
            # (SAM 2's conv_s0 at 512 px took 7.2 ms through it, one core: 37 GFLOP/s).
            y = jnp.einsum("...c,co->...o", x, self.kernel[...][0, 0])
            return y if bias is None else y + bias
        return super().__call__(x)


def depthwise_conv2d(x: Array, kernel: Array, bias: Array | None, padding) -> Array:
    """Stride-1 depthwise conv on NHWC ``x`` with an HWIO kernel (kh, kw, 1, C), as kh * kw shifted
    multiply-adds over the padded input.

    XLA's CPU grouped convolution runs the 7x7 depthwise conv of SAM 2's ConvNeXt blocks ~15x slower than
    this (18.7 ms -> 1.2 ms on (1, 32, 32, 256)); the result is the same sum in another order (bit-equal on
    that shape). On GPU/TPU both lower to fused elementwise code.
    """
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    h = xp.shape[1] - kh + 1
    w = xp.shape[2] - kw + 1
    out = None
    for dy in range(kh):
        for dx in range(kw):
            term = xp[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0]
            out = term if out is None else out + term
    return out if bias is None else out + bias


class ConvTranspose2d(nnx.ConvTranspose):
    """``torch.nn.ConvTranspose2d`` with ``kernel_size == stride`` and no padding (all SAM 2 uses).

    The kernel is ``weight.transpose(2, 3, 1, 0)`` with ``transpose_kernel=True``; without that flag the
    kernel would need a spatial flip (a 2x2 kernel read unflipped differs from PyTorch by O(1)).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *, rngs: nnx.Rngs):
        if kernel_size != stride:
            raise ValueError("ConvTranspose2d only supports kernel_size == stride (no overlap), as in SAM 2")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=_pair(kernel_size),
            strides=_pair(stride),
            padding="VALID",
            transpose_kernel=True,
            rngs=rngs,
        )


class LayerNorm(nnx.LayerNorm):
    """``torch.nn.LayerNorm`` over the last axis (also ``LayerNorm2d`` on NHWC maps).

    PyTorch's default epsilon is 1e-5; SAM 2's Hiera norms and every ``LayerNorm2d`` use 1e-6, so the
    epsilon is always passed explicitly by the caller.
    """

    def __init__(self, num_features: int, *, eps: float, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=eps, use_fast_variance=False, rngs=rngs)


def LayerNorm2d(num_channels: int, *, eps: float = 1e-6, rngs: nnx.Rngs) -> LayerNorm:  # noqa: N802
    """SAM 2's ``LayerNorm2d`` (channel norm of an NCHW map) = a last-axis LayerNorm on NHWC."""
    return LayerNorm(num_channels, eps=eps, rngs=rngs)


class Embedding(nnx.Embed):
    """``torch.nn.Embedding``: the table is stored as is, shape (num_embeddings, dim)."""

    def __init__(self, num_embeddings: int, dim: int, *, rngs: nnx.Rngs):
        super().__init__(num_embeddings, dim, rngs=rngs)

    @property
    def weight(self) -> Array:
        return self.embedding[...]


class MLP(nnx.Module):
    """``sam2.modeling.sam2_utils.MLP``: ``num_layers`` linears, activation between them.

    ``layers`` is an ``nnx.List`` so that the parameter paths equal PyTorch's ``layers.{i}``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        activation: Callable[[Array], Array] = relu,
        sigmoid_output: bool = False,
        rngs: nnx.Rngs,
    ):
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nnx.List([Linear(i, o, rngs=rngs) for i, o in zip(dims_in, dims_out)])
        self.activation = activation
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: Array) -> Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.activation(x)
        if self.sigmoid_output:
            x = jax.nn.sigmoid(x)
        return x


def run_sequential(layers: nnx.List, x: Array) -> Array:
    """Apply an ``nnx.List`` that mirrors a PyTorch ``nn.Sequential`` (activations as placeholders)."""
    for layer in layers:
        if layer is not None:
            x = layer(x)
    return x


# On CPU, attention whose score matrix is larger than this many elements runs over blocks of queries.
CPU_SCORE_BLOCK = 1 << 22


def query_block(batch: int, heads: int, nq: int, nk: int) -> int:
    """Queries per block for :func:`attention` (static): ``nq`` (one block) except on CPU when the scores
    exceed ``CPU_SCORE_BLOCK`` elements, then the largest divisor of ``nq`` in [64, 256].

    Blocks of 256 queries keep the scores, their exponentials and the weighted sum of one block in cache
    and reuse one buffer per loop step; measured on the 2-core CPU, memory cross-attention at 512 px
    (1024 queries x 7232 keys) takes 28 ms instead of 48, and at 1024 px (4096 x 28736) 490 ms instead of
    725. On GPU/TPU one block is faster (the blocks would run one after the other).
    """
    if jax.default_backend() != "cpu" or batch * heads * nq * nk <= CPU_SCORE_BLOCK:
        return nq
    for bq in range(min(256, nq), 63, -1):
        if nq % bq == 0:
            return bq
    return nq


def attention(q: Array, k: Array, v: Array, *, key_mask: Array | None = None, block: int | None = None) -> Array:
    """Scaled dot-product attention on (B, N, heads, head_dim) inputs, as ``F.scaled_dot_product_attention``.

    ``q``, ``k``: (B, Nq, H, D), (B, Nk, H, D); ``v``: (B, Nk, H, Dv) (Dv may differ from D) -> (B, Nq, H, Dv).

    Heads are moved next to the batch so that both products are plain batched matmuls, and the softmax
    normalisation is applied after the value product (one pass fewer over the (Nq, Nk) scores; PyTorch's
    fused CPU kernel does the same). Equal to softmax-then-matmul up to float32 rounding (<= 7e-7 measured),
    and 20-40 % faster on CPU than ``jax.nn.dot_product_attention``. Large score matrices are computed
    ``block`` queries at a time (default :func:`query_block`; the result does not depend on it).

    ``key_mask`` (B, Nk) bool: False keys are excluded; a row with no True key averages all values
    uniformly (callers that can meet that case zero it). It is only used to hide *extra* padding that the
    PyTorch reference never sees; SAM 2's own zero-padding (Hiera windows) and its single padding point
    take part in attention exactly as in PyTorch and must not be masked.
    """
    b, nq, h, _ = q.shape
    block = query_block(b, h, nq, k.shape[1]) if block is None else block
    if nq % block:
        raise ValueError(f"attention: block={block} must divide the {nq} queries")
    scale = np.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, H, Nk, D)

    def one_block(qb: Array) -> Array:  # (B, H, bq, D) -> (B, H, bq, Dv)
        s = jnp.einsum("bhqd,bhkd->bhqk", qb, kh)
        if key_mask is not None:
            s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
        return jnp.einsum("bhqk,bhkd->bhqd", e, vh) / e.sum(axis=-1)[..., None]

    qh = jnp.swapaxes(q * scale, 1, 2)  # (B, H, Nq, D)
    if block == nq:
        o = one_block(qh)
    else:
        qb = jnp.moveaxis(qh.reshape(b, h, nq // block, block, -1), 2, 0)  # (n_blocks, B, H, bq, D)
        o = jax.lax.map(one_block, qb)
        o = jnp.moveaxis(o, 0, 2).reshape(b, h, nq, -1)
    return jnp.swapaxes(o, 1, 2)
