"""The compile helper (medsam2_jax.train.compile_ahead): a spawned process compiles the training step and the
held-out evaluation's predict program into the persistent compilation cache, and the training process loads
both from there instead of compiling them (on CPU, a process that compiled the step runs it slower).

* ``train.py`` with ``compile_in_subprocess=on`` and an empty cache: the training process finds the step and
  the predict program that the helper compiled (same cache keys: same programs, shapes, shardings and JAX
  settings), and trains;
* when to use it (``auto``, ``on``, ``off``), and the error for ``on`` without the cache;
* a helper that fails reports why (the training process then compiles by itself).
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import demo
from medsam2_jax.train import compile_ahead
from medsam2_jax.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.image_size=64", "--config.num_frames=2", "--config.batch_size=1", "--config.total_steps=2",
         "--config.log_every=1", "--config.data.realct=False", "--config.data.phantoms=1",
         "--config.data.phantom_shape=(64, 64, 16)", "--config.eval.phantoms=1", "--config.eval.batches=1",
         "--config.progress=False"]


def _config(**fields):
    c = demo.get_config()
    with c.unlocked():
        for k, v in fields.items():
            c[k] = v
    return c


@pytest.mark.slow
def test_training_process_loads_what_the_helper_compiled(tmp_path):
    cache = tmp_path / "cache"  # empty: nothing there but what this run's helper writes
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu", MEDSAM2_KEEP_FREED_MEMORY="1")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                        f"--compile_cache={cache}", "--config.compile_in_subprocess=on", *SMALL],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "training step compiled in a helper process" in out, out
    assert "and loaded from the compilation cache here" in out, out  # the keys matched: no compile here
    assert "held-out evaluation's program compiled in the helper process and loaded from the compilation " \
           "cache here" in out, out
    assert "not found in the cache" not in out
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.name.startswith("jit_"))
    assert entries.count("jit_step") == 1 and entries.count("jit_predict") == 1, entries
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_when_the_helper_is_used(monkeypatch):
    monkeypatch.setattr(compile_ahead, "_cache_dir", lambda: "/some/cache")
    assert compile_ahead.wanted(_config(compile_in_subprocess="on"))
    assert not compile_ahead.wanted(_config(compile_in_subprocess="off"))
    # auto: this test process has one CPU device and one process
    assert compile_ahead.wanted(_config(compile_in_subprocess="auto")) == (
        jax.default_backend() == "cpu" and jax.device_count() == 1)
    monkeypatch.setattr(compile_ahead, "_cache_dir", lambda: None)
    assert not compile_ahead.wanted(_config(compile_in_subprocess="auto"))
    with pytest.raises(ConfigError, match="compile_in_subprocess.*--compile_cache"):
        compile_ahead.wanted(_config(compile_in_subprocess="on"))


def test_a_failing_helper_reports_why():
    c = _config(image_size=64, num_frames=2, batch_size=1)
    # "images" is missing from the batch: the step cannot be traced
    spec = {"masks": ((1, 2, 64, 64), "bool")}
    rep = compile_ahead.start(c, spec, predict=False).join()
    assert rep["ok"] is False
    assert "images" in rep["error"], rep
    assert rep["seconds"] > 0
