"""Run PyTorch SAM 2 and medsam2-jax side by side and report per-module errors.

Used by ``convert/parity.py`` (users checking their own real checkpoint) and by the end-to-end parity
tests (random perturbed weights). Needs torch and the ``sam2`` package; the PyTorch models come from
:func:`medsam2_jax.interop.torch_models.build_torch_model`.

* :func:`image_path_rows`: every Hiera stage, FPN level and position encoding, the prompt embeddings, the
  decoder outputs and the object pointer, for clicks.
* :func:`predict_rows`: ``SAM2.predict_masks`` against ``SAM2ImagePredictor._predict`` (its prompt-encoder
  and mask-decoder calls) for any prompt (box, clicks, mask input, one or three masks), with extra static
  padding on our side; :func:`torch_image_features` / :func:`jax_encode` give the features once.
* :func:`video_rows`: ``tracking.track`` with SAM 2's FIFO memory against ``SAM2VideoPredictor``.
* :func:`smooth_image`, :func:`moving_disk_clip`: generated inputs.

The JAX side runs compiled (:func:`jax_encode`, :func:`jax_predict`), once per model configuration and
input shape.

Each comparison is a :class:`Row`: module name, max and mean absolute error, the largest reference value,
the tolerance and pass/fail. Tolerances are per kind of quantity (float32, ``highest`` matmul precision):

* ``embedding`` (image-encoder stages, FPN levels, prompt embeddings, pointers): ``1e-4 * max(1, max|ref|)``
  — float32 summation-order differences grow with the magnitude and depth of a feature; 1e-4 relative to
  the feature's scale is ~1000 ulp and far below any porting bug (a wrong GELU or padding is >= 1e-3).
* ``logits`` (mask logits, object score): ``1e-3 * max(1, max|ref|)``; logits are a 32-channel dot product
  of upscaled features and amplify the embedding error by about that much.
* ``score`` (IoU predictions, sigmoid outputs in [0, 1]): ``1e-4`` absolute.
* ``positional`` (sine / Fourier encodings, pure functions of the grid): ``1e-5`` absolute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.prompt_labels import LABEL_PAD
from .torch_models import nchw_to_nhwc, nhwc_to_nchw, to_numpy

TOL = {"embedding": 1e-4, "logits": 1e-3, "score": 1e-4, "positional": 1e-5}
RELATIVE = {"embedding": True, "logits": True, "score": False, "positional": False}


@dataclasses.dataclass
class Row:
    name: str
    kind: str
    max_abs: float
    mean_abs: float
    ref_max: float
    tol: float
    ok: bool

    def line(self) -> str:
        flag = "ok  " if self.ok else "FAIL"
        return (f"{flag} {self.name:<50s} max {self.max_abs:9.2e}  mean {self.mean_abs:9.2e}  "
                f"|ref| {self.ref_max:9.2e}  tol {self.tol:8.1e}")


def compare(name: str, ours: Any, ref: Any, kind: str) -> Row:
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    if a.shape != b.shape:
        return Row(name, kind, float("inf"), float("inf"), 0.0, 0.0, False)
    diff = np.abs(a - b)
    ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    tol = TOL[kind] * (max(1.0, ref_max) if RELATIVE[kind] else 1.0)
    mx = float(diff.max()) if diff.size else 0.0
    return Row(name, kind, mx, float(diff.mean()) if diff.size else 0.0, ref_max, tol, bool(mx <= tol))


# ------------------------------------------------------------------------------------- JAX side, compiled
# One compiled program per model configuration and input shape: the graph definition is a static argument,
# so two models of the same size share the compilation (the weights are data).
@functools.partial(jax.jit, static_argnums=(0,))
def _jax_image_path(graphdef, state, images, points, labels):
    m = nnx.merge(graphdef, state)
    trunk = m.image_encoder.trunk(images)
    neck, pos = m.image_encoder.neck(trunk)
    feats = m.encode_image(images)
    sparse, smask, dense = m.sam_prompt_encoder((points, labels), None, None)
    out = m.predict_masks(feats, points=points, labels=labels, multimask=True)
    return {"trunk": trunk, "neck": neck, "pos": pos, "feats": feats, "sparse": sparse, "sparse_mask": smask,
            "dense": dense, "out": out}


@functools.partial(jax.jit, static_argnums=(0,))
def _jax_encode(graphdef, state, images):
    return nnx.merge(graphdef, state).encode_image(images)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _jax_predict(graphdef, state, feats, points, labels, boxes, mask_inputs, multimask):
    m = nnx.merge(graphdef, state)
    return m.predict_masks(feats, points=points, labels=labels, boxes=boxes, mask_inputs=mask_inputs,
                           multimask=multimask)


def jax_encode(model, images) -> dict[str, Any]:
    """``model.encode_image(images)``, compiled (once per model configuration and image batch shape)."""
    graphdef, state = nnx.split(model)
    return _jax_encode(graphdef, state, jnp.asarray(images, jnp.float32))


def jax_predict(model, feats, *, points=None, labels=None, boxes=None, mask_inputs=None,
                multimask: bool = True) -> dict[str, Any]:
    """``model.predict_masks(feats, ...)``, compiled (once per configuration, prompt shapes and ``multimask``)."""
    graphdef, state = nnx.split(model)
    cast = lambda a, dt: None if a is None else jnp.asarray(a, dt)
    return _jax_predict(graphdef, state, feats, cast(points, jnp.float32), cast(labels, jnp.int32),
                        cast(boxes, jnp.float32), cast(mask_inputs, jnp.float32), bool(multimask))


# ------------------------------------------------------------------------------------------ PyTorch side
def torch_image_features(torch_model, images: np.ndarray) -> dict[str, Any]:
    """What ``SAM2ImagePredictor.set_image`` keeps, on (B, S, S, 3) normalised images (no resizing):
    ``image_embed`` (the top FPN level plus ``no_mem_embed``) and ``high_res_feats`` (levels 0 and 1)."""
    import torch

    with torch.no_grad():
        bo = torch_model.forward_image(nhwc_to_nchw(images))
        top = bo["backbone_fpn"][2] + torch_model.no_mem_embed.view(1, -1, 1, 1)
    return {"image_embed": top, "high_res_feats": list(bo["backbone_fpn"][:2]), "backbone_out": bo}


def torch_predict(torch_model, tfeats: dict[str, Any], *, points=None, labels=None, boxes=None,
                  mask_inputs=None, multimask: bool = True) -> dict[str, np.ndarray]:
    """``SAM2ImagePredictor._predict`` on :func:`torch_image_features` (same prompt and decoder calls, low-res
    logits before its clamp to +-32), plus the object pointer as ``SAM2Base._forward_sam_heads`` makes it.

    Prompts as for :meth:`medsam2_jax.model.sam2.SAM2.predict_masks`, NumPy, without static padding
    (PyTorch's encoder appends its one padding point itself). With no click and no box this passes one dummy
    point with label -1, as ``SAM2Base._forward_sam_heads`` does (and as ``predict_masks`` does);
    ``SAM2ImagePredictor`` would pass no point at all in that case.
    """
    import torch

    emb = tfeats["image_embed"]
    b = emb.shape[0]
    coords, labs = [], []
    if boxes is not None:
        coords.append(torch.from_numpy(np.asarray(boxes, np.float32)).reshape(b, 2, 2))
        labs.append(torch.tensor([[2, 3]], dtype=torch.int32).repeat(b, 1))
    if points is not None:
        coords.append(torch.from_numpy(np.asarray(points, np.float32)).reshape(b, -1, 2))
        labs.append(torch.from_numpy(np.asarray(labels, np.int32)).reshape(b, -1))
    if not coords:
        coords, labs = [torch.zeros(b, 1, 2)], [-torch.ones(b, 1, dtype=torch.int32)]
    masks_t = None if mask_inputs is None else torch.from_numpy(np.asarray(mask_inputs, np.float32))[:, None]
    with torch.no_grad():
        sparse, dense = torch_model.sam_prompt_encoder(
            points=(torch.cat(coords, 1), torch.cat(labs, 1)), boxes=None, masks=masks_t)
        masks, iou, tokens, obj = torch_model.sam_mask_decoder(
            image_embeddings=emb, image_pe=torch_model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=False, high_res_features=tfeats["high_res_feats"])
        if multimask:
            token = tokens[torch.arange(b), torch.argmax(iou, dim=-1)]
        else:
            token = tokens[:, 0]
        ptr = torch_model.obj_ptr_proj(token)
        present = (obj > 0).float()
        ptr = present * ptr + (1 - present) * torch_model.no_obj_ptr
    return {"masks": to_numpy(masks), "iou": to_numpy(iou), "object_score_logits": to_numpy(obj),
            "obj_ptr": to_numpy(ptr)}


def pad_points(points: np.ndarray | None, labels: np.ndarray | None, b: int, extra: int):
    """Append ``extra`` padding slots (label ``LABEL_PAD``) to (B, P, 2) / (B, P) clicks (``None`` counts as P = 0);
    returns ``(None, None)`` when there is nothing at all."""
    if points is None:
        points, labels = np.zeros((b, 0, 2), np.float32), np.zeros((b, 0), np.int32)
    if points.shape[1] + extra == 0:
        return None, None
    pts = np.concatenate([np.asarray(points, np.float32), np.zeros((b, extra, 2), np.float32)], 1)
    lab = np.concatenate([np.asarray(labels, np.int32), np.full((b, extra), LABEL_PAD, np.int32)], 1)
    return pts, lab


def predict_rows(torch_model, model, tfeats, feats, name: str, *, points=None, labels=None, boxes=None,
                 mask_inputs=None, multimask: bool = True, extra_padding: int = 0) -> list[Row]:
    """Compare ``predict_masks`` with PyTorch's image predictor on one prompt; ours gets the clicks padded
    with ``extra_padding`` more label -1 slots (static padding must not change the result)."""
    b = tfeats["image_embed"].shape[0]
    ref = torch_predict(torch_model, tfeats, points=points, labels=labels, boxes=boxes, mask_inputs=mask_inputs,
                        multimask=multimask)
    pts, lab = pad_points(points, labels, b, extra_padding)
    out = jax_predict(model, feats, points=pts, labels=lab, boxes=boxes, mask_inputs=mask_inputs,
                      multimask=multimask)
    m = "3" if multimask else "1"
    return [
        compare(f"{name}: low-res mask logits ({m})", out["masks"], ref["masks"], "logits"),
        compare(f"{name}: iou predictions", out["iou"], ref["iou"], "score"),
        compare(f"{name}: object score logits", out["object_score_logits"], ref["object_score_logits"], "logits"),
        compare(f"{name}: obj_ptr", out["obj_ptr"], ref["obj_ptr"], "embedding"),
    ]


def image_path_rows(
    torch_model, model, images: np.ndarray, points: np.ndarray, labels: np.ndarray
) -> list[Row]:
    """Compare the single-frame path module by module on (B, S, S, 3) normalised images and clicks.

    ``points`` (B, P, 2) pixels and ``labels`` (B, P) in {0, 1}: PyTorch gets them as they are (its prompt
    encoder appends one padding point); we pass them padded with two extra -1 slots to exercise static
    padding. The JAX side runs as one compiled program (compiled once per model size and input shape).
    """
    import torch

    rows: list[Row] = []
    x_t = nhwc_to_nchw(images)
    with torch.no_grad():
        trunk_t = torch_model.image_encoder.trunk(x_t)
        neck_t, pos_t = torch_model.image_encoder.neck(trunk_t)
        bo = torch_model.forward_image(x_t)
    b = points.shape[0]
    pad_pts, pad_lab = pad_points(points, labels, b, 2)
    graphdef, state = nnx.split(model)
    j = _jax_image_path(graphdef, state, jnp.asarray(images, jnp.float32), jnp.asarray(pad_pts),
                        jnp.asarray(pad_lab))
    for i, (a, r) in enumerate(zip(j["trunk"], trunk_t)):
        rows.append(compare(f"image_encoder.trunk stage {i}", a, nchw_to_nhwc(r), "embedding"))
    for i, (a, r) in enumerate(zip(j["neck"], neck_t)):
        rows.append(compare(f"image_encoder.neck level {i}", a, nchw_to_nhwc(r), "embedding"))
    for i, (a, r) in enumerate(zip(j["pos"], pos_t)):
        rows.append(compare(f"image_encoder.neck pos_enc {i}", jnp.broadcast_to(a, r.shape[:1] + a.shape[1:]),
                            nchw_to_nhwc(r), "positional"))
    for i, (a, r) in enumerate(zip(j["feats"]["backbone_fpn"], bo["backbone_fpn"])):
        rows.append(compare(f"forward_image backbone_fpn {i}", a, nchw_to_nhwc(r), "embedding"))
    for i, (a, r) in enumerate(zip(j["feats"]["vision_pos_enc"], bo["vision_pos_enc"])):
        rows.append(compare(f"forward_image vision_pos_enc {i}", jnp.broadcast_to(a, r.shape[:1] + a.shape[1:]),
                            nchw_to_nhwc(r), "positional"))

    pts_t = torch.from_numpy(points.astype(np.float32))
    lab_t = torch.from_numpy(labels.astype(np.int32))
    with torch.no_grad():
        sparse_t, dense_t = torch_model.sam_prompt_encoder(points=(pts_t, lab_t), boxes=None, masks=None)
    # Our attended tokens, in order, equal PyTorch's tokens (clicks then its one padding point).
    sparse, smask = np.asarray(j["sparse"]), np.asarray(j["sparse_mask"])
    sel = sparse[smask].reshape(b, -1, sparse.shape[-1]) if smask.sum() % b == 0 else sparse
    rows.append(compare("sam_prompt_encoder sparse (points)", sel, to_numpy(sparse_t), "embedding"))
    rows.append(compare("sam_prompt_encoder dense", j["dense"], nchw_to_nhwc(dense_t), "embedding"))

    with torch.no_grad():
        hr_t = bo["backbone_fpn"][:2]
        top_t = bo["backbone_fpn"][2] + torch_model.no_mem_embed.view(1, -1, 1, 1)
        outs_t = torch_model._forward_sam_heads(
            backbone_features=top_t, point_inputs={"point_coords": pts_t, "point_labels": lab_t},
            high_res_features=hr_t, multimask_output=True)
        _, _, _, _, _, ptr_t, _ = outs_t
        low_multi_t, ious_t, _, obj_t = torch_model.sam_mask_decoder(
            image_embeddings=top_t, image_pe=torch_model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_t, dense_prompt_embeddings=dense_t, multimask_output=True,
            repeat_image=False, high_res_features=hr_t)
    out = j["out"]
    rows.append(compare("sam_mask_decoder low-res mask logits (3)", out["masks"], to_numpy(low_multi_t), "logits"))
    rows.append(compare("sam_mask_decoder iou predictions", out["iou"], to_numpy(ious_t), "score"))
    rows.append(compare("sam_mask_decoder object score logits", out["object_score_logits"], to_numpy(obj_t), "logits"))
    rows.append(compare("obj_ptr (best mask)", out["obj_ptr"], to_numpy(ptr_t), "embedding"))
    return rows


def video_rows(predictor, model, frames: np.ndarray, prompts: Sequence[dict], direction: str = "forward",
               name: str = "video") -> list[Row]:
    """Track one object through ``frames`` (T, S, S, 3) with :func:`medsam2_jax.tracking.track` (SAM 2's FIFO
    memory) and with PyTorch's ``SAM2VideoPredictor`` (:func:`torch_video_reference`); one row per visited
    frame's low-res mask logits, plus the object scores, the IoU predictions and the set of visited frames."""
    from ..memory.bank import BankConfig
    from ..tracking import TrackerConfig, make_prompts, track

    ref = torch_video_reference(predictor, frames, prompts, direction)
    cfg = TrackerConfig(bank=BankConfig.sam2_fifo())
    t, s = frames.shape[0], frames.shape[1]
    packed = make_prompts([list(prompts)], num_frames=t, image_size=s, config=cfg)
    out = track(model, jnp.asarray(frames, jnp.float32), packed, direction=direction, config=cfg)
    low = np.asarray(out["low_res_masks"][0])
    obj = np.asarray(out["object_score_logits"][0]).reshape(t)
    iou = np.asarray(out["iou"][0]).reshape(t)
    visited = np.asarray(out["visited"][0]).reshape(t)
    rows = [compare(f"{name}: frames visited", visited.astype(np.float32), ref["visited"].astype(np.float32),
                    "score")]
    both = visited & ref["visited"]
    for f in np.flatnonzero(both):
        rows.append(compare(f"{name}: frame {f} low-res mask logits", low[f], ref["low_res_masks"][f], "logits"))
    rows.append(compare(f"{name}: object score logits", obj[both], ref["object_score_logits"][both], "logits"))
    rows.append(compare(f"{name}: iou of the chosen mask", iou[both], ref["iou"][both], "score"))
    return rows


# ------------------------------------------------------------------------------------------- test inputs
def smooth_image(size: int) -> np.ndarray:
    """A generated (S, S, 3) RGB image in [0, 1]: a bright disk centred at (0.4 S, 0.45 S), radius 0.15 S, on
    a gradient. Real images are smooth; random noise alone would not exercise the model the same way."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    disk = ((xx - 0.4) ** 2 + (yy - 0.45) ** 2 < 0.15 ** 2).astype(np.float32)
    base = 0.25 + 0.3 * xx + 0.2 * yy
    return np.clip(np.stack([base + 0.5 * disk, base + 0.3 * disk, base * 0.8 + 0.1 * disk], -1), 0, 1)


def moving_disk_clip(size: int, frames: int, seed: int = 0) -> np.ndarray:
    """(T, S, S, 3) frames in [0, 1]: a soft disk starting at (0.35 S, 0.4 S) and drifting right and down on
    a colour gradient, with mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    out = []
    for t in range(frames):
        cx, cy = 0.35 + 0.02 * t, 0.4 + 0.015 * t
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.12 ** 2))
        img = np.stack([0.2 + 0.7 * blob, 0.3 + 0.4 * blob, 0.8 - 0.6 * blob], -1)
        out.append(img + 0.03 * rng.standard_normal(img.shape))
    return np.clip(np.asarray(out, np.float32), 0, 1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def format_rows(rows: Sequence[Row]) -> str:
    return "\n".join(r.line() for r in rows)


def _init_state(predictor, frames: np.ndarray, workdir: str | None) -> dict:
    """The predictor's inference state for (T, S, S, 3) normalised ``frames``: ``init_state`` reads T
    placeholder JPEGs (it only takes a folder), then its images are replaced by ``frames``."""
    import os
    import tempfile

    import torch
    from PIL import Image

    t, s = frames.shape[0], frames.shape[1]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in range(t):
            Image.fromarray(np.zeros((s, s, 3), np.uint8)).save(os.path.join(tmp, f"{i}.jpg"))
        state = predictor.init_state(video_path=tmp)
    state["images"] = torch.from_numpy(np.ascontiguousarray(np.transpose(frames, (0, 3, 1, 2))))
    state["video_height"] = state["video_width"] = s
    return state


def _add_prompts(predictor, state, prompts: Sequence[dict]) -> None:
    """Give object 1 its prompts through the predictor's own calls (a mask, or clicks and/or a box)."""
    for pr in prompts:
        f = int(pr["frame"])
        if pr.get("mask") is not None:
            predictor.add_new_mask(state, f, 1, np.asarray(pr["mask"]) > 0)
        else:
            pts = pr.get("points")
            predictor.add_new_points_or_box(
                state, f, 1,
                points=None if pts is None else np.asarray(pts, np.float32),
                labels=None if pts is None else np.asarray(pr["labels"], np.int32),
                box=None if pr.get("box") is None else np.asarray(pr["box"], np.float32),
            )


def _collect_outputs(state: dict, ious: dict[int, float], t: int, s4: int) -> dict[str, np.ndarray]:
    """Per-frame outputs of object 0 from a finished predictor ``state``: low-res logits, object scores, the
    IoU the predictor chose (``ious``, recorded by the patched track step) and which frames were tracked.
    Frames not reached keep SAM 2's absent-object fill (-1024)."""
    outs = state["output_dict_per_obj"][0]
    low = np.full((t, s4, s4), -1024.0, np.float32)
    obj = np.full((t,), -1024.0, np.float32)
    iou = np.zeros((t,), np.float32)
    visited = np.zeros((t,), bool)
    for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
        for f, o in outs[key].items():
            if f not in state["frames_tracked_per_obj"][0]:
                continue
            low[f] = to_numpy(o["pred_masks"])[0, 0]
            obj[f] = float(to_numpy(o["object_score_logits"]).reshape(-1)[0])
            iou[f] = ious.get(f, np.nan)
            visited[f] = True
    return {"low_res_masks": low, "object_score_logits": obj, "iou": iou, "visited": visited}


def torch_video_reference(
    predictor, frames: np.ndarray, prompts: Sequence[dict], direction: str = "forward", workdir: str | None = None
) -> dict[str, np.ndarray]:
    """Run PyTorch's ``SAM2VideoPredictor`` on one object and collect every frame's low-res output.

    ``frames`` (T, S, S, 3) are already normalised: they replace the predictor's own JPEG loading, so both
    frameworks see identical inputs. ``prompts`` as for :func:`medsam2_jax.tracking.make_prompts` (one
    object). ``direction``: "forward" or "backward" (SAM 2's ``reverse=True``), both starting at the first
    prompted frame. Returns ``low_res_masks`` (T, S/4, S/4), ``object_score_logits`` (T,), ``iou`` (T,) and
    ``visited`` (T,); the IoU is that of the chosen mask (1 for a mask prompt, as SAM 2).
    """
    t, s = frames.shape[0], frames.shape[1]
    ious: dict[int, float] = {}
    current = {"frame": None}
    orig_track_step = predictor.track_step
    orig_heads = predictor._forward_sam_heads

    def track_step(*args, **kwargs):
        current["frame"] = kwargs.get("frame_idx", args[0] if args else None)
        current["mask_input"] = kwargs.get("mask_inputs") is not None
        return orig_track_step(*args, **kwargs)

    def heads(*args, **kwargs):
        out = orig_heads(*args, **kwargs)
        if current["frame"] is not None:
            iou = out[2]
            best = iou.max(dim=-1).values if kwargs.get("multimask_output", False) else iou[:, 0]
            ious[current["frame"]] = 1.0 if current.get("mask_input") else float(best[0])
        return out

    predictor.track_step = track_step
    predictor._forward_sam_heads = heads
    try:
        state = _init_state(predictor, frames, workdir)
        state["cached_features"] = {}  # init_state warmed the cache with the placeholder JPEG of frame 0
        _add_prompts(predictor, state, prompts)
        for _ in predictor.propagate_in_video(state, reverse=(direction == "backward")):
            pass
        return _collect_outputs(state, ious, t, s // 4)
    finally:
        predictor.track_step = orig_track_step
        predictor._forward_sam_heads = orig_heads


# ---------------------------------------------------------------------------------------------- video runs
def torch_frame_features(predictor, frames: np.ndarray) -> dict[int, tuple]:
    """Every frame's backbone output, computed as ``SAM2VideoPredictor`` computes it (one frame at a time).

    ``frames`` (T, S, S, 3) normalised. The result can be passed to :func:`torch_video_track` as
    ``features`` so that several runs over the same clip (different prompts, directions or object-score
    biases — the image encoder is unaffected by those) encode each frame once.
    """
    import torch

    out = {}
    with torch.inference_mode():
        for i in range(frames.shape[0]):
            image = torch.from_numpy(np.ascontiguousarray(np.transpose(frames[i : i + 1], (0, 3, 1, 2))))
            out[i] = (image, predictor.forward_image(image))
    return out


def torch_video_track(
    predictor,
    frames: np.ndarray,
    prompts: Sequence[dict],
    direction: str = "forward",
    *,
    features: dict[int, tuple] | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """PyTorch ``SAM2VideoPredictor`` on one object, with optional precomputed features and timings.

    Same inputs and outputs as :func:`torch_video_reference` (``low_res_masks`` (T, S/4, S/4),
    ``object_score_logits``, ``iou``, ``visited``), plus ``video_res_masks`` (T, S, S) (what
    ``propagate_in_video`` yields; -1024 on frames not visited) and ``timing``: ``total_s`` (from the first
    prompt to the end of propagation: prompting, per-frame image encoding when not cached, memory path,
    output resizing; the placeholder-JPEG ``init_state`` is excluded), ``encode_s`` (the part of it spent in
    ``forward_image``) and ``encode_calls``. With ``features`` (from :func:`torch_frame_features`) no frame
    is encoded again, so ``total_s`` is the propagation alone.
    """
    import time

    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    t, s = frames.shape[0], frames.shape[1]
    ious: dict[int, float] = {}
    current: dict[str, Any] = {"frame": None, "mask_input": False}
    enc = {"s": 0.0, "calls": 0}
    names = ("track_step", "_forward_sam_heads", "forward_image")
    orig = {k: getattr(predictor, k) for k in names}
    shadowed = {k: predictor.__dict__[k] for k in names if k in predictor.__dict__}

    def track_step(*args, **kwargs):
        current["frame"] = kwargs.get("frame_idx", args[0] if args else None)
        current["mask_input"] = kwargs.get("mask_inputs") is not None
        return orig["track_step"](*args, **kwargs)

    def heads(*args, **kwargs):
        out = orig["_forward_sam_heads"](*args, **kwargs)
        if current["frame"] is not None:
            iou = out[2]
            best = iou.max(dim=-1).values if kwargs.get("multimask_output", False) else iou[:, 0]
            ious[current["frame"]] = 1.0 if current["mask_input"] else float(best[0])
        return out

    def forward_image(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig["forward_image"](*args, **kwargs)
        enc["s"] += time.perf_counter() - t0
        enc["calls"] += 1
        return out

    predictor.track_step = track_step
    predictor._forward_sam_heads = heads
    predictor.forward_image = forward_image
    try:
        state = _init_state(predictor, frames, workdir)
        # init_state cached the placeholder frame 0; with `features` every frame is a cache hit (the
        # predictor replaces its cache only on a miss).
        state["cached_features"] = dict(features) if features is not None else {}
        enc["s"], enc["calls"] = 0.0, 0
        s4 = s // 4
        video_res = np.full((t, s, s), -1024.0, np.float32)
        t0 = time.perf_counter()
        _add_prompts(predictor, state, prompts)
        for f, _, masks in predictor.propagate_in_video(state, reverse=(direction == "backward")):
            video_res[f] = to_numpy(masks)[0, 0]
        total = time.perf_counter() - t0
        return {
            **_collect_outputs(state, ious, t, s4),
            "video_res_masks": video_res,
            "timing": {"total_s": total, "encode_s": enc["s"], "encode_calls": enc["calls"]},
        }
    finally:
        for k in names:  # back to the class's methods (or to what the instance had before)
            if k in shadowed:
                setattr(predictor, k, shadowed[k])
            else:
                delattr(predictor, k)
