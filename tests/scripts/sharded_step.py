"""One training step on 8 virtual CPU devices: a single device against meshes 8x1, 1x8 and 2x4.

Run by tests/test_train_sharding.py in a subprocess (the device count must be set before JAX starts).
Prints one JSON line: per mesh, the max |error| of the loss, of every gradient and of the updated
parameters relative to the single-device step, and how the parameters were placed.
"""

import gc
import json
import os
import sys
import time

from medsam2_jax.train.cli import relax_cpu_collective_timeouts

relax_cpu_collective_timeouts()  # 8 virtual devices on 2 busy cores can fall > 40 s apart

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("MEDSAM2_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["MEDSAM2_JAX_CACHE"])

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from medsam2_jax import api, tracking  # noqa: E402
from medsam2_jax.train import optim, sharding  # noqa: E402
from medsam2_jax.train.step import init_state, jit_train_step, make_train_step, tracker_config, train_mode  # noqa: E402

S, T, B = 64, 2, 8
LR = 1e-3


def make_batch():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    masks = np.zeros((B, T, S, S), bool)
    pc = np.zeros((B, T, 8, 2), np.float32)
    pl = -np.ones((B, T, 8), np.int32)
    for b in range(B):
        cy, cx, r = rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(6, 12)
        for t in range(T):
            masks[b, t] = (yy - cy - 2 * t) ** 2 + (xx - cx) ** 2 < r * r
        if b % 2:
            pc[b, 0, :2] = [[cx - r, cy - r], [cx + r, cy + r]]
            pl[b, 0, :2] = [2, 3]
        else:
            pc[b, 0, 0] = [cx, cy]
            pl[b, 0, 0] = 1
    images = rng.normal(size=(B, T, S, S, 3)).astype(np.float32) + masks[..., None] * 2.0
    return dict(images=images, masks=masks, frame_valid=np.ones((B, T), bool), point_coords=pc, point_labels=pl,
                mask_inputs=np.zeros((B, T, S, S), np.float32), mask_valid=np.zeros((B, T), bool),
                prompted=np.eye(T, dtype=bool)[0][None].repeat(B, 0))


def main():
    model = api.random_model("sam2.1_hiera_t", S, seed=1)
    bias = model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias.get_value() + 4.0)  # the random model finds the object: mask losses have gradients
    train_mode(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, sched = optim.make_optimizer(params, lr=LR, total_steps=10, warmup_steps=0)
    tcfg = tracker_config(tracking.TrackerConfig(max_cond_frames=1, cond_slots="max",
                                                 bank=tracking.bank_lib.BankConfig(policy="fifo")))
    fn = make_train_step(graphdef, rest, tx, tcfg, schedule=sched, return_grads=True)
    batch = make_batch()
    results = {}
    ref = None
    for name, shape in (("single", (1, 1)), ("8x1", (8, 1)), ("1x8", (1, 8)), ("2x4", (2, 4))):
        devs = jax.devices()[: shape[0] * shape[1]]
        mesh = sharding.make_mesh(*shape, devices=devs)
        state = init_state(jax.tree.map(jnp.copy, params), tx, 0)  # the step donates its input
        st_sh = sharding.state_shardings(state, params, mesh)
        b_sh = NamedSharding(mesh, sharding.BATCH_SPEC)
        state = jax.device_put(state, st_sh)
        gb = {k: jax.device_put(v, b_sh) for k, v in batch.items()}
        step = jit_train_step(fn, st_sh, b_sh)
        t0 = time.perf_counter()
        new, m = step(state, gb)
        jax.block_until_ready(m)
        print(f"{name}: {time.perf_counter() - t0:.0f} s (compile + step)", file=sys.stderr, flush=True)
        kernel = new.params["memory_attention"]["layers"][0]["linear1"]["kernel"]
        out = {
            "loss": np.asarray(m["loss"]),
            "grads": jax.tree.map(np.asarray, m["grads"]),
            "params": jax.tree.map(np.asarray, new.params),
            "kernel_spec": str(kernel.sharding.spec),
            "kernel_shard": list(kernel.addressable_shards[0].data.shape),
        }
        del step, new, m, state, gb
        jax.clear_caches()  # one mesh's compiled program at a time (each holds GBs while compiling on CPU)
        gc.collect()
        if ref is None:
            ref = out
            results[name] = {"loss": float(out["loss"]), "grad_max": float(max(
                np.abs(g).max() for g in jax.tree.leaves(out["grads"])))}
            continue
        paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref["grads"])[0]]
        g_all = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref["grads"]))
        # Per tensor: max |g - g_ref| / (max |g_ref| + 1e-6 * G), G = the model's largest gradient entry (tensors
        # whose exact gradient is 0 hold only rounding noise on both sides; see tests/test_train_torch.py).
        gerr = [float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6 * g_all))
                for a, b in zip(jax.tree.leaves(out["grads"]), jax.tree.leaves(ref["grads"]))]
        perr = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(ref["params"]))]
        # Where the gradient is >= 1 % of its tensor's largest entry, Adam's first-step sign is stable.
        stable_err, moved = [], []
        for a, b, g, p0 in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(ref["params"]),
                               jax.tree.leaves(ref["grads"]), jax.tree.leaves(jax.tree.map(np.asarray, params))):
            m = np.abs(g) >= 0.01 * np.abs(g).max()
            if np.abs(g).max() > 1e-6 * g_all and m.any():
                stable_err.append(float(np.abs(a - b)[m].max()))
                moved.append(float(np.abs(b - p0)[m].min()))
        worst = sorted(zip(gerr, paths), reverse=True)[:5]
        results[name] = {
            "loss_err": float(abs(out["loss"] - ref["loss"])), "loss": float(out["loss"]),
            "grad_rel_err_max": max(gerr), "grad_rel_err_median": float(np.median(gerr)),
            "grad_worst": [(round(e, 8), p) for e, p in worst],
            "param_err_max": max(perr), "param_worst": sorted(zip(perr, paths), reverse=True)[:3],
            "param_stable_err_max": max(stable_err), "param_moved_min": min(moved), "lr": LR,
            "n_tensors": len(gerr),
            "kernel_spec": out["kernel_spec"], "kernel_shard": out["kernel_shard"],
            "describe": sharding.describe(params, mesh),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
