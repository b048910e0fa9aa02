"""Building blocks shared by every SAM 2 module.

Each class here is a thin subclass of a Flax NNX layer that takes the *PyTorch* constructor arguments
(so a module reads like the PyTorch module it ports) and fixes the numeric settings that matter for
parity with PyTorch:

* convolutions use explicit symmetric padding (``"SAME"`` is asymmetric for stride > 1);
* layer norms use the two-pass variance (``use_fast_variance=False``) and an explicit epsilon;
* GELU is the exact erf form (PyTorch's default), not Flax's tanh approximation;
* the 2x2/stride-2 transposed convolution uses ``transpose_kernel=True`` so that the kernel is the
  PyTorch kernel transposed, without a spatial flip.

The weight converter (:mod:`medsam2_jax.interop.weights`) dispatches on these classes: every parameterised leaf
module of the model must be one of them (or hold a raw :class:`nnx.Param` / :class:`Buffer`), which is what
makes the PyTorch <-> Flax key map a short table instead of a per-module list.

Layout convention: images and feature maps are NHWC, token sequences are (B, N, C).
"""

from __future__ import annotations

import os
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


def as_compute(x: Array, kernel: Array) -> Array:
    """``x`` in the dtype of the layer's ``kernel``: the kernel's dtype is the layer's compute dtype.

    A float32 model promotes as before (a bfloat16 input to a float32 layer computes in float32); a model whose
    parameters were cast to bfloat16 (:func:`medsam2_jax.tracking.cast_model`) computes its matmuls and
    convolutions in bfloat16 whatever reaches them (float32 position encodings, RoPE, memories), instead of
    promoting back to float32. XLA accumulates bfloat16 dots and convolutions in float32 on GPU/TPU and
    rounds each output once.
    """
    return x if x.dtype == kernel.dtype else x.astype(kernel.dtype)


class Linear(nnx.Linear):
    """``torch.nn.Linear``: kernel is (in, out) = ``weight.T``. Computes in the kernel's dtype
    (:func:`as_compute`)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=bias, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return super().__call__(as_compute(x, self.kernel[...]))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv2d(nnx.Conv):
    """``torch.nn.Conv2d`` on NHWC input: kernel is HWIO = ``weight.transpose(2, 3, 1, 0)``. Computes in the
    kernel's dtype (:func:`as_compute`)."""

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
        x = as_compute(x, self.kernel[...])
        bias = None if self.bias is None else self.bias[...]
        if self.depthwise:
            return depthwise_conv2d(x, self.kernel[...], bias, self.padding)
        if self.pointwise:
            # A 1x1 conv is a matmul over channels; XLA:CPU's convolution runs it ~3x slower than its GEMM rate
            # (SAM 2's conv_s0 at 512 px took 7.2 ms through it, one core: 37 GFLOP/s).
            y = jnp.einsum("...c,co->...o", x, self.kernel[...][0, 0])
            return y if bias is None else y + bias
        if self.feature_group_count == 1:
            y = im2col_conv2d(x, self.kernel[...], self.strides, self.padding)
            return y if bias is None else y + bias
        return super().__call__(x)


