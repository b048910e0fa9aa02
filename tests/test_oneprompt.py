"""2D one-prompt mode (medsam2_jax.oneprompt): one prompt on a template image, the bank carries it to a set.

Random SAM 2.1-tiny at S = 256 (object-score bias +2 so the object is present); the "image set" is eight
slices of a CT phantom given in a shuffled order. What is checked is what the module guarantees: shapes,
the template's output is its single-image prediction, the default order makes the result invariant to the
order of the inputs, and the given-order pass is causal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax import api, oneprompt
from medsam2_jax.data.io import Volume
from medsam2_jax.data.phantoms import make_phantom
from medsam2_jax.data.preprocess import preprocess_case

S = 256
SLICES = [13, 8, 18, 10, 21, 3, 15, 11]  # an unordered set
TEMPLATE = 3  # slice 10
CFG = oneprompt.OnePromptConfig()


@pytest.fixture(scope="module")
def model():
    return api.random_model("sam2.1_hiera_t", S, seed=0, init="flax", object_bias=2.0)


@pytest.fixture(scope="module")
def data():
    image, labels, affine = make_phantom(0, "ct", (40, 40, 24), spacing=(1.0, 1.0, 2.0), orientation="RAS")
    pre = preprocess_case(Volume.from_array(image, affine), labels, "CT", size=S)
    images = pre.image[SLICES]
    rr, cc = np.nonzero(pre.labels[SLICES[TEMPLATE]] == 1)
    prompt = {"points": [[float(cc.mean()), float(rr.mean())]], "labels": [1]}
    return images, prompt


@pytest.fixture(scope="module")
def base(model, data):
    images, prompt = data
    return oneprompt.segment_image_set(model, images, TEMPLATE, prompt, CFG, key=jax.random.key(0))


@pytest.mark.slow
def test_shapes_and_template_is_the_single_image_prediction(model, data, base):
    images, prompt = data
    n = len(images)
    assert base.probs.shape == (n, S, S) and base.probs.dtype == np.float32
    assert base.mask_logits.shape == (n, S, S) and base.low_res_masks.shape == (n, S // 4, S // 4)
    assert base.iou.shape == (n,) and base.object_score_logits.shape == (n,)
    assert base.order[0] == TEMPLATE and sorted(base.order) == list(range(n))
    assert base.similarity[TEMPLATE] == pytest.approx(1.0, abs=1e-6)
    # Default order: by decreasing similarity to the template.
    assert np.all(np.diff(base.similarity[base.order[1:]]) <= 0)
    # Every image was tracked, and none of them as an empty frame.
    assert np.all(base.object_score_logits > 0) and np.all(np.isfinite(base.probs))
    # The template's output is SAM 2's single-image prediction from the click (best of 3 masks by IoU).
    feats = model.encode_image(jnp.asarray(images[TEMPLATE:TEMPLATE + 1]))
    single = model.predict_masks(feats, points=jnp.asarray([prompt["points"]], jnp.float32),
                                 labels=jnp.asarray([prompt["labels"]], jnp.int32), multimask=True)
    best = int(jnp.argmax(single["iou"][0]))
    # float32: the tracker pads the click to 8 slots (masked tokens carry exactly zero weight) and encodes
    # the image in a batch of 8, so only rounding differs; logits are O(10).
    assert np.abs(base.low_res_masks[TEMPLATE] - np.asarray(single["masks"][0, best])).max() < 1e-4
    assert base.iou[TEMPLATE] == pytest.approx(float(single["iou"][0, best]), abs=1e-5)


@pytest.mark.slow
def test_similarity_order_makes_the_result_invariant_to_the_input_order(model, data, base):
    images, prompt = data
    n = len(images)
    perm = np.array([5, 0, 7, 3, 1, 6, 2, 4])  # new position i holds old image perm[i]
    tpl = int(np.flatnonzero(perm == TEMPLATE)[0])
    res = oneprompt.segment_image_set(model, images[perm], tpl, prompt, CFG, key=jax.random.key(0))
    assert not np.array_equal(perm, np.arange(n))
    # Same processing sequence of images, hence bit-identical outputs for every image.
    assert np.array_equal(perm[res.order], base.order)
    assert np.array_equal(res.probs, base.probs[perm])
    assert np.array_equal(res.iou, base.iou[perm])
    # ...whereas processing in the given order is a different pass (the order is not the sorted one).
    given = dataclasses.replace(CFG, order="given")
    assert not np.array_equal(oneprompt.processing_order(base.similarity, TEMPLATE, "given"), base.order)
    res_g = oneprompt.segment_image_set(model, images, TEMPLATE, prompt, given, key=jax.random.key(0))
    assert np.array_equal(res_g.order, [TEMPLATE] + [i for i in range(n) if i != TEMPLATE])
    assert np.array_equal(res_g.low_res_masks[TEMPLATE], base.low_res_masks[TEMPLATE])
    assert not np.allclose(res_g.probs, base.probs, atol=1e-3)


@pytest.mark.slow
def test_given_order_is_causal(model, data):
    images, prompt = data
    given = dataclasses.replace(CFG, order="given")
    a = oneprompt.segment_image_set(model, images, TEMPLATE, prompt, given, key=jax.random.key(0))
    # Shuffle only the images after input position 4 (template at 3): positions 0..4 are processed first
    # in both runs (template, then 0, 1, 2, 4), so their outputs cannot change.
    perm = np.array([0, 1, 2, 3, 4, 7, 5, 6])
    b = oneprompt.segment_image_set(model, images[perm], TEMPLATE, prompt, given, key=jax.random.key(0))
    for i in range(5):
        assert np.array_equal(b.low_res_masks[i], a.low_res_masks[i]), i
    assert np.array_equal(b.order, [TEMPLATE, 0, 1, 2, 4, 5, 6, 7])


def test_bad_inputs_are_named(model):
    imgs = np.zeros((2, S, S, 3), np.float32)
    with pytest.raises(ValueError, match="template_index"):
        oneprompt.segment_image_set(model, imgs, 2, {"points": [[1, 1]], "labels": [1]})
    with pytest.raises(ValueError, match="must not name a frame"):
        oneprompt.segment_image_set(model, imgs, 0, {"frame": 1, "points": [[1, 1]], "labels": [1]})
    with pytest.raises(ValueError, match="OnePromptConfig.order"):
        oneprompt.OnePromptConfig(order="random")
    with pytest.raises(ValueError, match="images must be"):
        oneprompt.segment_image_set(model, imgs[0], 0, {"points": [[1, 1]], "labels": [1]})
