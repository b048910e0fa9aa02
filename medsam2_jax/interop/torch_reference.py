"""SAM 2's training forward and loss in PyTorch, on the ``sam2`` package's ``SAM2Base``: the reference that
tests and benchmarks compare :func:`medsam2_jax.train.step.loss_and_terms` with.

Written from SAM 2's definition of training (``SAM2Train.forward`` / ``track_step`` and the
``MultiStepMultiMasksAndIous`` loss, without corrective clicks), with SAM2Base's own methods:

* all B*T frames go through ``forward_image`` at once and ``_prepare_backbone_features``;
* each sequence (one object) is tracked on its own: the prompted frames (the first ``max_cond_frames`` of
  them; frame 0 must be one) are processed first as initial conditioning frames, then the other frames in
  order, each with ``_track_step`` (memory-conditioned features, SAM heads, or the mask used as the output)
  and ``_encode_memory_in_output`` on the chosen high-resolution mask, keeping an ``output_dict`` as
  ``SAM2Train.forward_tracking`` does;
* the loss of each frame is computed on the candidate masks SAM 2 exposes (``high_res_multimasks``: three
  multimask outputs or the single mask, bilinearly upsampled to the image size by ``_forward_sam_heads``)
  and their IoU predictions: sigmoid focal loss (alpha 0.25, gamma 2, pixel mean), Dice, L1 between the
  predicted IoU and the real IoU of the binarised mask, BCE of the object score against "the target has a
  foreground pixel"; the candidate with the lowest ``20 focal + dice`` takes the mask and IoU losses, which
  count only where the object is present; each term is summed over the valid frames and divided by B.

The model must be in training behaviour (``model.train()``: no dynamic multimask fallback, sigmoid — not
binarised — masks for the memory of prompted frames, pointers of all conditioning frames); use
:func:`training_mode` to get that without dropout. torch is imported inside the functions so that the
package imports without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TERMS = ("focal", "dice", "iou", "object_score")


def training_mode(model, dropout: bool = False):
    """``model.train()``; with ``dropout=False`` every dropout (``nn.Dropout`` and the attention modules'
    ``dropout_p``) is set to 0, so the forward is deterministic but otherwise SAM 2's training forward."""
    import torch

    model.train()
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout_p"):
                m.dropout_p = 0.0
    return model


def _focal(logits, target, alpha: float, gamma: float):
    import torch.nn.functional as F

    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def _dice(logits, target):
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def frame_loss(high_res_multimasks, ious, object_score_logits, target, weights) -> dict[str, Any]:
    """Unweighted loss terms of one frame of one object: ``high_res_multimasks`` (M, S, S) candidate logits,
    ``ious`` (M,), ``object_score_logits`` scalar, ``target`` (S, S) float {0, 1}."""
    import torch
    import torch.nn.functional as F

    t = target[None].expand_as(high_res_multimasks)
    focal = _focal(high_res_multimasks, t, weights.focal_alpha, weights.focal_gamma)  # (M,)
    dice = _dice(high_res_multimasks, t)
    with torch.no_grad():
        pred = high_res_multimasks.flatten(-2) > 0
        gt = t.flatten(-2) > 0
        real_iou = (pred & gt).sum(-1).float() / torch.clamp((pred | gt).sum(-1).float(), min=1.0)
    iou = (ious - real_iou).abs()
    best = int(torch.argmin(weights.focal * focal + weights.dice * dice)) if focal.numel() > 1 else 0
    present = (target > 0).any().float()
    obj = F.binary_cross_entropy_with_logits(object_score_logits.reshape(()), present)
    return {"focal": focal[best] * present, "dice": dice[best] * present, "iou": iou[best] * present,
            "object_score": obj, "best": best, "present": present}


def _as_tensor(a, dtype=None):
    import torch

    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    return t if dtype is None else t.to(dtype)


