"""Prompt simulation for training (paper §4.3) and evaluation (§5.1, Fig. 7), as fixed-size arrays.

Array conventions (the same for training and evaluation, every shape fixed by the config):

* ``point_coords`` (T, P, 2) float32: (x, y) = (column, row) PIXEL INDICES in the S x S frame, the
  convention of SAM 2's point sampler (its prompt encoder adds 0.5 to reach the pixel centre).
* ``point_labels`` (T, P) int32: -1 padding, 0 negative click, 1 positive click, 2 / 3 the top-left /
  bottom-right box corners (SAM 2 feeds a box as two points with those labels). Real points come first,
  padding after; padded coordinates are 0.
* ``mask_inputs`` (T, S, S) float32 (1 inside, 0 outside) with ``mask_valid`` (T,) bool.
* ``prompted`` (T,) bool: the frame carries a prompt (points or a mask).
* ``correct_frames`` (T,) bool: frames chosen for corrective clicks (training only).

Training (§4.3): "initial prompts consisting of the ground-truth mask with 50% probability, a positive
click from the mask with 25%, or a bounding box input with 25%", on the first frame; "randomly selecting up
to 2 frames (including the first) for corrective clicks". As in SAM 2's trainer (which the paper's recipe
follows): the number of correction frames is uniform in 1..``max_correct_frames``, the first frame is always
one of them, the others are drawn without replacement from the rest; a mask prompt gets no corrections
(``correct_after_mask=False``: correcting a ground-truth mask is pointless).

Corrective clicks come from the error regions of a prediction: false negatives (``gt & ~pred``) give a
positive click, false positives (``~gt & pred``) a negative one. ``uniform`` picks a pixel uniformly over
all error pixels (so the label follows the sizes of the two regions); ``center`` picks the pixel farthest
from the boundary of its region (Euclidean distance transform; the image border counts as boundary) in
whichever region reaches deeper. With no error at all, a negative click is taken in the background. When no
prediction is given (the data pipeline, before any model exists), the prediction is taken as EMPTY: the
error is the whole target, so the simulated correction is a positive click inside it (and a negative click
in the background on a correction frame where the target is absent). A training loop that has predictions
sets ``simulate_corrections=False`` and samples its own clicks on ``correct_frames`` inside ``jit`` with
:func:`corrective_click_jax` and :func:`add_point_jax`.

Clicks from a mask: ``uniform`` (any pixel of the mask, equally likely: the default for training, for
diversity) or ``center`` (the deepest pixel, ties broken at random: the default for evaluation, where it
imitates a user clicking the middle of the structure).

Boxes: the tight box of the mask, corners jittered as in SAM: each coordinate moves by U(-1, 1) x
min(``box_noise`` x box side, ``box_noise_bound_frac`` x S) pixels, then is clamped to [0, S - 1]. SAM's
defaults are noise 0.1 and 20 px at S = 1024, hence ``box_noise_bound_frac = 20 / 1024``. Evaluation boxes
are exact (no jitter) unless asked.

Evaluation: a prompt (click, box or mask) on one chosen frame (``"largest"`` target area, ``"middle"`` of the
target's extent, ``"first"`` frame with the target, or an index), and every other frame prompted the same
way with probability ``frequency`` (the paper's prompt frequency, 0.25 for 3D and 0.3 for 2D in §5.1).
A frame without the target is never prompted (there is nothing to click or box).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from ..model.prompt_labels import (LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_NEG,  # noqa: F401
                                   LABEL_PAD, LABEL_POS)

PROMPT_MASK = 0
PROMPT_CLICK = 1
PROMPT_BOX = 2
PROMPT_KINDS = {"mask": PROMPT_MASK, "click": PROMPT_CLICK, "box": PROMPT_BOX}

_MODES = ("uniform", "center")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Training prompt simulation (defaults: the paper's §4.3 and SAM 2's trainer; module docstring)."""

    num_points: int = 8  # P: point slots per frame (box = 2 slots)
    p_mask: float = 0.5
    p_click: float = 0.25
    p_box: float = 0.25
    click_mode: str = "uniform"
    box_noise: float = 0.1
    box_noise_bound_frac: float = 20.0 / 1024.0
    max_correct_frames: int = 2
    rand_correct_frames: bool = True
    correction_points_per_frame: int = 1
    correction_mode: str = "uniform"
    correct_after_mask: bool = False
    simulate_corrections: bool = True

    def __post_init__(self):
        for name in ("p_mask", "p_click", "p_box"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"PromptConfig.{name} must be a probability in [0, 1], got {v!r}")
        total = self.p_mask + self.p_click + self.p_box
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"PromptConfig: p_mask + p_click + p_box must be 1, got {total!r}")
        for name in ("click_mode", "correction_mode"):
            if getattr(self, name) not in _MODES:
                raise ValueError(f"PromptConfig.{name} must be one of {_MODES}, got {getattr(self, name)!r}")
        if self.max_correct_frames < 0 or self.correction_points_per_frame < 0:
            raise ValueError("PromptConfig.max_correct_frames and correction_points_per_frame must be >= 0")
        need = 2 + (self.correction_points_per_frame if self.simulate_corrections else 0)
        if self.num_points < need:
            raise ValueError(
                f"PromptConfig.num_points={self.num_points} is too small: a box (2 slots) plus "
                f"{self.correction_points_per_frame} corrective click(s) need {need}"
            )
        if self.box_noise < 0 or self.box_noise_bound_frac < 0:
            raise ValueError("PromptConfig.box_noise and box_noise_bound_frac must be >= 0")


