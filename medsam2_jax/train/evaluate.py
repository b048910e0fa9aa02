"""Held-out evaluation during and after training: Dice of tracked sequences against the copy-mask baseline.

Sequences are drawn from held-out cases by the same pipeline as training, without augmentation, with a box
from the ground truth on the first frame and no corrective clicks (so no ground truth is used on any other
frame). The held-out sources preprocess each image without its labels (``labels_touch_image=False``: the
crop and the CT normalisation come from the image alone), so no ground truth reaches the model input; the
sequences are still placed by the training sampler, where the structure is, which makes this a training
signal rather than the protocol of ``eval.py``. The model tracks each sequence forward (no dropout); a frame's prediction is its mask logits
upsampled to the image size and thresholded at 0. Reported:

* ``dice``: mean over sequences of the Dice over the frames after the prompted one (the volume of those
  frames pooled, so empty frames count through their false positives);
* ``copy_mask_dice``: the same score for the baseline that pastes the prompted frame's ground-truth mask
  onto every later frame, on the same sequences;
* ``dice_all_frames``: the model's Dice with the prompted frame included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.sam2 import resize_bilinear
from .batch import MODEL_KEYS
from .step import sequence_outputs


def _pooled_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    inter = np.logical_and(pred, gt).sum()
    tot = pred.sum() + gt.sum()
    return 1.0 if tot == 0 else float(2 * inter / tot)


def make_predict(graphdef, rest, tcfg):
    @jax.jit
    def predict(params, batch, key):
        model = nnx.merge(graphdef, params, rest)
        out = sequence_outputs(model, batch, key, tcfg)
        s = batch["masks"].shape[-1]
        return resize_bilinear(out["low_res_masks"], (s, s), antialias=False) > 0

    return predict


def eval_pipeline_config(pcfg):
    """``pcfg`` made for evaluation: no augmentation, a box on frame 0, no corrections, forward order."""
    return dataclasses.replace(
        pcfg, augment_enabled=False, num_workers=0, seed=pcfg.seed + 1_000_003,
        prompts=dataclasses.replace(pcfg.prompts, p_mask=0.0, p_click=0.0, p_box=1.0, box_noise=0.0,
                                    max_correct_frames=0),
        sampling=dataclasses.replace(pcfg.sampling, reverse_prob=0.0))


def evaluate(predict, params, source, pcfg, num_batches: int, to_device=None) -> dict[str, Any]:
    """Run ``num_batches`` held-out batches through ``predict`` (from :func:`make_predict`)."""
    from ..data import pipeline as pl

    it = pl.make_iterator(source, eval_pipeline_config(pcfg))
    model_d, copy_d, all_d = [], [], []
    try:
        for i in range(num_batches):
            b = next(it)
            arrays = {k: b[k] for k in MODEL_KEYS}
            arrays = to_device(arrays) if to_device is not None else {k: jnp.asarray(v) for k, v in arrays.items()}
            pred = np.asarray(jax.device_get(predict(params, arrays, jax.random.key(i))))
            gt, valid = np.asarray(b["masks"]), np.asarray(b["frame_valid"])
            for s in range(gt.shape[0]):
                v = valid[s]
                later = v.copy()
                later[0] = False
                model_d.append(_pooled_dice(pred[s][later], gt[s][later]))
                copy_d.append(_pooled_dice(np.broadcast_to(gt[s][0], gt[s].shape)[later], gt[s][later]))
                all_d.append(_pooled_dice(pred[s][v], gt[s][v]))
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"sequences": len(model_d), "dice": float(np.mean(model_d)), "copy_mask_dice": float(np.mean(copy_d)),
            "dice_all_frames": float(np.mean(all_d)),
            "protocol": "held-out sequences, box from the ground truth on frame 0 only, no corrections, forward; "
                        "images preprocessed without their labels; sequences placed where the structure is "
                        "(the training sampler); Dice pooled over the frames after the prompted one"}
