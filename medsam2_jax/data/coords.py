"""Prompts given in a file's own voxel indices, mapped to the preprocessed frames the model sees.

A user looks at a NIfTI file in a viewer's voxel mode (ITK-SNAP, 3D Slicer): a voxel is ``(x, y, z)`` =
indices along the file's first, second and third array axes, whatever the affine says. The model sees
something else: :func:`medsam2_jax.data.io.load_volume` reorients the array to RAS+, and
:func:`medsam2_jax.data.preprocess.preprocess_case` slices it (transposes and flips the in-plane axes for a
radiological view), crops it to its non-zero box and resizes every slice to ``S x S``. This module follows a
prompt through the same steps, using only the :class:`~medsam2_jax.data.preprocess.GridTransform` that
preprocessing returns:

1. **File -> canonical.** The file's axis codes (``grid.orientation``, e.g. ``("L", "A", "S")``) give, per file
   axis, the canonical axis it became and whether it was reversed (``nibabel.orientations.axcodes2ornt``,
   the same transform ``nibabel.as_closest_canonical`` applies).
2. **Canonical -> stack.** ``(slice, row, col) = (c[slice_axis], c[row_axis], c[col_axis])``, rows / columns
   reversed where ``grid.flips`` says so, minus the crop's start.
3. **Stack -> frame.** In-plane, a crop of ``h`` pixels became ``S``: with half-pixel centres, a voxel centre
   ``u`` lands at ``(u + 1/2) S / h - 1/2``; a voxel's extent ``[u, u + 1)`` (edges) at ``[u S / h, (u + 1) S / h)``.

Points map as voxel centres. A box ``(x0, y0, x1, y1)`` of inclusive voxel indices maps as the extent of
those voxels: its corners are mapped, sorted again (a flip swaps them), and given as the inclusive frame
pixel coordinates ``(lo S / h, (hi + 1) S / h - 1)`` (the identity when ``h == S``). A 2D mask of a slice is
placed in a file-shaped volume and sent through the image's own reorientation, crop and resize (linear,
then ``>= 0.5``), so it is resampled exactly as the image slice is.

The slice index ``z`` must be along the axis the stack was sliced along: preprocess with
``slice_axis=prompt_slice_axis(grid_or_volume)`` (the canonical axis of the file's third axis), as the
``medsam2-segment`` command does. Frame coordinates follow the tracker's convention: ``(x, y) = (column,
row)`` pixels of the ``S x S`` frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from nibabel.orientations import axcodes2ornt

from medsam2_jax.data import preprocess as prep

__all__ = [
    "file_ornt", "prompt_slice_axis", "file_to_stack", "stack_to_frame", "FramePrompt",
    "file_point_to_frame", "file_box_to_frame", "file_mask_to_frame", "slice_to_stack", "kept_voxel_range",
    "image_point_to_frame", "image_box_to_frame", "image_mask_to_frame",
]


def file_ornt(orientation: Sequence[str]) -> np.ndarray:
    """``(3, 2)``: for each file axis, the canonical (RAS+) axis it becomes and ``1`` / ``-1`` (kept / reversed)."""
    return axcodes2ornt(tuple(orientation)).astype(np.int64)


def prompt_slice_axis(grid_or_volume: Any) -> int:
    """The canonical axis of the file's third axis: pass it as ``slice_axis`` to ``preprocess_case`` so that
    the preprocessed slices are the file's slices along its third axis."""
    return int(file_ornt(grid_or_volume.orientation)[2, 0])


def _check_grid(grid: prep.GridTransform) -> None:
    if not isinstance(grid, prep.GridTransform) or grid.dim != 3 or grid.orientation is None:
        raise ValueError("a 3D GridTransform from preprocess_case (with the file orientation) is needed")


