"""SAM 2's two-way transformer (``sam2/modeling/sam/transformer.py``) in Flax NNX.

Attribute names mirror the PyTorch modules so that :mod:`medsam2_jax.interop.weights` maps checkpoint keys
one to one (``layers.{i}.self_attn.q_proj.weight`` ...).

Layout: token sequences are (B, N, C); the image embedding enters as an NHWC map and leaves as the
(B, h*w, C) key sequence, row-major over (h, w) exactly like PyTorch's ``flatten(2).permute(0, 2, 1)``.

Static prompt padding. Prompts are padded to a static count, so the token sequence can hold tokens that
the PyTorch reference never sees. ``token_mask`` (B, N_tokens) bool marks the tokens that take part:
a False token is removed as a *key* from the token self-attention and from the image-to-token attention
(the only two places where tokens are keys). Nothing else mixes tokens, so the real tokens and the image
keys are exactly what PyTorch computes on the unpadded sequence. A masked token is still updated as a
query (its row is garbage); callers must only read the rows of real tokens (the mask decoder reads the
object-score, IoU and mask tokens, which are always real).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .common import MLP, LayerNorm, Linear, attention, relu

Array = jax.Array


def _check_key_mask(key_mask: Array | None, k: Array) -> None:
    if key_mask is None:
        return
    want = (k.shape[0], k.shape[1])
    if tuple(key_mask.shape) != want:
        raise ValueError(f"key_mask must have shape (B, N_keys) = {want}, got {tuple(key_mask.shape)}")


class Attention(nnx.Module):
    """SAM 2's ``Attention``: projections to an ``embedding_dim // downsample_rate`` space, multi-head
    scaled dot-product attention, output projection back to ``embedding_dim``.

    ``kv_in_dim`` is the channel count of keys/values when it differs from the queries' (memory
    attention: 64-channel memories). Subclasses (RoPE attention) reuse :meth:`_separate_heads`,
    :meth:`_recombine_heads` and :meth:`_attend`, which work on the (B, N, heads, head_dim) layout.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if downsample_rate < 1 or embedding_dim % downsample_rate:
            raise ValueError(
                f"downsample_rate must be a positive divisor of embedding_dim={embedding_dim}, got {downsample_rate}"
            )
        if self.internal_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the internal dim embedding_dim // downsample_rate = "
                f"{self.internal_dim}"
            )
        self.q_proj = Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.k_proj = Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.v_proj = Linear(self.kv_in_dim, self.internal_dim, rngs=rngs)
        self.out_proj = Linear(self.internal_dim, embedding_dim, rngs=rngs)

    def _separate_heads(self, x: Array) -> Array:
        """(B, N, C) -> (B, N, heads, C // heads); PyTorch's head split (it then transposes to B, h, N, d)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads)

    def _recombine_heads(self, x: Array) -> Array:
        """(B, N, heads, d) -> (B, N, heads * d)."""
        b, n, h, d = x.shape
        return x.reshape(b, n, h * d)

    def _attend(self, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
        """Scaled dot-product attention on (B, N, heads, d); ``key_mask`` (B, Nk) bool, False = excluded."""
        return attention(q, k, v, key_mask=key_mask)

    def __call__(self, q: Array, k: Array, v: Array, key_mask: Array | None = None) -> Array:
        """q (B, Nq, embedding_dim), k and v (B, Nk, kv_in_dim) -> (B, Nq, embedding_dim)."""
        _check_key_mask(key_mask, k)
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        out = self._attend(q, k, v, key_mask)
        return self.out_proj(self._recombine_heads(out))


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token-to-image attention, MLP, image-to-token attention (post-norm)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.self_attn = Attention(embedding_dim, num_heads, rngs=rngs)
        self.norm1 = LayerNorm(embedding_dim, eps=1e-5, rngs=rngs)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm2 = LayerNorm(embedding_dim, eps=1e-5, rngs=rngs)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 2, activation=relu, rngs=rngs)
        self.norm3 = LayerNorm(embedding_dim, eps=1e-5, rngs=rngs)
        self.norm4 = LayerNorm(embedding_dim, eps=1e-5, rngs=rngs)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self,
        queries: Array,
        keys: Array,
        query_pe: Array,
        key_pe: Array,
        token_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        # Token self-attention (padded tokens are masked as keys). The first layer has no PE and no residual.
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, key_mask=token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, key_mask=token_mask)
        queries = self.norm1(queries)

        # Tokens attend to the image.
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        # The image attends to the tokens (padded tokens are masked as keys).
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, key_mask=token_mask))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """``depth`` two-way blocks then a final token-to-image attention and LayerNorm."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
    ):
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    embedding_dim,
                    num_heads,
                    mlp_dim=mlp_dim,
                    attention_downsample_rate=attention_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate, rngs=rngs
        )
        self.norm_final_attn = LayerNorm(embedding_dim, eps=1e-5, rngs=rngs)

    def __call__(
        self,
        image_embedding: Array,
        image_pe: Array,
        point_embedding: Array,
        token_mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """Run the transformer.

        Args:
          image_embedding: (B, h, w, C) NHWC.
          image_pe: (h, w, C), (1, h, w, C) or (B, h, w, C).
          point_embedding: (B, N_tokens, C), also the tokens' positional encoding (as in SAM 2).
          token_mask: (B, N_tokens) bool or None (all tokens take part); see the module docstring.

        Returns:
          queries (B, N_tokens, C) (rows of masked tokens are meaningless) and keys (B, h*w, C).
        """
        if image_embedding.ndim != 4 or image_embedding.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"image_embedding must be (B, h, w, {self.embedding_dim}) NHWC, got {tuple(image_embedding.shape)}"
            )
        b, h, w, c = image_embedding.shape
        if image_pe.ndim == 3:
            image_pe = image_pe[None]
        if image_pe.ndim != 4 or tuple(image_pe.shape[1:]) != (h, w, c) or image_pe.shape[0] not in (1, b):
            raise ValueError(
                f"image_pe must be (h, w, C) or (1 or B, h, w, C) = {(h, w, c)} matching image_embedding, "
                f"got {tuple(image_pe.shape)}"
            )
        if point_embedding.ndim != 3 or point_embedding.shape[0] != b or point_embedding.shape[-1] != c:
            raise ValueError(
                f"point_embedding must be (B={b}, N_tokens, C={c}), got {tuple(point_embedding.shape)}"
            )
        if token_mask is not None and tuple(token_mask.shape) != tuple(point_embedding.shape[:2]):
            raise ValueError(
                f"token_mask must be (B, N_tokens) = {tuple(point_embedding.shape[:2])}, got {tuple(token_mask.shape)}"
            )

        keys = image_embedding.reshape(b, h * w, c)
        key_pe = jnp.broadcast_to(image_pe.reshape(image_pe.shape[0], h * w, c), (b, h * w, c))
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask)

        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
