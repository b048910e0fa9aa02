"""Reading and writing medical images: NIfTI volumes, PNG/JPEG images, and a dataset layout.

Volumes
-------
:func:`load_volume` reads a ``.nii`` / ``.nii.gz`` file with nibabel and reorients it to the closest
canonical orientation (RAS+: the first array axis runs towards the patient's Right, the second towards
Anterior, the third towards Superior) with ``nibabel.as_closest_canonical``. The returned :class:`Volume`
keeps the canonical affine, the voxel spacing in mm, and the file's own affine, shape and orientation code,
so that :func:`save_volume` can write a prediction back on the file's original voxel grid and affine.
:func:`load_labels` reads a label map and checks it against its image (same shape, same affine), then
applies the same reorientation.

Bad input raises :class:`~medsam2_jax.data.errors.DataError` naming the file: unreadable or corrupt bytes, a
truncated ``.nii.gz``, a file that is not 3D (2D, or 4D with more than one volume), NaN or inf voxels,
labels of another shape or affine than their image, non-integer or negative label values, and an empty label
map (:class:`~medsam2_jax.data.errors.EmptyLabelsError`, unless ``allow_empty=True``). Whether such a case
stops the run or is skipped is decided by :class:`~medsam2_jax.data.errors.SkipReport`.

2D images
---------
:func:`load_image_2d` reads PNG/JPEG (and anything else Pillow reads) as ``(H, W, 3)`` float32 in the
file's own value range (a grey image is replicated to three channels, alpha is dropped; EXIF rotation is
ignored: pixels are taken as stored). :func:`load_mask_2d` reads a single-channel label image as ``(H, W)``
int32; a mask whose values are only 0 and 255 is read as 0/1, and a JPEG mask (lossy) is thresholded at 128
to 0/1. A colour (RGB with different channels) mask is an error: colour-coded classes are ambiguous.

Dataset layout
--------------
:func:`read_dataset` reads a dataset folder in one of two layouts, and returns one :class:`Case` per
training image::

    root/
      dataset.json          # optional in layout B
      imagesTr/             # images: .nii.gz / .nii (3D) or .png / .jpg / .jpeg (2D)
      labelsTr/             # label maps with the same file names (an image ``<id>_0000.*`` also pairs
                            # with the label ``<id>.*``; 2D images pair with a label of the same stem)

A. Medical Segmentation Decathlon style: ``dataset.json`` lists the cases::

    {"name": "Task03_Liver",
     "modality": {"0": "CT"},
     "labels": {"0": "background", "1": "liver", "2": "cancer"},
     "tensorImageSize": "3D",
     "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}, ...]}

   ``labels`` may also be written the nnU-Net v2 way, ``{"background": 0, "liver": 1}``.
   ``tensorImageSize`` ("2D" or "3D") is optional: without it, NIfTI files are 3D and PNG/JPEG files 2D.

B. Folders only: ``imagesTr/`` + ``labelsTr/`` are paired by file name. The modality comes from the
   ``modality`` argument (the ``--modality`` command-line option), or from a ``dataset.json`` without a
   ``training`` list (``{"modality": "MRI", "labels": {"1": "prostate"}}``); the argument wins when both
   are given.

The modality must be one of :data:`KNOWN_MODALITIES` (case-insensitive; common spellings such as ``MR``,
``T1w``, ``FLAIR``, ``xray``, ``US`` are accepted, see :data:`MODALITY_ALIASES`); anything else is a
DataError that lists the known ones. Multi-channel images (an MSD ``modality`` with several entries, or a 4D
file with several volumes) are not supported and are reported as errors. The task name is ``name`` from
``dataset.json``, else the folder's name; label names default to ``class_<id>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from medsam2_jax.data.errors import DataError, EmptyLabelsError, SkipReport

PathLike = str | os.PathLike

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Canonical modality names, as the rest of the package spells them.
KNOWN_MODALITIES = (
    "CT",
    "MRI",
    "PET",
    "X-ray",
    "ultrasound",
    "mammography",
    "OCT",
    "fundus",
    "dermoscopy",
    "endoscopy",
    "pathology",
)

#: Accepted spellings (lower case, spaces/underscores/dashes removed) -> canonical modality.
MODALITY_ALIASES = {
    "ct": "CT",
    "cect": "CT",
    "mri": "MRI",
    "mr": "MRI",
    "t1": "MRI",
    "t1w": "MRI",
    "t1gd": "MRI",
    "t1ce": "MRI",
    "t2": "MRI",
    "t2w": "MRI",
    "flair": "MRI",
    "adc": "MRI",
    "dwi": "MRI",
    "pet": "PET",
    "xray": "X-ray",
    "cxr": "X-ray",
    "radiograph": "X-ray",
    "ultrasound": "ultrasound",
    "us": "ultrasound",
    "mammography": "mammography",
    "mammo": "mammography",
    "oct": "OCT",
    "fundus": "fundus",
    "dermoscopy": "dermoscopy",
    "endoscopy": "endoscopy",
    "colonoscopy": "endoscopy",
    "pathology": "pathology",
    "histopathology": "pathology",
}


def canonical_modality(name: Any, source: Any = None) -> str:
    """The canonical spelling of a modality name; DataError listing the known ones otherwise."""
    key = re.sub(r"[\s_\-]", "", str(name)).lower()
    if key not in MODALITY_ALIASES:
        raise DataError(source, f"unknown modality {name!r}", f"one of {', '.join(KNOWN_MODALITIES)}")
    return MODALITY_ALIASES[key]


# --------------------------------------------------------------------------------------------- volumes


@dataclasses.dataclass
class Volume:
    """A 3D image in canonical RAS+ orientation, with what is needed to go back to its file.

    ``data`` is float32 ``(X, Y, Z)``, ``affine`` maps its voxel indices to world mm, ``spacing`` is the
    voxel size in mm along each array axis. ``original_affine`` / ``original_shape`` / ``orientation``
    describe the file's own voxel grid (``orientation`` is its axis code, e.g. ``("L", "A", "S")``).
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    orientation: tuple[str, str, str]
    path: str | None = None
    qform_code: int = 1
    sform_code: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def ornt(self) -> np.ndarray:
        """nibabel orientation of the file's axes (file -> canonical)."""
        return io_orientation(self.original_affine)

    def to_canonical(self, file_array: np.ndarray) -> np.ndarray:
        """Reorient an array on the file's voxel grid to this volume's canonical grid."""
        return apply_orientation(np.asarray(file_array), self.ornt)

    def to_file_orientation(self, canonical_array: np.ndarray) -> np.ndarray:
        """Reorient an array on the canonical grid back to the file's voxel grid (inverse of the above)."""
        back = ornt_transform(axcodes2ornt(("R", "A", "S")), self.ornt)
        return apply_orientation(np.asarray(canonical_array), back)

    @classmethod
    def from_array(cls, data: np.ndarray, affine: np.ndarray, path: str | None = None) -> "Volume":
        """A Volume from an array on the voxel grid of ``affine`` (any orientation), as if read from a file."""
        data = np.asarray(data, dtype=np.float32)
        return volume_from_nifti(nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64)), path)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _read_nifti(path: PathLike) -> nib.Nifti1Image:
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file", "an existing .nii or .nii.gz file")
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(p, f"unsupported file type {''.join(p.suffixes)!r}", "a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ...
        raise DataError(p, f"cannot read as NIfTI ({type(e).__name__}: {e})", "a valid NIfTI-1/2 file") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(p, f"not a NIfTI image ({type(img).__name__})", "a NIfTI-1/2 file")
    return img


def _unreadable(source: Any, e: Exception) -> DataError:
    return DataError(source, f"cannot read voxel data ({type(e).__name__}: {e}); the file is truncated or corrupt",
                     "a complete NIfTI file")


def _read_array(img: nib.spatialimages.SpatialImage, source: Any) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated / corrupt data block (EOFError, zlib.error, OSError, ValueError)
        raise _unreadable(source, e) from e


def _squeeze_to_3d(shape: tuple[int, ...], source: Any, allow_2d: bool) -> tuple[int, ...]:
    """The 3D shape of a NIfTI data block, or a DataError for 2D / multi-volume files."""
    shape = tuple(int(s) for s in shape)
    full = shape
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) and NIfTI's trailing singleton dims
        shape = shape[:-1]
    if len(shape) > 3:
        raise DataError(source, f"{len(full)}D data of shape {full} ({int(np.prod(full[3:]))} volumes)",
                        "a single 3D volume (X, Y, Z)")
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if not allow_2d and min(shape) < 2:
        raise DataError(source, f"2D image of shape {full} where a 3D volume is expected",
                        "a 3D volume with at least 2 voxels along every axis")
    if allow_2d and sorted(shape)[1] < 2:
        raise DataError(source, f"data of shape {full} has fewer than two axes longer than 1",
                        "a 2D image or a 3D volume")
    return shape


