"""Test-wide JAX settings: float32 parity settings and the persistent compilation cache."""

import gc
import os

import jax
import pytest

# The commands' keep_freed_memory() (medsam2_jax.host_memory) makes a process keep its high-water mark of
# memory; the suite calls the commands in its own long-lived process, so leave malloc as it is there. Tests
# that start the commands in a subprocess turn it back on (test_train_run) or check it (test_host_memory).
os.environ["MEDSAM2_KEEP_FREED_MEMORY"] = "0"

# Parity tests compare float32 against PyTorch CPU: no reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
# XLA compiles dominate the suite's time; keep them across runs.
_cache = os.environ.get("MEDSAM2_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests sized for CPU (run in CI too)")
    config.addinivalue_line("markers", "torch: needs torch and the sam2 reference package")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop each module's compiled programs when it ends (later modules load theirs from the persistent cache):
    the suite's process otherwise grows past 10 GB, and the training tests' subprocesses need room beside it."""
    yield
    jax.clear_caches()
    gc.collect()
