"""The self-sorting memory bank of Medical SAM 2 (paper §3.2–3.3), as pure functions over fixed-size arrays.

SAM 2 attends to the memories of the ``K = num_maskmem - 1 = 6`` frames just before ``t``: a FIFO (paper
eq. 1, policy ``"fifo"``). The paper replaces it with a self-sorting bank of ``K`` entries ``E_i`` (policy
``"self_sorting"``), so that tracking works through unordered image sets and slices in any orientation:

1. **Confidence gate.** A frame's entry is offered only if its predicted IoU ``c >= c_thresh``.
2. **Total dissimilarity (eq. 2).** ``D_i = Σ_{j≠i} (1 − cos(E_i, E_j))`` over the ``K + 1`` candidates.
3. **TopK (eq. 3).** The ``K`` most dissimilar are kept: the arg-min of ``D`` is dropped (ties keep the older).
4. **Resampling (eqs. 4–5).** Before memory attention, ``K`` entries are drawn with replacement with
   ``p_i ∝ max(cos(F_t, E_i), ε)``.

Why pure functions of fixed-shape pytrees: a whole propagation is one ``lax.scan``, a batch of banks is one
``vmap``, and nothing recompiles as the bank fills (slots carry a validity mask). The bank never looks inside
its ``payload`` (the tracker stores SAM 2's memory features and object pointers there); similarities use a
separate ``descriptor`` of each frame's image embedding (:func:`make_descriptor`).

Public functions: :class:`BankConfig`, :class:`Bank`, :func:`init`, :func:`update` /
:func:`update_with_info` (gate, eqs. 2–3, FIFO), :func:`resample` / :func:`draw_slots` /
:func:`sampling_probabilities` (eqs. 4–5), :func:`gather`, :func:`temporal_index`, :func:`read`,
:func:`make_descriptor`, :func:`total_dissimilarity`, :func:`num_valid`, :func:`chronological_slots`.

Design decisions (defaults and why, what the paper leaves open, how this differs from the official code):
``docs/architecture.md``, section "The memory bank".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

POLICIES = ("fifo", "self_sorting")
WEIGHTINGS = ("linear", "softmax")
TPOS_RULES = ("distance", "rank")

_HIGHEST = jax.lax.Precision.HIGHEST
_NORM_FLOOR = 1e-12  # a zero descriptor has cosine 0 with everything (no NaN)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """Static configuration of one bank (frozen and hashable: pass it as a static ``jit`` argument).

    See ``docs/architecture.md`` for each default and why. ``policy="fifo"`` ignores ``use_threshold``,
    ``use_dissimilarity`` and ``use_resampling``; the effective switches are :attr:`threshold_on`,
    :attr:`dissimilarity_on` and :attr:`resampling_on`.
    """

    policy: str = "self_sorting"
    use_threshold: bool = True
    use_dissimilarity: bool = True
    use_resampling: bool = True
    c_thresh: float = 0.5
    K: int = 6  # number of slots (the paper's K)
    weighting: str = "linear"
    linear_eps: float = 1e-6
    temperature: float = 1.0
    tpos_rule: str = "distance"
    num_maskmem: int = 7

    def __post_init__(self):
        def bad(field, value, expected):
            raise ValueError(f"BankConfig.{field}: got {value!r}, expected {expected}")

        if self.policy not in POLICIES:
            bad("policy", self.policy, f"one of {POLICIES}")
        if self.weighting not in WEIGHTINGS:
            bad("weighting", self.weighting, f"one of {WEIGHTINGS}")
        if self.tpos_rule not in TPOS_RULES:
            bad("tpos_rule", self.tpos_rule, f"one of {TPOS_RULES}")
        for name in ("use_threshold", "use_dissimilarity", "use_resampling"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "a bool")
        for name, low in (("K", 1), ("num_maskmem", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                bad(name, value, f"an int >= {low}")
        if not (isinstance(self.c_thresh, (int, float)) and np.isfinite(self.c_thresh)):
            bad("c_thresh", self.c_thresh, "a finite float")
        for name in ("linear_eps", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                bad(name, value, "a finite float > 0")

    @classmethod
    def sam2_fifo(cls, K: int = 6, **kw) -> "BankConfig":  # noqa: N803 - the paper's K
        """SAM 2's own memory: the most recent ``K`` frames (K = 6 reproduces SAM 2)."""
        return cls(policy="fifo", K=K, **kw)

    @property
    def num_slots(self) -> int:
        return self.K

    @property
    def threshold_on(self) -> bool:
        return self.policy == "self_sorting" and self.use_threshold

    @property
    def dissimilarity_on(self) -> bool:
        return self.policy == "self_sorting" and self.use_dissimilarity

    @property
    def resampling_on(self) -> bool:
        return self.policy == "self_sorting" and self.use_resampling


