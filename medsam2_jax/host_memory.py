"""Keep freed host memory for reuse (Linux with glibc): one call at the start of a command, before JAX starts.

XLA:CPU allocates the temporaries of each call of a compiled program as one block (1.6 GB for a 256 px,
4-frame training step of SAM 2.1 tiny) with ``posix_memalign``. glibc serves a block that large from a fresh
``mmap`` and unmaps it when the call ends, so the next call page-faults all of it in again: about 420 000
minor faults and 0.7-1.2 s of system time per step on a 2-core machine, a third of the step. PyTorch's CPU
tensors go through the same allocator.

:func:`keep_freed_memory` sets glibc's malloc to serve every allocation from one heap (one arena, no
``mmap`` for large blocks) and never to return freed memory to the system (no trimming), so that each step
reuses the pages of the last one (after the first few steps, once the heap holds a free block of each size
the program asks for beside its other allocations). The cost: the process keeps its high-water mark of memory until it exits
(what a training or segmentation run reaches on its first step anyway), and the threads share one arena.

It changes nothing on other C libraries or systems, and arenas already created keep their settings: call it
before the first JAX array (the XLA:CPU worker threads take their arena when they first allocate). Set
``MEDSAM2_KEEP_FREED_MEMORY=0`` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MEDSAM2_KEEP_FREED_MEMORY"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def _glibc_function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """``name`` from the C library when it is glibc on Linux, with its signature set; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory (see the module docstring). Returns whether the
    settings are in effect (False on a system without glibc, or with ``MEDSAM2_KEEP_FREED_MEMORY=0``).
    Idempotent."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    # -1 reaches glibc as SIZE_MAX: the top of the heap is never trimmed.
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)
    _applied = bool(ok)
    return _applied


def release_free_memory() -> bool:
    """Hand the free pages of malloc's heap back to the system (glibc's ``malloc_trim(0)``): call it once after
    compiling, whose freed working memory (gigabytes for a training step) :func:`keep_freed_memory` would
    otherwise keep. The pages the next call needs are faulted in once, then reused. Returns whether anything
    was released (False without glibc)."""
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    return trim is not None and bool(trim(0))
