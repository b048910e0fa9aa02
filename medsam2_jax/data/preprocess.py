"""The paper's preprocessing (appendix C.1), and its exact inverse back to the original voxel grid.

A 3D volume (canonical RAS+, see :mod:`medsam2_jax.data.io`) goes through, in this order:

1. **Slicing.** Slices are taken along the axis with the coarsest spacing, so that each slice spans the two
   highest-resolution axes (axial for usual CT). Ties go to the later axis: an isotropic volume is sliced
   along its third (superior) axis, which is the paper's "two trailing axes" of a (z, y, x) array.
   Slices are shown the radiological way: axial slices with anterior up and the patient's right on the
   image's left, coronal with superior up and right on the left, sagittal with superior up and anterior
   on the left. The result is a stack ``(n_slices, rows, cols)``. No resampling across slices.
2. **Crop** to the bounding box of the non-zero voxels of the raw image (any channel for colour images),
   widened to contain every labelled voxel, so that cropping never loses a label.
3. **Intensity normalisation** (on the cropped data):

   * CT: clip to a window (``level ± width/2`` HU, per task; default soft tissue, level 40 / width 400),
     clip to the 0.5 / 99.5 percentiles of the foreground (labelled) voxels and subtract the foreground
     mean and divide by the foreground standard deviation. The statistics are *global*: compute them over
     the training set with :func:`compute_ct_stats` and pass them as ``ct_stats``; without them they are
     computed from this case's own labels, and a case without labels (inference on one's own scan) gets
     :func:`default_ct_stats`: the window mapped to [-2, 2] (mean = level, std = width / 4). Mean and std
     are those of the windowed *and clipped* foreground voxels (so the foreground of a single case comes out
     with mean 0 and std 1).
   * MRI, X-ray, ultrasound, mammography, OCT: per image, clip to the 0.5 / 99.5 percentiles, then z-score
     with the mean/std of the clipped values. Other modalities (PET, fundus, dermoscopy, endoscopy,
     pathology) get the paper's default: a per-image z-score without clipping.
   * Non-CT images: when the crop of step 2 removed 25 % or more of the voxels, the statistics are taken
     only inside the non-zero mask (``image != 0`` with its holes filled, as nnU-Net) and voxels outside
     it are set to 0.

4. **Resize** every slice to ``S x S`` (bicubic, Keys a = -0.5 with antialiasing when shrinking, as
   Pillow; nearest for label maps, exact integer index arithmetic). The aspect ratio is not kept, as in
   the paper.
5. **Three channels**: grey images are replicated; colour images keep their channels.
6. **Targets**: one binary target per class; each class is split into connected components
   (``scipy.ndimage.label`` on the resized ``(n_slices, S, S)`` stack; by default full connectivity:
   26-connected in 3D, 8-connected within a slice); a component is dropped when its largest
   cross-section is smaller than 0.153 % of the ``S x S`` slice (at ``S = 256``: fewer than 100.27 pixels,
   i.e. areas up to 100 pixels are dropped, 101 kept). For a 2D image that is simply its area.

The inverse, :func:`to_original_grid`, takes a ``(n_slices, S, S)`` prediction back to the canonical grid of
the input volume (nearest for masks, linear for probabilities), padding with 0 outside the crop; use
:func:`medsam2_jax.data.io.save_volume` to write it on the file's own grid and affine.

**Round-trip guarantee.** Along the slicing axis nothing is resampled, so the inverse is exact there. In
plane, nearest resampling from ``h`` pixels to ``S`` and back is the identity whenever ``h <= S`` (the
cropped extent fits in ``S``): then a ground-truth label map sent through and back is unchanged. When
``h > S`` the forward pass must drop information (a structure thinner than a resampled pixel can vanish);
what is then guaranteed is that every voxel receives the label of a voxel at most ``floor(h / (2 S) + 1/2)``
voxels away along each in-plane axis, and that any mask already at the resolution of the ``S`` grid (a
nearest upsampling of an ``S x S`` mask) comes back exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform
from scipy import ndimage

from medsam2_jax.data.errors import DataError
from medsam2_jax.data.io import Volume, canonical_modality

#: CT windows as (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = "soft_tissue"

#: Modalities whose intensities are clipped to the 0.5/99.5 percentiles before the z-score (appendix C.1).
CLIP_MODALITIES = frozenset({"MRI", "X-ray", "ultrasound", "mammography", "OCT"})

PERCENTILES = (0.5, 99.5)
MIN_TARGET_FRACTION = 0.00153
CROP_MASK_THRESHOLD = 0.25  # use the non-zero mask for normalisation when the crop removed >= 25 %
_EPS_STD = 1e-8


# --------------------------------------------------------------------------------------------- intensities


def resolve_window(window: str | tuple[float, float] | None) -> tuple[float, float] | None:
    """``(level, width)`` for a window name or pair; ``None`` means no windowing."""
    if window is None:
        return None
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"window={window!r} is not a known window; expected one of {sorted(WINDOWS)} "
                             "or a (level, width) pair in HU")
        return WINDOWS[window]
    level, width = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window width must be > 0 HU, got (level, width) = {(level, width)}")
    return level, width


def apply_window(hu: np.ndarray, window: str | tuple[float, float] | None) -> np.ndarray:
    """Clip Hounsfield units to ``[level - width/2, level + width/2]`` (values stay in HU)."""
    w = resolve_window(window)
    if w is None:
        return np.asarray(hu)
    level, width = w
    return np.clip(hu, level - width / 2.0, level + width / 2.0)


@dataclasses.dataclass(frozen=True)
class CTStats:
    """Global CT foreground statistics: percentiles ``low``/``high`` and ``mean``/``std`` of the clipped
    foreground, all in windowed HU, for the window they were computed with."""

    low: float
    high: float
    mean: float
    std: float
    window: tuple[float, float] | None


def compute_ct_stats(
    cases: Iterable[tuple[np.ndarray, np.ndarray]],
    window: str | tuple[float, float] | None = DEFAULT_WINDOW,
    *,
    max_voxels_per_case: int | None = None,
    seed: int = 0,
) -> CTStats:
    """Foreground statistics over ``(image_hu, labels)`` pairs (the training set), for :func:`normalize_ct`.

    Foreground = voxels with a label > 0. ``max_voxels_per_case`` subsamples each case's foreground
    (uniformly, seeded) to bound memory on large datasets; by default every voxel is used.
    """
    w = resolve_window(window)
    rng = np.random.default_rng(seed)
    chunks = []
    for image, labels in cases:
        image, labels = np.asarray(image), np.asarray(labels)
        if image.shape[: labels.ndim] != labels.shape:
            raise ValueError(f"compute_ct_stats: image shape {image.shape} does not match labels {labels.shape}")
        fg = apply_window(image[labels > 0], w).astype(np.float64).ravel()
        if max_voxels_per_case is not None and fg.size > max_voxels_per_case:
            fg = rng.choice(fg, size=max_voxels_per_case, replace=False)
        chunks.append(fg)
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    if values.size == 0:
        raise DataError(None, "no foreground voxel to compute CT statistics from",
                        "at least one case with labels > 0, or pass ct_stats=")
    low, high = np.percentile(values, PERCENTILES)
    clipped = np.clip(values, low, high)
    return CTStats(float(low), float(high), float(clipped.mean()), float(clipped.std()), w)


#: HU range used as the "window" of :func:`default_ct_stats` when windowing is off (``window=None``).
DEFAULT_CT_RANGE = (-1024.0, 3071.0)


def default_ct_stats(window: str | tuple[float, float] | None = DEFAULT_WINDOW) -> CTStats:
    """Fixed statistics for CT without labels or dataset statistics (one's own unlabelled scan): clip to the
    window ``[level - width/2, level + width/2]`` and z-score with mean = level, std = width / 4, so the
    window maps to [-2, 2] (soft tissue, the default: -160..240 HU -> -2..2, 0.01 per HU). With
    ``window=None`` the range :data:`DEFAULT_CT_RANGE` stands in for the window. This is not the paper's
    global foreground z-score, which needs labelled training data (:func:`compute_ct_stats`)."""
    w = resolve_window(window)
    lo, hi = (w[0] - w[1] / 2.0, w[0] + w[1] / 2.0) if w is not None else DEFAULT_CT_RANGE
    return CTStats(float(lo), float(hi), float((lo + hi) / 2.0), float((hi - lo) / 4.0), w)


def normalize_ct(image_hu: np.ndarray, stats: CTStats) -> np.ndarray:
    """Window, clip to the foreground percentiles and z-score with the global foreground mean/std."""
    x = apply_window(np.asarray(image_hu, dtype=np.float64), stats.window)
    x = np.clip(x, stats.low, stats.high)
    return ((x - stats.mean) / max(stats.std, _EPS_STD)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NormInfo:
    """What the intensity normalisation did: clip bounds (None if no clipping), mean, std, whether the
    non-zero mask restricted the statistics, and the CT window (None for other modalities)."""

    low: float | None
    high: float | None
    mean: float
    std: float
    used_mask: bool
    window: tuple[float, float] | None = None


def normalize_per_image(
    image: np.ndarray, mask: np.ndarray | None = None, *, clip: bool = True, source: Any = None
) -> tuple[np.ndarray, NormInfo]:
    """Per-image percentile clip (optional) and z-score; with ``mask``, statistics inside the mask only and 0
    outside it. ``mask`` has the image's spatial shape (a trailing channel axis of the image is pooled)."""
    x = np.asarray(image, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        sel = mask[..., None] if x.ndim == mask.ndim + 1 else mask
        sel = np.broadcast_to(sel, x.shape)
        values = x[sel]
    else:
        sel = None
        values = x.ravel()
    if values.size == 0:
        raise DataError(source, "no voxel to normalise (empty non-zero mask)", "a non-empty image")
    low = high = None
    if clip:
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        values = np.clip(values, low, high)
        x = np.clip(x, low, high)
    mean, std = float(values.mean()), float(values.std())
    if not std > _EPS_STD:
        raise DataError(source, f"constant intensity {mean:g} (standard deviation 0)", "an image with contrast")
    out = (x - mean) / std
    if sel is not None:
        out = np.where(sel, out, 0.0)
    return out.astype(np.float32), NormInfo(low, high, mean, std, sel is not None)


def nonzero_mask(stack: np.ndarray, channel_axis: bool = False) -> np.ndarray:
    """``stack != 0`` for a ``(n, h, w[, c])`` stack (any channel when ``channel_axis``), with the holes
    enclosed within each slice filled (as nnU-Net's non-zero mask; per slice, which also fills every hole
    enclosed in 3D, and works for a single 2D slice)."""
    nz = np.asarray(stack) != 0
    if channel_axis:
        nz = nz.any(axis=-1)
    return np.stack([ndimage.binary_fill_holes(s) for s in nz]) if nz.size else nz


def crop_removes_enough(full_shape: Sequence[int], crop: Sequence[tuple[int, int]]) -> bool:
    """The 25 % rule: True when the crop removed at least ``CROP_MASK_THRESHOLD`` of the voxels
    (exact integer comparison: ``kept <= (1 - 0.25) * full``)."""
    full = int(np.prod(full_shape))
    kept = int(np.prod([b - a for a, b in crop]))
    return 4 * kept <= 3 * full


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open ``((start, stop), ...)`` box of the True voxels of ``mask`` (which must not be empty)."""
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


# --------------------------------------------------------------------------------------------- geometry


def choose_slice_axis(spacing: Sequence[float], rtol: float = 1e-3) -> int:
    """The axis to slice along: the coarsest spacing; ties (within ``rtol``) go to the later axis."""
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    tied = np.flatnonzero(sp >= sp.max() * (1.0 - rtol))
    return int(tied[-1])


# (row axis, col axis, flip rows, flip cols) per slicing axis, for canonical RAS+ data (radiological view).
_VIEWS = {
    2: (1, 0, True, True),  # axial: anterior up, patient's right on the left
    1: (2, 0, True, True),  # coronal: superior up, patient's right on the left
    0: (2, 1, True, True),  # sagittal: superior up, anterior on the left
}


def _cubic_kernel(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x <= 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0),
    )


def _linear_kernel(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def resize_weights(n_in: int, n_out: int, method: str) -> np.ndarray:
    """``(n_out, n_in)`` interpolation matrix with half-pixel centres; the kernel is widened by the scale
    when shrinking (antialiasing) and truncated and renormalised at the borders, as Pillow does."""
    kernel = {"bicubic": _cubic_kernel, "linear": _linear_kernel}[method]
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    d = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / stretch
    w = kernel(d)
    return w / w.sum(axis=1, keepdims=True)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest resampling: ``floor((j + 1/2) * n_in / n_out)``,
    in exact integer arithmetic."""
    return (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out)


def resize_stack(stack: np.ndarray, out_hw: tuple[int, int], method: str) -> np.ndarray:
    """Resize axes 1, 2 of ``(n, h, w[, c])`` to ``out_hw`` with ``"bicubic"``, ``"linear"`` or ``"nearest"``."""
    stack = np.asarray(stack)
    h, w = stack.shape[1:3]
    oh, ow = out_hw
    if method == "nearest":
        return stack[:, nearest_indices(h, oh)][:, :, nearest_indices(w, ow)]
    wr = resize_weights(h, oh, method).astype(np.float32)
    wc = resize_weights(w, ow, method).astype(np.float32)
    x = stack.astype(np.float32)
    x = np.einsum("rh,nhw...->nrw...", wr, x, optimize=True)
    return np.einsum("cw,nrw...->nrc...", wc, x, optimize=True)


@dataclasses.dataclass(frozen=True)
class GridTransform:
    """Everything needed to map a ``(n_slices, S, S)`` array back to the input grid.

    ``dim`` is 3 for volumes (input grid = the canonical ``(X, Y, Z)`` of the :class:`Volume`) and 2 for
    images (input grid = ``(H, W)``). For volumes the stack is ``transpose(volume, (slice_axis, row_axis,
    col_axis))`` with the rows/cols reversed where ``flips`` says so; ``crop`` is the half-open box kept
    in stack coordinates ``(slices, rows, cols)``; each kept slice of ``crop_hw`` pixels was resized to
    ``size x size``. ``affine`` is the canonical affine; ``original_affine`` / ``original_shape`` /
    ``orientation`` those of the file (for :func:`~medsam2_jax.data.io.save_volume`).
    """

    dim: int
    input_shape: tuple[int, ...]
    slice_axis: int | None
    row_axis: int | None
    col_axis: int | None
    flips: tuple[bool, bool]
    stack_shape: tuple[int, int, int]
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    size: int
    affine: np.ndarray | None = None
    original_affine: np.ndarray | None = None
    original_shape: tuple[int, ...] | None = None
    orientation: tuple[str, ...] | None = None

    @property
    def n_slices(self) -> int:
        return self.crop[0][1] - self.crop[0][0]

    @property
    def crop_hw(self) -> tuple[int, int]:
        return self.crop[1][1] - self.crop[1][0], self.crop[2][1] - self.crop[2][0]

    @property
    def slice_indices(self) -> np.ndarray:
        """Index along the input's slicing axis of each preprocessed slice."""
        return np.arange(self.crop[0][0], self.crop[0][1])

    @property
    def exact_round_trip(self) -> bool:
        """True when nearest resampling there and back is the identity (crop fits in ``size``)."""
        return max(self.crop_hw) <= self.size

    def to_stack(self, arr: np.ndarray) -> np.ndarray:
        """Input-grid array (with optional trailing channel axis) -> uncropped stack."""
        arr = np.asarray(arr)
        if self.dim == 2:
            return arr[None]
        extra = tuple(range(3, arr.ndim))
        s = np.transpose(arr, (self.slice_axis, self.row_axis, self.col_axis) + extra)
        if self.flips[0]:
            s = s[:, ::-1]
        if self.flips[1]:
            s = s[:, :, ::-1]
        return s

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """Uncropped stack -> input-grid array (inverse of :meth:`to_stack`)."""
        stack = np.asarray(stack)
        if self.dim == 2:
            return stack[0]
        if self.flips[0]:
            stack = stack[:, ::-1]
        if self.flips[1]:
            stack = stack[:, :, ::-1]
        perm = (self.slice_axis, self.row_axis, self.col_axis)
        inv = tuple(int(i) for i in np.argsort(perm)) + tuple(range(3, stack.ndim))
        return np.ascontiguousarray(np.transpose(stack, inv))

    def to_file_orientation(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical-grid array reoriented to the file's voxel grid (3D only)."""
        if self.dim != 3 or self.orientation is None:
            raise ValueError("to_file_orientation needs a 3D grid with the file orientation")
        back = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(self.orientation))
        return apply_orientation(np.asarray(canonical), back)


def _view_2d(shape: tuple[int, ...]) -> dict[str, Any]:
    """GridTransform fields (all but crop and size) for a 2D image."""
    return dict(dim=2, input_shape=tuple(shape[:2]), slice_axis=None, row_axis=None, col_axis=None,
                flips=(False, False), stack_shape=(1,) + tuple(shape[:2]))


def _view_3d(shape: tuple[int, ...], spacing, slice_axis: int | None) -> dict[str, Any]:
    """GridTransform fields (all but crop and size) for a canonical volume."""
    ax = choose_slice_axis(spacing) if slice_axis is None else int(slice_axis)
    if ax not in _VIEWS:
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    row, col, fr, fc = _VIEWS[ax]
    return dict(dim=3, input_shape=tuple(shape), slice_axis=ax, row_axis=row, col_axis=col, flips=(fr, fc),
                stack_shape=(shape[ax], shape[row], shape[col]))


# --------------------------------------------------------------------------------------------- targets


class Target:
    """One binary segmentation target: a connected component of one class, on the preprocessed grid.

    ``mask`` is ``(n_slices, S, S)`` bool (computed on demand from the shared instance map when built by
    :func:`preprocess_case`, so many targets cost no memory); ``slice_range`` is the half-open range of
    slices where it is present; ``area`` its voxel count; ``max_area`` its largest cross-section.
    """

    def __init__(
        self,
        class_id: int,
        component_id: int,
        mask: np.ndarray | None = None,
        slice_range: tuple[int, int] | None = None,
        name: str = "",
        *,
        instances: np.ndarray | None = None,
        instance_id: int | None = None,
    ):
        if (mask is None) == (instances is None):
            raise ValueError("Target needs exactly one of mask= or instances= (with instance_id=)")
        self.class_id = int(class_id)
        self.component_id = int(component_id)
        self.name = name or f"class_{class_id}"
        self._mask = None if mask is None else np.asarray(mask, dtype=bool)
        self._instances = instances
        self.instance_id = instance_id
        if slice_range is None:
            per_slice = self.mask.reshape(self.mask.shape[0], -1).any(axis=1)
            idx = np.flatnonzero(per_slice)
            slice_range = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
        self.slice_range = (int(slice_range[0]), int(slice_range[1]))

    @property
    def mask(self) -> np.ndarray:
        if self._mask is not None:
            return self._mask
        return self._instances == self.instance_id

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def max_area(self) -> int:
        return int(self.mask.reshape(self.mask.shape[0], -1).sum(axis=1).max())

    def __repr__(self) -> str:
        return (f"Target(class_id={self.class_id}, component_id={self.component_id}, name={self.name!r}, "
                f"slice_range={self.slice_range})")


def split_targets(
    labels: np.ndarray,
    label_names: dict[int, str] | None = None,
    *,
    min_fraction: float = MIN_TARGET_FRACTION,
    connectivity: int | None = None,
) -> tuple[list[Target], np.ndarray]:
    """Split a ``(n, S, S)`` class map into connected-component targets and drop the small ones.

    Returns the kept targets and their instance map (``(n, S, S)`` int32, 0 = none, ``k`` = k-th target).
    ``connectivity`` is scipy's (1 = faces only ... 3 = full 26-neighbourhood; default full). A component is
    dropped when its largest cross-section has fewer than ``min_fraction * S * S`` pixels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (n_slices, S, S), got shape {labels.shape}")
    n, h, w = labels.shape
    structure = ndimage.generate_binary_structure(3, 3 if connectivity is None else int(connectivity))
    threshold = min_fraction * h * w
    names = label_names or {}
    instances = np.zeros(labels.shape, dtype=np.int32)
    targets: list[Target] = []
    if labels.size == 0 or labels.max() <= 0:
        return targets, instances
    boxes = ndimage.find_objects(np.clip(labels, 0, None).astype(np.intp, copy=False))
    for c0, box in enumerate(boxes):
        if box is None:
            continue
        c = c0 + 1
        # All of the class lies in its bounding box, so its components can be found there.
        comp, k = ndimage.label(labels[box] == c, structure=structure)
        z0 = box[0].start
        nb = comp.shape[0]
        slice_of = np.arange(nb)[:, None, None]
        areas = np.bincount((slice_of * (k + 1) + comp).ravel(), minlength=nb * (k + 1)).reshape(nb, k + 1)
        sub_inst = instances[box]
        for j in range(1, k + 1):
            if areas[:, j].max() < threshold:
                continue
            idx = np.flatnonzero(areas[:, j])
            inst = len(targets) + 1
            sub_inst[comp == j] = inst
            targets.append(Target(c, j, slice_range=(z0 + int(idx[0]), z0 + int(idx[-1]) + 1),
                                  name=names.get(c, ""), instances=instances, instance_id=inst))
    return targets, instances


# --------------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class Preprocessed:
    """The model-ready form of one image or volume.

    ``image`` ``(n_slices, S, S, 3)`` float32; ``labels`` ``(n_slices, S, S)`` int32 (the class map on the
    new grid, None without labels); ``targets`` the kept binary targets; ``instances`` their instance map;
    ``grid`` the transform back; ``norm`` what the intensity normalisation did.
    """

    image: np.ndarray
    labels: np.ndarray | None
    targets: list[Target]
    instances: np.ndarray | None
    grid: GridTransform
    norm: NormInfo
    modality: str
    label_names: dict[int, str]
    source: str | None = None


def _normalize(image: np.ndarray, modality: str, use_mask: bool, nonzero: np.ndarray,
               labels: np.ndarray | None, window, ct_stats: CTStats | None, source: Any):
    if modality == "CT":
        if window == "stats":
            window = ct_stats.window if ct_stats is not None else DEFAULT_WINDOW
        if ct_stats is None:
            if labels is None or not np.any(labels > 0):  # unlabelled CT (inference on one's own scan)
                ct_stats = default_ct_stats(window)
            else:
                ct_stats = compute_ct_stats([(image, labels)], window)
        elif resolve_window(window) != ct_stats.window:
            raise ValueError(f"window {resolve_window(window)} differs from the window {ct_stats.window} the "
                             "ct_stats were computed with")
        out = normalize_ct(image, ct_stats)
        return out, NormInfo(ct_stats.low, ct_stats.high, ct_stats.mean, ct_stats.std, False, ct_stats.window)
    return normalize_per_image(image, nonzero if use_mask else None, clip=modality in CLIP_MODALITIES,
                               source=source)


def _preprocess_stack(stack, lab_stack, gridkw, modality, size, *, window, ct_stats, label_names,
                      min_target_fraction, connectivity, color, source, extra_grid, labels_touch_image=True):
    if not (isinstance(size, (int, np.integer)) and size > 0):
        raise ValueError(f"size must be a positive int, got {size!r}")
    nz = nonzero_mask(stack, channel_axis=color)
    if lab_stack is not None and labels_touch_image:
        keep = nz | (lab_stack > 0)
    else:
        keep = nz
    if not keep.any():
        raise DataError(source, "the image is all zero", "an image with non-zero voxels")
    crop = bounding_box(keep)
    sl = tuple(slice(a, b) for a, b in crop)
    img_c = stack[sl]
    lab_c = None if lab_stack is None else lab_stack[sl]
    use_mask = crop_removes_enough(stack.shape[:3], crop)
    norm_img, info = _normalize(img_c, modality, use_mask, nz[sl], lab_c if labels_touch_image else None, window,
                                ct_stats, source)
    resized = resize_stack(norm_img, (size, size), "bicubic").astype(np.float32)
    if not color:
        resized = np.repeat(resized[..., None], 3, axis=-1)
    grid = GridTransform(crop=crop, size=int(size), **gridkw, **extra_grid)
    if lab_c is None:
        return Preprocessed(resized, None, [], None, grid, info, modality, dict(label_names or {}), source)
    lab_r = np.ascontiguousarray(resize_stack(lab_c, (size, size), "nearest")).astype(np.int32)
    targets, instances = split_targets(lab_r, label_names, min_fraction=min_target_fraction, connectivity=connectivity)
    return Preprocessed(resized, lab_r, targets, instances, grid, info, modality, dict(label_names or {}), source)


def preprocess_case(
    volume: Volume,
    labels: np.ndarray | None,
    modality: str,
    size: int = 256,
    *,
    window: str | tuple[float, float] | None = DEFAULT_WINDOW,
    ct_stats: CTStats | None = None,
    label_names: dict[int, str] | None = None,
    slice_axis: int | None = None,
    min_target_fraction: float = MIN_TARGET_FRACTION,
    connectivity: int | None = None,
    labels_touch_image: bool = True,
) -> Preprocessed:
    """Preprocess a 3D volume (and its canonical label map) as in appendix C.1 (see the module docstring).

    ``window`` (CT only) is a name from :data:`WINDOWS` or ``(level, width)`` in HU; with ``ct_stats`` it
    must be the window the statistics were computed with (or pass ``window="stats"`` to take theirs).
    ``slice_axis`` overrides the automatic choice.
    ``labels_touch_image=False`` keeps the labels out of the image: the crop is the image's non-zero box
    alone and CT is normalised with ``ct_stats`` or the window's default statistics, never the case's own
    labelled foreground; the labels follow the image's crop (evaluation: no ground truth in the model input).
    """
    source = volume.path
    mod = canonical_modality(modality, source)
    data = np.asarray(volume.data)
    if data.ndim != 3:
        raise DataError(source, f"volume data of shape {data.shape}", "a 3D (X, Y, Z) array")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != data.shape:
            raise DataError(source, f"labels of shape {labels.shape} for an image of shape {data.shape}",
                            "labels on the image's canonical grid")
    gridkw = _view_3d(data.shape, volume.spacing, slice_axis)
    uncropped = GridTransform(crop=((0, 0),) * 3, size=size, **gridkw)  # only its to_stack is used
    stack = uncropped.to_stack(data)
    lab_stack = None if labels is None else uncropped.to_stack(labels)
    extra = dict(affine=np.asarray(volume.affine), original_affine=np.asarray(volume.original_affine),
                 original_shape=tuple(volume.original_shape), orientation=tuple(volume.orientation))
    return _preprocess_stack(stack, lab_stack, gridkw, mod, size, window=window, ct_stats=ct_stats,
                             label_names=label_names, min_target_fraction=min_target_fraction,
                             connectivity=connectivity, color=False, source=source, extra_grid=extra,
                             labels_touch_image=labels_touch_image)


def preprocess_image_2d(
    image: np.ndarray,
    mask: np.ndarray | None,
    modality: str,
    size: int = 256,
    *,
    window: str | tuple[float, float] | None = DEFAULT_WINDOW,
    ct_stats: CTStats | None = None,
    label_names: dict[int, str] | None = None,
    min_target_fraction: float = MIN_TARGET_FRACTION,
    connectivity: int | None = None,
    source: Any = None,
    labels_touch_image: bool = True,
) -> Preprocessed:
    """Preprocess a 2D image ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` and its ``(H, W)`` mask: the same
    rules as :func:`preprocess_case` (``labels_touch_image`` included), with ``n_slices = 1``. Colour images
    keep their three channels and are normalised jointly; grey images (or three equal channels) are treated
    as grey."""
    mod = canonical_modality(modality, source)
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 3 and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(
        img[..., 0], img[..., 2]
    ):
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)) or min(img.shape[:2]) < 1:
        raise DataError(source, f"image of shape {np.shape(image)}", "(H, W), (H, W, 1) or (H, W, 3)")
    if not np.all(np.isfinite(img)):
        raise DataError(source, "NaN/inf pixel values", "finite pixel values")
    color = img.ndim == 3
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape[:2]:
            raise DataError(source, f"mask of shape {mask.shape} for an image of shape {img.shape[:2]}",
                            "a mask with the image's height and width")
    gridkw = _view_2d(img.shape)
    return _preprocess_stack(img[None].astype(np.float32), None if mask is None else mask[None], gridkw, mod, size,
                             window=window, ct_stats=ct_stats, label_names=label_names,
                             min_target_fraction=min_target_fraction, connectivity=connectivity, color=color,
                             source=None if source is None else str(source), extra_grid={},
                             labels_touch_image=labels_touch_image)


def to_original_grid(pred: np.ndarray, grid: GridTransform, kind: str = "auto") -> np.ndarray:
    """Map a ``(n_slices, S, S)`` prediction back to the input grid (canonical ``(X, Y, Z)``, or ``(H, W)``).

    ``kind``: ``"mask"`` (nearest; bool/int dtype kept), ``"prob"`` (linear; float32) or ``"auto"`` (mask for
    bool/integer arrays, prob for floats). Outside the crop the result is 0.
    """
    pred = np.asarray(pred)
    if grid.dim == 2 and pred.ndim == 2:
        pred = pred[None]
    expected = (grid.n_slices, grid.size, grid.size)
    if pred.shape != expected:
        raise ValueError(f"to_original_grid: pred has shape {pred.shape}, expected (n_slices, S, S) = {expected}")
    if kind == "auto":
        kind = "prob" if pred.dtype.kind == "f" else "mask"
    if kind == "mask":
        small = resize_stack(pred, grid.crop_hw, "nearest")
        dtype = pred.dtype
    elif kind == "prob":
        small = resize_stack(pred.astype(np.float32), grid.crop_hw, "linear")
        dtype = np.dtype(np.float32)
    else:
        raise ValueError(f"kind must be 'auto', 'mask' or 'prob', got {kind!r}")
    full = np.zeros(grid.stack_shape, dtype=dtype)
    full[tuple(slice(a, b) for a, b in grid.crop)] = small
    return grid.from_stack(full)
