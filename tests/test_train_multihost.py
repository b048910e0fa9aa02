"""Multi-host training on one machine: 2 processes x 4 CPU devices (gloo collectives over 127.0.0.1) train a
few steps with ``python train.py`` and end with the parameters of one process with 8 devices.

Both runs use the same mesh (8 x 1 data parallel, then 2 x 4 with FSDP) and, thanks to the pipeline's block
sharding, the same global batches row for row; each process reads only its half of every batch. What
differs is how the gradient sums cross processes (gloo) versus inside one process, so the parameters agree
to float32 rounding accumulated over the steps, not bit for bit: the bound below is a few Adam updates of
the smallest learning rate times float32 epsilon relative, far below one update (lr 1e-4).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MEDSAM2_JAX_CACHE", str(ROOT / ".jax_cache"))
STEPS = 3
ARGS = ["--config=configs/demo.py", "--config.image_size=64", "--config.num_frames=2", "--config.batch_size=8",
        f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.warmup_steps=0", "--config.data.realct=False", "--config.data.phantoms=2",
        "--config.data.phantom_shape=(64, 64, 16)", "--config.progress=False", "--config.tracker.max_cond_frames=2",
        f"--compile_cache={CACHE}"]

pytestmark = pytest.mark.slow


def _env(devices, **extra):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(workdir):
    from flax import nnx

    from medsam2_jax import api

    return jax.tree.map(np.asarray, nnx.state(api.load_model(Path(workdir) / "model"), nnx.Param))


@pytest.mark.parametrize("fsdp", [1, 4])
def test_two_processes_match_one_process(tmp_path, fsdp):
    mesh = [f"--config.mesh.fsdp={fsdp}"]
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "train.py", *ARGS, *mesh, f"--workdir={one}"], cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 8 cpu device(s), 1 process(es)" in r.stdout
    two = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *ARGS, *mesh, f"--workdir={two}"], cwd=ROOT,
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=1500) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "over 8 cpu device(s), 2 process(es)" in outs[0][0]
    # each process checkpointed its own data-iterator state
    last = max(int(x.name) for x in (two / "checkpoints").iterdir() if x.name.isdigit())
    assert last == STEPS
    a, b = _params(one), _params(two)
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        worst = max(worst, float(np.abs(x - y).max()))
    assert worst <= 1e-6, worst
    moved = max(float(np.abs(x).max()) for x in jax.tree.leaves(a))
    assert moved > 0
