"""The ``medsam2-segment`` command (medsam2_jax.apps.segment) and the file-voxel -> frame mapping (data.coords).

A random model gives meaningless masks, so the end-to-end run checks pipeline properties only: the output
NIfTI has the input's shape, affine and qform/sform codes, it is a 0/1 label volume, the PNGs exist. The
mapping is checked with known geometry: a box / click / mask around a phantom structure in file voxels lands
on the same structure in the preprocessed frames, for files stored in flipped and permuted orientations.
Every kind of bad input exits with status 2, names its argument, and leaves no file behind.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medsam2_jax import volume
from medsam2_jax.apps import segment
from medsam2_jax.data import coords
from medsam2_jax.data.io import Volume
from medsam2_jax.data.phantoms import make_phantom
from medsam2_jax.data.preprocess import preprocess_case

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 24)
Z = 12


def _save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg_in")
    image, labels, affine = make_phantom(0, "ct", shape=SHAPE, spacing=(0.8, 0.8, 2.5))  # stored LAS
    path = _save(d / "ct.nii.gz", np.round(image).astype(np.int16), affine, qcode=1, scode=2)
    m = labels[:, :, Z] == 1
    xs, ys = np.nonzero(m)
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    return {"dir": d, "path": path, "labels": labels, "affine": affine, "box": box, "mask": m,
            "image": image}


@pytest.fixture(scope="module")
def run_box(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_out")
    x, y = np.argwhere(ndimage.distance_transform_edt(phantom["mask"]) >= 2)[0]
    argv = [str(phantom["path"]), "--random-weights", "--image-size", "256", "--slice", str(Z),
            "--box", *map(str, phantom["box"]), "--point", str(x), str(y), "--negative-point", "2", "2",
            "--orientations", "2", "--out", str(out / "mask.nii.gz"), "--probabilities", str(out / "prob.nii.gz"),
            "--overlays", "3", "--quiet"]
    assert segment.main(argv) == 0
    return out


# ---------------------------------------------------------------------------------------------- end to end
def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "medsam2_jax.apps.segment", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("VOXEL", "--random-weights", "--mask-prompt", "--orientations", "level 40 / width 400", "status 2"):
        assert word in r.stdout, word


def test_console_script_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["medsam2-segment"] == "medsam2_jax.apps.segment:main"
    script = Path(sys.executable).parent / "medsam2-segment"
    if script.exists():  # installed (pip install -e . after the entry point was added)
        r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage: medsam2-segment" in r.stdout


def test_output_has_the_input_grid_header_and_is_a_label_volume(run_box, phantom):
    src = nib.load(str(phantom["path"]))
    out = nib.load(str(run_box / "mask.nii.gz"))
    assert out.shape == src.shape == SHAPE
    np.testing.assert_array_equal(out.affine, src.affine)
    np.testing.assert_array_equal(out.header.get_qform(), src.header.get_qform())
    np.testing.assert_array_equal(out.header.get_sform(), src.header.get_sform())
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    data = np.asarray(out.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data).tolist()) <= {0, 1}
    prob = np.asarray(nib.load(str(run_box / "prob.nii.gz")).dataobj)
    assert prob.shape == SHAPE and prob.dtype == np.float32 and 0.0 <= prob.min() <= prob.max() <= 1.0
    pngs = sorted((run_box / "mask_overlays").glob("*.png"))
    assert len(pngs) == 3 and (run_box / "mask_overlays" / f"slice_{Z:03d}.png") in pngs
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert not [p for p in run_box.rglob("*partial*")]


def test_mask_prompt_with_zero_codes_keeps_them(phantom, tmp_path, capsys):
    """A file whose qform and sform codes are both 0 keeps them; a 2D mask prompt (.npy) runs."""
    src = nib.load(str(phantom["path"]))
    p0 = _save(tmp_path / "codes0.nii", np.asarray(src.dataobj), src.affine, qcode=0, scode=0)
    np.save(tmp_path / "m.npy", phantom["mask"].astype(np.uint8))
    argv = [str(p0), "--random-weights", "--slice", str(Z), "--mask-prompt", str(tmp_path / "m.npy"),
            "--orientations", "axial,axial_rev", "--out", str(tmp_path / "o" / "m.nii"), "--overlays", "0",
            "--modality", "CT"]
    assert segment.main(argv) == 0
    text = capsys.readouterr().out
    assert "image size 256: the default for --random-weights" in text and f"mask: {tmp_path / 'o' / 'm.nii'}" in text
    # The timings line that benchmarks/segment_command.py reads from the command.
    from benchmarks.segment_command import parse_output

    t = parse_output(text)
    stages = t["stages_s"]
    assert {"read", "preprocess", "encode", "propagate", "aggregate", "write", "total"} <= set(stages)
    assert 0 < stages["encode"] < stages["total"] and 0 < stages["propagate"] < stages["total"]
    assert t["frames_encoded"] >= 1 and t["tracker_steps"] >= t["frames_encoded"] - 1
    out = nib.load(str(tmp_path / "o" / "m.nii"))
    ref = nib.load(str(p0))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 0)
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.shape == SHAPE
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["m.nii"]


# ---------------------------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("orientation", ["RAS", "LAS", "PSL", "ILA"])
def test_file_voxel_prompts_land_on_the_same_structure(orientation):
    image, labels, affine = make_phantom(3, "ct", shape=(40, 48, 20), spacing=(0.9, 0.8, 2.0),
                                         orientation=orientation)
    vol = Volume.from_array(image, affine)
    assert "".join(vol.orientation) == orientation
    pre = preprocess_case(vol, vol.to_canonical(labels), "CT", 64, slice_axis=coords.prompt_slice_axis(vol))
    z = int(np.argmax((labels == 1).sum(axis=(0, 1))))  # the file slice (third axis) with most of label 1
    m = labels[:, :, z] == 1
    xs, ys = np.nonzero(m)
    k, box = coords.file_box_to_frame(pre.grid, [xs.min(), ys.min(), xs.max(), ys.max()], z)
    fm = pre.labels[k] == 1
    rr, cc = np.nonzero(fm)
    np.testing.assert_allclose(box, [cc.min(), rr.min(), cc.max(), rr.max()], atol=1.0)
    # A click deep inside the structure lands inside it.
    x, y = np.argwhere(ndimage.distance_transform_edt(m) == ndimage.distance_transform_edt(m).max())[0]
    k2, xy = coords.file_point_to_frame(pre.grid, x, y, z)
    assert k2 == k and pre.labels[k, int(round(xy[1])), int(round(xy[0]))] == 1
    # The slice's mask maps onto the frame's label mask.
    k3, mf = coords.file_mask_to_frame(pre.grid, m, z)
    inter, union = np.logical_and(mf > 0, fm).sum(), np.logical_or(mf > 0, fm).sum()
    assert k3 == k and inter / union > 0.9
    # The stack slice is file slice z: the frames' label is the file slice's, resampled.
    assert pre.labels[k].astype(bool).sum() > 0 and np.isin(np.unique(pre.labels[k]), np.unique(labels[:, :, z])).all()


def test_kept_range_is_the_nonzero_box():
    image, _, affine = make_phantom(1, "mri", shape=(40, 44, 16), orientation="PSL")  # exact zeros outside the body
    vol = Volume.from_array(image, affine)
    pre = preprocess_case(vol, None, "MRI", 64, slice_axis=coords.prompt_slice_axis(vol))
    kept = coords.kept_voxel_range(pre.grid)
    nz = np.nonzero(image)
    for i, name in enumerate("xyz"):
        assert kept[name] == (int(nz[i].min()), int(nz[i].max())), name


# ---------------------------------------------------------------------------------------------- unlabelled CT
def test_unlabelled_ct_preprocess_and_modality_guess():
    image, _, affine = make_phantom(2, "ct", shape=(32, 32, 12))
    pre = preprocess_case(Volume.from_array(image, affine), None, "CT", 64)
    assert pre.norm.window == (40.0, 400.0) and (pre.norm.mean, pre.norm.std) == (40.0, 100.0)
    assert (pre.norm.low, pre.norm.high) == (-160.0, 240.0)
    assert np.isfinite(pre.image).all() and -2.5 < pre.image.min() and pre.image.max() < 2.5
    assert segment.guess_modality(image)[0] == "CT"
    mri, _, _ = make_phantom(2, "mri", shape=(32, 32, 12))
    assert segment.guess_modality(mri)[0] == "MRI"


def test_default_is_the_fast_path_and_the_full_path_is_one_flag_away():
    """The command's default: six orientations, at most 32 coronal/sagittal sections, the stage-1 axial pair
    reused (tests/test_volume.py checks that this encodes each axis once and tracks the axial pair once);
    ``--frames all --rerun-axial`` is the library's paper-literal default."""
    base = ["x.nii.gz", "--random-weights", "--slice", "0", *BOX]
    cfg = segment.volume_config(segment.build_parser().parse_args(base))
    assert cfg.orientations == volume.ORIENTATIONS and cfg.frames is None
    assert cfg.max_frames == segment.DEFAULT_FRAMES == 32 and cfg.reuse_axial and cfg.scope == "shared"
    full = segment.volume_config(segment.build_parser().parse_args(base + ["--frames", "all", "--rerun-axial"]))
    assert full == volume.VolumeConfig()
    assert segment.volume_config(segment.build_parser().parse_args(base + ["--frames", "8"])).max_frames == 8


