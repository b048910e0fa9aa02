"""The training step: frames -> image encoder -> tracked sequence through the memory bank -> SAM 2's loss ->
gradients -> optimiser update, as one jitted function over a device mesh.

A batch holds B sequences of T frames with one object each. The B*T frames are encoded in one call; each
sequence is then tracked by :func:`medsam2_jax.tracking.propagate` (forward from frame 0, the prompted frame,
with the prompted and corrected frames as conditioning frames and the configured memory bank), ``vmap``-ped
over the sequences, with ``TrackerConfig(train=True, skip_inactive=False)``: memory-attention dropout with
a key per step, the decoder's four candidate masks per frame for the best-mask loss, and no ``lax.cond``
(whose batched predicate under ``vmap`` would copy every weight per sequence). The loss
(:mod:`.losses`) is differentiated through the whole scan; ``TrackerConfig.remat`` rematerialises each step
so that memory stays flat in T.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import tracking
from ..model.sam2 import SAM2, resize_bilinear
from .batch import batch_to_prompts
from .losses import LossWeights, sequence_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of the model's nnx.Param leaves (float32)
    opt_state: Any
    key: jax.Array  # typed PRNG key


def train_mode(model: SAM2, *, remat: bool = False) -> SAM2:
    """Put ``model`` in training mode in place: the decoder answers a single-mask request with mask token 0
    (SAM 2's dynamic multimask-via-stability fallback runs only in eval). ``remat``: the image encoder
    recomputes each image's activations in the backward pass (with ``TrackerConfig.remat`` for the scan,
    activation memory no longer grows with the number of frames)."""
    model.sam_mask_decoder.deterministic = False
    model.image_encoder.remat = remat
    if jax.device_count() > 1 or not remat:
        # Encode the B*T frames at once rather than through a lax.map over them: under differentiation the
        # map stacks every saved activation of every frame into loop buffers (zero-filled, then written one
        # frame at a time: ~0.25 s of a 1.9 s step at 256 px, T=4, on CPU), and with the batch split over
        # devices the SPMD partitioner cannot split the map's (sharded) frame axis. With remat on one
        # device the map stays, so that only one image's activations are live at a time in the backward.
        model.image_encoder.images_per_step = 0
    return model


def tracker_config(base: tracking.TrackerConfig, *, remat: bool = False, dropout: bool = False
                   ) -> tracking.TrackerConfig:
    """``base`` made for training: candidate outputs, no inactive-step ``lax.cond``, float32 memories (SAM 2
    trains with float32 memories; the bfloat16 rounding is its video predictor's), optional remat/dropout."""
    return dataclasses.replace(base, train=True, skip_inactive=False, remat=remat, dropout=dropout,
                               store_memory_bf16=False)


def sequence_outputs(model: SAM2, batch: dict, key: jax.Array, tcfg: tracking.TrackerConfig,
                     compute_dtype: Any = jnp.float32, compute_scope: str = "model") -> dict[str, jax.Array]:
    """Track every sequence of ``batch``: (B, T, 4, S/4, S/4) candidate logits, their IoU predictions and
    validity, the chosen low-res masks and the object-score logits (B, T).

    ``compute_dtype`` other than float32 casts the (float32) parameters of ``compute_scope`` ("model": every
    submodule, "image_encoder": the encoder alone, the rest then computing in float32 on float32 features)
    inside the traced step (:func:`tracking.compute_model`): the parameters stay float32 and their gradients
    flow back through the cast. The heads' outputs and the loss are float32 either way."""
    images = batch["images"]
    b, t = images.shape[:2]
    cmodel = tracking.compute_model(model, compute_dtype, compute_scope)
    if jnp.dtype(compute_dtype) != jnp.float32:
        images = images.astype(compute_dtype)
    enc = cmodel.encode_image(images.reshape((b * t,) + images.shape[2:]))
    track_model, fpn, pos = cmodel, enc["backbone_fpn"], enc["vision_pos_enc"]
    if compute_scope != "model":  # only the encoder computes in compute_dtype
        track_model = model
        fpn, pos = [f.astype(jnp.float32) for f in fpn], [q.astype(jnp.float32) for q in pos]
    fpn = [f.reshape((b, t) + f.shape[1:]) for f in fpn]
    pos = [q[:1] for q in pos]
    prompts = batch_to_prompts(batch, tcfg.max_cond_frames)
    keys = jax.random.split(key, b)

    def one(fpn_i, prompts_i, key_i):
        out = tracking.propagate(track_model, {"fpn": fpn_i, "pos": pos}, prompts_i, key_i, tcfg, "forward")
        return {k: out[k][0] for k in ("candidates", "candidates_iou", "candidates_valid", "low_res_masks",
                                       "object_score_logits")}

    return jax.vmap(one)(fpn, prompts, keys)


def loss_and_terms(model: SAM2, batch: dict, key: jax.Array, tcfg: tracking.TrackerConfig,
                   weights: LossWeights = LossWeights(), compute_dtype: Any = jnp.float32,
                   compute_scope: str = "model"):
    """SAM 2's loss of a batch (see :mod:`.losses`): the candidates are upsampled to the image size
    (bilinear, as SAM 2 computes its losses on ``high_res_masks``) and scored against the full-size masks."""
    out = sequence_outputs(model, batch, key, tcfg, compute_dtype, compute_scope)
    s = batch["masks"].shape[-1]
    cand = resize_bilinear(out["candidates"], (s, s), antialias=False)
    # A mask prompt is its frame's output: SAM 2 scores the full-size logits (mask * 20 - 10) there, not their
    # low-res copy upsampled (constant either way; this makes the loss value SAM 2's).
    prompts = batch_to_prompts(batch, tcfg.max_cond_frames)
    t = cand.shape[1]
    by_mask = jnp.any(prompts.mask_valid[:, 0, :, None] & (prompts.frame_idx[:, 0, :, None] == jnp.arange(t)),
                      axis=1)  # (B, T)
    full = (batch["mask_inputs"].astype(jnp.float32) * 20.0 - 10.0)[:, :, None]
    cand = jnp.where(by_mask[:, :, None, None, None] & (jnp.arange(4) == 0)[:, None, None], full, cand)
    return sequence_loss(cand, out["candidates_iou"], out["candidates_valid"], out["object_score_logits"],
                         batch["masks"].astype(jnp.float32), batch["frame_valid"], weights)


def make_train_step(
    graphdef: Any,
    rest: Any,
    tx: optax.GradientTransformation,
    tcfg: tracking.TrackerConfig,
    *,
    weights: LossWeights = LossWeights(),
    compute_dtype: Any = jnp.float32,
    compute_scope: str = "model",
    schedule: Callable | None = None,
    return_grads: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` (not jitted: :func:`jit_train_step` adds the shardings).

    ``rest``: the model's non-parameter state (constants), closed over. ``compute_dtype`` /
    ``compute_scope``: see :func:`sequence_outputs` (the parameters and optimiser state stay float32). ``return_grads`` adds the gradients
    to the metrics (tests compare them across meshes). The step's key is
    ``fold_in(state.key, state.step)``, so a resumed run draws what an uninterrupted one would.
    """

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params, rest)
        return loss_and_terms(model, batch, key, tcfg, weights, compute_dtype, compute_scope)

    def step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.key, state.step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if return_grads:  # for tests: the gradients themselves
            metrics["grads"] = grads
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key), metrics

    return step


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      key=jax.random.key(seed))


def jit_train_step(step_fn, state_sharding, batch_sharding, *, donate: bool = True):
    """One ``jax.jit`` with the state's and the batch's shardings; the old state's buffers are donated."""
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=(0,) if donate else ())
