"""Evaluate a checkpoint: ``python eval.py --config=configs/eval_<x>.py --checkpoint=DIR --workdir=DIR``.

Thin: parses the flags and calls :func:`medsam2_jax.evaluate.main`; see ``--help`` and configs/eval_phantoms.py.
"""

import sys

from medsam2_jax.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
