"""Tracking an object through a sequence of frames (video, slices of a volume, an unordered image set).

Design (see the README's design section):

1. **Batched encoding.** The image encoder never reads memory, so every frame of a sequence is encoded in a
   few batched calls (:func:`encode_frames`) before tracking starts.
2. **Prompted frames first.** Every prompted ("conditioning") frame is segmented from its own prompt with no
   memory, as SAM 2's video predictor does for frames that receive clicks, a box or a mask before
   propagation, and encoded into a conditioning memory. Up to ``max_cond_frames`` such frames per object
   in static slots (unused slots are masked); by default (``cond_slots="fit"``) there are only as many
   slots as the most-prompted object needs, so one prompted frame costs memory attention what it costs
   SAM 2 (a different count of prompted frames compiles once more; ``"max"`` trades that for more work).
3. **One ``lax.scan`` over a static-length schedule.** Each step reads the memory (conditioning slots, the
   bank of non-conditioning memories, object pointers), runs memory attention, the SAM heads and the memory
   encoder, and updates the bank. Everything is a fixed-size array with validity masks, so shapes never
   change as memory fills and nothing recompiles; memory held is bounded by the bank size, not by the
   sequence length. Directions are data: ``forward`` and ``backward`` use a schedule of T steps (steps past
   the end are inactive and skipped by a ``lax.cond``), ``both`` runs forward from the first prompted frame
   and then, with a fresh bank, backward from it, in T + 1 steps (so the backward pass equals SAM 2's
   predictor run in reverse on its own, not after a forward run in the same state).
4. **Objects are a batch.** Several objects share the frame features; every per-object quantity carries a
   leading object axis, and the bank functions are ``vmap``-ped over it.

The non-conditioning memory is a :class:`medsam2_jax.memory.bank.Bank`: with the ``fifo`` policy it holds
SAM 2's "most recent ``num_maskmem - 1`` frames" and the result equals SAM 2's video predictor; with
``self_sorting`` it is the paper's self-sorting memory bank (threshold, dissimilarity TopK, resampling).

Precision: float32 by default, with stored memories rounded to bfloat16 as SAM 2's video predictor stores
them (``store_memory_bf16``). ``cast_model(model, jnp.bfloat16, WHOLE_MODEL)`` (or
``compute_model(model, "bfloat16")``) makes the whole model compute in bfloat16: matmuls and convolutions in
bfloat16, norms, softmax, sigmoids, the heads' outputs, stored memories and the bank's statistics in float32
(see :func:`cast_model`); the default ``cast_model(model, jnp.bfloat16)`` casts the image encoder alone
(:data:`BF16_MODULES`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .memory import bank as bank_lib
from .model.position import get_1d_sine_pe
from .model.prompt_labels import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT
from .model.sam2 import NO_OBJ_SCORE, SAM2, resize_bilinear

Array = jax.Array
Direction = Literal["forward", "backward", "both"]
DIRECTIONS = ("forward", "backward", "both")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Static settings of the tracker (hashable: a change recompiles, data never does)."""

    max_cond_frames: int = 4  # prompted frames per object, at most
    # Conditioning slots of make_prompts: "fit" = as many as the most-prompted object has (memory attention
    # reads no empty slot: one prompted frame costs what it costs SAM 2; a new count of prompted frames
    # compiles once more), "max" = always max_cond_frames (one compile whatever the count, more work).
    cond_slots: str = "fit"
    max_points: int = 8  # clicks per prompted frame, box corners included (static slots)
    bank: bank_lib.BankConfig = dataclasses.field(default_factory=bank_lib.BankConfig)
    # SAM 2's video predictor stores memory features in bfloat16; round them the same way (halves memory).
    store_memory_bf16: bool = True
    descriptor_grid: int = 4  # self-sorting bank: frame descriptor = image embedding averaged over g x g cells
    encode_batch: int = 8  # frames per image-encoder call (per device)
    # Local devices the image encoder's batches are split over (0 = all; see encode_frames). Tracking then
    # runs on the first of them. On CPU, N virtual devices (jax_num_cpu_devices) keep the cores busier.
    encode_devices: int = 1
    remat: bool = False  # rematerialise each step in the backward pass (training long sequences)
    # Skip steps where no object is active with a lax.cond. Under vmap (a batch of sequences, as in training)
    # the predicate is batched, so both branches run and every operand, the weights included, is broadcast
    # per sequence; training turns this off (inactive steps are then computed and dropped: same result).
    skip_inactive: bool = True
    # Training: every step also returns all four candidate masks of the decoder (``candidates``) for SAM 2's
    # best-mask loss; with ``dropout`` memory attention runs its dropout (0.1), one key per scan step.
    train: bool = False
    dropout: bool = False

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"TrackerConfig.{field}: got {getattr(self, field)!r}, expected {expected}")

        for name in ("max_cond_frames", "max_points", "descriptor_grid", "encode_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "an int >= 1")
        if not isinstance(self.encode_devices, int) or isinstance(self.encode_devices, bool) or \
                self.encode_devices < 0:
            bad("encode_devices", "an int >= 0 (0 = all local devices)")
        if self.cond_slots not in ("fit", "max"):
            bad("cond_slots", "'fit' or 'max'")
        if not isinstance(self.bank, bank_lib.BankConfig):
            bad("bank", "a memory.bank.BankConfig")


@flax.struct.dataclass
class Prompts:
    """Fixed-size prompts of B objects: ``Kc`` conditioning slots of ``P`` points each.

    Build with :func:`make_prompts`, which validates on the host. Coordinates are (x, y) pixels of the
    S x S frames; labels 1 positive, 0 negative, 2/3 box corners, -1 padding.
    """

    frame_idx: Array  # (B, Kc) int32
    valid: Array  # (B, Kc) bool
    point_coords: Array  # (B, Kc, P, 2) float32
    point_labels: Array  # (B, Kc, P) int32
    mask: Array  # (B, Kc, S, S) float32 (binary)
    mask_valid: Array  # (B, Kc) bool

    @property
    def num_objects(self) -> int:
        return self.frame_idx.shape[0]


def make_prompts(
    objects: Sequence[Sequence[dict[str, Any]]],
    *,
    num_frames: int,
    image_size: int,
    config: TrackerConfig = TrackerConfig(),
) -> Prompts:
    """Validate and pack prompts. ``objects[i]`` is a list of prompts of object i, each a dict with
    ``frame`` and one of: ``points`` (n, 2) with ``labels`` (n,), ``box`` (4,) xyxy (optionally with
    points), or ``mask`` (S, S) binary. Raises ``ValueError`` naming the object, frame and argument.

    The prompts get ``config.max_cond_frames`` conditioning slots per object with
    ``config.cond_slots == "max"``, else (``"fit"``) as many as the most-prompted object has."""
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool):
        raise ValueError(f"num_frames must be an int, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"the sequence is empty: num_frames must be >= 1, got {num_frames}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(objects, dict) or any(isinstance(o, dict) for o in objects):
        raise ValueError("objects must be a list of objects, each a list of prompt dicts; got a dict where an "
                         "object was expected (wrap one object's prompts in a list: [[{...}]])")
    objects = [list(o) for o in objects]
    if not objects:
        raise ValueError("no objects given: pass at least one object with at least one prompt")
    for i, prompts in enumerate(objects):
        for j, pr in enumerate(prompts):
            if not isinstance(pr, dict):
                raise ValueError(f"object {i}, prompt {j}: expected a dict with 'frame' and points/box/mask, "
                                 f"got {type(pr).__name__}")
    p, s = config.max_points, int(image_size)
    b = len(objects)
    most = max((len(o) for o in objects), default=1)
    kc = config.max_cond_frames if config.cond_slots == "max" else max(1, min(most, config.max_cond_frames))
    frame_idx = np.zeros((b, kc), np.int32)
    valid = np.zeros((b, kc), bool)
    coords = np.zeros((b, kc, p, 2), np.float32)
    labels = -np.ones((b, kc, p), np.int32)
    masks = np.zeros((b, kc, s, s), np.float32)
    mask_valid = np.zeros((b, kc), bool)
    for i, prompts in enumerate(objects):
        if not prompts:
            raise ValueError(f"object {i} was never prompted: give it at least one click, box or mask")
        if len(prompts) > kc:
            raise ValueError(
                f"object {i} has {len(prompts)} prompted frames, more than max_cond_frames={kc}; "
                "raise TrackerConfig.max_cond_frames"
            )
        seen = set()
        for j, pr in enumerate(prompts):
            f = pr.get("frame")
            if not isinstance(f, (int, np.integer)) or not 0 <= int(f) < num_frames:
                raise ValueError(f"object {i}, prompt {j}: frame={f!r} is outside the sequence [0, {num_frames - 1}]")
            if int(f) in seen:
                raise ValueError(f"object {i}: frame {f} is prompted twice; merge the prompts of one frame")
            seen.add(int(f))
            frame_idx[i, j], valid[i, j] = int(f), True
            has_mask = pr.get("mask") is not None
            pts = np.zeros((0, 2), np.float32)
            lab = np.zeros((0,), np.int32)
            if pr.get("box") is not None:
                box = np.asarray(pr["box"], np.float32).reshape(-1)
                if box.shape != (4,):
                    raise ValueError(f"object {i}, frame {f}: box must be (x0, y0, x1, y1), got shape {box.shape}")
                if not (box[0] <= box[2] and box[1] <= box[3]):
                    raise ValueError(f"object {i}, frame {f}: box {box.tolist()} must satisfy x0 <= x1 and y0 <= y1")
                pts = np.concatenate([pts, box.reshape(2, 2)])
                lab = np.concatenate([lab, np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32)])
            if pr.get("points") is not None:
                pp = np.asarray(pr["points"], np.float32).reshape(-1, 2)
                ll = np.asarray(pr.get("labels"), np.int32).reshape(-1) if pr.get("labels") is not None else None
                if ll is None or ll.shape[0] != pp.shape[0]:
                    raise ValueError(f"object {i}, frame {f}: points need labels of the same length")
                if not np.isin(ll, (0, 1)).all():
                    raise ValueError(f"object {i}, frame {f}: click labels must be 1 (positive) or 0 (negative)")
                pts = np.concatenate([pts, pp])
                lab = np.concatenate([lab, ll])
            if has_mask and len(lab):
                raise ValueError(f"object {i}, frame {f}: give either a mask or clicks/box on one frame, not both")
            if not has_mask and not len(lab):
                raise ValueError(f"object {i}, frame {f}: the prompt has no points, box or mask")
            if len(lab) > p:
                raise ValueError(
                    f"object {i}, frame {f}: {len(lab)} points (box corners count as 2) exceed max_points={p}"
                )
            if len(lab):
                if not np.all(np.isfinite(pts)):
                    raise ValueError(f"object {i}, frame {f}: prompt coordinates contain NaN or inf")
                if pts.min() < 0 or pts.max() > s:
                    raise ValueError(
                        f"object {i}, frame {f}: prompt coordinates {pts.tolist()} fall outside the {s}x{s} image"
                    )
                coords[i, j, : len(lab)] = pts
                labels[i, j, : len(lab)] = lab
            if has_mask:
                m = np.asarray(pr["mask"])
                if m.shape != (s, s):
                    raise ValueError(f"object {i}, frame {f}: mask must be {s}x{s}, got shape {m.shape}")
                masks[i, j] = (m > 0).astype(np.float32)
                mask_valid[i, j] = True
    return Prompts(
        frame_idx=jnp.asarray(frame_idx),
        valid=jnp.asarray(valid),
        point_coords=jnp.asarray(coords),
        point_labels=jnp.asarray(labels),
        mask=jnp.asarray(masks),
        mask_valid=jnp.asarray(mask_valid),
    )


