"""One prepared accelerator run: bf16 agreement, encoder, propagation and training speed against PyTorch.

Issue 13 item 4. Runs the JAX port and the PyTorch ``sam2`` package on the same chip in one process (the
``torch.compile`` encoder in a time-capped child process) and writes one JSON file, rewritten after every
section, so that a run cut short still leaves what it measured. Sections, in the order they run:

* ``environment``: versions, device, XLA flags, allocator settings; ``matmul_ceiling``: TFLOP/s of one
  large bf16 ``jnp.dot`` (8192^3), the practical ceiling next to ``--peak-tflops``.
* ``encoder`` (b): image-encoder frames/s at ``--image-size``, batches ``--encoder-batches``, float32 and
  bf16, compiled ahead of time (FLOPs and memory from XLA's cost and memory analyses, TFLOP/s and the share
  of the bf16 peak), against PyTorch's ``forward_image`` (eager float32 and eager bf16 autocast).
* ``agreement`` (a): bf16 against float32 on the chip, over the tracked clip of ``propagation``: FPN
  features (relative L2 error per level), low-res mask logits (relative L2 and max error over the logits'
  scale), binarised full-size masks (IoU per frame: min and mean), object scores.
* ``propagation`` (c): frames/s of tracking one object through ``--frames`` slices (the JAX tracker:
  ``encode_frames`` + the jitted ``propagate``, SAM 2's FIFO memory, as ``benchmarks/tracking.py``)
  against ``SAM2VideoPredictor`` (eager float32 and bf16 autocast) with the same weights; float32 parity.
* ``train`` (d): one bf16 training step of ``--train-frames`` frames per sequence; every batch of
  ``--train-batches`` is compiled (in parallel), the ones whose XLA memory analysis fits the chip are run
  (largest first; an out-of-memory error moves on), with model FLOPs utilisation = XLA FLOPs / time / peak.
* ``torch_compile`` (b, continued): ``torch.compile(forward_image)`` in a child process, killed at its time
  cap; whatever it measured before is kept.
* ``memory`` (e): JAX's allocator statistics before and after each section (``peak_bytes_in_use`` cannot be
  reset, so a section's own peak is known only when it raised the running peak: see ``memory.note``), XLA's
  memory analysis of each compiled program, and PyTorch's ``max_memory_allocated`` per measurement (reset
  before each).

Every section runs in its own ``try``: an error is recorded as text and the run goes on. ``--budget-s``
is checked before each measurement; what would not fit is recorded as ``"skipped: budget"``.

Device run (see ``benchmarks/device_suite.sh``)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.device_suite --out $OUT/device_suite.json

CPU smoke run (CI, ``tests/test_device_suite.py``; tiny sizes, same code paths)::

    python -m benchmarks.device_suite --smoke --out /tmp/device_suite.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]

T0 = time.perf_counter()
OBJECT_BIAS = 2.0  # raised object-score bias: random weights otherwise leave the object absent (masks -1024)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Accelerator suite: bf16 agreement, encoder/propagation/training speed vs PyTorch, memory; "
                    "one JSON file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: tiny sizes (64 px, encoder batches 1 and 2, 4 frames, training batch 2), same code "
                        "paths")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "device_suite.json")
    p.add_argument("--model-name", dest="model", metavar="NAME", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=None, help="default 1024 (smoke: 64)")
    p.add_argument("--encoder-batches", type=int, nargs="+", default=None, help="default 1 8 32 (smoke: 1 2)")
    p.add_argument("--frames", type=int, default=None, help="slices tracked in propagation (default 64; smoke 4)")
    p.add_argument("--train-frames", type=int, default=None, help="frames per training sequence (8; smoke 4)")
    p.add_argument("--train-batches", type=int, nargs="+", default=None,
                   help="training batch sizes to try (default 2 4 8; smoke 2)")
    p.add_argument("--train-dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute type of the training step (default bfloat16; smoke float32: XLA:CPU takes tens of "
                        "minutes to compile the bf16 step)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per measurement (3; smoke 1)")
    p.add_argument("--bf16-scope", default="model", choices=["model", "image_encoder"],
                   help="what computes in bf16 where the library has tracking.compute_model")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget from the start of the process (default 420; smoke 1800)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H200 SXM: 989)")
    p.add_argument("--matmul-precision", default="highest", choices=["default", "high", "highest"],
                   help="JAX matmul precision of the float32 programs (highest = true float32, no TF32); the "
                        "bf16 programs use the default")
    p.add_argument("--torch-tf32", action="store_true", help="allow TF32 in PyTorch's float32 runs (off: true fp32)")
    p.add_argument("--torch-compile-cap-s", type=float, default=None,
                   help="time cap of the torch.compile child process (default 150; smoke 120)")
    p.add_argument("--torch-compile-backend", default=None, help="default inductor (smoke: eager)")
    p.add_argument("--torch-compile-batches", type=int, nargs="+", default=None, help="default 8 32 (smoke 1)")
    p.add_argument("--serial-compile", action="store_true",
                   help="compile one XLA program at a time (default: the encoder's and the training step's "
                        "programs are compiled in parallel threads)")
    p.add_argument("--attention", default=None,
                   help="sets MEDSAM2_ATTENTION for the model's attention implementation, where supported")
    p.add_argument("--cache-dir", default=None,
                   help="persistent JAX compilation cache (default: off, as on a fresh device machine)")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--sections", nargs="+", default=None,
                   help="subset of: matmul_ceiling encoder agreement propagation train torch_compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-compile-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sm = a.smoke
    a.image_size = a.image_size or (64 if sm else 1024)
    a.encoder_batches = a.encoder_batches or ([1, 2] if sm else [1, 8, 32])
    a.frames = a.frames or (4 if sm else 64)
    a.train_frames = a.train_frames or (4 if sm else 8)
    a.train_batches = a.train_batches or ([2] if sm else [2, 4, 8])  # smoke: one compile (minutes on CPU)
    a.repeats = a.repeats or (1 if sm else 3)
    a.train_dtype = a.train_dtype or ("float32" if sm else "bfloat16")
    a.budget_s = a.budget_s if a.budget_s is not None else (1800.0 if sm else 420.0)
    a.torch_compile_cap_s = a.torch_compile_cap_s if a.torch_compile_cap_s is not None else (120.0 if sm else 150.0)
    a.torch_compile_backend = a.torch_compile_backend or ("eager" if sm else "inductor")
    a.torch_compile_batches = a.torch_compile_batches or ([1] if sm else [8, 32])
    a.ceiling_n = 512 if sm else 8192
    if a.image_size % 32:
        p.error(f"--image-size {a.image_size} is not a multiple of 32")
    return a


# ------------------------------------------------------------------------------------------------ dtype switch
def compute_setup(model, dtype: str):
    """The one place where the compute type (and later the attention implementation) is chosen.

    Returns ``(model for that dtype, frame dtype, a factory of the matmul-precision context to trace in)``.
    bfloat16: ``tracking.compute_model(model, "bfloat16", --bf16-scope)`` where the library has it (issue 13
    item 1: "model" = every submodule computes in bf16, "image_encoder" = the encoder alone), else
    ``tracking.cast_model`` (the image encoder in bf16, the memory path and heads float32).
    """
    import jax
    import jax.numpy as jnp

    from medsam2_jax import tracking

    if dtype == "float32":
        return model, jnp.float32, lambda: jax.default_matmul_precision(ARGS.matmul_precision)
    if hasattr(tracking, "compute_model"):
        return tracking.compute_model(model, "bfloat16", ARGS.bf16_scope), jnp.bfloat16, contextlib.nullcontext
    return tracking.cast_model(model, jnp.bfloat16), jnp.bfloat16, contextlib.nullcontext


def bf16_path() -> str:
    from medsam2_jax import tracking

    if hasattr(tracking, "compute_model"):
        return f"tracking.compute_model(model, 'bfloat16', scope={ARGS.bf16_scope!r})"
    return "tracking.cast_model(model, bfloat16): image encoder only (library has no compute_model)"


def train_step_kwargs(dtype: str) -> dict:
    """Keyword arguments of ``train.step.make_train_step`` for the compute type."""
    import inspect

    import jax.numpy as jnp

    from medsam2_jax.train import step

    kw = {"compute_dtype": jnp.bfloat16 if dtype == "bfloat16" else jnp.float32}
    if "compute_scope" in inspect.signature(step.make_train_step).parameters:
        kw["compute_scope"] = ARGS.bf16_scope
    return kw


# ------------------------------------------------------------------------------------------------ helpers
class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - T0)

    def fits(self, est: float) -> bool:
        return self.left() >= est


def jax_memory() -> dict | None:
    import jax

    try:
        st = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has them
        return None
    if not st:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size", "num_allocs")
    return {k: int(st[k]) for k in keys if k in st}


def lowered_flops(lowered) -> float | None:
    """FLOPs of the program as lowered, before the backend rewrites it. On GPU the compiled program's cost
    analysis leaves out the matmuls and convolutions that XLA hands to cuBLAS/cuDNN as custom calls (on the
    H200 it reported 9 GFLOP per 1024-px frame of the tiny encoder in bf16 and 35 in float32, against ~220
    from the HLO), so FLOPs for throughput and MFU come from here. Loop bodies still count once."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - best effort
        return None


