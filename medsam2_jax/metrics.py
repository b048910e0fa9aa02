"""Segmentation metrics on the host (NumPy/SciPy): Dice, IoU and the 95th-percentile Hausdorff distance.

All functions take binary masks of the same shape (2D or 3D; any array-like, JAX arrays included; a voxel is
foreground when it is non-zero) and, for the distances, the voxel ``spacing`` in mm, one value per axis
(in the array's axis order, e.g. ``Volume.spacing`` for a canonical volume, or the column norms of a NIfTI
affine's 3 x 3 block for the file's own grid).

Definitions
-----------
* ``dice = 2 |P ∩ G| / (|P| + |G|)``, ``iou = |P ∩ G| / |P ∪ G|`` (no smoothing term).
* **Surface**: the foreground voxels with at least one face-neighbour (4-neighbourhood in 2D, 6 in 3D) in the
  background; voxels on the array's border count as surface (outside the array is background).
* **Directed surface distances** from P to G: for every surface voxel of P, the Euclidean distance in mm
  (``spacing`` applied) from its centre to the nearest surface-voxel centre of G, computed exactly with
  ``scipy.ndimage.distance_transform_edt`` on G's surface complement.
* ``hd95 = max(q95(d(P -> G)), q95(d(G -> P)))``, ``q95`` being NumPy's default (linear) 95th percentile: the
  convention of MedPy and MONAI (per-direction percentile, then the larger of the two). ``hausdorff`` with
  ``percentile=100`` is the classical Hausdorff distance.

Empty masks (documented conventions, the same everywhere in this module)
-------------------------------------------------------------------------
* Both empty: ``dice = iou = 1``, ``hd95 = 0`` (a correct "absent" prediction).
* Exactly one empty: ``dice = iou = 0``, ``hd95 = inf`` (the distance to an empty surface is unbounded:
  a missed or hallucinated object is the worst case). ``inf`` keeps means honest (a mean over cases with a
  miss is ``inf``); filter with ``np.isfinite`` when a finite summary is wanted, and count the misses.

Against MONAI (``monai.metrics``; tests/test_metrics_monai.py)
-------------------------------------------------------------
On non-empty masks ``dice`` equals ``compute_dice``/``DiceMetric`` and ``hd95``/``hausdorff`` equal
``compute_hausdorff_distance(percentile=..., spacing=...)`` (same surfaces, distances and linear percentile;
MONAI computes in float32, so within ~1e-7 relative). MONAI's empty-mask conventions differ:

* ``compute_dice`` with its default ``ignore_empty=True`` gives NaN whenever the ground truth is empty
  (ours: 1.0 when the prediction is empty too, else 0.0); with ``ignore_empty=False`` it is ours exactly.
* ``compute_hausdorff_distance`` gives NaN when both masks are empty (ours: 0.0), and NaN for a percentile
  with exactly one empty mask (its directed distances are all ``inf`` and ``torch.quantile`` interpolates
  ``inf - inf``; ours: ``inf``); its maximum (``percentile=None``) is ``inf`` there, as our
  ``hausdorff(..., percentile=100)``. MONAI also treats ``percentile=0`` as "no percentile" (the maximum),
  where ours is the 0th percentile (the minimum).

Batched helpers: :func:`per_slice_overlap` (Dice/IoU of every slice along an axis), :func:`per_class_metrics`
(label maps, one entry per class) and :func:`binary_metrics` (all three at once).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "dice",
    "iou",
    "surface",
    "surface_distances",
    "hausdorff",
    "hd95",
    "binary_metrics",
    "per_slice_overlap",
    "per_class_metrics",
    "spacing_from_affine",
]


# ---------------------------------------------------------------------------------------------- validation
def _as_mask(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric or boolean array, got dtype object")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; pass a binary mask (threshold logits first)")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric or boolean array, got dtype {arr.dtype}")
    return arr != 0


def _pair(pred: Any, gt: Any, dims: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {p.shape} and gt {g.shape}")
    if dims is not None and p.ndim not in dims:
        raise ValueError(f"pred and gt must be {' or '.join(f'{d}D' for d in dims)} masks, got shape {p.shape}")
    return p, g


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1 and ndim > 1:
        sp = np.repeat(sp, ndim)
    if sp.shape != (ndim,):
        raise ValueError(f"spacing must give one value per axis ({ndim} for these masks), got {np.asarray(spacing)!r}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be finite and > 0 (mm per voxel), got {sp.tolist()}")
    return sp


# ---------------------------------------------------------------------------------------------- overlap
def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient of two binary masks (both empty: 1.0; one empty: 0.0)."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union (Jaccard) of two binary masks (both empty: 1.0; one empty: 0.0)."""
    p, g = _pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, g).sum()) / union


