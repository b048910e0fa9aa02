"""medsam2_jax.data.phantoms: seedable, fast, exact labels, the structures the brief asks for, and a
dataset on disk that the real loader reads."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax.data.io import Volume, load_case, read_dataset
from medsam2_jax.data.phantoms import PHANTOM_LABELS, make_phantom, write_phantom_dataset


@pytest.fixture(scope="module")
def ct0():
    return make_phantom(0, "ct")


@pytest.fixture(scope="module")
def mri0():
    return make_phantom(0, "mri")


def _canonical(image, labels, affine):
    vol = Volume.from_array(image, affine)
    return vol, vol.to_canonical(labels)


def test_seeded_and_fast(ct0):
    image, labels, affine = ct0
    assert image.shape == (96, 96, 48) and image.dtype == np.float32 and labels.dtype == np.uint8
    again = make_phantom(0, "ct")
    assert all(np.array_equal(a, b) for a, b in zip(ct0, again))
    other = make_phantom(1, "ct")
    assert not np.array_equal(other[1], labels)
    best = min(_timed(lambda: make_phantom(2, kind)) for kind in ("ct", "mri") for _ in range(2))
    assert best < 1.0, f"a (96, 96, 48) phantom took {best:.2f} s"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_structures_and_intensities(ct0):
    vol, labels = _canonical(*ct0)
    counts = np.bincount(labels.ravel(), minlength=6)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5} and all(counts[1:] > 300), counts
    assert counts[1] == max(counts[1:])  # label 1 is the large organ
    # HU-like: air outside the body, organs at their own levels (noise sigma 12 HU, blur at the borders).
    assert np.median(vol.data[0:3, 0:3, :]) == pytest.approx(-1000, abs=10)
    for k, hu in [(1, 60), (2, 130), (3, 30), (4, 180)]:
        assert np.median(vol.data[labels == k]) == pytest.approx(hu, abs=40), k
    # The tube is thin: its border is blurred into the tissue around it, its core is at 250 HU.
    assert np.percentile(vol.data[labels == 5], 90) == pytest.approx(250, abs=40)
    # Anisotropic spacing is in the affine; the file orientation is LAS.
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.5), rtol=1e-6)
    assert vol.orientation == ("L", "A", "S")


def test_tube_bends_and_changes_cross_section(ct0):
    _, labels = _canonical(*ct0)
    tube = labels == 5
    per_slice = tube.sum(axis=(0, 1))
    assert (per_slice > 0).all()  # it runs through every slice
    assert per_slice.max() > 1.5 * per_slice.min()  # its cross-section grows and shrinks
    centroids = np.array([np.argwhere(tube[:, :, z]).mean(0) for z in range(tube.shape[2])])
    assert np.ptp(centroids, axis=0).max() > 10  # its centre line moves by > 10 voxels


def test_mri_kind(mri0, ct0):
    vol, labels = _canonical(*mri0)
    _, labels_ct = _canonical(*ct0)
    np.testing.assert_array_equal(labels, labels_ct)  # same seed: the same "patient", scanned as MRI
    body = vol.data != 0
    assert 0.3 < body.mean() < 0.8 and vol.data.min() == 0.0  # exact zeros outside the body only
    assert (vol.data[labels > 0] > 0).all()
    assert 0 < np.percentile(vol.data[body], 99.5) < 1500  # MRI-like range (paper: 0 to 800)
    flat = make_phantom(0, "mri", bias=0.0)[0]
    assert not np.array_equal(flat, mri0[0])  # the bias field changes the image, not the labels


def test_orientation_only_changes_the_storage():
    a = _canonical(*make_phantom(5, "ct", (32, 28, 12), orientation="RAS"))
    b = _canonical(*make_phantom(5, "ct", (32, 28, 12), orientation="PSL"))
    np.testing.assert_array_equal(a[0].data, b[0].data)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0].affine, b[0].affine, atol=1e-9)


def test_options_and_errors():
    _, labels, _ = make_phantom(3, "ct", (40, 40, 16), n_organs=2, tube=False)
    assert set(np.unique(labels)) == {0, 1, 2}
    with pytest.raises(ValueError, match="kind must be 'ct' or 'mri'"):
        make_phantom(0, "pet")
    with pytest.raises(ValueError, match="n_organs"):
        make_phantom(0, "ct", n_organs=9)


def test_dataset_on_disk_is_read_by_the_loader(tmp_path):
    root = write_phantom_dataset(tmp_path / "ph", 2, "ct", seed=7, shape=(40, 36, 16))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"} and meta["numTraining"] == 2 and meta["tensorImageSize"] == "3D"
    cases = read_dataset(root)
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_001"]
    assert cases[0].label_names == PHANTOM_LABELS and cases[0].modality == "CT" and cases[0].dim == 3
    vol, labels = load_case(cases[1])
    image, lab, affine = make_phantom((7, 1), "ct", (40, 36, 16))
    raw = nib.load(str(cases[1].image))
    assert raw.get_data_dtype() == np.int16  # CT stored as integer HU
    np.testing.assert_allclose(raw.affine, affine, atol=1e-6)
    ref, ref_lab = _canonical(np.round(image), lab, affine)
    np.testing.assert_array_equal(vol.data, ref.data)
    np.testing.assert_array_equal(labels, ref_lab)
    mri = write_phantom_dataset(tmp_path / "mr", 1, "mri", seed=7, shape=(24, 24, 8))
    (case,) = read_dataset(mri)
    assert case.modality == "MRI" and nib.load(str(case.image)).get_data_dtype() == np.float32