def compiled_analyses(compiled, lowered=None) -> dict:
    """FLOPs, bytes accessed and memory sizes of an XLA executable. ``flops`` is the lowered program's count
    when ``lowered`` is given (see :func:`lowered_flops`), the backend's otherwise; the backend's own count is
    kept as ``compiled_flops``."""
    out: dict = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost:
            out["flops"] = out["compiled_flops"] = float(cost.get("flops", 0.0))
            out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception as e:  # noqa: BLE001 - best effort, backend dependent
        out["cost_analysis_error"] = repr(e)
    hlo = lowered_flops(lowered) if lowered is not None else None
    if hlo:
        out["flops"] = out["hlo_flops"] = hlo
    try:
        m = compiled.memory_analysis()
        if m is not None:
            for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes"):
                if hasattr(m, k):
                    out[k] = int(getattr(m, k))
    except Exception as e:  # noqa: BLE001
        out["memory_analysis_error"] = repr(e)
    return out


def program_bytes(an: dict) -> int | None:
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    if not all(k in an for k in keys):
        return None
    return an["temp_size_in_bytes"] + an["argument_size_in_bytes"] + an["output_size_in_bytes"] \
        - an.get("alias_size_in_bytes", 0)


def time_calls(call, sync, repeats: int, target_s: float, max_calls: int = 50) -> dict:
    """Seconds per call: ``k`` back-to-back calls then one sync, ``repeats`` times (after an untimed call, and a
    probe call that sets ``k``; the smoke run skips the untimed one)."""
    if not SMOKE:
        sync(call())
    t0 = time.perf_counter()
    sync(call())
    one = time.perf_counter() - t0
    k = max(1, min(max_calls, int(target_s / max(one, 1e-6))))
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(k):
            out = call()
        sync(out)
        per.append((time.perf_counter() - t0) / k)
    return {"s_per_call_median": statistics.median(per), "s_per_call_min": min(per), "calls_per_repeat": k,
            "repeats": repeats, "s_per_call": per}


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_env():
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def sync(_=None):
        if dev == "cuda":
            torch.cuda.synchronize()

    def reset_peak():
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None

    return torch, dev, sync, reset_peak, peak