def per_slice_overlap(pred: Any, gt: Any, axis: int = 0) -> dict[str, np.ndarray]:
    """Dice and IoU of every slice along ``axis`` (vectorised), with the empty-mask conventions per slice.

    Returns ``{"dice", "iou", "pred_area", "gt_area"}``, each of length ``shape[axis]`` (areas in voxels).
    """
    p, g = _pair(pred, gt)
    if p.ndim < 2:
        raise ValueError(f"per_slice_overlap needs masks with at least 2 axes, got shape {p.shape}")
    if not -p.ndim <= axis < p.ndim:
        raise ValueError(f"axis={axis} is out of range for masks of shape {p.shape}")
    p = np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)
    g = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
    inter = np.logical_and(p, g).sum(1)
    ps, gs = p.sum(1), g.sum(1)
    union = ps + gs - inter
    total = ps + gs
    d = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return {"dice": d, "iou": j, "pred_area": ps, "gt_area": gs}


# ---------------------------------------------------------------------------------------------- distances
def surface(mask: Any) -> np.ndarray:
    """Surface voxels of a binary mask: foreground voxels with a background face-neighbour (the array's
    border counts as background)."""
    m = _as_mask(mask, "mask")
    if m.ndim == 0:
        raise ValueError("mask must have at least one axis")
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``mask``, grown by one voxel (clipped to the array)."""
    out = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        out.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, mask.shape[ax])))
    return tuple(out)


def surface_distances(pred: Any, gt: Any, spacing: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d(pred -> gt), d(gt -> pred))``, one value per surface voxel.

    Both masks must be non-empty (the distances to an empty surface do not exist). The computation is
    restricted to the joint bounding box grown by one voxel, which changes nothing: every surface voxel
    and every nearest surface voxel lies inside it, and the erosion sees the same neighbourhood.
    """
    p, g = _pair(pred, gt, dims=(2, 3))
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        raise ValueError(
            f"surface_distances needs two non-empty masks, got pred with {int(p.sum())} and gt with "
            f"{int(g.sum())} foreground voxels (hd95 handles empty masks by convention)"
        )
    box = _bbox(p | g)
    p, g = p[box], g[box]
    sp_p, sp_g = surface(p), surface(g)
    to_g = ndimage.distance_transform_edt(~sp_g, sampling=sp)
    to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return to_g[sp_p], to_p[sp_g]


def hausdorff(pred: Any, gt: Any, spacing: Any = None, percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm: ``max(q(d(pred -> gt)), q(d(gt -> pred)))``.

    ``percentile=100`` is the classical Hausdorff distance. Empty masks: both empty -> 0.0, one empty ->
    ``inf`` (module docstring).
    """
    p, g = _pair(pred, gt, dims=(2, 3))
    _spacing(spacing, p.ndim)  # validate even when a mask is empty
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return float("inf")
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def hd95(pred: Any, gt: Any, spacing: Any = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (both empty -> 0.0, one empty -> ``inf``)."""
    return hausdorff(pred, gt, spacing, 95.0)


# ---------------------------------------------------------------------------------------------- batched
def binary_metrics(pred: Any, gt: Any, spacing: Any = None) -> dict[str, float]:
    """``{"dice", "iou", "hd95", "pred_voxels", "gt_voxels"}`` of two binary 2D/3D masks."""
    p, g = _pair(pred, gt, dims=(2, 3))
    return {
        "dice": dice(p, g),
        "iou": iou(p, g),
        "hd95": hd95(p, g, spacing),
        "pred_voxels": int(p.sum()),
        "gt_voxels": int(g.sum()),
    }


def per_class_metrics(
    pred_labels: Any,
    gt_labels: Any,
    spacing: Any = None,
    classes: Iterable[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-class :func:`binary_metrics` of two integer label maps (0 = background).

    ``classes`` defaults to every non-zero label present in either map, in increasing order.
    """
    pl, gl = np.asarray(pred_labels), np.asarray(gt_labels)
    for name, a in (("pred_labels", pl), ("gt_labels", gl)):
        if a.dtype.kind not in "biu":
            raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
    if pl.shape != gl.shape:
        raise ValueError(f"pred_labels and gt_labels must have the same shape, got {pl.shape} and {gl.shape}")
    if classes is None:
        ids: Sequence[int] = [int(c) for c in np.union1d(np.unique(pl), np.unique(gl)) if c != 0]
    else:
        ids = [int(c) for c in classes]
        if any(c == 0 for c in ids):
            raise ValueError(f"classes must not include the background label 0, got {ids}")
    return {c: binary_metrics(pl == c, gl == c, spacing) for c in ids}


def spacing_from_affine(affine: Any) -> np.ndarray:
    """Voxel sizes (mm) of a 4 x 4 voxel-to-world affine, in the array's axis order (column norms)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {a.shape}")
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))

