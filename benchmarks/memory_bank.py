"""Cost of the memory bank: its share of a tracking step, and propagation speed with self_sorting vs fifo.

    python -m benchmarks.memory_bank                         # S=256, hiera_t (random), T=32, K=16
    python -m benchmarks.memory_bank --K 6 16 32 --frames 48 --model models/sam2.1_t

The question (issue 4, item 6): is the paper's bank cheap next to the model — a few percent of a step at
K = 16 — and how fast does propagation run with it compared with SAM 2's FIFO?

What is timed, after a warm-up call (compilation excluded), as the median (and min) of ``--repeats`` calls:

* ``encode``: the image encoder, per frame (:func:`medsam2_jax.tracking.encode_frames`, batches of 8).
* ``step``: one step of the tracker's ``lax.scan`` (memory attention, SAM heads, memory encoder and the
  bank), per frame: a whole :func:`medsam2_jax.tracking.propagate` over ``T`` frames, divided by ``T``.
* ``bank``: the bank's own work per frame, in a ``lax.scan`` of the same length doing only what the
  tracker does with the bank at each step, on the same shapes and the same (vmapped, B = 1) layout: the
  frame descriptor (:func:`~medsam2_jax.memory.bank.make_descriptor`), ``resample`` (eq. 4-5: K draws and
  the gather of K payloads of memory features + object pointer), ``temporal_index`` and ``update``
  (eq. 2-3: confidence gate, K+1 total dissimilarities, the write). For ``fifo`` the same calls under the
  FIFO policy (no draws, evict the oldest). ``bank / step`` is the share asked for.
* ``frames/s``: ``T / propagate time`` (memory path only) and with the encoder included.

Results go to ``--out`` (JSON, with the machine, versions and load average) and a table on stdout. On a
shared CPU the absolute numbers move with the load; the shares and ratios are the stable part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medsam2_jax import api, tracking  # noqa: E402
from medsam2_jax.memory import bank as bank_lib  # noqa: E402
from medsam2_jax.memory.bank import BankConfig  # noqa: E402
from medsam2_jax.tracking import TrackerConfig  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn()`` after one warm-up call; ``fn`` returns something to block on."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def make_frames(t: int, s: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    out = []
    for i in range(t):
        cx, cy = s * (0.35 + 0.3 * i / max(t - 1, 1)), s * (0.45 + 0.1 * np.sin(i / 3))
        b = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.12 * s) ** 2))
        out.append(np.stack([2 * b - 1, b - 0.5, 1 - 2 * b], -1) + 0.05 * rng.normal(size=(s, s, 3)))
    return np.asarray(out, np.float32)


def bank_only(cfg: TrackerConfig, top: jax.Array, mem_dim: int, hidden: int):
    """A jitted ``scan`` doing, per frame, exactly the tracker's bank work (B = 1, vmapped)."""
    t, h, w, c = top.shape
    bcfg = cfg.bank
    grid = tracking.descriptor_grid(h, cfg.descriptor_grid)
    example = {"maskmem": jnp.zeros((h, w, mem_dim)), "obj_ptr": jnp.zeros((hidden,))}
    bank0 = jax.vmap(lambda _: bank_lib.init(bcfg.K, example, grid * grid * c))(jnp.arange(1))
    rng = np.random.default_rng(0)
    payload = {"maskmem": jnp.asarray(rng.normal(size=(t, 1, h, w, mem_dim)), jnp.float32),
               "obj_ptr": jnp.asarray(rng.normal(size=(t, 1, hidden)), jnp.float32)}
    ious = jnp.asarray(rng.uniform(0.3, 1.0, size=(t, 1)), jnp.float32)
    frames = jnp.arange(t, dtype=jnp.int32)[:, None]

    @jax.jit
    def scan(top, payload, ious, frames, key):
        def step(bank, xs):
            tp, pl, iou, f, k = xs
            desc = bank_lib.make_descriptor(tp[None], grid)
            if bcfg.policy == "fifo":
                view, valid = bank, bank.valid
            else:
                keys = jax.random.split(k, 1)
                view, valid = jax.vmap(lambda b, q, kk: bank_lib.resample(b, q, kk, bcfg))(bank, desc, keys)
            t_rel = jax.vmap(lambda v, fr: bank_lib.temporal_index(v, fr, bcfg))(view, f)
            new = jax.vmap(lambda b, p, d, cf, fr: bank_lib.update(b, p, d, cf, fr, bcfg))(bank, pl, desc, iou, f)
            # Consume the whole view (memory attention reads all of it), or XLA would gather only what is used.
            keep = jnp.sum(view.payload["maskmem"]) + jnp.sum(view.payload["obj_ptr"])
            return new, keep + jnp.sum(t_rel) + jnp.sum(valid)

        keys = jax.random.split(key, t)
        last, ys = jax.lax.scan(step, bank0, (top, payload, ious, frames, keys))
        return last.valid, ys

    return lambda: scan(top, payload, ious, frames, jax.random.key(0))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t",
                   help="random model size (without --model)")
    p.add_argument("--model", dest="model_dir", metavar="DIR", default=None,
                   help="converted model directory; default: a random model")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--K", type=int, nargs="+", default=[16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/bench/memory_bank.json")
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    s, t = args.image_size, args.frames
    if args.model_dir:
        model = api.load_model(args.model_dir, image_size=s)
    else:
        model = api.random_model(args.model, s, seed=0, init="flax", object_bias=2.0)
    frames = jnp.asarray(make_frames(t, s))
    enc_med, enc_min = timed(lambda: tracking.encode_frames(model, frames), args.repeats)
    feats = tracking.encode_frames(model, frames)
    top = feats["fpn"][-1]
    rows = []
    for k in args.K:
        for policy in ("fifo", "self_sorting"):
            bank = BankConfig.sam2_fifo(K=k) if policy == "fifo" else BankConfig(K=k)
            cfg = TrackerConfig(bank=bank)
            prompts = tracking.make_prompts([[{"frame": 0, "points": [[s * 0.35, s * 0.45]], "labels": [1]}]],
                                            num_frames=t, image_size=s, config=cfg)
            prop = lambda: tracking.run_sequence(model, feats, prompts, jax.random.key(0), cfg)["low_res_masks"]
            step_med, step_min = timed(prop, args.repeats)
            bank_med, bank_min = timed(bank_only(cfg, top, model.mem_dim, model.hidden_dim), args.repeats)
            rows.append({
                "K": k, "policy": policy,
                "step_ms": 1e3 * step_med / t, "step_ms_min": 1e3 * step_min / t,
                "bank_ms": 1e3 * bank_med / t, "bank_ms_min": 1e3 * bank_min / t,
                "bank_share": bank_med / step_med, "bank_share_min": bank_min / step_min,
                "frames_per_s": t / step_med, "frames_per_s_with_encoder": t / (step_med + enc_med),
            })
    res = {
        "image_size": s, "frames": t, "model": args.checkpoint or f"random {args.model}", "repeats": args.repeats,
        "encode_ms_per_frame": 1e3 * enc_med / t, "encode_ms_per_frame_min": 1e3 * enc_min / t,
        "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(), "jax": jax.__version__, "device": str(jax.devices()[0])},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"S={s}, T={t}, {res['model']}, {res['machine']['device']}, load {res['machine']['loadavg'][0]:.1f}; "
          f"encoder {res['encode_ms_per_frame']:.1f} ms/frame")
    print("median (min) over the repeats")
    print(f"{'K':>3} {'policy':<13}{'step ms':>17}{'bank ms':>15}{'bank/step':>17}{'frames/s':>10}{'+encoder':>10}")
    for r in rows:
        print(f"{r['K']:>3} {r['policy']:<13}{r['step_ms']:>8.2f} ({r['step_ms_min']:>6.2f}){r['bank_ms']:>7.3f} "
              f"({r['bank_ms_min']:.3f}){100 * r['bank_share']:>8.2f}% ({100 * r['bank_share_min']:.2f}%)"
              f"{r['frames_per_s']:>10.2f}{r['frames_per_s_with_encoder']:>10.2f}")
    by = {(r["K"], r["policy"]): r for r in rows}
    for k in args.K:
        ss, ff = by[(k, "self_sorting")], by[(k, "fifo")]
        print(f"K={k}: self_sorting runs at {ss['frames_per_s'] / ff['frames_per_s']:.3f}x fifo's frames/s "
              f"(memory path); +{ss['step_ms'] - ff['step_ms']:.2f} ms per step")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