def sequence_outputs(model, batch: dict, max_cond_frames: int = 4) -> list[list[dict]]:
    """Track every sequence of ``batch`` (the fields of :mod:`medsam2_jax.train.batch`, NumPy or torch,
    (B, T, ...)) with autograd on. Returns per sequence and frame SAM 2's per-frame training outputs:
    ``multimasks`` (M, S, S) logits, ``ious`` (M,), ``object_score_logits`` (1, 1), ``is_cond``."""
    import torch

    images = _as_tensor(batch["images"], torch.float32)
    b, t, s = images.shape[0], images.shape[1], images.shape[2]
    x = images.reshape(b * t, s, s, 3).permute(0, 3, 1, 2).contiguous()
    backbone_out = model.forward_image(x)
    _, vision_feats, vision_pos, feat_sizes = model._prepare_backbone_features(backbone_out)

    prompted = np.asarray(batch["prompted"]) & np.asarray(batch["frame_valid"])
    coords = np.asarray(batch["point_coords"], np.float32)
    labels = np.asarray(batch["point_labels"], np.int32)
    mask_in = np.asarray(batch["mask_inputs"])
    mask_valid = np.asarray(batch["mask_valid"])
    results = []
    for i in range(b):
        cond = [int(f) for f in np.flatnonzero(prompted[i])][:max_cond_frames]
        if not cond or cond[0] != 0:
            raise ValueError(f"sequence {i}: frame 0 must be prompted (got prompted frames {cond})")
        order = cond + [f for f in range(t) if f not in cond]
        output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        frames: dict[int, dict] = {}
        for f in order:
            idx = i * t + f
            feats = [v[:, idx : idx + 1] for v in vision_feats]
            pos = [v[:, idx : idx + 1] for v in vision_pos]
            point_inputs = mask_inputs = None
            if f in cond:
                if mask_valid[i, f]:
                    mask_inputs = torch.from_numpy(np.asarray(mask_in[i, f] > 0))[None, None]
                else:
                    keep = labels[i, f] != -1
                    point_inputs = {"point_coords": torch.from_numpy(coords[i, f][keep])[None],
                                    "point_labels": torch.from_numpy(labels[i, f][keep])[None]}
            current_out, sam_outputs, _, _ = model._track_step(
                f, f in cond, feats, pos, feat_sizes, point_inputs, mask_inputs, output_dict, t, False, None)
            _, high_res_multimasks, ious, _, high_res_masks, obj_ptr, object_score_logits = sam_outputs
            current_out["pred_masks_high_res"] = high_res_masks
            current_out["obj_ptr"] = obj_ptr
            model._encode_memory_in_output(feats, feat_sizes, point_inputs, True, high_res_masks,
                                           object_score_logits, current_out)
            output_dict["cond_frame_outputs" if f in cond else "non_cond_frame_outputs"][f] = current_out
            frames[f] = {"multimasks": high_res_multimasks[0], "ious": ious[0],
                         "object_score_logits": object_score_logits, "is_cond": f in cond}
        results.append([frames[f] for f in range(t)])
    return results


def loss_and_terms(model, batch: dict, weights=None, max_cond_frames: int = 4):
    """SAM 2's training loss of ``batch`` on the PyTorch ``model`` (autograd on; call ``loss.backward()``).

    ``weights``: a :class:`medsam2_jax.train.losses.LossWeights` (default 20/1/1/1, alpha 0.25, gamma 2).
    Returns ``(loss, terms)``: a scalar tensor and the weighted terms (tensors), plus ``best`` and
    ``object_score_logits`` per (sequence, frame) as NumPy (for diagnostics).
    """
    import torch

    from ..train.losses import LossWeights

    weights = weights or LossWeights()
    outs = sequence_outputs(model, batch, max_cond_frames)
    masks = _as_tensor(batch["masks"]).float()
    valid = np.asarray(batch["frame_valid"])
    b, t = masks.shape[:2]
    sums = {k: torch.zeros(()) for k in TERMS}
    best = np.zeros((b, t), np.int64)
    obj = np.zeros((b, t), np.float32)
    for i in range(b):
        for f in range(t):
            o = outs[i][f]
            obj[i, f] = float(o["object_score_logits"].detach().reshape(()))
            if not valid[i, f]:
                continue
            fl = frame_loss(o["multimasks"], o["ious"], o["object_score_logits"], masks[i, f], weights)
            best[i, f] = fl["best"]
            for k in TERMS:
                sums[k] = sums[k] + fl[k]
    w = {"focal": weights.focal, "dice": weights.dice, "iou": weights.iou, "object_score": weights.object_score}
    terms = {k: w[k] * sums[k] / b for k in TERMS}
    loss = terms["focal"] + terms["dice"] + terms["iou"] + terms["object_score"]
    return loss, dict(terms, best=best, object_score_logits=obj)
