"""The training package's pieces on their own, without the model: loss terms, optimiser rules, sharding
rules, config validation and the command line's usage errors."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medsam2_jax.train import losses, optim, sharding
from medsam2_jax.train.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- losses
def _np_focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    pt = p * t + (1 - p) * (1 - t)
    return ((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - pt) ** gamma).mean(axis=(-2, -1))


def _np_dice(x, t):
    p = 1 / (1 + np.exp(-x))
    return 1 - (2 * (p * t).sum(axis=(-2, -1)) + 1) / (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1)) + 1)


def test_focal_dice_iou_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3, size=(3, 4, 16, 16)).astype(np.float64)
    t = (rng.random((3, 4, 16, 16)) < 0.3).astype(np.float64)
    np.testing.assert_allclose(losses.sigmoid_focal(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)),
                               _np_focal(x, t), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(losses.dice_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)),
                               _np_dice(x, t), rtol=2e-5, atol=1e-7)
    pred, tt = x > 0, t > 0.5
    want = (pred & tt).sum(axis=(-2, -1)) / np.maximum((pred | tt).sum(axis=(-2, -1)), 1)
    np.testing.assert_allclose(losses.mask_iou(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)), want,
                               rtol=1e-6)
    # saturated logits stay finite (the stable BCE form)
    big = jnp.asarray([[[[-1024.0, 1024.0]]]])
    assert np.isfinite(np.asarray(losses.sigmoid_focal(big, jnp.asarray([[[[1.0, 0.0]]]])))).all()


def _frames(rng, b=2, t=3, m=4, h=8):
    logits = rng.normal(scale=2, size=(b, t, m, h, h)).astype(np.float32)
    iou = rng.random((b, t, m)).astype(np.float32)
    target = (rng.random((b, t, h, h)) < 0.4).astype(np.float32)
    obj = rng.normal(size=(b, t)).astype(np.float32)
    return logits, iou, target, obj


def test_best_candidate_takes_the_mask_and_iou_losses():
    rng = np.random.default_rng(1)
    logits, iou, target, obj = _frames(rng)
    valid = np.zeros((2, 3, 4), bool)
    valid[..., 1:] = True  # multimask: tokens 1..3
    per = losses.frame_losses(logits, iou, valid, obj, target)
    t = target[:, :, None]
    combo = 20 * _np_focal(logits.astype(np.float64), t) + _np_dice(logits.astype(np.float64), t)
    combo[..., 0] = np.inf
    best = combo.argmin(-1)
    np.testing.assert_array_equal(per["best"], best)
    take = lambda a: np.take_along_axis(a, best[..., None], -1)[..., 0]
    np.testing.assert_allclose(per["focal"], take(_np_focal(logits.astype(np.float64), t)), rtol=1e-5)
    real = np.asarray(losses.mask_iou(logits, t))
    np.testing.assert_allclose(per["iou"], take(np.abs(iou - real)), rtol=1e-5, atol=1e-7)
    # a single-mask frame: only token 0 is a candidate
    valid1 = np.zeros_like(valid)
    valid1[..., 0] = True
    assert (np.asarray(losses.frame_losses(logits, iou, valid1, obj, target)["best"]) == 0).all()


def test_absent_object_gets_only_the_object_score_loss():
    rng = np.random.default_rng(2)
    logits, iou, target, obj = _frames(rng)
    target[0, 1] = 0.0
    valid = np.ones((2, 3, 4), bool)
    per = losses.frame_losses(logits, iou, valid, obj, target)
    for k in ("focal", "dice", "iou"):
        assert float(per[k][0, 1]) == 0.0 and float(per[k][0, 0]) > 0
    bce = np.maximum(obj, 0) - obj * 1.0 + np.log1p(np.exp(-np.abs(obj)))
    np.testing.assert_allclose(per["object_score"][0, 0], bce[0, 0], rtol=1e-6)
    bce0 = np.maximum(obj, 0) + np.log1p(np.exp(-np.abs(obj)))
    np.testing.assert_allclose(per["object_score"][0, 1], bce0[0, 1], rtol=1e-6)


def test_sequence_loss_sums_frames_and_averages_objects():
    rng = np.random.default_rng(3)
    logits, iou, target, obj = _frames(rng)
    valid = np.ones((2, 3, 4), bool)
    fv = np.array([[True, True, False], [True, True, True]])
    loss, terms = losses.sequence_loss(logits, iou, valid, obj, target, fv)
    per = losses.frame_losses(logits, iou, valid, obj, target)
    w = dict(focal=20, dice=1, iou=1, object_score=1)
    want = sum(w[k] * (np.asarray(per[k]) * fv).sum() / 2 for k in w)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(loss), sum(float(terms[k]) for k in w), rtol=1e-6)
    assert 0 <= float(terms["dice_score"]) <= 1
    # a padded frame does not count, whatever it holds
    logits2 = logits.copy()
    logits2[0, 2] = 50.0
    np.testing.assert_allclose(float(losses.sequence_loss(logits2, iou, valid, obj, target, fv)[0]), float(loss),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------- optimiser
def _params():
    return {"image_encoder": {"blk": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,)), "norm": {"scale": jnp.ones((4,))}}},
            "sam_mask_decoder": {"mlp": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
            "no_mem_embed": jnp.ones((1, 1, 4))}


def _one_step(tx, params, grads):
    state = tx.init(params)
    upd, _ = tx.update(grads, state, params)
    return optax.apply_updates(params, upd)


def test_weight_decay_skips_biases_and_norms():
    p = _params()
    tx, _ = optim.make_optimizer(p, lr=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, clip_norm=0)
    zero = jax.tree.map(jnp.zeros_like, p)
    new = _one_step(tx, p, zero)  # zero gradients: only decay moves a parameter
    assert float(new["image_encoder"]["blk"]["kernel"][0, 0]) < 1.0
    assert float(new["no_mem_embed"][0, 0, 0]) < 1.0
    for leaf in (new["image_encoder"]["blk"]["bias"], new["image_encoder"]["blk"]["norm"]["scale"],
                 new["sam_mask_decoder"]["mlp"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)


def test_freeze_and_lr_multipliers():
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    tx, _ = optim.make_optimizer(p, lr=0.1, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=0,
                                 freeze=("image_encoder",), lr_multipliers={"^sam_mask_decoder/": 0.5})
    new = _one_step(tx, p, g)
    for leaf in jax.tree.leaves(new["image_encoder"]):
        np.testing.assert_array_equal(leaf, 1.0)
    step_dec = 1.0 - float(new["sam_mask_decoder"]["mlp"]["kernel"][0, 0])
    step_other = 1.0 - float(new["no_mem_embed"][0, 0, 0])
    np.testing.assert_allclose(step_dec / step_other, 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="freeze: 'image_encdoer' matches no parameter"):
        optim.make_optimizer(p, lr=0.1, total_steps=10, freeze=("image_encdoer",))
    with pytest.raises(ValueError, match="lr_multipliers"):
        optim.make_optimizer(p, lr=0.1, total_steps=10, lr_multipliers={"^nothing/": 0.1})


def test_clipping_ignores_frozen_gradients():
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    g["image_encoder"]["blk"]["kernel"] = jnp.full((4, 4), 1e6)  # huge, but frozen
    tx, _ = optim.make_optimizer(p, lr=0.1, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                                 freeze=("image_encoder",), b1=0.0)
    new = _one_step(tx, p, g)
    ref, _ = optim.make_optimizer(p, lr=0.1, total_steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                                  freeze=("image_encoder",), b1=0.0)
    g2 = dict(g, image_encoder=jax.tree.map(jnp.zeros_like, g["image_encoder"]))
    np.testing.assert_allclose(new["no_mem_embed"], _one_step(ref, p, g2)["no_mem_embed"], rtol=1e-6)


def test_schedule_warms_up_then_decays():
    s = optim.schedule(1.0, 10, 110, 0.1)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(110)) - 0.1) < 1e-6 and float(s(60)) < 1.0


# ---------------------------------------------------------------------------------------------- sharding
def test_sharding_rules_split_kernels_over_fsdp_only_when_they_divide():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4}

    m = FakeMesh()
    assert sharding.spec_for("a/kernel", (256, 256), m) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.spec_for("a/kernel", (3, 3, 64, 256), m) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sharding.spec_for("a/bias", (4096,), m) == jax.sharding.PartitionSpec()
    assert sharding.spec_for("a/kernel", (256, 258), m) == jax.sharding.PartitionSpec()  # 258 % 4 != 0
    assert sharding.spec_for("a/kernel", (4, 4), m) == jax.sharding.PartitionSpec()  # too small to split
    rules = ((r"^image_encoder/", ("fsdp", None)), (".*", ()))
    assert sharding.spec_for("image_encoder/x/kernel", (256, 512), m, rules) == jax.sharding.PartitionSpec("fsdp")


def test_mesh_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"mesh.data x mesh.fsdp = 2 x 2 = 4, but there are 1 devices"):
        sharding.make_mesh(2, 2)
    mesh = sharding.make_mesh(-1, 1)
    assert mesh.shape == {"data": 1, "fsdp": 1}


# ---------------------------------------------------------------------------------------------- config + CLI
def _demo():
    from configs import demo  # the repository root is on sys.path under pytest (tests/ is a package)

    return demo.get_config()


@pytest.mark.parametrize("field,value,match", [
    ("image_size", 100, "multiple of 32"),
    ("model", "sam3", "expected one of"),
    ("lr", 0.0, "> 0.0"),
    ("bank.policy", "lru", "'fifo', 'self_sorting'"),
    ("mesh.fsdp", 0, ">= 1"),
    ("freeze", (3,), "tuple of module names"),
    ("data.phantoms", -1, ">= 0"),
    ("data.p_box", 0.5, "must be 1"),
    ("tracker.max_cond_frames", 1, "corrected frames need 3"),
    ("compile_in_subprocess", "yes", "'auto', 'on', 'off'"),
])
def test_config_errors_name_the_field(field, value, match):
    c = _demo()
    with c.unlocked():
        node = c
        *parents, last = field.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    with pytest.raises(ConfigError, match=match) as e:
        validate(c)
    assert e.value.field.split(".")[0] == field.split(".")[0]  # the message names the field (or its group)


def test_demo_and_every_experiment_config_validate():
    import importlib

    for name in ("demo", "ct_3d", "oneprompt_2d", "pod"):
        c = importlib.import_module(f"configs.{name}").get_config()
        if not c.data.dataset_dirs and not c.data.phantoms and not c.data.realct:
            with c.unlocked():
                c.data.dataset_dirs = ("/some/folder",)
        validate(c)


@pytest.mark.parametrize("args,match", [
    (["--config.nope=1"], "unknown config field in --config.nope"),
    (["--config.lr=-1"], "config field 'lr'"),
    (["--config.total_steps=abc"], "total_steps"),
    ([], None),  # the workdir flag is missing
])
def test_cli_usage_errors_exit_2(args, match, tmp_path):
    argv = [sys.executable, "train.py", "--config=configs/demo.py"] + args
    if args:
        argv.append(f"--workdir={tmp_path / 'run'}")
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert (match or "--workdir is required") in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written by a failed start


def test_help_lists_configs_and_flags():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for s in ("configs/demo.py", "configs/pod.py", "--workdir", "--compile_cache", "resumes"):
        assert s in r.stdout
