"""SAM 2's memory attention (``sam2/modeling/memory_attention.py``), for a fixed-size memory bank.

The current frame's tokens attend to themselves (RoPE self-attention), then to the memory (RoPE
cross-attention), then go through an MLP; four such layers and a final LayerNorm. The memory is

    [n frames x N spatial memory tokens (mem_dim = 64)] ++ [num_obj_ptr_tokens object-pointer tokens]

where every frame has the query's grid, so its keys are rotated with the *same* RoPE table as the queries
(PyTorch's ``rope_k_repeat``), and pointer tokens are not rotated.

Differences from PyTorch, all at the interface:

* tensors are batch-first, ``(B, tokens, C)`` (PyTorch's ``MemoryAttention`` takes sequence-first);
* ``memory_mask`` (B, M) marks valid memory tokens. A fixed-size bank holds ``n_slots`` frames and
  ``P`` pointer tokens whatever its fill; invalid slots are masked out of the attention (and zeroed on
  entry, so stale or NaN contents cannot leak into outputs or gradients). The result equals PyTorch run on
  the memory truncated to its valid tokens, because attention is invariant to the order of keys and each
  frame's RoPE depends only on the position inside the frame;
* if *every* memory token of a batch element is masked, its cross-attention reads nothing: the attended
  value is 0, so the block adds only ``out_proj``'s bias. The output is finite and independent of the
  memory's contents (SAM 2 itself never runs memory attention without memory: it adds ``no_mem_embed``
  instead, which is the tracker's job);
* dropout (0.1 in the training config) runs only with ``deterministic=False`` and an ``rngs`` with a
  ``dropout`` stream, on the same four places as PyTorch plus the attention weights.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import LayerNorm, Linear, as_compute, attention, relu, uses_fused_attention
from .rope import apply_rope, apply_rope_keys, axial_rope_tables, grid_for_tokens

Array = jax.Array


def _check_rngs(deterministic: bool, rngs: nnx.Rngs | None, where: str) -> None:
    if not deterministic and rngs is None:
        raise ValueError(
            f"{where}: deterministic=False needs rngs (an nnx.Rngs with a 'dropout' stream) for dropout, "
            "got rngs=None"
        )


def _dropout(x: Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    """Inverted dropout (as ``torch.nn.Dropout``); identity when deterministic or rate == 0."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


