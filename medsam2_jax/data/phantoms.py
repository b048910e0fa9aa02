"""Seedable synthetic CT-like and MRI-like volumes with exact labels.

Each seed is another "patient": a body of elliptical cross-section (its outline changing slowly along z)
holds several rotated ellipsoid or superquadric organs and a curved tube whose centre line bends and whose
elliptical cross-section grows, shrinks and turns along z (a vessel). A smooth random deformation bends
all of it; the image then gets organ-specific intensities with texture, a bias field, blur and noise.
Label ``k`` is always the same kind of structure with a similar intensity (a liver-like large ellipsoid,
a box-like superquadric, two small ellipsoids, the tube), so that a prompt learnt on one seed means
the same thing on another.

The labels are evaluated analytically on the (deformed) voxel centres, so they are exact and the image
is consistent with them. The array is built in canonical RAS+ order with the given spacing and then
stored in the requested orientation (default ``LAS``, like many scanners), so that loaders that
reorient are exercised; the returned affine is that of the stored array.

``make_phantom(seed, "ct")`` takes ~0.1 s for a ``(96, 96, 48)`` case (see ``tests/test_phantoms.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from medsam2_jax.data.preprocess import resize_weights

#: Label id -> structure name (``tube`` is the vessel-like curved tube).
PHANTOM_LABELS: dict[int, str] = {1: "large_organ", 2: "box_organ", 3: "small_organ_a", 4: "small_organ_b",
                                  5: "tube"}

# Per label: (shape kind, radii in units of the body's half-axes (x, y) and z half-extent, superquadric
# exponent, CT HU, MRI value).
_ORGANS = {
    1: ("ellipsoid", (0.50, 0.48, 0.45), 2.0, 60.0, 420.0),
    2: ("superquadric", (0.27, 0.25, 0.35), 4.0, 130.0, 650.0),
    3: ("ellipsoid", (0.20, 0.17, 0.30), 2.0, 30.0, 280.0),
    4: ("ellipsoid", (0.17, 0.20, 0.28), 2.0, 180.0, 750.0),
}
_TUBE_LABEL = 5
_TUBE_VALUES = (250.0, 800.0)  # contrast-enhanced vessel (CT HU, MRI)
_BODY_VALUES = (-60.0, 120.0)  # fat/soft-tissue mix (CT HU), MRI body signal
_AIR_HU = -1000.0


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A random rotation matrix, angles up to ``max_angle`` radians about each axis."""
    a, b, c = rng.uniform(-max_angle, max_angle, size=3)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: Sequence[int]) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: coarse Gaussian noise upsampled (separable bicubic)."""
    g = rng.standard_normal(tuple(coarse)).astype(np.float32)
    wx, wy, wz = (resize_weights(c, n, "bicubic").astype(np.float32) for c, n in zip(coarse, shape))
    f = g @ wz.T  # (cx, cy, Z)
    f = np.einsum("yj,ijz->iyz", wy, f)  # (cx, Y, Z)
    out = wx[:, 0, None, None] * f[0]  # last stage as a few broadcast multiply-adds (no BLAS call)
    for i in range(1, f.shape[0]):
        out += wx[:, i, None, None] * f[i]
    return out


def _oriented(array: np.ndarray, affine_ras: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical (RAS) array in another axis orientation, with the affine that keeps it in place."""
    target = axcodes2ornt(tuple(orientation))
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), target)
    out = apply_orientation(array, t)
    return out, affine_ras @ inv_ornt_aff(t, array.shape)


