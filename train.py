"""Train Medical SAM 2: ``python train.py --config=configs/<exp>.py --workdir=DIR [--config.<field>=...]``.

Thin: parses the flags and calls :func:`medsam2_jax.train.cli.main`; see ``--help`` and configs/base.py.
"""

from medsam2_jax.train.cli import main

if __name__ == "__main__":
    main()
