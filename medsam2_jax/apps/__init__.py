"""The commands a user runs, on top of the library: ``segment`` (``medsam2-segment``: one's own NIfTI scan or a
folder of 2D images, from one prompt), ``demo`` (the whole chain on a phantom or the real CT, with a report)
and ``diagnostics`` (the paper's Fig. 6: mutual information between the bank's entries). ``train.py`` and
``eval.py`` at the top of the repository are the other two (``medsam2_jax.train.cli``, ``medsam2_jax.evaluate``).
"""
