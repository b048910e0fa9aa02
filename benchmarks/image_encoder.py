"""Image-encoder throughput: the Flax port (jitted) against the PyTorch reference (eager), one run.

Both frameworks run the same SAM 2 image encoder (Hiera trunk + FPN neck) with the same weights (the
PyTorch random init, copied into the Flax model through the project's strict key map), in float32, on the
same random images, on this machine. Runs alternate between the two frameworks so that load from other
processes hits both alike; the median wall time per call gives frames/s. JAX's trace + compile time is
measured separately (ahead-of-time ``lower().compile()``) and is not part of the throughput. The outputs of
the two are compared as a sanity check. Results go to a JSON file and a table on stdout.

Example:
    python -m benchmarks.image_encoder                       # tiny at 512, batch 1 and 8
    python -m benchmarks.image_encoder --models sam2.1_hiera_t sam2.1_hiera_b+ --image-sizes 512 1024 \\
        --batch-sizes 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

from benchmarks.common import check_image_sizes, machine_info, note_load, write_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Frames/s of the SAM 2 image encoder: medsam2_jax (jax.jit) vs the PyTorch sam2 package (eager), "
            "same machine, model, image size, batch and weights, float32, in one run. Needs torch and sam2."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="The table is also written as JSON (--out). Close other CPU-heavy programs for stable numbers.",
    )
    p.add_argument("--models", nargs="+", default=["sam2.1_hiera_t"],
                   help="model names or aliases (sam2.1_hiera_t/s/b+/l, sam2_hiera_*, sam2.1_hiera_tiny, ...)")
    p.add_argument("--image-sizes", nargs="+", type=int, default=[512],
                   help="square input sizes S (multiples of 32)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="images per call")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per framework and setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per framework before timing")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads; 0 keeps torch's default (one per core)")
    p.add_argument("--matmul-precision", default="highest", choices=["default", "high", "highest"],
                   help="jax_default_matmul_precision (highest = plain float32, as PyTorch on CPU)")
    p.add_argument("--images-per-step", default="auto",
                   help="images the JAX encoder runs at once (ImageEncoder.images_per_step): 'auto' = the "
                        "library default (1 on CPU, the whole batch on GPU/TPU), 0 = the whole batch, or N")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "image_encoder.json",
                   help="JSON file to write")
    return p.parse_args(argv)


def _config_path(name: str) -> str:
    from medsam2_jax.model.sizes import get_spec

    canonical = get_spec(name).name
    folder = "sam2.1" if canonical.startswith("sam2.1") else "sam2"
    return f"configs/{folder}/{canonical}.yaml"


def build_pair(name: str, seed: int):
    """The PyTorch ``image_encoder`` of ``name`` (random init, eval) and the Flax encoder with its weights."""
    import torch
    from flax import nnx
    from sam2.build_sam import build_sam2

    from medsam2_jax.model.fpn import build_image_encoder
    from medsam2_jax.interop.weights import load_state_dict

    torch.manual_seed(seed)
    model = build_sam2(_config_path(name), None, device="cpu", mode="eval", apply_postprocessing=False,
                       hydra_overrides_extra=["++model.compile_image_encoder=false"])
    torch_enc = model.image_encoder.eval()
    sd = {k: v.detach().float().numpy() for k, v in torch_enc.state_dict().items()}
    jax_enc = build_image_encoder(name, rngs=nnx.Rngs(seed))
    load_state_dict(jax_enc, sd, source="PyTorch image_encoder")
    return torch_enc, jax_enc


def bench_setting(torch_enc, jax_enc, size: int, batch: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    rng = np.random.default_rng(args.seed + size + batch)
    x_np = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    x_jax = jax.device_put(jnp.asarray(x_np))
    x_torch = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))

    graphdef, state = nnx.split(jax_enc)

    @jax.jit
    def encode(state, x):
        return nnx.merge(graphdef, state)(x)

    def run_jax():
        t0 = time.perf_counter()
        out = encode(state, x_jax)
        jax.block_until_ready(out)
        return time.perf_counter() - t0, out

    def run_torch():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = torch_enc(x_torch)
        return time.perf_counter() - t0, out

    t0 = time.perf_counter()
    encode.lower(state, x_jax).compile()  # trace + lower + XLA compile, timed on its own
    compile_s = time.perf_counter() - t0
    first_call_s, out_jax = run_jax()  # the jitted function reuses that executable
    _, out_torch = run_torch()
    ref = out_torch["vision_features"].numpy().transpose(0, 2, 3, 1)
    max_diff = float(np.max(np.abs(np.asarray(out_jax["vision_features"]) - ref)))
    for _ in range(args.warmup):
        run_jax()
        run_torch()
    tj, tt = [], []
    for _ in range(args.repeats):
        tj.append(run_jax()[0])
        tt.append(run_torch()[0])
    cache_size = encode._cache_size()
    if cache_size != 1:
        raise RuntimeError(f"the jitted encoder was compiled {cache_size} times for one input shape")
    jm, tm = statistics.median(tj), statistics.median(tt)
    return {
        "image_size": size,
        "batch": batch,
        "jax": {"median_s": jm, "min_s": min(tj), "fps": batch / jm, "first_call_s": first_call_s,
                "compile_s": compile_s, "times_s": tj, "compilations": cache_size},
        "torch": {"median_s": tm, "min_s": min(tt), "fps": batch / tm, "times_s": tt},
        "speedup": tm / jm,  # frames/s ratio JAX / PyTorch from the medians
        "speedup_best": min(tt) / min(tj),  # from the fastest call of each (least disturbed by other load)
        "max_abs_diff_vision_features": max_diff,
    }


def format_table(rows: list[dict]) -> str:
    head = ("model", "size", "batch", "JAX img/s", "PyTorch img/s", "JAX/PyTorch", "best-of-run ratio",
            "JAX compile s", "max abs diff")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['jax']['fps']:.2f} | {r['torch']['fps']:.2f} | "
            f"{r['speedup']:.2f}x | {r['speedup_best']:.2f}x | {r['jax']['compile_s']:.1f} | "
            f"{r['max_abs_diff_vision_features']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import torch

    from medsam2_jax.model.sizes import get_spec

    check_image_sizes(args.image_sizes)
    for b in args.batch_sizes:
        if b <= 0:
            raise SystemExit(f"--batch-sizes: {b} is not a positive batch size")
    if args.images_per_step == "auto":
        args.images_per_step = None
    else:
        try:
            args.images_per_step = int(args.images_per_step)
            if args.images_per_step < 0:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--images-per-step: expected 'auto' or an int >= 0, got {args.images_per_step!r}")
    try:
        names = [get_spec(m).name for m in args.models]
    except ValueError as e:
        raise SystemExit(f"--models: {e}")
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)


    info = machine_info()
    load_before = os.getloadavg()
    rows = []
    for name in names:
        torch_enc, jax_enc = build_pair(name, args.seed)
        jax_enc.images_per_step = args.images_per_step
        for size in args.image_sizes:
            for batch in args.batch_sizes:
                r = bench_setting(torch_enc, jax_enc, size, batch, args)
                r["model"] = name
                rows.append(r)
                print(f"{name} S={size} B={batch}: JAX {r['jax']['fps']:.2f} img/s, PyTorch {r['torch']['fps']:.2f} "
                      f"img/s ({r['speedup']:.2f}x), JAX compile {r['jax']['compile_s']:.1f} s", flush=True)
    load_after = os.getloadavg()
    table = format_table(rows)
    print()
    print(table)
    note_load(load_before, load_after, "and the ratio is biased towards JAX: PyTorch's OpenMP threads lose more than "
              "XLA's thread pool when the cores are oversubscribed")
    result = {
        "dtype": "float32",
        "jax_matmul_precision": args.matmul_precision,
        "jax_images_per_step": "auto" if args.images_per_step is None else args.images_per_step,
        "jax_backend": jax.default_backend(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": ("median wall time per call, JAX and PyTorch calls alternating; img/s = batch / median; "
                   "best-of-run ratio from the fastest call of each; "
                   "JAX compile = jit(...).lower().compile() wall time"),
    }
    write_run(args.out, "image_encoder", argv, result, info, load_before, load_after, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