def test_parse_orientations():
    assert segment.parse_orientations("6") == segment.parse_orientations("all") == (
        "axial", "coronal", "sagittal", "axial_rev", "coronal_rev", "sagittal_rev")
    assert segment.parse_orientations("2") == ("axial", "axial_rev")
    assert segment.parse_orientations("sagittal, axial") == ("axial", "sagittal")
    for bad in ("0", "7", "axial,axial", "up"):
        with pytest.raises(ValueError):
            segment.parse_orientations(bad)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(phantom):
    d = phantom["dir"]
    src = nib.load(str(phantom["path"]))
    data = np.asarray(src.dataobj).astype(np.float32)
    four = _save(d / "four_d.nii.gz", np.stack([data, data], axis=-1), src.affine)
    nan = data.copy()
    nan[3, 4, 5] = np.nan
    nanp = _save(d / "nan.nii.gz", nan, src.affine)
    txt = d / "scan.txt"
    txt.write_text("not a scan")
    np.save(d / "small_mask.npy", np.ones((10, 10), np.uint8))
    np.save(d / "empty_mask.npy", np.zeros(SHAPE[:2], np.uint8))
    badmodel = d / "bad_model"
    (badmodel / "params").mkdir(parents=True)
    (badmodel / "medsam2.json").write_text('{"format_version": 1, "model_name": "sam2.1_hiera_s", '
                                           '"image_size": 256}')
    zero = data.copy()
    zero[:, :, -3:] = 0  # MR-like: all-zero slices at the end are cropped away
    zero[zero < 0] = 0
    zerop = _save(d / "zero_end.nii.gz", zero, src.affine)
    return {"four": four, "nan": nanp, "txt": txt, "small": d / "small_mask.npy", "empty": d / "empty_mask.npy",
            "badmodel": badmodel, "zero": zerop}


