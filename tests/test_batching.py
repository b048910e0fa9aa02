"""Many sequences at once (issue 13, batching): ``tracking.propagate_many`` tracks V sequences (volumes, or one
volume's orientations) in one vmapped scan and equals V separate ``propagate_jit`` runs with the same keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax import api, tracking
from medsam2_jax.memory.bank import BankConfig

S, T, V = 64, 4, 2
CFG = tracking.TrackerConfig(bank=BankConfig(K=3))  # self-sorting with resampling: the keys matter


@pytest.fixture(scope="module")
def setup():
    model = api.random_model("sam2.1_hiera_t", S, seed=3)
    bias = model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    bias.set_value(bias.get_value() + 2.0)  # object present: real masks and memories
    rng = np.random.default_rng(0)
    frames = [jnp.asarray(rng.normal(size=(T, S, S, 3)), jnp.float32) for _ in range(V)]
    feats = [tracking.encode_frames(model, f, batch=T) for f in frames]
    prompts = [tracking.make_prompts([[{"frame": v, "points": [[20 + 10 * v, 30]], "labels": [1]}]],
                                     num_frames=T, image_size=S, config=CFG) for v in range(V)]
    return model, feats, prompts


@pytest.mark.slow
def test_propagate_many_equals_separate_runs(setup):
    model, feats, prompts = setup
    key = jax.random.key(7)
    many = tracking.propagate_many(model, tracking.stack_features(feats), jax.tree.map(lambda *x: jnp.stack(x), *prompts),
                                   config=CFG, direction="both", key=key)
    for v in range(V):
        one = tracking.propagate_jit(model, feats[v], prompts[v], config=CFG, direction="both",
                                     key=jax.random.fold_in(key, v))
        a, b = np.asarray(many["low_res_masks"][v]), np.asarray(one["low_res_masks"])
        assert a.shape == b.shape == (1, T, S // 4, S // 4)
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, np.abs(b).max()), rtol=0)
        np.testing.assert_array_equal(np.asarray(many["visited"][v]), np.asarray(one["visited"]))
        np.testing.assert_allclose(np.asarray(many["iou"][v]), np.asarray(one["iou"]), atol=1e-5)
    # The two sequences differ (different frames, prompts and keys): the batch is not one result repeated.
    assert not np.allclose(np.asarray(many["low_res_masks"][0]), np.asarray(many["low_res_masks"][1]))


@pytest.mark.slow
def test_propagate_many_over_devices_and_errors(setup):
    model, feats, prompts = setup
    stacked = tracking.stack_features(feats)
    ps = jax.tree.map(lambda *x: jnp.stack(x), *prompts)
    key = jax.random.key(7)
    ref = tracking.propagate_many(model, stacked, ps, config=CFG, direction="forward", key=key)
    sharded = tracking.propagate_many(model, stacked, ps, config=CFG, direction="forward", key=key, devices=0)
    np.testing.assert_allclose(np.asarray(sharded["low_res_masks"]), np.asarray(ref["low_res_masks"]),
                               atol=1e-5 * max(1.0, float(np.abs(np.asarray(ref["low_res_masks"])).max())))
    with pytest.raises(ValueError, match="feats hold 2 sequences but prompts 1"):
        tracking.propagate_many(model, stacked, jax.tree.map(lambda a: a[:1], ps), config=CFG)
    with pytest.raises(ValueError, match="direction must be"):
        tracking.propagate_many(model, stacked, ps, config=CFG, direction="sideways")
