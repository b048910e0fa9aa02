"""Device mesh and sharding rules for training.

The mesh has two axes: ``data`` (pure data parallelism: every device of a ``data`` group holds whole
parameters) and ``fsdp`` (fully sharded data parallelism: parameters and optimiser state are split over it,
and the batch too). The batch's leading axis is split over both axes, ``("data", "fsdp")``.

Parameters are placed by **rules written as data**, as MaxText's logical-axis rules: a list of
``(regex on the parameter path, spec)`` pairs, the first match wins. A ``spec`` names mesh axes for the
parameter's *trailing* dimensions (right-aligned, ``None`` = not split): ``("fsdp",)`` splits the last
dimension over ``fsdp``, ``("fsdp", None)`` the one before it, ``()`` replicates. A dimension that does not
divide by the axis size is left whole (reported by :func:`describe`), so one rule set serves every model
size and mesh. The default rules split every weight matrix and convolution kernel along its output
features and replicate biases, norms, embeddings and small tensors.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .optim import param_path

AXES = ("data", "fsdp")
BATCH_SPEC = P(("data", "fsdp"))

#: (regex on the parameter path, spec of trailing dimensions); the first match wins.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)(bias|scale|gamma)$", ()),  # vectors: replicated
    (r"(embedding|_embed|_enc|no_obj_ptr|pos_embed[a-z_]*)$", ()),  # tokens and position tables: small
    (r"(^|/)kernel$", ("fsdp",)),  # matrices and conv kernels: output features over fsdp
    (r".*", ()),
)

#: Parameters with fewer elements than this stay replicated whatever the rules say (splitting them costs
#: more in collectives than it saves in memory).
MIN_SHARD_SIZE = 2**14


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data`` x ``fsdp`` mesh over ``devices`` (default: all devices of all processes).

    ``data`` = -1 takes every device that ``fsdp`` leaves. Raises ``ValueError`` naming ``mesh.data`` /
    ``mesh.fsdp`` when the product does not equal the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or (data < 1 and data != -1):
        raise ValueError(f"mesh.data and mesh.fsdp must be >= 1 (mesh.data may be -1 = the rest), got "
                         f"mesh.data={data}, mesh.fsdp={fsdp}")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp}, but there are {n} devices "
                         f"({devices[0].platform}); make the product {n} (or set mesh.data=-1)")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def _match(path: str, rules) -> tuple:
    for pat, spec in rules:
        if re.search(pat, path):
            return tuple(spec)
    return ()


def spec_for(path: str, shape: tuple, mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """The partition spec of one parameter (see the module docstring)."""
    spec = _match(path, rules)
    if len(spec) > len(shape):
        spec = spec[len(spec) - len(shape):]
    if int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return P()
    full = [None] * (len(shape) - len(spec)) + list(spec)
    for i, ax in enumerate(full):
        if ax is not None and shape[i] % mesh.shape[ax]:
            full[i] = None  # does not divide: keep this dimension whole
    while full and full[-1] is None:
        full.pop()
    return P(*full)


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of parameters (or of anything shaped like them, e.g. Adam moments)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(param_path(p), tuple(np.shape(x)), mesh, rules)), tree)


def state_shardings(state: Any, params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Shardings for a train state: every leaf shaped like a parameter whose path ends like that parameter's
    (the optimiser's moments) follows the parameter's rule; everything else (step, key, counts) is replicated."""
    by_suffix = {param_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def one(path, x):
        shape = tuple(np.shape(x))
        s = param_path(path)
        for ppath, pshape in by_suffix.items():
            if pshape == shape and (s == ppath or s.endswith("/" + ppath)):
                return NamedSharding(mesh, spec_for(ppath, shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, state)


def describe(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Counts for logs: parameters split, replicated, and the bytes one device holds."""
    split = repl = 0
    per_device = 0
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(np.shape(x))
        spec = spec_for(param_path(p), shape, mesh, rules)
        n = int(np.prod(shape, dtype=np.int64))
        div = int(np.prod([mesh.shape[a] for a in spec if a is not None], dtype=np.int64))
        split += div > 1
        repl += div == 1
        per_device += n * np.dtype(x.dtype).itemsize // div
    return {"split": split, "replicated": repl, "bytes_per_device": int(per_device)}
