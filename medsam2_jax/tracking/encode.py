"""Batched image encoding of a whole sequence before tracking (:func:`encode_frames`), optionally split
over local devices, and the helpers on its output (the ``{"fpn", "pos"}`` features of T frames): taking,
concatenating, padding and stacking frames."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.sam2 import SAM2
from .config import Array


def as_frames(frames: Any) -> Array:
    """Frames as one (T, S, S, 3) array, with clear errors for an empty sequence, a wrong rank or frames of
    different sizes (a list of frames is stacked)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is an empty sequence: give at least one (S, S, 3) frame")
        shapes = [tuple(np.shape(f)) for f in frames]
        if len(set(shapes)) > 1:
            odd = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
            raise ValueError(f"frames have different sizes: frame 0 is {shapes[0]}, frame {odd} is {shapes[odd]}; "
                             "resize every frame to the model's S x S first")
        frames = jnp.stack([jnp.asarray(f) for f in frames])
    frames = jnp.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a (T, S, S, 3) array, got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError(f"the sequence is empty: frames has shape {tuple(frames.shape)}, T must be >= 1")
    return frames


def _encode_chunk(model: SAM2, images: Array) -> dict[str, Any]:
    out = model.encode_image(images)
    return {"fpn": out["backbone_fpn"], "pos": [p[:1] for p in out["vision_pos_enc"]]}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_chunk_jit(graphdef, state, images):
    return _encode_chunk(nnx.merge(graphdef, state), images)


ENCODE_AXIS = "frames"


def encode_devices(n: int) -> list[jax.Device]:
    """The first ``n`` local devices (all of them for 0), with a clear error when there are fewer."""
    local = jax.local_devices()
    if n == 0:
        return local
    if n > len(local):
        raise ValueError(
            f"encode_devices={n} but this process has {len(local)} local {local[0].platform} device(s); use at "
            f"most {len(local)} (0 = all). On CPU, create N devices with "
            f"jax.config.update('jax_num_cpu_devices', N) before any array is made"
        )
    return local[:n]


@functools.lru_cache(maxsize=16)
def _sharded_encoder(graphdef, mesh):
    """The image encoder as one SPMD program: each device of ``mesh`` encodes its own slice of the batch."""
    from jax.sharding import PartitionSpec as P

    def body(state, images):
        out = _encode_chunk(nnx.merge(graphdef, state), images)
        return out["fpn"], out["pos"]

    spec = P(ENCODE_AXIS)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), spec), out_specs=(spec, spec)))


def encode_frames(
    model: SAM2, frames: Array, batch: int = 8, progress: bool = False, devices: int = 1
) -> dict[str, Any]:
    """Encode (T, S, S, 3) normalised frames in batches of ``batch`` per device (one compile per batch size).

    ``devices`` > 1 (0 = all local devices) splits every call's frames over that many local devices, each
    encoding ``batch`` of them at once (data parallel; the weights are replicated once per call of this
    function), and gathers the features on the first device, where tracking runs. The frames' features do
    not depend on each other, so the result equals the single-device one up to float rounding.

    Returns ``{"fpn": [3 levels with a leading T axis], "pos": [3 position encodings, leading axis 1]}``;
    the position encodings do not depend on the frame, so one copy is kept.
    """
    frames = as_frames(frames)
    model.check_images(frames)
    t = frames.shape[0]
    graphdef, state = nnx.split(model)
    devs = encode_devices(devices)
    if len(devs) > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        mesh = Mesh(np.asarray(devs), (ENCODE_AXIS,))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        to_mesh = NamedSharding(mesh, P(ENCODE_AXIS))
        encoder = _sharded_encoder(graphdef, mesh)
        step = batch * len(devs)
    else:
        step = batch
    chunks = []
    rng = range(0, t, step)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="encode frames", unit="batch")
    for start in rng:
        x = frames[start : start + step]
        n = x.shape[0]
        if n < step:
            x = jnp.concatenate([x, jnp.zeros((step - n,) + x.shape[1:], x.dtype)])
        if len(devs) > 1:
            fpn, pos = encoder(state, jax.device_put(x, to_mesh))
            # Gather onto the first device: the tracker reads frames in data-dependent order.
            fpn, pos = jax.device_put((fpn, [p[:1] for p in pos]), devs[0])
        else:
            out = _encode_chunk_jit(graphdef, state, x)
            fpn, pos = out["fpn"], out["pos"]
        chunks.append([a[:n] for a in fpn])
    fpn = [jnp.concatenate([c[i] for c in chunks]) for i in range(3)]
    return {"fpn": fpn, "pos": pos}


def stack_features(feats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`encode_frames` outputs of V sequences of the same length, stacked for :func:`propagate_many`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *feats)


def take_frames(feats: dict[str, Any], idx: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """The encoded frames ``idx`` (in that order) of :func:`encode_frames` output."""
    idx = jnp.asarray(np.asarray(idx, np.int32))
    return {"fpn": [jnp.take(level, idx, axis=0) for level in feats["fpn"]], "pos": feats["pos"]}


def concat_frames(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"fpn": [jnp.concatenate([p["fpn"][i] for p in parts]) for i in range(3)], "pos": parts[0]["pos"]}


def pad_frames(feats: dict[str, Any], length: int) -> dict[str, Any]:
    """Append zero-feature frames up to ``length`` (processed after the real ones, so they change nothing
    before them)."""
    t = feats["fpn"][0].shape[0]
    if length == t:
        return feats
    return {"fpn": [jnp.concatenate([a, jnp.zeros((length - t,) + a.shape[1:], a.dtype)]) for a in feats["fpn"]],
            "pos": feats["pos"]}


def bucketed(length: int, bucket: int | None) -> int:
    return length if bucket is None else -(-length // bucket) * bucket
