"""Training-step time and peak memory: the jitted JAX step against the equivalent PyTorch step, one run.

Both frameworks take the same optimisation step on the same batch with the same weights (the PyTorch random
init with its object-score bias raised by 4 so that the object is present and the masks carry gradients,
converted with the project's key map): encode the B*T frames, track each sequence from a click on frame 0
with SAM 2's FIFO memory (the prompted frame, the 6 most recent frames, the object pointers), SAM 2's loss
(focal x20 + Dice + IoU L1 + object-score BCE, best of the candidate masks), gradients through everything,
global-norm clipping at 0.1 and one AdamW update (lr 1e-4, weight decay 0.01). No dropout on either side
(the PyTorch forward is :mod:`medsam2_jax.interop.torch_reference` with :func:`training_mode`).

* JAX: :func:`medsam2_jax.train.step.make_train_step` with :func:`medsam2_jax.train.optim.make_optimizer`,
  one ``jax.jit`` with the state donated, compiled ahead of time (trace + compile, or a load from the
  persistent compilation cache) and reported apart.
* PyTorch: :func:`medsam2_jax.interop.torch_reference.loss_and_terms` on the ``sam2`` package's model,
  ``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW``.

Each framework lives in its own worker process, so that each one's memory is its own: peak memory is the
worker's resident-set high-water mark during the steps (VmHWM, reset right before the first step, so that
neither building the model nor XLA's compilation counts; it includes the model, the optimiser state and the
framework itself), reported with the RSS right before the first step, so ``peak - before`` is what the
steps add (activations kept for the backward pass, gradients, optimiser moments, XLA's buffers). Steps
alternate between the two workers (one JAX step, one PyTorch step, ...) so that other load on the machine
hits both alike, with a ``--pause`` between them (each framework's worker threads spin for a while after a
step; without the pause they slowed the other's step by up to a quarter); times are medians over
``--repeats`` steps after ``--warmup`` untimed ones (PyTorch's step keeps getting faster over its first
few steps: 8.9 s, 8.3, 7.6, 7.3, 6.8, 6.3 at 512 px, as glibc raises its mmap threshold to the sizes it has
seen freed).

Host memory: both workers run as ``train.py`` does (:mod:`medsam2_jax.host_memory`: glibc's malloc keeps
freed blocks for reuse; the JAX worker also hands the compiler's freed memory back after compiling). That is
the faster setting for both after the warm-up (T = 4: PyTorch 5.98 s instead of 6.67 at 512 px, 1.63 instead
of 1.71 at 256; JAX 1.3 s instead of 2.9 at 256); ``--jax-malloc`` / ``--torch-malloc default`` leave glibc's
malloc as it comes.

Compilation: a process that has compiled a large program runs it slower on this CPU than a process that
loaded the same program from the persistent compilation cache: 256 px, T = 8, 3.1-3.4 s against 2.4-2.7 s
per step in 18 standalone runs, the same executable either way (a copy serialised and loaded again in the
compiling process stays slow; scattering 2 million small malloc blocks before loading from the cache makes
it 2.9 s). So ``train.py`` compiles its step in a helper process on CPU
(:mod:`medsam2_jax.train.compile_ahead`), and by default (``--jax-compile helper``) so does this benchmark:
a first JAX worker compiles the step into an empty cache and exits, the measured one loads it.
``--jax-compile fresh`` measures a process that compiles its own step (a notebook calling the jitted step);
``--jax-compile cache`` loads from ``--cache-dir`` what an earlier run compiled.

Examples:
    python -m benchmarks.train_step                              # tiny, T=8, B=1, at 256 and 512 px
    python -m benchmarks.train_step --image-sizes 256 --frames 4 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import statistics
import tempfile
import time

from benchmarks.common import check_image_sizes, machine_info, note_load, write_run

ROOT = pathlib.Path(__file__).resolve().parents[1]

OBJECT_BIAS = 4.0
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=("Seconds per training step and peak memory: medsam2_jax's jitted step (make_train_step + "
                     "AdamW) vs the same step in PyTorch on the sam2 package's model, same batch and weights, "
                     "one run, alternating. Needs torch and sam2."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="model name (sam2.1_hiera_t/s/b+/l, ...)")
    p.add_argument("--image-sizes", nargs="+", type=int, default=[256, 512], help="frame sizes (multiples of 32)")
    p.add_argument("--frames", type=int, default=8, help="frames per sequence (T)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (B)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per framework and size")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per framework and size before them")
    p.add_argument("--matmul-precision", default="highest", choices=["default", "high", "highest"],
                   help="JAX's default matmul precision (float32 on CPU either way)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=ROOT / ".jax_cache",
                   help="persistent JAX compilation cache (used with --jax-compile cache)")
    p.add_argument("--jax-compile", choices=["helper", "fresh", "cache"], default="helper",
                   help="helper: a first JAX worker compiles the step into an empty cache and exits, and the "
                        "measured worker loads it from there, as train.py does on CPU (compile_in_subprocess); "
                        "fresh: the measured worker compiles the step itself (an empty cache), as a process "
                        "that calls the jitted step directly does; cache: it loads the step from --cache-dir "
                        "when an earlier run compiled it. The steps of a process that compiled the program "
                        "itself run slower on CPU (see the README); the JSON records which case was measured")
    p.add_argument("--jax-malloc", choices=["keep", "default"], default="keep",
                   help="keep: the JAX worker calls medsam2_jax.host_memory.keep_freed_memory() first, as train.py "
                        "does (freed blocks are reused, not unmapped and faulted in again each step); default: "
                        "glibc's malloc as it comes")
    p.add_argument("--torch-malloc", choices=["keep", "default"], default="keep",
                   help="the same for the PyTorch worker (after the warm-up its step is faster with keep too)")
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds between two steps, so that the last framework's worker threads have gone to "
                        "sleep before the other one's step starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        p.error(f"--warmup and --repeats must be >= 1 (got {args.warmup} and {args.repeats}): the first step "
                "pays first-touch costs and is never timed")
    return args


def make_batch(size: int, frames: int, batch: int, seed: int):
    """B copies (mirrored alternately) of a moving-disk clip, its disk masks and a click on frame 0."""
    import numpy as np

    from medsam2_jax.interop import parity
    from medsam2_jax.model.sam2 import normalize_images

    s, t = size, frames
    clip = np.asarray(normalize_images(parity.moving_disk_clip(s, t, seed)), np.float32)
    yy, xx = np.mgrid[:s, :s].astype(np.float32) / s
    masks = np.stack([(xx - (0.35 + 0.02 * f)) ** 2 + (yy - (0.4 + 0.015 * f)) ** 2 < 0.12 ** 2 for f in range(t)])
    images = np.stack([clip if i % 2 == 0 else clip[:, :, ::-1] for i in range(batch)])
    gt = np.stack([masks if i % 2 == 0 else masks[:, :, ::-1] for i in range(batch)])
    coords = np.zeros((batch, t, 1, 2), np.float32)
    labels = -np.ones((batch, t, 1), np.int32)
    for i in range(batch):
        x = 0.35 * s if i % 2 == 0 else s - 1 - 0.35 * s
        coords[i, 0, 0], labels[i, 0, 0] = (x, 0.4 * s), 1
    prompted = np.zeros((batch, t), bool)
    prompted[:, 0] = True
    return {"images": np.ascontiguousarray(images), "masks": np.ascontiguousarray(gt),
            "frame_valid": np.ones((batch, t), bool), "point_coords": coords, "point_labels": labels,
            "mask_inputs": np.zeros((batch, t, s, s), np.float32), "mask_valid": np.zeros((batch, t), bool),
            "prompted": prompted}


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0; else a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kb() -> tuple[int, int]:
    """(current RSS, RSS high-water) of this process in KiB, from /proc/self/status."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


