"""Per-op time and GFLOP/s of the JAX image encoder or tracking scan on CPU, from ``jax.profiler``.

Each XLA kernel ("fusion") of the compiled program is timed by the profiler over ``--repeats`` calls and
matched to its HLO computation, whose dot FLOPs give a GFLOP/s per kernel; kernels inside loops run once per
iteration, so their FLOPs are per call and their rate is a lower bound there. Pin to one core with
``taskset -c 0`` to compare against the one-core GEMM rate of ``benchmarks/roofline.py``.

Examples:
    taskset -c 0 python -m benchmarks.op_profile --part encoder --image-size 512
    python -m benchmarks.op_profile --part tracking --image-size 256 --top 20
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import tempfile

from benchmarks.common import check_image_sizes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", choices=["encoder", "tracking"], default="encoder",
                   help="encoder: one image through the image encoder; tracking: the scan over --frames frames")
    p.add_argument("--image-size", type=int, default=512, help="square frame size (multiple of 32)")
    p.add_argument("--frames", type=int, default=8, help="frames of the tracking scan (times are per frame)")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls")
    p.add_argument("--top", type=int, default=30, help="kernels listed")
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="model name (random weights)")
    return p.parse_args(argv)


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(v) for v in m.group(1).split(",") if v] if m else []


def dot_flops(hlo: str) -> dict[str, float]:
    """FLOPs of the dots in each named computation of an HLO module's text."""
    flops: dict[str, float] = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S):
        shapes: dict[str, list[int]] = {}
        total = 0.0
        for line in m.group(2).split("\n"):
            mm = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w+)\((.*)", line)
            if not mm:
                continue
            name, shape, op, rest = mm.groups()
            shapes[name] = _dims(shape)
            if op == "dot":
                lhs = shapes.get(re.findall(r"%([\w.\-]+)", rest.split(")")[0])[0], [])
                k = 1
                for c in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1).split(","):
                    k *= lhs[int(c)] if c else 1
                n = 1
                for d in shapes[name]:
                    n *= d
                total += 2.0 * n * k
        flops[m.group(1)] = total
    return flops


def main(argv=None) -> int:
    args = parse_args(argv)
    check_image_sizes([args.image_size], "--image-size")
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx

    from medsam2_jax import api, tracking
    from medsam2_jax.memory import bank as bank_lib

    s = args.image_size
    model = api.random_model(args.model, s, 0)
    graphdef, state = nnx.split(model)
    if args.part == "encoder":
        per = 1
        x = jax.random.normal(jax.random.key(1), (1, s, s, 3))
        fn = jax.jit(lambda st, a: tracking._encode_chunk(nnx.merge(graphdef, st), a))
    else:
        per = args.frames
        cfg = tracking.TrackerConfig(bank=bank_lib.BankConfig.sam2_fifo())
        frames = jax.random.normal(jax.random.key(1), (per, s, s, 3))
        x = tracking.encode_frames(model, frames, batch=per)
        prompts = tracking.make_prompts([[{"frame": 0, "points": [[s / 2, s / 2]], "labels": [1]}]],
                                        num_frames=per, image_size=s, config=cfg)
        fn = jax.jit(lambda st, f: tracking.propagate(nnx.merge(graphdef, st), f, prompts, jax.random.key(0),
                                                      cfg, "forward"))
    jax.block_until_ready(fn(state, x))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(args.repeats):
            jax.block_until_ready(fn(state, x))
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(("ThunkExecutor", "$", "end: ")):
            ms[e["name"]] += e.get("dur", 0) / 1e3 / args.repeats / per
    hlo = fn.lower(state, x).compile().as_text()
    fusions = re.findall(r"%([\w.\-]+) = (\S+) fusion\(.*?calls=%([\w.\-]+)", hlo)
    calls = {n: c for n, _, c in fusions}
    shapes = {n: sh.split("{")[0] for n, sh, _ in fusions}
    flops = dot_flops(hlo)
    kernels = [(t, n, flops.get(calls[n], 0.0) / 1e9) for n, t in ms.items() if n in calls]
    total = sum(t for t, _, _ in kernels)
    with_dots = sum(t for t, _, gf in kernels if gf > 0)
    print(f"{args.model} {args.part} at {s} px: {total:.1f} ms per frame in XLA fusions "
          f"({args.repeats} profiled calls); {100 * with_dots / total:.0f} % in fusions with a matmul, "
          f"{100 * (1 - with_dots / total):.0f} % in the rest")
    note = "" if args.part == "encoder" else " (per loop iteration: a rate is not given)"
    print(f"| ms / frame | GFLOP (dots){note} | GFLOP/s | output | fusion |")
    print("|---|---|---|---|---|")
    for t, n, gf in sorted(kernels, reverse=True)[: args.top]:
        rate = f"{gf / t * 1e3:.0f}" if gf and args.part == "encoder" else ""
        print(f"| {t:.2f} | {gf:.3f} | {rate} | {shapes[n]} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
