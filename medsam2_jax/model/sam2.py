"""SAM 2 assembled from its modules: the single-frame path (image encoder, prompt encoder, mask decoder,
object pointer) and the per-frame pieces the tracker composes (memory encoding, mask-as-output).

The attribute names equal ``SAM2Base``'s, so a PyTorch SAM 2 / SAM 2.1 / Medical-SAM2 state dict maps onto
this module through :mod:`medsam2_jax.interop.weights` with no per-key code.

Conventions: images NHWC, already normalised (see :func:`normalize_images`), of size ``image_size`` (a
multiple of 32). Prompt coordinates are (x, y) pixels in that image. Mask logits come back at a quarter of
the image size ("low-res", as SAM 2's ``pred_masks``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import MLP, Conv2d, Linear
from .fpn import build_image_encoder
from .mask_decoder import MaskDecoder
from .memory_attention import build_memory_attention
from .memory_encoder import MemoryEncoder
from .prompt_encoder import PromptEncoder, check_prompts
from .prompt_labels import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_PAD
from .sizes import ModelSpec, get_spec

Array = jax.Array

NO_OBJ_SCORE = -1024.0
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(images01: Array) -> Array:
    """Images in [0, 1], (..., H, W, 3) -> SAM 2's input normalisation (ImageNet mean and std)."""
    return (images01 - IMAGENET_MEAN) / IMAGENET_STD


def resize_bilinear(x: Array, size: tuple[int, int], *, antialias: bool) -> Array:
    """``F.interpolate(mode="bilinear", align_corners=False)`` on (..., H, W) maps.

    ``jax.image.resize(method="linear")`` equals torch for upsampling; for downsampling torch applies an
    antialiasing filter only when asked (``antialias=True``), so the flag is always explicit here.
    """
    shape = x.shape[:-2] + tuple(size)
    return jax.image.resize(x, shape, method="linear", antialias=antialias)