def im2col_conv2d(x: Array, kernel: Array, strides: Sequence[int], padding) -> Array:
    """Dense conv on NHWC ``x`` with an HWIO kernel as one matmul: the kh * kw strided views of the padded
    input side by side on the channel axis (``im2col``), times the kernel read as (kh * kw * C_in, C_out).

    SAM 2's strided convs (the memory encoder's 3x3 stride-2 mask downsampler, the 2x2 / 4x4 stride-2 / 4
    mask-input downscalers) have few channels, where XLA:CPU's convolution runs at a few GFLOP/s and its
    kernel gradient is a dilated convolution slower still (3x3x64x256 at 256 px: ~25 ms per call in the
    training step); as a matmul both gradients are matmuls too. Same sum, other order (float32 rounding).
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (xp.shape[1] - kh) // sh + 1
    ow = (xp.shape[2] - kw) // sw + 1
    if (kh, kw) == (sh, sw) and xp.shape[1] == oh * sh and xp.shape[2] == ow * sw:
        # Non-overlapping patches (kernel == stride): a reshape (space-to-depth) gathers them.
        cols = xp.reshape(xp.shape[0], oh, kh, ow, kw, cin).transpose(0, 1, 3, 2, 4, 5)
        cols = cols.reshape(xp.shape[0], oh, ow, kh * kw * cin)
    else:
        cols = jnp.concatenate(
            [xp[:, dy : dy + sh * (oh - 1) + 1 : sh, dx : dx + sw * (ow - 1) + 1 : sw] for dy in range(kh)
             for dx in range(kw)], axis=-1)  # (B, oh, ow, [dy, dx, c])
    return jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * cin, cout))


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

    def __call__(self, x: Array) -> Array:
        """As a matmul and a reshape (depth-to-space): the stride-s patches do not overlap, so output pixel
        (s*i + a, s*j + c) is ``x[i, j] @ weight[:, :, a, c]``. XLA:CPU's transposed convolution and its kernel
        gradient (a dilated convolution) run at a few GFLOP/s; this is one matmul each way."""
        kernel = self.kernel[...]  # (s, s, out, in) = torch (in, out, s, s).transpose(2, 3, 1, 0)
        x = as_compute(x, kernel)
        b, h, w, _ = x.shape
        s, _, cout, _ = kernel.shape
        y = jnp.einsum("bhwi,acoi->bhawco", x, kernel).reshape(b, h * s, w * s, cout)
        return y + self.bias[...]


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
        if self.sigmoid_output:  # in float32 (also for a bfloat16 model)
            x = jax.nn.sigmoid(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
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


# Attention implementations (:func:`attention`): "einsum" (this module's two batched matmuls), "xla"
# (``jax.nn.dot_product_attention(implementation="xla")``), "cudnn" (its cuDNN flash-attention kernel) and
# "auto" (the default): einsum on CPU; on GPU cudnn for bfloat16/float16 inputs whose shapes cuDNN accepts
# (checked when traced; otherwise xla: on an H200 with JAX 0.10 cuDNN rejected the (B, 1, 1, Nk) key mask, so
# masked calls go through xla) and xla for float32; xla on TPU. The environment variable
# ``MEDSAM2_ATTENTION`` sets it for the process (read when a function is traced), the ``impl`` argument per call.
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
ATTENTION_ENV = "MEDSAM2_ATTENTION"


def attention_impl(impl: str | None = None) -> str:
    """The attention implementation asked for: ``impl``, else ``$MEDSAM2_ATTENTION``, else ``"auto"``."""
    impl = impl or os.environ.get(ATTENTION_ENV, "") or "auto"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r} "
                         f"(argument or ${ATTENTION_ENV})")
    return impl


def uses_fused_attention(impl: str | None = None) -> bool:
    """Whether :func:`attention` goes through ``jax.nn.dot_product_attention`` for ``impl`` on the default
    backend (for callers whose value width differs from the key width, which that function does not accept)."""
    impl = attention_impl(impl)
    return impl in ("xla", "cudnn") or (impl == "auto" and jax.default_backend() != "cpu")


def attention(q: Array, k: Array, v: Array, *, key_mask: Array | None = None, block: int | None = None,
              impl: str | None = None) -> Array:
    """Scaled dot-product attention on (B, N, heads, head_dim) inputs, as ``F.scaled_dot_product_attention``.

    ``q``, ``k``: (B, Nq, H, D), (B, Nk, H, D); ``v``: (B, Nk, H, Dv) (Dv may differ from D; through
    ``jax.nn.dot_product_attention`` the narrower side is zero-padded) -> (B, Nq, H, Dv), in ``v``'s dtype. ``impl``: see :data:`ATTENTION_IMPLS` (default
    ``$MEDSAM2_ATTENTION`` or "auto": einsum on CPU, ``jax.nn.dot_product_attention`` on GPU/TPU).

    Einsum path: heads are moved next to the batch so that both products are plain batched matmuls, and the
    softmax normalisation is applied after the value product (one pass fewer over the (Nq, Nk) scores;
    PyTorch's fused CPU kernel does the same). Equal to softmax-then-matmul up to float32 rounding (<= 7e-7
    measured), and 20-40 % faster on CPU than ``jax.nn.dot_product_attention``. Large score matrices are
    computed ``block`` queries at a time (default :func:`query_block`; the result does not depend on it).
    With bfloat16 inputs the scores are accumulated and exponentiated in float32, the value product takes
    the bfloat16-rounded exponentials with float32 accumulation, and the normalisation is in float32 (as
    ``jax.nn.dot_product_attention`` does: softmax in float32, probabilities rounded to the input dtype).

    ``key_mask`` (B, Nk) bool: False keys are excluded; a row with no True key averages all values
    uniformly (callers that can meet that case zero it). It is only used to hide *extra* padding that the
    PyTorch reference never sees; SAM 2's own zero-padding (Hiera windows) and its single padding point
    take part in attention exactly as in PyTorch and must not be masked.
    """
    impl = attention_impl(impl)
    b, nq, h, _ = q.shape
    if block is not None and nq % block:
        raise ValueError(f"attention: block={block} must divide the {nq} queries")
    if uses_fused_attention(impl):  # (one call: the fused implementations have no query blocks)
        return _fused_attention(q, k, v, key_mask, impl)
    block = query_block(b, h, nq, k.shape[1]) if block is None else block
    dtype = jnp.result_type(q.dtype, k.dtype)
    acc = jnp.promote_types(dtype, jnp.float32)  # scores, exponentials' sums and products accumulate here
    scale = np.asarray(1.0 / np.sqrt(q.shape[-1]), acc)
    kh, vh = jnp.swapaxes(k.astype(dtype), 1, 2), jnp.swapaxes(v, 1, 2)  # (B, H, Nk, D)

    def one_block(qb: Array) -> Array:  # (B, H, bq, D) -> (B, H, bq, Dv)
        s = jnp.einsum("bhqd,bhkd->bhqk", qb, kh, preferred_element_type=acc)
        if key_mask is not None:
            s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
        o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(vh.dtype), vh, preferred_element_type=acc)
        return (o / e.sum(axis=-1)[..., None]).astype(v.dtype)

    qh = jnp.swapaxes((q.astype(acc) * scale).astype(dtype), 1, 2)  # (B, H, Nq, D)
    if block == nq:
        o = one_block(qh)
    else:
        qb = jnp.moveaxis(qh.reshape(b, h, nq // block, block, -1), 2, 0)  # (n_blocks, B, H, bq, D)
        o = jax.lax.map(one_block, qb)
        o = jnp.moveaxis(o, 0, 2).reshape(b, h, nq, -1)
    return jnp.swapaxes(o, 1, 2)


def _fused_attention(q: Array, k: Array, v: Array, key_mask: Array | None, impl: str) -> Array:
    """:func:`attention` through ``jax.nn.dot_product_attention`` (all inputs in ``v``'s dtype)."""
    dtype = v.dtype
    q, k = q.astype(dtype), k.astype(dtype)
    d, dv = q.shape[-1], v.shape[-1]
    scale = float(1.0 / np.sqrt(d))
    if dv != d:
        # That function needs values as wide as the keys: zero-pad the narrower side (exact; the scale stays
        # 1/sqrt(D)) and drop the padding from the output.
        pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, n - x.shape[-1])))  # noqa: E731
        if dv < d:
            return _fused_attention_padded(q, k, pad(v, d), key_mask, impl, scale)[..., :dv]
        q, k = pad(q, dv), pad(k, dv)
    return _fused_attention_padded(q, k, v, key_mask, impl, scale)


def _fused_attention_padded(q: Array, k: Array, v: Array, key_mask: Array | None, impl: str, scale: float
                            ) -> Array:
    dtype = v.dtype
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk): broadcast to (B, H, Nq, Nk)
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "xla"
        if impl == "cudnn":
            try:  # cuDNN's shape and dtype checks run here, at trace time
                return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError):
                impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
