"""How close each framework's tracking runs to this machine's float32 matmul throughput.

``benchmarks/tracking.py`` gives frames/s. This script says what those numbers mean on the machine: it measures
the float32 GEMM throughput both frameworks reach here (a square matmul, same thread setting), counts the
FLOPs of one frame with XLA's cost analysis (image encoder at batch 1; one tracking step: memory attention
over SAM 2's memory of 7 frames and 16 pointers, the SAM heads and the memory encoder), and reads the
per-frame times of a ``tracking.py`` result file. From them it prints, per phase:

* the **matmul-bound time**: FLOPs / GEMM throughput, what a perfect implementation could not beat here;
* each framework's **share of that bound** (bound time / measured time);
* the **largest JAX/PyTorch ratio possible**: PyTorch's measured time / the bound time.

The model's FLOPs are fixed by parity (the same network, in float32), so when the last column is below a
speed target, no implementation of this model reaches that target on this machine.

Examples:
    python -m benchmarks.roofline --results benchmarks/results/tracking.json
    python -m benchmarks.roofline --results benchmarks/results/tracking_single_core.json --single-core
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Matmul roofline of the tracking benchmark: GEMM GFLOP/s of JAX and PyTorch on this machine, "
                    "FLOPs per frame from XLA's cost analysis, and each framework's share of the bound.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--results", type=pathlib.Path, required=True,
                   help="a JSON written by benchmarks/tracking.py (its sizes, frames and per-phase times are used)")
    p.add_argument("--single-core", action="store_true",
                   help="pin to one core and use one torch thread (use with a --single-thread tracking result)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square matmul that measures GFLOP/s")
    p.add_argument("--out", type=pathlib.Path, default=None, help="write the numbers as JSON here")
    return p.parse_args(argv)


def best_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_gflops(n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja = jnp.asarray(a)
    f = jax.jit(jnp.matmul)
    t_jax = best_time(lambda: f(ja, ja).block_until_ready())
    ta = torch.from_numpy(a)
    t_torch = best_time(lambda: ta @ ta)
    flops = 2.0 * n**3
    # XLA counts a dot as 2*M*N*K as well (checked here, so the FLOP counts below are in the same unit).
    cost = f.lower(ja, ja).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if abs(float(cost["flops"]) - flops) > 1e-6 * flops:
        raise SystemExit(f"XLA's cost analysis counts {cost['flops']:.3g} FLOPs for a {n}^3 matmul, expected {flops:.3g}")
    return {"jax": flops / t_jax / 1e9, "torch": flops / t_torch / 1e9}


def frame_flops(model, size: int) -> dict:
    """FLOPs of one frame: the image encoder (batch 1) and one tracking step at SAM 2's full memory."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    g = size // 16
    n = g * g
    n_frames = model.num_maskmem  # the prompted frame + num_maskmem - 1 recent frames
    ptr_tokens = model.max_obj_ptrs_in_encoder * (model.hidden_dim // model.mem_dim)
    m = n_frames * n + ptr_tokens
    graphdef, state = nnx.split(model)

    def cost(fn, *args) -> float:
        c = jax.jit(fn).lower(state, *args).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return float(c["flops"])

    def encode(st, x):
        return nnx.merge(graphdef, st).encode_image(x)

    def step(st, curr, mem, top, hr0, hr1):
        mdl = nnx.merge(graphdef, st)
        pix = mdl.memory_attention(curr, curr, mem, mem, num_obj_ptr_tokens=ptr_tokens,
                                   memory_mask=jnp.ones(mem.shape[:2], bool))
        heads = mdl.sam_heads(pix.reshape(1, g, g, -1), [hr0, hr1], jnp.zeros((1, 1, 2)),
                              -jnp.ones((1, 1), jnp.int32), None)
        out = mdl.select_outputs(heads, True)
        return mdl.encode_memory(top, out["low_res_masks"], out["object_score_logits"], False)

    z = lambda *s: jnp.zeros(s, jnp.float32)
    # XLA's cost analysis counts a while loop's body once, so count with attention in one query block (the
    # CPU blocking of common.attention runs as a lax.map) and the encoder on the whole batch (one image).
    from medsam2_jax.model import common

    saved = common.CPU_SCORE_BLOCK
    common.CPU_SCORE_BLOCK = 1 << 62
    try:
        return {
            "encode": cost(encode, z(1, size, size, 3)),
            "propagate": cost(step, z(1, n, model.hidden_dim), z(1, m, model.mem_dim),
                              z(1, g, g, model.hidden_dim), z(1, 4 * g, 4 * g, model.hidden_dim // 8),
                              z(1, 2 * g, 2 * g, model.hidden_dim // 4)),
        }
    finally:
        common.CPU_SCORE_BLOCK = saved


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if not args.results.is_file():
        raise SystemExit(f"--results: {args.results} does not exist; run python -m benchmarks.tracking first")
    res = json.loads(args.results.read_text())
    if bool(res.get("single_thread")) != args.single_core:
        raise SystemExit(f"--results: {args.results} was measured with single_thread={res.get('single_thread')}; "
                         f"run this script {'with' if res.get('single_thread') else 'without'} --single-core")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(1 if args.single_core else (res["machine"].get("torch_threads") or os.cpu_count()))
    from medsam2_jax import api

    gemm = gemm_gflops(args.gemm_size)
    print(f"float32 {args.gemm_size}^3 matmul: JAX {gemm['jax']:.0f} GFLOP/s, PyTorch {gemm['torch']:.0f} GFLOP/s "
          f"({'one core' if args.single_core else f'{os.cpu_count()} cores'})")
    peak = max(gemm.values())
    rows = []
    for r in res["results"]:
        size, frames = r["image_size"], r["frames"]
        flops = frame_flops(api.random_model(res["model"], size, 0), size)
        flops["total"] = flops["encode"] + flops["propagate"]
        for phase in ("encode", "propagate", "total"):
            t_jax = r["jax"][phase]["median_s"] / frames
            t_torch = r["torch"][phase]["median_s"] / frames
            bound = flops[phase] / (peak * 1e9)
            rows.append({"image_size": size, "phase": phase, "gflop_per_frame": flops[phase] / 1e9,
                         "bound_ms": 1e3 * bound, "jax_ms": 1e3 * t_jax, "torch_ms": 1e3 * t_torch,
                         "jax_share": bound / t_jax, "torch_share": bound / t_torch,
                         "ratio": t_torch / t_jax, "max_ratio": t_torch / bound})
    lines = ["| size | phase | GFLOP / frame | matmul-bound ms | JAX ms (share) | PyTorch ms (share) | "
             "JAX/PyTorch | largest possible |", "|---|---|---|---|---|---|---|---|"]
    for w in rows:
        lines.append(f"| {w['image_size']} | {w['phase']} | {w['gflop_per_frame']:.1f} | {w['bound_ms']:.0f} | "
                     f"{w['jax_ms']:.0f} ({100 * w['jax_share']:.0f} %) | {w['torch_ms']:.0f} "
                     f"({100 * w['torch_share']:.0f} %) | {w['ratio']:.2f}x | {w['max_ratio']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"results_file": str(args.results), "gemm_gflops": gemm,
                                        "single_core": args.single_core, "rows": rows, "table_markdown": table},
                                       indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