class RoPEAttention(nnx.Module):
    """``sam2.modeling.sam.transformer.RoPEAttention``: attention with axial 2-D RoPE on q and k.

    Parameters mirror PyTorch: ``q_proj`` (embedding_dim -> internal_dim), ``k_proj``/``v_proj``
    (kv_in_dim -> internal_dim), ``out_proj`` (internal_dim -> embedding_dim).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        *,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: tuple[int, int] = (64, 64),
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"RoPEAttention: num_heads={num_heads} must divide internal_dim={self.internal_dim} "
                f"(embedding_dim={embedding_dim} // downsample_rate={downsample_rate})"
            )
        self.q_proj = Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.k_proj = Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.v_proj = Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.out_proj = Linear(self.internal_dim, embedding_dim, rngs=rngs)
        self.dropout_p = float(dropout)
        self.rope_theta = float(rope_theta)
        self.rope_k_repeat = bool(rope_k_repeat)
        self.feat_sizes = (int(feat_sizes[0]), int(feat_sizes[1]))

    def rope_tables(self, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
        """The (cos, sin) tables for ``num_queries`` query tokens, each (Nq, head_dim // 2)."""
        end_x, end_y = grid_for_tokens(num_queries, self.feat_sizes)
        return axial_rope_tables(self.internal_dim // self.num_heads, end_x, end_y, self.rope_theta)

    def __call__(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        num_k_exclude_rope: int = 0,
        key_mask: Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """``q`` (B, Nq, embedding_dim), ``k``/``v`` (B, Nk, kv_in_dim) -> (B, Nq, embedding_dim).

        ``num_k_exclude_rope`` (static): the last keys, not rotated. ``key_mask`` (B, Nk) bool: False keys
        are excluded; a row with no True key yields a zero attended value (then ``out_proj``).
        """
        _check_rngs(deterministic, rngs, "RoPEAttention")
        b, nq, _ = q.shape
        nk = k.shape[1]
        if nq != nk and not self.rope_k_repeat:
            raise ValueError(
                f"RoPEAttention: q has {nq} tokens and k has {nk}; different lengths need rope_k_repeat=True"
            )
        hd = self.internal_dim // self.num_heads
        q = self.q_proj(q).reshape(b, nq, self.num_heads, hd)
        k = self.k_proj(k).reshape(b, nk, self.num_heads, hd)
        # Values are a linear map of the raw keys' inputs (no RoPE on values), and every attention row sums
        # to one, so softmax(QK^T) (X W + b) = (softmax(QK^T) X) W + b. When the inputs are narrower than a
        # head (memory: 64 channels, heads of 256), attending over X first and projecting after does the
        # (Nq x Nk) product on 64 channels instead of 256: 4x fewer FLOPs in the largest matmul of a
        # tracking step. Same result up to float32 rounding. jax.nn.dot_product_attention (the attention
        # implementation on GPU/TPU, see common.attention) needs values as wide as the keys: there the full
        # v_proj is applied first (4x the FLOPs of that product, inside the fused kernel).
        low_rank_v = self.kv_in_dim < hd and (not uses_fused_attention() or
                                              not (deterministic or self.dropout_p == 0.0))
        if low_rank_v:
            v = as_compute(v, self.v_proj.kernel[...])  # the projection's dtype, as v_proj(v) would compute in
            vx = jnp.broadcast_to(v[:, :, None, :], (b, nk, self.num_heads, self.kv_in_dim))
        else:
            vx = self.v_proj(v).reshape(b, nk, self.num_heads, hd)

        cos, sin = self.rope_tables(nq)
        q = apply_rope(q, cos, sin)
        k = apply_rope_keys(k, cos, sin, num_k_exclude_rope=num_k_exclude_rope, repeat=self.rope_k_repeat)

        if deterministic or self.dropout_p == 0.0:
            out = attention(q, k, vx, key_mask=key_mask)
            row_sum = None  # each row of the weights sums to one
        else:
            # Dropout on the attention weights (F.scaled_dot_product_attention's dropout_p): one einsum
            # pair over all keys, as the deterministic path but with the weights materialised.
            # Scores, softmax and dropout in float32 (also for bfloat16 inputs), the value product in vx's
            # dtype with float32 accumulation.
            acc = jnp.promote_types(q.dtype, jnp.float32)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype), preferred_element_type=acc)
            logits = logits / jnp.sqrt(jnp.asarray(hd, acc))
            if key_mask is not None:
                logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
            weights = jax.nn.softmax(logits, axis=-1)
            weights = _dropout(weights, self.dropout_p, deterministic, rngs)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(vx.dtype), vx,
                             preferred_element_type=acc).astype(vx.dtype)
            # (B, Nq, H, 1): dropout breaks the 1
            row_sum = jnp.swapaxes(weights.sum(-1), 1, 2)[..., None].astype(vx.dtype)
        if low_rank_v:
            w = self.v_proj.kernel[...].reshape(self.kv_in_dim, self.num_heads, hd)
            bias = self.v_proj.bias[...].reshape(self.num_heads, hd)
            out = jnp.einsum("bqhc,chd->bqhd", out, w)
            out = out + (bias if row_sum is None else row_sum * bias)
        if key_mask is not None:
            # A row whose keys are all masked would otherwise average masked values uniformly.
            any_valid = jnp.any(key_mask, axis=1)[:, None, None, None]
            out = jnp.where(any_valid, out, jnp.zeros((), out.dtype))
        return self.out_proj(out.reshape(b, nq, self.internal_dim))