# --------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------


@struct.dataclass
class Bank:
    """One memory bank (a pytree). Slot ``i`` is in use iff ``valid[i]``; empty slots hold zeros,
    ``frame_idx = stamp = -1``. A *view* returned by :func:`resample` / :func:`gather` has the same type."""

    payload: Any  # pytree, leaves [K, ...]
    descriptor: Array  # [K, D] float32
    confidence: Array  # [K] float32
    frame_idx: Array  # [K] int32
    valid: Array  # [K] bool
    stamp: Array  # [K] int32: value of `clock` when the entry was inserted (insertion order), -1 if empty
    clock: Array  # [] int32: number of insertions so far

    @property
    def num_slots(self) -> int:
        return self.valid.shape[-1]


@struct.dataclass
class UpdateInfo:
    """What one :func:`update_with_info` did (for tests and diagnostics)."""

    accepted: Array  # [] bool: passed the confidence gate (always True when the gate is off)
    inserted: Array  # [] bool: the new entry is in the bank now
    slot: Array  # [] int32: slot written, -1 if none
    evicted_frame: Array  # [] int32: frame_idx of the entry it replaced, -1 if none (free slot / no write)
    dissimilarity: Array  # [K+1] float32: eq. 2 over the candidates (bank slots, then the new one); -inf invalid


@struct.dataclass
class Read:
    """Everything memory attention needs from the bank at one frame (see :func:`read`)."""

    view: Bank  # K entries to attend to; view.valid says which are real
    slots: Array  # [K] int32: bank slot each view entry came from, -1 if none
    t_rel: Array  # [K] int32 in [1, num_maskmem-1]: temporal distance used for the encoding
    tpos_row: Array  # [K] int32: row of SAM 2's maskmem_tpos_enc to add (= t_rel - 1)


def _leaf_spec(x) -> tuple[tuple[int, ...], Any]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), x.dtype
    a = np.asarray(x)
    return a.shape, a.dtype


def init(K: int | BankConfig, payload_example: Any, descriptor_dim: int) -> Bank:  # noqa: N803
    """An empty bank of ``K`` slots (an int, or a :class:`BankConfig` whose ``K`` is used).

    ``payload_example`` is one entry's payload (a pytree of arrays or ``jax.ShapeDtypeStruct``; no K axis):
    each leaf becomes a zero buffer of shape ``(K, *leaf.shape)`` and the leaf's dtype.
    """
    k = K.K if isinstance(K, BankConfig) else K
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"init: K must be an int >= 1 or a BankConfig, got {K!r}")
    if not isinstance(descriptor_dim, (int, np.integer)) or isinstance(descriptor_dim, bool) or descriptor_dim < 1:
        raise ValueError(f"init: descriptor_dim must be an int >= 1, got {descriptor_dim!r}")
    k = int(k)

    def zeros(x):
        shape, dtype = _leaf_spec(x)
        return jnp.zeros((k,) + shape, dtype)

    return Bank(
        payload=jax.tree.map(zeros, payload_example),
        descriptor=jnp.zeros((k, int(descriptor_dim)), jnp.float32),
        confidence=jnp.zeros((k,), jnp.float32),
        frame_idx=jnp.full((k,), -1, jnp.int32),
        valid=jnp.zeros((k,), bool),
        stamp=jnp.full((k,), -1, jnp.int32),
        clock=jnp.zeros((), jnp.int32),
    )


