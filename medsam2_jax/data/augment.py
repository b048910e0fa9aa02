"""Training-time data augmentation of slice sequences (paper, appendix C.2).

Host-side NumPy + ``scipy.ndimage``; every random decision comes from the ``np.random.Generator`` that is
passed in, so a sequence's augmentation is a pure function of (input, generator state, config).

The paper's list, quoted (Medical SAM 2, appendix C.2), and how each item is implemented here:

1. "Rotation: Applied with a probability of 0.15 to all images. The rotation angle is uniformly sampled
   from the range [-25, 25]." -> ``p_rotation=0.15``, ``rotation_deg=(-25, 25)``, in-plane, about the
   image centre. A positive angle turns the picture counter-clockwise as displayed (row 0 at the top),
   like ``np.rot90``.
2. "Scaling: ... multiplying image coordinates with a scaling factor. Scale factors smaller than 1 result in
   a 'zoom out' effect, while values larger than 1 create a 'zoom in' effect. The scaling factor is
   uniformly sampled from [0.7, 1.4], with a probability of 0.15." -> ``p_scale=0.15``, ``scale=(0.7, 1.4)``
   with the paper's stated meaning (s > 1 magnifies the content). Rotation and scaling form ONE affine warp
   (cubic spline for images, nearest for masks); pixels that come from outside the image are filled with
   the sample's per-channel minimum (the background of a normalised scan), not with zero, which after
   z-scoring would be mid-grey tissue.
3. "Gaussian Noise: Zero-centered Gaussian noise is independently added to each sample with a probability
   of 0.15. The noise variance is sampled from [0, 0.1]" -> ``p_noise=0.15``, ``noise_variance=(0, 0.1)``
   (standard deviation = sqrt(variance)). The same noise field is added to the three channels, which are
   copies of one modality.
4. "Gaussian Blur: Blurring is applied with a probability of 0.15 per sample. For each task, it occurs with
   a probability of 0.5 per modality. The Gaussian kernel size is uniformly sampled from [0.5, 1.5]" ->
   ``p_blur=0.15``, ``p_blur_per_modality=0.5``, ``blur_sigma=(0.5, 1.5)`` (the "kernel size" read as the
   Gaussian's sigma in pixels, as in nnU-Net from which this recipe comes). In-plane only: slice spacing is
   unknown here. Our three channels hold ONE modality, so the per-modality draw is made once per sample
   (effective probability 0.15 x 0.5).
5. "Intensity Adjustment: Intensities are modified by multiplying them with a factor uniformly sampled from
   [0.65, 1.2] with a probability of 0.15. Alternatively, intensities can be flipped using 1 - image. ...
   After multiplication, the values are clipped to the original intensity range." -> ``p_brightness=0.15``,
   ``brightness=(0.65, 1.2)``, clipped to the sample's [min, max] before the multiplication. The flip is
   ``p_invert`` (see 7).
   The paper's summary also names "contrast adjustments" without a range; we use nnU-Net's contrast
   transform (the recipe the paper's list follows): ``p_contrast=0.15``, factor ``contrast=(0.75, 1.25)``,
   ``x -> (x - mean) * f + mean`` clipped to the original range.
6. "Low Resolution: Applied with a probability of 0.25 per sample and 0.5 per associated modality. This
   augmentation downsamples ... by a factor uniformly sampled from [1, 2] using nearest neighbor
   interpolation, then resamples them back to the original size using cubic interpolation." ->
   ``p_low_res=0.25``, ``p_low_res_per_modality=0.5`` (one draw per sample, as for blur), ``low_res=(1, 2)``.
7. "Gamma Augmentation: Applied with a probability of 0.15. Image intensities are first scaled to a range
   of 0 to 1, followed by ... x_new = x_old ** gamma, where gamma is uniformly sampled from [0.7, 1.5]. The
   intensities are then scaled back to their original range. This augmentation is applied after the
   intensity flip, also with a probability of 0.15." -> ``p_gamma=0.15``, ``gamma=(0.7, 1.5)``. We read the
   last sentence as: the intensity flip comes first and ALSO has probability 0.15 -> ``p_invert=0.15``.
   ``1 - image`` is stated for images in [0, 1]; for normalised images we flip within the sample's range,
   ``x -> min + max - x`` (identical to ``1 - x`` when the range is [0, 1]).
8. "Spatial Flip: Samples are flipped along all axes with a probability of 0.5." -> ``p_flip=0.5`` per
   in-plane axis, independently. Flipping along the slice axis is the sequence direction, which
   :mod:`medsam2_jax.data.sampling` draws (``reverse_prob``), because it must keep a target on frame 0.

Order of application: warp (rotation + scaling) -> noise -> blur -> brightness -> contrast -> low resolution
-> inversion -> gamma -> flips. Labels only see the warp and the flips.

Consistency: for a 3D volume the T slices of a sequence are ONE sample: every parameter (warp, flips,
intensity factors) is drawn once and applied to all slices, so the slices stay aligned with each other.
For a 2D sequence built from T different images (``independent_frames=True``) each frame is its own sample
("each augmentation is individually applied to both the template sample and the query sample").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import numpy as np
from scipy import ndimage

Range = Tuple[float, float]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of appendix C.2 (defaults are the paper's; see the module docstring)."""

    p_rotation: float = 0.15
    rotation_deg: Range = (-25.0, 25.0)
    p_scale: float = 0.15
    scale: Range = (0.7, 1.4)
    p_noise: float = 0.15
    noise_variance: Range = (0.0, 0.1)
    p_blur: float = 0.15
    p_blur_per_modality: float = 0.5
    blur_sigma: Range = (0.5, 1.5)
    p_brightness: float = 0.15
    brightness: Range = (0.65, 1.2)
    p_contrast: float = 0.15
    contrast: Range = (0.75, 1.25)
    p_low_res: float = 0.25
    p_low_res_per_modality: float = 0.5
    low_res: Range = (1.0, 2.0)
    p_invert: float = 0.15
    p_gamma: float = 0.15
    gamma: Range = (0.7, 1.5)
    p_flip: float = 0.5
    image_order: int = 3  # spline order of the image warp (masks are always nearest)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_"):
                if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                    raise ValueError(f"AugmentConfig.{f.name} must be a probability in [0, 1], got {v!r}")
            elif f.type == "Range" or isinstance(v, (tuple, list)):
                if len(v) != 2 or not v[0] <= v[1]:
                    raise ValueError(f"AugmentConfig.{f.name} must be a (low, high) pair with low <= high, got {v!r}")
                object.__setattr__(self, f.name, (float(v[0]), float(v[1])))
        if self.scale[0] <= 0:
            raise ValueError(f"AugmentConfig.scale must be positive, got {self.scale!r}")
        if self.low_res[0] < 1:
            raise ValueError(f"AugmentConfig.low_res must be >= 1 (a downsampling factor), got {self.low_res!r}")
        if self.noise_variance[0] < 0 or self.blur_sigma[0] < 0:
            raise ValueError("AugmentConfig.noise_variance and blur_sigma must be non-negative")
        if self.image_order not in (0, 1, 2, 3, 4, 5):
            raise ValueError(f"AugmentConfig.image_order must be a spline order 0..5, got {self.image_order!r}")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """Every probability zero: :func:`augment_sequence` returns its input unchanged."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.startswith("p_")})


def _check_inputs(images, masks, rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"augment_sequence: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"augment_sequence: images must have shape (T, S, S, C), got {images.shape}")
    if masks.shape != images.shape[:3]:
        raise ValueError(
            f"augment_sequence: masks must have shape (T, S, S) = {images.shape[:3]} to match images, got {masks.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"augment_sequence: images must be floating point, got dtype {images.dtype}")
    return images, masks


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _channel_planes(img: np.ndarray) -> Tuple[np.ndarray, bool]:
    """(T,S,S,C) -> (T,S,S,C') with C' = 1 when all channels are copies of the first (the usual case)."""
    if img.shape[-1] > 1 and all(np.array_equal(img[..., 0], img[..., c]) for c in range(1, img.shape[-1])):
        return img[..., :1], True
    return img, False


def _warp_matrix(angle_deg: float, scale: float) -> np.ndarray:
    """2x2 map from OUTPUT (row, col) offsets to INPUT offsets about the centre.

    In (x=col, y=row) display coordinates with y pointing down, a counter-clockwise turn by a moves the
    content point p to R p with R = [[cos, sin], [-sin, cos]] (acting on (x, y)); in (row, col) that is
    [[cos, -sin], [sin, cos]]. The inverse map (output -> input) of "rotate then magnify by s" is
    R^T / s.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    fwd = np.array([[c, -s], [s, c]])  # (row, col) -> (row, col), content rotation
    return fwd.T / scale


def _warp(sample: np.ndarray, mask: np.ndarray, angle: float, scale: float, order: int):
    size = sample.shape[1]
    centre = np.full(2, (size - 1) / 2.0)
    mat = _warp_matrix(angle, scale)
    offset = centre - mat @ centre
    planes, shared = _channel_planes(sample)
    out = np.empty_like(planes)
    for ch in range(planes.shape[-1]):
        fill = float(planes[..., ch].min())
        for t in range(planes.shape[0]):
            out[t, :, :, ch] = ndimage.affine_transform(
                planes[t, :, :, ch], mat, offset=offset, order=order, mode="constant", cval=fill, prefilter=order > 1
            )
    if shared:
        out = np.repeat(out, sample.shape[-1], axis=-1)
    mask_out = np.empty_like(mask)
    for t in range(mask.shape[0]):
        mask_out[t] = ndimage.affine_transform(
            mask[t].astype(np.uint8), mat, offset=offset, order=0, mode="constant", cval=0
        ).astype(mask.dtype)
    return out, mask_out


def _low_res(sample: np.ndarray, factor: float) -> np.ndarray:
    size = sample.shape[1]
    m = max(1, int(round(size / factor)))
    if m == size:
        return sample
    idx = np.minimum(np.floor((np.arange(m) + 0.5) * size / m).astype(np.int64), size - 1)
    small = sample[:, idx][:, :, idx]  # nearest-neighbour downsampling
    planes, shared = _channel_planes(small)
    up = np.empty((planes.shape[0], size, size, planes.shape[-1]), sample.dtype)
    for t in range(planes.shape[0]):  # plane by plane: a 4D spline over (T, S, S, C) is far slower
        for ch in range(planes.shape[-1]):
            # grid_mode: pixel edges (not centres) line up, as for an image resize; zoom's output side is
            # round(m * size / m) = size
            up[t, :, :, ch] = ndimage.zoom(planes[t, :, :, ch], size / m, order=3, mode="reflect", grid_mode=True)
    if shared:
        up = np.repeat(up, sample.shape[-1], axis=-1)
    return up


def _augment_sample(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """One sample (all T slices share every draw)."""
    # 1-2. rotation + scaling: one warp.
    angle = _uniform(rng, cfg.rotation_deg) if rng.random() < cfg.p_rotation else 0.0
    scale = _uniform(rng, cfg.scale) if rng.random() < cfg.p_scale else 1.0
    if angle != 0.0 or scale != 1.0:
        img, mask = _warp(img, mask, angle, scale, cfg.image_order)
    # 3. Gaussian noise (same field on the channel copies of one modality).
    if rng.random() < cfg.p_noise:
        std = math.sqrt(_uniform(rng, cfg.noise_variance))
        img = img + (std * rng.standard_normal(img.shape[:3] + (1,))).astype(img.dtype)
    # 4. Gaussian blur, in-plane.
    if rng.random() < cfg.p_blur and rng.random() < cfg.p_blur_per_modality:
        sigma = _uniform(rng, cfg.blur_sigma)
        img = ndimage.gaussian_filter(img, sigma=(0.0, sigma, sigma, 0.0), mode="nearest")
    # 5. brightness (multiplicative), clipped to the range before it.
    if rng.random() < cfg.p_brightness:
        lo, hi = img.min(), img.max()
        img = np.clip(img * np.float32(_uniform(rng, cfg.brightness)), lo, hi)
    # 5b. contrast about the mean, clipped to the range before it.
    if rng.random() < cfg.p_contrast:
        lo, hi, mean = img.min(), img.max(), img.mean()
        img = np.clip((img - mean) * np.float32(_uniform(rng, cfg.contrast)) + mean, lo, hi)
    # 6. low-resolution simulation.
    if rng.random() < cfg.p_low_res and rng.random() < cfg.p_low_res_per_modality:
        img = _low_res(img, _uniform(rng, cfg.low_res))
    # 7a. intensity flip within the sample's range (1 - x for x in [0, 1]).
    if rng.random() < cfg.p_invert:
        img = (img.min() + img.max()) - img
    # 7b. gamma on the range scaled to [0, 1].
    if rng.random() < cfg.p_gamma:
        gamma = _uniform(rng, cfg.gamma)
        lo, hi = img.min(), img.max()
        if hi > lo:
            unit = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
            img = unit ** np.float32(gamma) * (hi - lo) + lo
    # 8. flips along the two in-plane axes (rows: axis 1, columns: axis 2).
    for axis in (1, 2):
        if rng.random() < cfg.p_flip:
            img = np.flip(img, axis=axis)
            mask = np.flip(mask, axis=axis)
    return img, mask


def augment_sequence(
    images: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    *,
    independent_frames: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Augment a sequence: ``images`` (T, S, S, C) float, ``masks`` (T, S, S) bool/int.

    ``independent_frames=False`` (slices of one volume): one draw of every parameter for the whole
    sequence. ``True`` (a 2D sequence of different images): one draw per frame. Returns new contiguous
    arrays, images float32 and masks in the input's dtype; the inputs are never modified.
    """
    images, masks = _check_inputs(images, masks, rng)
    img = images.astype(np.float32, copy=True)
    msk = masks.copy()
    if independent_frames:
        outs = [_augment_sample(img[t : t + 1], msk[t : t + 1], rng, cfg) for t in range(img.shape[0])]
        img = np.concatenate([o[0] for o in outs], axis=0)
        msk = np.concatenate([o[1] for o in outs], axis=0)
    else:
        img, msk = _augment_sample(img, msk, rng, cfg)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(msk)
