"""Temporary alias of :mod:`medsam2_jax.interop.weights` for ``diagnostics.py``, which still does
``from . import weights``; delete this file once it imports ``from .interop import weights``."""

from .interop.weights import *  # noqa: F401,F403
