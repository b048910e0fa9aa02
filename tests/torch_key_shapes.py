"""The key and shape list of a SAM 2 checkpoint, read from the installed ``sam2`` package at test time.

Every size is built by the package's own ``sam2.build_sam.build_sam2`` from the config file that
``medsam2_jax.interop.torch_models`` names for it (``torch_config_name``: one table of config files), inside
``torch.device("meta")``: parameters and buffers get shapes and dtypes but no storage and no random
initialisation, so even the large model costs well under a second and no weight memory. The package's
default config is used (image size 1024, as Meta's released checkpoints); the state-dict shapes do not
depend on the image size anyway.

One construction-time call needs real values: Hiera computes its stochastic-depth rates with
``[x.item() for x in torch.linspace(0, drop_path_rate, depth)]``, and a meta tensor has no value to
return. While the model is built, ``torch.linspace`` therefore defaults to the CPU (an explicit
``device=`` overrides the meta device context); every other tensor stays on the meta device.

The result, ``{key: shape}`` in ``state_dict()`` order, equals the released checkpoints' keys and shapes
(all float32); the tests that use it compare against our own Flax modules and size detection, so a sam2
package that changed its modules would show up there as a failure, not be silently absorbed.
"""

from __future__ import annotations

import functools
from unittest import mock


@functools.lru_cache(maxsize=None)
def _meta_key_shapes(model_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch
    from sam2.build_sam import build_sam2

    from medsam2_jax.interop.torch_models import torch_config_name

    cpu_linspace = functools.partial(torch.linspace, device="cpu")
    with torch.device("meta"), mock.patch.object(torch, "linspace", cpu_linspace):
        model = build_sam2(torch_config_name(model_name), None, device="meta", mode="eval")
    return tuple((k, tuple(int(d) for d in v.shape)) for k, v in model.state_dict().items())


def sam2_key_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of the PyTorch SAM 2 ``model_name`` (any name ``sizes.get_spec`` accepts).

    A fresh dict on every call (callers edit theirs); the model is built once per process and name.
    """
    return dict(_meta_key_shapes(model_name))
