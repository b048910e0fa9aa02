"""Segment one structure in your own scan from one prompt: ``medsam2-segment`` / ``python -m medsam2_jax.apps.segment``.

    medsam2-segment scan.nii.gz --model models/sam2.1_tiny --slice 60 --box 80 90 150 170 --out mask.nii.gz
    medsam2-segment scan.nii.gz --random-weights --slice 60 --point 120 130 --negative-point 90 95
    medsam2-segment images/ --template images/case_03.png --model models/sam2.1_tiny --box 40 50 120 140

**Prompt coordinates are voxel indices of the input file**, as ITK-SNAP or 3D Slicer show them in voxel
mode: ``--slice Z`` is an index along the file's third array axis, ``X`` and ``Y`` along its first and second;
the affine and orientation play no part. The package maps them through the reorientation to RAS+, the
slicing, the crop and the resize to the model's ``S x S`` frames (:mod:`medsam2_jax.data.coords`). The
volume is sliced along the file's third axis whatever its spacing.

Prompts (one slice, any combination of clicks and a box, or a mask): ``--box X0 Y0 X1 Y1`` (inclusive voxel
indices), ``--point X Y`` (positive click, repeatable), ``--negative-point X Y`` (repeatable),
``--mask-prompt FILE`` (a 2D mask of that slice with the file's in-plane shape ``(X, Y)``, or a mask volume of
the input's shape whose slice ``Z`` is used; ``.nii``, ``.nii.gz`` or ``.npy``).

The 3D mode is :func:`medsam2_jax.volume.segment_volume` (the paper's six orientations with the
self-sorting memory bank, aggregated by mean; ``--orientations`` picks fewer). For speed the command's
default takes at most ``--frames 32`` coronal and sagittal sections per axis (``--frames all``: one per voxel
of the crop) and reuses the first-stage axial runs as the axial result instead of tracking the axial pair a
second time (``--rerun-axial`` does); each axis's frames are encoded once and shared by both directions.
The README's segment section gives the measured time split and the agreement with the full path. Intensities are normalised
as in the paper (:func:`medsam2_jax.data.preprocess.preprocess_case`). **CT without dataset statistics**
(one's own unlabelled scan) is clipped to the HU window (``--window``, default soft tissue: level 40 /
width 400, i.e. -160..240 HU) and z-scored with mean = level, std = width / 4 (the window maps to [-2, 2];
:func:`medsam2_jax.data.preprocess.default_ct_stats`). MR and other modalities get the per-image percentile
clip and z-score. ``--modality auto`` (default) calls a scan CT when at least 1 % of its voxels are at or
below -500 (air at about -1000 HU), else MR, and says what it chose.

Outputs: the mask (uint8 0/1) as NIfTI with the input's exact shape, affine and qform/sform codes (a code of
0 stays 0), written to a temporary file and renamed, so a failed run leaves no partial file; optionally the
aggregated probabilities (``--probabilities FILE``, float32); overlay PNGs of a few slices in the file's
voxel view (x to the right, y down; the mask's outline in red over the image, the prompt in yellow/green/red).

Bad input (a prompt outside the volume, a slice out of range, a mask prompt of the wrong shape, a 4D or
non-NIfTI file, a missing or unusable model directory, NaN voxels, ...) exits with status 2 and a message
naming the argument and the valid range, as ``argparse`` does, before anything is written.

**2D one-prompt mode.** With ``--template FILE``, INPUT is a folder of 2D images (PNG, JPEG, ...) and the
prompt is on the template, in its pixel ``(x, y) = (column, row)`` coordinates (``--mask-prompt``: a PNG or
``.npy`` mask of the template's shape); every image of the folder is segmented by
:func:`medsam2_jax.oneprompt.segment_image_set` (template first, then the others by decreasing similarity to
it). ``--out`` is then a folder: ``<name>_mask.png`` (0/255, each image's own size) and ``overlays/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import compile_cache
from ..host_memory import keep_freed_memory

PROG = "medsam2-segment"
DEFAULT_RANDOM_SIZE = 256
#: Coronal / sagittal sections per sequence by default (at most one per voxel of the crop): see the README.
DEFAULT_FRAMES = 32
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.01
#: ``--orientations N`` takes the first N of these (then runs them in the paper's order).
COVERAGE_ORDER = ("axial", "axial_rev", "coronal", "coronal_rev", "sagittal", "sagittal_rev")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS (--random-weights): the model is randomly initialised, so the mask is MEANINGLESS; this run "
    "only shows that the pipeline works. Convert a checkpoint with convert/sam2_to_flax.py and pass --model DIR."
)


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Segment one structure in a 3D NIfTI scan from one prompt on one slice with Medical SAM 2 "
        "(JAX): six slice orientations and the self-sorting memory bank. Prompt coordinates are VOXEL INDICES "
        "of the input file (ITK-SNAP / 3D Slicer voxel mode): --slice is along the file's third axis, X and Y "
        "along its first and second.",
        epilog="CT without dataset statistics is clipped to the --window (default soft tissue, level 40 / width "
        "400 HU: -160..240) and z-scored with mean = level, std = width / 4. --modality auto calls a scan CT "
        "when >= 1%% of its voxels are <= -500 (air, about -1000 HU). Outputs: the mask NIfTI (uint8, the "
        "input's shape, affine and qform/sform codes), overlay PNGs (mask outline in red) and, with "
        "--probabilities, the probabilities. Bad input exits with status 2 and writes nothing. Example: "
        f"{PROG} scan.nii.gz --model models/sam2.1_tiny --slice 60 --box 80 90 150 170 --out mask.nii.gz",
    )
    ap.add_argument("input", metavar="INPUT", help="3D NIfTI scan (.nii or .nii.gz); with --template, a folder "
                    "of 2D images")
    w = ap.add_argument_group("model (one of)")
    w.add_argument("--model", metavar="DIR", help="converted model directory (medsam2.json + params/, from "
                   "convert/sam2_to_flax.py)")
    w.add_argument("--random-weights", action="store_true",
                   help="a randomly initialised model, to try the pipeline without a checkpoint (meaningless masks)")
    w.add_argument("--model-name", default="sam2.1_hiera_t", help="model size for --random-weights (default: "
                   "%(default)s)")
    w.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="frame size S, a multiple of 32 (default: the model's own size from its medsam2.json, or "
                   f"{DEFAULT_RANDOM_SIZE} with --random-weights; on a CPU 256-512 is practical: the encoder "
                   "features of every frame are held, about 1 MB per frame at 256 and 17 MB at 1024)")
    p = ap.add_argument_group("prompt (voxel indices of the input file)")
    p.add_argument("--slice", type=int, metavar="Z", help="the prompted slice: an index along the file's third axis")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box around the structure on that slice (inclusive voxel indices)")
    p.add_argument("--point", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"),
                   help="positive click (repeatable)")
    p.add_argument("--negative-point", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"),
                   help="negative click: not the structure (repeatable)")
    p.add_argument("--mask-prompt", metavar="FILE", help="mask of the structure on that slice: a 2D mask of the "
                   "file's in-plane shape (X, Y), or a volume of the input's shape whose slice Z is used "
                   "(.nii, .nii.gz or .npy)")
    s = ap.add_argument_group("segmentation")
    s.add_argument("--orientations", default="6", metavar="N|NAMES",
                   help="how many of the six orientations to run (1-6, taken in the order axial, axial_rev, "
                   "coronal, coronal_rev, sagittal, sagittal_rev; 2 = the prompted axis both ways) or a "
                   "comma-separated list of those names (default: all 6)")
    s.add_argument("--frames", type=_frames_arg, default=DEFAULT_FRAMES, metavar="T|all",
                   help="at most T evenly spaced sections per coronal / sagittal sequence (never more than one per "
                   "voxel of the crop, nor more than S); 'all' = one per voxel of the crop, as before (default: "
                   "%(default)s; see the README's segment section for what the default keeps)")
    s.add_argument("--rerun-axial", action="store_true",
                   help="track the axial pair again inside the combined six-orientation pass (the paper's combined "
                   "input taken literally; slower) instead of reusing the first-stage axial runs")
    s.add_argument("--modality", default="auto", help="CT, MR or auto (default; any modality name the package "
                   "knows is accepted)")
    s.add_argument("--window", default="soft_tissue", metavar="NAME",
                   help="CT window: soft_tissue (default), abdomen, mediastinum, liver, lung, bone or brain")
    s.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the mask (default 0.5)")
    s.add_argument("--seed", type=int, default=0, help="random weights and bank resampling (default 0)")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE",
                   help="mask NIfTI to write (.nii or .nii.gz; default: ./<input name>_mask.nii.gz)")
    o.add_argument("--probabilities", default=None, metavar="FILE", help="also write the probabilities (float32)")
    o.add_argument("--overlay-dir", default=None, metavar="DIR",
                   help="folder of overlay PNGs (default: next to --out, <out name>_overlays/)")
    o.add_argument("--overlays", type=int, default=5, help="number of overlay PNGs (default 5; 0: none)")
    o.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache ('none' to disable; default $MEDSAM2_JAX_CACHE or "
                   "~/.cache/medsam2-jax/xla)")
    o.add_argument("--quiet", action="store_true", help="print only the final summary")
    t = ap.add_argument_group("2D one-prompt mode (INPUT is a folder of PNG/JPEG images)")
    t.add_argument("--template", default=None, metavar="FILE",
                   help="the image of INPUT that carries the prompt (--box/--point/--negative-point in its pixel "
                   "(column, row) coordinates, or --mask-prompt: a PNG/.npy mask of its shape); every image of "
                   "the folder is segmented (medsam2_jax.oneprompt). --out is then a folder (default "
                   "./<folder>_masks/) of <name>_mask.png (0/255, each image's own size) and overlays/")
    return ap


def _frames_arg(text: str) -> int | None:
    if str(text).strip().lower() == "all":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'all', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'all'), got {v}")
    return v


def volume_config(a: argparse.Namespace):
    """The :class:`~medsam2_jax.volume.VolumeConfig` of parsed arguments (the command's defaults: see
    :data:`DEFAULT_FRAMES` and ``--rerun-axial``)."""
    from ..volume import VolumeConfig

    names = getattr(a, "orientation_names", None) or parse_orientations(a.orientations)
    return VolumeConfig(orientations=names, max_frames=a.frames, reuse_axial=not a.rerun_axial)


def _nifti_name(path: str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _strip_nifti(name: str) -> str:
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def parse_orientations(spec: str) -> tuple[str, ...]:
    """``"6"`` / ``"all"`` / ``"2"`` / ``"axial,coronal"`` -> orientation names in the paper's order; ValueError."""
    from ..volume import ORIENTATIONS

    text = str(spec).strip().lower()
    if text == "all":
        text = "6"
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= 6:
            raise ValueError(f"got {n}: a count must be 1-6")
        chosen = set(COVERAGE_ORDER[:n])
    else:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in ORIENTATIONS]
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(f"got {spec!r}: expected a count 1-6 or distinct names from {', '.join(ORIENTATIONS)}")
        chosen = set(names)
    return tuple(o for o in ORIENTATIONS if o in chosen)