# ---------------------------------------------------------------------------------------------- encoding
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


# ---------------------------------------------------------------------------------------------- pieces
def descriptor_grid(h: int, wanted: int) -> int:
    """The largest grid <= ``wanted`` that divides the feature map size ``h`` (static)."""
    return max(g for g in range(1, wanted + 1) if h % g == 0)


def _round_memory(x: Array, cfg: TrackerConfig) -> Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32) if cfg.store_memory_bf16 else x


def _gather_frames(fpn: list[Array], idx: Array) -> list[Array]:
    return [jnp.take(level, idx, axis=0) for level in fpn]


def _num_real_points(labels: Array) -> Array:
    return jnp.sum(labels != -1, axis=-1)


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


def memory_conditioned_features(
    model: SAM2,
    top: Array,
    top_pos: Array,
    frame: Array,
    direction: Array,
    cond: dict[str, Array],
    cond_valid: Array,
    cond_frame: Array,
    spatial: Array,
    spatial_tidx: Array,
    spatial_valid: Array,
    ptr: Array,
    ptr_pos: Array,
    ptr_valid: Array,
    num_frames: int,
    dropout_key: Array | None = None,
) -> Array:
    """SAM 2's ``_prepare_memory_conditioned_features`` over fixed-size slots (B objects).

    ``spatial`` (B, K, N, 64) non-conditioning memories with their ``maskmem_tpos_enc`` row ``spatial_tidx``
    (B, K) and validity; ``ptr`` (B, R, 256) non-conditioning object pointers at temporal distances
    ``ptr_pos`` (B, R) with validity ``ptr_valid``.
    """
    b, h, w, c = top.shape
    n = h * w
    kc = cond_valid.shape[1]
    mem_pos = model.memory_pos_enc().reshape(1, 1, n, model.mem_dim)
    tpos = model.maskmem_tpos_enc[...].reshape(model.num_maskmem, model.mem_dim)
    # Conditioning memories: temporal row num_maskmem - 1.
    cond_feat = cond["maskmem"].reshape(b, kc, n, model.mem_dim)
    cond_pos = jnp.broadcast_to(mem_pos + tpos[model.num_maskmem - 1], cond_feat.shape)
    sp_feat = spatial.reshape(b, -1, n, model.mem_dim)
    sp_pos = mem_pos + tpos[spatial_tidx][:, :, None, :]
    feats = jnp.concatenate([cond_feat, sp_feat], axis=1)
    pos = jnp.concatenate([cond_pos, sp_pos], axis=1)
    fvalid = jnp.concatenate([cond_valid, spatial_valid], axis=1)
    nf = feats.shape[1]
    feats = feats.reshape(b, nf * n, model.mem_dim)
    pos = pos.reshape(b, nf * n, model.mem_dim)
    fmask = jnp.repeat(fvalid, n, axis=1)

    # Object pointers: conditioning frames in the past (signed distance), then recent frames (distance).
    t_diff_max = max(min(num_frames, model.max_obj_ptrs_in_encoder) - 1, 1)
    d = direction[:, None]
    cond_in_past = (cond_frame - frame[:, None]) * d <= 0
    cond_ptr_valid = cond_valid & cond_in_past
    cond_ptr_pos = (frame[:, None] - cond_frame) * d
    ptrs = jnp.concatenate([cond["obj_ptr"], ptr], axis=1)  # (B, Kc+R, 256)
    ppos = jnp.concatenate([cond_ptr_pos, ptr_pos], axis=1)
    pvalid = jnp.concatenate([cond_ptr_valid, ptr_valid], axis=1)
    ptpos = _pointer_tpos(model, ppos, t_diff_max)  # (B, Kc+R, 64)
    split = model.hidden_dim // model.mem_dim
    ptr_tokens = ptrs.reshape(b, -1, model.mem_dim)
    ptr_pos = jnp.repeat(ptpos, split, axis=1)
    ptr_mask = jnp.repeat(pvalid, split, axis=1)

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