class SequencePrompts(NamedTuple):
    """The prompts of one training or evaluation sequence, as arrays per frame (numpy; the data pipeline's
    form). The tracker's own form is :class:`medsam2_jax.tracking.Prompts` (``train.batch`` converts)."""

    point_coords: np.ndarray  # (T, P, 2) float32
    point_labels: np.ndarray  # (T, P) int32
    mask_inputs: np.ndarray  # (T, S, S) float32
    mask_valid: np.ndarray  # (T,) bool
    prompted: np.ndarray  # (T,) bool
    correct_frames: np.ndarray  # (T,) bool
    prompt_kind: int  # PROMPT_MASK / PROMPT_CLICK / PROMPT_BOX of the initial (or chosen-frame) prompt

    def as_dict(self) -> dict:
        d = self._asdict()
        d["prompt_kind"] = np.int32(self.prompt_kind)
        return d


def empty_prompts(num_frames: int, num_points: int, size: int) -> SequencePrompts:
    return SequencePrompts(
        point_coords=np.zeros((num_frames, num_points, 2), np.float32),
        point_labels=np.full((num_frames, num_points), LABEL_PAD, np.int32),
        mask_inputs=np.zeros((num_frames, size, size), np.float32),
        mask_valid=np.zeros((num_frames,), bool),
        prompted=np.zeros((num_frames,), bool),
        correct_frames=np.zeros((num_frames,), bool),
        prompt_kind=-1,
    )


# ----------------------------------------------------------------------------------------------------------
# Single-frame primitives.


