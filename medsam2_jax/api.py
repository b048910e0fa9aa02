"""Models and model directories: build, randomly initialise, save and load (no torch).

* :func:`save_model` / :func:`load_model` write and read a model directory (orbax ``params/`` with PyTorch
  key names + ``medsam2.json``); loading needs no torch and may use another image size than the one
  converted at.
* :func:`build_model` / :func:`random_model`: a model of a given size, unfilled or randomly initialised.

PyTorch checkpoints in and out (``read_torch_checkpoint``, ``convert_state_dict``, ``convert_checkpoint``,
``export_torch_checkpoint``) are in :mod:`medsam2_jax.interop.torch_checkpoint`; :class:`CheckpointError` and the
strict tensor check (:func:`check_tensors`) serve both.

Every model returned here is concrete (no abstract ``ShapeDtypeStruct`` left from the allocation-free
construction) and in eval mode (``model.eval()``: the mask decoder's dynamic multimask fallback is on, as in
SAM 2's predictors). The model holds no RNG state: dropout in the memory attention only runs when a caller
passes ``deterministic=False`` together with an ``nnx.Rngs``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from .interop import weights
from .model.sam2 import SAM2
from .model.sizes import get_spec

FORMAT_VERSION = 1
META_FILE = "medsam2.json"
PARAMS_DIR = "params"
_CONVERT_HINT = "python convert/sam2_to_flax.py --checkpoint FILE.pt --model-name NAME --out DIR"
_SHOWN = 12  # keys listed per kind of problem in an error message


class CheckpointError(ValueError):
    """A checkpoint file or model directory that cannot be read or does not fit the requested model."""


def check_image_size(image_size: Any) -> int:
    """``image_size`` as an int, or a ValueError unless it is a positive multiple of 32."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise ValueError(f"image_size must be an int (a positive multiple of 32), got {image_size!r}")
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32 (e.g. 512 or 1024), got {image_size}")
    return int(image_size)


def _torch_shape(entry: weights.Entry) -> tuple[int, ...]:
    """The PyTorch-layout shape of a (possibly abstract) Flax variable, allocating nothing."""
    want = tuple(entry.variable.get_value().shape)
    return tuple(entry.rule.to_torch(np.broadcast_to(np.float32(0), want)).shape)


def check_tensors(state_dict: Mapping[str, np.ndarray], model: SAM2, source: str) -> None:
    """Strict one-to-one check of keys, shapes and values, with what to do about each problem."""
    expected = {e.torch_key: _torch_shape(e) for e in weights.iter_entries(model)}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    bad_shape = [
        f"{k}: the file has {tuple(np.shape(state_dict[k]))}, a {model.model_name} model expects {expected[k]}"
        for k in sorted(expected.keys() & state_dict.keys())
        if tuple(np.shape(state_dict[k])) != expected[k]
    ]
    non_finite = []
    for k in sorted(expected.keys() & state_dict.keys()):
        v = np.asarray(state_dict[k])
        if v.shape == expected[k]:
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            if bad:
                non_finite.append(f"{k}: {bad} of {v.size} values are NaN or inf")
    if not (missing or unexpected or bad_shape or non_finite):
        return
    lines = [f"{source} does not fit a {model.model_name} model ({len(expected)} tensors):"]

    def listing(title: str, items: list[str], fix: str) -> None:
        more = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
        lines.append(f"  {title} {len(items)}{more}: " + "; ".join(items[:_SHOWN]))
        lines.append(f"    -> {fix}")

    if missing:
        listing("missing tensor(s)", missing,
                "the file is incomplete or from a modified model; use the full state dict of a SAM 2 model")
    if unexpected:
        listing("unexpected tensor(s)", unexpected,
                "remove the keys of modules a SAM 2 model does not have (added in fine-tuning?) before converting")
    if bad_shape:
        listing("mis-shaped tensor(s)", bad_shape,
                "the file was saved from a model with other hyper-parameters; it cannot be converted as "
                f"{model.model_name}")
    if non_finite:
        listing("non-finite tensor(s)", non_finite,
                "the weights are corrupt (a diverged training run or a damaged file); use another checkpoint")
    raise CheckpointError("\n".join(lines))