# ------------------------------------------------------------------------------------------------ workers
def _host_malloc(mode: str) -> bool:
    from medsam2_jax.host_memory import keep_freed_memory

    return keep_freed_memory() if mode == "keep" else False


def torch_worker(conn, model_name: str, size: int, batch_file: str, weights_file: str, seed: int,
                 host_malloc: str) -> None:
    kept = _host_malloc(host_malloc)  # before torch starts its threads
    import numpy as np
    import torch

    from medsam2_jax.interop import torch_models
    from medsam2_jax.interop import torch_reference as tr
    from medsam2_jax.interop.torch_models import perturb_

    torch.manual_seed(seed)
    model = torch_models.build_torch_model(model_name, size)
    perturb_(model, seed)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias += OBJECT_BIAS
    np.savez(weights_file, **{k: v.detach().float().numpy() for k, v in model.state_dict().items()})
    tr.training_mode(model)
    batch = dict(np.load(batch_file))
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or p.ndim == 1)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    _reset_peak_rss()  # the peak below is the steps' (building the model is not counted)
    conn.send({"ready": True, "rss_kb": _rss_kb()[0], "threads": torch.get_num_threads(), "kept": kept})
    while conn.recv() == "step":
        t0 = time.perf_counter()
        loss, _ = tr.loss_and_terms(model, batch, max_cond_frames=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        conn.send({"s": time.perf_counter() - t0, "loss": loss.item()})
    cur, peak = _rss_kb()
    conn.send({"rss_kb": cur, "peak_rss_kb": peak})


def jax_worker(conn, model_name: str, size: int, batch_file: str, weights_file: str, precision: str,
               cache_dir: str, seed: int, host_malloc: str) -> None:
    kept = _host_malloc(host_malloc)  # before JAX starts its threads
    import jax
    import numpy as np

    if precision != "default":
        jax.config.update("jax_default_matmul_precision", precision)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import jax.numpy as jnp
    from flax import nnx

    from medsam2_jax import tracking
    from medsam2_jax.interop import torch_checkpoint
    from medsam2_jax.memory.bank import BankConfig
    from medsam2_jax.train import optim, step

    sd = dict(np.load(weights_file))
    model = step.train_mode(torch_checkpoint.convert_state_dict(sd, model_name, size, source="PyTorch random init"))
    del sd
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = optim.make_optimizer(params, lr=LR, total_steps=1_000_000, weight_decay=WEIGHT_DECAY, clip_norm=CLIP)
    tcfg = step.tracker_config(tracking.TrackerConfig(bank=BankConfig.sam2_fifo(), max_cond_frames=1, max_points=1))
    fn = jax.jit(step.make_train_step(graphdef, rest, tx, tcfg), donate_argnums=(0,))
    state = step.init_state(params, tx, seed)
    del model, params
    batch = {k: jnp.asarray(v) for k, v in np.load(batch_file).items()}
    # Compile ahead of time (or load from the persistent cache), so that compilation's own memory peak is
    # measured apart from the steps'.
    cached_before = _cache_entries(cache_dir)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    compile_peak = _rss_kb()[1]
    compiled_here = _cache_entries(cache_dir) != cached_before  # it wrote a new entry: it compiled
    from medsam2_jax.host_memory import release_free_memory

    if kept:
        release_free_memory()  # as train.py does after compiling: the compiler's freed memory goes back
    _reset_peak_rss()
    conn.send({"ready": True, "rss_kb": _rss_kb()[0], "compile_s": compile_s, "compile_peak_kb": compile_peak,
               "kept": kept, "compiled_in_process": compiled_here})
    first = True
    while conn.recv() == "step":
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        dt = time.perf_counter() - t0
        msg = {"s": dt, "loss": loss}
        if first:
            msg["rss_after_first_kb"] = _rss_kb()[0]
            first = False
        conn.send(msg)
    cur, peak = _rss_kb()
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has them
        pass
    conn.send({"rss_kb": cur, "peak_rss_kb": peak, "device_memory_stats": stats})


def _cache_entries(cache_dir: str) -> set[str]:
    return set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()


# --------------------------------------------------------------------------------------------------- runs
def bench_size(size: int, args) -> dict:
    import numpy as np

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npz")
        weights_file = os.path.join(tmp, "weights.npz")
        np.savez(batch_file, **make_batch(size, args.frames, args.batch, args.seed))
        tconn, tchild = ctx.Pipe()
        tp = ctx.Process(target=torch_worker, args=(tchild, args.model, size, batch_file, weights_file, args.seed,
                                                    args.torch_malloc))
        tp.start()
        tready = tconn.recv()
        cache_dir = str(args.cache_dir) if args.jax_compile == "cache" else os.path.join(tmp, "xla_cache")

        def start_jax():
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=jax_worker, args=(child, args.model, size, batch_file, weights_file,
                                                        args.matmul_precision, cache_dir, args.seed,
                                                        args.jax_malloc))
            proc.start()
            return proc, conn, conn.recv()

        helper_compile_s = None
        if args.jax_compile == "helper":  # compile in a process of its own, which then exits (as train.py)
            hp, hconn, hready = start_jax()
            hconn.send("stop")
            hconn.recv()
            hp.join()
            helper_compile_s = hready["compile_s"]
        jp, jconn, jready = start_jax()
        runs = {"jax": [], "torch": []}
        for _ in range(args.warmup + args.repeats):  # alternate: one JAX step, one PyTorch step
            for name, conn in (("jax", jconn), ("torch", tconn)):
                time.sleep(args.pause)
                conn.send("step")
                runs[name].append(conn.recv())
                print(f"  S={size} {name}: {runs[name][-1]['s']:.2f} s, loss {runs[name][-1]['loss']:.4f}",
                      flush=True)
        end = {}
        for name, conn in (("jax", jconn), ("torch", tconn)):
            conn.send("stop")
            end[name] = conn.recv()
        tp.join()
        jp.join()
    out = {"image_size": size, "frames": args.frames, "batch": args.batch}
    for name, ready in (("jax", jready), ("torch", tready)):
        times = [r["s"] for r in runs[name][args.warmup:]]
        entry = {
            "step_s_median": statistics.median(times),
            "step_s": times,
            "first_step_s": runs[name][0]["s"],
            "warmup_step_s": [r["s"] for r in runs[name][:args.warmup]],
            "losses": [r["loss"] for r in runs[name]],
            "rss_before_steps_mib": ready["rss_kb"] / 1024,
            "peak_rss_mib": end[name]["peak_rss_kb"] / 1024,
            "peak_minus_before_mib": (end[name]["peak_rss_kb"] - ready["rss_kb"]) / 1024,
            "keep_freed_memory": ready["kept"],
        }
        if name == "jax":
            entry["compile_s"] = ready["compile_s"]
            entry["compiled_in_process"] = ready["compiled_in_process"]
            entry["helper_compile_s"] = helper_compile_s
            entry["peak_rss_during_compile_mib"] = ready["compile_peak_kb"] / 1024
            entry["rss_after_first_step_mib"] = runs[name][0]["rss_after_first_kb"] / 1024
            entry["device_memory_stats"] = end[name].get("device_memory_stats")
        else:
            entry["torch_threads"] = ready["threads"]
        out[name] = entry
    out["speedup_torch_over_jax"] = out["torch"]["step_s_median"] / out["jax"]["step_s_median"]
    out["first_loss_abs_diff"] = abs(out["jax"]["losses"][0] - out["torch"]["losses"][0])
    return out