# ---------------------------------------------------------------------------------------------- schedule
def check_direction(direction: Any) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}")


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
    top_all = feats["fpn"][-1]
    t, h, w, c = top_all.shape
    b, kc = prompts.frame_idx.shape
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
        bank, ring = carry
        frame, dirn, active, reset, step_key = xs
        bank = jax.tree.map(lambda a, a0: jnp.where(_bcast(reset, a), a0, a), bank, bank0)
        ring = jax.tree.map(lambda a, a0: jnp.where(_bcast(reset, a), a0, a), ring, ring0)
        fpn = _gather_frames(feats["fpn"], frame)
        top = fpn[-1]
        desc = bank_lib.make_descriptor(top.astype(jnp.float32), grid)  # bank statistics in float32

        # Dropout takes a key of its own; without it the step key is the bank's alone (as in inference).
        bank_key, dropout_key = jax.random.split(step_key) if cfg.dropout else (step_key, None)
        keys = jax.random.split(bank_key, b)
        # What memory attention reads (bank.read): under fifo SAM 2's window, the non-conditioning frames
        # 1..num_maskmem-1 steps behind; under self_sorting the resampled bank (the paper).
        r = jax.vmap(lambda bk, q, kk, f, d: bank_lib.read(bk, q, f, kk, bcfg, d))(bank, desc, keys, frame, dirn)
        view, view_valid, tidx = r.view, r.view.valid, r.tpos_row  # tidx: row of maskmem_tpos_enc
        if bcfg.policy == "fifo":
            # SAM 2: the pointers of the frames up to t_diff_max steps back (prompted frames are in the
            # conditioning slots, not in the ring).
            ptr_pos = (frame[:, None] - ring["frame"]) * dirn[:, None]
            ptr, ptr_valid = ring["ptr"], ring["valid"] & (ptr_pos >= 1) & (ptr_pos <= t_diff_max)
        else:
            # The paper: the resampled entries' pointers come with them.
            ptr, ptr_pos, ptr_valid = view.payload["obj_ptr"], r.t_rel, view_valid
        pix = memory_conditioned_features(
            model, top, top_pos, frame, dirn, cond, prompts.valid, prompts.frame_idx,
            view.payload["maskmem"], tidx, view_valid, ptr, ptr_pos, ptr_valid, t,
            dropout_key=dropout_key,
        )
        pad_c = jnp.zeros((b, 1, 2), jnp.float32)
        pad_l = -jnp.ones((b, 1), jnp.int32)
        heads = model.sam_heads(pix, fpn[:2], pad_c, pad_l, None)
        out = model.select_outputs(heads, True)
        mem = _round_memory(model.encode_memory(top, out["low_res_masks"], out["object_score_logits"], False), cfg)

        # Prompted frames output their conditioning result and do not enter the bank (as in SAM 2).
        match = prompts.valid & (prompts.frame_idx == frame[:, None])
        is_cond = jnp.any(match, axis=1)
        slot = jnp.argmax(match, axis=1)
        cpick = lambda a: jnp.take_along_axis(a, slot.reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]
        low = jnp.where(is_cond[:, None, None], cpick(cond["low_res_masks"]), out["low_res_masks"])
        iou = jnp.where(is_cond, cpick(cond["iou"]), out["iou"])
        obj = jnp.where(is_cond[:, None], cpick(cond["object_score_logits"]), out["object_score_logits"])[:, 0]

        enters = active & ~is_cond
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
        y = {
            "low_res_masks": low.astype(jnp.float32), "iou": iou.astype(jnp.float32),
            "object_score_logits": obj.astype(jnp.float32), "frame": frame, "active": active,
            # What the bank holds after this step (small; for diagnostics and tests).
            "bank_frame": bank.frame_idx, "bank_valid": bank.valid, "bank_confidence": bank.confidence,
            "read_valid": view_valid,
        }
        if cfg.train:
            cand, cand_iou, cand_valid = _candidates(out, True)
            y["candidates"] = jnp.where(is_cond[:, None, None, None], cpick(cond["candidates"]), cand)
            y["candidates_iou"] = jnp.where(is_cond[:, None], cpick(cond["candidates_iou"]), cand_iou)
            y["candidates_valid"] = jnp.where(is_cond[:, None], cpick(cond["candidates_valid"]), cand_valid)
        return (bank, ring), y

    def skip(carry, xs):
        # No object is active at this step: nothing is read or written; the outputs are dropped later.
        bank, _ = carry
        frame, _, active, _, _ = xs
        y = {
            "low_res_masks": jnp.full((b, s4, s4), NO_OBJ_SCORE, jnp.float32),
            "iou": jnp.zeros((b,), jnp.float32),
            "object_score_logits": jnp.full((b,), NO_OBJ_SCORE, jnp.float32),
            "frame": frame, "active": active,
            "bank_frame": bank.frame_idx, "bank_valid": bank.valid, "bank_confidence": bank.confidence,
            "read_valid": jnp.zeros(bank.valid.shape, bool),
        }
        if cfg.train:
            y["candidates"] = jnp.full((b, 4, s4, s4), NO_OBJ_SCORE, jnp.float32)
            y["candidates_iou"] = jnp.zeros((b, 4), jnp.float32)
            y["candidates_valid"] = jnp.zeros((b, 4), bool)
        return carry, y

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
    # Scatter the steps back to frame order; inactive steps are dropped.
    tgt = jnp.where(ys["active"], ys["frame"], t)  # (steps, B)
    bidx = jnp.broadcast_to(jnp.arange(b)[None], tgt.shape)
    res = {
        "low_res_masks": jnp.full((b, t, s4, s4), NO_OBJ_SCORE, jnp.float32),
        "iou": jnp.zeros((b, t), jnp.float32),
        "object_score_logits": jnp.full((b, t), NO_OBJ_SCORE, jnp.float32),
    }
    if cfg.train:
        res["candidates"] = jnp.full((b, t, 4, s4, s4), NO_OBJ_SCORE, jnp.float32)
        res["candidates_iou"] = jnp.zeros((b, t, 4), jnp.float32)
        res["candidates_valid"] = jnp.zeros((b, t, 4), bool)
    res = {kk: v.at[bidx, tgt].set(ys[kk], mode="drop") for kk, v in res.items()}
    res["visited"] = jnp.zeros((b, t), bool).at[bidx, tgt].set(True, mode="drop")
    # Per-step trace in processing order, (steps, B, ...): frame, activity and the bank's content.
    res["trace"] = {kk: ys[kk] for kk in ("frame", "active", "iou", "bank_frame", "bank_valid", "bank_confidence",
                                          "read_valid")}
    return res, carry


