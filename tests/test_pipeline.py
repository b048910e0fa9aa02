"""Balanced sampling, sequence windows and the grain pipeline (determinism, save/restore, shards, workers)."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from medsam2_jax.data import pipeline as pl
from medsam2_jax.data import sampling as sp
from medsam2_jax.data.augment import AugmentConfig
from medsam2_jax.data.prompts import PromptConfig

S = 48
T = 4


def _case(seed: int, n: int, classes=(1, 2)) -> pl.ArrayCase:
    """n slices of noise; per class a disc over a few slices (class 2 split into two components)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, S, S, 1)).astype(np.float32).repeat(3, -1)
    yy, xx = np.mgrid[:S, :S]
    targets = []
    for c in classes:
        comps = 2 if c == 2 else 1
        for k in range(comps):
            m = np.zeros((n, S, S), bool)
            z0 = int(rng.integers(0, max(1, n - 3)))
            z1 = min(n, z0 + int(rng.integers(2, 9)))
            cy, cx = rng.integers(S // 4, 3 * S // 4, size=2)
            r = 4 + 2 * k
            m[z0:z1] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            targets.append(pl.ArrayTarget(c, k + 1, m))
    return pl.ArrayCase(img, targets)


INFOS = [
    sp.CaseInfo("liver", "CT", name="l0"), sp.CaseInfo("liver", "CT", name="l1"), sp.CaseInfo("liver", "CT", name="l2"),
    sp.CaseInfo("liver", "MRI", name="l3"),
    sp.CaseInfo("brain", "MRI", name="b0"),
    sp.CaseInfo("polyp", "endoscopy", dim=2, name="p0"), sp.CaseInfo("polyp", "endoscopy", dim=2, name="p1"),
]


@pytest.fixture(scope="module")
def source():
    cases = [_case(i, 12) for i in range(5)] + [_case(10 + i, 1) for i in range(2)]
    return pl.in_memory_source(INFOS, cases)


def _cfg(**kw) -> pl.PipelineConfig:
    base = dict(image_size=S, batch_size=2, seed=7, shard_index=0, shard_count=1,
                sampling=sp.SamplingConfig(num_frames=T), prompts=PromptConfig(num_points=4))
    base.update(kw)
    return pl.PipelineConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------- sampling


def test_balanced_sampler_probabilities_and_chi_square():
    sampler = sp.BalancedSampler(INFOS)
    p = sampler.case_probabilities()
    # task 1/3 each; liver: modality 1/2 each, CT pool of 3; polyp: pool of 2
    expected = np.array([1 / 18, 1 / 18, 1 / 18, 1 / 6, 1 / 3, 1 / 6, 1 / 6])
    np.testing.assert_allclose(p, expected)
    rng = np.random.default_rng(0)
    n = 18000
    counts = np.bincount([sampler.draw(rng) for _ in range(n)], minlength=len(INFOS))
    # chi-square goodness of fit against the exact probabilities (fixed seed; a wrong scheme, e.g. uniform
    # over cases, gives chi2 in the thousands)
    chi2, pval = stats.chisquare(counts, n * expected)
    assert pval > 1e-4, (counts, chi2)
    # uniform over cases would be far off: a check that the test has power
    _, p_uniform = stats.chisquare(counts, np.full(len(INFOS), n / len(INFOS)))
    assert p_uniform < 1e-12


def test_target_choice_balances_classes():
    rng = np.random.default_rng(0)
    class_ids = [1, 2, 2, 2]  # class 2 split into three components
    n = 4000
    picks = np.array([sp.choose_target(class_ids, rng, "class") for _ in range(n)])
    assert abs((picks == 0).sum() - n / 2) <= 5 * np.sqrt(n / 4)  # class 1 half of the time
    picks = np.array([sp.choose_target(class_ids, rng, "target") for _ in range(n)])
    assert abs((picks == 0).sum() - n / 4) <= 5 * np.sqrt(n * 3 / 16)


def test_sample_window_contains_the_target_on_frame_zero():
    area = np.zeros(30, int)
    area[14:16] = 50  # full 8-frame windows with stride 1 or 2 exist in both directions
    rng = np.random.default_rng(0)
    n = 1000
    n_rev = 0
    strides = set()
    for _ in range(n):
        frames, rev, k = sp.sample_window(area, 8, rng, stride=(1, 2), reverse_prob=0.5)
        assert area[frames[0]] > 0 and (frames >= 0).all()
        assert (np.diff(frames) == (-k if rev else k)).all()
        n_rev += rev
        strides.add(k)
    assert abs(n_rev - n / 2) <= 5 * np.sqrt(n / 4) and strides == {1, 2}
    # target at the far end of a forward window: no full window -> the frames past the volume are padding
    area2 = np.zeros(13, int)
    area2[10:13] = 50
    for _ in range(20):
        frames, rev, _ = sp.sample_window(area2, 8, rng, reverse_prob=0.0)
        start = frames[0]
        assert not rev and 10 <= start <= 12
        expected = np.where(start + np.arange(8) < 13, start + np.arange(8), -1)
        np.testing.assert_array_equal(frames, expected)
    with pytest.raises(ValueError, match="min_area"):
        sp.sample_window(np.zeros(5), 4, rng)


def test_draw_sequence_3d_and_2d(source):
    sampler = sp.BalancedSampler(INFOS)
    rng = np.random.default_rng(0)
    cfg = sp.SamplingConfig(num_frames=T)
    for _ in range(30):
        seq = sp.draw_sequence(0, source.__getitem__, sampler, rng, cfg)
        case = source[0]
        assert seq.images.shape == (T, S, S, 3) and seq.masks.shape == (T, S, S)
        assert seq.masks[0].any() and not seq.independent_frames
        tgt = next(t for t in case.targets if t.class_id == seq.class_id and t.component_id == seq.component_id[0])
        for t in range(T):  # frames are the volume's slices and the target's mask at those slices
            if seq.frame_valid[t]:
                np.testing.assert_array_equal(seq.images[t], case.image[seq.frame_index[t]])
                np.testing.assert_array_equal(seq.masks[t], tgt.mask[seq.frame_index[t]])
            else:
                assert not seq.masks[t].any()
    # 2D: T images of the same (task, modality) pool, mask = the class's components in each image
    seq = sp.draw_sequence(5, source.__getitem__, sampler, rng, cfg)
    assert seq.independent_frames and set(seq.case_index.tolist()) <= {5, 6} and seq.case_index[0] == 5
    for t in range(T):
        c = source[int(seq.case_index[t])]
        union = np.zeros((S, S), bool)
        for tg in c.targets:
            if tg.class_id == seq.class_id:
                union |= tg.mask[0]
        np.testing.assert_array_equal(seq.masks[t], union)
        np.testing.assert_array_equal(seq.images[t], c.image[0])


def test_cases_without_targets_are_redrawn_then_reported():
    infos = [sp.CaseInfo("a", "CT", name="empty"), sp.CaseInfo("b", "CT", name="full")]
    empty = pl.ArrayCase(np.zeros((5, S, S, 3), np.float32), [])
    src = pl.in_memory_source(infos, [empty, _case(0, 5)])
    sampler = sp.BalancedSampler(infos)
    rng = np.random.default_rng(0)
    for _ in range(20):
        seq = sp.draw_balanced_sequence(src.__getitem__, sampler, rng, sp.SamplingConfig(num_frames=T))
        assert seq.case_index[0] == 1
    src_bad = pl.in_memory_source(infos[:1], [empty])
    with pytest.raises(ValueError, match="had no target.*empty"):
        sp.draw_balanced_sequence(src_bad.__getitem__, sp.BalancedSampler(infos[:1]), rng,
                                  sp.SamplingConfig(num_frames=T, max_attempts=3))


# ---------------------------------------------------------------------------------------------- pipeline


def test_batch_shapes_dtypes_and_prompt_consistency(source):
    it = pl.make_iterator(source, _cfg(batch_size=3))
    batches = _take(it, 4)
    it.close()
    B, P = 3, 4
    shapes = {
        "images": ((B, T, S, S, 3), np.float32), "masks": ((B, T, S, S), bool),
        "point_coords": ((B, T, P, 2), np.float32), "point_labels": ((B, T, P), np.int32),
        "mask_inputs": ((B, T, S, S), np.float32), "mask_valid": ((B, T), bool), "prompted": ((B, T), bool),
        "correct_frames": ((B, T), bool), "frame_valid": ((B, T), bool), "frame_index": ((B, T), np.int32),
        "case_index": ((B, T), np.int32), "component_id": ((B, T), np.int32), "class_id": ((B,), np.int32),
        "task_index": ((B,), np.int32), "modality_index": ((B,), np.int32), "prompt_kind": ((B,), np.int32),
        "reversed": ((B,), bool), "stride": ((B,), np.int32), "record_index": ((B,), np.int64),
        "skipped_cases": ((B, 10 + T - 1), np.int32),  # max_attempts + T - 1
    }
    for b in batches:
        assert set(b) == set(shapes)
        for k, (shape, dtype) in shapes.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
        assert b["masks"][:, 0].reshape(B, -1).any(axis=1).all()  # the target is on the prompted frame
        assert b["prompted"][:, 0].all()
        is_mask = b["prompt_kind"] == 0
        np.testing.assert_array_equal(b["mask_valid"][:, 0], is_mask)
        np.testing.assert_array_equal(b["mask_inputs"][is_mask, 0], b["masks"][is_mask, 0])
    np.testing.assert_array_equal(np.concatenate([b["record_index"] for b in batches]), np.arange(12))
    assert all((b["skipped_cases"] == -1).all() for b in batches)  # nothing to skip in this source


def test_pipeline_is_deterministic_and_seeded(source):
    a = pl.make_iterator(source, _cfg())
    b = pl.make_iterator(source, _cfg(read_threads=3))  # threads do not change the result
    c = pl.make_iterator(source, _cfg(seed=8))
    xa, xb, xc = _take(a, 3), _take(b, 3), _take(c, 3)
    for it in (a, b, c):
        it.close()
    _assert_batches_equal(xa, xb)
    assert not np.array_equal(xa[0]["images"], xc[0]["images"])


def test_iterator_save_restore_is_exact(source, tmp_path):
    import grain
    from etils import epath

    cfg = _cfg()
    it = pl.make_iterator(source, cfg)
    _take(it, 3)
    state = it.get_state()
    # saved the way orbax saves it (grain's checkpoint handler writes the state as JSON per process)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    after = _take(it, 3)
    it.close()
    resumed = pl.make_iterator(source, cfg, state=state)
    _assert_batches_equal(after, _take(resumed, 3))
    resumed.close()
    from_disk = pl.make_iterator(source, cfg)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=from_disk)
    _assert_batches_equal(after, _take(from_disk, 3))
    from_disk.close()