def num_valid(bank: Bank) -> Array:
    return jnp.sum(bank.valid.astype(jnp.int32), axis=-1)


def chronological_slots(bank: Bank) -> Array:
    """Slot indices sorted by insertion order (oldest first), empty slots last."""
    key = jnp.where(bank.valid, bank.stamp, jnp.iinfo(jnp.int32).max)
    return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------------
# Similarities
# --------------------------------------------------------------------------------------------------------


def _unit(x: Array) -> Array:
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _NORM_FLOOR)


def cosine_to(descriptors: Array, query: Array) -> Array:
    """Cosine similarity of each row of ``descriptors [N, D]`` with ``query [D]`` (no gradient)."""
    return jnp.matmul(_unit(descriptors), _unit(query), precision=_HIGHEST)


def total_dissimilarity(descriptors: Array, valid: Array) -> Array:
    """Eq. 2: ``D_i = Σ_{j valid, j≠i} (1 − cos(E_i, E_j))`` for valid ``i``; −inf for invalid ``i``.

    Each row's terms are sorted before summing, so ``D`` is exactly invariant to the order of the rows and
    exactly equal for identical descriptors (exact ties, broken by age in :func:`update`).
    """
    e = _unit(descriptors)
    g = jnp.matmul(e, e.T, precision=_HIGHEST)
    n = valid.shape[-1]
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
    terms = jnp.where(pair, 1.0 - g, 0.0)
    d = jnp.sum(jnp.sort(terms, axis=-1), axis=-1)
    return jnp.where(valid, d, -jnp.inf)