def volume_from_nifti(img: nib.spatialimages.SpatialImage, source: Any = None, *, allow_2d: bool = False) -> Volume:
    """A :class:`Volume` from a nibabel image (see :func:`load_volume`)."""
    shape3 = _squeeze_to_3d(img.shape, source, allow_2d)
    if len(img.shape) != 3:
        img = nib.Nifti1Image(_read_array(img, source).reshape(shape3), img.affine, img.header)
    original_affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(original_affine)) or abs(np.linalg.det(original_affine[:3, :3])) < 1e-12:
        raise DataError(source, f"degenerate affine\n{original_affine}", "an invertible voxel-to-world affine")
    try:  # reorienting reads the voxel data
        canonical = nib.as_closest_canonical(img)
    except Exception as e:
        raise _unreadable(source, e) from e
    data = _read_array(canonical, source)
    if data.dtype.kind not in "biuf":
        raise DataError(source, f"voxel type {data.dtype} is not numeric", "integer or float voxels")
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(source, f"{int(bad.sum())} NaN/inf voxel(s) (first at canonical index "
                        f"{tuple(int(i) for i in np.argwhere(bad)[0])})", "finite voxel values")
    hdr = img.header
    return Volume(
        data=data,
        affine=np.asarray(canonical.affine, dtype=np.float64),
        spacing=_spacing(canonical.affine),
        original_affine=original_affine,
        original_shape=shape3,  # type: ignore[arg-type]
        orientation=tuple(nib.aff2axcodes(original_affine)),  # type: ignore[arg-type]
        path=None if source is None else os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source),
        qform_code=int(hdr["qform_code"]) if "qform_code" in hdr else 1,
        sform_code=int(hdr["sform_code"]) if "sform_code" in hdr else 1,
    )


