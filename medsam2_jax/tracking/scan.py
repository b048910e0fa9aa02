"""The propagation scan: prompted frames first (:func:`conditioning_outputs`), then one ``lax.scan`` over a
static-length schedule (:func:`make_schedule`) whose steps read the memory, attend to it
(:func:`read_memory` into a :class:`MemoryRead`, :func:`memory_conditioned_features`), run the heads and the
memory encoder and update the bank (the step's pieces are at the end of the module)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ..memory import bank as bank_lib
from ..model.position import get_1d_sine_pe
from ..model.sam2 import NO_OBJ_SCORE, SAM2, resize_bilinear
from .config import Array, Direction, TrackerConfig
from .prompts import Prompts, _num_real_points


def descriptor_grid(h: int, wanted: int) -> int:
    """The largest grid <= ``wanted`` that divides the feature map size ``h`` (static)."""
    return max(g for g in range(1, wanted + 1) if h % g == 0)


def _round_memory(x: Array, cfg: TrackerConfig) -> Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32) if cfg.store_memory_bf16 else x


def _gather_frames(fpn: list[Array], idx: Array) -> list[Array]:
    return [jnp.take(level, idx, axis=0) for level in fpn]


def conditioning_outputs(model: SAM2, feats: dict[str, Any], prompts: Prompts, cfg: TrackerConfig) -> dict[str, Array]:
    """Segment every prompted frame from its own prompt (no memory) and encode its conditioning memory.

    Returns per (object, slot): low-res mask logits, IoU, object score, object pointer, memory features.
    """
    b, kc = prompts.frame_idx.shape
    flat = lambda a: a.reshape((b * kc,) + a.shape[2:])
    idx = flat(prompts.frame_idx)
    fpn = _gather_frames(feats["fpn"], idx)
    top = fpn[-1]
    with_no_mem = top + model.no_mem_embed[...].reshape(1, 1, 1, -1)
    coords, labels = flat(prompts.point_coords), flat(prompts.point_labels)
    heads = model.sam_heads(with_no_mem, fpn[:2], coords, labels, None)
    # SAM 2 uses 3 masks for 0 or 1 click on an initial conditioning frame, else 1 (a box counts as 2).
    by_points = model.select_outputs(heads, _num_real_points(labels) <= 1)
    by_mask = model.mask_as_output(top, fpn[:2], flat(prompts.mask))
    use_mask = flat(prompts.mask_valid)
    pick = lambda a, m: jnp.where(use_mask.reshape((-1,) + (1,) * (a.ndim - 1)), m, a)
    out = {k: pick(by_points[k], by_mask[k]) for k in ("low_res_masks", "iou", "object_score_logits", "obj_ptr")}
    if cfg.train:
        multi = _num_real_points(labels) <= 1
        cand, cand_iou, cand_valid = _candidates(by_points, multi)
        # A mask prompt is its own output: one candidate, the mask's logits.
        m4 = use_mask[:, None]
        cand = jnp.where(m4[..., None, None], jnp.broadcast_to(by_mask["low_res_masks"][:, None], cand.shape), cand)
        cand_iou = jnp.where(m4, by_mask["iou"][:, None], cand_iou)
        cand_valid = jnp.where(m4, jnp.arange(4)[None] == 0, cand_valid)
        out.update(candidates=cand, candidates_iou=cand_iou, candidates_valid=cand_valid)
    # The video predictor encodes prompted frames' memories from the binarised low-res mask (preflight).
    # SAM 2's training (SAM2Train.track_step, model.training) encodes them from the sigmoid of the full-size
    # output instead: no binarising (gradients reach the mask through the memory), and for a mask prompt the
    # full-size mask logits (mask * 20 - 10), not their low-res copy.
    if cfg.train:
        s = model.image_size
        high = jnp.where(use_mask[:, None, None], flat(prompts.mask) * 20.0 - 10.0,
                         resize_bilinear(out["low_res_masks"], (s, s), antialias=False))
        mem = model.encode_memory(top, high, out["object_score_logits"], False)  # (S, S) -> (S, S): identity
    else:
        mem = model.encode_memory(top, out["low_res_masks"], out["object_score_logits"], True)
    out["maskmem"] = _round_memory(mem, cfg)
    return {k: v.reshape((b, kc) + v.shape[1:]) for k, v in out.items()}


def _candidates(sel: dict[str, Array], multimask: Array) -> tuple[Array, Array, Array]:
    """The masks SAM 2's loss chooses from: (B, 4, h, w) logits (-1024 where the object is absent, as SAM 2
    fills them), their predicted IoU (B, 4), and which of the 4 tokens were offered: 1..3 for a multimask
    output, token 0 for a single mask."""
    present = sel["object_score_logits"] > 0  # (B, 1)
    masks = jnp.where(present[:, :, None, None], sel["all_low_res_masks"], NO_OBJ_SCORE)
    multimask = jnp.broadcast_to(jnp.asarray(multimask), (masks.shape[0],))
    tok = jnp.arange(4)[None]
    valid = jnp.where(multimask[:, None], tok >= 1, tok == 0)
    return masks.astype(jnp.float32), sel["all_iou"].astype(jnp.float32), valid


def _pointer_tpos(model: SAM2, pos: Array, t_diff_max: int) -> Array:
    """Temporal encoding of object pointers at signed distances ``pos`` (..., n) -> (..., n, 64)."""
    if not model.is_2_1:  # SAM 2.0: no temporal encoding on pointers
        return jnp.zeros(pos.shape + (model.mem_dim,), jnp.float32)
    pe = get_1d_sine_pe(pos.astype(jnp.float32) / t_diff_max, dim=model.hidden_dim)
    return model.obj_ptr_tpos_proj(pe)


@flax.struct.dataclass
class MemoryRead:
    """What memory attention reads at one step, for B objects: the conditioning memories of the prompted
    frames (all of them, every step) and the non-conditioning memories and object pointers read from the bank
    and the pointer ring (:func:`read_memory`)."""

    cond_maskmem: Array  # (B, Kc, h, w, 64) memories of the prompted frames
    cond_ptr: Array  # (B, Kc, 256) their object pointers
    cond_valid: Array  # (B, Kc) bool
    cond_frame: Array  # (B, Kc) int32 their frames
    spatial: Array  # (B, K, h, w, 64) non-conditioning memories
    spatial_tidx: Array  # (B, K) int32 their row of ``maskmem_tpos_enc``
    spatial_valid: Array  # (B, K) bool
    ptr: Array  # (B, R, 256) non-conditioning object pointers
    ptr_pos: Array  # (B, R) int32 their temporal distances
    ptr_valid: Array  # (B, R) bool


def _spatial_memory(model: SAM2, mem: MemoryRead, n: int) -> tuple[Array, Array, Array]:
    """Memory features (B, (Kc + K) * N, 64), conditioning first, with their position encodings and mask."""
    b, kc = mem.cond_valid.shape
    mem_pos = model.memory_pos_enc().reshape(1, 1, n, model.mem_dim)
    tpos = model.maskmem_tpos_enc[...].reshape(model.num_maskmem, model.mem_dim)
    # Conditioning memories: temporal row num_maskmem - 1.
    cond_feat = mem.cond_maskmem.reshape(b, kc, n, model.mem_dim)
    cond_pos = jnp.broadcast_to(mem_pos + tpos[model.num_maskmem - 1], cond_feat.shape)
    sp_feat = mem.spatial.reshape(b, -1, n, model.mem_dim)
    sp_pos = mem_pos + tpos[mem.spatial_tidx][:, :, None, :]
    feats = jnp.concatenate([cond_feat, sp_feat], axis=1)
    pos = jnp.concatenate([cond_pos, sp_pos], axis=1)
    fvalid = jnp.concatenate([mem.cond_valid, mem.spatial_valid], axis=1)
    nf = feats.shape[1]
    feats = feats.reshape(b, nf * n, model.mem_dim)
    pos = pos.reshape(b, nf * n, model.mem_dim)
    return feats, pos, jnp.repeat(fvalid, n, axis=1)


def _pointer_memory(model: SAM2, mem: MemoryRead, frame: Array, direction: Array, num_frames: int
                    ) -> tuple[Array, Array, Array]:
    """Object pointer tokens (B, (Kc + R) * 4, 64): conditioning frames in the past (signed distance), then
    recent frames (distance), with their temporal encodings and mask."""
    b = mem.cond_valid.shape[0]
    t_diff_max = max(min(num_frames, model.max_obj_ptrs_in_encoder) - 1, 1)
    d = direction[:, None]
    cond_in_past = (mem.cond_frame - frame[:, None]) * d <= 0
    cond_ptr_valid = mem.cond_valid & cond_in_past
    cond_ptr_pos = (frame[:, None] - mem.cond_frame) * d
    ptrs = jnp.concatenate([mem.cond_ptr, mem.ptr], axis=1)  # (B, Kc+R, 256)
    ppos = jnp.concatenate([cond_ptr_pos, mem.ptr_pos], axis=1)
    pvalid = jnp.concatenate([cond_ptr_valid, mem.ptr_valid], axis=1)
    ptpos = _pointer_tpos(model, ppos, t_diff_max)  # (B, Kc+R, 64)
    split = model.hidden_dim // model.mem_dim
    return ptrs.reshape(b, -1, model.mem_dim), jnp.repeat(ptpos, split, axis=1), jnp.repeat(pvalid, split, axis=1)


def memory_conditioned_features(
    model: SAM2,
    top: Array,
    top_pos: Array,
    frame: Array,
    direction: Array,
    mem: MemoryRead,
    num_frames: int,
    dropout_key: Array | None = None,
) -> Array:
    """SAM 2's ``_prepare_memory_conditioned_features`` over fixed-size slots (B objects): the current
    frame's top features ``top`` (B, h, w, C) attend to the memory ``mem`` read at ``frame`` (B,) in
    ``direction`` (B,) (+1 / -1) of a ``num_frames`` sequence."""
    b, h, w, c = top.shape
    n = h * w
    feats, pos, fmask = _spatial_memory(model, mem, n)
    ptr_tokens, ptr_pos, ptr_mask = _pointer_memory(model, mem, frame, direction, num_frames)

    memory = jnp.concatenate([feats, ptr_tokens], axis=1)
    memory_pos = jnp.concatenate([pos, ptr_pos], axis=1)
    memory_mask = jnp.concatenate([fmask, ptr_mask], axis=1)
    curr = top.reshape(b, n, c)
    curr_pos = jnp.broadcast_to(top_pos.reshape(1, n, c), curr.shape)
    drop = {} if dropout_key is None else {"deterministic": False, "rngs": nnx.Rngs(dropout=dropout_key)}
    out = model.memory_attention(
        curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens=ptr_tokens.shape[1], memory_mask=memory_mask,
        **drop,
    )
    return out.reshape(b, h, w, c)


def make_schedule(first_frame: Array, num_frames: int, direction: Direction) -> dict[str, Array]:
    """Per-object processing order as data: frame index, direction sign, bank reset and activity per step."""
    t = num_frames
    first = first_frame[:, None]
    if direction == "forward":
        s = jnp.arange(t)[None]
        frames = first + s
        active = frames < t
        dirs = jnp.ones_like(frames)
        reset = jnp.zeros_like(active)
    elif direction == "backward":
        s = jnp.arange(t)[None]
        frames = first - s
        active = frames >= 0
        dirs = -jnp.ones_like(frames)
        reset = jnp.zeros_like(active)
    elif direction == "both":
        s = jnp.arange(t + 1)[None]
        n_fwd = t - first  # steps first..T-1
        fwd = s < n_fwd
        frames = jnp.where(fwd, first + s, first - (s - n_fwd))
        dirs = jnp.where(fwd, 1, -1)
        active = jnp.ones_like(fwd)
        reset = s == n_fwd
    else:
        raise ValueError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}")
    frames = jnp.clip(frames, 0, t - 1).astype(jnp.int32)
    return {"frame": frames.T, "dir": dirs.T.astype(jnp.int32), "active": active.T, "reset": reset.T}


def initial_carry(model: SAM2, num_objects: int, grid: int, cfg: TrackerConfig) -> tuple[bank_lib.Bank, dict]:
    """The scan's carry before the first step: B empty banks and B empty pointer rings.

    Its size depends on the model, B, ``cfg.bank.K`` and the descriptor grid, never on the sequence length.
    """
    h = model.image_size // 16
    payload_example = {
        "maskmem": jnp.zeros((h, h, model.mem_dim), jnp.float32),
        "obj_ptr": jnp.zeros((model.hidden_dim,), jnp.float32),
    }
    desc_dim = grid * grid * model.hidden_dim
    bank0 = jax.vmap(lambda _: bank_lib.init(cfg.bank.K, payload_example, desc_dim))(jnp.arange(num_objects))
    r = model.max_obj_ptrs_in_encoder - 1
    ring0 = {
        "ptr": jnp.zeros((num_objects, r, model.hidden_dim), jnp.float32),
        "frame": jnp.zeros((num_objects, r), jnp.int32),
        "valid": jnp.zeros((num_objects, r), bool),
    }
    return bank0, ring0


def propagate(
    model: SAM2,
    feats: dict[str, Any],
    prompts: Prompts,
    key: Array,
    cfg: TrackerConfig,
    direction: Direction = "forward",
) -> dict[str, Array]:
    """Track B objects through T encoded frames. Pure and jit-able; differentiable w.r.t. the model.

    Returns per object and frame (B, T, ...): ``low_res_masks`` logits (S/4 x S/4), ``iou``,
    ``object_score_logits``, and ``visited`` (whether the frame was reached in this direction); and
    ``trace``: per scan step (steps, B, ...) the frame, activity, IoU, and the bank's frame ids, validity and
    confidences after the step, and which bank slots the step read.

    Steps where no object is active (past the sequence's end in ``forward`` / ``backward``) are skipped by a
    ``lax.cond`` (under ``vmap`` both branches run; the result is the same).
    """
    return propagate_with_carry(model, feats, prompts, key, cfg, direction)[0]


def propagate_with_carry(
    model: SAM2,
    feats: dict[str, Any],
    prompts: Prompts,
    key: Array,
    cfg: TrackerConfig,
    direction: Direction = "forward",
) -> tuple[dict[str, Array], tuple[bank_lib.Bank, dict]]:
    """:func:`propagate`, also returning the scan's final carry (the banks and pointer rings)."""
    t, h = feats["fpn"][-1].shape[:2]
    b = prompts.frame_idx.shape[0]
    top_pos = feats["pos"][-1][0]
    cond = conditioning_outputs(model, feats, prompts, cfg)
    first = jnp.min(jnp.where(prompts.valid, prompts.frame_idx, t), axis=1)
    sched = make_schedule(first, t, direction)

    bcfg = cfg.bank
    if bcfg.num_maskmem != model.num_maskmem:
        raise ValueError(f"BankConfig.num_maskmem={bcfg.num_maskmem} but the model has num_maskmem={model.num_maskmem} "
                         "(rows of its temporal encoding); set them equal")
    grid = descriptor_grid(h, cfg.descriptor_grid)
    bank0, ring0 = initial_carry(model, b, grid, cfg)
    s4 = model.image_size // 4
    t_diff_max = max(min(t, model.max_obj_ptrs_in_encoder) - 1, 1)

    def run(carry, xs):
        # One step: read memory -> attend -> heads -> encode memory -> bank update.
        frame, dirn, active, reset, step_key = xs
        bank, ring = _reset(carry[0], reset, bank0), _reset(carry[1], reset, ring0)
        fpn = _gather_frames(feats["fpn"], frame)
        top = fpn[-1]
        desc = bank_lib.make_descriptor(top.astype(jnp.float32), grid)  # bank statistics in float32
        # Dropout takes a key of its own; without it the step key is the bank's alone (as in inference).
        bank_key, dropout_key = jax.random.split(step_key) if cfg.dropout else (step_key, None)
        read = read_memory(bank, ring, desc, jax.random.split(bank_key, b), frame, dirn, cond, prompts, bcfg,
                           t_diff_max)
        pix = memory_conditioned_features(model, top, top_pos, frame, dirn, read, t, dropout_key=dropout_key)
        out = _unprompted_heads(model, pix, fpn)
        mem = _round_memory(model.encode_memory(top, out["low_res_masks"], out["object_score_logits"], False), cfg)
        # Prompted frames output their conditioning result and do not enter the bank (as in SAM 2).
        is_cond, slot = _cond_slot(prompts, frame)
        bank, ring = _update_memory(bank, ring, out, mem, desc, frame, active & ~is_cond, bcfg)
        y = _step_outputs(out, cond, is_cond, slot, frame, active, bank, read.spatial_valid, cfg.train)
        return (bank, ring), y

    def skip(carry, xs):
        # No object is active at this step: nothing is read or written; the outputs are dropped later.
        frame, _, active, _, _ = xs
        return carry, _skipped_outputs(carry[0], frame, active, s4, cfg.train)

    def step(carry, xs):
        if not cfg.skip_inactive:
            return run(carry, xs)
        return jax.lax.cond(jnp.any(xs[2]), run, skip, carry, xs)

    if cfg.remat:
        step = jax.checkpoint(step)
    n_steps = sched["frame"].shape[0]
    keys = jax.random.split(key, n_steps)
    carry, ys = jax.lax.scan(
        step, (bank0, ring0), (sched["frame"], sched["dir"], sched["active"], sched["reset"], keys)
    )
    return _scatter_to_frames(ys, b, t, s4, cfg.train), carry


# ------------------------------------------------------------------------------------- the step's pieces
def _reset(tree: Any, reset: Array, tree0: Any) -> Any:
    """Objects whose bank is reset at this step (``both``: the start of the backward pass) get ``tree0``."""
    return jax.tree.map(lambda a, a0: jnp.where(_bcast(reset, a), a0, a), tree, tree0)


def read_memory(bank: bank_lib.Bank, ring: dict, desc: Array, keys: Array, frame: Array, dirn: Array,
                cond: dict[str, Array], prompts: Prompts, bcfg: bank_lib.BankConfig, t_diff_max: int) -> MemoryRead:
    """What memory attention reads at this step (B objects; ``keys`` one per object).

    The bank's read (``bank.read``): under fifo SAM 2's window, the non-conditioning frames 1..num_maskmem-1
    steps behind; under self_sorting the resampled bank (the paper)."""
    r = jax.vmap(lambda bk, q, kk, f, d: bank_lib.read(bk, q, f, kk, bcfg, d))(bank, desc, keys, frame, dirn)
    view = r.view
    if bcfg.policy == "fifo":
        # SAM 2: the pointers of the frames up to t_diff_max steps back (prompted frames are in the
        # conditioning slots, not in the ring).
        ptr_pos = (frame[:, None] - ring["frame"]) * dirn[:, None]
        ptr, ptr_valid = ring["ptr"], ring["valid"] & (ptr_pos >= 1) & (ptr_pos <= t_diff_max)
    else:
        # The paper: the resampled entries' pointers come with them.
        ptr, ptr_pos, ptr_valid = view.payload["obj_ptr"], r.t_rel, view.valid
    return MemoryRead(
        cond_maskmem=cond["maskmem"], cond_ptr=cond["obj_ptr"], cond_valid=prompts.valid,
        cond_frame=prompts.frame_idx, spatial=view.payload["maskmem"], spatial_tidx=r.tpos_row,
        spatial_valid=view.valid, ptr=ptr, ptr_pos=ptr_pos, ptr_valid=ptr_valid,
    )


def _unprompted_heads(model: SAM2, pix: Array, fpn: list[Array]) -> dict[str, Array]:
    """The SAM heads on memory-conditioned features with no prompt (one padding point), multimask choice."""
    b = pix.shape[0]
    pad_c = jnp.zeros((b, 1, 2), jnp.float32)
    pad_l = -jnp.ones((b, 1), jnp.int32)
    heads = model.sam_heads(pix, fpn[:2], pad_c, pad_l, None)
    return model.select_outputs(heads, True)


def _cond_slot(prompts: Prompts, frame: Array) -> tuple[Array, Array]:
    """Whether ``frame`` (B,) is a prompted frame of each object, and which conditioning slot holds it."""
    match = prompts.valid & (prompts.frame_idx == frame[:, None])
    return jnp.any(match, axis=1), jnp.argmax(match, axis=1)


def _pick_slot(a: Array, slot: Array) -> Array:
    """``a[i, slot[i]]`` for every object i of a (B, Kc, ...) array."""
    b = slot.shape[0]
    return jnp.take_along_axis(a, slot.reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]


def _update_memory(bank: bank_lib.Bank, ring: dict, out: dict[str, Array], mem: Array, desc: Array,
                   frame: Array, enters: Array, bcfg: bank_lib.BankConfig) -> tuple[bank_lib.Bank, dict]:
    """The objects where ``enters`` add this step's memory to their bank and its pointer to their ring."""
    b = frame.shape[0]
    conf = out["iou"].astype(jnp.float32)
    new_bank = jax.vmap(lambda bk, p, d, cf, f: bank_lib.update(bk, p, d, cf, f, bcfg))(
        bank, {"maskmem": mem.astype(jnp.float32), "obj_ptr": out["obj_ptr"].astype(jnp.float32)}, desc, conf,
        frame,
    )
    bank = jax.tree.map(lambda new, old: jnp.where(_bcast(enters, new), new, old), new_bank, bank)
    ring = {
        "ptr": jnp.where(enters[:, None, None], _push(ring["ptr"], out["obj_ptr"].astype(jnp.float32)),
                         ring["ptr"]),
        "frame": jnp.where(enters[:, None], _push(ring["frame"], frame), ring["frame"]),
        "valid": jnp.where(enters[:, None], _push(ring["valid"], jnp.ones((b,), bool)), ring["valid"]),
    }
    return bank, ring


def _step_outputs(out: dict[str, Array], cond: dict[str, Array], is_cond: Array, slot: Array, frame: Array,
                  active: Array, bank: bank_lib.Bank, read_valid: Array, train: bool) -> dict[str, Array]:
    """A step's outputs: prompted frames output their conditioning result, the others the heads'."""
    cpick = lambda a: _pick_slot(a, slot)  # noqa: E731
    low = jnp.where(is_cond[:, None, None], cpick(cond["low_res_masks"]), out["low_res_masks"])
    iou = jnp.where(is_cond, cpick(cond["iou"]), out["iou"])
    obj = jnp.where(is_cond[:, None], cpick(cond["object_score_logits"]), out["object_score_logits"])[:, 0]
    y = {
        "low_res_masks": low.astype(jnp.float32), "iou": iou.astype(jnp.float32),
        "object_score_logits": obj.astype(jnp.float32), "frame": frame, "active": active,
        # What the bank holds after this step (small; for diagnostics and tests).
        "bank_frame": bank.frame_idx, "bank_valid": bank.valid, "bank_confidence": bank.confidence,
        "read_valid": read_valid,
    }
    if train:
        cand, cand_iou, cand_valid = _candidates(out, True)
        y["candidates"] = jnp.where(is_cond[:, None, None, None], cpick(cond["candidates"]), cand)
        y["candidates_iou"] = jnp.where(is_cond[:, None], cpick(cond["candidates_iou"]), cand_iou)
        y["candidates_valid"] = jnp.where(is_cond[:, None], cpick(cond["candidates_valid"]), cand_valid)
    return y


def _skipped_outputs(bank: bank_lib.Bank, frame: Array, active: Array, s4: int, train: bool) -> dict[str, Array]:
    """The outputs of a step where no object is active (same structure as :func:`_step_outputs`)."""
    b = frame.shape[0]
    y = {
        "low_res_masks": jnp.full((b, s4, s4), NO_OBJ_SCORE, jnp.float32),
        "iou": jnp.zeros((b,), jnp.float32),
        "object_score_logits": jnp.full((b,), NO_OBJ_SCORE, jnp.float32),
        "frame": frame, "active": active,
        "bank_frame": bank.frame_idx, "bank_valid": bank.valid, "bank_confidence": bank.confidence,
        "read_valid": jnp.zeros(bank.valid.shape, bool),
    }
    if train:
        y["candidates"] = jnp.full((b, 4, s4, s4), NO_OBJ_SCORE, jnp.float32)
        y["candidates_iou"] = jnp.zeros((b, 4), jnp.float32)
        y["candidates_valid"] = jnp.zeros((b, 4), bool)
    return y


def _scatter_to_frames(ys: dict[str, Array], b: int, t: int, s4: int, train: bool) -> dict[str, Array]:
    """The scan's per-step outputs (steps, B, ...) back in frame order (B, T, ...); inactive steps dropped.
    ``trace`` keeps the per-step view in processing order: frame, activity and the bank's content."""
    tgt = jnp.where(ys["active"], ys["frame"], t)  # (steps, B)
    bidx = jnp.broadcast_to(jnp.arange(b)[None], tgt.shape)
    res = {
        "low_res_masks": jnp.full((b, t, s4, s4), NO_OBJ_SCORE, jnp.float32),
        "iou": jnp.zeros((b, t), jnp.float32),
        "object_score_logits": jnp.full((b, t), NO_OBJ_SCORE, jnp.float32),
    }
    if train:
        res["candidates"] = jnp.full((b, t, 4, s4, s4), NO_OBJ_SCORE, jnp.float32)
        res["candidates_iou"] = jnp.zeros((b, t, 4), jnp.float32)
        res["candidates_valid"] = jnp.zeros((b, t, 4), bool)
    res = {kk: v.at[bidx, tgt].set(ys[kk], mode="drop") for kk, v in res.items()}
    res["visited"] = jnp.zeros((b, t), bool).at[bidx, tgt].set(True, mode="drop")
    res["trace"] = {kk: ys[kk] for kk in ("frame", "active", "iou", "bank_frame", "bank_valid", "bank_confidence",
                                          "read_valid")}
    return res


def _bcast(flag: Array, like: Array) -> Array:
    return flag.reshape(flag.shape + (1,) * (like.ndim - flag.ndim))


def _push(ring: Array, new: Array) -> Array:
    """Append ``new`` (B, ...) at the end of a (B, R, ...) ring, dropping the oldest."""
    return jnp.concatenate([ring[:, 1:], new[:, None]], axis=1)
