"""3D segmentation: a preprocessed volume as slice sequences in six orientations, one prompt, one 3D result.

The paper (§3.3) treats a volume as slice sequences along six orientations — axial, coronal, sagittal, each
forward and reversed — processes them with the self-sorting memory bank and aggregates the per-orientation
predictions voxel-wise (mean or majority vote). This module does that on the output of
:func:`medsam2_jax.data.preprocess.preprocess_case` (``pre.image`` ``(n, S, S, 3)``, ``pre.grid``) from a
single prompt (clicks, a box or a mask) on one slice of the preprocessed stack::

    pre = preprocess_case(volume, None, "CT")
    probs = segment_volume(model, pre, {"slice": 40, "points": [[120, 96]], "labels": [1]})   # (n, S, S)
    on_canonical_grid = to_original_grid(probs > 0.5, pre.grid)   # medsam2_jax.data.preprocess

Orientations and how their frames are built (our decisions; the paper gives none)
--------------------------------------------------------------------------------
Orientations are named in the coordinates of the preprocessed stack ``(slice, row, col)``: ``axial`` steps
along the stack's slicing axis (for usual CT the anatomical axial direction; for a volume sliced along
another axis by the preprocessing, "axial" means *that* axis), ``coronal`` along its rows, ``sagittal``
along its columns. ``*_rev`` is the same sequence reversed. :data:`ORIENTATIONS` lists them in the paper's
order (1-6).

* **Axial frames** are the preprocessed slices themselves (``n`` frames of ``S x S``).
* **Coronal / sagittal frames** are sections of the stack at ``T`` positions along the row (column) axis;
  each section is ``n x S`` (slices x the other in-plane axis) and its slice axis is resampled to ``S``
  (``interp="linear"``: half-pixel-centred linear interpolation, antialiased when ``n > S``; or
  ``"nearest"``), so that every frame is ``S x S`` as the model needs. Rows of such a frame are slices
  (slice 0 on top), its columns the stack's columns (coronal) or rows (sagittal). No anatomical flip is
  applied. ``T`` defaults to the number of voxels of the *original* crop along that axis
  (``pre.grid.crop_hw``, at most ``S``): the in-plane resize to ``S`` added no information, so a frame per
  original voxel keeps the real resolution without repeating near-identical sections. Frame ``t`` sits at
  position ``nearest_indices(S, T)[t]`` (the centre of its cell).
* **Back to the stack** (:func:`from_orientation`): the frame's slice axis is resampled ``S -> n``
  (linear, antialiased; or nearest), and each of the ``S`` stack positions takes the frame nearest to it.
  Exactness: with ``T = S``, ``n <= S`` and ``"nearest"`` both ways, ``from_orientation(to_orientation(x))``
  is ``x`` bit for bit for every orientation; for ``T < S`` the frames survive the round trip:
  ``to_orientation(from_orientation(f)) == f`` for ``f = to_orientation(x, T, "nearest")`` (nearest there
  and back is the identity when ``T <= S``).

Prompts across orientations
---------------------------
The user prompts one axial slice ``z``. The ``axial`` sequence is tracked forward from ``z`` (slices
``z..n-1``) and ``axial_rev`` backward (``z..0``): a prompted orientation starts at its prompted frame, as in
SAM 2, so each orientation covers the part of the volume on its side of the prompt and the pair covers
it all. Coronal and sagittal need a prompt too: the axial pair is run first (stage 1), its probabilities
are thresholded (``threshold``) and taken to each of those orientations; the frame with the **largest
cross-section** of that mask gets the mask as a prompt (if the axial pass found nothing, the frame through
the user's prompt gets an empty mask, i.e. "object absent"). Both directions of an axis share its
prompted frame.

How the bank carries information across orientations (``bank_scope``)
----------------------------------------------------------------------
* ``"shared"`` (default for the ``self_sorting`` policy): **one bank persists across the orientation
  passes**. The orientation sequences are concatenated, in ``orientations`` order, into one pseudo-video
  (each starting at its prompted frame; a second direction of the same axis skips the shared prompted
  frame) with the three prompted frames as conditioning frames, and tracked in one forward ``lax.scan``.
  This is the paper's "combined input X" whose embeddings the self-sorting bank "orders across
  orientations by confidence and dissimilarity": confident entries of earlier orientations stay in the
  bank while they are dissimilar to the rest, and resampling (eq. 4) draws the entries most similar to the
  current frame, whatever orientation they came from. As in SAM 2, every prompted frame's memory is
  attended at every step of the pass (so axial frames also see the coronal and sagittal prompts' masks),
  while a prompted frame's object pointer is used only once the pass has reached it. The axial pair is
  thus run twice (stage 1 for the prompts, then inside the combined pass); the encoder features are
  computed once per axis and reused (about 1 MB per frame at S = 256, held for the whole volume).
* ``reuse_axial=True`` (what ``medsam2-segment`` runs by default): the stage-1 axial runs *are* the
  ``axial`` / ``axial_rev`` results, and the combined pass holds only the coronal and sagittal blocks (one
  bank across those four). The axial pair is tracked once instead of twice, at the price of the axial
  frames not attending to the coronal / sagittal prompts' memories. On a 181 x 217 x 181 MR phantom (random
  weights, 32 sections per coronal/sagittal axis) it saved 181 of 427 tracker steps and changed the
  aggregated probabilities by 1e-4 on average (at most 0.002; Dice 0.988 of the thresholded masks) against
  the same settings without it (README, segment section).
* ``"per_orientation"`` (default for ``fifo``): a fresh bank per orientation; information crosses
  orientations only through the derived prompts and the aggregation. This is what SAM 2's FIFO can do
  sensibly (its recency window across an orientation switch would attend to unrelated slices), and the
  runs are independent. ``"auto"`` picks by the bank policy.

Aggregation (``aggregation``)
-----------------------------
Each orientation yields probabilities (sigmoid of the mask logits at ``S x S``) for the frames it visited,
taken back to the stack. ``"mean"``: per voxel, the mean probability over the orientations that visited
it. ``"vote"``: per voxel, the fraction of those orientations whose probability exceeds ``threshold``
(majority: ``> 0.5``). Voxels no orientation visited get 0. Both are computed in float64, so aggregating
identical predictions returns them unchanged (bit for bit).

Static shapes
-------------
Every run is padded at its end to a multiple of ``length_bucket`` frames (zero features; a forward scan
processes them after the real frames, so they change nothing before them), so volumes of different sizes
share a few compiled programs. A bucket of 16 also fixes SAM 2's pointer time scale
(``min(num_frames, 16) - 1``) at 15 for every run. The random key of run ``r`` is
``fold_in(key, r)`` (``r`` = orientation index in :data:`ORIENTATIONS` for single-orientation runs —
stage 1, ``per_orientation``, or a one-orientation config — and 6 for the combined run).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .data import preprocess as prep
from .model.sam2 import SAM2, resize_bilinear
from .tracking import (TrackerConfig, bucketed, concat_frames, encode_frames, make_prompts, pad_frames,
                       run_sequence, take_frames)

#: The six orientations, in the paper's order (§3.3, 1-6).
ORIENTATIONS = ("axial", "coronal", "sagittal", "axial_rev", "coronal_rev", "sagittal_rev")
_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
AGGREGATIONS = ("mean", "vote")
BANK_SCOPES = ("auto", "shared", "per_orientation")
INTERPOLATIONS = ("linear", "nearest")


def _parse(orientation: str) -> tuple[int, bool]:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    base, _, rev = orientation.partition("_")
    return _AXIS[base], bool(rev)


@dataclasses.dataclass(frozen=True)
class VolumeConfig:
    """How a volume is segmented (see the module docstring for each choice).

    ``orientations``: which of :data:`ORIENTATIONS` to run, in processing order (default all six, paper
    order). ``bank_scope``: ``"shared"`` / ``"per_orientation"`` / ``"auto"`` (shared for self_sorting).
    ``aggregation``: ``"mean"`` or ``"vote"``. ``frames``: frames per coronal/sagittal sequence (None: one
    per voxel of the original crop along that axis, at most S). ``interp``: how a coronal/sagittal frame's
    slice axis is resampled to S. ``threshold``: probability cut for derived prompts and votes.
    ``length_bucket``: pad every run to a multiple of this many frames (None: no padding). ``max_frames``: with
    ``frames=None``, at most this many coronal / sagittal sections (None: one per voxel of the crop; the
    command's default is 32). ``reuse_axial``: take the axial orientations from the stage-1 runs instead of
    tracking them again in the combined pass (see "How the bank carries information").
    ``tracker``: the tracker's settings, including the bank (default: the paper's self-sorting bank).
    """

    orientations: tuple[str, ...] = ORIENTATIONS
    bank_scope: str = "auto"
    aggregation: str = "mean"
    frames: int | None = None
    interp: str = "linear"
    threshold: float = 0.5
    length_bucket: int | None = 16
    max_frames: int | None = None
    reuse_axial: bool = False
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)

    def __post_init__(self):
        def bad(field, value, expected):
            raise ValueError(f"VolumeConfig.{field}: got {value!r}, expected {expected}")

        if isinstance(self.orientations, str) or not self.orientations:
            bad("orientations", self.orientations, f"a non-empty tuple of names from {ORIENTATIONS}")
        for o in self.orientations:
            if o not in ORIENTATIONS:
                bad("orientations", self.orientations, f"names from {ORIENTATIONS}")
        if len(set(self.orientations)) != len(self.orientations):
            bad("orientations", self.orientations, "each orientation at most once")
        if self.bank_scope not in BANK_SCOPES:
            bad("bank_scope", self.bank_scope, f"one of {BANK_SCOPES}")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", self.aggregation, f"one of {AGGREGATIONS}")
        if self.interp not in INTERPOLATIONS:
            bad("interp", self.interp, f"one of {INTERPOLATIONS}")
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            bad("frames", self.frames, "None or an int >= 1")
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            bad("max_frames", self.max_frames, "None or an int >= 1")
        if not isinstance(self.reuse_axial, bool):
            bad("reuse_axial", self.reuse_axial, "a bool")
        if not (0.0 < float(self.threshold) < 1.0):
            bad("threshold", self.threshold, "a probability in (0, 1)")
        if self.length_bucket is not None and (not isinstance(self.length_bucket, int) or self.length_bucket < 1):
            bad("length_bucket", self.length_bucket, "None or an int >= 1")
        if not isinstance(self.tracker, TrackerConfig):
            bad("tracker", type(self.tracker).__name__, "a TrackerConfig")

    @property
    def scope(self) -> str:
        """The effective bank scope (``"auto"`` resolved by the bank policy)."""
        if self.bank_scope != "auto":
            return self.bank_scope
        return "shared" if self.tracker.bank.policy == "self_sorting" else "per_orientation"


# ---------------------------------------------------------------------------------------------- geometry
def _resample_axis(x: np.ndarray, axis: int, n_out: int, method: str) -> np.ndarray:
    """Resample one axis of ``x`` to ``n_out`` (half-pixel centres; ``"linear"`` antialiased when shrinking)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    if method == "nearest":
        return np.take(x, prep.nearest_indices(n_in, n_out), axis=axis)
    w = prep.resize_weights(n_in, n_out, "linear").astype(np.float32)
    out = np.tensordot(w, x.astype(np.float32), axes=([1], [axis]))  # new axis first
    return np.moveaxis(out, 0, axis)