def guess_modality(data: np.ndarray) -> tuple[str, str]:
    """``("CT" | "MRI", reason)``: CT when at least 1 % of the voxels are <= -500 (air is about -1000 HU)."""
    data = np.asarray(data)
    frac = float(np.mean(data <= CT_AIR_HU)) if data.size else 0.0
    lo = float(data.min()) if data.size else 0.0
    if frac >= CT_AIR_FRACTION:
        return "CT", f"{100 * frac:.1f}% of the voxels are <= {CT_AIR_HU:g} (air in HU; minimum {lo:g})"
    return "MRI", (f"only {100 * frac:.2f}% of the voxels are <= {CT_AIR_HU:g} (minimum {lo:g}), so not CT in HU; "
                   "pass --modality CT if it is CT")


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- checks
def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if (a.model is None) == (not a.random_weights):
        ap.error("argument --model: give exactly one of --model DIR (converted weights) or --random-weights")
    if a.image_size is not None and (a.image_size < 32 or a.image_size % 32):
        ap.error(f"argument --image-size: must be a positive multiple of 32 (e.g. 256, 512, 1024), got {a.image_size}")
    if a.template is not None:
        if a.slice is not None:
            ap.error("argument --slice: not used with --template (the prompt is on the template image)")
        if a.probabilities is not None:
            ap.error("argument --probabilities: not available with --template (2D mode writes mask PNGs)")
        if a.out is not None and _nifti_name(a.out):
            ap.error(f"argument --out: with --template it is a folder for the mask PNGs, got {a.out!r}")
    elif a.slice is None:
        ap.error("argument --slice: required: the prompted slice, an index along the file's third axis")
    if a.box is None and not a.point and not a.negative_point and a.mask_prompt is None:
        ap.error("argument --box: give a prompt: --box X0 Y0 X1 Y1, --point X Y (repeatable), "
                 "--negative-point X Y or --mask-prompt FILE")
    if a.mask_prompt is not None and (a.box is not None or a.point or a.negative_point):
        ap.error("argument --mask-prompt: a mask prompt cannot be combined with --box / --point / --negative-point")
    if a.point == [] and a.box is None and a.mask_prompt is None and a.negative_point:
        ap.error("argument --negative-point: negative clicks need a positive --point or a --box too")
    if not 0.0 < a.threshold < 1.0:
        ap.error(f"argument --threshold: must be in (0, 1), got {a.threshold}")
    if a.overlays < 0:
        ap.error(f"argument --overlays: must be >= 0, got {a.overlays}")
    for name, val in (("--out", a.out), ("--probabilities", a.probabilities)):
        if val is not None and not _nifti_name(val) and a.template is None:
            ap.error(f"argument {name}: {val!r} must end in .nii or .nii.gz")
    try:
        a.orientation_names = parse_orientations(a.orientations)
    except ValueError as e:
        ap.error(f"argument --orientations: {e}")
    from ..data.preprocess import WINDOWS

    if a.window not in WINDOWS:
        ap.error(f"argument --window: {a.window!r} is not one of {', '.join(sorted(WINDOWS))}")