def _bcast(flag: Array, like: Array) -> Array:
    return flag.reshape(flag.shape + (1,) * (like.ndim - flag.ndim))


def _push(ring: Array, new: Array) -> Array:
    """Append ``new`` (B, ...) at the end of a (B, R, ...) ring, dropping the oldest."""
    return jnp.concatenate([ring[:, 1:], new[:, None]], axis=1)


# Python-side trace counter of the jitted propagation, per direction (tests check that data never retraces).
TRACE_COUNTS: dict[str, int] = {"forward": 0, "backward": 0, "both": 0}


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "direction"))
def _propagate_jit(graphdef, state, feats, prompts, key, cfg, direction):
    TRACE_COUNTS[direction] = TRACE_COUNTS.get(direction, 0) + 1  # runs only while tracing
    return propagate(nnx.merge(graphdef, state), feats, prompts, key, cfg, direction)


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


def check_tracker_prompts(prompts: Prompts, num_frames: int, image_size: int) -> None:
    """Host-side checks that ``prompts`` fit a sequence of ``num_frames`` frames of ``image_size`` (clear
    errors for hand-built :class:`Prompts`; :func:`make_prompts` output passes when built for the same T)."""
    fi = np.asarray(prompts.frame_idx)
    valid = np.asarray(prompts.valid)
    if fi.ndim != 2 or valid.shape != fi.shape:
        raise ValueError(f"prompts.frame_idx and prompts.valid must be (B, slots), got {fi.shape} and {valid.shape}")
    b, kc = fi.shape
    for name, want in (("point_coords", (b, kc, None, 2)), ("point_labels", (b, kc, None)),
                       ("mask", (b, kc, image_size, image_size)), ("mask_valid", (b, kc))):
        got = tuple(np.shape(getattr(prompts, name)))
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = tuple("P" if w is None else w for w in want)
            raise ValueError(f"prompts.{name} has shape {got}, expected {shown} (built for another image size or "
                             "object count? use make_prompts with this model's image_size)")
    for i in range(b):
        if not valid[i].any():
            raise ValueError(f"object {i} was never prompted: it has no valid prompt slot")
        bad = fi[i][valid[i] & ((fi[i] < 0) | (fi[i] >= num_frames))]
        if bad.size:
            raise ValueError(f"object {i}: a prompt is on frame {int(bad[0])}, outside the sequence "
                             f"[0, {num_frames - 1}]")


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