BOX = ["--box", "27", "17", "49", "35"]
BAD = {
    "slice_out_of_range": (["--slice", "24", *BOX], "--slice", "0..23"),
    "negative_slice": (["--slice", "-1", *BOX], "--slice", "0..23"),
    "point_outside": (["--slice", "5", "--point", "64", "10"], "--point", "X in [0, 63]"),
    "box_outside": (["--slice", "5", "--box", "-1", "0", "10", "10"], "--box", "[0, 63]"),
    "box_reversed": (["--slice", "5", "--box", "20", "0", "10", "10"], "--box", "X0 <= X1"),
    "negative_point_outside": (["--slice", "5", "--point", "3", "3", "--negative-point", "3", "70"],
                               "--negative-point", "Y in [0, 63]"),
    "negative_point_alone": (["--slice", "5", "--negative-point", "3", "3"], "--negative-point", "positive"),
    "mask_wrong_shape": (["--slice", "5", "--mask-prompt", "{small}"], "--mask-prompt", "(64, 64)"),
    "mask_empty": (["--slice", "5", "--mask-prompt", "{empty}"], "--mask-prompt", "empty"),
    "mask_missing": (["--slice", "5", "--mask-prompt", "{dir}/nope.npy"], "--mask-prompt", "no such file"),
    "no_prompt": (["--slice", "5"], "--box", "give a prompt"),
    "no_slice": (BOX, "--slice", "required"),
    "four_d": (["--slice", "5", *BOX], "INPUT", "4D"),
    "not_nifti": (["--slice", "5", *BOX], "INPUT", ".nii"),
    "missing_input": (["--slice", "5", *BOX], "INPUT", "no such file"),
    "nan_voxels": (["--slice", "5", *BOX], "INPUT", "NaN"),
    "missing_model": (["--slice", "5", *BOX], "--model", "no such model directory"),
    "bad_checkpoint": (["--slice", "5", *BOX], "--model", "cannot be restored"),
    "both_weights": (["--slice", "5", *BOX, "--model", "{dir}"], "--model", "exactly one"),
    "image_size": (["--slice", "5", *BOX, "--image-size", "100"], "--image-size", "multiple of 32"),
    "orientations": (["--slice", "5", *BOX, "--orientations", "7"], "--orientations", "1-6"),
    "frames_zero": (["--slice", "5", *BOX, "--frames", "0"], "--frames", ">= 1 (or 'all')"),
    "frames_word": (["--slice", "5", *BOX, "--frames", "many"], "--frames", "a count >= 1 or 'all'"),
    "out_suffix": (["--slice", "5", *BOX, "--out", "{out}/mask.png"], "--out", ".nii"),
    "modality": (["--slice", "5", *BOX, "--modality", "sonar"], "--modality", "CT, MR"),
    "cropped_slice": (["--slice", "22", *BOX, "--modality", "MR"], "--slice", "all zero"),
    "template_with_file": (["--slice", "5", *BOX, "--template", "x.png"], "--slice", "not used with --template"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_the_argument(case, phantom, bad_files, tmp_path, capsys):
    extra, arg, text = BAD[case]
    out = tmp_path / "out"
    fmt = {"small": bad_files["small"], "empty": bad_files["empty"], "dir": phantom["dir"], "out": out}
    extra = [e.format(**fmt) for e in extra]
    inp = {"four_d": bad_files["four"], "not_nifti": bad_files["txt"], "nan_voxels": bad_files["nan"],
           "missing_input": phantom["dir"] / "missing.nii.gz", "cropped_slice": bad_files["zero"]}.get(
        case, phantom["path"])
    weights = {"missing_model": ["--model", str(phantom["dir"] / "no_model")],
               "bad_checkpoint": ["--model", str(bad_files["badmodel"])]}.get(case, ["--random-weights"])
    argv = [str(inp), *weights, *extra]
    if "--out" not in extra:
        argv += ["--out", str(out / "mask.nii.gz")]
    with pytest.raises(SystemExit) as e:
        segment.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {arg}" in err and text in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 2D one-prompt
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:60, :72]
    for i in range(4):
        cx, cy = 30 + 3 * i, 28 - 2 * i
        img = 40 + 10 * rng.standard_normal((60, 72))
        img[((xx - cx) / 14.0) ** 2 + ((yy - cy) / 10.0) ** 2 <= 1] += 120
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i}.png")
    return d