def torch_autocast(dtype: str):
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ suite
class Suite:
    def __init__(self, args):
        self.args = args
        self.budget = Budget(args.budget_s)
        self.result: dict = {
            "benchmark": "device_suite",
            "command": " ".join(["python -m benchmarks.device_suite", *sys.argv[1:]]),
            "smoke": args.smoke,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "torch_compile_worker")},
            "sections": {},
            "memory": {"note": ("jax peak_bytes_in_use is the process's running peak (it cannot be reset): a "
                                "section's own peak is peak_after only where peak_after > peak_before; "
                                "program_bytes = XLA memory analysis (arguments + outputs + temporaries - "
                                "aliased) of each compiled program, the per-program figure; torch peaks are "
                                "max_memory_allocated after reset_peak_memory_stats, per measurement"),
                       "jax_per_section": {}, "programs": {}, "torch": {}},
        }
        self.sections = self.result["sections"]
        self.torch_pred = None
        self.model = None
        self.weights_source = None
        self.runners: dict = {}

    # -------------------------------------------------------------------------------------- plumbing
    def write(self) -> None:
        out = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.result["elapsed_s"] = time.perf_counter() - T0
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        os.replace(tmp, out)

    def run_section(self, name: str, fn, est_s: float) -> None:
        if self.args.sections is not None and name not in self.args.sections + ["environment", "models"]:
            return
        if not self.budget.fits(est_s):
            self.sections[name] = {"status": f"skipped: budget ({self.budget.left():.0f} s left, needs ~{est_s:.0f} s)"}
            log(f"section {name}: skipped (budget)")
            self.write()
            return
        log(f"section {name}: start ({self.budget.left():.0f} s of budget left)")
        before = jax_memory()
        t0 = time.perf_counter()
        sec: dict = {}
        self.sections[name] = sec
        try:
            fn(sec)
            sec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - record and go on
            sec["status"] = "error"
            sec["error"] = f"{type(e).__name__}: {e}"
            sec["traceback"] = traceback.format_exc()[-4000:]
            log(f"section {name}: ERROR {type(e).__name__}: {str(e)[:500]}")
        sec["wall_s"] = time.perf_counter() - t0
        gc.collect()
        self.result["memory"]["jax_per_section"][name] = {"before": before, "after": jax_memory()}
        log(f"section {name}: {sec['status']} in {sec['wall_s']:.1f} s")
        self.write()

    def parallel(self, jobs: dict, reserve_s: float = 30.0) -> dict:
        """Run ``{key: thunk}`` (XLA compiles) in threads (one at a time with --serial-compile); returns
        ``{key: value or exception}``. A job not done when only ``reserve_s`` of the budget is left is given up
        (a ``TimeoutError``; its thread runs on in the background, and the process ends with ``os._exit``)."""
        ex = cf.ThreadPoolExecutor(max_workers=1 if self.args.serial_compile else len(jobs))
        futs = {k: ex.submit(f) for k, f in jobs.items()}
        done, _ = cf.wait(list(futs.values()), timeout=max(self.budget.left() - reserve_s, 1.0))
        ex.shutdown(wait=False, cancel_futures=True)
        out = {}
        for k, fu in futs.items():
            if fu not in done:
                out[k] = TimeoutError(f"not done within the budget (given up with {reserve_s:.0f} s left)")
                continue
            try:
                out[k] = fu.result()
            except Exception as e:  # noqa: BLE001
                out[k] = e
        return out

    # -------------------------------------------------------------------------------------- environment
    def environment(self, sec: dict) -> None:
        import flax
        import jax
        import jaxlib
        import numpy as np

        d = jax.devices()[0]
        sec.update({
            "python": platform.python_version(), "platform": platform.platform(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "backend": jax.default_backend(), "device": str(d),
            "device_kind": getattr(d, "device_kind", None), "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax_memory": jax_memory(),
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                   "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR",
                                                   "MEDSAM2_ATTENTION", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")},
            "jax_compilation_cache": self.args.cache_dir or "off",
            "jax_matmul_precision_float32": self.args.matmul_precision,
            "bf16_path": bf16_path(),
        })
        try:
            from medsam2_jax.model import common

            if hasattr(common, "ATTENTION_IMPLS"):
                sec["attention_impls"] = list(common.ATTENTION_IMPLS)
                sec["attention"] = os.environ.get(getattr(common, "ATTENTION_ENV", "MEDSAM2_ATTENTION")) or "auto"
            else:
                sec["attention"] = "library has no attention switch"
        except Exception as e:  # noqa: BLE001
            sec["attention"] = f"unknown: {type(e).__name__}: {e}"
        try:
            sec["jax_backend_version"] = d.client.platform_version
        except Exception:  # noqa: BLE001
            pass
        for mod in ("optax", "orbax.checkpoint", "sam2"):
            try:
                m = __import__(mod, fromlist=["_"])
                sec[mod] = getattr(m, "__version__", "installed")
            except Exception as e:  # noqa: BLE001
                sec[mod] = f"not importable: {type(e).__name__}: {e}"
        if not self.args.no_torch:
            try:
                import torch

                sec["torch"] = torch.__version__
                sec["torch_cuda"] = torch.version.cuda
                sec["torch_cuda_available"] = torch.cuda.is_available()
                if torch.cuda.is_available():
                    sec["torch_device"] = torch.cuda.get_device_name(0)
                    sec["torch_cudnn"] = torch.backends.cudnn.version()
                    torch.backends.cuda.matmul.allow_tf32 = self.args.torch_tf32
                    torch.backends.cudnn.allow_tf32 = self.args.torch_tf32
                sec["torch_tf32"] = self.args.torch_tf32
            except Exception as e:  # noqa: BLE001
                sec["torch"] = f"not importable: {type(e).__name__}: {e}"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            sec["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except Exception as e:  # noqa: BLE001
            sec["nvidia_smi"] = f"unavailable: {type(e).__name__}"

    # -------------------------------------------------------------------------------------- models
    def build_models(self, sec: dict) -> None:
        """The PyTorch video predictor (random init, object bias raised) and the JAX model with its weights;
        without torch/sam2, a random JAX model with the same bias."""
        from medsam2_jax import api

        a = self.args
        if not a.no_torch:
            try:
                torch, dev, *_ = torch_env()
                from medsam2_jax.interop import torch_checkpoint, torch_models

                torch.manual_seed(a.seed)
                pred = torch_models.build_torch_model(a.model, a.image_size, video=True)
                with torch.no_grad():
                    pred.sam_mask_decoder.pred_obj_score_head.layers[2].bias += OBJECT_BIAS
                sd = {k: v.detach().float().numpy() for k, v in pred.state_dict().items()}
                self.model = torch_checkpoint.convert_state_dict(sd, a.model, a.image_size,
                                                                 source="PyTorch random init")
                self.torch_pred = pred.to(dev).eval()
                self.weights_source = "PyTorch random init (sam2 package), object-score bias +2, converted"
            except Exception as e:  # noqa: BLE001
                sec["torch_error"] = f"{type(e).__name__}: {e}"
                log(f"PyTorch side unavailable: {sec['torch_error'][:300]}")
        if self.model is None:
            m = api.random_model(a.model, a.image_size, a.seed)
            head = m.sam_mask_decoder.pred_obj_score_head
            last = head.layers[len(head.layers) - 1] if hasattr(head, "layers") else head
            last.bias.set_value(last.bias.get_value() + OBJECT_BIAS)
            self.model = m
            self.weights_source = "api.random_model, object-score bias +2"
        sec["weights"] = self.weights_source
        sec["torch_available"] = self.torch_pred is not None

    # -------------------------------------------------------------------------------------- matmul ceiling
    def matmul_ceiling(self, sec: dict) -> None:
        import jax
        import jax.numpy as jnp

        n = self.args.ceiling_n
        ka, kb = jax.random.split(jax.random.key(0))
        x = jax.random.normal(ka, (n, n), jnp.bfloat16)
        y = jax.random.normal(kb, (n, n), jnp.bfloat16)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        t = time_calls(lambda: f(x, y), jax.block_until_ready, self.args.repeats, 0.5, 100)
        flops = 2.0 * n ** 3
        sec.update({"n": n, "dtype": "bfloat16 (float32 accumulation)", "flops": flops, **t,
                    "tflops": flops / t["s_per_call_min"] / 1e12,
                    "tflops_median": flops / t["s_per_call_median"] / 1e12,
                    "fraction_of_peak": flops / t["s_per_call_min"] / 1e12 / self.args.peak_tflops})
        self.result["matmul_ceiling_tflops"] = sec["tflops"]
        log(f"matmul {n}^3 bf16: {sec['tflops']:.1f} TFLOP/s")

    # -------------------------------------------------------------------------------------- (b) encoder
    def encoder(self, sec: dict) -> None:
        import jax
        import numpy as np
        from flax import nnx

        a = self.args
        s = a.image_size
        enc_jit = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state).encode_image(x),
                          static_argnums=0)
        setups = {dt: compute_setup(self.model, dt) for dt in ("float32", "bfloat16")}
        splits = {dt: nnx.split(m) for dt, (m, _, _) in setups.items()}
        rng = np.random.default_rng(a.seed)
        inputs = {}
        for b in a.encoder_batches:
            x = rng.standard_normal((b, s, s, 3), dtype=np.float32)
            for dt, (_, xdt, _) in setups.items():
                inputs[(dt, b)] = jax.device_put(x.astype(xdt))

        def compile_one(dt, b):
            g, st = splits[dt]
            t0 = time.perf_counter()
            with setups[dt][2]():
                lowered = enc_jit.lower(g, st, inputs[(dt, b)])
            t1 = time.perf_counter()
            c = lowered.compile()
            return c, t1 - t0, time.perf_counter() - t1, lowered

        keys = [(dt, b) for b in a.encoder_batches for dt in ("bfloat16", "float32")]
        est = 30.0 * (1 if not a.serial_compile else len(keys))
        if not self.budget.fits(est):
            raise RuntimeError("skipped: budget (encoder compiles)")
        t0 = time.perf_counter()
        compiled = self.parallel({k: (lambda k=k: compile_one(*k)) for k in keys})
        sec["compile_wall_s"] = time.perf_counter() - t0
        sec["compile_parallel"] = not a.serial_compile
        rows = sec.setdefault("jax", {})
        for k in keys:
            dt, b = k
            label = f"{dt}_b{b}"
            r = compiled[k]
            if isinstance(r, Exception):
                rows[label] = {"error": f"{type(r).__name__}: {r}"}
                continue
            c, lower_s, compile_s, lowered = r
            an = compiled_analyses(c, lowered)
            # The encoder runs ``images_per_step`` images at a time through a lax.map (1 on CPU, the whole batch
            # on GPU/TPU); XLA's cost analysis counts a loop body once, so scale by the number of chunks.
            ips = setups[dt][0].image_encoder.images_per_step
            ips = (1 if jax.default_backend() == "cpu" else 0) if ips is None else ips
            chunks = 1 if (ips == 0 or ips >= b) else -(-b // ips)
            if an.get("flops"):
                an["flops_per_call_scaled"] = an["flops"] * chunks
            self.result["memory"]["programs"][f"encoder_{label}"] = {**an, "program_bytes": program_bytes(an)}
            fl = an.get("flops_per_call_scaled")
            rows[label] = {"dtype": dt, "batch": b, "lower_s": lower_s, "compile_s": compile_s,
                           "flops_per_call": fl, "flops_per_frame": (fl or 0) / b, "images_per_step": ips,
                           "xla_cost_analysis_flops": an.get("flops")}
        for k in keys:
            dt, b = k
            label = f"{dt}_b{b}"
            if "error" in rows[label]:
                continue
            if not self.budget.fits(10.0):
                rows[label]["timing"] = "skipped: budget"
                continue
            c = compiled[k][0]
            g, st = splits[dt]
            x = inputs[k]
            try:
                tm = time_calls(lambda: c(st, x), jax.block_until_ready, a.repeats, 0.4 if a.smoke else 1.0)
            except Exception as e:  # noqa: BLE001
                rows[label]["error"] = f"{type(e).__name__}: {e}"
                continue
            fl = rows[label]["flops_per_call"] or 0.0
            rows[label].update(tm)
            rows[label]["frames_per_s"] = b / tm["s_per_call_median"]
            rows[label]["frames_per_s_best"] = b / tm["s_per_call_min"]
            if fl:
                rows[label]["tflops"] = fl / tm["s_per_call_median"] / 1e12
                rows[label]["fraction_of_bf16_peak"] = rows[label]["tflops"] / a.peak_tflops
                ceil = self.result.get("matmul_ceiling_tflops")
                if ceil:
                    rows[label]["fraction_of_matmul_ceiling"] = rows[label]["tflops"] / ceil
            log(f"encoder JAX {label}: {rows[label]['frames_per_s']:.1f} frames/s"
                + (f", {rows[label]['tflops']:.1f} TFLOP/s" if fl else ""))
            self.write()
        del compiled, inputs
        # --- PyTorch forward_image, eager float32 and bf16 autocast
        if self.torch_pred is None:
            sec["torch"] = "unavailable (see models.torch_error)"
            return
        torch, dev, tsync, reset_peak, peak = torch_env()
        trows = sec.setdefault("torch", {})
        for b in a.encoder_batches:
            x = torch.from_numpy(rng.standard_normal((b, 3, s, s), dtype=np.float32)).to(dev)
            for dt in ("float32", "bfloat16"):
                label = f"eager_{dt}_b{b}"
                if not self.budget.fits(10.0):
                    trows[label] = "skipped: budget"
                    continue
                reset_peak()

                def call(x=x, dt=dt):
                    with torch.inference_mode(), torch_autocast(dt):
                        return self.torch_pred.forward_image(x)
                try:
                    tm = time_calls(call, tsync, a.repeats, 0.4 if a.smoke else 1.0)
                except Exception as e:  # noqa: BLE001
                    trows[label] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                trows[label] = {"dtype": dt, "batch": b, "mode": "eager", **tm,
                                "frames_per_s": b / tm["s_per_call_median"],
                                "frames_per_s_best": b / tm["s_per_call_min"], "peak_memory_bytes": peak()}
                self.result["memory"]["torch"][f"encoder_{label}"] = peak()
                jr = sec["jax"].get(f"{dt}_b{b}", {})
                if "frames_per_s" in jr:
                    trows[label]["jax_speedup"] = jr["frames_per_s"] / trows[label]["frames_per_s"]
                log(f"encoder torch {label}: {trows[label]['frames_per_s']:.1f} frames/s")
            del x
        reset_peak()

    # -------------------------------------------------------------------------------------- tracking inputs
    def clip(self):
        """(T, S, S, 3) normalised frames (a drifting blob on a gradient, with noise) and a click on the blob."""
        import numpy as np

        from medsam2_jax.interop import parity
        from medsam2_jax.model.sam2 import normalize_images

        s, t = self.args.image_size, self.args.frames
        frames = np.asarray(normalize_images(parity.moving_disk_clip(s, t, self.args.seed)), np.float32)
        return frames, [{"frame": 0, "points": [[0.35 * s, 0.4 * s]], "labels": [1]}]

    def jax_runner(self, dtype: str, frames_np, prompts):
        import jax
        import jax.numpy as jnp

        from medsam2_jax import tracking
        from medsam2_jax.memory.bank import BankConfig
        from medsam2_jax.model.sam2 import resize_bilinear

        cfg = tracking.TrackerConfig(bank=BankConfig.sam2_fifo(), encode_batch=min(8, len(frames_np)))
        model, xdt, ctx = compute_setup(self.model, dtype)
        frames = jax.device_put(jnp.asarray(frames_np, xdt))
        t, s = frames.shape[0], frames.shape[1]
        p = tracking.make_prompts([prompts], num_frames=t, image_size=s, config=cfg)
        key = jax.random.key(self.args.seed)

        def run(keep: bool = False):
            with ctx():
                t0 = time.perf_counter()
                feats = tracking.encode_frames(model, frames, batch=cfg.encode_batch)
                jax.block_until_ready(feats)
                t1 = time.perf_counter()
                out = tracking.propagate_jit(model, feats, p, config=cfg, direction="forward", key=key)
                out["mask_logits"] = resize_bilinear(out["low_res_masks"], (s, s), antialias=False)
                jax.block_until_ready(out)
                t2 = time.perf_counter()
            times = {"encode": t1 - t0, "propagate": t2 - t1, "total": t2 - t0}
            return times, (feats, out) if keep else None

        return run

    def ensure_runners(self, sec: dict) -> None:
        """Build the float32 and bf16 JAX trackers and run each once (trace + compile + one run), in parallel."""
        if self.runners:
            return
        frames_np, prompts = self.clip()
        self.clip_np = (frames_np, prompts)
        runs = {dt: self.jax_runner(dt, frames_np, prompts) for dt in ("float32", "bfloat16")}
        t0 = time.perf_counter()
        firsts = self.parallel({dt: (lambda r=r: r(keep=True)) for dt, r in runs.items()})
        sec["first_runs_wall_s"] = time.perf_counter() - t0
        for dt, r in firsts.items():
            if isinstance(r, Exception):
                raise r
        self.runners = runs
        self.first_runs = firsts

    # -------------------------------------------------------------------------------------- (a) agreement
    def agreement(self, sec: dict) -> None:
        import numpy as np

        from medsam2_jax.interop import parity

        self.ensure_runners(sec)
        (_, (f32_feats, f32_out)), (_, (b16_feats, b16_out)) = self.first_runs["float32"], self.first_runs["bfloat16"]
        sec["first_run_s"] = {dt: self.first_runs[dt][0] for dt in self.first_runs}
        sec["frames"], sec["image_size"] = self.args.frames, self.args.image_size
        sec["features"] = {}
        for i, (x, r) in enumerate(zip(b16_feats["fpn"], f32_feats["fpn"])):
            x, r = np.asarray(x, np.float32), np.asarray(r, np.float32)
            sec["features"][f"fpn_level{i}"] = {
                "shape": list(r.shape), "rel_l2": rel_l2(x, r),
                "max_abs_over_max_ref": float(np.abs(x - r).max() / max(np.abs(r).max(), 1e-30))}
        vis = np.asarray(f32_out["visited"][0]) & np.asarray(b16_out["visited"][0])
        lo32 = np.asarray(f32_out["low_res_masks"][0], np.float32)[vis]
        lo16 = np.asarray(b16_out["low_res_masks"][0], np.float32)[vis]
        scale = float(np.abs(lo32).max())
        hi32 = np.asarray(f32_out["mask_logits"][0], np.float32)
        hi16 = np.asarray(b16_out["mask_logits"][0], np.float32)
        ious = [parity.mask_iou(hi16[f], hi32[f]) for f in np.flatnonzero(vis)]
        o32 = np.asarray(f32_out["object_score_logits"][0], np.float32).reshape(-1)[vis]
        o16 = np.asarray(b16_out["object_score_logits"][0], np.float32).reshape(-1)[vis]
        sec["mask_logits"] = {"frames_compared": int(vis.sum()), "rel_l2": rel_l2(lo16, lo32),
                              "max_abs": float(np.abs(lo16 - lo32).max()), "max_abs_ref": scale,
                              "max_abs_over_max_ref": float(np.abs(lo16 - lo32).max() / max(scale, 1e-30))}
        sec["mask_iou"] = {"min": float(min(ious)), "mean": float(np.mean(ious)), "per_frame": ious,
                           "foreground_fraction_float32": float((hi32[vis] > 0).mean()),
                           "foreground_fraction_bfloat16": float((hi16[vis] > 0).mean())}
        sec["object_scores"] = {"max_abs": float(np.abs(o16 - o32).max()),
                                "present_agree": float(np.mean((o16 > 0) == (o32 > 0)))}
        sec["bf16_path"] = bf16_path()
        sec["what"] = ("bf16 compute path (compute_setup) against float32 at matmul precision "
                       f"{ARGS.matmul_precision}, same weights and frames, on {sec['frames']} tracked slices")
        log(f"agreement: features rel_l2 {[round(v['rel_l2'], 5) for v in sec['features'].values()]}, "
            f"logits rel_l2 {sec['mask_logits']['rel_l2']:.4f}, IoU min {sec['mask_iou']['min']:.4f} "
            f"mean {sec['mask_iou']['mean']:.4f}")

    # -------------------------------------------------------------------------------------- (c) propagation
    def propagation(self, sec: dict) -> None:
        import numpy as np

        from medsam2_jax.interop import parity

        a = self.args
        self.ensure_runners(sec)
        frames_np, prompts = self.clip_np
        t = a.frames
        sec["frames"], sec["image_size"], sec["bank"] = t, a.image_size, "sam2_fifo"
        jrows = sec.setdefault("jax", {})
        for dt, run in self.runners.items():
            if not self.budget.fits(10.0):
                jrows[dt] = "skipped: budget"
                continue
            times = [run()[0] for _ in range(a.repeats)]
            row = {"first_run_s": self.first_runs[dt][0]}
            for ph in ("encode", "propagate", "total"):
                ts = [x[ph] for x in times]
                row[ph] = {"median_s": statistics.median(ts), "min_s": min(ts), "frames_per_s": t / statistics.median(ts)}
            jrows[dt] = row
            log(f"propagation JAX {dt}: total {row['total']['frames_per_s']:.1f} frames/s "
                f"(encode {row['encode']['frames_per_s']:.1f}, propagate {row['propagate']['frames_per_s']:.1f})")
            self.write()
        if self.torch_pred is None:
            sec["torch"] = "unavailable (see models.torch_error)"
            return
        torch, dev, tsync, reset_peak, peak = torch_env()
        trows = sec.setdefault("torch", {})
        ref32 = None
        for dt in ("float32", "bfloat16"):
            label = f"eager_{dt}"
            res = []
            warm = 0 if a.smoke else 1  # the first run is a warm-up (not in the smoke run: CPU bf16 is slow)
            for i in range(min(a.repeats, 2) + warm):
                if not self.budget.fits(15.0 if i == 0 else 5.0):
                    break
                reset_peak()
                tsync()
                with torch.inference_mode(), torch_autocast(dt):
                    ref = parity.torch_video_track(self.torch_pred, frames_np, prompts, "forward")
                tsync()
                res.append(ref["timing"]["total_s"])
                if dt == "float32" and ref32 is None:
                    ref32 = ref
            if len(res) < 1 + warm:
                trows[label] = "skipped: budget"
                continue
            med = statistics.median(res[warm:])
            trows[label] = {"warmup_s": res[0] if warm else None, "total_s": res[warm:], "median_s": med,
                            "frames_per_s": t / med,
                            "peak_memory_bytes": peak(),
                            "timing": "SAM2VideoPredictor: first prompt to end of propagate_in_video (per-frame "
                                      "forward_image included, JPEG init_state excluded), synchronised by the "
                                      "per-frame mask copies to the host"}
            self.result["memory"]["torch"][f"propagation_{label}"] = peak()
            jr = jrows.get(dt)
            if isinstance(jr, dict):
                trows[label]["jax_speedup_total"] = jr["total"]["frames_per_s"] / trows[label]["frames_per_s"]
            log(f"propagation torch {label}: {trows[label]['frames_per_s']:.1f} frames/s")
            self.write()
        reset_peak()
        if ref32 is not None:
            out = self.first_runs["float32"][1][1]
            low = np.asarray(out["low_res_masks"][0], np.float32)
            vis = ref32["visited"]
            hi = np.asarray(out["mask_logits"][0], np.float32)
            sec["parity_float32_vs_torch"] = {
                "max_abs_diff_low_res_logits": float(np.abs(low[vis] - ref32["low_res_masks"][vis]).max()),
                "max_abs_ref": float(np.abs(ref32["low_res_masks"][vis]).max()),
                "min_mask_iou": float(min(parity.mask_iou(hi[f], ref32["video_res_masks"][f])
                                          for f in np.flatnonzero(vis))),
                "foreground_fraction": float((ref32["video_res_masks"][vis] > 0).mean())}

    # -------------------------------------------------------------------------------------- (d) train
    def train(self, sec: dict) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from benchmarks.train_step import CLIP, LR, WEIGHT_DECAY, make_batch
        from medsam2_jax import api, tracking
        from medsam2_jax.memory.bank import BankConfig
        from medsam2_jax.train import optim, step

        a = self.args
        s, t = a.image_size, a.train_frames
        self.runners, self.first_runs = {}, {}  # free the tracking section's device buffers
        gc.collect()
        model = step.train_mode(api.random_model(a.model, s, a.seed))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = optim.make_optimizer(params, lr=LR, total_steps=1_000_000, weight_decay=WEIGHT_DECAY, clip_norm=CLIP)
        tcfg = step.tracker_config(tracking.TrackerConfig(bank=BankConfig.sam2_fifo(), max_cond_frames=1,
                                                          max_points=1))
        fn = jax.jit(step.make_train_step(graphdef, rest, tx, tcfg, **train_step_kwargs(a.train_dtype)))
        state = step.init_state(params, tx, a.seed)
        del model
        precision = a.matmul_precision if a.train_dtype == "float32" else None
        sec.update({"image_size": s, "frames": t, "dtype": a.train_dtype, "bank": "sam2_fifo",
                    "step_kwargs": {k: str(v) for k, v in train_step_kwargs(a.train_dtype).items()},
                    "batches_tried": a.train_batches, "donated_state": False,
                    "what": "one optimisation step: encode B*T frames, track each sequence (FIFO memory), SAM 2's "
                            "loss, gradients through everything, clipping, AdamW"})
        batches = {b: {k: jnp.asarray(v) for k, v in make_batch(s, t, b, a.seed).items()} for b in a.train_batches}

        def compile_one(b):
            t0 = time.perf_counter()
            with (jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()):
                lowered = fn.lower(state, batches[b])
            t1 = time.perf_counter()
            c = lowered.compile()
            return c, t1 - t0, time.perf_counter() - t1, lowered

        if not self.budget.fits(60.0):
            raise RuntimeError("skipped: budget (training-step compiles)")
        t0 = time.perf_counter()
        compiled = self.parallel({b: (lambda b=b: compile_one(b)) for b in a.train_batches}, reserve_s=20.0)
        sec["compile_wall_s"] = time.perf_counter() - t0
        mem = jax_memory() or {}
        limit = mem.get("bytes_limit")
        free = None if limit is None else limit - mem.get("bytes_in_use", 0)
        sec["device_bytes_free_before_steps"] = free
        rows = sec.setdefault("per_batch", {})
        for b in a.train_batches:
            r = compiled[b]
            if isinstance(r, Exception):
                rows[str(b)] = {"error": f"{type(r).__name__}: {r}"}
                continue
            an = compiled_analyses(r[0], r[3])
            pb = program_bytes(an)
            self.result["memory"]["programs"][f"train_b{b}"] = {**an, "program_bytes": pb}
            rows[str(b)] = {"batch": b, "frames_per_step": b * t, "lower_s": r[1], "compile_s": r[2],
                            "xla_flops": an.get("flops"), "program_bytes": pb,
                            "fits_estimate": None if (pb is None or free is None) else bool(pb < 0.95 * free)}
        best = None
        for b in sorted(a.train_batches, reverse=True):
            row = rows[str(b)]
            if "error" in row:
                continue
            if row["fits_estimate"] is False:
                row["run"] = "not run: XLA memory analysis exceeds free device memory"
                continue
            if not self.budget.fits(15.0):
                row["run"] = "skipped: budget"
                continue
            c = compiled[b][0]
            try:
                st = state
                times = []
                for i in range(a.repeats + 1):
                    t0 = time.perf_counter()
                    st, metrics = c(st, batches[b])
                    jax.block_until_ready((st, metrics))
                    times.append(time.perf_counter() - t0)
                    if i == 0 and not self.budget.fits(3 * times[0]):
                        break
                loss = float(metrics["loss"])
            except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED: try the next smaller batch
                row["run"] = f"error: {type(e).__name__}: {str(e)[:1000]}"
                log(f"train B={b}: {row['run'][:200]}")
                gc.collect()
                continue
            med = statistics.median(times[1:]) if len(times) > 1 else times[0]
            row.update({"first_step_s": times[0], "step_s": times[1:], "step_s_median": med,
                        "frames_per_s": b * t / med, "loss": loss})
            if row["xla_flops"]:
                row["tflops"] = row["xla_flops"] / med / 1e12
                row["mfu"] = row["tflops"] / a.peak_tflops
            enc = self.sections.get("encoder", {}).get("jax", {}).get(f"{a.train_dtype}_b{max(a.encoder_batches)}", {})
            if enc.get("flops_per_frame"):
                lb = 3.0 * enc["flops_per_frame"] * b * t  # forward + backward ~ 3x forward, encoder only
                row["encoder_only_flops_3x_forward"] = lb
                row["mfu_encoder_only_lower_bound"] = lb / med / 1e12 / a.peak_tflops
            log(f"train B={b} T={t}: {med:.3f} s/step, {row['frames_per_s']:.1f} frames/s"
                + (f", MFU {row['mfu']:.3f}" if "mfu" in row else ""))
            if best is None:
                best = b
            self.write()
        sec["chosen_batch"] = best
        if best is None:
            raise RuntimeError("no training batch ran: " + "; ".join(
                f"B={k}: {v.get('error') or v.get('run')}" for k, v in rows.items()))
        if best is not None:
            for k in ("step_s_median", "frames_per_s", "tflops", "mfu", "mfu_encoder_only_lower_bound"):
                if k in rows[str(best)]:
                    sec[k] = rows[str(best)][k]
        sec["flops_note"] = ("xla_flops = XLA cost analysis of the whole step (forward, backward, optimiser). "
                             "HloCostAnalysis may count a while-loop (lax.scan) body once rather than per "
                             "frame, so the tracker's share can be under-counted; mfu_encoder_only_lower_bound "
                             "uses 3 x the encoder's forward FLOPs per frame (from the encoder section) alone")
        del compiled, batches, state

    # -------------------------------------------------------------------------------------- torch.compile
    def torch_compile(self, sec: dict) -> None:
        a = self.args
        cap = min(a.torch_compile_cap_s, self.budget.left() - 5.0)
        if cap < 30.0:
            raise RuntimeError(f"skipped: budget ({self.budget.left():.0f} s left)")
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"model": a.model, "image_size": a.image_size, "batches": a.torch_compile_batches,
                    "backend": a.torch_compile_backend, "repeats": a.repeats, "seed": a.seed, "smoke": a.smoke,
                    "tf32": a.torch_tf32, "out": os.path.join(tmp, "tc.json")}
            spec_file = os.path.join(tmp, "spec.json")
            pathlib.Path(spec_file).write_text(json.dumps(spec))
            logf = os.path.join(tmp, "log.txt")
            sec.update({"backend": spec["backend"], "cap_s": cap, "batches": spec["batches"],
                        "dtype": "bfloat16 autocast", "process": "child process (time-capped)"})
            t0 = time.perf_counter()
            with open(logf, "w") as lf:
                p = subprocess.Popen([sys.executable, "-m", "benchmarks.device_suite",
                                      "--torch-compile-worker", spec_file], stdout=lf, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(ROOT))
                try:
                    rc = p.wait(timeout=cap)
                    sec["returncode"] = rc
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)  # the child and its compile workers (its own session)
                    p.wait()
                    sec["returncode"] = "killed at the time cap"
            sec["child_wall_s"] = time.perf_counter() - t0
            if os.path.exists(spec["out"]):
                sec["results"] = json.loads(pathlib.Path(spec["out"]).read_text())
            sec["log_tail"] = pathlib.Path(logf).read_text()[-3000:]
        res = sec.get("results", {})
        for k, v in res.items():
            if isinstance(v, dict) and "peak_memory_bytes" in v:
                self.result["memory"]["torch"][f"torch_compile_{k}"] = v["peak_memory_bytes"]
            enc = self.sections.get("encoder", {})
            if isinstance(v, dict) and "frames_per_s" in v:
                jr = enc.get("jax", {}).get(f"bfloat16_b{v['batch']}", {})
                if "frames_per_s" in jr:
                    v["jax_bf16_speedup"] = jr["frames_per_s"] / v["frames_per_s"]
        if not any(isinstance(v, dict) and "frames_per_s" in v for v in res.values()):
            raise RuntimeError(f"torch.compile measured nothing (returncode {sec.get('returncode')})")

    # -------------------------------------------------------------------------------------- summary
    def summary(self) -> None:
        sm: dict = {}
        secs = self.sections
        enc = secs.get("encoder", {})
        for k, v in enc.get("jax", {}).items():
            if isinstance(v, dict) and "frames_per_s" in v:
                sm[f"encoder_jax_{k}_fps"] = round(v["frames_per_s"], 2)
                if "fraction_of_bf16_peak" in v:
                    sm[f"encoder_jax_{k}_peak_fraction"] = round(v["fraction_of_bf16_peak"], 4)
        for k, v in (enc.get("torch") or {}).items() if isinstance(enc.get("torch"), dict) else []:
            if isinstance(v, dict) and "frames_per_s" in v:
                sm[f"encoder_torch_{k}_fps"] = round(v["frames_per_s"], 2)
        for k, v in (secs.get("torch_compile", {}).get("results") or {}).items():
            if isinstance(v, dict) and "frames_per_s" in v:
                sm[f"encoder_torch_compile_{k}_fps"] = round(v["frames_per_s"], 2)
        prop = secs.get("propagation", {})
        for side in ("jax", "torch"):
            rows = prop.get(side)
            if isinstance(rows, dict):
                for k, v in rows.items():
                    if isinstance(v, dict):
                        fps = v["total"]["frames_per_s"] if "total" in v else v.get("frames_per_s")
                        if fps:
                            sm[f"propagation_{side}_{k}_fps"] = round(fps, 2)
        ag = secs.get("agreement", {})
        if "mask_iou" in ag:
            sm["agreement_mask_iou_min"] = round(ag["mask_iou"]["min"], 4)
            sm["agreement_feature_rel_l2_max"] = round(max(v["rel_l2"] for v in ag["features"].values()), 5)
        tr = secs.get("train", {})
        for k in ("chosen_batch", "step_s_median", "mfu", "mfu_encoder_only_lower_bound"):
            if k in tr:
                sm[f"train_{k}"] = tr[k]
        if "matmul_ceiling_tflops" in self.result:
            sm["matmul_ceiling_tflops"] = round(self.result["matmul_ceiling_tflops"], 1)
        sm["sections_status"] = {k: v.get("status") for k, v in secs.items()}
        self.result["summary"] = sm

    def run(self) -> int:
        self.run_section("environment", self.environment, 1.0)
        self.run_section("models", self.build_models, 5.0)
        if self.model is None:
            log("no model: stopping")
            return 1
        self.run_section("matmul_ceiling", self.matmul_ceiling, 10.0)
        self.run_section("encoder", self.encoder, 40.0)
        self.run_section("agreement", self.agreement, 60.0)
        self.run_section("propagation", self.propagation, 20.0)
        self.run_section("train", self.train, 90.0)
        if not self.args.no_torch:
            self.run_section("torch_compile", self.torch_compile, 40.0)
        self.summary()
        self.result["memory"]["jax_final"] = jax_memory()
        self.write()
        log(f"summary: {json.dumps(self.result['summary'])}")
        log(f"wrote {self.args.out}")
        return 0


