"""medsam2_jax.host_memory.keep_freed_memory: large blocks freed by one step are reused by the next, with no
page faults, in a fresh process (the suite's own process leaves malloc alone, see conftest)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import ctypes, json, resource, sys
from medsam2_jax.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp
libc = ctypes.CDLL("libc.so.6")
libc.posix_memalign.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
N = 256 << 20

def faults(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

def block():  # what XLA:CPU does with a step's temporaries: posix_memalign, write, free
    p = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(p), 64, N) == 0
    ctypes.memset(p, 1, N)
    libc.free(p)

x = jnp.ones((4096, 4096))
f = jax.jit(lambda a: jnp.sort(a * 2.0, axis=0)[:1, :1])  # 64 MB temporaries (above glibc's mmap threshold)
f(x).block_until_ready()
print(json.dumps({"applied": applied, "malloc": [faults(block) for _ in range(4)],
                  "jax": [faults(lambda: f(x).block_until_ready()) for _ in range(4)]}))
"""


def _run(keep: str) -> dict:
    env = dict(os.environ, MEDSAM2_KEEP_FREED_MEMORY=keep, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_reuses_large_blocks():
    kept, plain = _run("1"), _run("0")
    assert kept["applied"] is True and plain["applied"] is False
    pages = (256 << 20) // 4096
    # Without it every 256 MB block is a fresh mmap: each round faults it all in again.
    assert min(plain["malloc"]) > pages // 2, plain
    # With it the block comes back from the heap once it has grown to hold it (a round or two).
    assert kept["malloc"][0] > pages // 2 and max(kept["malloc"][-2:]) < pages // 50, kept
    # The same for a jitted program's temporaries (XLA:CPU allocates them per call).
    temp_pages = (4096 * 4096 * 4) // 4096
    assert min(plain["jax"][-2:]) > temp_pages // 4 and max(kept["jax"][-2:]) < temp_pages // 50, (kept, plain)