def frame_positions(size: int, num_frames: int) -> np.ndarray:
    """Stack positions (0..size-1) of ``num_frames`` evenly spaced sections: the centre of each cell."""
    if not 1 <= num_frames <= size:
        raise ValueError(f"num_frames must be in [1, {size}] (the stack's extent along that axis), got {num_frames}")
    return prep.nearest_indices(size, num_frames)


def to_orientation(stack: np.ndarray, orientation: str, num_frames: int | None = None,
                   method: str = "linear") -> np.ndarray:
    """The frames of one orientation: ``(n, S, S, ...)`` stack -> ``(T, S, S, ...)``.

    Axial: the slices (``num_frames`` must be None or n). Coronal / sagittal: ``T = num_frames`` (None:
    S) sections along the rows / columns, each ``n x S`` resampled to ``S x S`` along the slice axis with
    ``method`` (``"linear"`` or ``"nearest"``). ``*_rev``: the same frames in reverse order.
    """
    axis, rev = _parse(orientation)
    stack = np.asarray(stack)
    if stack.ndim < 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"stack must be (n, S, S, ...), got shape {stack.shape}")
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {INTERPOLATIONS}, got {method!r}")
    n, s = stack.shape[:2]
    if axis == 0:
        if num_frames not in (None, n):
            raise ValueError(f"axial frames are the {n} slices; num_frames must be None or {n}, got {num_frames}")
        frames = stack
    else:
        pos = frame_positions(s, s if num_frames is None else num_frames)
        sub = np.take(stack, pos, axis=axis)  # coronal (n, T, S, ...), sagittal (n, S, T, ...)
        order = (1, 0, 2) if axis == 1 else (2, 0, 1)
        sub = np.transpose(sub, order + tuple(range(3, sub.ndim)))  # (T, n, S, ...)
        frames = _resample_axis(sub, 1, s, method)
    return np.ascontiguousarray(frames[::-1] if rev else frames)