# ------------------------------------------------------------------------------------------ models
def build_model(model_name: str, image_size: int = 1024, *, abstract: bool = False, seed: int = 0) -> SAM2:
    """A SAM 2 of the given size at ``image_size`` (a positive multiple of 32).

    ``abstract=True`` allocates nothing: every parameter is a ``jax.ShapeDtypeStruct`` placeholder, to be
    filled by :func:`weights.load_state_dict` (the model is not usable before that;
    :func:`medsam2_jax.interop.torch_checkpoint.convert_state_dict` and :func:`load_model` fill it and check).
    Otherwise the parameters are SAM 2's random initialisation from ``seed``.
    """
    image_size = check_image_size(image_size)
    name = get_spec(model_name).name  # clear error on an unknown name
    ctor = lambda: SAM2(name, image_size, rngs=nnx.Rngs(seed))
    if abstract:
        return nnx.eval_shape(ctor)
    model = ctor()
    model.eval()
    return model


def abstract_paths(model: nnx.Module) -> list[str]:
    """Paths of the model's state leaves that are not concrete arrays (empty for a usable model)."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    return [jax.tree_util.keystr(p) for p, leaf in leaves if not isinstance(leaf, jax.Array)]


def finish_model(model: SAM2, source: str) -> SAM2:
    left = abstract_paths(model)
    if left:
        raise RuntimeError(
            f"{source}: {len(left)} model variable(s) were not filled by the checkpoint: {', '.join(left[:_SHOWN])}"
        )
    model.eval()
    return model


RANDOM_INITS = ("torch", "flax")


def random_model(model_name: str = "sam2.1_hiera_t", image_size: int = 512, seed: int = 0, *, init: str = "torch",
                 object_bias: float = 0.0) -> SAM2:
    """A randomly initialised model (demos, benchmarks and tests; no pretrained weights are needed). Its
    outputs mean nothing. Deterministic per ``seed``.

    ``init="torch"`` (default) is quick to build (the values are drawn by NumPy into an unallocated model,
    no XLA compile): kernels and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with PyTorch's fan-in
    (``nn.Linear`` / ``nn.Conv2d`` defaults), embeddings and the random-Fourier matrix ``N(0, 1)``, LayerNorm
    scales ``1 + 0.02 N(0, 1)`` and biases ``0.02 N(0, 1)``, every other parameter (position embeddings,
    memory and pointer embeddings, layer-scale gammas) ``0.02 N(0, 1)``: nothing is exactly 0 or 1, so a
    random model is not degenerate.

    ``init="flax"``: the modules' own Flax initialisation plus ``0.02 N(0, 1)`` on every parameter. It gives
    livelier IoU and object scores, which the bank's, the volume's and the one-prompt tests rely on; it
    initialises eagerly (one small XLA compile per parameter shape: slow on CPU), so its values are cached
    per process and every call returns a fresh model loaded from them.

    ``object_bias`` is added to the object-score head's last bias (``+2`` makes the object present, so that
    masks are not all at SAM 2's -1024 "no object" score).
    """
    if init not in RANDOM_INITS:
        raise ValueError(f"random_model: init={init!r}, expected one of {RANDOM_INITS}")
    model = build_model(model_name, image_size, abstract=True)
    if init == "flax":
        weights.load_state_dict(model, _flax_init_state_dict(model_name, int(image_size), int(seed)),
                                source="random")
    else:
        _torch_style_init(model, seed)
    if object_bias:
        head = model.sam_mask_decoder.pred_obj_score_head
        last = head.layers[len(head.layers) - 1] if hasattr(head, "layers") else head
        last.bias.set_value(last.bias.get_value() + object_bias)
    return finish_model(model, "random_model")


@functools.lru_cache(maxsize=2)
def _flax_init_state_dict(model_name: str, image_size: int, seed: int) -> dict[str, np.ndarray]:
    model = build_model(model_name, image_size, seed=seed)
    rng = np.random.default_rng(seed)
    for e in weights.iter_entries(model):
        v = np.asarray(e.variable.get_value())
        e.variable.set_value(jax.numpy.asarray(v + 0.02 * rng.standard_normal(v.shape).astype(v.dtype)))
    sd = weights.export_state_dict(model)
    for v in sd.values():
        v.setflags(write=False)
    return sd


def _torch_style_init(model: SAM2, seed: int) -> None:
    from .model.common import Buffer, Embedding, LayerNorm

    rng = np.random.default_rng(seed)
    entries = list(weights.iter_entries(model))
    kernel_shape = {id(e.module): _torch_shape(e) for e in entries if e.rule.torch_name == "weight"}
    for e in entries:
        shape = _torch_shape(e)
        if isinstance(e.module, LayerNorm):
            value = (e.rule.torch_name == "weight") + 0.02 * rng.standard_normal(shape)
        elif isinstance(e.module, Embedding) or isinstance(e.variable, Buffer):
            value = rng.standard_normal(shape)
        elif e.rule.flax_name == "":  # a raw parameter of a composite module
            value = 0.02 * rng.standard_normal(shape)
        else:  # Linear, Conv2d, ConvTranspose2d weight or bias: PyTorch's fan-in of the weight
            w = kernel_shape[id(e.module)]
            bound = 1.0 / np.sqrt(w[1] * int(np.prod(w[2:], dtype=np.int64)))
            value = rng.uniform(-bound, bound, shape)
        dtype = e.variable.get_value().dtype
        e.variable.set_value(jax.numpy.asarray(e.rule.to_flax(np.asarray(value, np.float32)), dtype))


# ------------------------------------------------------------------------------------------ model directories
def save_model(model: SAM2, directory: str | os.PathLike, *, source: str = "") -> Path:
    """Write ``directory/params`` (orbax, PyTorch key names) and ``directory/medsam2.json``.

    The calling process writes alone, also in a multi-process (``jax.distributed``) program: the model's
    arrays are whole on this host (a multi-host caller gathers them first) and the other processes neither
    call this nor wait on it (the training loop has process 0 call it after gathering the final parameters
    on every process)."""
    import shutil

    import orbax.checkpoint as ocp

    if not isinstance(model, SAM2):
        raise TypeError(f"save_model expects a medsam2_jax SAM2 model, got {type(model).__name__}")
    left = abstract_paths(model)
    if left:
        raise ValueError(f"cannot save a model with unfilled (abstract) variables: {', '.join(left[:_SHOWN])}")
    directory = Path(directory).absolute()
    if directory.is_file():
        raise CheckpointError(f"{directory}: is a file; save_model writes a directory")
    directory.mkdir(parents=True, exist_ok=True)
    sd = weights.export_state_dict(model)
    params_dir = directory / PARAMS_DIR
    if params_dir.exists():
        shutil.rmtree(params_dir)
    # orbax synchronises every process of a jax.distributed program around a save by default, so a save by
    # one process would wait for ever (or time out) for the others; naming this process as the only active
    # one (and the primary) makes it write everything and skip the barriers. Same as the default with one
    # process.
    with ocp.StandardCheckpointer(multiprocessing_options=_only_this_process(ocp)) as ckptr:
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


def _only_this_process(ocp):
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def load_model(directory: str | os.PathLike, *, image_size: int | None = None) -> SAM2:
    """Load a model written by :func:`save_model` (or ``convert/sam2_to_flax.py``), concrete and in eval mode.

    The calling process reads alone, also in a multi-process program: each process that calls it loads its
    own copy, and the others neither call it nor wait on it.

    ``image_size`` may differ from the one converted at (any positive multiple of 32): every parameter is
    resolution-independent (Hiera's position embeddings are interpolated at run time).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.is_file():
        raise CheckpointError(
            f"{directory}: is a file; load_model reads a model directory. Convert a PyTorch checkpoint first: "
            f"`{_CONVERT_HINT}`"
        )
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such model directory")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory}: not a medsam2-jax model directory ({META_FILE} missing); convert a PyTorch checkpoint "
            f"with `{_CONVERT_HINT}`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        name, saved_size = str(meta["model_name"]), int(meta["image_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable model description ({type(e).__name__}: {e}); "
                              "convert the checkpoint again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, this medsam2-jax reads "
            f"{FORMAT_VERSION}; convert the checkpoint again"
        )
    size = check_image_size(saved_size if image_size is None else image_size)
    spec = get_spec(name)
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: {PARAMS_DIR}/ is missing (an interrupted conversion?); convert again")
    try:  # this process reads alone, as save_model writes alone (no barrier with other processes)
        with ocp.StandardCheckpointer(multiprocessing_options=_only_this_process(ocp)) as ckptr:
            tree = ckptr.restore(params_dir)
    except Exception as e:
        raise CheckpointError(
            f"{params_dir}: cannot be restored ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the directory is damaged or incomplete, convert the checkpoint again"
        ) from None
    sd = {k: np.asarray(v) for k, v in _flatten(tree).items()}
    model = build_model(spec.name, size, abstract=True)
    check_tensors(sd, model, str(directory))
    weights.load_state_dict(model, sd, source=str(directory))
    return finish_model(model, str(directory))


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