def format_table(rows: list[dict], model: str) -> str:
    lines = [f"| {model} | B x T | JAX s/step | PyTorch s/step | PyTorch / JAX | JAX peak RSS MiB | "
             "PyTorch peak RSS MiB | JAX compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        j, t = r["jax"], r["torch"]
        lines.append(f"| {r['image_size']} px | {r['batch']} x {r['frames']} | {j['step_s_median']:.2f} | "
                     f"{t['step_s_median']:.2f} | {r['speedup_torch_over_jax']:.2f}x | {j['peak_rss_mib']:.0f} | "
                     f"{t['peak_rss_mib']:.0f} | {j['compile_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medsam2_jax.model.sizes import get_spec

    args.model = get_spec(args.model).name

    check_image_sizes(args.image_sizes)

    info = machine_info()
    load_before = os.getloadavg()
    rows = []
    for size in args.image_sizes:
        r = bench_size(size, args)
        rows.append(r)
        print(f"{args.model} S={size} B={args.batch} T={args.frames}: JAX {r['jax']['step_s_median']:.2f} s/step, "
              f"PyTorch {r['torch']['step_s_median']:.2f} s/step ({r['speedup_torch_over_jax']:.2f}x); peak RSS "
              f"JAX {r['jax']['peak_rss_mib']:.0f} MiB, PyTorch {r['torch']['peak_rss_mib']:.0f} MiB", flush=True)
    load_after = os.getloadavg()
    table = format_table(rows, args.model)
    print()
    print(table)
    note_load(load_before, load_after)
    result = {
        "model": args.model,
        "jax_matmul_precision": args.matmul_precision,
        "host_malloc": {"jax": args.jax_malloc, "torch": args.torch_malloc},
        "jax_compile": args.jax_compile,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": ("wall seconds of one optimisation step (forward over B*T frames, backward, clipping, AdamW), "
                   "median over --repeats steps after --warmup untimed ones, JAX and PyTorch alternating; JAX compile_s = the "
                   "ahead-of-time jit(...).lower(...).compile() before the steps (trace + compile, or a load from "
                   "the persistent compilation cache when an earlier run compiled the same program: "
                   "compiled_in_process says which); helper_compile_s = the helper worker's compile "
                   "(--jax-compile helper), whose cache entry the measured worker loads"),
        "memory": ("each framework runs in its own spawned worker process; peak_rss_mib = the worker's RSS "
                   "high-water mark during the steps (VmHWM from /proc/self/status, reset through "
                   "/proc/self/clear_refs right before the first step, so model building and XLA compilation are "
                   "not counted: it holds the framework, model, optimiser state, activations, gradients and "
                   "allocator caches); rss_before_steps_mib = the worker's RSS right before the first step; "
                   "JAX's peak_rss_during_compile_mib = the high-water mark up to the end of the compile; "
                   "device_memory_stats = jax's allocator stats where the backend has them (None on CPU)"),
    }
    write_run(args.out, "train_step", argv, result, info, load_before, load_after, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
