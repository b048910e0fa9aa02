"""The sharded training step equals the single-device step: 8 virtual CPU devices, meshes 8x1 (data), 1x8
(FSDP: parameters and Adam moments split 8 ways) and 2x4 (both), against one device, on the same batch.

Runs ``tests/scripts/sharded_step.py`` once in a subprocess (the device count must be set before JAX starts).

Tolerances, measured (float32, "highest" matmul precision; SAM 2.1 tiny at 64 px, 8 sequences of 2 frames):
the loss agrees to 5e-7. Gradients are compared per tensor as in tests/test_train_torch.py,
``max|g - g_1| <= RTOL * max|g_1| + 1e-6 * G`` (``G`` the model's largest gradient entry): the sums over the
batch and over sharded dimensions run in another order on each mesh (a reduce-scatter instead of a local
sum), which is float32 rounding, amplified in the backward pass where it is steep or discontinuous (ReLU
inputs near 0 in memory attention's MLP, the decoder's key-projection biases whose exact gradient is 0).
Measured worst tensors: 2.2e-3 (8x1), 6.2e-3 (1x8), 7.7e-3 (2x4); medians 3e-7, 1.1e-4, 3.9e-7. RTOL = 2e-2
leaves a 2.6x margin; a wrong reduction (a gradient not summed over the batch shards, or averaged twice)
is off by a factor of 2 to 8. Updated parameters: AdamW's first step moves an entry by about lr * sign(g),
so where a gradient is rounding noise its sign, and the update, may flip (up to 2 lr); where the gradient
is at least 1 % of its tensor's largest entry the sign is stable and the updates agree: measured 1.2e-7
(8x1, 2x4) and 8.7e-6 (1x8) with lr = 1e-3, bound 5e-2 lr (5.7x margin; one flipped update is 2 lr).
The 1x8 mesh (batch and parameters both over ``fsdp``) agrees less closely than the others (median
gradient error 1.1e-4 against 3e-7) while its loss agrees as closely; its worst tensors are the ReLU MLP of
memory attention's last layer and the patch embedding. Not explained yet; it stays within the bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MEDSAM2_JAX_CACHE", str(ROOT / ".jax_cache"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, MEDSAM2_JAX_CACHE=CACHE, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "sharded_step.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["8x1", "1x8", "2x4"])
def test_sharded_step_equals_single_device(results, mesh):
    r = results[mesh]
    assert r["n_tensors"] == 470
    assert r["loss_err"] <= 1e-5 * max(1.0, abs(results["single"]["loss"]))
    assert r["grad_rel_err_max"] <= 2e-2, r["grad_worst"]
    assert r["param_stable_err_max"] <= 5e-2 * r["lr"], r["param_worst"]
    assert r["param_err_max"] <= 2 * r["lr"] * (1 + 1e-3), r["param_worst"]
    assert r["param_moved_min"] > 0  # every entry compared there was really updated


def test_fsdp_splits_parameters(results):
    """The rules split the matrices over fsdp: a memory-attention MLP kernel (256 x 2048) is 2048 / fsdp wide
    on each device, and a device holds less than the whole model."""
    assert results["8x1"]["kernel_shard"] == [256, 2048] and results["8x1"]["describe"]["split"] == 0
    assert results["1x8"]["kernel_shard"] == [256, 256]
    assert results["2x4"]["kernel_shard"] == [256, 512]
    whole = results["8x1"]["describe"]["bytes_per_device"]
    assert results["1x8"]["describe"]["bytes_per_device"] < whole / 4
    assert results["2x4"]["describe"]["bytes_per_device"] < whole / 2
