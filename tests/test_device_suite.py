"""``python -m benchmarks.device_suite --smoke``: the accelerator suite's code paths on CPU at tiny sizes, so
that the one-shot device script cannot rot. Every section must finish with numbers and no error, and the bf16 vs
float32 agreement must be sane (random weights at 64 px: the bounds are loose, a broken bf16 path or a
mis-wired comparison is far outside them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MEDSAM2_JAX_CACHE", str(ROOT / ".jax_cache"))

pytestmark = pytest.mark.slow

SECTIONS = ("environment", "models", "matmul_ceiling", "encoder", "agreement", "propagation", "train",
            "torch_compile")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_suite")
    out = tmp / "device_suite.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    with open(tmp / "stdout.txt", "w") as so, open(tmp / "stderr.txt", "w") as se:
        r = subprocess.run([sys.executable, "-m", "benchmarks.device_suite", "--smoke", "--out", str(out),
                            "--cache-dir", CACHE], cwd=ROOT, env=env, stdout=so, stderr=se, timeout=2700)
    log = (tmp / "stdout.txt").read_text()[-4000:] + (tmp / "stderr.txt").read_text()[-4000:]
    assert r.returncode == 0, log
    assert out.exists(), log
    return json.loads(out.read_text()), log


def test_every_section_ran(suite):
    res, log = suite
    secs = res["sections"]
    for name in SECTIONS:
        assert name in secs, (name, log)
        assert secs[name]["status"] == "ok", (name, secs[name].get("error"), secs[name].get("traceback"))
    assert res["smoke"] is True
    assert res["sections"]["environment"]["backend"] == "cpu"
    assert res["sections"]["models"]["torch_available"] is True


def test_numbers(suite):
    res, _ = suite
    secs = res["sections"]
    assert secs["matmul_ceiling"]["tflops"] > 0
    for dt in ("float32", "bfloat16"):
        for b in (1, 2):
            row = secs["encoder"]["jax"][f"{dt}_b{b}"]
            assert row["frames_per_s"] > 0 and row["flops_per_call"] > 0, row
            assert row["fraction_of_bf16_peak"] > 0
            assert secs["encoder"]["torch"][f"eager_{dt}_b{b}"]["frames_per_s"] > 0
        prop = secs["propagation"]
        assert prop["jax"][dt]["total"]["frames_per_s"] > 0
        assert prop["torch"][f"eager_{dt}"]["frames_per_s"] > 0
    # float32 JAX tracks as PyTorch does (loose: this is a smoke check, the parity tests are the tight ones)
    par = secs["propagation"]["parity_float32_vs_torch"]
    assert par["min_mask_iou"] > 0.9, par
    tr = secs["train"]
    assert tr["chosen_batch"] == 2
    assert tr["step_s_median"] > 0 and tr["mfu"] > 0
    tc = secs["torch_compile"]["results"]
    assert any(isinstance(v, dict) and v.get("frames_per_s", 0) > 0 for v in tc.values()), tc
    # (e) memory: XLA's memory analysis of each compiled program, the allocator snapshots per section
    progs = res["memory"]["programs"]
    assert any(k.startswith("encoder_") for k in progs) and any(k.startswith("train_b") for k in progs)
    assert set(SECTIONS) <= set(res["memory"]["jax_per_section"])
    assert res["summary"]["sections_status"] == {k: "ok" for k in SECTIONS}


def test_agreement_sane(suite):
    res, _ = suite
    ag = res["sections"]["agreement"]
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2 % per operation); through 12 Hiera blocks the
    # features' relative L2 error stays at a few per cent. A float32/bf16 mix-up would be ~0, a broken path ~1.
    for level, v in ag["features"].items():
        assert 0 < v["rel_l2"] < 0.1, (level, v)
    assert 0 < ag["mask_logits"]["rel_l2"] < 0.5, ag["mask_logits"]
    assert ag["mask_iou"]["mean"] > 0.7, ag["mask_iou"]
    assert 0 <= ag["mask_iou"]["min"] <= ag["mask_iou"]["mean"] <= 1
    assert ag["object_scores"]["present_agree"] >= 0.5
