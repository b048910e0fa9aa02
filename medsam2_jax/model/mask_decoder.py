"""SAM 2's mask decoder (``sam2/modeling/sam/mask_decoder.py``) in Flax NNX.

Attribute names mirror PyTorch: ``transformer``, ``iou_token``, ``mask_tokens``, ``obj_score_token``,
``output_upscaling.{0: ConvTranspose2d, 1: LayerNorm2d, 2: GELU, 3: ConvTranspose2d, 4: GELU}``,
``conv_s0``, ``conv_s1`` (applied by the model to the FPN levels 0 and 1 in ``forward_image``, kept here so
checkpoint keys match), ``output_hypernetworks_mlps.{i}``, ``iou_prediction_head``, ``pred_obj_score_head``.

Layout: the image embedding, its PE, dense prompt embeddings and the high-resolution features are NHWC.
The predicted masks are returned as (B, M, 4h, 4w): one channel per mask, mask axis second, like PyTorch
(a stack of 2-D logit maps, not an NHWC image).

Padded prompts: ``sparse_mask`` (B, N_sparse) bool from the prompt encoder marks the sparse tokens that take
part in attention; the output tokens (object score, IoU, mask tokens) always do. Only the output tokens'
rows are read, so padded tokens never reach an output.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .common import MLP, Conv2d, ConvTranspose2d, Embedding, GELU, LayerNorm2d, Linear
from .transformer import TwoWayTransformer

Array = jax.Array


class MaskDecoder(nnx.Module):
    """Predicts mask logits, IoU scores, output tokens and the object score from image and prompt embeddings.

    ``transformer`` defaults to SAM 2's ``TwoWayTransformer(depth=2, embedding_dim=transformer_dim,
    num_heads=8, mlp_dim=2048, attention_downsample_rate=2)``.

    ``deterministic`` plays the role of PyTorch's ``not self.training`` for the dynamic multimask fallback
    (``nnx.Module.train()`` sets it False, ``eval()`` True); it is True after construction (eval mode).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
        rngs: nnx.Rngs,
    ):
        d = transformer_dim
        self.transformer_dim = d
        if transformer is None:  # SAM 2's (every size's) transformer
            transformer = TwoWayTransformer(2, d, 8, 2048, attention_downsample_rate=2, rngs=rngs)
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = Embedding(1, d, rngs=rngs)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = Embedding(self.num_mask_tokens, d, rngs=rngs)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = Embedding(1, d, rngs=rngs)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        self.output_upscaling = nnx.List(
            [
                ConvTranspose2d(d, d // 4, kernel_size=2, stride=2, rngs=rngs),
                LayerNorm2d(d // 4, rngs=rngs),
                GELU(),
                ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2, rngs=rngs),
                GELU(),
            ]
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = Conv2d(d, d // 8, kernel_size=1, stride=1, rngs=rngs)
            self.conv_s1 = Conv2d(d, d // 4, kernel_size=1, stride=1, rngs=rngs)

        self.output_hypernetworks_mlps = nnx.List(
            [MLP(d, d, d // 8, 3, rngs=rngs) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = MLP(
            d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid, rngs=rngs,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = MLP(d, d, 1, 3, rngs=rngs) if pred_obj_scores_mlp else Linear(d, 1, rngs=rngs)

        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh
        self.deterministic = True

    # ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse_prompt_embeddings: Array,
        sparse_mask: Array | None,
        dense_prompt_embeddings: Array,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Sequence[Array] | None = None,
    ) -> tuple[Array, Array, Array, Array]:
        """Predict masks.

        Args:
          image_embeddings: (B_img, h, w, C) NHWC.
          image_pe: (h, w, C) or (1, h, w, C) (``PromptEncoder.get_dense_pe()``).
          sparse_prompt_embeddings: (B, N_sparse, C).
          sparse_mask: (B, N_sparse) bool or None (every sparse token takes part).
          dense_prompt_embeddings: (B, h, w, C).
          multimask_output: static; three masks (tokens 1..3) instead of one.
          repeat_image: static; repeat each image embedding B times along the batch (PyTorch's
            ``repeat_interleave``), for one image with several prompts.
          high_res_features: ``[feat_s0 (B, 4h, 4w, C/8), feat_s1 (B, 2h, 2w, C/4)]`` (already through
            ``conv_s0`` / ``conv_s1``), required iff ``use_high_res_features``.

        Returns:
          masks (B, M, 4h, 4w) low-resolution mask logits (M = 3 or 1), iou_pred (B, M),
          sam_tokens_out (B, 3 or 1, C), object_score_logits (B, 1).
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, sparse_mask, dense_prompt_embeddings,
            repeat_image, high_res_features,
        )
        if multimask_output:
            masks = masks[:, 1:]
            iou_pred = iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and self.deterministic:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks = masks[:, 0:1]
            iou_pred = iou_pred[:, 0:1]

        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # The single-mask token is the object-memory token, even in multimask mode (as SAM 2).
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_all(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse_prompt_embeddings: Array,
        sparse_mask: Array | None,
        dense_prompt_embeddings: Array,
        high_res_features: Sequence[Array] | None = None,
    ) -> tuple[Array, Array, Array, Array]:
        """Every mask token's output, no selection (``repeat_image=False``): masks (B, 4, 4h, 4w), iou (B, 4),
        mask tokens (B, 4, C), object_score_logits (B, 1). Index 0 is the single-mask output, 1..3 the
        multimask outputs, so a caller can choose between them as data inside jit."""
        return self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, sparse_mask, dense_prompt_embeddings,
            False, high_res_features,
        )

    def _check_inputs(self, image_embeddings, sparse, sparse_mask, dense, repeat_image, high_res_features):
        d = self.transformer_dim
        if image_embeddings.ndim != 4 or image_embeddings.shape[-1] != d:
            raise ValueError(f"image_embeddings must be (B, h, w, {d}) NHWC, got {tuple(image_embeddings.shape)}")
        if sparse.ndim != 3 or sparse.shape[-1] != d:
            raise ValueError(f"sparse_prompt_embeddings must be (B, N, {d}), got {tuple(sparse.shape)}")
        b = sparse.shape[0]
        _, h, w, _ = image_embeddings.shape
        if repeat_image and image_embeddings.shape[0] != 1:
            raise ValueError(
                f"repeat_image=True shares ONE image across the B={b} prompts: image_embeddings must have batch 1, "
                f"got {image_embeddings.shape[0]}"
            )
        if not repeat_image and image_embeddings.shape[0] != b:
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} but the prompts have batch {b}; "
                "pass repeat_image=True to share one image across prompts"
            )
        if tuple(dense.shape) != (b, h, w, d):
            raise ValueError(f"dense_prompt_embeddings must be {(b, h, w, d)}, got {tuple(dense.shape)}")
        if sparse_mask is not None and tuple(sparse_mask.shape) != tuple(sparse.shape[:2]):
            raise ValueError(
                f"sparse_mask must be (B, N) = {tuple(sparse.shape[:2])}, got {tuple(sparse_mask.shape)}"
            )
        if self.use_high_res_features:
            if high_res_features is None or len(high_res_features) != 2:
                raise ValueError("high_res_features must be [feat_s0, feat_s1] when use_high_res_features=True")
            want0 = (4 * h, 4 * w, d // 8)
            want1 = (2 * h, 2 * w, d // 4)
            for name, f, want in (("feat_s0", high_res_features[0], want0), ("feat_s1", high_res_features[1], want1)):
                if f.ndim != 4 or tuple(f.shape[1:]) != want:
                    raise ValueError(f"high_res_features {name} must be (B, {', '.join(map(str, want))}) NHWC, "
                                     f"got {tuple(f.shape)}")

    def predict_masks(
        self,
        image_embeddings: Array,
        image_pe: Array,
        sparse_prompt_embeddings: Array,
        sparse_mask: Array | None,
        dense_prompt_embeddings: Array,
        repeat_image: bool,
        high_res_features: Sequence[Array] | None = None,
    ) -> tuple[Array, Array, Array, Array]:
        """All ``num_mask_tokens`` masks: (B, M_all, 4h, 4w), iou (B, M_all), mask tokens (B, M_all, C), obj (B, 1)."""
        self._check_inputs(image_embeddings, sparse_prompt_embeddings, sparse_mask, dense_prompt_embeddings,
                           repeat_image, high_res_features)
        b = sparse_prompt_embeddings.shape[0]
        if self.pred_obj_scores:
            output_tokens = jnp.concatenate(
                [self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], axis=0
            )
            s = 1
        else:
            output_tokens = jnp.concatenate([self.iou_token.weight, self.mask_tokens.weight], axis=0)
            s = 0
        n_out = output_tokens.shape[0]
        output_tokens = jnp.broadcast_to(output_tokens[None], (b, n_out, self.transformer_dim))
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)
        token_mask = None
        if sparse_mask is not None:
            token_mask = jnp.concatenate([jnp.ones((b, n_out), bool), sparse_mask.astype(bool)], axis=1)

        src = jnp.repeat(image_embeddings, b, axis=0) if repeat_image else image_embeddings
        src = src + dense_prompt_embeddings

        hs, src = self.transformer(src, image_pe, tokens, token_mask)
        iou_token_out = hs[:, s]
        mask_tokens_out = hs[:, s + 1: s + 1 + self.num_mask_tokens]

        bs, h, w, c = src.shape[0], image_embeddings.shape[1], image_embeddings.shape[2], self.transformer_dim
        src = src.reshape(bs, h, w, c)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        if not self.use_high_res_features:
            upscaled = act2(dc2(act1(ln1(dc1(src)))))
        else:
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)

        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
        )
        # The heads' outputs are float32 whatever the compute dtype (a bfloat16 model's mask logits are
        # accumulated in float32 and never rounded to bfloat16; IoU and object scores are cast up).
        dt = jnp.result_type(hyper_in.dtype, upscaled.dtype)
        out_dt = jnp.promote_types(dt, jnp.float32)
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in.astype(dt), upscaled.astype(dt), preferred_element_type=out_dt)

        iou_pred = self.iou_prediction_head(iou_token_out).astype(out_dt)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0]).astype(out_dt)
        else:
            # No object head: assume the object is present (sigmoid(10) ~ 1), as SAM 2.
            object_score_logits = jnp.full((iou_pred.shape[0], 1), 10.0, iou_pred.dtype)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    # ------------------------------------------------------------------------------------------------
    def _get_stability_scores(self, mask_logits: Array) -> Array:
        """IoU of the masks thresholded at +delta and -delta; 1 where the union is empty. (B, M, H, W) -> (B, M)."""
        flat = mask_logits.reshape(*mask_logits.shape[:-2], -1)
        delta = self.dynamic_multimask_stability_delta
        area_i = jnp.sum(flat > delta, axis=-1).astype(jnp.float32)
        area_u = jnp.sum(flat > -delta, axis=-1).astype(jnp.float32)
        return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)

    def _dynamic_multimask_via_stability(self, all_mask_logits: Array, all_iou_scores: Array) -> tuple[Array, Array]:
        """Single-mask output, replaced by the best multimask output (highest IoU) where it is unstable."""
        multimask_logits = all_mask_logits[:, 1:]
        multimask_iou = all_iou_scores[:, 1:]
        best = jnp.argmax(multimask_iou, axis=-1)
        best_logits = jnp.take_along_axis(multimask_logits, best[:, None, None, None], axis=1)
        best_iou = jnp.take_along_axis(multimask_iou, best[:, None], axis=1)

        single_logits = all_mask_logits[:, 0:1]
        single_iou = all_iou_scores[:, 0:1]
        is_stable = self._get_stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh
        mask_out = jnp.where(is_stable[:, :, None, None], single_logits, best_logits)
        iou_out = jnp.where(is_stable, single_iou, best_iou)
        return mask_out, iou_out