def _check_mask2d(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (S, S) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_mode(mode: str, name: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{name} must be one of {_MODES}, got {mode!r}")


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``[x0, y0, x1, y1]`` (inclusive pixel indices, float32) of a non-empty 2D mask."""
    mask = _check_mask2d(mask, "mask")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_to_box: mask is empty, a box needs at least one foreground pixel")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def box_prompt(
    mask: np.ndarray, rng: np.random.Generator, noise: float = 0.0, noise_bound: float = 0.0
) -> Tuple[np.ndarray, np.ndarray]:
    """Box corners as two points ``(2, 2)`` (x, y) with labels ``[2, 3]``, jittered (module docstring)."""
    box = mask_to_box(mask)
    size_y, size_x = np.asarray(mask).shape
    if noise > 0:
        w, h = box[2] - box[0], box[3] - box[1]
        max_d = np.array([min(w * noise, noise_bound), min(h * noise, noise_bound)] * 2, np.float32)
        box = box + (rng.uniform(-1.0, 1.0, size=4) * max_d).astype(np.float32)
        box = np.clip(box, 0.0, np.array([size_x - 1, size_y - 1] * 2, np.float32))
    coords = box.reshape(2, 2).astype(np.float32)
    labels = np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32)
    return coords, labels


def _deepest(region: np.ndarray) -> Tuple[np.ndarray, float]:
    """Euclidean distance of each region pixel to the nearest non-region pixel (outside the image counts)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    return dist, float(dist.max()) if region.any() else 0.0


def click_in_region(region: np.ndarray, rng: np.random.Generator, mode: str = "uniform") -> np.ndarray:
    """One (x, y) pixel of a non-empty 2D region: uniform, or the deepest (ties broken uniformly)."""
    region = _check_mask2d(region, "region")
    _check_mode(mode, "mode")
    if not region.any():
        raise ValueError("click_in_region: region is empty, there is no pixel to click")
    if mode == "uniform":
        flat = np.flatnonzero(region)
    else:
        dist, top = _deepest(region)
        flat = np.flatnonzero(region & (dist == top))
    idx = int(flat[rng.integers(flat.size)])
    row, col = divmod(idx, region.shape[1])
    return np.array([col, row], np.float32)


def corrective_click(
    gt: np.ndarray, pred: Optional[np.ndarray], rng: np.random.Generator, mode: str = "uniform"
) -> Tuple[np.ndarray, int]:
    """One corrective click ``((x, y), label)`` from the error regions of ``pred`` against ``gt``.

    ``pred=None`` is an empty prediction. Positive in a false negative, negative in a false positive; with no
    error, negative in the background (positive inside the target if the target fills the image).
    """
    gt = _check_mask2d(gt, "gt")
    _check_mode(mode, "mode")
    if pred is None:
        pred = np.zeros_like(gt)
    pred = _check_mask2d(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"corrective_click: pred has shape {pred.shape}, expected gt's {gt.shape}")
    fn = gt & ~pred
    fp = ~gt & pred
    if not fn.any() and not fp.any():
        if (~gt).any():
            return click_in_region(~gt, rng, "uniform"), LABEL_NEG
        return click_in_region(gt, rng, "uniform"), LABEL_POS
    if mode == "uniform":
        xy = click_in_region(fn | fp, rng, "uniform")
        return xy, LABEL_POS if fn[int(xy[1]), int(xy[0])] else LABEL_NEG
    _, d_fn = _deepest(fn)
    _, d_fp = _deepest(fp)
    if d_fn >= d_fp:  # ties go to the false negative (the missed target)
        return click_in_region(fn, rng, "center"), LABEL_POS
    return click_in_region(fp, rng, "center"), LABEL_NEG


def add_points(
    coords: np.ndarray, labels: np.ndarray, new_coords: np.ndarray, new_labels: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Write points into the first padding slots of one frame's ``(P, 2)`` / ``(P,)`` arrays (new copies)."""
    new_coords = np.asarray(new_coords, np.float32).reshape(-1, 2)
    new_labels = np.asarray(new_labels, np.int32).reshape(-1)
    if new_coords.shape[0] != new_labels.shape[0]:
        raise ValueError(f"add_points: {new_coords.shape[0]} coordinates but {new_labels.shape[0]} labels")
    free = np.flatnonzero(labels == LABEL_PAD)
    if free.size < new_labels.size:
        raise ValueError(
            f"add_points: {new_labels.size} point(s) do not fit, only {free.size} of num_points={labels.shape[0]} "
            "slots are free; raise num_points"
        )
    if free.size and free[0] != labels.shape[0] - free.size:
        raise ValueError("add_points: labels must hold real points first and padding (-1) after")
    coords, labels = coords.copy(), labels.copy()
    slots = free[: new_labels.size]
    coords[slots] = new_coords
    labels[slots] = new_labels
    return coords, labels


def _check_masks3d(masks, name: str = "masks") -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"{name} must have shape (T, S, S), got {masks.shape}")
    return masks.astype(bool, copy=False)


def _prompt_frame(out: SequencePrompts, t: int, kind: int, mask: np.ndarray, rng, click_mode: str, noise, bound) -> None:
    if kind == PROMPT_MASK:
        out.mask_inputs[t] = mask
        out.mask_valid[t] = True
    else:
        if kind == PROMPT_CLICK:
            coords, labels = click_in_region(mask, rng, click_mode)[None], np.array([LABEL_POS], np.int32)
        else:
            coords, labels = box_prompt(mask, rng, noise, bound)
        out.point_coords[t], out.point_labels[t] = add_points(out.point_coords[t], out.point_labels[t], coords, labels)
    out.prompted[t] = True


# ----------------------------------------------------------------------------------------------------------
# Training prompts.


def training_prompts(
    masks: np.ndarray,
    rng: np.random.Generator,
    cfg: PromptConfig = PromptConfig(),
    pred_masks: Optional[np.ndarray] = None,
) -> SequencePrompts:
    """Training prompts for a (T, S, S) ground-truth sequence whose first frame contains the target.

    ``pred_masks`` (T, S, S) bool, optional: predictions to draw corrective clicks from (empty if None).
    """
    masks = _check_masks3d(masks)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"training_prompts: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    num_frames, size = masks.shape[0], masks.shape[1]
    if not masks[0].any():
        raise ValueError("training_prompts: masks[0] is empty; the first frame must contain the target")
    if pred_masks is not None:
        pred_masks = np.asarray(pred_masks).astype(bool)
        if pred_masks.shape != masks.shape:
            raise ValueError(f"training_prompts: pred_masks has shape {pred_masks.shape}, expected {masks.shape}")
    out = empty_prompts(num_frames, cfg.num_points, size)
    u = rng.random()
    kind = PROMPT_MASK if u < cfg.p_mask else PROMPT_CLICK if u < cfg.p_mask + cfg.p_click else PROMPT_BOX
    bound = cfg.box_noise_bound_frac * size
    _prompt_frame(out, 0, kind, masks[0], rng, cfg.click_mode, cfg.box_noise, bound)

    n_correct = min(cfg.max_correct_frames, num_frames)
    if cfg.rand_correct_frames and n_correct > 1:
        n_correct = int(rng.integers(1, n_correct + 1))
    if kind == PROMPT_MASK and not cfg.correct_after_mask:
        n_correct = 0
    if n_correct > 0:
        others = rng.choice(np.arange(1, num_frames), size=n_correct - 1, replace=False) if n_correct > 1 else []
        out.correct_frames[[0, *[int(t) for t in others]]] = True
    if cfg.simulate_corrections:
        for t in np.flatnonzero(out.correct_frames):
            pred = None if pred_masks is None else pred_masks[t]
            for _ in range(cfg.correction_points_per_frame):
                xy, label = corrective_click(masks[t], pred, rng, cfg.correction_mode)
                out.point_coords[t], out.point_labels[t] = add_points(
                    out.point_coords[t], out.point_labels[t], xy[None], [label]
                )
            out.prompted[t] = True
    return out._replace(prompt_kind=kind)


# ----------------------------------------------------------------------------------------------------------
# Evaluation prompts.


def choose_prompt_frame(masks: np.ndarray, frame: Union[str, int] = "largest") -> int:
    """The frame to prompt: ``"largest"`` area (first on ties), ``"middle"`` of the target's frame extent,
    ``"first"`` frame with the target, or an explicit index (which must contain the target)."""
    masks = _check_masks3d(masks)
    area = masks.reshape(masks.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(area > 0)
    if present.size == 0:
        raise ValueError("choose_prompt_frame: the target is absent from every frame of masks")
    if isinstance(frame, (int, np.integer)) and not isinstance(frame, bool):
        t = int(frame)
        if not -masks.shape[0] <= t < masks.shape[0]:
            raise ValueError(f"choose_prompt_frame: frame={t} is outside 0..{masks.shape[0] - 1}")
        t %= masks.shape[0]
        if area[t] == 0:
            raise ValueError(f"choose_prompt_frame: frame={t} does not contain the target")
        return t
    if frame == "largest":
        return int(np.argmax(area))
    if frame == "first":
        return int(present[0])
    if frame == "middle":
        mid = (present[0] + present[-1]) / 2.0
        return int(present[np.argmin(np.abs(present - mid))])
    raise ValueError(f"choose_prompt_frame: frame must be 'largest', 'middle', 'first' or an int, got {frame!r}")


def evaluation_prompts(
    masks: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    frame: Union[str, int] = "largest",
    frequency: float = 0.0,
    num_points: int = 8,
    click_mode: str = "center",
    box_noise: float = 0.0,
    box_noise_bound: float = 0.0,
) -> SequencePrompts:
    """Evaluation prompts of one ``kind`` ("click", "box" or "mask") from ground truth (T, S, S).

    The chosen ``frame`` is always prompted; every other frame that contains the target is prompted with
    probability ``frequency``. ``correct_frames`` is all False.
    """
    masks = _check_masks3d(masks)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"evaluation_prompts: kind must be one of {sorted(PROMPT_KINDS)}, got {kind!r}")
    if not 0.0 <= frequency <= 1.0:
        raise ValueError(f"evaluation_prompts: frequency must be a probability in [0, 1], got {frequency!r}")
    _check_mode(click_mode, "click_mode")
    if num_points < 2:
        raise ValueError(f"evaluation_prompts: num_points must be >= 2 (a box takes 2 slots), got {num_points}")
    code = PROMPT_KINDS[kind]
    t0 = choose_prompt_frame(masks, frame)
    out = empty_prompts(masks.shape[0], num_points, masks.shape[1])
    present = masks.reshape(masks.shape[0], -1).any(axis=1)
    draws = rng.random(masks.shape[0])  # one draw per frame, whatever the frame holds: stable across kinds
    for t in range(masks.shape[0]):
        if t == t0 or (present[t] and draws[t] < frequency):
            _prompt_frame(out, t, code, masks[t], rng, click_mode, box_noise, box_noise_bound)
    return out._replace(prompt_kind=code)


# ----------------------------------------------------------------------------------------------------------
# Inside jit (the training loop, with predictions).


def corrective_click_jax(key, gt, pred):
    """Uniform corrective click inside ``jit``: ``gt``, ``pred`` (S, S) bool -> ((x, y) float32, label int32).

    A uniformly chosen pixel of the error region ``gt xor pred``; label 1 where it is a false negative, 0 where
    a false positive. With no error, a negative click in the background (``~gt``), and if ``gt`` fills the
    image a positive click anywhere. Same rule as :func:`corrective_click` with ``mode="uniform"``.
    """
    import jax
    import jax.numpy as jnp

    gt = jnp.asarray(gt, bool)
    pred = jnp.asarray(pred, bool)
    err = gt ^ pred
    region = jnp.where(err.any(), err, ~gt)
    region = jnp.where(region.any(), region, jnp.ones_like(region))
    logits = jnp.where(region.reshape(-1), 0.0, -jnp.inf)
    idx = jax.random.categorical(key, logits)
    width = gt.shape[1]
    xy = jnp.stack([idx % width, idx // width]).astype(jnp.float32)
    label = gt.reshape(-1)[idx].astype(jnp.int32)
    return xy, label


def add_point_jax(coords, labels, xy, label):
    """Write one point into the first padding slot of ``(P, 2)`` / ``(P,)`` arrays inside ``jit``.

    If every slot is taken the arrays come back unchanged (a fixed shape cannot grow; size P for the clicks
    the loop will add).
    """
    import jax.numpy as jnp

    free = labels == LABEL_PAD
    slot = jnp.argmax(free)
    ok = free[slot]
    coords = coords.at[slot].set(jnp.where(ok, jnp.asarray(xy, coords.dtype), coords[slot]))
    labels = labels.at[slot].set(jnp.where(ok, jnp.asarray(label, labels.dtype), labels[slot]))
    return coords, labels
