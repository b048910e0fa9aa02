"""medsam2-jax: Medical SAM 2 (SAM 2 with a self-sorting memory bank) in JAX / Flax NNX.

The public API, imported lazily (``import medsam2_jax`` loads neither JAX nor Flax; the first use of a name
does)::

    import medsam2_jax as ms

    model = ms.load_model("models/tiny")               # a directory written by convert/sam2_to_flax.py
    feats = model.encode_image(ms.normalize_images(images01))   # (B, S, S, 3) in [0, 1], NHWC
    out = model.predict_masks(feats, points=pts, labels=labs, boxes=None, mask_inputs=None, multimask=True)
    # out["masks"] (B, M, S/4, S/4) low-res logits, out["iou"], out["object_score_logits"], out["obj_ptr"]

    cfg = ms.TrackerConfig(bank=ms.BankConfig())        # self-sorting bank; BankConfig.sam2_fifo() = SAM 2
    prompts = ms.make_prompts([[{"frame": 0, "points": [[x, y]], "labels": [1]}]],
                              num_frames=T, image_size=S, config=cfg)
    res = ms.track(model, frames, prompts, direction="both", config=cfg)

Models: :func:`load_model`, :func:`save_model`, :func:`build_model`, :func:`random_model`,
:class:`CheckpointError` (``medsam2_jax.api``); PyTorch checkpoints: :func:`convert_checkpoint`,
:func:`convert_state_dict`, :func:`read_torch_checkpoint`, :func:`export_torch_state_dict`,
:func:`export_torch_checkpoint` (``medsam2_jax.interop.torch_checkpoint``); the module :class:`SAM2`
and :func:`normalize_images` (``medsam2_jax.model.sam2``); tracking: :func:`track`, :func:`make_prompts`,
:class:`TrackerConfig`, :class:`Prompts`, :func:`encode_frames`, :func:`propagate`, :func:`propagate_many`
(``medsam2_jax.tracking``) and :class:`BankConfig` (``medsam2_jax.memory.bank``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "medsam2_jax.api",
    "save_model": "medsam2_jax.api",
    "build_model": "medsam2_jax.api",
    "random_model": "medsam2_jax.api",
    "convert_checkpoint": "medsam2_jax.interop.torch_checkpoint",
    "convert_state_dict": "medsam2_jax.interop.torch_checkpoint",
    "read_torch_checkpoint": "medsam2_jax.interop.torch_checkpoint",
    "export_torch_state_dict": "medsam2_jax.interop.torch_checkpoint",
    "export_torch_checkpoint": "medsam2_jax.interop.torch_checkpoint",
    "CheckpointError": "medsam2_jax.api",
    "SAM2": "medsam2_jax.model.sam2",
    "normalize_images": "medsam2_jax.model.sam2",
    "track": "medsam2_jax.tracking",
    "make_prompts": "medsam2_jax.tracking",
    "encode_frames": "medsam2_jax.tracking",
    "propagate": "medsam2_jax.tracking",
    "propagate_many": "medsam2_jax.tracking",
    "stack_features": "medsam2_jax.tracking",
    "TrackerConfig": "medsam2_jax.tracking",
    "Prompts": "medsam2_jax.tracking",
    "BankConfig": "medsam2_jax.memory.bank",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names resolve lazily
    from .api import CheckpointError, build_model, load_model, random_model, save_model  # noqa: F401
    from .interop.torch_checkpoint import (  # noqa: F401
        convert_checkpoint, convert_state_dict, export_torch_checkpoint, export_torch_state_dict, read_torch_checkpoint)
    from .memory.bank import BankConfig  # noqa: F401
    from .model.sam2 import SAM2, normalize_images  # noqa: F401
    from .tracking import Prompts, TrackerConfig, encode_frames, make_prompts, propagate, propagate_many, stack_features, track  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medsam2_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