def file_to_stack(grid: prep.GridTransform, xyz: Any) -> np.ndarray:
    """File voxel coordinates ``(k, 3)`` (``x, y, z``; integers or continuous voxel-centre coordinates) ->
    ``(k, 3)`` ``(slice, row, col)`` in the CROPPED preprocessed stack, before the in-plane resize (values
    outside ``[0, extent)`` lie outside the crop)."""
    _check_grid(grid)
    f = np.asarray(xyz, np.float64).reshape(-1, 3)
    ornt = file_ornt(grid.orientation)
    shape = np.asarray(grid.input_shape, np.float64)  # canonical shape
    c = np.empty_like(f)
    for i in range(3):
        a, flip = int(ornt[i, 0]), int(ornt[i, 1])
        c[:, a] = f[:, i] if flip == 1 else shape[a] - 1 - f[:, i]
    s = c[:, [grid.slice_axis, grid.row_axis, grid.col_axis]]
    st = np.asarray(grid.stack_shape, np.float64)
    if grid.flips[0]:
        s[:, 1] = st[1] - 1 - s[:, 1]
    if grid.flips[1]:
        s[:, 2] = st[2] - 1 - s[:, 2]
    return s - np.asarray([grid.crop[0][0], grid.crop[1][0], grid.crop[2][0]], np.float64)


def stack_to_frame(grid: prep.GridTransform, rows_cols: Any) -> np.ndarray:
    """Voxel-centre ``(row, col)`` in the cropped stack -> ``(x, y)`` = ``(col, row)`` pixel of the S x S frame."""
    rc = np.asarray(rows_cols, np.float64).reshape(-1, 2)
    h, w = grid.crop_hw
    s = grid.size
    return np.stack([(rc[:, 1] + 0.5) * s / w - 0.5, (rc[:, 0] + 0.5) * s / h - 0.5], axis=1)


def kept_voxel_range(grid: prep.GridTransform) -> dict[str, tuple[int, int]]:
    """Inclusive file-voxel ranges ``{"x": (a, b), "y": ..., "z": ...}`` of the region preprocessing kept
    (the non-zero box): prompts outside it cannot be mapped."""
    _check_grid(grid)
    ext = (grid.n_slices,) + tuple(grid.crop_hw)
    origin = file_to_stack(grid, [[0.0, 0.0, 0.0]])[0]
    out = {}
    for i, name in enumerate("xyz"):  # each file axis goes to one stack axis k, as t -> origin[k] +- t
        e = np.zeros((1, 3))
        e[0, i] = 1.0
        d = file_to_stack(grid, e)[0] - origin
        k = int(np.argmax(np.abs(d)))
        a, b = (0 - origin[k]) / d[k], (ext[k] - 1 - origin[k]) / d[k]
        out[name] = (int(round(min(a, b))), int(round(max(a, b))))
    return out


