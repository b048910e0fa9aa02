"""The JAX training loss and its gradients against SAM 2's training forward and loss in PyTorch.

One fixed batch of B = 3 sequences of T = 3 frames at 128 px (a moving disk; targets on every frame), one
object each, prompted on frame 0 with a click (three candidate masks), a box (two corner points: the
single-mask token 0) and a mask (the mask is the frame's output), tracked forward with SAM 2's FIFO memory.
Reference: :mod:`medsam2_jax.interop.torch_reference` on the ``sam2`` package's SAM 2.1 tiny
(``medsam2_jax.interop.torch_models.perturbed_torch_model``: random init, every parameter perturbed, a copy so
the cached model is untouched), in training behaviour without dropout; the object-score head's bias is raised
by 4 before conversion (a random model scores every object absent, and then every mask is the constant -1024 and no mask
gradient flows), so the object is present on every frame on both sides, by a margin (|logit| >= 1) that
float error cannot flip. JAX: the converted model (``torch_checkpoint.convert_state_dict``, what users run),
``step.train_mode`` and :func:`medsam2_jax.train.step.loss_and_terms` under ``step.tracker_config``
(candidates, no inactive-step cond, float32 memories, no dropout), differentiated with ``jax.grad`` and
exported to PyTorch names and layouts with the weights' key map (``weights.export_state_dict`` of the
gradient state merged into the model graph).

Checks: the loss and each term agree (1e-5 relative); the gradient of every one of the 470 parameters
agrees per tensor: ``max|g_jax - g_ref| <= RTOL * max|g_ref| + ATOL * G`` with ``G`` the largest gradient
entry of the whole model; gradients are non-zero in the image encoder, memory attention, memory encoder and
mask decoder (so the comparison is not vacuous); and the same comparison fails on a 10% change of the focal or
the IoU loss weight, on a loss without its IoU term, and on a wrong gradient of one tensor.

Tolerances, measured (float32 both sides, "highest" matmul precision): the loss terms agree to ~2e-7
relative. Per tensor, the largest ``max|Δ| / max|g_ref|`` of a tensor with a real gradient is ~2.2e-3
(memory attention's ``linear1`` in layer 2; typically 1e-4..1e-5 elsewhere): the forward agrees to float32
summation order (~1e-6 relative), and the backward amplifies it where the derivative is discontinuous or
steep — ReLU units of the memory-attention MLPs whose pre-activation is within rounding of 0 switch their
gradient on or off, and the focal loss's modulating factor ``(1 - p_t)^2`` near saturation turns small logit
differences into larger relative gradient differences — and sums that over ~6500 pixels x 3 frames x 3
sequences. ``RTOL = 1e-2`` leaves a 4x margin and is still 10x below the smallest mutation checked (a 10%
change of a loss weight). The decoder's attention key-projection biases have a gradient that is exactly 0
in exact arithmetic (softmax is invariant to a constant added to every key's logit) and ~1e-8 of rounding
noise in both frameworks, uncorrelated; ``ATOL = 1e-6`` of the model's largest gradient entry (measured
noise <= 1.2e-8 absolute, ``G`` = 3.1) covers them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from medsam2_jax import tracking  # noqa: E402
from medsam2_jax.interop import parity, torch_checkpoint, weights  # noqa: E402
from medsam2_jax.interop import torch_reference as tr  # noqa: E402
from medsam2_jax.interop.torch_models import perturbed_torch_model  # noqa: E402
from medsam2_jax.memory.bank import BankConfig  # noqa: E402
from medsam2_jax.model.sam2 import normalize_images  # noqa: E402
from medsam2_jax.train import step  # noqa: E402
from medsam2_jax.train.losses import LossWeights  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

S, T, B, P = 128, 3, 3, 4
MODEL = "sam2.1_hiera_t"
OBJECT_BIAS = 4.0
RTOL = 1e-2
ATOL = 1e-6
MODULES = ("image_encoder.", "memory_attention.", "memory_encoder.", "sam_mask_decoder.")


def make_batch() -> dict[str, np.ndarray]:
    """Sequence 0: a click on the disk; 1: a box around it (mirrored frames); 2: the mask of frame 0."""
    clip = np.asarray(normalize_images(parity.moving_disk_clip(S, T)), np.float32)
    yy, xx = np.mgrid[:S, :S].astype(np.float32) / S
    masks = np.stack([(xx - (0.35 + 0.02 * f)) ** 2 + (yy - (0.4 + 0.015 * f)) ** 2 < 0.12 ** 2 for f in range(T)])
    batch = {
        "images": np.stack([clip, clip[:, :, ::-1], clip]),
        "masks": np.stack([masks, masks[:, :, ::-1], masks]),
        "frame_valid": np.ones((B, T), bool),
        "point_coords": np.zeros((B, T, P, 2), np.float32),
        "point_labels": -np.ones((B, T, P), np.int32),
        "mask_inputs": np.zeros((B, T, S, S), np.float32),
        "mask_valid": np.zeros((B, T), bool),
        "prompted": np.zeros((B, T), bool),
    }
    batch["prompted"][:, 0] = True
    batch["point_coords"][0, 0, 0], batch["point_labels"][0, 0, 0] = (0.35 * S, 0.4 * S), 1
    box = np.array([[(1 - 0.35 - 0.14) * S, 0.26 * S], [(1 - 0.35 + 0.14) * S, 0.54 * S]], np.float32)
    batch["point_coords"][1, 0, :2], batch["point_labels"][1, 0, :2] = box, (2, 3)
    batch["mask_inputs"][2, 0], batch["mask_valid"][2, 0] = masks[0], True
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}


def grad_mismatches(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[list[str], dict]:
    """Per-tensor check ``max|Δ| <= RTOL * max|ref| + ATOL * G``; returns the failing tensors and stats."""
    g = max(float(np.abs(r).max()) for r in ref.values())
    bad, worst = [], (0.0, "")
    for name, r in ref.items():
        o = ours[name]
        if o.shape != r.shape:
            bad.append(f"{name}: shape {o.shape} vs {r.shape}")
            continue
        d = float(np.abs(o - r).max())
        scale = float(np.abs(r).max())
        if d > RTOL * scale + ATOL * g:
            bad.append(f"{name}: max|diff| {d:.3e}, max|ref| {scale:.3e}")
        if scale > 1e-4 * g:  # tensors with a real gradient: the relative error that RTOL bounds
            worst = max(worst, (d / scale, name))
    return bad, {"G": g, "worst_relative": worst}


@pytest.fixture(scope="module")
def run():
    tm = copy.deepcopy(perturbed_torch_model(MODEL, S, seed=0))
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias += OBJECT_BIAS
    sd = {k: v.detach().float().numpy() for k, v in tm.state_dict().items()}
    model = step.train_mode(torch_checkpoint.convert_state_dict(sd, MODEL, S, source="perturbed sam2.1_hiera_t"))
    tr.training_mode(tm)
    batch = make_batch()

    # PyTorch: the loss, its gradient and the gradients of the focal and IoU terms alone (for the mutations).
    loss_t, terms_t = tr.loss_and_terms(tm, batch, max_cond_frames=1)
    names = [n for n, _ in tm.named_parameters()]
    params_t = [p for _, p in tm.named_parameters()]

    def grads(y, retain):
        gs = torch.autograd.grad(y, params_t, retain_graph=retain, allow_unused=True)
        return {n: (np.zeros(p.shape, np.float32) if g is None else g.numpy().copy())
                for n, p, g in zip(names, params_t, gs)}

    g_focal = grads(terms_t["focal"], True)
    g_iou = grads(terms_t["iou"], True)
    g_ref = grads(loss_t, False)

    # JAX: the same loss through the tracker, differentiated; gradients exported with the weights' key map.
    tcfg = step.tracker_config(tracking.TrackerConfig(bank=BankConfig.sam2_fifo(), max_cond_frames=1, max_points=P))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, b):
        return step.loss_and_terms(nnx.merge(graphdef, p, rest), b, jax.random.key(0), tcfg, LossWeights())

    (loss_j, terms_j), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})
    exported = weights.export_state_dict(nnx.merge(graphdef, g, rest))
    param_keys = {e.torch_key for e in weights.iter_entries(model) if isinstance(e.variable, nnx.Param)}
    return {
        "loss_t": float(loss_t.detach()), "terms_t": {k: float(terms_t[k].detach()) for k in tr.TERMS},
        "obj_t": terms_t["object_score_logits"],
        "loss_j": float(loss_j), "terms_j": {k: float(terms_j[k]) for k in tr.TERMS},
        "g_ref": g_ref, "g_focal": g_focal, "g_iou": g_iou,
        "g_jax": {k: v for k, v in exported.items() if k in param_keys}, "param_keys": param_keys,
    }


def test_every_parameter_has_a_gradient_on_both_sides(run):
    assert run["param_keys"] == set(run["g_ref"]), (
        sorted(run["param_keys"] ^ set(run["g_ref"]))[:10])
    assert len(run["g_ref"]) == 470


def test_object_present_by_a_margin(run):
    # Presence gates every mask (-1024 when absent): it must not be a coin flip between the frameworks.
    assert np.all(run["obj_t"] >= 1.0), run["obj_t"]


def test_loss_agrees(run):
    assert run["loss_j"] == pytest.approx(run["loss_t"], rel=1e-5)
    for k in tr.TERMS:
        assert run["terms_j"][k] == pytest.approx(run["terms_t"][k], rel=1e-5, abs=1e-6), k
    assert run["terms_t"]["iou"] > 0.05 and run["terms_t"]["focal"] > 0.05  # every term is in play


def test_gradients_agree(run):
    bad, stats = grad_mismatches(run["g_jax"], run["g_ref"])
    print(f"\nlargest gradient entry G = {stats['G']:.3e}; worst relative error "
          f"{stats['worst_relative'][0]:.2e} ({stats['worst_relative'][1]})")
    assert not bad, "\n".join(bad[:20])


def test_gradients_reach_every_module(run):
    g = max(float(np.abs(v).max()) for v in run["g_ref"].values())
    for side in ("g_ref", "g_jax"):
        for prefix in MODULES:
            m = max(float(np.abs(v).max()) for k, v in run[side].items() if k.startswith(prefix))
            assert m > 1e-3 * g, (side, prefix, m, g)
    # ... including the memory path of the tracked frames: memory attention's every layer.
    for i in range(4):
        assert np.abs(run["g_ref"][f"memory_attention.layers.{i}.linear2.weight"]).max() > 1e-4 * g


def test_comparison_catches_mutations(run):
    ref, jx = run["g_ref"], run["g_jax"]
    mutated = {
        "focal weight x1.1": {k: ref[k] + 0.1 * run["g_focal"][k] for k in ref},
        "iou weight x1.1": {k: ref[k] + 0.1 * run["g_iou"][k] for k in ref},
        "no iou term": {k: ref[k] - run["g_iou"][k] for k in ref},
    }
    for what, g in mutated.items():
        assert grad_mismatches(jx, g)[0], f"the gradient check passed with the {what}"
    # A 10% change of the IoU weight also moves the loss far beyond its tolerance.
    assert 0.1 * run["terms_t"]["iou"] > 100 * 1e-5 * run["loss_t"]
    # One tensor's gradient wrong: scaled by 1.05, or transposed (a layout bug in a square kernel).
    name = "memory_attention.layers.1.cross_attn_image.q_proj.weight"
    for wrong in (1.05 * jx[name], jx[name].T):
        bad = grad_mismatches(dict(jx, **{name: wrong}), ref)[0]
        assert len(bad) == 1 and bad[0].startswith(name + ":"), bad
