"""Prompts of B objects in fixed-size slots: :class:`Prompts`, built and checked on the host."""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from ..model.prompt_labels import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_PAD
from .config import Array, TrackerConfig


@flax.struct.dataclass
class Prompts:
    """Fixed-size prompts of B objects: ``Kc`` conditioning slots of ``P`` points each.

    Build with :func:`make_prompts`, which validates on the host. Coordinates are (x, y) pixels of the
    S x S frames; labels 1 positive, 0 negative, 2/3 box corners, -1 padding.
    """

    frame_idx: Array  # (B, Kc) int32
    valid: Array  # (B, Kc) bool
    point_coords: Array  # (B, Kc, P, 2) float32
    point_labels: Array  # (B, Kc, P) int32
    mask: Array  # (B, Kc, S, S) float32 (binary)
    mask_valid: Array  # (B, Kc) bool

    @property
    def num_objects(self) -> int:
        return self.frame_idx.shape[0]


def make_prompts(
    objects: Sequence[Sequence[dict[str, Any]]],
    *,
    num_frames: int,
    image_size: int,
    config: TrackerConfig = TrackerConfig(),
) -> Prompts:
    """Validate and pack prompts. ``objects[i]`` is a list of prompts of object i, each a dict with
    ``frame`` and one of: ``points`` (n, 2) with ``labels`` (n,), ``box`` (4,) xyxy (optionally with
    points), or ``mask`` (S, S) binary. Raises ``ValueError`` naming the object, frame and argument.

    The prompts get ``config.max_cond_frames`` conditioning slots per object with
    ``config.cond_slots == "max"``, else (``"fit"``) as many as the most-prompted object has."""
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool):
        raise ValueError(f"num_frames must be an int, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"the sequence is empty: num_frames must be >= 1, got {num_frames}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(objects, dict) or any(isinstance(o, dict) for o in objects):
        raise ValueError("objects must be a list of objects, each a list of prompt dicts; got a dict where an "
                         "object was expected (wrap one object's prompts in a list: [[{...}]])")
    objects = [list(o) for o in objects]
    if not objects:
        raise ValueError("no objects given: pass at least one object with at least one prompt")
    for i, prompts in enumerate(objects):
        for j, pr in enumerate(prompts):
            if not isinstance(pr, dict):
                raise ValueError(f"object {i}, prompt {j}: expected a dict with 'frame' and points/box/mask, "
                                 f"got {type(pr).__name__}")
    p, s = config.max_points, int(image_size)
    b = len(objects)
    most = max((len(o) for o in objects), default=1)
    kc = config.max_cond_frames if config.cond_slots == "max" else max(1, min(most, config.max_cond_frames))
    frame_idx = np.zeros((b, kc), np.int32)
    valid = np.zeros((b, kc), bool)
    coords = np.zeros((b, kc, p, 2), np.float32)
    labels = -np.ones((b, kc, p), np.int32)
    masks = np.zeros((b, kc, s, s), np.float32)
    mask_valid = np.zeros((b, kc), bool)
    for i, prompts in enumerate(objects):
        if not prompts:
            raise ValueError(f"object {i} was never prompted: give it at least one click, box or mask")
        if len(prompts) > kc:
            raise ValueError(
                f"object {i} has {len(prompts)} prompted frames, more than max_cond_frames={kc}; "
                "raise TrackerConfig.max_cond_frames"
            )
        seen = set()
        for j, pr in enumerate(prompts):
            f = pr.get("frame")
            if not isinstance(f, (int, np.integer)) or not 0 <= int(f) < num_frames:
                raise ValueError(f"object {i}, prompt {j}: frame={f!r} is outside the sequence [0, {num_frames - 1}]")
            if int(f) in seen:
                raise ValueError(f"object {i}: frame {f} is prompted twice; merge the prompts of one frame")
            seen.add(int(f))
            frame_idx[i, j], valid[i, j] = int(f), True
            has_mask = pr.get("mask") is not None
            pts = np.zeros((0, 2), np.float32)
            lab = np.zeros((0,), np.int32)
            if pr.get("box") is not None:
                box = np.asarray(pr["box"], np.float32).reshape(-1)
                if box.shape != (4,):
                    raise ValueError(f"object {i}, frame {f}: box must be (x0, y0, x1, y1), got shape {box.shape}")
                if not (box[0] <= box[2] and box[1] <= box[3]):
                    raise ValueError(f"object {i}, frame {f}: box {box.tolist()} must satisfy x0 <= x1 and y0 <= y1")
                pts = np.concatenate([pts, box.reshape(2, 2)])
                lab = np.concatenate([lab, np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32)])
            if pr.get("points") is not None:
                pp = np.asarray(pr["points"], np.float32).reshape(-1, 2)
                ll = np.asarray(pr.get("labels"), np.int32).reshape(-1) if pr.get("labels") is not None else None
                if ll is None or ll.shape[0] != pp.shape[0]:
                    raise ValueError(f"object {i}, frame {f}: points need labels of the same length")
                if not np.isin(ll, (0, 1)).all():
                    raise ValueError(f"object {i}, frame {f}: click labels must be 1 (positive) or 0 (negative)")
                pts = np.concatenate([pts, pp])
                lab = np.concatenate([lab, ll])
            if has_mask and len(lab):
                raise ValueError(f"object {i}, frame {f}: give either a mask or clicks/box on one frame, not both")
            if not has_mask and not len(lab):
                raise ValueError(f"object {i}, frame {f}: the prompt has no points, box or mask")
            if len(lab) > p:
                raise ValueError(
                    f"object {i}, frame {f}: {len(lab)} points (box corners count as 2) exceed max_points={p}"
                )
            if len(lab):
                if not np.all(np.isfinite(pts)):
                    raise ValueError(f"object {i}, frame {f}: prompt coordinates contain NaN or inf")
                if pts.min() < 0 or pts.max() > s:
                    raise ValueError(
                        f"object {i}, frame {f}: prompt coordinates {pts.tolist()} fall outside the {s}x{s} image"
                    )
                coords[i, j, : len(lab)] = pts
                labels[i, j, : len(lab)] = lab
            if has_mask:
                m = np.asarray(pr["mask"])
                if m.shape != (s, s):
                    raise ValueError(f"object {i}, frame {f}: mask must be {s}x{s}, got shape {m.shape}")
                masks[i, j] = (m > 0).astype(np.float32)
                mask_valid[i, j] = True
    return Prompts(
        frame_idx=jnp.asarray(frame_idx),
        valid=jnp.asarray(valid),
        point_coords=jnp.asarray(coords),
        point_labels=jnp.asarray(labels),
        mask=jnp.asarray(masks),
        mask_valid=jnp.asarray(mask_valid),
    )