def test_two_process_shards_are_disjoint_and_cover(source):
    cfg = _cfg(num_records=10, augment_enabled=False)
    full = pl.record_dataset(source, dataclasses.replace(cfg, shard_index=0, shard_count=1))
    shards = [pl.record_dataset(source, dataclasses.replace(cfg, shard_index=i, shard_count=2)) for i in (0, 1)]
    ids = [[int(shards[i][j]["record_index"]) for j in range(len(shards[i]))] for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(10))
    # a record is the same whichever shard computes it (seeded by its global index)
    for i in (0, 1):
        for j, r in enumerate(ids[i]):
            x, y = shards[i][j], full[r]
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # the batched iterators see those records
    it = pl.make_iterator(source, dataclasses.replace(cfg, shard_index=1, shard_count=2, batch_size=2))
    got = np.concatenate([next(it)["record_index"] for _ in range(2)])
    it.close()
    np.testing.assert_array_equal(got, ids[1][:4])


def test_shards_side_by_side_are_the_global_batches(source):
    """Blocks, not interleaving: process p's batch g is rows p*B..(p+1)*B-1 of the one-process global batch g,
    so a 2-host run trains on the same batches, row for row, as a 1-host run with twice the batch."""
    cfg = _cfg(num_records=12, augment_enabled=False, batch_size=2)
    one = pl.make_iterator(source, dataclasses.replace(cfg, batch_size=4, shard_index=0, shard_count=1))
    two = [pl.make_iterator(source, dataclasses.replace(cfg, shard_index=i, shard_count=2)) for i in (0, 1)]
    for _ in range(3):
        g = next(one)
        parts = [next(t) for t in two]
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k], err_msg=k)
    for t in (one, *two):
        t.close()


