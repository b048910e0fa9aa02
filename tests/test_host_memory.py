"""medsam2_jax.host_memory.keep_freed_memory: the temporaries a jitted call frees are reused by the next call,
with no page faults, in a fresh process (the suite's own process leaves malloc alone, see conftest)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource
from medsam2_jax.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp

def faults(fn):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

x = jnp.ones((4096, 4096))
f = jax.jit(lambda a: jnp.sort(a * 2.0, axis=0)[:1, :1])  # 64 MB temporaries (above glibc's mmap threshold)
f(x).block_until_ready()
print(json.dumps({"applied": applied, "jax": [faults(lambda: f(x).block_until_ready()) for _ in range(20)]}))
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
    # XLA:CPU allocates a call's temporaries with posix_memalign. Without the settings glibc maps a 64 MB
    # block afresh for every call, which faults it all in again; with them the block comes back from the heap
    # once the heap has grown to hold it beside what else the calls allocate: measured after 2-9 calls, and
    # from then on at every call (glibc 2.36's posix_memalign cannot reuse a freed block of exactly the
    # requested size until a larger free block has formed; the order of XLA's worker threads varies).
    temp_pages = (4096 * 4096 * 4) // 4096
    assert min(plain["jax"]) > temp_pages // 4, plain
    assert max(kept["jax"][-4:]) < temp_pages // 50, kept
