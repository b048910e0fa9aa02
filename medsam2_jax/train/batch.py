"""Pipeline batches -> model inputs: the tracker's prompts and the fields the training step reads."""

from __future__ import annotations

import jax.numpy as jnp

from ..tracking import Prompts

#: The batch fields the training step reads (the others stay on the host).
MODEL_KEYS = ("images", "masks", "frame_valid", "point_coords", "point_labels", "mask_inputs", "mask_valid",
              "prompted")


def batch_to_prompts(batch: dict, num_slots: int) -> Prompts:
    """The pipeline's per-frame prompt arrays -> ``tracking.Prompts`` with one object per sequence.

    ``batch``: (B, T, ...) arrays. The first ``num_slots`` prompted frames (in frame order; frame 0, the
    initial mask / click / box, always is one; the others are the frames with simulated corrective clicks)
    become the conditioning slots; the others are dropped. Jit-able.
    Returns Prompts with leading axes (B, 1 object, num_slots).
    """
    prompted = batch["prompted"] & batch["frame_valid"]
    order = jnp.argsort(~prompted, axis=1, stable=True)[:, :num_slots]  # prompted frames first, in order
    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    return Prompts(
        frame_idx=order[:, None].astype(jnp.int32),
        valid=take(prompted)[:, None],
        point_coords=take(batch["point_coords"])[:, None],
        point_labels=take(batch["point_labels"])[:, None],
        mask=take(batch["mask_inputs"])[:, None],
        mask_valid=(take(batch["mask_valid"]) & take(prompted))[:, None],
    )