def test_default_shard_is_the_jax_process():
    import jax

    cfg = pl.PipelineConfig()
    assert pl.resolve_shard(cfg) == (jax.process_index(), jax.process_count())
    with pytest.raises(ValueError, match="shard_index=2"):
        pl.resolve_shard(pl.PipelineConfig(shard_index=2, shard_count=2))


def test_workers_zero_and_two_give_the_same_batches_and_restore(source):
    cfg0 = _cfg()
    ref_it = pl.make_iterator(source, cfg0)
    ref = _take(ref_it, 4)
    ref_it.close()
    cfg2 = dataclasses.replace(cfg0, num_workers=2, worker_buffer_size=1)
    it = pl.make_iterator(source, cfg2)
    first = _take(it, 2)
    state = it.get_state()
    rest = _take(it, 2)
    it.close()
    _assert_batches_equal(ref, first + rest)
    resumed = pl.make_iterator(source, cfg2, state=state)
    _assert_batches_equal(rest, _take(resumed, 2))
    resumed.close()


def test_augmentation_switch_and_config_round_trip(source):
    off = pl.make_iterator(source, _cfg(augment_enabled=False))
    zero = pl.make_iterator(source, _cfg(augment=AugmentConfig.off()))
    on = pl.make_iterator(source, _cfg(augment=dataclasses.replace(AugmentConfig(), p_flip=1.0)))
    xo, xz, xa = _take(off, 2), _take(zero, 2), _take(on, 2)
    for it in (off, zero, on):
        it.close()
    _assert_batches_equal(xo, xz)  # a zero-probability config is the identity
    assert not np.array_equal(xo[0]["images"], xa[0]["images"])
    np.testing.assert_array_equal(xo[0]["record_index"], xa[0]["record_index"])
    # the same sequence is drawn with augmentation on or off (independent random streams)
    np.testing.assert_array_equal(xo[0]["frame_index"], xa[0]["frame_index"])
    # ml_collections round trip, nested configs included
    cfg = _cfg(num_workers=1)
    cd = cfg.to_config_dict()
    cd.sampling.num_frames = 6
    back = pl.PipelineConfig.from_dict(cd)
    assert back.sampling.num_frames == 6 and back.num_workers == 1 and isinstance(back.augment, AugmentConfig)
    with pytest.raises(ValueError, match="unknown keys.*'frames'"):
        pl.PipelineConfig.from_dict({"frames": 3})