def make_descriptor(features: Array, grid: int = 4) -> Array:
    """A frame's descriptor from its image embedding ``[..., H, W, C]`` (NHWC, before memory conditioning):
    the mean over a ``grid x grid`` grid of cells, flattened to ``[..., grid*grid*C]``.
    ``grid = H = W`` keeps the whole map (the official code's full-map cosine, in a consistent order)."""
    g = grid
    if not isinstance(g, (int, np.integer)) or g < 1:
        raise ValueError(f"make_descriptor: grid must be an int >= 1, got {grid!r}")
    if features.ndim < 3:
        raise ValueError(f"make_descriptor: features must be [..., H, W, C], got shape {features.shape}")
    h, w, c = features.shape[-3:]
    if h % g or w % g:
        raise ValueError(
            f"make_descriptor: feature map {h}x{w} is not divisible by grid={g}; "
            f"expected H and W to be multiples of {g}"
        )
    lead = features.shape[:-3]
    x = features.astype(jnp.float32).reshape(lead + (g, h // g, g, w // g, c))
    return x.mean(axis=(-4, -2)).reshape(lead + (g * g * c,))


# --------------------------------------------------------------------------------------------------------
# Update (eqs. 2–3, and SAM 2's FIFO)
# --------------------------------------------------------------------------------------------------------


def _check_bank(bank: Bank, cfg: BankConfig, where: str) -> None:
    if not isinstance(cfg, BankConfig):
        raise TypeError(f"{where}: cfg must be a BankConfig, got {type(cfg).__name__}")
    if bank.valid.ndim != 1:
        raise ValueError(
            f"{where}: bank.valid has shape {bank.valid.shape}, expected ({cfg.K},); "
            "use jax.vmap for a batch of banks"
        )
    if bank.valid.shape[0] != cfg.K:
        raise ValueError(
            f"{where}: bank has {bank.valid.shape[0]} slots but cfg.K={cfg.K}; "
            "build the bank with init(cfg.K, ...) from the same config"
        )


def update_with_info(
    bank: Bank, payload_entry: Any, descriptor: Array, confidence: Array, frame_idx: Array, cfg: BankConfig
) -> tuple[Bank, UpdateInfo]:
    """Offer one frame's entry to the bank (see :func:`update`); also returns what happened."""
    where = "bank.update"
    _check_bank(bank, cfg, where)
    k = cfg.K
    bank_leaves, bank_tree = jax.tree_util.tree_flatten_with_path(bank.payload)
    entry_leaves, entry_tree = jax.tree.flatten(payload_entry)
    if bank_tree != entry_tree:
        raise ValueError(f"{where}: payload_entry has structure {entry_tree}, expected {bank_tree} (the bank's)")
    for (path, b), e in zip(bank_leaves, entry_leaves):
        if tuple(jnp.shape(e)) != tuple(b.shape[1:]):
            raise ValueError(
                f"{where}: payload_entry{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(e))}, "
                f"expected {tuple(b.shape[1:])} (the bank's payload without its K axis)"
            )
    if tuple(jnp.shape(descriptor)) != tuple(bank.descriptor.shape[1:]):
        raise ValueError(
            f"{where}: descriptor has shape {tuple(jnp.shape(descriptor))}, "
            f"expected {tuple(bank.descriptor.shape[1:])}"
        )
    for name, value in (("confidence", confidence), ("frame_idx", frame_idx)):
        if jnp.shape(value) != ():
            raise ValueError(f"{where}: {name} must be a scalar, got shape {jnp.shape(value)}")

    conf = jnp.asarray(confidence, jnp.float32)
    fidx = jnp.asarray(frame_idx, jnp.int32)
    desc = jnp.asarray(descriptor, bank.descriptor.dtype)

    accepted = (conf >= cfg.c_thresh) if cfg.threshold_on else jnp.array(True)
    full = jnp.all(bank.valid)
    free_slot = jnp.argmax(~bank.valid).astype(jnp.int32)  # lowest empty slot (meaningless when full)

    # Candidates: the K slots, then the new entry (index K), which is the newest (stamp = clock).
    cand_valid = jnp.concatenate([bank.valid, jnp.ones((1,), bool)])
    cand_stamp = jnp.concatenate([bank.stamp, bank.clock[None]])
    dis = total_dissimilarity(jnp.concatenate([bank.descriptor, desc[None]]), cand_valid)

    if cfg.dissimilarity_on:
        # TopK of K+1 (eq. 3) == drop the argmin of D; ties: the newest of the tied is dropped (older kept).
        tied = dis == jnp.min(dis)
        drop = jnp.argmax(jnp.where(tied, cand_stamp, -2)).astype(jnp.int32)
    else:
        # Keep the K most recent: drop the oldest slot (never the new entry, the newest candidate).
        drop = jnp.argmin(jnp.where(bank.valid, bank.stamp, jnp.iinfo(jnp.int32).max)).astype(jnp.int32)

    target = jnp.where(full, drop, free_slot)
    write = accepted & (target < k)
    slot = jnp.minimum(target, k - 1)

    def put(buf, value):
        return buf.at[slot].set(jnp.where(write, jnp.asarray(value, buf.dtype), buf[slot]))

    new_bank = Bank(
        payload=jax.tree.map(put, bank.payload, payload_entry),
        descriptor=put(bank.descriptor, desc),
        confidence=put(bank.confidence, conf),
        frame_idx=put(bank.frame_idx, fidx),
        valid=put(bank.valid, True),
        stamp=put(bank.stamp, bank.clock),
        clock=bank.clock + write.astype(jnp.int32),
    )
    info = UpdateInfo(
        accepted=accepted,
        inserted=write,
        slot=jnp.where(write, slot, -1),
        evicted_frame=jnp.where(write & bank.valid[slot], bank.frame_idx[slot], -1),
        dissimilarity=dis,
    )
    return new_bank, info


def update(
    bank: Bank, payload_entry: Any, descriptor: Array, confidence: Array, frame_idx: Array, cfg: BankConfig
) -> Bank:
    """Offer one frame's entry to the bank; returns the new bank (same shapes).

    * ``fifo``: always stored; fills the lowest free slot, then evicts the oldest (a ring buffer).
    * ``self_sorting``: if ``use_threshold`` and ``confidence < c_thresh`` (or NaN): unchanged. Otherwise
      the lowest free slot while the bank is not full; when full, the K+1 candidates' total dissimilarity
      (eq. 2) decides which one is dropped (eq. 3; ties keep the older), or, without ``use_dissimilarity``,
      the oldest entry is evicted.

    ``payload_entry`` must match the bank's payload without the K axis; ``descriptor`` is ``[D]``;
    ``confidence`` and ``frame_idx`` are scalars. Pure, jit/vmap/scan-friendly; ``cfg`` is static.
    """
    return update_with_info(bank, payload_entry, descriptor, confidence, frame_idx, cfg)[0]


# --------------------------------------------------------------------------------------------------------
# Resampling (eqs. 4–5)
# --------------------------------------------------------------------------------------------------------


def _check_query(bank: Bank, query: Array, where: str) -> None:
    if tuple(jnp.shape(query)) != tuple(bank.descriptor.shape[1:]):
        raise ValueError(
            f"{where}: query_descriptor has shape {tuple(jnp.shape(query))}, "
            f"expected {tuple(bank.descriptor.shape[1:])} (the bank's descriptor shape)"
        )


def sampling_logits(bank: Bank, query_descriptor: Array, cfg: BankConfig) -> Array:
    """Logits whose softmax is eq. 4's distribution: ``log max(cos, eps)`` (linear) or ``cos / T``
    (softmax); −inf for invalid slots."""
    cos = cosine_to(bank.descriptor, query_descriptor)
    if cfg.weighting == "linear":
        logits = jnp.log(jnp.maximum(cos, cfg.linear_eps))
    else:
        logits = cos / cfg.temperature
    return jnp.where(bank.valid, logits, -jnp.inf)


def sampling_probabilities(bank: Bank, query_descriptor: Array, cfg: BankConfig) -> Array:
    """Eq. 4: ``p_i`` over the K slots (0 for invalid slots; all 0 for an empty bank)."""
    _check_query(bank, query_descriptor, "bank.sampling_probabilities")
    valid = bank.valid
    if cfg.weighting == "linear":
        w = jnp.where(valid, jnp.maximum(cosine_to(bank.descriptor, query_descriptor), cfg.linear_eps), 0.0)
    else:
        logits = sampling_logits(bank, query_descriptor, cfg)
        m = jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, logits, -jnp.inf)), 0.0)
        w = jnp.where(valid, jnp.exp(jnp.where(valid, logits, m) - m), 0.0)
    total = jnp.sum(w)
    return w / jnp.where(total > 0, total, 1.0)


