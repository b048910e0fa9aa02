"""The optimiser: AdamW with warmup + cosine decay, clipping, per-module learning-rate multipliers, freezing.

* AdamW (beta1 0.9, beta2 0.999) with weight decay on every parameter but biases and normalisation scales
  (SAM 2's training config exempts ``*bias*`` and LayerNorm parameters).
* Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * final_lr_fraction`` at
  ``total_steps``.
* Gradients clipped by their global norm (``clip_norm``; 0 = off), before the multipliers.
* ``lr_multipliers``: ``{regex: factor}`` on parameter paths (``image_encoder/trunk/blocks/0/attn/qkv/kernel``);
  the first matching pattern wins, e.g. ``{"^image_encoder/": 0.1}`` trains the encoder 10x slower.
* ``freeze``: module names or path regexes whose parameters never change (their updates are zero and no
  optimiser moments are kept for them).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import optax

NO_DECAY = re.compile(r"(^|/)(bias|scale)$")


def param_path(path) -> str:
    """A parameter's path as ``a/b/c`` (without NNX's trailing ``value``)."""
    s = jax.tree_util.keystr(tuple(path), simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def path_labels(params: Any, fn) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), params)


def _compile(patterns: Sequence[str], what: str) -> list:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: {p!r} is not a valid regular expression ({e})") from e
    return out


def freeze_matcher(freeze: Sequence[str]):
    """A predicate on parameter paths: True for frozen ones. A bare module name (``image_encoder``,
    ``sam_prompt_encoder``) freezes that top-level module; anything else is a regex searched in the path."""
    pats = _compile([f"^{re.escape(f)}(/|$)" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", f) else f
                     for f in freeze], "freeze")
    return lambda path: any(p.search(path) for p in pats)


def schedule(lr: float, warmup_steps: int, total_steps: int, final_lr_fraction: float = 0.0):
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    decay = max(1, int(total_steps) - warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, warmup_steps + decay, lr * final_lr_fraction) \
        if warmup_steps > 0 else optax.cosine_decay_schedule(lr, decay, final_lr_fraction)


def make_optimizer(
    params: Any,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    clip_norm: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    final_lr_fraction: float = 0.0,
    lr_multipliers: Mapping[str, float] | None = None,
    freeze: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, Any]:
    """The optax transformation for ``params`` (any pytree of arrays) and the schedule (step -> lr).

    Raises ``ValueError`` naming the pattern when a ``freeze`` or ``lr_multipliers`` pattern matches no
    parameter (a typo would silently train everything).
    """
    sched = schedule(lr, warmup_steps, total_steps, final_lr_fraction)
    mults = list((lr_multipliers or {}).items())
    mult_pats = _compile([p for p, _ in mults], "lr_multipliers")
    frozen = freeze_matcher(freeze)
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for f in freeze:
        if not any(freeze_matcher([f])(p) for p in paths):
            raise ValueError(f"freeze: {f!r} matches no parameter; give a top-level module name "
                             f"({', '.join(sorted({p.split('/')[0] for p in paths}))}) or a regex on parameter paths")
    for (pat, _), rx in zip(mults, mult_pats):
        if not any(rx.search(p) for p in paths):
            raise ValueError(f"lr_multipliers: {pat!r} matches no parameter path (e.g. {paths[0]!r})")

    def label(path: str) -> str:
        if frozen(path):
            return "frozen"
        for i, rx in enumerate(mult_pats):
            if rx.search(path):
                return f"m{i}"
        return "m"

    def adamw(factor: float):
        return optax.adamw(lambda s: sched(s) * factor, b1=b1, b2=b2, weight_decay=weight_decay,
                           mask=lambda p: path_labels(p, lambda q: NO_DECAY.search(q) is None))

    transforms = {"frozen": optax.set_to_zero(), "m": adamw(1.0)}
    transforms.update({f"m{i}": adamw(float(f)) for i, (_, f) in enumerate(mults)})
    parts = []
    if freeze:  # frozen gradients are zeroed first, so that they do not count in the clipping norm
        parts.append(optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.identity()},
                                           lambda p: path_labels(p, lambda q: "frozen" if frozen(q) else "train")))
    if clip_norm and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.multi_transform(transforms, lambda p: path_labels(p, label)))
    return optax.chain(*parts), sched
