"""Computing in bfloat16: :func:`cast_model` (parameters of chosen submodules) and :func:`compute_model`."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.sam2 import SAM2


# Submodules whose parameters ``cast_model``'s default casts: the image encoder alone, where most FLOPs are
# (the rest then computes in float32 on the encoder's bfloat16 features). ``WHOLE_MODEL`` (``None``) casts every
# submodule: see :func:`cast_model` for what then stays float32.
BF16_MODULES = ("image_encoder",)
WHOLE_MODEL = None
# Scopes of :func:`compute_model` (and of the ``compute_scope`` field of the training/eval configs).
COMPUTE_SCOPES = {"model": WHOLE_MODEL, "image_encoder": BF16_MODULES}


def cast_model(model: SAM2, dtype: Any, modules: Sequence[str] | None = BF16_MODULES) -> SAM2:
    """A copy of ``model`` whose floating-point parameters (``nnx.Param``) in the top-level submodules
    ``modules`` (all of them with ``None`` = :data:`WHOLE_MODEL`) are ``dtype``, e.g. ``jnp.bfloat16``.

    Every linear map and convolution computes in its kernel's dtype (``model.common.as_compute``: inputs are
    cast to it), so with ``jnp.bfloat16`` the matmuls and convolutions of the cast submodules run in bfloat16
    (XLA accumulates them in float32 on GPU/TPU). What stays float32 whatever the cast: constant buffers
    (the prompt encoder's random-Fourier matrix) and position encodings / RoPE tables, LayerNorm statistics
    and normalisation (Flax computes them in float32), attention scores, softmax and the normalisation of
    the weighted sum (``common.attention``), the FPN's top-down sums (as SAM 2), sigmoids, the decoder's
    outputs (mask logits accumulated in float32, IoU, object scores), the memories and pointers the tracker
    stores, the memory bank's statistics (descriptors, similarity, confidence, dissimilarity) and the loss.

    Frames may be given in float32 or ``dtype`` (the patch embedding casts them). With the default
    ``modules`` only the image encoder computes in ``dtype`` (see :data:`BF16_MODULES`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    names = None if modules is None else tuple(modules)

    def cast(path, a):
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        if names is not None and top not in names:
            return a
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, params), rest)


def compute_model(model: SAM2, compute_dtype: Any = "float32", scope: str = "model") -> SAM2:
    """``model`` set up to compute in ``compute_dtype`` ("float32"/"bfloat16" or a dtype): itself for
    float32, else :func:`cast_model` over ``scope``: "model" (every submodule, :data:`WHOLE_MODEL`) or
    "image_encoder" (:data:`BF16_MODULES`). Used by training (inside the step: the float32 parameters stay
    the master copy and the gradients flow back through the cast) and by ``eval.py``."""
    dtype = jnp.dtype(compute_dtype)
    if scope not in COMPUTE_SCOPES:
        raise ValueError(f"compute scope must be one of {sorted(COMPUTE_SCOPES)}, got {scope!r}")
    if dtype == jnp.float32:
        return model
    return cast_model(model, dtype, COMPUTE_SCOPES[scope])