def _read_model_meta(ap: argparse.ArgumentParser, model_dir: str) -> dict[str, Any]:
    d = Path(model_dir)
    if not d.is_dir():
        ap.error(f"argument --model: {model_dir}: no such model directory (convert a checkpoint with "
                 "`python convert/sam2_to_flax.py --checkpoint FILE.pt --model-name NAME --out DIR`)")
    meta_path = d / "medsam2.json"
    if not meta_path.is_file():
        ap.error(f"argument --model: {model_dir}: not a converted model directory (no medsam2.json); convert a "
                 "checkpoint with `python convert/sam2_to_flax.py --checkpoint FILE.pt --model-name NAME --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        meta["model_name"], meta["image_size"] = str(meta["model_name"]), int(meta["image_size"])
    except (ValueError, KeyError, TypeError) as e:
        ap.error(f"argument --model: {meta_path}: unreadable ({type(e).__name__}: {e}); convert the checkpoint again")
    return meta


def _load_input(ap: argparse.ArgumentParser, path: str):
    from ..data import io
    from ..data.errors import DataError

    p = Path(path)
    if p.is_dir():
        ap.error(f"argument INPUT: {path} is a folder; expected a 3D NIfTI file (.nii or .nii.gz) (folders of 2D "
                 "images with --template are not implemented in this command)")
    if not p.is_file():
        ap.error(f"argument INPUT: {path}: no such file; expected a 3D NIfTI file (.nii or .nii.gz)")
    if not _nifti_name(p.name):
        ap.error(f"argument INPUT: {path}: not a NIfTI file name; expected a 3D NIfTI file (.nii or .nii.gz)")
    try:
        vol = io.load_volume(p)
        src = io._read_nifti(p)
    except DataError as e:
        ap.error(f"argument INPUT: {e}")
    return vol, src


def _in_range(ap: argparse.ArgumentParser, arg: str, values: Sequence[float], shape: tuple[int, ...]) -> None:
    names = "XYZ"
    for v, n, name in zip(values, shape, names):
        if not 0 <= v <= n - 1:
            ranges = ", ".join(f"{names[i]} in [0, {shape[i] - 1}]" for i in range(len(values)))
            ap.error(f"argument {arg}: {name} = {v:g} is outside the volume; valid voxel indices are {ranges} "
                     f"(the input has shape {tuple(shape)})")


def _check_prompt_ranges(ap: argparse.ArgumentParser, a: argparse.Namespace, shape: tuple[int, int, int]) -> None:
    nx, ny, nz = shape
    if not 0 <= a.slice <= nz - 1:
        ap.error(f"argument --slice: {a.slice} is out of range; valid slices are 0..{nz - 1} (the file's third "
                 f"axis has {nz} voxels)")
    if a.box is not None:
        x0, y0, x1, y1 = a.box
        _in_range(ap, "--box", (x0, y0), shape[:2])
        _in_range(ap, "--box", (x1, y1), shape[:2])
        if x1 < x0 or y1 < y0:
            ap.error(f"argument --box: X0 Y0 X1 Y1 = {a.box} needs X0 <= X1 and Y0 <= Y1")
    for arg, pts in (("--point", a.point), ("--negative-point", a.negative_point)):
        for xy in pts:
            _in_range(ap, arg, xy, shape[:2])


def _load_mask_prompt(ap: argparse.ArgumentParser, path: str, shape: tuple[int, int, int], z: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        ap.error(f"argument --mask-prompt: {path}: no such file")
    try:
        if p.name.lower().endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
        elif _nifti_name(p.name):
            import nibabel as nib

            arr = np.asanyarray(nib.load(str(p)).dataobj)
        else:
            ap.error(f"argument --mask-prompt: {path}: expected a .nii, .nii.gz or .npy file")
    except (OSError, ValueError, EOFError) as e:
        ap.error(f"argument --mask-prompt: {path}: cannot be read ({type(e).__name__}: {e})")
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[-1] == 1 and arr.shape != shape:
        arr = arr[..., 0]
    if arr.shape == tuple(shape):
        arr = arr[:, :, z]
    elif arr.shape != tuple(shape[:2]):
        ap.error(f"argument --mask-prompt: {path} has shape {arr.shape}; expected the slice's in-plane shape "
                 f"{tuple(shape[:2])} (X, Y) or the input's shape {tuple(shape)}")
    if arr.dtype.kind not in "biuf" or not np.all(np.isfinite(arr)):
        ap.error(f"argument --mask-prompt: {path}: expected finite numbers (0 = background, > 0 = the structure)")
    m = arr > 0
    if not m.any():
        ap.error(f"argument --mask-prompt: {path}: the mask is empty on slice {z}")
    return m


# ---------------------------------------------------------------------------------------------- prompts
def map_prompt(ap: argparse.ArgumentParser | None, a: argparse.Namespace, grid: Any, mask: np.ndarray | None):
    """The command's prompt (file voxels) -> a :class:`~medsam2_jax.data.coords.FramePrompt`; errors name the
    argument when a prompt falls in the border that preprocessing cropped away."""
    from ..data import coords

    def fail(msg: str):
        if ap is None:
            raise ValueError(msg)
        ap.error(msg)

    kept = coords.kept_voxel_range(grid)
    keep_txt = ", ".join(f"{k.upper()} in [{v[0]}, {v[1]}]" for k, v in kept.items())
    z = a.slice
    if not kept["z"][0] <= z <= kept["z"][1]:
        fail(f"argument --slice: slice {z} is all zero (cropped away with the empty border); the non-zero region "
             f"is {keep_txt}")
    s = grid.size
    if mask is not None:
        k, m = coords.file_mask_to_frame(grid, mask, z)
        if not m.any():
            fail(f"argument --mask-prompt: the mask lies outside the non-zero region {keep_txt}, or is too small "
                 f"to survive the resize to {s} x {s}")
        return coords.FramePrompt(k, mask=m)
    pts, labs = [], []
    for arg, items, lab in (("--point", a.point, 1), ("--negative-point", a.negative_point, 0)):
        for x, y in items:
            k, xy = coords.file_point_to_frame(grid, x, y, z)
            if not np.all((xy >= -0.5) & (xy <= s - 0.5)):
                fail(f"argument {arg}: ({x:g}, {y:g}) lies in the all-zero border that preprocessing crops away; "
                     f"the non-zero region is {keep_txt}")
            pts.append(xy)
            labs.append(lab)
    box = None
    k = None
    if a.box is not None:
        k, box = coords.file_box_to_frame(grid, a.box, z)
        if box[2] < 0 or box[3] < 0 or box[0] > s - 1 or box[1] > s - 1:
            fail(f"argument --box: {a.box} lies in the all-zero border that preprocessing crops away; the non-zero "
                 f"region is {keep_txt}")
        box = np.clip(box, 0, s - 1).astype(np.float32)
    if k is None:
        k = coords.file_point_to_frame(grid, 0, 0, z)[0]
    return coords.FramePrompt(k, points=np.asarray(pts, np.float32).reshape(-1, 2) if pts else None,
                              labels=np.asarray(labs, np.int32) if labs else None, box=box)


def _prompt_txt(box: Any, points: Any) -> str:
    out = ""
    if box is not None:
        out += f", box {np.round(np.asarray(box, np.float64), 1).tolist()} px"
    if points is not None:
        out += f", clicks {np.round(np.asarray(points, np.float64), 1).tolist()} px"
    return out


# ---------------------------------------------------------------------------------------------- outputs
def write_like(path: Path, data_file_grid: np.ndarray, src: Any, dtype: Any) -> Path:
    """Write ``data`` (on the file's voxel grid) with ``src``'s header: its shape, affine and qform/sform (codes
    included, 0 stays 0). Written to a temporary file in the same folder, then renamed."""
    import nibabel as nib

    path = Path(path)
    data = np.asarray(data_file_grid).astype(dtype).reshape(src.shape)
    hdr = src.header.copy()
    img = type(src)(data, src.affine, header=hdr)
    img.set_data_dtype(dtype)
    img.set_qform(src.header.get_qform(), code=int(src.header["qform_code"]))
    img.set_sform(src.header.get_sform(), code=int(src.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    img.header["descrip"] = b"medsam2-jax segment"
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def overlay_slices(mask_file: np.ndarray, z: int, count: int) -> list[int]:
    """The prompted slice and up to ``count - 1`` others spread over the mask's extent along the third axis
    (around the prompt when the mask is empty)."""
    if count <= 0:
        return []
    nz = mask_file.shape[2]
    per = np.flatnonzero(mask_file.reshape(-1, nz).any(axis=0))
    lo, hi = (int(per[0]), int(per[-1])) if per.size else (max(0, z - 2 * count), min(nz - 1, z + 2 * count))
    out = [z]
    for c in np.linspace(lo, hi, num=count).round().astype(int):
        if len(out) >= count:
            break
        if int(c) not in out:
            out.append(int(c))
    return sorted(out)


def write_overlays(out_dir: Path, image_file: np.ndarray, mask_file: np.ndarray, a: argparse.Namespace,
                   slices: Sequence[int], window: tuple[float, float] | None) -> list[Path]:
    """Overlay PNGs in the file's voxel view (columns = x, rows = y): the mask's outline, the prompt."""
    from .. import viz

    out = []
    vmin = vmax = None
    if window is not None:
        vmin, vmax = window[0] - window[1] / 2, window[0] + window[1] / 2
    pts = [*a.point, *a.negative_point]
    labs = [1] * len(a.point) + [0] * len(a.negative_point)
    out_dir.mkdir(parents=True, exist_ok=True)
    for z in slices:
        prompted = z == a.slice
        path = out_dir / f"slice_{z:03d}.png"
        tmp = out_dir / f".slice_{z:03d}.{os.getpid()}.partial.png"
        what = ""
        if prompted:
            what = " (prompted" + (": mask prompt" if a.mask_prompt else "") + ")"
        try:
            viz.save_overlay(tmp, image_file[:, :, z].T, pred=mask_file[:, :, z].T, pred_fill=False,
                             pred_label="mask", box=a.box if prompted else None,
                             points=pts if prompted and pts else None, point_labels=labs if prompted and pts else None,
                             vmin=vmin, vmax=vmax,
                             title=f"slice {z} of {image_file.shape[2]}{what}; x right, y down (voxels)")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- running
_RANDOM_MODELS: dict[tuple[str, int, int], Any] = {}


def _model(ap: argparse.ArgumentParser, a: argparse.Namespace, size: int):
    from .. import api

    if a.random_weights:
        key = (a.model_name, size, a.seed)
        if key not in _RANDOM_MODELS:
            try:
                _RANDOM_MODELS[key] = api.random_model(a.model_name, size, seed=a.seed)
            except (ValueError, KeyError) as e:
                ap.error(f"argument --model-name: {e}")
        return _RANDOM_MODELS[key]
    try:
        return api.load_model(a.model, image_size=size)
    except (api.CheckpointError, ValueError, KeyError) as e:
        ap.error(f"argument --model: {e}")


@contextlib.contextmanager
def instrumented(log: _Log):
    """Time (and report) every image-encoder call and every tracker run inside :mod:`medsam2_jax.volume`;
    yields a dict with ``encode`` / ``propagate`` seconds and call counts."""
    import jax

    from .. import volume

    times = {"encode": 0.0, "propagate": 0.0, "encode_calls": 0, "propagate_calls": 0, "frames_encoded": 0,
             "frames_tracked": 0}
    enc0, trk0 = volume.encode_frames, volume._track_blocks

    def timed(stage: str, counter: str, n: int, doing: str, done: str, call):
        log.say(f"  {doing} ...")
        t = time.perf_counter()
        out = call()
        dt = time.perf_counter() - t
        times[stage] += dt
        times[f"{stage}_calls"] += 1
        times[counter] += n
        log.say(f"  {done} in {dt:.1f} s")
        return out

    def enc(model, frames, *args, **kw):
        n = int(frames.shape[0])
        return timed("encode", "frames_encoded", n, f"encoding {n} frames ({model.image_size} px)",
                     f"encoded {n} frames", lambda: jax.block_until_ready(enc0(model, frames, *args, **kw)))

    def trk(model, feats, prompts, key, cfg):
        n = int(feats["fpn"][0].shape[0])
        return timed("propagate", "frames_tracked", n, f"tracking a sequence of {n} frames", f"tracked {n} frames",
                     lambda: trk0(model, feats, prompts, key, cfg))  # returns NumPy: finished

    volume.encode_frames, volume._track_blocks = enc, trk
    try:
        yield times
    finally:
        volume.encode_frames, volume._track_blocks = enc0, trk0


def explicit_modality(ap: argparse.ArgumentParser, value: str) -> str:
    """The canonical modality named by ``--modality`` (not ``auto``), or a usage error (exit 2) saying what it
    accepts."""
    from ..data import io
    from ..data.errors import DataError

    try:
        return io.canonical_modality(value, "--modality")
    except DataError as e:
        ap.error(f"argument --modality: {e.problem}; expected CT, MR, auto or {e.expected}")


def _load_2d(ap: argparse.ArgumentParser, arg: str, path: Path, loader) -> np.ndarray:
    from ..data.errors import DataError

    try:
        return loader(path)
    except DataError as e:
        ap.error(f"argument {arg}: {e}")


def run_image_set(a: argparse.Namespace, ap: argparse.ArgumentParser, log: _Log, size: int, size_src: str,
                  t_start: float) -> dict[str, Any]:
    """The 2D one-prompt mode: every image of the folder ``a.input``, from one prompt on ``a.template``."""
    import jax

    from .. import oneprompt
    from ..data import coords, io, preprocess

    folder = Path(a.input)
    if not folder.is_dir():
        ap.error(f"argument INPUT: {a.input}: with --template, INPUT must be a folder of 2D images "
                 f"({', '.join(io.IMAGE_2D_SUFFIXES)})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(io.IMAGE_2D_SUFFIXES))
    if len(files) < 2:
        ap.error(f"argument INPUT: {a.input} holds {len(files)} image(s) ({', '.join(io.IMAGE_2D_SUFFIXES)}); the "
                 "one-prompt mode needs the template and at least one other image")
    tpath = Path(a.template)
    if not tpath.exists():
        tpath = folder / a.template
    names = [p.resolve() for p in files]
    if tpath.resolve() not in names:
        ap.error(f"argument --template: {a.template} is not one of the images of {a.input} "
                 f"({', '.join(p.name for p in files[:6])}{', ...' if len(files) > 6 else ''})")
    ti = names.index(tpath.resolve())
    images = [_load_2d(ap, "INPUT", p, io.load_image_2d) for p in files]
    h, w = images[ti].shape[:2]
    _check_prompt_ranges_2d(ap, a, (w, h))
    mask = None
    if a.mask_prompt is not None:
        mp = Path(a.mask_prompt)
        if not mp.is_file():
            ap.error(f"argument --mask-prompt: {a.mask_prompt}: no such file")
        mask = np.load(mp, allow_pickle=False) if mp.name.lower().endswith(".npy") else _load_2d(
            ap, "--mask-prompt", mp, io.load_mask_2d)
        if np.shape(mask) != (h, w):
            ap.error(f"argument --mask-prompt: {a.mask_prompt} has shape {np.shape(mask)}; expected the template's "
                     f"(rows, columns) = {(h, w)}")
        if not np.any(np.asarray(mask) > 0):
            ap.error(f"argument --mask-prompt: {a.mask_prompt}: the mask is empty")
    if a.modality.strip().lower() == "auto":
        modality, note = "X-ray", "auto: 2D images get the per-image 0.5/99.5 percentile clip and z-score"
    else:
        modality, note = explicit_modality(ap, a.modality), f"--modality {a.modality}"
    out_dir = Path(a.out) if a.out else Path.cwd() / f"{folder.resolve().name}_masks"
    log.say(f"{len(files)} images in {a.input}, template {files[ti].name} ({w} x {h} px); modality {modality} ({note})")

    t = time.perf_counter()
    model = _model(ap, a, size)
    t_model = time.perf_counter() - t
    t = time.perf_counter()
    pres = []
    for p, img in zip(files, images):
        try:
            pres.append(preprocess.preprocess_image_2d(img, None, modality, size, window=a.window, source=p))
        except ValueError as e:
            ap.error(f"argument INPUT: {e}")
    g = pres[ti].grid
    if mask is not None:
        fm = coords.image_mask_to_frame(g, mask)
        if not fm.any():
            ap.error("argument --mask-prompt: the mask lies in the all-zero border that preprocessing crops away")
        prompt: dict[str, Any] = {"mask": fm}
    else:
        prompt = {}
        if a.box is not None:
            prompt["box"] = np.clip(coords.image_box_to_frame(g, a.box), 0, size - 1)
        pts = [coords.image_point_to_frame(g, x, y) for x, y in [*a.point, *a.negative_point]]
        if pts:
            prompt["points"] = np.clip(np.asarray(pts, np.float32), 0, size - 1)
            prompt["labels"] = np.asarray([1] * len(a.point) + [0] * len(a.negative_point), np.int32)
    t_pre = time.perf_counter() - t
    log.say(f"preprocessed to {len(files)} frames of {size} x {size} px (image size {size}: {size_src})"
            + _prompt_txt(prompt.get("box"), prompt.get("points")))
    log.say("segmenting the image set from the template (one pass of the tracker, images by decreasing "
            "similarity to the template; the first run compiles)")
    t = time.perf_counter()
    res = oneprompt.segment_image_set(model, np.stack([p.image[0] for p in pres]), ti, prompt,
                                      key=jax.random.key(a.seed))
    t_seg = time.perf_counter() - t

    t = time.perf_counter()
    from PIL import Image

    from .. import viz

    out_dir.mkdir(parents=True, exist_ok=True)
    written, pngs, areas = [], [], []
    order = list(res.order)  # template first, then by similarity
    for i, (p, pre) in enumerate(zip(files, pres)):
        m = preprocess.to_original_grid((res.probs[i] > a.threshold).astype(np.uint8)[None], pre.grid, "mask")
        path = out_dir / f"{Path(p).stem}_mask.png"
        tmp = out_dir / f".{path.name}.{os.getpid()}.partial.png"
        try:
            Image.fromarray((m > 0).astype(np.uint8) * 255).save(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        written.append(path)
        areas.append(int((m > 0).sum()))
        if order.index(i) < a.overlays:
            op = out_dir / "overlays" / f"{Path(p).stem}.png"
            tmp = op.with_name(f".{op.name}.{os.getpid()}.partial.png")
            try:
                op.parent.mkdir(parents=True, exist_ok=True)
                prompted = i == ti
                viz.save_overlay(tmp, images[i], pred=m, pred_fill=False, pred_label="mask",
                                 box=a.box if prompted else None,
                                 points=[*a.point, *a.negative_point] if prompted and (a.point or a.negative_point)
                                 else None,
                                 point_labels=[1] * len(a.point) + [0] * len(a.negative_point)
                                 if prompted and (a.point or a.negative_point) else None,
                                 title=f"{Path(p).name}" + (" (template)" if prompted else ""))
                os.replace(tmp, op)
            finally:
                if tmp.exists():
                    tmp.unlink()
            pngs.append(op)
    t_io = time.perf_counter() - t
    timings = {"preprocess_s": round(t_pre, 2), "model_s": round(t_model, 2), "segment_s": round(t_seg, 2),
               "write_s": round(t_io, 2), "total_s": round(time.perf_counter() - t_start, 2)}
    print(f"masks: {out_dir}/ ({len(written)} PNGs <name>_mask.png, 0/255 on each image's own grid; mask pixels "
          f"per image: min {min(areas)}, max {max(areas)})")
    if pngs:
        print(f"overlays: {out_dir / 'overlays'}/ ({len(pngs)} PNGs: the template and the images most like it)")
    print("timings (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in timings.items()))
    if a.random_weights:
        print(RANDOM_WEIGHTS_WARNING)
    return {"masks": [str(p) for p in written], "overlays": [str(p) for p in pngs], "order": order,
            "image_size": size, "modality": modality, "timings": timings}


def _check_prompt_ranges_2d(ap: argparse.ArgumentParser, a: argparse.Namespace, wh: tuple[int, int]) -> None:
    w, h = wh

    def check(arg: str, x: float, y: float) -> None:
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            ap.error(f"argument {arg}: ({x:g}, {y:g}) is outside the template; valid pixels are X (column) in "
                     f"[0, {w - 1}], Y (row) in [0, {h - 1}]")

    if a.box is not None:
        check("--box", a.box[0], a.box[1])
        check("--box", a.box[2], a.box[3])
        if a.box[2] < a.box[0] or a.box[3] < a.box[1]:
            ap.error(f"argument --box: X0 Y0 X1 Y1 = {a.box} needs X0 <= X1 and Y0 <= Y1")
    for arg, pts in (("--point", a.point), ("--negative-point", a.negative_point)):
        for x, y in pts:
            check(arg, x, y)


def run(a: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """Run the command for parsed arguments; returns a summary (paths, sizes, timings)."""
    t_start = time.perf_counter()
    _check_args(ap, a)
    log = _Log(a.quiet)
    meta = _read_model_meta(ap, a.model) if a.model else None
    if a.image_size is not None:
        size, size_src = a.image_size, "--image-size"
    elif meta is not None:
        size, size_src = meta["image_size"], f"the model's own size ({a.model}/medsam2.json)"
        if size < 32 or size % 32:
            ap.error(f"argument --model: {a.model}/medsam2.json gives image_size {size}, not a positive multiple "
                     "of 32; pass --image-size")
    else:
        size, size_src = DEFAULT_RANDOM_SIZE, "the default for --random-weights"


    if a.template is not None:
        return run_image_set(a, ap, log, size, size_src, t_start)

    # Input and prompt checks: everything that can be wrong is found before the model is built.
    t = time.perf_counter()
    vol, src = _load_input(ap, a.input)
    shape = tuple(int(v) for v in vol.original_shape)
    _check_prompt_ranges(ap, a, shape)
    mask_prompt = _load_mask_prompt(ap, a.mask_prompt, shape, a.slice) if a.mask_prompt else None
    out = Path(a.out) if a.out else Path.cwd() / f"{_strip_nifti(Path(a.input).name)}_mask.nii.gz"
    over_dir = Path(a.overlay_dir) if a.overlay_dir else out.with_name(_strip_nifti(out.name) + "_overlays")
    from ..data import coords, preprocess
    from ..data.errors import DataError

    if a.modality.strip().lower() == "auto":
        modality, why = guess_modality(vol.data)
        mod_note = f"{modality} (--modality auto: {why})"
    else:
        modality = explicit_modality(ap, a.modality)
        mod_note = f"{modality} (--modality {a.modality})"
    log.say(f"input {a.input}: shape {shape}, voxel size {np.round(vol.spacing, 3).tolist()} mm, orientation "
            f"{''.join(vol.orientation)}, qform/sform codes {vol.qform_code}/{vol.sform_code}")
    log.say(f"modality: {mod_note}")
    t_read = time.perf_counter() - t

    # Model.
    t = time.perf_counter()
    compile_cache.enable(a.compile_cache)
    if a.random_weights:
        log.say(f"model: RANDOM weights ({a.model_name}, seed {a.seed}) -- the mask will be meaningless")
    else:
        log.say(f"model: loading {a.model} ({meta['model_name']})")
    model = _model(ap, a, size)
    t_model = time.perf_counter() - t

    t = time.perf_counter()
    try:
        pre = preprocess.preprocess_case(vol, None, modality, size, window=a.window,
                                         slice_axis=coords.prompt_slice_axis(vol))
    except DataError as e:
        ap.error(f"argument INPUT: {e}")
    if modality == "CT":
        lvl, wid = preprocess.resolve_window(a.window)
        log.say(f"CT normalisation: window {a.window} (level {lvl:g}, width {wid:g} HU: {lvl - wid / 2:g}.."
                f"{lvl + wid / 2:g}), z-score with mean {pre.norm.mean:g}, std {pre.norm.std:g} (no dataset "
                "statistics given)")
    prompt = map_prompt(ap, a, pre.grid, mask_prompt)
    t_pre = time.perf_counter() - t
    log.say(f"preprocessed to {pre.image.shape[0]} slices of {size} x {size} px (image size {size}: {size_src}); "
            f"prompt on slice {a.slice} = preprocessed slice {prompt.slice}"
            + _prompt_txt(prompt.box, prompt.points))

    # Segmentation.
    import jax

    from .. import volume

    cfg = volume_config(a)
    log.say(f"segmenting with {len(cfg.orientations)} orientation(s) ({', '.join(cfg.orientations)}), bank "
            f"{cfg.tracker.bank.policy}, scope {cfg.scope}, coronal/sagittal sections "
            f"{'one per voxel' if cfg.max_frames is None else f'at most {cfg.max_frames}'}, axial pair "
            f"{'tracked again in the combined pass' if not cfg.reuse_axial else 'reused from the first stage'}; "
            "a first run at a new image size or sequence length compiles first (tens of seconds on a CPU; cached after)")
    t = time.perf_counter()
    with instrumented(log) as tm:
        res = volume.segment_volume_detailed(model, pre, prompt.as_volume_prompt(), cfg, key=jax.random.key(a.seed))
    t_seg = time.perf_counter() - t
    t_agg = t_seg - tm["encode"] - tm["propagate"]

    # Back to the file and outputs.
    t = time.perf_counter()
    mask_stack = (res.probs > a.threshold).astype(np.uint8)
    mask_file = vol.to_file_orientation(preprocess.to_original_grid(mask_stack, pre.grid, "mask"))
    write_like(out, mask_file, src, np.uint8)
    written = {"mask": str(out)}
    if a.probabilities:
        prob_file = vol.to_file_orientation(preprocess.to_original_grid(res.probs.astype(np.float32), pre.grid, "prob"))
        written["probabilities"] = str(write_like(Path(a.probabilities), prob_file, src, np.float32))
    image_file = vol.to_file_orientation(vol.data)
    zs = overlay_slices(mask_file, a.slice, a.overlays)
    pngs = write_overlays(over_dir, image_file, mask_file, a, zs,
                          preprocess.resolve_window(a.window) if modality == "CT" else None) if zs else []
    t_io = time.perf_counter() - t + t_read

    voxels = int(mask_file.sum())
    ml = voxels * float(np.prod(vol.spacing)) / 1000.0
    per = np.flatnonzero(mask_file.reshape(-1, shape[2]).any(axis=0))
    timings = {"read_s": round(t_read, 2), "preprocess_s": round(t_pre, 2), "model_s": round(t_model, 2),
               "encode_s": round(tm["encode"], 2), "propagate_s": round(tm["propagate"], 2),
               "aggregate_s": round(t_agg, 2), "write_s": round(t_io - t_read, 2),
               "total_s": round(time.perf_counter() - t_start, 2)}
    summary = {"mask": str(out), "files": written, "overlays": [str(p) for p in pngs], "voxels": voxels,
               "volume_ml": ml, "slices_with_mask": [int(per[0]), int(per[-1])] if per.size else None,
               "image_size": size, "modality": modality, "orientations": list(cfg.orientations),
               "max_frames": cfg.max_frames, "reuse_axial": cfg.reuse_axial,
               "timings": timings, "frames_encoded": tm["frames_encoded"], "frames_tracked": tm["frames_tracked"]}
    print(f"mask: {out} (uint8, shape {shape}, the input's affine and qform/sform codes {vol.qform_code}/"
          f"{vol.sform_code}): {voxels} voxels = {ml:.2f} mL"
          + (f", on slices {per[0]}..{per[-1]} of the third axis" if per.size else " (EMPTY: nothing found)"))
    if a.probabilities:
        print(f"probabilities: {written['probabilities']} (float32)")
    if pngs:
        print(f"overlays: {over_dir}/ ({', '.join(p.name for p in pngs)}; mask outline red, prompt on slice {a.slice})")
    print("timings (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in timings.items())
          + f"; {tm['frames_encoded']} frames encoded, {tm['frames_tracked']} tracked")
    if a.random_weights:
        print(RANDOM_WEIGHTS_WARNING)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before JAX starts (see medsam2_jax.host_memory)
    ap = build_parser()
    args = ap.parse_args(argv)
    run(args, ap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
