"""PyTorch SAM 2 checkpoints in and out: the torch half of :mod:`medsam2_jax.api`.

* :func:`read_torch_checkpoint` reads Meta's SAM 2 / 2.1 files (``{"model": state_dict}``), bare state dicts
  and Medical-SAM2 fine-tuned files (``{"model": ..., "parameter": ...}``, possibly bf16, possibly with a
  DataParallel ``module.`` prefix) into NumPy float32 arrays. Needs torch.
* :func:`convert_state_dict` checks the model size and version against the tensor shapes and fills a Flax
  model strictly: a missing, extra, mis-shaped or non-finite tensor is a :class:`CheckpointError` naming it.
  :func:`convert_checkpoint` is both steps.
* :func:`export_torch_state_dict` / :func:`export_torch_checkpoint` go back to PyTorch names and layouts
  (bit-exact round trip).

Model directories (:func:`medsam2_jax.api.save_model` / :func:`medsam2_jax.api.load_model`) need no torch.
torch is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..api import CheckpointError, build_model, check_image_size, check_tensors, finish_model
from ..model.sam2 import SAM2
from ..model.sizes import SPECS, detect_size, get_spec
from . import weights

_PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"


# ------------------------------------------------------------------------------------------ PyTorch in
def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch SAM 2 checkpoint into ``{key: float32 array}`` (keys as stored, prefix included).

    Accepts ``{"model": state_dict, ...}`` (Meta's files; Medical-SAM2's add ``"parameter"``, ignored),
    ``{"state_dict": ...}`` and a bare state dict. Tensors of any floating dtype (bf16, fp16) are upcast to
    float32, which is exact.
    """
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory, expected a PyTorch checkpoint file (.pt/.pth); a directory written by the "
            "converter is loaded with medsam2_jax.load_model(DIR)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); download or save it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle at all, or a damaged one
            raise CheckpointError(
                f"{path}: cannot be read as a PyTorch checkpoint (neither a zip archive nor a pickle written by "
                f"torch.save; {size:,} bytes). Is it the right file, and complete?"
            ) from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors and containers "
            f"({found.group(1) if found else 'a pickled class'}), which are not loaded for safety; save only "
            "the weights: torch.save({'model': model.state_dict()}, FILE)"
        ) from None
    except Exception as e:  # truncated zip, unreadable file
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Is the file complete ({size:,} bytes here; compare with the published size) and written by "
            "torch.save?"
        ) from None
    sd: Any
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd, where = obj["model"], "['model']"
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd, where = obj["state_dict"], "['state_dict']"
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, where = obj, ""
    else:
        found = (f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping)
                 else f"a {type(obj).__name__}")
        raise CheckpointError(
            f"{path}: expected a SAM 2 checkpoint, i.e. {{'model': state_dict}} or a state dict of tensors, "
            f"found {found}"
        )
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if not (v.dtype.is_floating_point):
            raise CheckpointError(f"{path}{where}: tensor {k!r} has dtype {v.dtype}; SAM 2 weights are floating point")
        out[str(k)] = v.detach().to(torch.float32).cpu().numpy()
    if not out:
        raise CheckpointError(f"{path}{where}: the state dict is empty")
    return out


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Remove a wrapper prefix shared by the SAM 2 keys (DataParallel's ``module.``, or e.g. ``model.``).

    The prefix is what precedes ``image_encoder.trunk.patch_embed.proj.weight``; keys without it are kept
    as they are (and will be reported as unexpected by :func:`convert_state_dict`).
    """
    root = next((k[: -len(_PATCH_KEY)] for k in state_dict if k.endswith(_PATCH_KEY)), "")
    if not root:
        return dict(state_dict)
    return {(k[len(root):] if k.startswith(root) else k): v for k, v in state_dict.items()}


def _describe(name: str) -> str:
    s = SPECS[name]
    return f"{name} ({s.size}, SAM {s.version}: embed dim {s.embed_dim}, {s.depth} Hiera blocks)"


def _check_size(shapes: Mapping[str, tuple], model_name: str, source: str) -> None:
    spec = get_spec(model_name)
    try:
        actual = detect_size(shapes)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if actual == spec.name:
        return
    real = SPECS[actual]
    if real.size == spec.size:  # same image encoder, other version
        what = ("has obj_ptr_tpos_proj and no_obj_embed_spatial" if real.is_2_1
                else "has no obj_ptr_tpos_proj / no_obj_embed_spatial tensors")
        raise CheckpointError(
            f"{source} is a SAM {real.version} checkpoint ({what}), not SAM {spec.version}: "
            f"convert it as --model-name {actual} (model_name={actual!r}) instead of {spec.name}"
        )
    raise CheckpointError(
        f"{source} holds a {_describe(actual)} model, not {_describe(spec.name)}: "
        f"convert it as --model-name {actual} (model_name={actual!r})"
    )


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model_name: str, image_size: int = 1024, *, source: str = "checkpoint"
) -> SAM2:
    """Strictly fill a new model from a PyTorch-named state dict, after checking the model size and version.

    A wrapper prefix (``module.``) is removed first (:func:`strip_prefix`). ``source`` names the file in
    error messages.
    """
    image_size = check_image_size(image_size)
    spec = get_spec(model_name)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"{source}: the state dict is empty or not a mapping of tensors")
    sd = strip_prefix(state_dict)
    _check_size({k: tuple(np.shape(v)) for k, v in sd.items()}, spec.name, source)
    model = build_model(spec.name, image_size, abstract=True)
    check_tensors(sd, model, source)
    # Private float32 copies: on CPU, jnp.asarray may alias a NumPy buffer (zero copy), and the caller's arrays
    # are often views of live torch tensors; an in-place torch update must not reach into the JAX model.
    sd = {k: np.array(v, dtype=np.float32) for k, v in sd.items()}
    try:
        weights.load_state_dict(model, sd, source=source)
    except weights.WeightMismatchError as e:  # _check_tensors should have caught it
        raise CheckpointError(str(e)) from None
    return finish_model(model, source)


def convert_checkpoint(path: str | os.PathLike, model_name: str, image_size: int = 1024) -> SAM2:
    """:func:`read_torch_checkpoint` then :func:`convert_state_dict`."""
    return convert_state_dict(read_torch_checkpoint(path), model_name, image_size, source=str(path))


# ------------------------------------------------------------------------------------------ PyTorch out
def export_torch_state_dict(model: SAM2) -> dict[str, np.ndarray]:
    """The model's weights under SAM 2's PyTorch names and layouts (float32 NumPy arrays)."""
    return weights.export_state_dict(model)


def export_torch_checkpoint(model: SAM2, path: str | os.PathLike) -> Path:
    """Write ``{"model": state_dict}`` (float32), loadable by the ``sam2`` package's ``build_sam2``."""
    import torch

    path = Path(path)
    sd = export_torch_state_dict(model)
    torch.save({"model": {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in sd.items()}}, path)
    return path
