"""Training-step memory against the number of frames, with and without rematerialisation.

    python -m benchmarks.train_memory                        # 128 px, T = 2 4 8, batch 1
    python -m benchmarks.train_memory --image-size 256 --frames 4 8 16

For each T, the training step (forward, SAM 2's loss, backward, AdamW) is compiled for a random SAM 2.1 tiny
and XLA's memory analysis of the compiled program is read: ``temp`` is the scratch memory the step needs
beyond its arguments and outputs (saved activations live there). With ``remat`` (``train_mode(remat=True)``
for the image encoder and ``TrackerConfig.remat`` for the tracking scan) the part that grows with T is the
frames' features and the scan's small per-step carry, not every layer's activations. Compiles only (no
step is run), so it is cheap in time; results in benchmarks/results/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(image_size: int, frames: int, batch: int, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medsam2_jax import api, tracking
    from medsam2_jax.train import optim
    from medsam2_jax.train.step import init_state, make_train_step, tracker_config, train_mode

    model = api.random_model("sam2.1_hiera_t", image_size)
    train_mode(model, remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, sched = optim.make_optimizer(params, lr=1e-4, total_steps=10)
    tcfg = tracker_config(tracking.TrackerConfig(max_cond_frames=3, cond_slots="max"), remat=remat)
    step = make_train_step(graphdef, rest, tx, tcfg, schedule=sched)
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    s, t, b = image_size, frames, batch
    sds = jax.ShapeDtypeStruct
    batch_spec = {"images": sds((b, t, s, s, 3), jnp.float32), "masks": sds((b, t, s, s), jnp.bool_),
                  "frame_valid": sds((b, t), jnp.bool_), "point_coords": sds((b, t, 8, 2), jnp.float32),
                  "point_labels": sds((b, t, 8), jnp.int32), "mask_inputs": sds((b, t, s, s), jnp.float32),
                  "mask_valid": sds((b, t), jnp.bool_), "prompted": sds((b, t), jnp.bool_)}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch_spec).compile()
    mem = compiled.memory_analysis()
    return {"frames": t, "remat": remat, "compile_s": time.perf_counter() - t0,
            "temp_mib": mem.temp_size_in_bytes / 2**20, "argument_mib": mem.argument_size_in_bytes / 2**20,
            "output_mib": mem.output_size_in_bytes / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--image-size", type=int, default=128, help="S, a multiple of 32")
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8], help="sequence lengths T")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--out", default="benchmarks/results/train_memory.json")
    a = ap.parse_args(argv)
    from benchmarks.common import machine_info

    rows = []
    for remat in (False, True):
        for t in a.frames:
            r = measure(a.image_size, t, a.batch, remat)
            print(f"remat={remat!s:5} T={t:3d}: temp {r['temp_mib']:8.1f} MiB (arguments {r['argument_mib']:.0f} MiB, "
                  f"compile {r['compile_s']:.0f} s)", flush=True)
            rows.append(r)
    res = {"machine": machine_info(), "image_size": a.image_size, "batch": a.batch, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