def test_bad_config_and_sizes_are_named(source):
    it = pl.make_iterator(source, _cfg(image_size=64))
    with pytest.raises(ValueError, match="expected \\(image_size, image_size, 3\\)"):
        next(it)
    it.close()
    with pytest.raises(ValueError, match="batch_size"):
        pl.PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        pl.record_dataset(source, _cfg(num_records=3, batch_size=2, shard_count=2))
    with pytest.raises(TypeError, match="PipelineConfig.sampling"):
        pl.PipelineConfig(sampling=3)


# ---------------------------------------------------------------------------------------------- end to end


def test_end_to_end_from_nifti_phantoms(tmp_path_factory):
    """NIfTI on disk -> io -> preprocess -> balanced sequences -> batches, two tasks of two modalities."""
    from medsam2_jax.data import phantoms

    root = tmp_path_factory.mktemp("phantoms")
    phantoms.write_phantom_dataset(root / "ct", 2, "ct", seed=0, shape=(64, 64, 20))
    phantoms.write_phantom_dataset(root / "mr", 2, "mri", seed=1, shape=(64, 64, 20))
    src = pl.concat_sources(pl.dataset_source(root / "ct", 64), pl.dataset_source(root / "mr", 64))
    assert [i.task for i in src.infos] == ["PhantomCT"] * 2 + ["PhantomMRI"] * 2
    assert [i.modality for i in src.infos] == ["CT", "CT", "MRI", "MRI"]
    cfg = pl.PipelineConfig(image_size=64, batch_size=2, seed=3, shard_index=0, shard_count=1, augment_enabled=False,
                            sampling=sp.SamplingConfig(num_frames=T), prompts=PromptConfig(num_points=4))
    it = pl.make_iterator(src, cfg)
    batches = _take(it, 3)
    it.close()
    for b in batches:
        assert b["images"].shape == (2, T, 64, 64, 3) and np.isfinite(b["images"]).all()
        for i in range(2):
            # every frame is the preprocessed slice and the target's mask on it, as preprocess made them
            case = src[int(b["case_index"][i, 0])]
            tgt = next(t for t in case.targets
                       if t.class_id == b["class_id"][i] and t.component_id == b["component_id"][i, 0])
            for t in range(T):
                if b["frame_valid"][i, t]:
                    z = b["frame_index"][i, t]
                    np.testing.assert_array_equal(b["images"][i, t], case.image[z])
                    np.testing.assert_array_equal(b["masks"][i, t], tgt.mask[z])
            assert b["masks"][i, 0].any()
    # a corrupt file: raised with its name, or skipped (redrawn) when the source says so
    bad = root / "ct" / "imagesTr" / "phantom_001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    strict = pl.dataset_source(root / "ct", 64)
    with pytest.raises(ValueError, match="phantom_001"):
        strict[1]
    lenient = pl.dataset_source(root / "ct", 64, on_error="skip")
    assert lenient[1].targets == []
    it = pl.make_iterator(lenient, cfg)
    b = next(it)
    it.close()
    assert (b["case_index"] == 0).all()


