"""Run PyTorch SAM 2 and medsam2-jax side by side and report per-module errors.

Used by ``convert/parity.py`` (users checking their own real checkpoint) and by the end-to-end parity
tests (random perturbed weights). Needs torch and the ``sam2`` package.

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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOL = {"embedding": 1e-4, "logits": 1e-3, "score": 1e-4, "positional": 1e-5}
RELATIVE = {"embedding": True, "logits": True, "score": False, "positional": False}

TORCH_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
}


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
        return (f"{flag} {self.name:<42s} max {self.max_abs:9.2e}  mean {self.mean_abs:9.2e}  "
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


def torch_config_name(model_name: str) -> str:
    from .model.sizes import get_spec

    return TORCH_CONFIGS[get_spec(model_name).name]


def build_torch_model(model_name: str, image_size: int, checkpoint: str | None = None, *, video: bool = False):
    """The PyTorch reference at ``image_size``: eval mode, CPU, no post-processing, no hole filling."""
    import torch  # noqa: F401
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    s = image_size // 16
    overrides = [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{s},{s}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{s},{s}]",
        "++model.compile_image_encoder=false",
    ]
    cfg = torch_config_name(model_name)
    # SAM 2's own defaults (apply_postprocessing=True: dynamic multimask via stability and, for video,
    # binarised memories of prompted frames); hole filling is off because it needs SAM 2's CUDA extension
    # (PyTorch skips it on CPU with a warning).
    if video:
        predictor = build_sam2_video_predictor(cfg, checkpoint, device="cpu", mode="eval",
                                               hydra_overrides_extra=overrides, apply_postprocessing=True)
        predictor.fill_hole_area = 0
        return predictor
    return build_sam2(cfg, checkpoint, device="cpu", mode="eval", hydra_overrides_extra=overrides,
                      apply_postprocessing=True)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _nhwc(t) -> np.ndarray:
    return np.transpose(_np(t), (0, 2, 3, 1))


def image_path_rows(
    torch_model, model, images: np.ndarray, points: np.ndarray, labels: np.ndarray
) -> list[Row]:
    """Compare the single-frame path module by module on (B, S, S, 3) normalised images and clicks.

    ``points`` (B, P, 2) pixels and ``labels`` (B, P) in {0, 1}: PyTorch gets them as they are (its prompt
    encoder appends one padding point); we pass them padded with two extra -1 slots to exercise static
    padding.
    """
    import torch

    rows: list[Row] = []
    x_t = torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))
    x = jnp.asarray(images)
    with torch.no_grad():
        trunk_t = torch_model.image_encoder.trunk(x_t)
        neck_t, pos_t = torch_model.image_encoder.neck(trunk_t)
    trunk = model.image_encoder.trunk(x)
    for i, (a, b) in enumerate(zip(trunk, trunk_t)):
        rows.append(compare(f"image_encoder.trunk stage {i}", a, _nhwc(b), "embedding"))
    neck, pos = model.image_encoder.neck(trunk)
    for i, (a, b) in enumerate(zip(neck, neck_t)):
        rows.append(compare(f"image_encoder.neck level {i}", a, _nhwc(b), "embedding"))
    for i, (a, b) in enumerate(zip(pos, pos_t)):
        rows.append(compare(f"image_encoder.neck pos_enc {i}", jnp.broadcast_to(a, b.shape[:1] + a.shape[1:]),
                            _nhwc(b), "positional"))

    feats = model.encode_image(x)
    with torch.no_grad():
        bo = torch_model.forward_image(x_t)
    for i, (a, b) in enumerate(zip(feats["backbone_fpn"], bo["backbone_fpn"])):
        rows.append(compare(f"forward_image backbone_fpn {i}", a, _nhwc(b), "embedding"))

    pts_t = torch.from_numpy(points.astype(np.float32))
    lab_t = torch.from_numpy(labels.astype(np.int32))
    with torch.no_grad():
        sparse_t, dense_t = torch_model.sam_prompt_encoder(points=(pts_t, lab_t), boxes=None, masks=None)
    b = points.shape[0]
    pad_pts = np.concatenate([points, np.zeros((b, 2, 2), np.float32)], 1)
    pad_lab = np.concatenate([labels, -np.ones((b, 2), np.int32)], 1)
    sparse, smask, dense = model.sam_prompt_encoder((jnp.asarray(pad_pts), jnp.asarray(pad_lab)), None, None)
    # Our attended tokens, in order, equal PyTorch's tokens (clicks then its one padding point).
    sel = np.asarray(sparse)[np.asarray(smask)].reshape(b, -1, sparse.shape[-1])
    rows.append(compare("sam_prompt_encoder sparse (points)", sel, _np(sparse_t), "embedding"))
    rows.append(compare("sam_prompt_encoder dense", dense, _nhwc(dense_t), "embedding"))

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
    out = model.predict_masks(feats, points=jnp.asarray(pad_pts), labels=jnp.asarray(pad_lab), multimask=True)
    rows.append(compare("sam_mask_decoder low-res mask logits (3)", out["masks"], _np(low_multi_t), "logits"))
    rows.append(compare("sam_mask_decoder iou predictions", out["iou"], _np(ious_t), "score"))
    rows.append(compare("sam_mask_decoder object score logits", out["object_score_logits"], _np(obj_t), "logits"))
    rows.append(compare("obj_ptr (best mask)", out["obj_ptr"], _np(ptr_t), "embedding"))
    return rows


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def format_rows(rows: Sequence[Row]) -> str:
    return "\n".join(r.line() for r in rows)


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
    import os
    import tempfile

    import torch
    from PIL import Image

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
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for i in range(t):
                Image.fromarray(np.zeros((s, s, 3), np.uint8)).save(os.path.join(tmp, f"{i}.jpg"))
            state = predictor.init_state(video_path=tmp)
        state["images"] = torch.from_numpy(np.ascontiguousarray(np.transpose(frames, (0, 3, 1, 2))))
        state["video_height"] = state["video_width"] = s
        state["cached_features"] = {}  # init_state warmed the cache with the placeholder JPEG of frame 0
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
        for _ in predictor.propagate_in_video(state, reverse=(direction == "backward")):
            pass
        outs = state["output_dict_per_obj"][0]
        s4 = s // 4
        low = np.full((t, s4, s4), -1024.0, np.float32)
        obj = np.full((t,), -1024.0, np.float32)
        iou = np.zeros((t,), np.float32)
        visited = np.zeros((t,), bool)
        for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
            for f, o in outs[key].items():
                if f not in state["frames_tracked_per_obj"][0]:
                    continue
                low[f] = _np(o["pred_masks"])[0, 0]
                obj[f] = float(_np(o["object_score_logits"]).reshape(-1)[0])
                iou[f] = ious.get(f, np.nan)
                visited[f] = True
        return {"low_res_masks": low, "object_score_logits": obj, "iou": iou, "visited": visited}
    finally:
        predictor.track_step = orig_track_step
        predictor._forward_sam_heads = orig_heads
