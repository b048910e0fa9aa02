"""Tracking throughput: the JAX tracker against PyTorch's ``SAM2VideoPredictor``, same machine, one run.

A volume-like sequence (a synthetic CT phantom, ``--frames`` axial slices) is tracked forward from a click on
its first slice by both frameworks with the same weights (the PyTorch random init with its object-score bias
raised by 2 so that the object counts as present and the masks are real logits, converted through the
project's strict key map), in float32, with SAM 2's own memory (``BankConfig.sam2_fifo()``, so both do the
same work: the prompted frame, the 6 most recent frames, 16 object pointers).

Three phases are timed for each framework, in the same runs:

* ``encode``: the image encoder over every slice (JAX: :func:`medsam2_jax.tracking.encode_frames`, batched;
  PyTorch: the predictor's own per-frame ``forward_image`` calls during propagation);
* ``propagate``: everything else — the prompted frame, memory attention, SAM heads, memory encoder, bank
  update and the resize of every mask to the slice size (JAX: the jitted ``lax.scan``);
* ``total``: both, i.e. what a user waits for (PyTorch's ``init_state`` JPEG loading is not counted).

Runs alternate between the two frameworks so that other load on the machine hits both alike; frames/s come
from the median run. JAX's first call of each phase (trace + compile, or loading from the persistent
compilation cache) is reported apart and not counted. The two outputs are compared as a sanity check (max
abs difference of the low-res mask logits, min IoU of the binarised masks).

Examples:
    python -m benchmarks.tracking                                   # tiny, 64 slices at 256 and 512
    python -m benchmarks.tracking --image-sizes 256 --frames 16 --repeats 3
    python -m benchmarks.tracking --single-thread                   # per-core comparison on a shared machine
    python -m benchmarks.tracking --encode-devices 2                # encoder frames split over 2 CPU devices
    python -m benchmarks.tracking --image-sizes 1024 --no-torch --matmul-precision default  # a GPU, fp32/TF32
    python -m benchmarks.tracking --image-sizes 1024 --dtype bfloat16 --no-torch --peak-tflops 989  # a GPU

On a GPU machine the sam2 package (CPU torch) is no reference for speed: use --no-torch there.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

from benchmarks.common import check_image_sizes, machine_info, note_load, write_run

ROOT = pathlib.Path(__file__).resolve().parents[1]

PHASES = ("encode", "propagate", "total")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Frames/s of tracking one object through a volume-like sequence: medsam2_jax (encode_frames + "
            "jitted lax.scan propagation) vs PyTorch's SAM2VideoPredictor, same machine, model, slices, "
            "prompt and weights, in one run. Needs torch and sam2 unless --no-torch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=(
            "Writes a JSON file (--out) and prints a markdown table (frames/s per phase, JAX/PyTorch ratio, JAX "
            "compile seconds). The persistent JAX compilation cache is on (--cache-dir), so a second run reports "
            "the cache load instead of the compile. Close other CPU-heavy programs for stable numbers."
        ),
    )
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="model name or alias (sam2.1_hiera_t/s/b+/l, ...)")
    p.add_argument("--image-sizes", nargs="+", type=int, default=[256, 512],
                   help="square slice sizes S (multiples of 32)")
    p.add_argument("--frames", type=int, default=64, help="slices in the sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per framework and size (after the first)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="JAX compute type: bfloat16 casts the frames and the image encoder's parameters "
                        "(tracking.BF16_MODULES; the memory path and heads stay float32). PyTorch always runs "
                        "float32, so use bfloat16 with --no-torch or read the ratio accordingly")
    p.add_argument("--bank", default="fifo", choices=["fifo", "self_sorting"],
                   help="JAX memory policy: fifo = SAM 2's (same work as PyTorch), self_sorting = the paper's")
    p.add_argument("--max-cond-frames", type=int, default=None,
                   help="TrackerConfig.max_cond_frames (static prompted-frame slots; default: the tracker's)")
    p.add_argument("--encode-batch", type=int, default=None,
                   help="TrackerConfig.encode_batch (frames per image-encoder call; default: the tracker's)")
    p.add_argument("--encode-devices", type=int, default=1,
                   help="TrackerConfig.encode_devices: local devices the image encoder's frames are split over "
                        "(0 = all). On CPU this many virtual CPU devices are created (jax_num_cpu_devices; 0 = one "
                        "per core): each encodes its own frames, which keeps the cores busier than one device's "
                        "intra-op threads do")
    p.add_argument("--no-torch", action="store_true", help="time JAX only (e.g. on a GPU machine)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads; 0 keeps torch's default (one per core)")
    p.add_argument("--single-thread", action="store_true",
                   help="run both frameworks on one core (the process is pinned to one CPU and "
                        "torch.set_num_threads(1)): the per-core comparison, unaffected by how each runtime "
                        "copes with other load")
    p.add_argument("--matmul-precision", default="highest", choices=["default", "high", "highest"],
                   help="jax_default_matmul_precision (highest = plain float32 as PyTorch on CPU; on a GPU "
                        "'default' allows TF32)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the chip's peak TFLOP/s for --dtype; if given, the table adds the fraction of peak "
                        "reached by the encoder (from XLA's cost analysis)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=ROOT / ".jax_cache",
                   help="persistent JAX compilation cache directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the phantom")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "tracking.json",
                   help="JSON file to write")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs
def volume_frames(size: int, frames: int, seed: int):
    """A CT phantom as (T, S, S, 3) normalised slices and a positive click on the tube in slice 0."""
    import numpy as np

    from medsam2_jax.data.phantoms import make_phantom
    from medsam2_jax.model.sam2 import normalize_images

    depth = max(frames, 8)  # the phantom needs >= 8 slices; extra ones are dropped below
    hu, labels, _ = make_phantom(seed, "ct", shape=(size, size, depth), spacing=(0.8, 0.8, 2.5))
    hu, labels = hu[:, :, :frames], labels[:, :, :frames]
    win = np.clip((hu + 160.0) / 400.0, 0.0, 1.0)  # soft-tissue window [-160, 240] HU -> [0, 1]
    slices = np.transpose(win, (2, 1, 0))  # (x, y, z) -> (z, y, x): one frame per axial slice
    x = np.asarray(normalize_images(np.repeat(slices[..., None], 3, axis=-1)), np.float32)
    first = np.transpose(labels[:, :, 0])  # (y, x)
    ys, xs = np.nonzero(first == 5)  # the tube (label 5) runs through every slice
    if len(ys) == 0:
        point = [size / 2.0, size / 2.0]
    else:
        i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # a tube pixel nearest its centroid
        point = [float(xs[i]), float(ys[i])]
    return x, [{"frame": 0, "points": [point], "labels": [1]}]


def build_models(name: str, size: int, seed: int, need_torch: bool):
    """(PyTorch video predictor or None, the JAX model with the same weights)."""
    from medsam2_jax import api

    if not need_torch:
        # Same construction as the PyTorch side would convert to, without torch: a random JAX model.
        return None, api.random_model(name, size, seed)
    import torch

    from medsam2_jax.interop import torch_checkpoint, torch_models

    torch.manual_seed(seed)
    predictor = torch_models.build_torch_model(name, size, video=True)
    with torch.no_grad():
        # Random weights leave the object "absent" (masks -1024); +2 makes it present, as in the tests.
        predictor.sam_mask_decoder.pred_obj_score_head.layers[2].bias += 2.0
    sd = {k: v.detach().float().numpy() for k, v in predictor.state_dict().items()}
    return predictor, torch_checkpoint.convert_state_dict(sd, name, size, source="PyTorch random init")


# ---------------------------------------------------------------------------------------------- runs
def make_jax_runner(model, frames_np, prompts, args):
    import jax
    import jax.numpy as jnp

    from medsam2_jax import tracking
    from medsam2_jax.memory import bank as bank_lib
    from medsam2_jax.model.sam2 import resize_bilinear

    kw = {}
    if args.max_cond_frames is not None:
        kw["max_cond_frames"] = args.max_cond_frames
    if args.encode_batch is not None:
        kw["encode_batch"] = args.encode_batch
    kw["encode_devices"] = args.encode_devices
    bank = bank_lib.BankConfig.sam2_fifo() if args.bank == "fifo" else bank_lib.BankConfig()
    cfg = tracking.TrackerConfig(bank=bank, **kw)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if dtype != jnp.float32:
        model = tracking.cast_model(model, dtype)
    frames = jax.device_put(jnp.asarray(frames_np, dtype))
    t, s = frames.shape[0], frames.shape[1]
    p = tracking.make_prompts([prompts], num_frames=t, image_size=s, config=cfg)
    key = jax.random.key(args.seed)

    def run():
        c0, t0 = time.process_time(), time.perf_counter()
        feats = tracking.encode_frames(model, frames, batch=cfg.encode_batch, devices=cfg.encode_devices)
        jax.block_until_ready(feats)
        c1, t1 = time.process_time(), time.perf_counter()
        out = tracking.propagate_jit(model, feats, p, config=cfg, direction="forward", key=key)
        out["mask_logits"] = resize_bilinear(out["low_res_masks"], (s, s), antialias=False)
        jax.block_until_ready(out)
        c2, t2 = time.process_time(), time.perf_counter()
        return {"encode": t1 - t0, "propagate": t2 - t1, "total": t2 - t0,
                "cpu": {"encode": c1 - c0, "propagate": c2 - c1, "total": c2 - c0}}, out

    return run, cfg, model, frames


def make_torch_runner(predictor, frames_np, prompts):
    import torch

    from medsam2_jax.interop import parity

    def run():
        c0 = time.process_time()
        with torch.inference_mode():
            ref = parity.torch_video_track(predictor, frames_np, prompts, "forward")
        cpu = time.process_time() - c0  # includes init_state's placeholder JPEGs (small next to the rest)
        tm = ref["timing"]
        return {"encode": tm["encode_s"], "propagate": tm["total_s"] - tm["encode_s"], "total": tm["total_s"],
                "cpu": {"total": cpu}}, ref

    return run


def encoder_flops(model, frames, cfg) -> float:
    """FLOPs of one image-encoder batch call from XLA's cost analysis (0 if unavailable)."""
    from flax import nnx

    from medsam2_jax import tracking

    try:
        graphdef, state = nnx.split(model)
        x = frames[: cfg.encode_batch]
        compiled = tracking._encode_chunk_jit.lower(graphdef, state, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) * (-(-frames.shape[0] // cfg.encode_batch))
    except Exception:  # cost analysis is best effort and backend dependent
        return 0.0


def bench_size(size: int, args) -> dict:
    import numpy as np

    from medsam2_jax import tracking
    from medsam2_jax.interop import parity

    frames_np, prompts = volume_frames(size, args.frames, args.seed)
    predictor, model = build_models(args.model, size, args.seed, not args.no_torch)
    run_jax, cfg, jmodel, jframes = make_jax_runner(model, frames_np, prompts, args)
    run_torch = None if predictor is None else make_torch_runner(predictor, frames_np, prompts)

    traces0 = tracking._propagate_jit._cache_size()
    first, out = run_jax()  # compile (or load from the persistent cache) + one run
    runs_j, runs_t = [], []
    ref = None
    for _ in range(args.repeats):
        runs_j.append(run_jax()[0])
        if run_torch is not None:
            tm, ref = run_torch()
            runs_t.append(tm)
    compiles = tracking._propagate_jit._cache_size() - traces0
    if compiles > 1:
        raise RuntimeError(f"propagation was compiled {compiles} times for one sequence shape")

    def summary(runs):
        res = {}
        for ph in PHASES:
            times = [r[ph] for r in runs]
            med = statistics.median(times)
            res[ph] = {"median_s": med, "min_s": min(times), "fps": args.frames / med, "times_s": times}
            if ph in runs[0]["cpu"]:
                res[ph]["cpu_s"] = statistics.median([r["cpu"][ph] for r in runs])
        return res

    row = {"image_size": size, "frames": args.frames, "jax": summary(runs_j)}
    row["jax"]["compile_s"] = {ph: max(first[ph] - row["jax"][ph]["median_s"], 0.0) for ph in ("encode", "propagate")}
    if args.peak_tflops > 0:
        flops = encoder_flops(jmodel, jframes, cfg)
        row["jax"]["encode_tflops"] = flops / row["jax"]["encode"]["median_s"] / 1e12
        row["jax"]["encode_fraction_of_peak"] = row["jax"]["encode_tflops"] / args.peak_tflops
    if runs_t:
        row["torch"] = summary(runs_t)
        row["speedup"] = {ph: row["torch"][ph]["median_s"] / row["jax"][ph]["median_s"] for ph in PHASES}
        row["speedup_best"] = {ph: row["torch"][ph]["min_s"] / row["jax"][ph]["min_s"] for ph in PHASES}
        # Process CPU time of a whole run (both single-threaded: the work done, whatever else runs beside)
        row["speedup_cpu_time_total"] = row["torch"]["total"]["cpu_s"] / row["jax"]["total"]["cpu_s"]
        low = np.asarray(out["low_res_masks"][0], np.float32)
        vis = ref["visited"]
        row["max_abs_diff_low_res_logits"] = float(np.abs(low[vis] - ref["low_res_masks"][vis]).max())
        row["min_mask_iou"] = float(min(parity.mask_iou(np.asarray(out["mask_logits"][0, f]),
                                                        ref["video_res_masks"][f]) for f in np.nonzero(vis)[0]))
        row["foreground_fraction"] = float((ref["video_res_masks"][vis] > 0).mean())
    return row


# ---------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict], model: str, dtype: str) -> str:
    torch_on = any("torch" in r for r in rows)
    head = ["model", "size", "slices", "dtype", "phase", "JAX frames/s"]
    if torch_on:
        head += ["PyTorch frames/s", "JAX/PyTorch", "best-of-run ratio", "CPU-time ratio"]
    head += ["JAX compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        for ph in PHASES:
            cells = [model, str(r["image_size"]), str(r["frames"]), dtype, ph, f"{r['jax'][ph]['fps']:.2f}"]
            if torch_on:
                cells += [f"{r['torch'][ph]['fps']:.2f}", f"{r['speedup'][ph]:.2f}x", f"{r['speedup_best'][ph]:.2f}x",
                          f"{r['speedup_cpu_time_total']:.2f}x" if ph == "total" else ""]
            comp = r["jax"]["compile_s"]
            cells.append(f"{comp[ph]:.1f}" if ph in comp else f"{sum(comp.values()):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_image_sizes(args.image_sizes)
    if args.frames < 1:
        raise SystemExit(f"--frames: {args.frames} must be >= 1")
    if args.repeats < 1:
        raise SystemExit(f"--repeats: {args.repeats} must be >= 1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the predictor's progress bars
    if args.single_thread:
        # Pin the process to one core before JAX and torch start their thread pools (threads inherit the
        # affinity). XLA's CPU runtime ignores the old --xla_cpu_multi_thread_eigen / intra_op flags (measured:
        # a 2048^2 matmul used 2 cores with them), so pinning is the only way to make JAX single-core.
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        args.torch_threads = 1
    if args.encode_devices < 0:
        raise SystemExit(f"--encode-devices: {args.encode_devices} must be >= 0 (0 = all)")
    import jax

    if args.encode_devices != 1:
        # Virtual CPU devices must exist before the backend starts (only the CPU backend reads this).
        jax.config.update("jax_num_cpu_devices", args.encode_devices or len(os.sched_getaffinity(0)))

    from medsam2_jax.model.sizes import get_spec

    try:
        name = get_spec(args.model).name
    except ValueError as e:
        raise SystemExit(f"--model-name: {e}")
    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if not args.no_torch and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    args.model = name


    info = machine_info()
    load_before = os.getloadavg()
    rows = []
    for size in args.image_sizes:
        r = bench_size(size, args)
        rows.append(r)
        msg = f"{name} S={size} T={args.frames}: JAX " + ", ".join(
            f"{ph} {r['jax'][ph]['fps']:.2f}" for ph in PHASES) + " frames/s"
        if "torch" in r:
            msg += "; PyTorch " + ", ".join(f"{ph} {r['torch'][ph]['fps']:.2f}" for ph in PHASES)
            msg += f"; total {r['speedup']['total']:.2f}x; max |diff| {r['max_abs_diff_low_res_logits']:.1e}"
        print(msg, flush=True)
    load_after = os.getloadavg()
    table = format_table(rows, name, args.dtype)
    print()
    print(table)
    if args.peak_tflops > 0:
        for r in rows:
            if "encode_tflops" in r["jax"]:
                print(f"S={r['image_size']}: encoder {r['jax']['encode_tflops']:.1f} TFLOP/s "
                      f"= {100 * r['jax']['encode_fraction_of_peak']:.1f}% of {args.peak_tflops} TFLOP/s")
    note_load(load_before, load_after)
    result = {
        "model": name,
        "dtype": args.dtype,
        "bank": args.bank,
        "single_thread": args.single_thread,
        "encode_devices": args.encode_devices,
        "jax_matmul_precision": args.matmul_precision,
        "repeats": args.repeats,
        "timing": ("median wall time per run over --repeats runs, JAX and PyTorch alternating; frames/s = slices / "
                   "median; best-of-run ratio from the fastest run of each; CPU-time ratio = PyTorch / JAX process "
                   "CPU time of a whole run (medians); JAX compile = first run - median"),
    }
    write_run(args.out, "tracking", argv, result, info, load_before, load_after, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
