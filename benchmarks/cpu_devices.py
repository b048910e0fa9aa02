"""Ways of keeping a CPU's cores busy, measured: the image encoder split over virtual CPU devices, and tracking
on one device while another encodes.

JAX only (no PyTorch): each mode times the same work done two ways in one process and prints ms per frame.
Virtual CPU devices must exist before JAX's backend starts, so ``--devices`` sets ``jax_num_cpu_devices``
first; run the script once per device count to compare (e.g. ``--devices 1`` and ``--devices 2``).

Examples:
    python -m benchmarks.cpu_devices --mode encode --devices 1 --image-size 512
    python -m benchmarks.cpu_devices --mode encode --devices 2 --image-size 512
    python -m benchmarks.cpu_devices --mode overlap --image-size 256   # tracker on cpu:0, encoder on cpu:1
"""

from __future__ import annotations

import argparse
import pathlib
import time

from benchmarks.common import check_image_sizes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["encode", "overlap"], default="encode",
                   help="encode: encode_frames over --devices devices; overlap: propagation on cpu:0 and encoding "
                        "on cpu:1 one after the other vs at once")
    p.add_argument("--devices", type=int, default=1, help="virtual CPU devices (mode encode; overlap uses 2)")
    p.add_argument("--image-size", type=int, default=256, help="square frame size (multiple of 32)")
    p.add_argument("--frames", type=int, default=8, help="frames per timed call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (the fastest is reported)")
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="model name (random weights)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=ROOT / ".jax_cache",
                   help="persistent JAX compilation cache")
    return p.parse_args(argv)


def best_ms_per_frame(fn, repeats: int, frames: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times) / frames


def main(argv=None) -> int:
    args = parse_args(argv)
    check_image_sizes([args.image_size], "--image-size")
    if args.devices < 1 or args.frames < 1 or args.repeats < 1:
        raise SystemExit("--devices, --frames and --repeats must be >= 1")
    import jax

    jax.config.update("jax_num_cpu_devices", 2 if args.mode == "overlap" else args.devices)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir.resolve()))
    from flax import nnx

    from medsam2_jax import api, tracking
    from medsam2_jax.memory import bank as bank_lib

    s, t = args.image_size, args.frames
    model = api.random_model(args.model, s, 0)
    cfg = tracking.TrackerConfig(bank=bank_lib.BankConfig.sam2_fifo())
    frames = jax.random.normal(jax.random.key(1), (t, s, s, 3))
    head = f"{args.model} S={s} T={t} mode={args.mode}"
    if args.mode == "encode":
        per_device = -(-t // args.devices)  # one call: --frames split over the devices
        ms = best_ms_per_frame(lambda: tracking.encode_frames(model, frames, batch=per_device, devices=args.devices),
                               args.repeats, t)
        print(f"{head} devices={args.devices}: encode {ms:.1f} ms/frame")
        return 0

    graphdef, state = nnx.split(model)
    feats = tracking.encode_frames(model, frames, batch=t)
    prompts = tracking.make_prompts([[{"frame": 0, "points": [[s / 2, s / 2]], "labels": [1]}]], num_frames=t,
                                    image_size=s, config=cfg)
    key = jax.random.key(0)

    @jax.jit
    def encode(st, x):
        return tracking._encode_chunk(nnx.merge(graphdef, st), x)

    @jax.jit
    def propagate(st, f):
        return tracking.propagate(nnx.merge(graphdef, st), f, prompts, key, cfg, "forward")

    d0, d1 = jax.devices()[:2]
    st1, fr1 = jax.device_put(state, d1), jax.device_put(frames, d1)
    enc = best_ms_per_frame(lambda: encode(st1, fr1), args.repeats, t)
    prop = best_ms_per_frame(lambda: propagate(state, feats), args.repeats, t)
    both = best_ms_per_frame(lambda: (encode(st1, fr1), propagate(state, feats)), args.repeats, t)
    print(f"{head}: encode on {d1} {enc:.1f} + propagate on {d0} {prop:.1f} = {enc + prop:.1f} ms/frame "
          f"one after the other; {both:.1f} ms/frame at once ({100 * (1 - both / (enc + prop)):.0f} % less)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