def gather(bank: Bank, slots: Array) -> Bank:
    """The entries at ``slots`` (int array ``[M]``; −1 = none) as a view of M entries. Entries whose slot
    is −1 or empty are invalid and hold zeros / frame −1. Differentiable w.r.t. the payload."""
    k = bank.num_slots
    slots = jnp.asarray(slots, jnp.int32)
    safe = jnp.clip(slots, 0, k - 1)
    ok = (slots >= 0) & (slots < k) & bank.valid[safe]

    def take(buf, fill=0):
        picked = buf[safe]
        mask = ok.reshape(ok.shape + (1,) * (picked.ndim - 1))
        return jnp.where(mask, picked, jnp.asarray(fill, buf.dtype))

    return Bank(
        payload=jax.tree.map(take, bank.payload),
        descriptor=take(bank.descriptor),
        confidence=take(bank.confidence),
        frame_idx=take(bank.frame_idx, -1),
        valid=ok,
        stamp=take(bank.stamp, -1),
        clock=bank.clock,
    )


def draw_slots(bank: Bank, query_descriptor: Array, key: Array, cfg: BankConfig) -> Array:
    """Eq. 5's indices: ``slots [K]`` drawn with replacement with eq. 4's probabilities (−1 = nothing
    drawn, only for an empty bank). Invalid slots are never drawn. Without resampling (``use_resampling=False``
    or ``fifo``): ``arange(K)`` on valid slots, −1 elsewhere. No gradient (the choice is discrete)."""
    _check_bank(bank, cfg, "bank.resample")
    _check_query(bank, query_descriptor, "bank.resample")
    k = cfg.K
    if not cfg.resampling_on:
        return jnp.where(bank.valid, jnp.arange(k, dtype=jnp.int32), -1)
    logits = sampling_logits(bank, query_descriptor, cfg)
    idx = jax.random.categorical(key, logits, shape=(k,)).astype(jnp.int32)
    # All-invalid guard: categorical returns 0 when every logit is -inf; slot 0 is then empty.
    drawn = bank.valid[idx] & jnp.any(bank.valid)
    return jnp.where(drawn, idx, -1)


