"""The tracker's entry points: :func:`track` (encode, then propagate), and the jitted :func:`propagate_jit`,
:func:`run_sequence` and :func:`propagate_many` on already encoded frames (one jitted propagation,
``_propagate_jit``, serves the first two and :func:`track`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.sam2 import SAM2, resize_bilinear
from .config import Array, Direction, TrackerConfig, check_direction
from .encode import as_frames, encode_devices, encode_frames
from .prompts import Prompts, check_tracker_prompts
from .scan import propagate

# Python-side trace counter of the jitted propagation, per direction (tests check that data never retraces).
TRACE_COUNTS: dict[str, int] = {"forward": 0, "backward": 0, "both": 0}


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "direction"))
def _propagate_jit(graphdef, state, feats, prompts, key, cfg, direction):
    TRACE_COUNTS[direction] = TRACE_COUNTS.get(direction, 0) + 1  # runs only while tracing
    return propagate(nnx.merge(graphdef, state), feats, prompts, key, cfg, direction)


def run_sequence(model: SAM2, feats: dict[str, Any], prompts: Prompts, key: jax.Array, cfg: TrackerConfig,
                 direction: str = "forward") -> dict[str, Any]:
    """:func:`propagate`, jitted once per (model structure, config, shapes), on already encoded frames,
    without :func:`propagate_jit`'s host-side checks. The same computation as :func:`track` without the
    encoding; shared by the 3D, one-prompt and diagnostic tools."""
    graphdef, state = nnx.split(model)
    return _propagate_jit(graphdef, state, feats, prompts, key, cfg, direction)


def propagate_jit(
    model: SAM2,
    feats: dict[str, Any],
    prompts: Prompts,
    *,
    config: TrackerConfig = TrackerConfig(),
    direction: Direction = "forward",
    key: Array | None = None,
) -> dict[str, Array]:
    """:func:`propagate`, jitted (one compile per model structure, config, direction and shapes; weights,
    prompts, prompted frames and prompt types are data)."""
    check_direction(direction)
    check_tracker_prompts(prompts, feats["fpn"][-1].shape[0], model.image_size)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    return _propagate_jit(graphdef, state, feats, prompts, key, config, direction)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "direction"))
def _propagate_many_jit(graphdef, state, feats, prompts, keys, cfg, direction):
    model = nnx.merge(graphdef, state)
    return jax.vmap(lambda f, p, k: propagate(model, f, p, k, cfg, direction))(feats, prompts, keys)


def propagate_many(
    model: SAM2,
    feats: dict[str, Any],
    prompts: Prompts,
    *,
    config: TrackerConfig = TrackerConfig(),
    direction: Direction = "forward",
    key: Array | None = None,
    devices: int | None = None,
) -> dict[str, Array]:
    """:func:`propagate` over V sequences (volumes, or one volume's orientations) of the same length at once:
    one ``vmap``ped, jitted scan, to fill an accelerator that one sequence leaves idle.

    ``feats``: :func:`encode_frames` outputs stacked on a new leading axis (each leaf ``(V, T, ...)``; see
    :func:`stack_features`); ``prompts``: a :class:`Prompts` whose arrays have a leading V axis (each
    sequence's own B objects, the same B and slot count for all). Sequence ``v`` uses the key
    ``fold_in(key, v)``. With ``devices`` (0 = all local devices) the V axis is split over that many devices
    (V must divide by it), each tracking its own sequences; the result does not depend on it. Returns
    :func:`propagate`'s outputs with a leading V axis.
    """
    check_direction(direction)
    v = feats["fpn"][-1].shape[0]
    if prompts.frame_idx.shape[0] != v:
        raise ValueError(f"propagate_many: feats hold {v} sequences but prompts {prompts.frame_idx.shape[0]}")
    for i in range(v):
        check_tracker_prompts(jax.tree.map(lambda a: a[i], prompts), feats["fpn"][-1].shape[1], model.image_size)
    key = jax.random.key(0) if key is None else key
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(v))
    graphdef, state = nnx.split(model)
    if devices is not None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        devs = encode_devices(devices)
        if v % len(devs):
            raise ValueError(f"propagate_many: {v} sequences do not split over {len(devs)} devices; pad V to a "
                             f"multiple of {len(devs)} or pass devices=None")
        mesh = Mesh(np.array(devs), ("volumes",))
        split = NamedSharding(mesh, P("volumes"))
        feats, prompts, keys = jax.device_put((feats, prompts, keys), split)
        state = jax.device_put(state, NamedSharding(mesh, P()))
    return _propagate_many_jit(graphdef, state, feats, prompts, keys, config, direction)


def track(
    model: SAM2,
    frames: Array,
    prompts: Prompts,
    *,
    direction: Direction = "both",
    config: TrackerConfig = TrackerConfig(),
    key: Array | None = None,
    output_size: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict[str, Array]:
    """Segment and track the prompted objects through ``frames`` (T, S, S, 3), normalised.

    Returns (B objects, T frames, ...) arrays: ``mask_logits`` at ``output_size`` (default S x S, bilinear
    like SAM 2), ``low_res_masks`` (S/4), ``iou``, ``object_score_logits``, ``visited``.
    """
    check_direction(direction)
    frames = as_frames(frames)
    model.check_images(frames)
    check_tracker_prompts(prompts, frames.shape[0], model.image_size)
    feats = encode_frames(model, frames, batch=config.encode_batch, progress=progress,
                          devices=config.encode_devices)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    out = _propagate_jit(graphdef, state, feats, prompts, key, config, direction)
    size = output_size or (model.image_size, model.image_size)
    out["mask_logits"] = resize_bilinear(out["low_res_masks"], size, antialias=False)
    return out
