"""Everything that touches PyTorch SAM 2.

* :mod:`.weights`: the one PyTorch <-> Flax key map (NumPy only: converted models load without torch).
* :mod:`.torch_checkpoint`: PyTorch checkpoint files in (``read_torch_checkpoint``, ``convert_state_dict``,
  ``convert_checkpoint``) and out (``export_torch_state_dict``, ``export_torch_checkpoint``).
* :mod:`.torch_models`: the ``sam2`` package's models as references (``build_torch_model``, ``perturb_``,
  ``perturbed_torch_model``) and tensor <-> array helpers.
* :mod:`.parity`: PyTorch and this port side by side, per-module errors (``convert/parity.py``, tests).
* :mod:`.torch_reference`: SAM 2's training forward and loss in PyTorch (tests, benchmarks).

torch and ``sam2`` are imported inside the functions that need them, and this package imports none of its
modules by itself.
"""