class SAM2(nnx.Module):
    """SAM 2 / SAM 2.1 with the hyper-parameters of the released configs."""

    def __init__(
        self,
        model_name: str = "sam2.1_hiera_t",
        image_size: int = 1024,
        *,
        dynamic_multimask: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        """``dynamic_multimask``: when one mask is asked for and it is unstable, return the best of the three
        multimask outputs instead (``dynamic_multimask_via_stability``; on in SAM 2's predictors, which are
        built with ``apply_postprocessing=True``)."""
        if image_size % 32 or image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        spec = get_spec(model_name)
        self.spec: ModelSpec = spec
        self.model_name = spec.name
        self.image_size = image_size
        self.hidden_dim = 256
        self.mem_dim = 64
        self.num_maskmem = 7
        self.max_obj_ptrs_in_encoder = 16
        self.sigmoid_scale_for_mem_enc = 20.0
        self.sigmoid_bias_for_mem_enc = -10.0
        self.is_2_1 = spec.is_2_1
        emb = image_size // 16

        self.image_encoder = build_image_encoder(spec.name, rngs=rngs)
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
            rngs=rngs,
        )
        self.sam_mask_decoder = MaskDecoder(
            transformer_dim=256,
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=dynamic_multimask,
            rngs=rngs,
        )
        self.memory_attention = build_memory_attention(rngs=rngs)
        self.memory_encoder = MemoryEncoder(out_dim=64, in_dim=256, rngs=rngs)
        self.mask_downsample = Conv2d(1, 1, kernel_size=4, stride=4, rngs=rngs)
        self.obj_ptr_proj = MLP(256, 256, 256, 3, rngs=rngs)
        init = nnx.initializers.truncated_normal(stddev=0.02)
        self.maskmem_tpos_enc = nnx.Param(init(rngs.params(), (self.num_maskmem, 1, 1, self.mem_dim)))
        self.no_mem_embed = nnx.Param(init(rngs.params(), (1, 1, self.hidden_dim)))
        self.no_mem_pos_enc = nnx.Param(init(rngs.params(), (1, 1, self.hidden_dim)))
        self.no_obj_ptr = nnx.Param(init(rngs.params(), (1, self.hidden_dim)))
        if self.is_2_1:
            self.obj_ptr_tpos_proj = Linear(self.hidden_dim, self.mem_dim, rngs=rngs)
            self.no_obj_embed_spatial = nnx.Param(init(rngs.params(), (1, self.mem_dim)))
        else:
            self.obj_ptr_tpos_proj = None
            self.no_obj_embed_spatial = None

    # ------------------------------------------------------------------ image path
    def check_images(self, images: Any) -> None:
        """Host-side validation with a clear message (call outside jit)."""
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"images must be a (B, H, W, 3) array, got shape {shape}")
        if shape[-1] != 3:
            raise ValueError(f"images must have 3 channels last (NHWC), got shape {tuple(shape)}")
        if tuple(shape[1:3]) != (self.image_size, self.image_size):
            other = (f" or load the model with image_size={shape[1]}"
                     if shape[1] == shape[2] and shape[1] % 32 == 0 and shape[1] > 0 else "")
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size} for this model (image_size={self.image_size}), "
                f"got {shape[1]}x{shape[2]}; resize them first{other} (square, a multiple of 32)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"images must be floating point (normalised), got dtype {dtype}")

    def encode_image(self, images: Array) -> dict[str, Any]:
        """SAM 2's ``forward_image``: (B, S, S, 3) normalised images ->

        ``backbone_fpn``: [(B,S/4,S/4,32), (B,S/8,S/8,64), (B,S/16,S/16,256)] (levels 0 and 1 already through
        the decoder's ``conv_s0`` / ``conv_s1``), ``vision_pos_enc``: the three sine encodings, and
        ``vision_features``: the top level (B,S/16,S/16,256).
        """
        if not isinstance(images, jax.core.Tracer):
            self.check_images(images)  # host-side: rank, channels, size, dtype
        # conv_s0 / conv_s1 go into the neck, which composes each with its level's 1x1 lateral conv.
        dec = self.sam_mask_decoder
        out = self.image_encoder(images, heads={0: dec.conv_s0, 1: dec.conv_s1})
        fpn = list(out["backbone_fpn"])
        return {"backbone_fpn": fpn, "vision_pos_enc": list(out["vision_pos_enc"]), "vision_features": fpn[-1]}

    # ------------------------------------------------------------------ SAM heads
    def sam_heads(
        self,
        backbone_features: Array,
        high_res_features: list[Array],
        point_coords: Array,
        point_labels: Array,
        mask_prompt: Array | None = None,
    ) -> dict[str, Array]:
        """Prompt encoder + mask decoder on (B, h, w, 256) features, all four masks kept.

        ``point_coords`` (B, P, 2) / ``point_labels`` (B, P) padded with label -1 (at least one slot). The
        prompt encoder attends the clicks plus one padding token (two for a row with no click), exactly as
        PyTorch does. ``mask_prompt``: (B, S/4, S/4, 1) low-res mask logits or ``None``. Returns the decoder's
        outputs for all 4 mask tokens (index 0 is the single-mask output, 1..3 the multimask outputs) so that
        the caller can choose multimask as data.
        """
        sparse, sparse_mask, dense = self.sam_prompt_encoder((point_coords, point_labels), None, mask_prompt)
        masks, iou, tokens, obj = self.sam_mask_decoder.predict_all(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            sparse_mask=sparse_mask,
            dense_prompt_embeddings=dense,
            high_res_features=high_res_features,
        )
        return {"masks": masks, "iou": iou, "tokens": tokens, "object_score_logits": obj}

    def _single_mask_index(self, heads: dict[str, Array]) -> Array:
        """Which mask answers a single-mask request: token 0, or with dynamic multimask via stability (on in
        eval, as in SAM 2's predictors) the best multimask output where token 0's mask is unstable."""
        masks, iou = heads["masks"], heads["iou"]
        idx = jnp.zeros((masks.shape[0],), jnp.int32)
        dec = self.sam_mask_decoder
        if dec.dynamic_multimask_via_stability and dec.deterministic:
            best = 1 + jnp.argmax(iou[:, 1:], axis=-1)
            stable = dec._get_stability_scores(masks[:, 0:1])[:, 0] >= dec.dynamic_multimask_stability_thresh
            idx = jnp.where(stable, 0, best)
        return idx

    def select_outputs(self, heads: dict[str, Array], multimask: Array | bool) -> dict[str, Array]:
        """``_forward_sam_heads``' choice of the output mask and the object pointer.

        ``multimask`` (bool or (B,) bool, may be traced): take the best of masks 1..3 by predicted IoU, else
        mask 0. Masks of frames where the object is absent are filled with -1024; the pointer becomes
        ``no_obj_ptr`` there (fixed_no_obj_ptr).
        """
        masks, iou, tokens, obj = heads["masks"], heads["iou"], heads["tokens"], heads["object_score_logits"]
        b = masks.shape[0]
        best_multi = 1 + jnp.argmax(iou[:, 1:], axis=-1)
        multimask = jnp.broadcast_to(jnp.asarray(multimask), (b,))
        take = lambda a, i: jnp.take_along_axis(a, i.reshape((b,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]
        # The pointer comes from the chosen multimask token, or from token 0 for a single mask.
        token = take(tokens, jnp.where(multimask, best_multi, 0))
        idx = jnp.where(multimask, best_multi, self._single_mask_index(heads))
        low_res = take(masks, idx)
        best_iou = take(iou, idx)
        present = obj > 0  # (B, 1)
        low_res = jnp.where(present[:, :, None], low_res, NO_OBJ_SCORE)
        obj_ptr = self.obj_ptr_proj(token)
        lam = present.astype(obj_ptr.dtype)
        obj_ptr = lam * obj_ptr + (1 - lam) * self.no_obj_ptr[...]
        return {
            "low_res_masks": low_res,
            "iou": best_iou,
            "object_score_logits": obj,
            "obj_ptr": obj_ptr,
            "all_low_res_masks": masks,
            "all_iou": iou,
        }

    def mask_as_output(
        self, backbone_features: Array, high_res_features: list[Array], masks: Array
    ) -> dict[str, Array]:
        """``_use_mask_as_output``: a binary (B, S, S) mask prompt becomes the output (logits +-10).

        The object pointer comes from the decoder fed with ``mask_downsample(mask)``; the object score is
        +10 where the mask has any foreground, else -10.
        """
        b = masks.shape[0]
        m = masks.astype(jnp.float32)
        high = m * 20.0 - 10.0
        s4 = self.image_size // 4
        low = resize_bilinear(high, (s4, s4), antialias=True)
        pad_coords = jnp.zeros((b, 1, 2), jnp.float32)
        pad_labels = -jnp.ones((b, 1), jnp.int32)
        heads = self.sam_heads(backbone_features, high_res_features, pad_coords, pad_labels,
                               self.mask_downsample(m[..., None]))
        # The decoder's own object score gates the pointer first (inside select_outputs), then the mask's
        # presence gates it again, exactly as SAM 2 applies fixed_no_obj_ptr twice on this path.
        sel = self.select_outputs(heads, False)
        present = jnp.any(m.reshape(b, -1) > 0, axis=1, keepdims=True)
        lam = present.astype(jnp.float32)
        obj = 20.0 * lam - 10.0
        obj_ptr = lam * sel["obj_ptr"] + (1 - lam) * self.no_obj_ptr[...]
        return {
            "low_res_masks": low,
            "iou": jnp.ones((b,), jnp.float32),
            "object_score_logits": obj,
            "obj_ptr": obj_ptr,
        }

    def predict_masks(
        self,
        features: dict[str, Any],
        points: Array | None = None,
        labels: Array | None = None,
        boxes: Array | None = None,
        mask_inputs: Array | None = None,
        multimask: bool = True,
    ) -> dict[str, Array]:
        """Single-image prediction (SAM 2's image predictor) from :meth:`encode_image` features.

        ``points`` (B, P, 2) xy pixels with ``labels`` (B, P) (1 positive, 0 negative, -1 padding);
        ``boxes`` (B, 4) xyxy pixels (fed, as SAM 2 does, as two points with labels 2 and 3 before the
        clicks); ``mask_inputs`` (B, S/4, S/4) low-res mask logits from an earlier prediction.
        Returns ``masks`` (B, M, S/4, S/4) low-res logits (M = 3 if ``multimask`` else 1), ``iou`` (B, M),
        ``object_score_logits`` (B, 1) and ``obj_ptr`` (B, 256) (for the best mask when ``multimask``).
        """
        fpn = features["backbone_fpn"]
        b = fpn[-1].shape[0]
        if not any(isinstance(a, jax.core.Tracer) for a in (points, labels, boxes)):
            check_prompts(points, labels, boxes, self.image_size)  # host-side, clear messages
        s4 = self.image_size // 4
        if mask_inputs is not None and tuple(mask_inputs.shape) != (b, s4, s4):
            raise ValueError(f"mask_inputs must be (B, S/4, S/4) = {(b, s4, s4)} low-res logits, "
                             f"got {tuple(mask_inputs.shape)}")
        feats = fpn[-1] + self.no_mem_embed[...].reshape(1, 1, 1, -1)
        coords, labs = _merge_prompts(b, points, labels, boxes)
        mask_prompt = None if mask_inputs is None else mask_inputs[..., None]
        heads = self.sam_heads(feats, fpn[:2], coords, labs, mask_prompt)
        sel = self.select_outputs(heads, multimask)
        if multimask:
            masks, iou = heads["masks"][:, 1:4], heads["iou"][:, 1:4]
        else:
            # SAM 2's decoder asked for one mask: token 0's, or, with dynamic multimask via stability (on in
            # eval, as in SAM 2's predictors), the best multimask output where token 0's mask is unstable.
            idx = self._single_mask_index(heads)
            masks = jnp.take_along_axis(heads["masks"], idx[:, None, None, None], axis=1)
            iou = jnp.take_along_axis(heads["iou"], idx[:, None], axis=1)
        return {
            "masks": masks,
            "iou": iou,
            "object_score_logits": heads["object_score_logits"],
            "obj_ptr": sel["obj_ptr"],
        }

    # ------------------------------------------------------------------ memory
    def encode_memory(
        self, pix_feat: Array, low_res_masks: Array, object_score_logits: Array, binarize: Array | bool
    ) -> Array:
        """``_encode_new_memory`` on (B, h, w, 256) raw features and (B, S/4, S/4) low-res logits.

        The logits are upsampled to S (bilinear, as SAM 2 does), turned into a mask by sigmoid (or by
        ``> 0`` where ``binarize``, i.e. on prompted frames in the video predictor), scaled by 20 and shifted
        by -10, and encoded; frames where the object is absent get ``no_obj_embed_spatial`` added.
        Returns (B, h, w, 64) memory features (their position encoding is a constant, see
        :meth:`memory_pos_enc`).
        """
        s = self.image_size
        high = resize_bilinear(low_res_masks, (s, s), antialias=False)
        binarize = jnp.asarray(binarize).reshape((-1,) + (1, 1))
        mask = jnp.where(binarize, (high > 0).astype(high.dtype), jax.nn.sigmoid(high))
        mask = mask * self.sigmoid_scale_for_mem_enc + self.sigmoid_bias_for_mem_enc
        out = self.memory_encoder(pix_feat, mask[..., None], skip_mask_sigmoid=True)
        feats = out["vision_features"]
        if self.no_obj_embed_spatial is not None:
            absent = (object_score_logits <= 0).astype(feats.dtype)  # (B, 1)
            feats = feats + absent[:, None, None, :] * self.no_obj_embed_spatial[...][None, None]
        return feats

    def memory_pos_enc(self) -> Array:
        """The memory encoder's sine position encoding, (h, w, 64): the same for every frame."""
        from .position import sine_position_encoding

        h = self.image_size // 16
        return jnp.asarray(sine_position_encoding(h, h, self.mem_dim))


def _merge_prompts(
    b: int, points: Array | None, labels: Array | None, boxes: Array | None
) -> tuple[Array, Array]:
    """SAM 2's prompt convention: box corners (labels 2, 3) first, then the clicks; at least one slot."""
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")
    parts_c, parts_l = [], []
    if boxes is not None:
        boxes = jnp.asarray(boxes, jnp.float32).reshape(b, 2, 2)
        parts_c.append(boxes)
        parts_l.append(jnp.broadcast_to(jnp.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], jnp.int32), (b, 2)))
    if points is not None:
        parts_c.append(jnp.asarray(points, jnp.float32).reshape(b, -1, 2))
        parts_l.append(jnp.asarray(labels, jnp.int32).reshape(b, -1))
    if not parts_c:
        return jnp.zeros((b, 1, 2), jnp.float32), jnp.full((b, 1), LABEL_PAD, jnp.int32)
    return jnp.concatenate(parts_c, axis=1), jnp.concatenate(parts_l, axis=1)
