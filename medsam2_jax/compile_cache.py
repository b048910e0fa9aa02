"""JAX's persistent compilation cache, switched on the same way by every command.

A command started again with the same shapes (a resumed training run, the next scan of the same size, the
demo a second time) loads its compiled XLA programs from disk instead of compiling them: minutes on a CPU.
Default directory: ``$MEDSAM2_JAX_CACHE``, else ``~/.cache/medsam2-jax/xla``. Each command has a flag to
choose another directory or turn it off (``none`` or an empty string).
"""

from __future__ import annotations

import os

DEFAULT_DIR = os.path.join("~", ".cache", "medsam2-jax", "xla")
OFF = ("", "none", "off")


def default_dir() -> str:
    """``$MEDSAM2_JAX_CACHE`` if set, else ``~/.cache/medsam2-jax/xla`` (expanded)."""
    return os.path.expanduser(os.environ.get("MEDSAM2_JAX_CACHE") or DEFAULT_DIR)


def enable(choice: str | None = None) -> str | None:
    """Turn the cache on in ``choice`` (None: :func:`default_dir`; '', 'none' or 'off': leave it off) and return
    the directory in use, or None when off. A cache the caller already configured (tests, notebooks) is kept."""
    import jax

    if choice is not None and choice.strip().lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    d = os.path.abspath(os.path.expanduser(choice or default_dir()))
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return d
