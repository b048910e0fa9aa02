"""The one PyTorch <-> Flax key map, used in both directions.

Every Flax module of the port mirrors the attribute names of the PyTorch module it ports (``nnx.List``
for ``nn.ModuleList`` / ``nn.Sequential``, with parameter-free placeholders where PyTorch has an
activation), so a parameter's PyTorch key is its Flax path joined by dots, with the last name and the
layout given by the type of the module that owns it. That rule is :data:`KEY_MAP` below: one row per
layer type, each a (flax name, torch name, to-flax, to-torch) quadruple. Raw parameters and buffers
owned by any other module keep their name and their PyTorch layout.

Conversion is strict: a PyTorch key that no Flax parameter claims, a Flax parameter that no key fills,
or a shape mismatch raises :class:`WeightMismatchError` naming every offending key. No silent fills.
This module needs NumPy only (no torch), so converted checkpoints load anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.common import Buffer, Conv2d, ConvTranspose2d, Embedding, LayerNorm, Linear


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (3, 2, 0, 1))


def _transpose2(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (1, 0))


@dataclass(frozen=True)
class Rule:
    flax_name: str
    torch_name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# The table. ConvTranspose2d: torch (in, out, kh, kw) -> flax (kh, kw, out, in) read with
# transpose_kernel=True; the same axis permutation as a Conv2d's OIHW -> HWIO.
KEY_MAP: dict[type, tuple[Rule, ...]] = {
    Linear: (
        Rule("kernel", "weight", _transpose2, _transpose2),
        Rule("bias", "bias", _identity, _identity),
    ),
    Conv2d: (
        Rule("kernel", "weight", _oihw_to_hwio, _hwio_to_oihw),
        Rule("bias", "bias", _identity, _identity),
    ),
    ConvTranspose2d: (
        Rule("kernel", "weight", _oihw_to_hwio, _hwio_to_oihw),
        Rule("bias", "bias", _identity, _identity),
    ),
    LayerNorm: (
        Rule("scale", "weight", _identity, _identity),
        Rule("bias", "bias", _identity, _identity),
    ),
    Embedding: (Rule("embedding", "weight", _identity, _identity),),
}
_RAW = Rule("", "", _identity, _identity)


class WeightMismatchError(ValueError):
    """A state dict and a Flax model do not correspond one to one."""


@dataclass(frozen=True)
class Entry:
    torch_key: str
    module: nnx.Module
    attr: str
    rule: Rule

    @property
    def variable(self) -> nnx.Variable:
        return getattr(self.module, self.attr)


def _rules_for(module: nnx.Module) -> dict[str, Rule] | None:
    for cls in type(module).__mro__:
        if cls in KEY_MAP:
            return {r.flax_name: r for r in KEY_MAP[cls]}
    return None


def iter_entries(model: nnx.Module) -> Iterator[Entry]:
    """Yield one :class:`Entry` per parameter or buffer of ``model``, with its PyTorch key."""
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        rules = _rules_for(node)
        prefix = ".".join(str(p) for p in path)
        for attr, value in sorted(vars(node).items()):
            if not isinstance(value, (nnx.Param, Buffer)):
                continue
            if rules is not None:
                if attr not in rules:
                    raise TypeError(f"{type(node).__name__} at '{prefix}' has parameter '{attr}' not in KEY_MAP")
                rule = rules[attr]
                name = rule.torch_name
            else:
                rule, name = _RAW, attr
            yield Entry(f"{prefix}.{name}" if prefix else name, node, attr, rule)


def load_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    source: str = "state dict",
) -> None:
    """Fill ``model`` in place from a PyTorch-named state dict of NumPy arrays.

    ``prefix`` selects a sub-tree (``"image_encoder."``) and is stripped from the keys; keys outside it
    are ignored. Raises :class:`WeightMismatchError` listing every missing, unexpected and mis-shaped key.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    entries = list(iter_entries(model))
    expected = {e.torch_key for e in entries}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    bad_shape = []
    converted = {}
    for e in entries:
        if e.torch_key not in sd:
            continue
        arr = np.asarray(sd[e.torch_key])
        val = e.rule.to_flax(arr)
        want = tuple(e.variable.get_value().shape)
        if tuple(val.shape) != want:
            bad_shape.append(
                f"{prefix}{e.torch_key}: {source} has {tuple(arr.shape)}, the model expects "
                f"{tuple(e.rule.to_torch(np.zeros(want, np.float32)).shape)}"
            )
            continue
        if not np.all(np.isfinite(val)):
            bad_shape.append(f"{prefix}{e.torch_key}: contains NaN or inf")
            continue
        converted[e] = val
    if missing or unexpected or bad_shape:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing {len(missing)} key(s): " + ", ".join(prefix + k for k in missing[:20]))
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} key(s): " + ", ".join(prefix + k for k in unexpected[:20]))
        for b in bad_shape[:20]:
            lines.append("  " + b)
        raise WeightMismatchError("\n".join(lines))
    for e, val in converted.items():
        dtype = e.variable.get_value().dtype
        # Copy: jnp.asarray may alias the caller's NumPy buffer on CPU (e.g. a live torch parameter).
        e.variable.set_value(jnp.array(val, dtype=dtype, copy=True))


def export_state_dict(model: nnx.Module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of :func:`load_state_dict`: PyTorch keys and layouts, as NumPy arrays."""
    return {prefix + e.torch_key: e.rule.to_torch(np.asarray(e.variable.get_value())) for e in iter_entries(model)}