def resample(bank: Bank, query_descriptor: Array, key: Array, cfg: BankConfig) -> tuple[Bank, Array]:
    """Eq. 5: the bank resampled for the query; returns ``(view, drawn_valid)``.

    ``view`` is a :class:`Bank` of the K entries at :func:`draw_slots` (not-drawn entries hold zeros,
    frame −1), ``drawn_valid [K]`` (= ``view.valid``) says which are real: all False for an empty bank.
    Without resampling the view is the bank itself. The gathered payload carries the gradients of the
    entries it came from.
    """
    if not cfg.resampling_on:
        _check_bank(bank, cfg, "bank.resample")
        _check_query(bank, query_descriptor, "bank.resample")
        return bank, bank.valid
    view = gather(bank, draw_slots(bank, query_descriptor, key, cfg))
    return view, view.valid


# --------------------------------------------------------------------------------------------------------
# Temporal position rule and the one-call read
# --------------------------------------------------------------------------------------------------------


def temporal_index(bank_or_view: Bank, current_frame: Array, cfg: BankConfig) -> Array:
    """``t_rel [K]`` in ``[1, num_maskmem − 1]`` for each entry, by ``cfg.tpos_rule`` (``docs/architecture.md``).

    SAM 2 adds ``maskmem_tpos_enc[t_rel − 1]`` to such a memory. Invalid entries get ``num_maskmem − 1``
    (in range; they must be masked anyway).
    """
    hi = cfg.num_maskmem - 1
    valid = bank_or_view.valid
    dist = jnp.abs(jnp.asarray(current_frame, jnp.int32) - bank_or_view.frame_idx)
    if cfg.tpos_rule == "distance":
        t_rel = dist
    else:
        n = valid.shape[-1]
        same = (dist[:, None] == dist[None, :]) & valid[:, None] & valid[None, :]
        before = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]
        first = valid & ~jnp.any(same & before, axis=1)  # one representative per distinct distance
        t_rel = 1 + jnp.sum(first[None, :] & (dist[None, :] < dist[:, None]), axis=1)
    return jnp.where(valid, jnp.clip(t_rel, 1, hi), hi).astype(jnp.int32)


def read(bank: Bank, query_descriptor: Array, current_frame: Array, key: Array, cfg: BankConfig,
         direction: Array | int = 1) -> Read:
    """What memory attention reads at ``current_frame`` (the tracker calls this at every step): the view
    (resampled under ``self_sorting`` with resampling on, else the bank), its validity, and the temporal
    encoding rows.

    Under ``fifo`` the view is SAM 2's window (eq. 1): entries 1 to ``num_maskmem − 1`` frames *behind*
    ``current_frame`` in the tracking ``direction`` (+1 forward, −1 backward) are valid, and nothing else
    (an entry of the frame itself or from the other side is not read)."""
    slots = draw_slots(bank, query_descriptor, key, cfg)
    view = gather(bank, slots) if cfg.resampling_on else bank
    if cfg.policy == "fifo":
        behind = (jnp.asarray(current_frame, jnp.int32) - view.frame_idx) * jnp.asarray(direction, jnp.int32)
        view = view.replace(valid=view.valid & (behind >= 1) & (behind <= cfg.num_maskmem - 1))
        slots = jnp.where(view.valid, slots, -1)
    t_rel = temporal_index(view, current_frame, cfg)
    return Read(view=view, slots=slots, t_rel=t_rel, tpos_row=t_rel - 1)
