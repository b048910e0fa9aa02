"""Loading and saving models: PyTorch checkpoints in, orbax checkpoints out, and back.

* :func:`read_torch_checkpoint` reads Meta's SAM 2 / 2.1 files (``{"model": state_dict}``), bare state dicts
  and Medical-SAM2 fine-tuned files (``{"model": ..., "parameter": ...}``, possibly bf16, possibly with a
  DataParallel ``module.`` prefix) into NumPy float32 arrays. Needs torch.
* :func:`convert_state_dict` checks the model size against the tensor shapes and fills a Flax model strictly.
* :func:`save_model` / :func:`load_model` write and read an orbax checkpoint directory
  (``params/`` + ``medsam2.json``), with no torch needed to load.
* :func:`export_torch_state_dict` goes back to PyTorch names and layouts (bit-exact round trip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import weights
from .model.sam2 import SAM2
from .model.sizes import detect_size, get_spec

FORMAT_VERSION = 1
META_FILE = "medsam2.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the requested model."""


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch SAM 2 checkpoint into ``{key: float32 array}``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, not a torch file
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). "
            "Is the file complete (compare its size with the published one) and a .pt/.pth saved by torch.save?"
        ) from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and any(hasattr(v, "shape") for v in obj.values()):
        sd = obj
    else:
        keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected a SAM 2 checkpoint ({{'model': state_dict}} or a state dict), found {keys}"
        )
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.detach().to(torch.float32).cpu().numpy()
    return out


def build_model(model_name: str, image_size: int = 1024, *, abstract: bool = False, seed: int = 0) -> SAM2:
    """A SAM 2 of the given size; ``abstract=True`` allocates nothing (to be filled by a checkpoint)."""
    get_spec(model_name)  # clear error on an unknown name
    ctor = lambda: SAM2(model_name, image_size, rngs=nnx.Rngs(seed))
    return nnx.eval_shape(ctor) if abstract else ctor()


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model_name: str, image_size: int = 1024, *, source: str = "checkpoint"
) -> SAM2:
    """Strictly fill a new model from a PyTorch-named state dict, after checking the model size."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    spec = get_spec(model_name)
    try:
        actual = detect_size(shapes)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if get_spec(actual).name != spec.name:
        raise CheckpointError(
            f"{source} holds a {get_spec(actual).name} model, not {spec.name}: pass --model {get_spec(actual).name}"
        )
    model = build_model(spec.name, image_size, abstract=True)
    try:
        weights.load_state_dict(model, state_dict, source=source)
    except weights.WeightMismatchError as e:
        raise CheckpointError(str(e)) from None
    return model


def export_torch_state_dict(model: SAM2) -> dict[str, np.ndarray]:
    return weights.export_state_dict(model)


def save_model(model: SAM2, directory: str | os.PathLike, *, source: str = "") -> Path:
    """Write ``directory/params`` (orbax, PyTorch key names) and ``directory/medsam2.json``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    sd = weights.export_state_dict(model)
    params_dir = directory / "params"
    if params_dir.exists():
        import shutil

        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, _nest(sd))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        "image_size": model.image_size,
        "source": str(source),
        "num_tensors": len(sd),
        "num_params": int(sum(v.size for v in sd.values())),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_model(directory: str | os.PathLike, *, image_size: int | None = None) -> SAM2:
    """Load a model written by :func:`save_model` (or ``convert/sam2_to_flax.py``).

    ``image_size`` may differ from the one converted at (any multiple of 32): every parameter is
    resolution-independent (Hiera's position embeddings are interpolated at run time).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory}: not a medsam2-jax model directory ({META_FILE} missing); convert a PyTorch checkpoint "
            "with `python convert/sam2_to_flax.py --checkpoint FILE.pt --model NAME --out DIR`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    size = int(image_size or meta["image_size"])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(directory / "params")
    sd = {k: np.asarray(v) for k, v in _flatten(tree).items()}
    model = build_model(meta["model_name"], size, abstract=True)
    weights.load_state_dict(model, sd, source=str(directory))
    return model


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b.0.c": x}`` -> ``{"a": {"b": {"0": {"c": x}}}}`` (orbax stores nested trees)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def random_model(model_name: str = "sam2.1_hiera_t", image_size: int = 512, seed: int = 0) -> SAM2:
    """A randomly initialised model (demos and tests; no pretrained weights can be downloaded here)."""
    model = build_model(model_name, image_size, seed=seed)
    # Perturb zero/one initialisations (position embeddings, norms) so a random model is not degenerate.
    key = jax.random.key(seed)
    for i, e in enumerate(weights.iter_entries(model)):
        v = e.variable.get_value()
        e.variable.set_value(v + 0.02 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
    return model