def make_phantom(
    seed: Any,
    kind: str = "ct",
    shape: tuple[int, int, int] = (96, 96, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    *,
    orientation: str = "LAS",
    n_organs: int = 4,
    tube: bool = True,
    noise: float | None = None,
    bias: float | None = None,
    deform: float = 0.06,
    blur_mm: float = 0.6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic volume: ``(image float32, labels uint8, affine (4, 4))``, in ``orientation``.

    ``kind="ct"``: HU-like values (air -1000 outside the body, fat/soft tissue inside, organs 30-180 HU,
    the tube 250 HU), Gaussian noise (default sigma 12 HU), no bias field. ``kind="mri"``: values 0-800 with
    a multiplicative bias field (default strength 0.25), Rician-like noise (default sigma 12) and exactly 0
    outside the body (so the non-zero crop and the 25 % rule of the preprocessing apply).
    ``n_organs`` (0-4) organs carry labels 1..n_organs; the tube label is 5. ``deform`` is the amplitude
    of the smooth random deformation as a fraction of the body size.
    """
    if kind not in ("ct", "mri"):
        raise ValueError(f"kind must be 'ct' or 'mri', got {kind!r}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape!r}")
    if not 0 <= n_organs <= len(_ORGANS):
        raise ValueError(f"n_organs must be in 0..{len(_ORGANS)}, got {n_organs}")
    rng = np.random.default_rng(seed)
    ct = kind == "ct"
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=np.float64)

    # Voxel-centre coordinates in mm, centred on the volume.
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, sp)]
    ext = np.array([(n - 1) / 2 * s for n, s in zip(shape, sp)], dtype=np.float32)  # half-extent (mm)
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    # Smooth random deformation: displace the coordinates at which the structures are evaluated.
    coarse = (4, 4, 3)
    amp = (deform * ext).astype(np.float32)
    x = x + amp[0] * _smooth_field(rng, shape, coarse)
    y = y + amp[1] * _smooth_field(rng, shape, coarse)
    z = z + amp[2] * _smooth_field(rng, shape, coarse)

    # Body: elliptical cross-section, half-axes ~60-80 % of the field of view, varying along z.
    zn = z / ext[2]
    bx = ext[0] * rng.uniform(0.72, 0.82) * (1 + 0.06 * np.sin(np.pi * zn + rng.uniform(0, 2 * np.pi)))
    by = ext[1] * rng.uniform(0.58, 0.70) * (1 + 0.06 * np.cos(np.pi * zn + rng.uniform(0, 2 * np.pi)))
    body = (x / bx) ** 2 + (y / by) ** 2 <= 1.0
    body_half = np.array([ext[0] * 0.77, ext[1] * 0.64, ext[2]], dtype=np.float32)

    labels = np.zeros(shape, dtype=np.uint8)
    values = np.where(body, _BODY_VALUES[0 if ct else 1], _AIR_HU if ct else 0.0).astype(np.float32)
    # A texture: fat/soft-tissue mix inside the body.
    values += body * (25.0 if ct else 20.0) * _smooth_field(rng, shape, (8, 8, 5))

    placed = np.zeros(shape, dtype=bool)
    organ_texture = _smooth_field(rng, shape, (6, 6, 4))
    margin = 3.0 * amp  # the deformation moves a point by at most ~3 field standard deviations
    for k in range(1, n_organs + 1):
        kind_k, radii, expo, hu, mr = _ORGANS[k]
        r = (np.asarray(radii) * body_half * rng.uniform(0.85, 1.15, size=3)).astype(np.float32)
        for _ in range(20):  # place it inside the body, overlapping the organs already there by < 10 %
            c = rng.uniform(-0.45, 0.45, size=3) * body_half
            c[2] = rng.uniform(-0.3, 0.3) * body_half[2]
            rot = _rotation(rng, np.pi / 5 if kind_k == "ellipsoid" else np.pi / 8).astype(np.float32)
            # Evaluate only in the box that can contain the organ (its bounding sphere, plus the deformation).
            reach = float(r.max()) * (1.8 if kind_k == "superquadric" else 1.0) + margin
            box = tuple(
                slice(int(np.searchsorted(a, c[i] - reach[i])), int(np.searchsorted(a, c[i] + reach[i], "right")))
                for i, a in enumerate(axes)
            )
            dx, dy, dz = x[box] - np.float32(c[0]), y[box] - np.float32(c[1]), z[box] - np.float32(c[2])
            u = np.abs(rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz) / r[0]
            v = np.abs(rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz) / r[1]
            w = np.abs(rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz) / r[2]
            if expo == 2.0:
                f = u * u + v * v + w * w
            else:
                f = (u * u) ** (expo / 2) + (v * v) ** (expo / 2) + (w * w) ** (expo / 2)
            sub = (f <= 1.0) & body[box]
            n = sub.sum()
            if n and (sub & placed[box]).sum() < 0.1 * n:
                break
        organ = np.zeros(shape, dtype=bool)
        organ[box] = sub & ~placed[box]
        placed |= organ
        labels[organ] = k
        val = (hu if ct else mr) * rng.uniform(0.93, 1.07)
        values[organ] = val + (8.0 if ct else 25.0) * organ_texture[organ]

    if tube:
        # Curved tube along z: the centre line bends, the elliptical cross-section grows/shrinks and turns.
        t = z / ext[2]  # deformed height in [-1, 1]
        ph = rng.uniform(0, 2 * np.pi, size=4).tolist()
        cx = body_half[0] * (rng.uniform(-0.2, 0.2) + 0.25 * np.sin(1.3 * np.pi * t + ph[0]))
        cy = body_half[1] * (rng.uniform(-0.2, 0.2) + 0.25 * np.cos(1.1 * np.pi * t + ph[1]))
        base = rng.uniform(0.10, 0.13) * body_half[0]
        ra = base * (1 + 0.45 * np.sin(np.pi * t + ph[2]))
        rb = base * (1 + 0.3 * np.cos(np.pi * t + ph[3])) * 0.8
        ang = 0.6 * np.pi * t
        dx, dy = x - cx, y - cy
        p = (np.cos(ang) * dx + np.sin(ang) * dy) / ra
        q = (-np.sin(ang) * dx + np.cos(ang) * dy) / rb
        vessel = (p**2 + q**2 <= 1.0) & body
        labels[vessel] = _TUBE_LABEL
        values[vessel] = _TUBE_VALUES[0 if ct else 1] * rng.uniform(0.9, 1.1)

    # Partial volume: blur (sigma in mm -> voxels, so less across thick slices).
    if blur_mm > 0:
        values = ndimage.gaussian_filter(values, sigma=blur_mm / sp, mode="nearest", truncate=3.0)
    if ct:
        sigma = 12.0 if noise is None else noise
        values = values + sigma * rng.standard_normal(shape, dtype=np.float32)
    else:
        strength = 0.25 if bias is None else bias
        field = np.exp(strength * _smooth_field(rng, shape, (3, 3, 2)))
        values = values * field
        sigma = 12.0 if noise is None else noise
        re = values + sigma * rng.standard_normal(shape, dtype=np.float32)
        im = sigma * rng.standard_normal(shape, dtype=np.float32)
        values = np.sqrt(re * re + im * im)  # Rician magnitude
        values[~body] = 0.0  # masked outside the body: exact zeros
    values = values.astype(np.float32)

    affine_ras = np.diag([*sp, 1.0])
    affine_ras[:3, 3] = -np.asarray([(n - 1) / 2 * s for n, s in zip(shape, sp)])
    img_o, affine = _oriented(values, affine_ras, orientation)
    lab_o, _ = _oriented(labels, affine_ras, orientation)
    return np.ascontiguousarray(img_o), np.ascontiguousarray(lab_o), affine


def write_phantom_dataset(
    root: str | Path,
    n_cases: int,
    kind: str = "ct",
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = (96, 96, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    orientation: str = "LAS",
    **phantom_kwargs: Any,
) -> Path:
    """Write ``n_cases`` phantoms as an MSD-style dataset (``imagesTr/``, ``labelsTr/``, ``dataset.json``).

    Case ``i`` is ``make_phantom((seed, i), ...)``. CT images are stored as int16 HU, MRI as float32, labels
    as uint8, all ``.nii.gz`` with the phantom's affine. Returns ``root``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    n_organs = int(phantom_kwargs.get("n_organs", len(_ORGANS)))
    with_tube = bool(phantom_kwargs.get("tube", True))
    training = []
    for i in range(n_cases):
        image, labels, affine = make_phantom((seed, i), kind, shape, spacing, orientation=orientation,
                                             **phantom_kwargs)
        name = f"phantom_{i:03d}.nii.gz"
        stored = np.round(image).astype(np.int16) if kind == "ct" else image
        for folder, arr in (("imagesTr", stored), ("labelsTr", labels)):
            img = nib.Nifti1Image(arr, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, str(root / folder / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    names = {"0": "background"}
    names.update({str(k): v for k, v in PHANTOM_LABELS.items() if k <= n_organs or (k == _TUBE_LABEL and with_tube)})
    meta = {
        "name": f"Phantom{kind.upper()}",
        "description": f"synthetic {kind.upper()}-like phantoms (medsam2_jax.data.phantoms), seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT" if kind == "ct" else "MRI"},
        "labels": names,
        "numTraining": n_cases,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