# ------------------------------------------------------------------------------------------------ child process
def torch_compile_worker(spec_file: str) -> int:
    """Child process: ``torch.compile(forward_image)`` in bf16 autocast per batch; results written after each."""
    spec = json.loads(pathlib.Path(spec_file).read_text())
    import numpy as np

    torch, dev, sync, reset_peak, peak = torch_env()
    from medsam2_jax.interop import torch_models

    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec["tf32"]
        torch.backends.cudnn.allow_tf32 = spec["tf32"]
    res: dict = {}
    out = pathlib.Path(spec["out"])

    def write():
        out.write_text(json.dumps(res, indent=2))

    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    model = torch_models.build_torch_model(spec["model"], spec["image_size"]).to(dev).eval()
    res["build_s"] = time.perf_counter() - t0
    write()
    s = spec["image_size"]
    rng = np.random.default_rng(spec["seed"])
    for b in spec["batches"]:
        label = f"bfloat16_b{b}"
        try:
            torch._dynamo.reset()
            fwd = torch.compile(model.forward_image, backend=spec["backend"], dynamic=False)
            x = torch.from_numpy(rng.standard_normal((b, 3, s, s), dtype=np.float32)).to(dev)

            def call():
                with torch.inference_mode(), torch_autocast("bfloat16"):
                    return fwd(x)
            reset_peak()
            t0 = time.perf_counter()
            call()
            sync()
            first = time.perf_counter() - t0
            print(f"torch.compile b={b}: first call (compile) {first:.1f} s", flush=True)
            tm = time_calls(call, sync, spec["repeats"], 0.4 if spec["smoke"] else 1.0)
            res[label] = {"batch": b, "backend": spec["backend"], "first_call_s": first, **tm,
                          "frames_per_s": b / tm["s_per_call_median"], "frames_per_s_best": b / tm["s_per_call_min"],
                          "peak_memory_bytes": peak()}
            print(f"torch.compile b={b}: {res[label]['frames_per_s']:.1f} frames/s", flush=True)
        except Exception as e:  # noqa: BLE001
            res[label] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            print(f"torch.compile b={b}: {res[label]['error'][:500]}", flush=True)
        write()
    return 0


ARGS: argparse.Namespace
SMOKE = False


def main(argv=None) -> int:
    global ARGS, SMOKE
    args = parse_args(argv)
    ARGS = args
    SMOKE = args.smoke
    os.environ.setdefault("TQDM_DISABLE", "1")  # the video predictor's progress bars
    if args.torch_compile_worker:
        return torch_compile_worker(args.torch_compile_worker)
    if args.attention:
        os.environ["MEDSAM2_ATTENTION"] = args.attention
    # Allocate device memory on demand (PyTorch shares the chip), up to 85% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.cache_dir).resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    log(f"device_suite: budget {args.budget_s:.0f} s, S={args.image_size}, encoder batches {args.encoder_batches}, "
        f"{args.frames} slices, train {args.train_batches} x {args.train_frames} frames, smoke={args.smoke}")
    return Suite(args).run()


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # not sys.exit: a compile given up at the budget may still run in a thread
