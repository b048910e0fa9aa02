"""Side-by-side timings against PyTorch. Each benchmark is a module run from the repository root:
``python -m benchmarks.<name> [options]`` (e.g. ``python -m benchmarks.tracking --help``); results go to
``benchmarks/results/``. They import the installed package ``medsam2_jax`` and each other as
``benchmarks.<name>`` (the shared helpers are in :mod:`benchmarks.common`)."""
