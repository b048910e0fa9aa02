"""SAM 2's prompt encoder (``sam2/modeling/sam/prompt_encoder.py``) in Flax NNX, for static padded prompts.

Attribute names mirror PyTorch (``pe_layer``, ``point_embeddings.{0..3}``, ``not_a_point_embed``,
``no_mask_embed``, ``mask_downscaling.{0,1,3,4,6}`` with GELU placeholders at 2 and 5).

Prompts
-------
* points: ``(coords (B, N, 2) float x, y in input-image pixels, labels (B, N) int)``. Labels: 1 positive,
  0 negative, 2 / 3 top-left / bottom-right box corner given as points (this is how SAM 2's predictors pass
  boxes), -1 padding. ``N`` is a static slot count; unused slots carry label -1 (their coordinates are
  ignored).
* boxes: (B, 4) ``x0, y0, x1, y1`` pixels, optionally with ``box_valid`` (B,) bool.
* masks: (B, S/4, S/4, 1) mask logits, optionally with ``mask_valid`` (B,) bool.

Static padding rule
-------------------
PyTorch appends exactly one padding point (label -1, embedding ``not_a_point_embed``) when points are given
without a box, and that token takes part in attention. Here:

* the sparse sequence is ``[N point slots] + [one appended pad] (+ [2 box corners] when boxes is given)``;
  the appended pad is always there when points are given, so the attended pad exists whatever the caller's
  padding;
* ``sparse_mask`` is True for every slot whose label is not -1, for the appended pad when the row has no
  valid box, and for the box corners when the box is valid. Every caller slot with label -1 is False, so
  the decoder removes it from attention and the result equals PyTorch's for ANY static slot count;
* a row with no real prompt at all (every label -1 and no valid box) is SAM 2's "no click" call:
  ``SAM2Base._forward_sam_heads`` then passes one dummy point (0, 0) with label -1 and the encoder appends
  its pad, so PyTorch attends two padding tokens. To equal that, slot 0 (a pad) is also attended in such a
  row (tracking frames without clicks go through this path). With N = 0 slots this cannot apply and the row
  has the single appended pad, as PyTorch's encoder given zero points.

Embeddings of masked tokens are still finite (``not_a_point_embed``), so masked keys never inject NaN.

Mask path under jit
-------------------
``masks=None`` / ``boxes=None`` select the path statically (a different trace). To mix examples with and
without a mask (or box) in one compiled function, always pass the array and give ``mask_valid`` /
``box_valid``: examples where it is False get ``no_mask_embed`` (resp. no box and the attended pad), exactly
as PyTorch's ``masks=None`` (``boxes=None``) call.

Coordinates are validated host-side by :func:`check_prompts` (outside jit); inside jit nothing branches on
data.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import Conv2d, Embedding, GELU, LayerNorm2d, run_sequential
from .position import PositionEmbeddingRandom
from .prompt_labels import LABEL_PAD as PAD_LABEL, VALID_LABELS  # one definition of the codes

Array = jax.Array



def _hw(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or (H, W), got {size}")
    return size


def check_prompts(
    points: np.ndarray | None,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
    image_size: int | Sequence[int],
) -> None:
    """Host-side validation of prompts before they enter a jitted function. Raises ``ValueError``.

    Checks shapes ((B, N, 2), (B, N), (B, 4)), label values in {-1, 0, 1, 2, 3}, finite values, and that
    every non-padding coordinate lies in [0, W] for x and [0, H] for y (``image_size`` = S or (H, W)).
    Coordinates of padding slots (label -1) are not checked: they are ignored.
    """
    h, w = _hw(image_size, "image_size")
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together (both or neither), got only "
                         + ("points" if labels is None else "labels"))
    if points is not None:
        points = np.asarray(points)
        labels = np.asarray(labels)
        if points.ndim != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must have shape (B, N, 2) (x, y pixels), got {points.shape}")
        if labels.shape != points.shape[:2]:
            raise ValueError(f"labels must have shape (B, N) = {points.shape[:2]} matching points, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers (-1 pad, 0 negative, 1 positive, 2/3 box corners), "
                             f"got dtype {labels.dtype}")
        bad = ~np.isin(labels, VALID_LABELS)
        if bad.any():
            raise ValueError(f"labels must be in {VALID_LABELS}, got {sorted(set(labels[bad].tolist()))}")
        real = labels != PAD_LABEL
        pts = points[real]
        if not np.all(np.isfinite(pts)):
            raise ValueError("points contains NaN or inf at non-padding slots")
        out = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
        if out.any():
            raise ValueError(
                f"points must lie inside the image: x in [0, {w}], y in [0, {h}] (pixels of the model input); "
                f"got {pts[out][:5].tolist()}"
            )
    if boxes is not None:
        boxes = np.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (B, 4) (x0, y0, x1, y1 pixels), got {boxes.shape}")
        if points is not None and boxes.shape[0] != points.shape[0]:
            raise ValueError(f"boxes has batch {boxes.shape[0]} but points has batch {points.shape[0]}")
        if not np.all(np.isfinite(boxes)):
            raise ValueError("boxes contains NaN or inf")
        xs, ys = boxes[:, 0::2], boxes[:, 1::2]
        out = (xs < 0).any(1) | (xs > w).any(1) | (ys < 0).any(1) | (ys > h).any(1)
        if out.any():
            raise ValueError(
                f"boxes must lie inside the image: x in [0, {w}], y in [0, {h}]; got {boxes[out][:5].tolist()}"
            )


class PromptEncoder(nnx.Module):
    """Embeds points, boxes and mask prompts into sparse tokens, their attention mask, and a dense map."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Sequence[int],
        input_image_size: Sequence[int],
        mask_in_chans: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = embed_dim
        self.image_embedding_size = _hw(image_embedding_size, "image_embedding_size")
        self.input_image_size = _hw(input_image_size, "input_image_size")
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        self.num_point_embeddings = 4  # negative / positive point, two box corners
        self.point_embeddings = nnx.List([Embedding(1, embed_dim, rngs=rngs) for _ in range(4)])
        self.not_a_point_embed = Embedding(1, embed_dim, rngs=rngs)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nnx.List(
            [
                Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2, rngs=rngs),
                LayerNorm2d(mask_in_chans // 4, rngs=rngs),
                GELU(),
                Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2, rngs=rngs),
                LayerNorm2d(mask_in_chans, rngs=rngs),
                GELU(),
                Conv2d(mask_in_chans, embed_dim, kernel_size=1, rngs=rngs),
            ]
        )
        self.no_mask_embed = Embedding(1, embed_dim, rngs=rngs)

    def get_dense_pe(self) -> Array:
        """The prompt positional encoding on the image-embedding grid, (h, w, embed_dim)."""
        return self.pe_layer(self.image_embedding_size)

    def _embed_points(self, coords: Array, labels: Array) -> Array:
        """(B, N, 2), (B, N) -> (B, N, C), PyTorch's label-wise sum (no padding appended here)."""
        pe = self.pe_layer.forward_with_coords(coords.astype(jnp.float32) + 0.5, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == PAD_LABEL, jnp.broadcast_to(self.not_a_point_embed.weight[0], pe.shape), pe)
        for i in range(self.num_point_embeddings):
            emb = jnp.where(lab == i, emb + self.point_embeddings[i].weight[0], emb)
        return emb

    def _embed_boxes(self, boxes: Array) -> Array:
        """(B, 4) -> (B, 2, C): the two corners with their corner embeddings."""
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = jnp.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return pe + corner_embed

    def _embed_masks(self, masks: Array) -> Array:
        return run_sequential(self.mask_downscaling, masks)

    def _batch_size(self, points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _check_shapes(self, points, boxes, masks, box_valid, mask_valid, b: int) -> None:
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ValueError("points must be a (coords (B, N, 2), labels (B, N)) pair or None")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(f"points coords must have shape (B, N, 2) (x, y pixels), got {tuple(coords.shape)}")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"points labels must have shape (B, N) = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}"
                )
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"points labels must be integers, got dtype {labels.dtype}")
        if boxes is not None and tuple(boxes.shape) != (b, 4):
            raise ValueError(f"boxes must have shape (B, 4) = {(b, 4)}, got {tuple(boxes.shape)}")
        if masks is not None and tuple(masks.shape) != (b, *self.mask_input_size, 1):
            raise ValueError(
                f"masks must have shape (B, H/4, W/4, 1) = {(b, *self.mask_input_size, 1)} (NHWC), "
                f"got {tuple(masks.shape)}"
            )
        if box_valid is not None:
            if boxes is None:
                raise ValueError("box_valid was given without boxes")
            if tuple(box_valid.shape) != (b,):
                raise ValueError(f"box_valid must have shape (B,) = {(b,)}, got {tuple(box_valid.shape)}")
        if mask_valid is not None:
            if masks is None:
                raise ValueError("mask_valid was given without masks")
            if tuple(mask_valid.shape) != (b,):
                raise ValueError(f"mask_valid must have shape (B,) = {(b,)}, got {tuple(mask_valid.shape)}")

    def __call__(
        self,
        points: tuple[Array, Array] | None,
        boxes: Array | None,
        masks: Array | None,
        *,
        box_valid: Array | None = None,
        mask_valid: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        """Embed prompts.

        Returns:
          sparse (B, Nt, C) with Nt = N + 1 (points) + 2 (boxes), sparse_mask (B, Nt) bool (True = takes
          part in attention, see the module docstring), dense (B, h, w, C).
        """
        b = self._batch_size(points, boxes, masks)
        self._check_shapes(points, boxes, masks, box_valid, mask_valid, b)
        c = self.embed_dim

        if boxes is not None:
            has_box = jnp.ones((b,), bool) if box_valid is None else box_valid.astype(bool)
        else:
            has_box = jnp.zeros((b,), bool)

        tokens = [jnp.zeros((b, 0, c), jnp.float32)]
        token_mask = [jnp.zeros((b, 0), bool)]
        if points is not None:
            coords, labels = points
            labels = labels.astype(jnp.int32)
            n = labels.shape[1]
            pad_coords = jnp.zeros((b, 1, 2), jnp.float32)
            pad_labels = jnp.full((b, 1), PAD_LABEL, jnp.int32)
            coords = jnp.concatenate([coords.astype(jnp.float32), pad_coords], axis=1)
            labels = jnp.concatenate([labels, pad_labels], axis=1)
            tokens.append(self._embed_points(coords, labels))

            real = labels[:, :n] != PAD_LABEL
            # A row with no real point and no box is SAM 2's dummy-point call: slot 0 is attended too.
            no_prompt = ~(jnp.any(real, axis=1) | has_box)
            if n > 0:
                real = real.at[:, 0].set(real[:, 0] | no_prompt)
            token_mask.append(jnp.concatenate([real, (~has_box)[:, None]], axis=1))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
            token_mask.append(jnp.broadcast_to(has_box[:, None], (b, 2)))
        sparse = jnp.concatenate(tokens, axis=1)
        sparse_mask = jnp.concatenate(token_mask, axis=1)

        h, w = self.image_embedding_size
        no_mask = jnp.broadcast_to(self.no_mask_embed.weight[0], (b, h, w, c))
        if masks is not None:
            dense = self._embed_masks(masks.astype(jnp.float32))
            if mask_valid is not None:
                dense = jnp.where(mask_valid.astype(bool)[:, None, None, None], dense, no_mask)
        else:
            dense = no_mask
        return sparse, sparse_mask, dense