def test_one_prompt_folder_of_images(image_folder, tmp_path, capsys):
    out = tmp_path / "masks"
    argv = [str(image_folder), "--template", "img_1.png", "--random-weights", "--box", "19", "16", "47", "36",
            "--point", "33", "26", "--out", str(out), "--overlays", "2"]
    assert segment.main(argv) == 0
    assert "masks: " in capsys.readouterr().out
    from PIL import Image

    for i in range(4):
        m = np.asarray(Image.open(out / f"img_{i}_mask.png"))
        assert m.shape == (60, 72) and set(np.unique(m).tolist()) <= {0, 255}
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 and "img_1.png" in overlays  # the template and the image most like it
    assert not [p for p in out.rglob("*partial*")]


@pytest.mark.parametrize("extra, arg, text", [
    (["--template", "nope.png", "--box", "1", "1", "5", "5"], "--template", "not one of the images"),
    (["--template", "img_0.png", "--point", "72", "5"], "--point", "X (column) in [0, 71]"),
    (["--template", "img_0.png", "--box", "1", "1", "5", "5", "--slice", "3"], "--slice", "not used"),
    (["--template", "img_0.png", "--box", "1", "1", "5", "5", "--out", "x.nii.gz"], "--out", "folder"),
])
def test_one_prompt_bad_input(image_folder, tmp_path, capsys, extra, arg, text):
    argv = [str(image_folder), "--random-weights", *extra]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        segment.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {arg}" in err and text in err, err
    assert not (tmp_path / "o").exists()


def test_mask_prompt_volume_gives_its_slice(phantom, tmp_path):
    vol = np.zeros(SHAPE, np.uint8)
    vol[:, :, Z] = phantom["mask"]
    vol[:, :, Z + 1] = 1  # another slice: ignored
    p = _save(tmp_path / "mask3d.nii.gz", vol, phantom["affine"])
    got = segment._load_mask_prompt(segment.build_parser(), str(p), SHAPE, Z)
    assert np.array_equal(got, phantom["mask"])
