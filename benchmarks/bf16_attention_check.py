"""Device check for the bfloat16 path and the attention implementations (issue 13, items 1-2).

Runs on whatever JAX's default backend is (meant for a GPU): (1) every attention implementation that
applies (einsum, xla, cudnn) on SAM 2's attention shapes, float32 and bfloat16, against float32 einsum, with
timings; (2) a random tiny model tracking a short clip in float32 and in whole-model bfloat16, with their
agreement and timings. Writes one JSON (``--out``) and prints it.

    python -m benchmarks.bf16_attention_check --size 1024 --frames 8 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medsam2_jax import api, tracking  # noqa: E402
from medsam2_jax.model import common  # noqa: E402
from medsam2_jax.model.sam2 import normalize_images  # noqa: E402

# (B, Nq, Nk, H, D) at 1024 px, tiny: Hiera stage-1 windows, global attention (stage 3), the decoder's
# token-to-image attention, memory self- and cross-attention (7 memories of 64x64 + 64 pointer tokens).
SHAPES = {
    "hiera_window_s1": (256, 64, 64, 1, 96),
    "hiera_global_s3": (1, 4096, 4096, 4, 96),
    "decoder_t2i": (1, 7, 4096, 8, 16),
    "memory_self": (1, 4096, 4096, 1, 256),
    "memory_cross": (1, 4096, 7 * 4096 + 64, 1, 256),
}


def _time(fn, *args, reps=5):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - t0) / reps * 1e3


def attention_rows():
    rows = []
    for name, (b, nq, nk, h, d) in SHAPES.items():
        ks = jax.random.split(jax.random.key(0), 4)
        q32 = jax.random.normal(ks[0], (b, nq, h, d))
        k32 = jax.random.normal(ks[1], (b, nk, h, d))
        v32 = jax.random.normal(ks[2], (b, nk, h, d))
        mask = jax.random.bernoulli(ks[3], 0.9, (b, nk)).at[:, 0].set(True)
        ref = jax.jit(lambda q, k, v, m: common.attention(q, k, v, key_mask=m, impl="einsum"))(q32, k32, v32, mask)
        scale = float(jnp.abs(ref).max())
        for dtype in ("float32", "bfloat16"):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            for impl in ("einsum", "xla", "cudnn", "auto"):
                for masked in (False, True):
                    row = {"shape": name, "dims": [b, nq, nk, h, d], "dtype": dtype, "impl": impl, "masked": masked}
                    try:
                        fn = jax.jit(lambda q, k, v, m, impl=impl: common.attention(q, k, v, key_mask=m, impl=impl))
                        out, ms = _time(fn, q, k, v, mask if masked else None)
                        r = ref if masked else jax.jit(lambda q, k, v: common.attention(q, k, v, impl="einsum"))(
                            q32, k32, v32)
                        row.update(ms=ms, max_err_rel=float(jnp.abs(out.astype(jnp.float32) - r).max()) / scale)
                    except Exception as e:  # noqa: BLE001 - recorded
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def tracking_rows(size, frames):
    m32 = api.random_model("sam2.1_hiera_t", size, seed=0)
    bias = m32.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias.get_value() + 2.0)
    m16 = tracking.cast_model(m32, jnp.bfloat16, tracking.WHOLE_MODEL)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    clip = []
    for t in range(frames):
        disc = ((xx - 0.3 - 0.02 * t) ** 2 + (yy - 0.4 - 0.01 * t) ** 2 < 0.15 ** 2)[..., None]
        clip.append(np.clip(0.3 + 0.5 * disc + 0.04 * rng.standard_normal((size, size, 3)), 0, 1))
    x = jnp.asarray(normalize_images(np.asarray(clip, np.float32)))
    cfg = tracking.TrackerConfig(bank=tracking.bank_lib.BankConfig.sam2_fifo(), encode_batch=min(frames, 8))
    p = tracking.make_prompts([[{"frame": 0, "points": [[0.3 * size, 0.4 * size]], "labels": [1]}]],
                              num_frames=frames, image_size=size, config=cfg)
    out = {}
    for name, m, xx_ in (("float32", m32, x), ("bfloat16", m16, x.astype(jnp.bfloat16))):
        fn = lambda: tracking.track(m, xx_, p, direction="forward", config=cfg)["mask_logits"]  # noqa: E731
        t0 = time.perf_counter()
        o = jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        o = jax.block_until_ready(fn())
        out[name] = (np.asarray(o, np.float32), first, time.perf_counter() - t0)
    a, b = out["float32"][0], out["bfloat16"][0]
    iou = ((a > 0) & (b > 0)).sum((2, 3)) / np.maximum(((a > 0) | (b > 0)).sum((2, 3)), 1)
    return {"size": size, "frames": frames, "foreground": float((a > 0).mean()),
            "mask_logit_err_rel": float(np.abs(a - b).max() / np.abs(a).max()), "min_mask_iou": float(iou.min()),
            "seconds": {k: {"first": v[1], "second": v[2]} for k, v in out.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--skip-tracking", action="store_true")
    ap.add_argument("--out", default="bf16_attention_check.json")
    a = ap.parse_args()
    res = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    res["attention"] = attention_rows()
    if not a.skip_tracking:
        try:
            res["tracking"] = tracking_rows(a.size, a.frames)
        except Exception:  # noqa: BLE001 - recorded
            res["tracking"] = {"error": traceback.format_exc()[-2000:]}
        print(json.dumps(res["tracking"]), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