def load_volume(path: PathLike, *, allow_2d: bool = False) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` volume in canonical RAS+ orientation.

    ``allow_2d=True`` also accepts a 2D image (returned with a third axis of length 1). Raises DataError
    naming the file for unreadable, truncated, non-3D (unless ``allow_2d``) or non-finite data.
    """
    img = _read_nifti(path)
    return volume_from_nifti(img, path, allow_2d=allow_2d)


def labels_from_nifti(
    img: nib.spatialimages.SpatialImage,
    like: Volume,
    source: Any = None,
    *,
    allow_empty: bool = False,
    affine_atol: float = 1e-3,
) -> np.ndarray:
    """A label map (int32, canonical grid of ``like``) from a nibabel image (see :func:`load_labels`)."""
    shape3 = _squeeze_to_3d(img.shape, source, allow_2d=min(like.original_shape) < 2)
    if shape3 != tuple(like.original_shape):
        raise DataError(source, f"label map of shape {shape3} does not match its image {like.path} of shape "
                        f"{tuple(like.original_shape)}", "the image's shape")
    aff = np.asarray(img.affine, dtype=np.float64)
    diff = float(np.abs(aff - like.original_affine).max())
    if not diff <= affine_atol:
        raise DataError(source, f"label affine differs from the affine of its image {like.path} by up to {diff:.4g} "
                        f"mm\nlabels:\n{aff}\nimage:\n{like.original_affine}",
                        f"the image's affine (to {affine_atol} mm)")
    raw = _read_array(img, source).reshape(shape3)
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise DataError(source, f"{int((~np.isfinite(raw)).sum())} NaN/inf label value(s)", "integer class ids")
        frac = raw != np.round(raw)
        if frac.any():
            raise DataError(source, f"non-integer label value(s), e.g. {float(raw[frac][0])!r}",
                            "integer class ids (0 = background)")
    elif raw.dtype.kind not in "biu":
        raise DataError(source, f"label voxel type {raw.dtype} is not numeric", "integer class ids")
    if raw.size and raw.min() < 0:
        raise DataError(source, f"negative label value {raw.min()}", "class ids >= 0 (0 = background)")
    if raw.size and raw.max() > np.iinfo(np.int32).max:
        raise DataError(source, f"label value {raw.max()} too large", "class ids that fit in int32")
    labels = like.to_canonical(raw.astype(np.int32))
    if not allow_empty and not labels.any():
        raise EmptyLabelsError(source, "the label map is empty (no voxel > 0)", "at least one labelled voxel")
    return np.ascontiguousarray(labels)


def load_labels(path: PathLike, like: Volume, *, allow_empty: bool = False, affine_atol: float = 1e-3) -> np.ndarray:
    """Read a label map for the image ``like``, on ``like``'s canonical grid, as int32.

    The file must have the image's shape and affine (to ``affine_atol`` mm); labels must be integers >= 0.
    An empty map raises :class:`EmptyLabelsError` unless ``allow_empty`` (a SkipReport in ``"skip"`` mode
    turns that into a logged skip).
    """
    img = _read_nifti(path)
    return labels_from_nifti(img, like, path, allow_empty=allow_empty, affine_atol=affine_atol)


def _storage_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype == np.bool_:
        return np.dtype(np.uint8)
    if data.dtype.kind in "iu":
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return np.dtype(dt)
        return np.dtype(np.int64)
    return np.dtype(np.float32)


def save_volume(path: PathLike, data: np.ndarray, like: Volume) -> Path:
    """Write ``data`` (on ``like``'s canonical grid) as NIfTI on the ORIGINAL file grid and affine of ``like``.

    The canonical reorientation done by :func:`load_volume` is undone, so the written file lines up voxel
    for voxel with the file ``like`` came from. Booleans and integers are stored as the smallest integer
    type that holds them, floats as float32.
    """
    data = np.asarray(data)
    if data.shape != like.shape:
        raise ValueError(f"save_volume: data has shape {data.shape}, expected the canonical shape {like.shape} of "
                         f"{like.path or 'the reference volume'}")
    out = like.to_file_orientation(data.astype(_storage_dtype(data)))
    if out.shape != tuple(like.original_shape):  # cannot happen if like is consistent
        raise ValueError(f"save_volume: reoriented shape {out.shape} != original shape {like.original_shape}")
    img = nib.Nifti1Image(np.ascontiguousarray(out), like.original_affine)
    img.set_qform(like.original_affine, code=like.qform_code or 1)
    img.set_sform(like.original_affine, code=like.sform_code or 1)
    img.header.set_xyzt_units("mm", "sec")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(p))
    return p


# --------------------------------------------------------------------------------------------- 2D images


def _open_pil(path: PathLike):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file", "an existing PNG/JPEG image")
    try:
        im = Image.open(p)
        im.load()
    except Exception as e:
        raise DataError(p, f"cannot read as an image ({type(e).__name__}: {e})", "a valid PNG/JPEG file") from e
    return im


def load_image_2d(path: PathLike) -> np.ndarray:
    """A PNG/JPEG image as ``(H, W, 3)`` float32 in the file's value range (grey replicated, alpha dropped)."""
    im = _open_pil(path)
    mode = im.mode
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    elif mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        grey = np.asarray(im.convert("L") if mode in ("1", "LA") else im)
        if grey.ndim != 2:
            grey = grey[..., 0]
        arr = np.repeat(grey.astype(np.float32)[..., None], 3, axis=-1)
    else:
        raise DataError(path, f"unsupported image mode {mode!r}", "a grey or RGB PNG/JPEG image")
    if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
        raise DataError(path, f"image of shape {arr.shape}", "(H, W) grey or (H, W, 3) colour pixels")
    if not np.all(np.isfinite(arr)):
        raise DataError(path, "NaN/inf pixel values", "finite pixel values")
    return arr


def load_mask_2d(path: PathLike) -> np.ndarray:
    """A single-channel label image as ``(H, W)`` int32 (0/255 masks -> 0/1; JPEG masks thresholded at 128)."""
    im = _open_pil(path)
    is_jpeg = (im.format or "").upper() == "JPEG"
    if im.mode == "P":  # palette indices are the class ids
        arr = np.asarray(im)
    elif im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])) and not is_jpeg:
            raise DataError(path, "colour mask (RGB channels differ)", "a single-channel label image (grey or palette)")
        arr = rgb.mean(axis=-1) if is_jpeg else rgb[..., 0]
    elif im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im.convert("L") if im.mode in ("1", "LA") else im)
        if im.mode == "1":
            arr = (arr > 0).astype(np.int32)
    else:
        raise DataError(path, f"unsupported mask mode {im.mode!r}", "a single-channel label image")
    arr = np.asarray(arr)
    if is_jpeg:  # lossy: only a binary mask can be recovered
        return (arr >= 128).astype(np.int32)
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise DataError(path, "non-integer mask values", "integer class ids")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise DataError(path, f"negative mask value {arr.min()}", "class ids >= 0")
    values = np.unique(arr)
    if values.size and set(values.tolist()) <= {0, 255} and 255 in values:
        arr = (arr == 255).astype(np.int64)
    return arr.astype(np.int32)


# --------------------------------------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True)
class Case:
    """One image of a dataset, with its label map and metadata (see the module docstring for the layout)."""

    image: Path
    label: Path | None
    modality: str
    task: str
    label_names: dict[int, str]
    dim: int  # 2 or 3

    @property
    def case_id(self) -> str:
        return _stem(self.image)


def _stem(p: Path) -> str:
    name = Path(p).name
    for suf in NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES) and not p.name.startswith(".")


def _file_dim(p: Path, tensor_size: str | None, source: Any) -> int:
    if tensor_size is not None:
        ts = str(tensor_size).strip().upper()
        if ts in ("2D", "3D"):
            return int(ts[0])
        raise DataError(source, f"tensorImageSize {tensor_size!r} (multi-channel or time series)", '"2D" or "3D"')
    return 3 if p.name.lower().endswith(NIFTI_SUFFIXES) else 2


def _parse_label_names(labels: Any, source: Any) -> dict[int, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise DataError(source, f'"labels" is a {type(labels).__name__}', 'a mapping {"1": "liver", ...}')
    out: dict[int, str] = {}
    for k, v in labels.items():
        try:
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):  # nnU-Net v2: name -> id
                cid, name = int(v), str(k)
            elif isinstance(v, str):  # MSD: id -> name
                cid, name = int(k), v
            else:
                raise TypeError
        except (TypeError, ValueError):
            raise DataError(source, f"label entry {k!r}: {v!r} is not an id/name pair (regions are not supported)",
                            'MSD {"1": "liver"} or nnU-Net {"liver": 1}') from None
        if cid > 0:
            out[cid] = name
    return out


def _parse_modality(modality: Any, source: Any) -> str:
    if isinstance(modality, dict):
        if len(modality) != 1:
            raise DataError(source, f"{len(modality)} input channels {modality}", "a single-channel modality")
        modality = next(iter(modality.values()))
    return canonical_modality(modality, source)


def _pair_folders(root: Path, source: Any, report: SkipReport) -> list[tuple[Path, Path]]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(d, "missing folder", "imagesTr/ and labelsTr/ folders, or a dataset.json training list")
    labels = {}
    for p in sorted(labels_dir.iterdir()):
        if _is_image_file(p):
            labels.setdefault(_stem(p), p)
    pairs = []
    for img in sorted(images_dir.iterdir()):
        if not _is_image_file(img):
            continue
        stem = _stem(img)
        lab = labels.get(stem) or labels.get(re.sub(r"_\d{4}$", "", stem))
        if lab is None:
            report.handle(DataError(img, f"no label file for this image in {labels_dir}",
                                    f"labelsTr/{stem}.* or labelsTr/{re.sub(r'_[0-9]{4}$', '', stem)}.*"))
            continue
        pairs.append((img, lab))
    if not pairs and not report.skipped:
        raise DataError(images_dir, "no image files", f"files ending in {NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES}")
    return pairs


def read_dataset(root: PathLike, modality: str | None = None, *, report: SkipReport | None = None) -> list[Case]:
    """The training cases of a dataset folder (layouts in the module docstring).

    ``modality`` overrides the one in ``dataset.json`` and is required when there is no ``dataset.json``.
    A case whose image or label file is missing goes through ``report`` (raise by default).
    """
    root = Path(root)
    report = SkipReport("raise") if report is None else report
    if not root.is_dir():
        raise DataError(root, "no such dataset folder", "a folder with dataset.json and/or imagesTr/ + labelsTr/")
    meta_path = root / "dataset.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(meta_path, f"invalid JSON ({e})", "an MSD-style dataset.json") from e
        if not isinstance(meta, dict):
            raise DataError(meta_path, f"top level is a {type(meta).__name__}", "a JSON object")
    if modality is not None:
        mod = canonical_modality(modality, f"modality argument for {root}")
    elif "modality" in meta:
        mod = _parse_modality(meta["modality"], meta_path)
    else:
        where = meta_path if meta else root
        raise DataError(where, "no modality given (no dataset.json 'modality' and no modality argument)",
                        f"a modality, one of {', '.join(KNOWN_MODALITIES)}")
    task = str(meta.get("name") or root.name)
    names = _parse_label_names(meta.get("labels"), meta_path)
    tensor_size = meta.get("tensorImageSize")

    if "training" in meta:
        entries = meta["training"]
        if not isinstance(entries, list):
            raise DataError(meta_path, '"training" is not a list', '[{"image": ..., "label": ...}, ...]')
        pairs = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "image" not in e:
                raise DataError(meta_path, f"training entry {i} is {e!r}", '{"image": ..., "label": ...}')
            img = (root / e["image"]).resolve()
            lab = (root / e["label"]).resolve() if e.get("label") else None
            with report.guard(img):
                if not img.is_file():
                    raise DataError(img, f"listed in {meta_path} but missing", "an existing image file")
                if lab is None or not lab.is_file():
                    raise DataError(lab or img, f"label of {img.name} listed in {meta_path} is missing",
                                    "an existing label file")
                pairs.append((img, lab))
    else:
        pairs = _pair_folders(root, meta_path if meta else root, report)

    cases = []
    for img, lab in pairs:
        dim = _file_dim(img, tensor_size, meta_path)
        cases.append(Case(image=img, label=lab, modality=mod, task=task, label_names=dict(names), dim=dim))
    return cases


def load_case(case: Case, *, allow_empty: bool = False) -> tuple[Any, np.ndarray]:
    """Read one case: ``(Volume, labels (X,Y,Z))`` when ``case.dim == 3``, ``(image (H,W,3), mask (H,W))`` for 2D.

    2D cases stored as NIfTI (X-ray, ultrasound) are read with their single slice.
    """
    if case.dim == 3:
        vol = load_volume(case.image)
        labels = load_labels(case.label, vol, allow_empty=allow_empty) if case.label else None
        return vol, labels  # type: ignore[return-value]
    if case.image.name.lower().endswith(NIFTI_SUFFIXES):
        vol = load_volume(case.image, allow_2d=True)
        labels = load_labels(case.label, vol, allow_empty=allow_empty) if case.label else None
        axis = int(np.argmin(vol.shape))
        img = np.moveaxis(vol.data, axis, -1)[..., 0]
        mask = None if labels is None else np.moveaxis(labels, axis, -1)[..., 0]
        return np.repeat(img[..., None], 3, axis=-1), mask  # type: ignore[return-value]
    image = load_image_2d(case.image)
    mask = load_mask_2d(case.label) if case.label else None
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise DataError(case.label, f"mask of shape {mask.shape} does not match its image {case.image} of shape "
                            f"{image.shape[:2]}", "the image's height and width")
        if not allow_empty and not mask.any():
            raise EmptyLabelsError(case.label, "the mask is empty (no pixel > 0)", "at least one labelled pixel")
    return image, mask  # type: ignore[return-value]
