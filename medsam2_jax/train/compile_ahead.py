"""Compile the training step in a helper process, so that the training process loads it from the persistent
compilation cache (CPU).

On CPU, a process that has compiled the training step itself runs it 15-40 % slower than a process that
loaded the very same executable from the persistent compilation cache (measured on a 2-core AMD EPYC host
with ``benchmarks/train_step.py --jax-compile fresh|cache``: 3.1-3.4 s against 2.4-2.7 s per step at 256 px,
8 frames; the extra time is CPU time in XLA's worker threads; a copy of the executable serialised and
loaded again inside the compiling process stays slow). The working explanation is the heap the compiler
leaves behind: the run's buffers and its per-step allocations land scattered over gigabytes of fragmented
memory. So, with ``compile_in_subprocess`` on, :func:`train` spawns a helper process that builds the same
programs from the same config, compiles the training step (and the held-out evaluation's predict program)
into the persistent cache and exits; the training process then finds both in the cache.

The helper builds exactly what the training process builds (:func:`.loop.build_programs`, the same config
and JAX settings, abstract arguments of the same shapes, dtypes and shardings), so the cache keys match; the
training process checks that its compile was a cache hit and says so (``compile_report``). If the helper
fails or the key differs, the training process compiles the step itself, as without the helper.

``compile_in_subprocess``: ``"auto"`` (default) uses the helper on CPU with one process and one device when
the compilation cache is on; ``"on"`` always (it needs the cache); ``"off"`` never. The helper costs the
start of a Python process and a second trace of the step (about 15 s at 256 px), while the training process
traces its own copy at the same time.
"""

from __future__ import annotations

import multiprocessing
import pickle
import time
from typing import Any

import jax

from .config import ConfigError

CHOICES = ("auto", "on", "off")
_HIT = "/jax/compilation_cache/cache_hits"
_hits = 0
_listening = False


def _count(event: str, **kwargs) -> None:
    global _hits
    if event == _HIT:
        _hits += 1


def cache_hits() -> int:
    """How many programs this process has loaded from the persistent compilation cache so far (counted from
    the first call of this function or :func:`start`)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return _hits


def _cache_dir() -> str | None:
    return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None


def wanted(c) -> bool:
    """Whether config ``c`` (field ``compile_in_subprocess``) asks for the helper in this process."""
    mode = c.compile_in_subprocess
    if mode == "off":
        return False
    if not _cache_dir():
        if mode == "on":
            raise ConfigError("compile_in_subprocess", "'on' needs JAX's persistent compilation cache (the helper "
                                                       "hands the compiled step over through it): pass "
                                                       "--compile_cache=DIR, or set it to 'off' or 'auto'")
        return False
    if mode == "on":
        return True
    return jax.default_backend() == "cpu" and jax.process_count() == 1 and jax.device_count() == 1


def _jax_settings() -> dict[str, Any]:
    """This process's JAX config values that can travel to another process (they shape lowering and keys)."""
    out = {}
    for k, v in jax.config.values.items():
        try:
            pickle.dumps(v)
        except Exception:
            continue
        out[k] = v
    return out


def batch_spec(batch: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shapes and dtypes of a host batch (what the helper needs to trace the step)."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}


class Helper:
    """A running helper process (from :func:`start`); :meth:`join` waits for it."""

    def __init__(self, proc, queue, t0: float):
        self._proc, self._queue, self._t0 = proc, queue, t0

    def join(self) -> dict:
        """Wait for the helper. Returns its report: ``ok``, ``seconds`` (wall time), ``step_s`` and ``predict_s``
        (its compile times), or ``error``."""
        self._proc.join()
        report = {"ok": False, "error": f"the helper process exited with status {self._proc.exitcode}"}
        try:
            report = self._queue.get(timeout=5)
        except Exception:
            pass
        report["seconds"] = time.perf_counter() - self._t0
        return report


def start(c, spec: dict[str, tuple[tuple[int, ...], str]], *, predict: bool) -> Helper:
    """Spawn the helper for config ``c`` and a batch of shapes ``spec`` (:func:`batch_spec`); ``predict``: also
    compile the held-out evaluation's predict program (on a batch of the same shapes)."""
    cache_hits()  # start counting before any compile of the training process
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_helper_main, args=(c, spec, predict, _jax_settings(), queue), daemon=True,
                       name="medsam2-compile")
    t0 = time.perf_counter()
    proc.start()
    return Helper(proc, queue, t0)


def _abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _helper_main(c, spec, predict, settings, queue) -> None:
    report: dict[str, Any] = {"ok": False}
    try:
        for k, v in settings.items():
            if jax.config.values.get(k) != v:
                try:
                    jax.config.update(k, v)
                except Exception:
                    pass
        import numpy as np

        from .loop import build_programs

        progs = build_programs(c)
        batch = {k: jax.ShapeDtypeStruct(shape, np.dtype(dt), sharding=progs.batch_sh) for k, (shape, dt) in spec.items()}
        t = time.perf_counter()
        progs.step_fn.lower(_abstract(progs.state, progs.state_sh), batch).compile()
        report["step_s"] = time.perf_counter() - t
        if predict:
            t = time.perf_counter()
            key = jax.eval_shape(lambda: jax.random.key(0))
            host_batch = {k: jax.ShapeDtypeStruct(shape, np.dtype(dt)) for k, (shape, dt) in spec.items()}
            progs.predict().lower(_abstract(progs.params), host_batch, key).compile()
            report["predict_s"] = time.perf_counter() - t
        report["ok"] = True
    except BaseException as e:  # reported to the training process, which then compiles by itself
        report["error"] = f"{type(e).__name__}: {e}"
    queue.put(report)
