"""eval.py end to end on small phantoms with random weights (in-process), the CLI's --help and usage errors
(subprocess / in-process), report consistency, the copy-mask baseline against a hand computation, and that the
predictor sees no ground truth beyond the prompt slice."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import evaluate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "eval_phantoms.py")
METHODS = "('copy_mask','self_sorting')"
# One compiled shape for everything: 64 x 64 x 16 volumes at S = 64 (runs padded to 16 / 32 frames).
COMMON = ["--config.image_size=64", "--config.phantom_shape=(64,64,16)", f"--config.methods={METHODS}",
          "--compile_cache=", "--noprogress"]


def write_block_dataset(root: Path) -> Path:
    """One CT-like case of known geometry (64 x 64 x 16, spacing 1 x 1 x 2.5 mm): slices 2-9 hold a 20 x 20 square
    (rows/cols 20:40), slices 10-13 a 10 x 10 square (25:35). Largest area: slice 2 (first of the ties). Copy-mask
    puts the 20 x 20 square on slices 2-13: |P| = 12*400 = 4800, |G| = 8*400 + 4*100 = 3600 = |P & G|, so
    Dice = 7200 / 8400 = 6/7 and IoU = 3600 / 4800 = 0.75."""
    rng = np.random.default_rng(0)
    lab = np.zeros((64, 64, 16), np.uint8)
    lab[20:40, 20:40, 2:10] = 1
    lab[25:35, 25:35, 10:14] = 1
    img = (-100 + 10 * rng.standard_normal(lab.shape) + 160 * lab).astype(np.int16)
    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr" / "block_000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / "block_000.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Block", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "block"},
        "training": [{"image": "./imagesTr/block_000.nii.gz", "label": "./labelsTr/block_000.nii.gz"}]}))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    block = write_block_dataset(tmp / "block")
    wd = tmp / "out"
    argv = ["eval.py", f"--config={CONFIG}", "--random_weights", f"--workdir={wd}", "--config.phantoms=2",
            f"--config.dataset_dirs=('{block}',)", *COMMON]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert evaluate.main(argv) == 0
    rows = list(csv.DictReader(open(wd / "per_case.csv")))
    summary = json.loads((wd / "summary.json").read_text())
    return wd, buf.getvalue(), rows, summary, block


@pytest.mark.slow
def test_reports_consistent(run):
    wd, out, rows, summary, _ = run
    assert list(rows[0]) == list(evaluate.CSV_FIELDS)
    # 1 block structure + 5 labelled structures per phantom x 2 phantoms, each with two methods.
    assert len(rows) == 2 * (1 + 2 * 5)
    assert {r["method"] for r in rows} == {"copy_mask", "self_sorting"}
    for m, block in summary["methods"].items():
        mine = [r for r in rows if r["method"] == m]
        for k in ("dice", "iou"):
            vals = np.array([float(r[k]) for r in mine])
            assert block["overall"][k]["mean"] == pytest.approx(vals.mean(), abs=1e-6)
            assert block["overall"][k]["median"] == pytest.approx(np.median(vals), abs=1e-6)
            assert block["overall"][k]["std"] == pytest.approx(vals.std(), abs=1e-6)
            for s, st in block["per_structure"].items():
                sv = np.array([float(r[k]) for r in mine if r["structure"] == s])
                assert st[k]["n"] == sv.size and st[k]["mean"] == pytest.approx(sv.mean(), abs=1e-6)
        hd = np.array([float(r["hd95_mm"]) for r in mine])
        fin = hd[np.isfinite(hd)]
        assert block["overall"]["hd95_mm"].get("n_inf", 0) == hd.size - fin.size
        if fin.size:
            assert block["overall"]["hd95_mm"]["mean"] == pytest.approx(fin.mean(), rel=1e-5)
        for r in mine:
            assert 0.0 <= float(r["dice"]) <= 1.0 and float(r["seconds"]) >= 0.0
    # Protocol stated in the output and in summary.json; random weights said loudly.
    assert summary["protocol"]["text"] == evaluate.protocol_text(evaluate_config())
    assert "No ground truth is used on any other slice, nor in the image's preprocessing" in out and "optimistic" in out
    assert summary["random_weights"] is True and "RANDOM WEIGHTS" in out and "MEANINGLESS" in summary["warning"]
    assert summary["protocol"]["prompt_slice"] == "largest" and summary["protocol"]["prompt_kind"] == "box"
    assert "copy_mask" in out and "ALL" in out  # the table
    assert set(summary["overlays"]) == {"best", "median", "worst"}
    for p in summary["overlays"].values():
        assert Path(p).is_file() and Path(p).stat().st_size > 1000 and Path(p).parent == wd / "overlays"


def evaluate_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_phantoms_cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.slow
def test_copy_mask_by_hand(run):
    _, _, rows, _, _ = run
    (r,) = [r for r in rows if r["structure"] == "block" and r["method"] == "copy_mask"]
    assert int(r["prompt_slice"]) == 2
    assert float(r["dice"]) == pytest.approx(6 / 7, abs=1e-6)
    assert float(r["iou"]) == pytest.approx(0.75, abs=1e-6)
    # 20x20 square over 12 slices vs the GT: the only surface mismatch is the 5-voxel step in-plane on
    # slices 10-13 (5 mm) and the GT's top at slice 13: HD95 is at most 5 mm and more than 0.
    assert 0.0 < float(r["hd95_mm"]) <= 5.0 + 1e-6


@pytest.mark.slow
def test_predictor_sees_only_the_prompt_slice(run):
    """Zero the ground truth everywhere but the prompt slice: the model's prediction is unchanged (the copy-mask
    baseline, which uses the GT extent, changes)."""
    from medsam2_jax import api
    from medsam2_jax.data import io

    _, _, _, _, block = run
    (case,) = io.read_dataset(block)
    cfg = evaluate_config()
    cfg.image_size = 64
    model = api.random_model(cfg.model, 64, seed=0)
    methods = [evaluate.parse_method("copy_mask"), evaluate.parse_method("self_sorting")]

    def ecase(zero_outside):
        def load():
            vol, lab = io.load_case(case)
            if zero_outside:
                lab = lab.copy()
                lab[:, :, :2] = 0
                lab[:, :, 3:] = 0
            return vol, lab
        return evaluate.EvalCase("block", load, "CT", {1: "block"})

    full = evaluate.evaluate_case(model, ecase(False), methods, cfg, 0, keep="self_sorting")
    only = evaluate.evaluate_case(model, ecase(True), methods, cfg, 0, keep="self_sorting")
    f = {r["method"]: r for r in full}
    o = {r["method"]: r for r in only}
    assert f["self_sorting"]["prompt_slice"] == o["self_sorting"]["prompt_slice"] == 2
    np.testing.assert_array_equal(f["self_sorting"]["_overlay"]["pred"], o["self_sorting"]["_overlay"]["pred"])
    assert o["copy_mask"]["dice"] == pytest.approx(1.0) and f["copy_mask"]["dice"] == pytest.approx(6 / 7)
    # The labels reach the stack as preprocess_case would map them (same crop here: the image is non-zero).
    from medsam2_jax.data import preprocess

    vol, lab = io.load_case(case)
    ref = preprocess.preprocess_case(vol, lab, "CT", 64)
    np.testing.assert_array_equal(evaluate.labels_on_stack(lab, ref.grid), ref.labels)


def test_predict_refuses_ground_truth():
    @dataclasses.dataclass
    class Pre:
        image: np.ndarray
        labels: np.ndarray | None

    with pytest.raises(ValueError, match="must not receive ground truth"):
        evaluate.predict(None, Pre(np.zeros((2, 32, 32, 3)), np.zeros((2, 32, 32))), {"slice": 0},
                         evaluate.parse_method("fifo"))
    p = evaluate.build_prompt(np.pad(np.ones((3, 4), bool), 5), 7, "box", np.random.default_rng(0))
    assert p["slice"] == 7 and p["box"].tolist() == [5, 5, 8, 7]
    p = evaluate.build_prompt(np.pad(np.ones((5, 5), bool), 5), 1, "click", np.random.default_rng(0))
    assert p["points"].tolist() == [[7, 7]] and p["labels"].tolist() == [1]


def test_methods_parse():
    m = evaluate.parse_method("self_sorting:six,vote,no_resampling")
    assert m.six and m.aggregation == "vote" and not m.use_resampling and m.use_threshold
    cfg = m.volume_config()
    assert len(cfg.orientations) == 6 and cfg.tracker.bank.policy == "self_sorting"
    assert not cfg.tracker.bank.use_resampling
    for bad in ("nope", "fifo:no_threshold", "copy_mask:six", "fifo:vote", "self_sorting:sixx"):
        with pytest.raises(evaluate.UsageError, match="config.methods"):
            evaluate.parse_method(bad)


def test_usage_errors_in_process(tmp_path, capsys):
    base = ["eval.py", f"--config={CONFIG}", f"--workdir={tmp_path}"]
    for extra, needle in (([], "--model"),
                          (["--random_weights", "--config.methods=('copy_mask','sam3')"], "config.methods"),
                          (["--random_weights", "--config.prompt.kind=scribble"], "config.prompt.kind"),
                          (["--model=" + str(tmp_path)], "--model"),
                          (["--model=" + str(tmp_path), "--checkpoint=" + str(tmp_path)], "former name of --model")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(base + extra)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    # the former spelling --checkpoint=DIR is still read as --model=DIR, with a note
    with pytest.raises(SystemExit) as e:
        evaluate.main(base + ["--checkpoint=" + str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--checkpoint=DIR is now --model=DIR" in err and "--model: " in err
    assert "not a model directory" in err


def test_cli_help_and_unknown_field(tmp_path):
    r = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--model" in r.stdout and "--random_weights" in r.stdout
    r = subprocess.run([sys.executable, "eval.py", f"--config={CONFIG}", "--random_weights",
                        f"--workdir={tmp_path}", "--config.no_such_field=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no_such_field" in r.stderr and "eval.py: error" in r.stderr


@pytest.mark.slow
def test_model_directory(run, tmp_path):
    """--model=DIR (a model directory as convert/sam2_to_flax.py and train.py write it): same predictions as
    the same weights built in memory; the output does not claim random weights."""
    from medsam2_jax import api

    wd0, _, rows0, _, block = run
    model_dir = tmp_path / "model"
    api.save_model(api.random_model("sam2.1_hiera_t", 64, seed=0), model_dir)
    wd = tmp_path / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert evaluate.main(["eval.py", f"--config={CONFIG}", f"--model={model_dir}", f"--workdir={wd}",
                              "--config.phantoms=0", f"--config.dataset_dirs=('{block}',)", *COMMON]) == 0
    assert "RANDOM WEIGHTS" not in buf.getvalue()
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["random_weights"] is False and summary["model_dir"] == str(model_dir)
    rows = list(csv.DictReader(open(wd / "per_case.csv")))
    ref = {(r["structure"], r["method"]): r for r in rows0 if r["structure"] == "block"}
    for r in rows:
        assert float(r["dice"]) == pytest.approx(float(ref[r["structure"], r["method"]]["dice"]), abs=1e-6)
