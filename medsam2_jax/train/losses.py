"""SAM 2's training loss over tracked sequences, on fixed-size arrays (jit- and vmap-friendly).

Per frame and object, as SAM 2's ``MultiStepMultiMasksAndIous`` computes it:

* **focal** (weight 20): sigmoid focal loss (alpha 0.25, gamma 2) of the mask logits upsampled to the image
  size, averaged over pixels;
* **dice** (weight 1): ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(logits)``;
* **iou** (weight 1): L1 between the predicted IoU and the real IoU of the binarised mask (``logits > 0``)
  with the target;
* **object score** (weight 1): binary cross-entropy of the object-score logit against "the target has any
  foreground pixel".

With multimask outputs only the best of the candidate masks (lowest ``20 focal + dice``) takes the mask and
IoU losses. The mask and IoU losses count only where the object is present. Each term is summed over the
valid frames of a sequence and averaged over the objects (sequences) of the batch, so the loss of a batch is
the mean of its sequences' losses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the four terms (SAM 2's training config: 20, 1, 1, 1)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    object_score: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def sigmoid_focal(logits: Array, target: Array, alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """Per-mask sigmoid focal loss averaged over the last two (pixel) axes: (..., H, W) -> (...)."""
    p = jax.nn.sigmoid(logits)
    # log(sigmoid) in a stable form: BCE with logits.
    ce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: Array, target: Array) -> Array:
    """Soft Dice loss per mask: (..., H, W) -> (...)."""
    p = jax.nn.sigmoid(logits)
    num = 2 * (p * target).sum(axis=(-2, -1))
    den = p.sum(axis=(-2, -1)) + target.sum(axis=(-2, -1))
    return 1 - (num + 1) / (den + 1)


def mask_iou(logits: Array, target: Array) -> Array:
    """IoU of the binarised mask (``logits > 0``) with the target (no gradient): (..., H, W) -> (...)."""
    pred = logits > 0
    tgt = target > 0.5
    inter = jnp.sum(pred & tgt, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | tgt, axis=(-2, -1)).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


def bce_with_logits(logits: Array, target: Array) -> Array:
    return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def frame_losses(
    mask_logits: Array,
    iou_pred: Array,
    candidate_valid: Array,
    object_logits: Array,
    target: Array,
    weights: LossWeights = LossWeights(),
) -> dict[str, Array]:
    """Loss terms of each frame.

    ``mask_logits`` (..., M, H, W): the M candidate masks at the target's resolution; ``iou_pred`` (..., M);
    ``candidate_valid`` (..., M) bool: which candidates the model offered (the three multimask outputs, or
    the single mask); ``object_logits`` (...); ``target`` (..., H, W) float in {0, 1}.
    Returns each term per frame (...), unweighted, and ``best`` (...): the candidate that took the loss.
    """
    t = target[..., None, :, :].astype(jnp.float32)
    focal = sigmoid_focal(mask_logits, t, weights.focal_alpha, weights.focal_gamma)  # (..., M)
    dice = dice_loss(mask_logits, t)
    combo = weights.focal * focal + weights.dice * dice
    best = jnp.argmin(jnp.where(candidate_valid, combo, jnp.inf), axis=-1)
    take = lambda a: jnp.take_along_axis(a, best[..., None], axis=-1)[..., 0]
    real_iou = jax.lax.stop_gradient(mask_iou(mask_logits, t))
    iou_l1 = jnp.abs(iou_pred - real_iou)
    present = (target.reshape(target.shape[:-2] + (-1,)).max(axis=-1) > 0).astype(jnp.float32)
    return {
        "focal": take(focal) * present,
        "dice": take(dice) * present,
        "iou": take(iou_l1) * present,
        "object_score": bce_with_logits(object_logits, present),
        "best": best,
        "present": present,
    }


def sequence_loss(
    mask_logits: Array,
    iou_pred: Array,
    candidate_valid: Array,
    object_logits: Array,
    target: Array,
    frame_valid: Array,
    weights: LossWeights = LossWeights(),
) -> tuple[Array, dict[str, Array]]:
    """The training loss of a batch of sequences with leading axes (B, T).

    Each term is summed over the valid frames of a sequence and averaged over the B sequences; the loss is the
    weighted sum of the terms. Returns ``(loss, terms)`` with the weighted terms and the Dice score of the
    chosen masks on frames where the object is present (a metric, no gradient).
    """
    per = frame_losses(mask_logits, iou_pred, candidate_valid, object_logits, target, weights)
    w = frame_valid.astype(jnp.float32)
    b = target.shape[0]
    term = lambda k: (per[k] * w).sum() / b
    terms = {
        "focal": weights.focal * term("focal"),
        "dice": weights.dice * term("dice"),
        "iou": weights.iou * term("iou"),
        "object_score": weights.object_score * term("object_score"),
    }
    loss = terms["focal"] + terms["dice"] + terms["iou"] + terms["object_score"]
    # Hard Dice of the chosen mask where the object is present (for logs).
    chosen = jnp.take_along_axis(mask_logits, per["best"][..., None, None, None], axis=-3)[..., 0, :, :]
    pred = jax.lax.stop_gradient(chosen) > 0
    tgt = target > 0.5
    inter = jnp.sum(pred & tgt, axis=(-2, -1))
    tot = jnp.sum(pred, axis=(-2, -1)) + jnp.sum(tgt, axis=(-2, -1))
    hard = 2.0 * inter / jnp.maximum(tot, 1)
    wp = w * per["present"]
    terms["dice_score"] = (hard * wp).sum() / jnp.maximum(wp.sum(), 1.0)
    return loss, terms