def stack_features(feats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`encode_frames` outputs of V sequences of the same length, stacked for :func:`propagate_many`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *feats)


# Submodules whose parameters ``cast_model``'s default casts: the image encoder alone, where most FLOPs are
# (the rest then computes in float32 on the encoder's bfloat16 features). ``WHOLE_MODEL`` (``None``) casts every
# submodule: see :func:`cast_model` for what then stays float32.
BF16_MODULES = ("image_encoder",)
WHOLE_MODEL = None
# Scopes of :func:`compute_model` (and of the ``compute_scope`` field of the training/eval configs).
COMPUTE_SCOPES = {"model": WHOLE_MODEL, "image_encoder": BF16_MODULES}


def cast_model(model: SAM2, dtype: Any, modules: Sequence[str] | None = BF16_MODULES) -> SAM2:
    """A copy of ``model`` whose floating-point parameters (``nnx.Param``) in the top-level submodules
    ``modules`` (all of them with ``None`` = :data:`WHOLE_MODEL`) are ``dtype``, e.g. ``jnp.bfloat16``.

    Every linear map and convolution computes in its kernel's dtype (``model.common.as_compute``: inputs are
    cast to it), so with ``jnp.bfloat16`` the matmuls and convolutions of the cast submodules run in bfloat16
    (XLA accumulates them in float32 on GPU/TPU). What stays float32 whatever the cast: constant buffers
    (the prompt encoder's random-Fourier matrix) and position encodings / RoPE tables, LayerNorm statistics
    and normalisation (Flax computes them in float32), attention scores, softmax and the normalisation of
    the weighted sum (``common.attention``), the FPN's top-down sums (as SAM 2), sigmoids, the decoder's
    outputs (mask logits accumulated in float32, IoU, object scores), the memories and pointers the tracker
    stores, the memory bank's statistics (descriptors, similarity, confidence, dissimilarity) and the loss.

    Frames may be given in float32 or ``dtype`` (the patch embedding casts them). With the default
    ``modules`` only the image encoder computes in ``dtype`` (see :data:`BF16_MODULES`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    names = None if modules is None else tuple(modules)

    def cast(path, a):
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        if names is not None and top not in names:
            return a
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(cast, params), rest)


def compute_model(model: SAM2, compute_dtype: Any = "float32", scope: str = "model") -> SAM2:
    """``model`` set up to compute in ``compute_dtype`` ("float32"/"bfloat16" or a dtype): itself for
    float32, else :func:`cast_model` over ``scope``: "model" (every submodule, :data:`WHOLE_MODEL`) or
    "image_encoder" (:data:`BF16_MODULES`). Used by training (inside the step: the float32 parameters stay
    the master copy and the gradients flow back through the cast) and by ``eval.py``."""
    dtype = jnp.dtype(compute_dtype)
    if scope not in COMPUTE_SCOPES:
        raise ValueError(f"compute scope must be one of {sorted(COMPUTE_SCOPES)}, got {scope!r}")
    if dtype == jnp.float32:
        return model
    return cast_model(model, dtype, COMPUTE_SCOPES[scope])


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