def from_orientation(frames: np.ndarray, orientation: str, n_slices: int, method: str = "linear") -> np.ndarray:
    """Inverse of :func:`to_orientation`: ``(T, S, S, ...)`` frames -> ``(n, S, S, ...)`` stack.

    Coronal / sagittal: each frame's slice axis is resampled ``S -> n`` (``"linear"``, antialiased, or
    ``"nearest"``; booleans need ``"nearest"``) and every stack position takes the nearest frame.
    """
    axis, rev = _parse(orientation)
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[1] != frames.shape[2]:
        raise ValueError(f"frames must be (T, S, S, ...), got shape {frames.shape}")
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {INTERPOLATIONS}, got {method!r}")
    t, s = frames.shape[:2]
    if rev:
        frames = frames[::-1]
    if axis == 0:
        if t != n_slices:
            raise ValueError(f"axial frames: got {t} frames for a stack of {n_slices} slices")
        return np.ascontiguousarray(frames)
    if t > s:
        raise ValueError(f"{orientation}: {t} frames exceed the stack extent S={s}")
    sub = _resample_axis(frames, 1, n_slices, method)  # (T, n, S, ...)
    sub = np.take(sub, prep.nearest_indices(t, s), axis=0)  # (S positions, n, S, ...)
    order = (1, 0, 2) if axis == 1 else (1, 2, 0)
    return np.ascontiguousarray(np.transpose(sub, order + tuple(range(3, sub.ndim))))