class MemoryAttentionLayer(nnx.Module):
    """``MemoryAttentionLayer``: RoPE self-attention, RoPE cross-attention to memory, ReLU MLP (pre-norm).

    The defaults are SAM 2.1's: d_model 256, FFN 2048, dropout 0.1, one head, kv_in_dim 64, norms eps 1e-5,
    pos enc added to the cross-attention keys only.
    """

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        *,
        kv_in_dim: int = 64,
        num_heads: int = 1,
        rope_theta: float = 10000.0,
        feat_sizes: tuple[int, int] = (64, 64),
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_keys: bool = True,
        pos_enc_at_cross_attn_queries: bool = False,
        activation: Callable[[Array], Array] = relu,
        rngs: nnx.Rngs,
    ):
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.dropout_value = float(dropout)
        self.self_attn = RoPEAttention(
            d_model, num_heads, 1, dropout, rope_theta=rope_theta, feat_sizes=feat_sizes, rngs=rngs
        )
        self.cross_attn_image = RoPEAttention(
            d_model, num_heads, 1, dropout, kv_in_dim, rope_theta=rope_theta, rope_k_repeat=True,
            feat_sizes=feat_sizes, rngs=rngs,
        )
        self.linear1 = Linear(d_model, dim_feedforward, rngs=rngs)
        self.linear2 = Linear(dim_feedforward, d_model, rngs=rngs)
        # PyTorch's torch.nn.LayerNorm default eps (1e-5), not the 1e-6 of SAM 2's other norms.
        self.norm1 = LayerNorm(d_model, eps=1e-5, rngs=rngs)
        self.norm2 = LayerNorm(d_model, eps=1e-5, rngs=rngs)
        self.norm3 = LayerNorm(d_model, eps=1e-5, rngs=rngs)
        self.activation = activation
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def __call__(
        self,
        tgt: Array,
        memory: Array,
        pos: Array | None = None,
        query_pos: Array | None = None,
        *,
        num_k_exclude_rope: int = 0,
        memory_mask: Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """``tgt`` (B, N, d_model), ``memory``/``pos`` (B, M, kv_in_dim), ``query_pos`` (B, N, d_model)."""
        _check_rngs(deterministic, rngs, "MemoryAttentionLayer")
        p = self.dropout_value
        # Self-attention (q = k, v = the normed tokens; pos enc only with pos_enc_at_attn).
        tgt2 = self.norm1(tgt)
        qk = tgt2 + query_pos if self.pos_enc_at_attn else tgt2
        tgt2 = self.self_attn(qk, qk, tgt2, deterministic=deterministic, rngs=rngs)
        tgt = tgt + _dropout(tgt2, p, deterministic, rngs)
        # Cross-attention to the memory; keys get memory pos enc, pointer tokens are not rotated.
        tgt2 = self.norm2(tgt)
        tgt2 = self.cross_attn_image(
            tgt2 + query_pos if self.pos_enc_at_cross_attn_queries else tgt2,
            memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            memory,
            num_k_exclude_rope=num_k_exclude_rope,
            key_mask=memory_mask,
            deterministic=deterministic,
            rngs=rngs,
        )
        tgt = tgt + _dropout(tgt2, p, deterministic, rngs)
        # MLP.
        tgt2 = self.norm3(tgt)
        tgt2 = self.linear2(_dropout(self.activation(self.linear1(tgt2)), p, deterministic, rngs))
        return tgt + _dropout(tgt2, p, deterministic, rngs)


class MemoryAttention(nnx.Module):
    """``MemoryAttention``: ``num_layers`` :class:`MemoryAttentionLayer` (``layers.{i}``) and a final ``norm``.

    ``layer``, if given, is cloned ``num_layers`` times (PyTorch's ``get_clones``); otherwise each layer is
    a default :class:`MemoryAttentionLayer` of width ``d_model``, initialised independently.
    """

    def __init__(
        self,
        d_model: int = 256,
        pos_enc_at_input: bool = True,
        layer: MemoryAttentionLayer | None = None,
        num_layers: int = 4,
        *,
        rngs: nnx.Rngs,
    ):
        if layer is not None and layer.d_model != d_model:
            raise ValueError(f"MemoryAttention: layer.d_model={layer.d_model} differs from d_model={d_model}")
        self.d_model = d_model
        self.pos_enc_at_input = pos_enc_at_input
        self.num_layers = num_layers
        if layer is not None:
            self.layers = nnx.List([nnx.clone(layer) for _ in range(num_layers)])
        else:
            self.layers = nnx.List([MemoryAttentionLayer(d_model, rngs=rngs) for _ in range(num_layers)])
        self.norm = LayerNorm(d_model, eps=1e-5, rngs=rngs)

    def _check(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_mask) -> None:
        if curr.ndim != 3 or curr.shape[-1] != self.d_model:
            raise ValueError(f"MemoryAttention: curr must be (B, N, {self.d_model}), got shape {tuple(curr.shape)}")
        b, n, _ = curr.shape
        if curr_pos is not None and tuple(curr_pos.shape) != tuple(curr.shape):
            raise ValueError(
                f"MemoryAttention: curr_pos must have curr's shape {tuple(curr.shape)}, got {tuple(curr_pos.shape)}"
            )
        kv_dim = self.layers[0].cross_attn_image.kv_in_dim
        if memory.ndim != 3 or memory.shape[0] != b or memory.shape[-1] != kv_dim:
            raise ValueError(
                f"MemoryAttention: memory must be (B={b}, M, {kv_dim}), got shape {tuple(memory.shape)}"
            )
        m = memory.shape[1]
        if memory_pos is None or tuple(memory_pos.shape) != tuple(memory.shape):
            got = None if memory_pos is None else tuple(memory_pos.shape)
            raise ValueError(f"MemoryAttention: memory_pos must have memory's shape {tuple(memory.shape)}, got {got}")
        if not isinstance(num_obj_ptr_tokens, (int, np.integer)) or not 0 <= num_obj_ptr_tokens <= m:
            raise ValueError(
                f"MemoryAttention: num_obj_ptr_tokens must be a static int in [0, M={m}], got {num_obj_ptr_tokens!r}"
            )
        n_spatial = m - int(num_obj_ptr_tokens)
        if n_spatial % n:
            raise ValueError(
                f"MemoryAttention: the spatial memory (M={m} minus num_obj_ptr_tokens={num_obj_ptr_tokens} "
                f"= {n_spatial} tokens) must be whole frames of N={n} tokens (the query grid)"
            )
        if memory_mask is not None:
            if tuple(memory_mask.shape) != (b, m) or memory_mask.dtype != jnp.bool_:
                raise ValueError(
                    f"MemoryAttention: memory_mask must be bool (B, M) = {(b, m)}, got "
                    f"{memory_mask.dtype} {tuple(memory_mask.shape)}"
                )

    def __call__(
        self,
        curr: Array,
        curr_pos: Array | None,
        memory: Array,
        memory_pos: Array,
        num_obj_ptr_tokens: int = 0,
        memory_mask: Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """Condition the current frame's tokens on the memory.

        Args:
          curr: (B, N, d_model) current-frame tokens (N = h * w, row-major).
          curr_pos: (B, N, d_model) their position encoding (or None).
          memory: (B, M, kv_in_dim): ``n`` frames of N spatial memory tokens, then ``num_obj_ptr_tokens``
            pointer tokens.
          memory_pos: (B, M, kv_in_dim) the memory's position (spatial + temporal) encodings.
          num_obj_ptr_tokens: static count of trailing pointer tokens (not rotated by RoPE).
          memory_mask: (B, M) bool, False = invalid slot (masked out, contents ignored). None = all valid.
          deterministic: False enables dropout (needs ``rngs`` with a ``dropout`` stream).
        Returns:
          (B, N, d_model).
        """
        self._check(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_mask)
        _check_rngs(deterministic, rngs, "MemoryAttention")
        if memory_mask is not None:
            # Invalid slots may hold anything (stale memories, NaN): zero them so they reach neither the
            # output nor the gradients (the attention mask alone would still multiply 0 * NaN).
            memory = jnp.where(memory_mask[..., None], memory, jnp.zeros((), memory.dtype))
            memory_pos = jnp.where(memory_mask[..., None], memory_pos, jnp.zeros((), memory_pos.dtype))
        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        for layer in self.layers:
            output = layer(
                output,
                memory,
                pos=memory_pos,
                query_pos=curr_pos,
                num_k_exclude_rope=int(num_obj_ptr_tokens),
                memory_mask=memory_mask,
                deterministic=deterministic,
                rngs=rngs,
            )
        return self.norm(output)


def build_memory_attention(
    *,
    d_model: int = 256,
    num_layers: int = 4,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    kv_in_dim: int = 64,
    feat_sizes: tuple[int, int] = (64, 64),
    rngs: nnx.Rngs,
) -> MemoryAttention:
    """SAM 2 / 2.1's memory attention as its configs build it (the same for every model size).

    ``feat_sizes`` only seeds the RoPE grid; any square query grid works (as in PyTorch).
    """
    layer = MemoryAttentionLayer(
        d_model, dim_feedforward, dropout, kv_in_dim=kv_in_dim, feat_sizes=feat_sizes, rngs=rngs
    )
    return MemoryAttention(d_model, True, layer, num_layers, rngs=rngs)