def test_end_to_end_from_png_images(tmp_path):
    """A 2D dataset (PNG images and masks): sequences are images of the same task, the class on each."""
    from PIL import Image

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((80, 100, 3)) * 255).astype(np.uint8)
        m = np.zeros((80, 100), np.uint8)
        m[20 + 5 * i:50, 30:60 + 5 * i] = 1
        Image.fromarray(img).save(tmp_path / "imagesTr" / f"c{i}.png")
        Image.fromarray(m).save(tmp_path / "labelsTr" / f"c{i}.png")
    src = pl.dataset_source(tmp_path, 64, modality="endoscopy")
    assert all(i.dim == 2 for i in src.infos)
    cfg = pl.PipelineConfig(image_size=64, batch_size=2, shard_index=0, shard_count=1, augment_enabled=False,
                            sampling=sp.SamplingConfig(num_frames=T), prompts=PromptConfig(num_points=4))
    it = pl.make_iterator(src, cfg)
    b = next(it)
    it.close()
    for i in range(2):
        for t in range(T):
            case = src[int(b["case_index"][i, t])]
            np.testing.assert_array_equal(b["images"][i, t], case.image[0])
            np.testing.assert_array_equal(b["masks"][i, t], case.targets[0].mask[0])


# ---------------------------------------------------------------------------------------------- skipped cases


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Five CT phantoms: 1 corrupt (truncated), 2 without its label file, 3 with an empty label map."""
    import nibabel as nib

    from medsam2_jax.data import phantoms

    root = tmp_path_factory.mktemp("bad") / "ct"
    phantoms.write_phantom_dataset(root, 5, "ct", seed=0, shape=(48, 48, 16))
    bad = root / "imagesTr" / "phantom_001.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    (root / "labelsTr" / "phantom_002.nii.gz").unlink()
    lab = nib.load(str(root / "labelsTr" / "phantom_003.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), str(root / "labelsTr" / "phantom_003.nii.gz"))
    return root


def _skip_cfg(**kw):
    return _cfg(image_size=48, num_records=16, augment_enabled=False, **kw)


def _run_collect(src, cfg):
    it = pl.make_iterator(src, cfg)
    col = pl.SkipCollector(src)
    batches = []
    for b in it:
        col.update(b)
        batches.append(b)
    it.close()
    return col, batches


def test_skipped_cases_are_collected_into_one_report_with_0_and_2_workers(bad_dataset):
    from medsam2_jax.data.errors import DataError

    with pytest.raises(DataError, match="phantom_002.*missing"):  # strict: the listing stops at the missing label
        pl.dataset_source(bad_dataset, 48)
    src = pl.dataset_source(bad_dataset, 48, on_error="skip")
    names = [i.name.rsplit("/", 1)[-1] for i in src.infos]
    assert names == ["phantom_000.nii.gz", "phantom_001.nii.gz", "phantom_003.nii.gz", "phantom_004.nii.gz"]
    assert [k.source.rsplit("/", 1)[-1] for k in src.listing_skips] == ["phantom_002.nii.gz"]
    col0, batches = _run_collect(src, _skip_cfg())
    col2, batches2 = _run_collect(src, _skip_cfg(num_workers=2, worker_buffer_size=1))
    _assert_batches_equal(batches, batches2)  # skips included: records are deterministic
    assert col0.get_state() == col2.get_state()
    assert col0.records == 16 and col0.skipped_indices == [1, 2]  # the corrupt file and the empty labels
    # the counts are the records that drew each bad case (the sampler drew them, then another case)
    sk = np.concatenate([b["skipped_cases"] for b in batches])
    for i in (1, 2):
        assert col0.counts[i] == int((sk == i).any(axis=1).sum()) > 0
    assert not np.isin(np.concatenate([b["case_index"] for b in batches]), [1, 2]).any()
    rep = col2.report()
    got = {k.source.rsplit("/", 1)[-1]: (k.error_type, k.reason) for k in rep.skipped}
    assert list(got) == ["phantom_002.nii.gz", "phantom_001.nii.gz", "phantom_003.nii.gz"]
    assert got["phantom_001.nii.gz"][0] == "DataError" and "cannot read as NIfTI" in got["phantom_001.nii.gz"][1]
    assert got["phantom_003.nii.gz"][0] == "EmptyLabelsError"
    assert "label" in got["phantom_002.nii.gz"][1] and "missing" in got["phantom_002.nii.gz"][1]
    summary = col2.summary()
    assert summary.startswith("3 case(s) skipped (1 when listing the data, 2 during the run, over 16 records)")
    assert "phantom_001.nii.gz: cannot read as NIfTI" in summary and f"[drawn by {col0.counts[1]} record(s)]" in summary


def test_skip_collector_state_merge_and_bad_input(bad_dataset, source):
    import json

    src = pl.dataset_source(bad_dataset, 48, on_error="skip")
    cfg = _skip_cfg()
    full, batches = _run_collect(src, cfg)
    # checkpointed with the iterator: a collector restored from its JSON state ends with the same counts
    first = pl.SkipCollector(src)
    for b in batches[:3]:
        first.update(b)
    resumed = pl.SkipCollector(src)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for b in batches[3:]:
        resumed.update(b)
    assert resumed.get_state() == full.get_state()
    # two shards' collectors merge into the run's report
    shards = []
    for i in (0, 1):
        c, _ = _run_collect(src, dataclasses.replace(cfg, shard_index=i, shard_count=2))
        shards.append(c)
    shards[0].merge(shards[1].get_state())
    assert shards[0].get_state() == full.get_state()
    assert pl.SkipCollector(src).summary().startswith(
        "1 case(s) skipped (1 when listing the data, 0 during the run, over 0 records)")
    clean = pl.SkipCollector(source)
    assert clean.summary() == "no case skipped (0 records)"
    assert clean.update({"skipped_cases": np.full((2, 13), -1, np.int32)}) == [] and clean.records == 2
    with pytest.raises(KeyError, match="no 'skipped_cases'"):
        clean.update({"images": np.zeros(2)})
    with pytest.raises(ValueError, match="skipped case 9 is outside"):
        clean.update({"skipped_cases": np.array([9, -1], np.int32)})
    with pytest.raises(ValueError, match="integer"):
        clean.update({"skipped_cases": np.zeros((2, 3), np.float32)})


def test_validate_source_lists_bad_cases_up_front(bad_dataset):
    src = pl.dataset_source(bad_dataset, 48, on_error="skip")
    rep = pl.validate_source(src)
    assert [k.source.rsplit("/", 1)[-1] for k in rep.skipped] == [
        "phantom_002.nii.gz", "phantom_001.nii.gz", "phantom_003.nii.gz"]
    assert rep.on_error == "skip" and "3 case(s) skipped" in rep.summary()
    assert pl.validate_source(src, num_workers=2).skipped == rep.skipped  # the same from worker processes
    kept = pl.kept_indices(src, rep)
    assert kept == [0, 3]
    good = src.subset(kept)
    assert [i.name for i in good.infos] == [src.infos[0].name, src.infos[3].name]
    assert pl.validate_source(good).skipped == list(src.listing_skips)  # only the listing skip remains
    col, _ = _run_collect(good, _skip_cfg())
    assert col.counts == {}
    with pytest.raises(IndexError, match="outside 0..3"):
        src.subset([0, 4])
    with pytest.raises(ValueError, match="num_workers"):
        pl.validate_source(src, num_workers=-1)


def test_skipped_2d_images_are_not_frames():
    """A 2D sequence draws frames 1..T-1 from its pool: a skipped image there becomes an invalid frame."""
    from medsam2_jax.data.errors import SkippedCase

    infos = [sp.CaseInfo("polyp", "endoscopy", dim=2, name=f"p{i}") for i in range(3)]
    bad = pl.ArrayCase(np.zeros((1, S, S, 3), np.float32), [], skipped=SkippedCase("p1", "p1: broken", "DataError"))
    src = pl.in_memory_source(infos, [_case(10, 1), bad, _case(12, 1)])
    it = pl.make_iterator(src, _cfg(num_records=16, augment_enabled=False, sampling=sp.SamplingConfig(num_frames=6)))
    batches = list(it)
    it.close()
    n_bad = 0
    for b in batches:
        is_bad = b["case_index"] == 1
        n_bad += int(is_bad.sum())
        assert not is_bad[:, 0].any()  # the prompted frame is a real image
        np.testing.assert_array_equal(b["frame_valid"], ~is_bad)
        assert not b["masks"][is_bad].any()
        # a record with such a frame lists the case (a record may also list it after drawing it as frame 0)
        assert (b["skipped_cases"] == 1).any(axis=1)[is_bad.any(axis=1)].all()
    assert n_bad > 0
    col = pl.SkipCollector(src)
    for b in batches:
        col.update(b)
    assert col.skipped_indices == [1] and col.report().skipped[0].reason == "p1: broken"


# ---------------------------------------------------------------------------------------------- package


def test_data_package_reexports():
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    import medsam2_jax.data as data

    for name in data.__all__:
        obj = getattr(data, name)
        module = importlib.import_module(f"medsam2_jax.data.{data._WHERE[name]}")
        assert obj is getattr(module, name), name
    assert {"make_iterator", "SkipCollector", "dataset_source", "preprocess_case", "DataError"} <= set(data.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        data.nope
    # re-exports are lazy: reading NIfTI does not import grain (nor jax)
    code = "import sys, medsam2_jax.data.io; print('grain' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- benchmark


def test_train_batch_prompts_match_the_trackers_packing(source):
    """medsam2_jax.train.batch.batch_to_prompts (jit-able) == tracking.make_prompts on the same prompts."""
    from medsam2_jax.train import batch as bench
    from medsam2_jax import tracking

    kc, P = 2, 4
    it = pl.make_iterator(source, _cfg(batch_size=4, seed=11))
    batches = _take(it, 3)
    it.close()
    kinds = set()
    for b in batches:
        got = bench.batch_to_prompts({k: b[k] for k in bench.MODEL_KEYS}, kc)
        assert got.frame_idx.shape == (4, 1, kc) and got.mask.shape == (4, 1, kc, S, S)
        for i in range(4):
            prompts = []
            for t in np.flatnonzero(b["prompted"][i] & b["frame_valid"][i])[:kc]:
                lab, xy = b["point_labels"][i, t], b["point_coords"][i, t]
                if b["mask_valid"][i, t]:
                    prompts.append({"frame": int(t), "mask": b["mask_inputs"][i, t]})
                    continue
                pr = {"frame": int(t)}
                if (lab == 2).any():
                    pr["box"] = np.concatenate([xy[lab == 2][0], xy[lab == 3][0]])
                clicks = (lab == 0) | (lab == 1)
                if clicks.any():
                    pr["points"], pr["labels"] = xy[clicks], lab[clicks]
                prompts.append(pr)
            kinds.add(int(b["prompt_kind"][i]))
            ref = tracking.make_prompts([prompts], num_frames=T, image_size=S,
                                        config=tracking.TrackerConfig(max_cond_frames=kc, max_points=P))
            valid = np.asarray(ref.valid[0])
            n = valid.size  # make_prompts may pack fewer slots than max_cond_frames (only the used ones)
            np.testing.assert_array_equal(np.asarray(got.valid[i, 0])[:n], valid)
            assert not np.asarray(got.valid[i, 0])[n:].any()
            for field in ("frame_idx", "point_coords", "point_labels", "mask", "mask_valid"):
                np.testing.assert_array_equal(np.asarray(getattr(got, field)[i, 0])[:n][valid],
                                              np.asarray(getattr(ref, field)[0])[valid], err_msg=field)
    assert kinds == {0, 1, 2}  # masks, clicks and boxes were all checked


def test_benchmark_runs_with_a_model_step():
    """The benchmark's harness end to end at a toy size, with a stand-in model step (the real one compiles
    for minutes on CPU; it is run by the benchmark itself)."""
    import jax.numpy as jnp

    from benchmarks import data_pipeline as bench

    calls = []

    def step(batch):
        calls.append(batch["record_index"].tolist())
        return jnp.sum(jnp.asarray(batch["images"]))

    res = bench.run(image_size=32, num_frames=3, batch_size=2, workers=(0,), batches=2, source_kind="memory",
                    n_cases=1, phantom_shape=(32, 32, 12), profile_sequences=2, model_step=step, model_batches=2,
                    overlap_batches=2)
    assert [r["workers"] for r in res["pipeline"]] == [0] and res["pipeline"][0]["sequences"] == 4
    assert res["model"]["sequences"] == 4 and res["overlap"]["workers"] == 0
    assert 0.0 <= res["overlap"]["wait_fraction"] <= 1.0
    assert len(calls) == 3 + 3  # model: compile + 2 timed; overlap: start-up + 2
    text = bench.table(res)
    assert "pipeline / model" in text and "waiting for data" in text


def test_held_out_training_sources_keep_labels_out_of_the_image(tmp_path):
    """train.py's held-out evaluation reads its cases without letting the labels touch the image (crop, CT
    statistics): each held-out image equals the case preprocessed with no labels at all, while the training
    source of the same files uses the paper's label-aware preprocessing."""
    import ml_collections

    from medsam2_jax.data import io, preprocess
    from medsam2_jax.train.loop import make_source

    c = ml_collections.ConfigDict({
        "image_size": 64,
        "data": {"dataset_dirs": (), "phantoms": 1, "phantom_shape": (40, 40, 10), "cache_size": 1, "realct": False},
        "eval": {"dataset_dirs": (), "phantoms": 1},
    })
    held_out = make_source(c, tmp_path, held_out=True)
    root = tmp_path / "data" / "heldout_ct_1_40x40x10"
    case = io.read_dataset(root)[0]
    volume, labels = io.load_case(case)
    assert held_out.infos[0].modality == "CT"
    blind = preprocess.preprocess_case(volume, None, "CT", 64)
    aware = preprocess.preprocess_case(volume, labels, "CT", 64, label_names=case.label_names)
    got = held_out[0].image
    np.testing.assert_array_equal(got, blind.image)
    assert not np.array_equal(got, aware.image)  # the leak this avoids: the case's own foreground statistics
    assert len(held_out[0].targets) > 0  # the labels are still there, for the prompts and the score