def check_tracker_prompts(prompts: Prompts, num_frames: int, image_size: int) -> None:
    """Host-side checks that ``prompts`` fit a sequence of ``num_frames`` frames of ``image_size`` (clear
    errors for hand-built :class:`Prompts`; :func:`make_prompts` output passes when built for the same T)."""
    fi = np.asarray(prompts.frame_idx)
    valid = np.asarray(prompts.valid)
    if fi.ndim != 2 or valid.shape != fi.shape:
        raise ValueError(f"prompts.frame_idx and prompts.valid must be (B, slots), got {fi.shape} and {valid.shape}")
    b, kc = fi.shape
    for name, want in (("point_coords", (b, kc, None, 2)), ("point_labels", (b, kc, None)),
                       ("mask", (b, kc, image_size, image_size)), ("mask_valid", (b, kc))):
        got = tuple(np.shape(getattr(prompts, name)))
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = tuple("P" if w is None else w for w in want)
            raise ValueError(f"prompts.{name} has shape {got}, expected {shown} (built for another image size or "
                             "object count? use make_prompts with this model's image_size)")
    for i in range(b):
        if not valid[i].any():
            raise ValueError(f"object {i} was never prompted: it has no valid prompt slot")
        bad = fi[i][valid[i] & ((fi[i] < 0) | (fi[i] >= num_frames))]
        if bad.size:
            raise ValueError(f"object {i}: a prompt is on frame {int(bad[0])}, outside the sequence "
                             f"[0, {num_frames - 1}]")


def _num_real_points(labels: Array) -> Array:
    return jnp.sum(labels != LABEL_PAD, axis=-1)