def aggregate(probs: np.ndarray | Sequence[np.ndarray], visited: np.ndarray | Sequence[np.ndarray] | None = None,
              method: str = "mean", threshold: float = 0.5) -> np.ndarray:
    """Voxel-wise aggregation of ``(O, n, S, S)`` per-orientation probabilities (float32 result).

    ``probs`` (and ``visited``) may also be a sequence of ``O`` arrays of one shape (nothing is stacked).
    ``visited`` ``(O, n, S, S)`` bool (default all True) says which orientation saw which voxel. ``"mean"``:
    mean probability over the orientations that saw the voxel; ``"vote"``: fraction of them with
    probability ``> threshold``. 0 where none did. Accumulated in float64, one orientation at a time (so a
    whole volume never holds ``O`` float64 copies): identical inputs come back unchanged.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")
    ps = list(probs) if isinstance(probs, (list, tuple)) else np.asarray(probs)
    if isinstance(ps, np.ndarray) and ps.ndim < 2:
        raise ValueError(f"probs must be (orientations, ...), got shape {ps.shape}")
    if not len(ps):
        raise ValueError("probs is empty: give at least one orientation")
    shape = (len(ps),) + tuple(np.shape(ps[0]))
    if any(np.shape(q) != shape[1:] for q in ps):
        raise ValueError(f"probs must be (orientations, ...) of one shape, got {[np.shape(q) for q in ps]}")
    if visited is not None:
        vs = list(visited) if isinstance(visited, (list, tuple)) else np.asarray(visited, bool)
        vshape = (len(vs),) + tuple(np.shape(vs[0])) if len(vs) else (0,)
        if vshape != shape or any(np.shape(v) != shape[1:] for v in vs):
            raise ValueError(f"visited has shape {vshape}, expected the shape of probs {shape}")
    total = np.zeros(shape[1:], np.float64)
    count = np.zeros(shape[1:], np.int32) if visited is not None else None
    for i, q in enumerate(ps):
        val = np.asarray(q, np.float64) if method == "mean" else (np.asarray(q) > threshold).astype(np.float64)
        if visited is None:
            total += val
        else:
            v = np.asarray(vs[i], bool)
            total += np.where(v, val, 0.0)
            count += v
    if count is None:
        return (total / len(ps)).astype(np.float32)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- running
def _probs(model: SAM2, low_res: jax.Array) -> np.ndarray:
    s = model.image_size
    return np.asarray(jax.nn.sigmoid(resize_bilinear(low_res, (s, s), antialias=False)))


def _track_blocks(model: SAM2, feats: dict[str, Any], prompts: list[dict], key: jax.Array, cfg: VolumeConfig
                  ) -> dict[str, Any]:
    """Track one sequence forward from its frame 0 (prompted); returns numpy outputs of the real frames."""
    t = feats["fpn"][0].shape[0]
    length = bucketed(t, cfg.length_bucket)
    p = make_prompts([prompts], num_frames=length, image_size=model.image_size, config=cfg.tracker)
    out = run_sequence(model, pad_frames(feats, length), p, key, cfg.tracker, "forward")
    return {
        "probs": _probs(model, out["low_res_masks"][0, :t]),
        "visited": np.asarray(out["visited"][0, :t]),
        "iou": np.asarray(out["iou"][0, :t]),
        "object_score_logits": np.asarray(out["object_score_logits"][0, :t]),
        "trace": {k: np.asarray(v[:, 0]) for k, v in out["trace"].items()},
        "length": t,
        "padded_length": length,
    }


@dataclasses.dataclass
class OrientationOutput:
    """One orientation's result. ``frame_probs`` / ``frame_visited``: in the orientation's own frames
    ``(T, S, S)`` / ``(T,)``; ``probs`` / ``visited``: taken back to the stack ``(n, S, S)``;
    ``prompt_frame``: its prompted frame (own order); ``prompt_mask``: the derived mask prompt (None for
    the user's prompt)."""

    name: str
    frame_probs: np.ndarray
    frame_visited: np.ndarray
    probs: np.ndarray
    visited: np.ndarray
    prompt_frame: int
    prompt_mask: np.ndarray | None


@dataclasses.dataclass
class VolumeResult:
    """``probs`` ``(n, S, S)`` float32 aggregated; ``count`` ``(n, S, S)`` how many orientations saw each
    voxel; ``orientations`` per-orientation outputs; ``runs``: each tracker call (its orientations, lengths,
    per-step bank ``trace``)."""

    probs: np.ndarray
    count: np.ndarray
    orientations: dict[str, OrientationOutput]
    runs: list[dict[str, Any]]
    scope: str


def _check_prompt(prompt: Mapping[str, Any], n: int, s: int) -> tuple[int, dict]:
    if not isinstance(prompt, Mapping):
        raise ValueError("prompt must be a dict with 'slice' and points/labels, box or mask, "
                         f"got {type(prompt).__name__}")
    z = prompt.get("slice", prompt.get("frame"))
    if not isinstance(z, (int, np.integer)) or not 0 <= int(z) < n:
        raise ValueError(f"prompt['slice'] must be an axial slice index in [0, {n - 1}], got {z!r}")
    body = {k: v for k, v in prompt.items() if k not in ("slice", "frame")}
    unknown = set(body) - {"points", "labels", "box", "mask"}
    if unknown:
        raise ValueError(f"prompt has unknown keys {sorted(unknown)}; expected 'slice' with points/labels, box or mask")
    if body.get("mask") is not None and np.shape(body["mask"]) != (s, s):
        raise ValueError(f"prompt['mask'] must be {s}x{s} (the preprocessed slice), got shape {np.shape(body['mask'])}")
    return int(z), body


def _anchor(body: dict, s: int) -> tuple[float, float]:
    """(row, col) of the user's prompt on its slice: mean positive click, box centre or mask centroid."""
    if body.get("mask") is not None:
        rr, cc = np.nonzero(np.asarray(body["mask"]) > 0)
        if rr.size:
            return float(rr.mean()), float(cc.mean())
    if body.get("points") is not None:
        pts = np.asarray(body["points"], np.float64).reshape(-1, 2)
        lab = np.asarray(body.get("labels", np.ones(len(pts))), np.int64).reshape(-1)
        pos = pts[lab == 1] if np.any(lab == 1) else pts
        return float(pos[:, 1].mean()), float(pos[:, 0].mean())
    if body.get("box") is not None:
        x0, y0, x1, y1 = np.asarray(body["box"], np.float64).reshape(4)
        return (y0 + y1) / 2, (x0 + x1) / 2
    return (s - 1) / 2, (s - 1) / 2


def _image_and_frames(pre: Any, cfg: VolumeConfig, s: int) -> tuple[np.ndarray, dict[int, int]]:
    image = np.asarray(pre.image if hasattr(pre, "image") else pre, np.float32)
    if image.ndim != 4 or image.shape[1:] != (s, s, 3):
        raise ValueError(f"the volume must be (n, {s}, {s}, 3) preprocessed slices for this model, got {image.shape}")
    grid = getattr(pre, "grid", None)
    frames = {}
    for axis in (1, 2):
        if cfg.frames is not None:
            t = cfg.frames
        elif grid is not None and getattr(grid, "dim", 3) == 3:
            t = grid.crop_hw[axis - 1]
        else:
            t = s
        if cfg.frames is None and cfg.max_frames is not None:
            t = min(t, cfg.max_frames)
        frames[axis] = int(min(t, s))
    if cfg.frames is not None and cfg.frames > s:
        raise ValueError(f"VolumeConfig.frames={cfg.frames} exceeds the frame size S={s}")
    return image, frames


def segment_volume_detailed(model: SAM2, pre: Any, prompt: Mapping[str, Any], config: VolumeConfig = VolumeConfig(),
                            *, key: jax.Array | None = None) -> VolumeResult:
    """:func:`segment_volume` with everything it computed (per-orientation outputs, traces)."""
    cfg = config
    s = model.image_size
    image, nframes = _image_and_frames(pre, cfg, s)
    n = image.shape[0]
    z, body = _check_prompt(prompt, n, s)
    key = jax.random.key(0) if key is None else key
    tb = cfg.tracker.encode_batch
    wanted = [_parse(o) for o in cfg.orientations]
    axes_needed = sorted({a for a, _ in wanted} | ({0} if any(a != 0 for a, _ in wanted) else set()))

    # Frames and encoder features, once per axis (both directions of an axis index into the same features).
    axis_frames = {0: image}
    for a in axes_needed:
        if a:
            axis_frames[a] = to_orientation(image, ORIENTATIONS[a], nframes[a], cfg.interp)
    feats = {a: encode_frames(model, jnp.asarray(axis_frames[a]), batch=tb, devices=cfg.tracker.encode_devices)
             for a in axes_needed}
    length = {a: axis_frames[a].shape[0] for a in axes_needed}

    def block_idx(axis: int, rev: bool, start: int) -> np.ndarray:
        return np.arange(start, -1, -1) if rev else np.arange(start, length[axis])

    runs: list[dict[str, Any]] = []
    single: dict[str, dict[str, Any]] = {}

    def run_single(o: str, start: int, pr: dict) -> dict[str, Any]:
        if o not in single:
            a, rev = _parse(o)
            idx = block_idx(a, rev, start)
            out = _track_blocks(model, take_frames(feats[a], idx), [dict(pr, frame=0)],
                                jax.random.fold_in(key, ORIENTATIONS.index(o)), cfg)
            out.update(orientations=(o,), frames=idx)
            runs.append(out)
            single[o] = out
        return single[o]

    # Prompts: the user's on axial slice z; derived masks on coronal / sagittal (stage 1: the axial pair).
    start = {0: z}
    prompt_of = {0: body}
    derived: dict[int, np.ndarray] = {}
    if any(a != 0 for a in axes_needed):
        fwd, bwd = run_single("axial", z, body), run_single("axial_rev", z, body)
        p_ax = np.zeros((n, s, s), np.float32)
        p_ax[fwd["frames"]] = fwd["probs"]
        p_ax[bwd["frames"]] = bwd["probs"]
        mask3d = p_ax > cfg.threshold
        row, col = _anchor(body, s)
        for a in axes_needed:
            if not a:
                continue
            m = to_orientation(mask3d, ORIENTATIONS[a], nframes[a], "nearest")
            area = m.reshape(m.shape[0], -1).sum(axis=1)
            if area.max() > 0:
                p = int(np.argmax(area))
            else:  # nothing found on the axial pass: the frame through the user's prompt, "object absent"
                pos = frame_positions(s, nframes[a])
                p = int(np.argmin(np.abs(pos - (row if a == 1 else col))))
            start[a], derived[a] = p, m[p]
            prompt_of[a] = {"mask": m[p].astype(np.float32)}

    def own_frame(o: str) -> int:
        a, rev = _parse(o)
        return length[a] - 1 - start[a] if rev else start[a]

    outputs: dict[str, OrientationOutput] = {}

    def record(o: str, idx: np.ndarray, probs: np.ndarray, visited: np.ndarray) -> None:
        a, rev = _parse(o)
        t = length[a]
        fp = np.zeros((t, s, s), np.float32)
        fv = np.zeros((t,), bool)
        own = (t - 1 - idx) if rev else idx
        fp[own] = probs
        fv[own] = visited
        stack_p = from_orientation(fp, o, n, cfg.interp)
        stack_v = from_orientation(np.broadcast_to(fv[:, None, None], (t, s, s)), o, n, "nearest")
        outputs[o] = OrientationOutput(o, fp, fv, stack_p, stack_v, own_frame(o), derived.get(a))

    combined = list(cfg.orientations)
    if cfg.reuse_axial and "axial" in single and "axial_rev" in single:
        # The stage-1 runs are the axial orientations' result; the shared bank spans the other axes only.
        for o in [o for o in combined if _parse(o)[0] == 0]:
            record(o, single[o]["frames"], single[o]["probs"], single[o]["visited"])
        combined = [o for o in combined if _parse(o)[0] != 0]
    if cfg.scope == "per_orientation" or len(combined) <= 1:  # one orientation: one bank either way
        for o in combined:
            a, _ = _parse(o)
            out = run_single(o, start[a], prompt_of[a])
            record(o, out["frames"], out["probs"], out["visited"])
    else:
        parts, blocks, prompts, seen, offset = [], [], [], {}, 0
        for o in combined:
            a, rev = _parse(o)
            first = a not in seen
            b0 = start[a] if first else (start[a] - 1 if rev else start[a] + 1)
            idx = block_idx(a, rev, b0) if 0 <= b0 < length[a] else np.zeros((0,), np.int64)
            if first:
                seen[a] = offset
                prompts.append(dict(prompt_of[a], frame=offset))
            blocks.append((o, a, idx, offset, first))
            if idx.size:
                parts.append(take_frames(feats[a], idx))
            offset += idx.size
        if len(prompts) > cfg.tracker.max_cond_frames:
            raise ValueError(f"{len(prompts)} prompted frames in the combined pass exceed "
                             f"TrackerConfig.max_cond_frames={cfg.tracker.max_cond_frames}")
        out = _track_blocks(model, concat_frames(parts), prompts, jax.random.fold_in(key, len(ORIENTATIONS)), cfg)
        out.update(orientations=tuple(combined), frames=None,
                   blocks=[(o, int(off), int(idx.size)) for o, _, idx, off, _ in blocks])
        runs.append(out)
        for o, a, idx, off, first in blocks:
            pr, vi = out["probs"][off:off + idx.size], out["visited"][off:off + idx.size]
            if not first:  # the shared prompted frame, output by the axis's first block
                q = seen[a]
                idx = np.concatenate([[start[a]], idx])
                pr = np.concatenate([out["probs"][q:q + 1], pr])
                vi = np.concatenate([out["visited"][q:q + 1], vi])
            record(o, idx, pr, vi)

    names = list(cfg.orientations)
    probs = aggregate([outputs[o].probs for o in names], [outputs[o].visited for o in names], cfg.aggregation,
                      cfg.threshold)
    count = np.sum([outputs[o].visited for o in names], axis=0).astype(np.int32)
    return VolumeResult(probs, count, {o: outputs[o] for o in names}, runs, cfg.scope)


def segment_volume(model: SAM2, pre: Any, prompt: Mapping[str, Any], config: VolumeConfig = VolumeConfig(),
                   *, key: jax.Array | None = None) -> np.ndarray:
    """Segment one object in a preprocessed volume from one prompt on one axial slice.

    ``pre``: a :class:`~medsam2_jax.data.preprocess.Preprocessed` (or its ``(n, S, S, 3)`` image);
    ``prompt``: ``{"slice": z, "points": (k, 2) xy, "labels": (k,)}``, ``{"slice": z, "box": xyxy}`` or
    ``{"slice": z, "mask": (S, S)}`` in the preprocessed slice's pixels. Returns ``(n, S, S)`` float32
    probabilities aggregated over ``config.orientations`` (threshold at 0.5 for a mask).
    """
    return segment_volume_detailed(model, pre, prompt, config, key=key).probs


__all__ = [
    "ORIENTATIONS", "VolumeConfig", "VolumeResult", "OrientationOutput", "segment_volume",
    "segment_volume_detailed", "to_orientation", "from_orientation", "aggregate",
    "frame_positions",
]