@dataclasses.dataclass
class FramePrompt:
    """A prompt on one preprocessed slice: ``slice`` (stack index), ``points`` ``(k, 2)`` / ``labels``
    ``(k,)`` (1 positive, 0 negative) and ``box`` ``(4,)`` in frame pixels, or ``mask`` ``(S, S)`` float32.
    :meth:`as_volume_prompt` gives the dict :func:`medsam2_jax.volume.segment_volume` takes."""

    slice: int
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    def as_volume_prompt(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slice": int(self.slice)}
        if self.mask is not None:
            out["mask"] = self.mask
            return out
        if self.box is not None:
            out["box"] = self.box
        if self.points is not None and len(self.points):
            out["points"], out["labels"] = self.points, self.labels
        return out


def _stack_slice(grid: prep.GridTransform, z: float) -> int:
    """The stack index of file slice ``z`` (along the file's third axis, which must be the slicing axis)."""
    ornt = file_ornt(grid.orientation)
    if int(ornt[2, 0]) != grid.slice_axis:
        raise ValueError(f"the stack is sliced along canonical axis {grid.slice_axis}, but the file's third axis is "
                         f"canonical axis {int(ornt[2, 0])}: preprocess with slice_axis=prompt_slice_axis(volume)")
    return int(round(file_to_stack(grid, [[0.0, 0.0, z]])[0, 0]))


def file_point_to_frame(grid: prep.GridTransform, x: float, y: float, z: int) -> tuple[int, np.ndarray]:
    """File voxel ``(x, y, z)`` -> ``(stack slice, (x, y) frame pixel)``."""
    st = file_to_stack(grid, [[x, y, z]])[0]
    return _stack_slice(grid, z), stack_to_frame(grid, st[1:])[0]


def file_box_to_frame(grid: prep.GridTransform, box: Sequence[float], z: int) -> tuple[int, np.ndarray]:
    """Inclusive file-voxel box ``(x0, y0, x1, y1)`` on slice ``z`` -> ``(stack slice, frame box (x0, y0, x1,
    y1))``, the frame box covering the same voxels (inclusive pixel coordinates)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    st = file_to_stack(grid, [[min(x0, x1), min(y0, y1), z], [max(x0, x1), max(y0, y1), z]])
    lo, hi = st[:, 1:].min(axis=0), st[:, 1:].max(axis=0)  # (row, col) voxel indices, inclusive
    h, w = grid.crop_hw
    s = grid.size
    rows = (lo[0] * s / h, (hi[0] + 1) * s / h - 1)
    cols = (lo[1] * s / w, (hi[1] + 1) * s / w - 1)
    return _stack_slice(grid, z), np.array([cols[0], rows[0], cols[1], rows[1]], np.float32)


def slice_to_stack(grid: prep.GridTransform, plane: np.ndarray, z: int,
                   method: str = "linear") -> tuple[int, np.ndarray]:
    """A 2D array on file slice ``z`` (shape = the file's first two axes) -> ``(stack slice, (S, S) float32)``,
    reoriented, cropped and resized as the image slice is (``"linear"`` or ``"nearest"``)."""
    _check_grid(grid)
    plane = np.asarray(plane, np.float32)
    shape = tuple(grid.original_shape[:3])
    if plane.shape != shape[:2]:
        raise ValueError(f"the slice must have the file's in-plane shape {shape[:2]}, got {plane.shape}")
    vol = np.zeros(shape, np.float32)
    vol[:, :, int(z)] = plane
    ornt = file_ornt(grid.orientation)
    from nibabel.orientations import apply_orientation

    canon = apply_orientation(vol, ornt)
    stack = grid.to_stack(canon)
    k = _stack_slice(grid, z)
    sl = stack[grid.crop[0][0] + k, grid.crop[1][0]:grid.crop[1][1], grid.crop[2][0]:grid.crop[2][1]]
    return k, prep.resize_stack(sl[None], (grid.size, grid.size), method)[0].astype(np.float32)


def file_mask_to_frame(grid: prep.GridTransform, mask: np.ndarray, z: int) -> tuple[int, np.ndarray]:
    """A binary mask of file slice ``z`` (the file's in-plane shape) -> ``(stack slice, (S, S) float32 0/1)``."""
    k, m = slice_to_stack(grid, (np.asarray(mask) > 0).astype(np.float32), z, "linear")
    return k, (m >= 0.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------- 2D images
def _check_grid_2d(grid: prep.GridTransform) -> None:
    if not isinstance(grid, prep.GridTransform) or grid.dim != 2:
        raise ValueError("a 2D GridTransform from preprocess_image_2d is needed")


def image_point_to_frame(grid: prep.GridTransform, x: float, y: float) -> np.ndarray:
    """Pixel ``(x, y)`` = (column, row) of a 2D image -> ``(x, y)`` pixel of its preprocessed ``S x S`` frame."""
    _check_grid_2d(grid)
    return stack_to_frame(grid, [[y - grid.crop[1][0], x - grid.crop[2][0]]])[0]


def image_box_to_frame(grid: prep.GridTransform, box: Sequence[float]) -> np.ndarray:
    """Inclusive pixel box ``(x0, y0, x1, y1)`` of a 2D image -> the frame box covering the same pixels."""
    _check_grid_2d(grid)
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = grid.crop_hw
    s = grid.size
    r0, c0 = min(y0, y1) - grid.crop[1][0], min(x0, x1) - grid.crop[2][0]
    r1, c1 = max(y0, y1) - grid.crop[1][0], max(x0, x1) - grid.crop[2][0]
    return np.array([c0 * s / w, r0 * s / h, (c1 + 1) * s / w - 1, (r1 + 1) * s / h - 1], np.float32)


def image_mask_to_frame(grid: prep.GridTransform, mask: np.ndarray) -> np.ndarray:
    """A binary ``(H, W)`` mask of a 2D image -> ``(S, S)`` float32 0/1, cropped and resized as the image."""
    _check_grid_2d(grid)
    m = (np.asarray(mask) > 0).astype(np.float32)
    if m.shape != tuple(grid.input_shape):
        raise ValueError(f"the mask must have the image's shape {tuple(grid.input_shape)}, got {m.shape}")
    sl = m[grid.crop[1][0]:grid.crop[1][1], grid.crop[2][0]:grid.crop[2][1]]
    return (prep.resize_stack(sl[None], (grid.size, grid.size), "linear")[0] >= 0.5).astype(np.float32)
