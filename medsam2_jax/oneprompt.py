"""2D one-prompt segmentation (paper §3.3): one prompt on one template image segments a whole image set.

An unordered set of images is treated as a pseudo-video: the prompted **template** is its first frame and
a conditioning frame (segmented from its prompt alone, as SAM 2 does for prompted frames, and attended by
every other image); the other images follow in one forward pass of the tracker, and the memory bank
(self-sorting by default: the paper's) carries the prompt's information from image to image::

    res = segment_image_set(model, images, template_index=3, prompt={"points": [[120, 96]], "labels": [1]})
    res.probs          # (N, S, S) probabilities, in the input order
    res.order          # the processing order (template first)

What is guaranteed (and what is not)
------------------------------------
* The template's output is its single-image prediction from the prompt (SAM 2's image predictor path:
  multimask for one click, the mask itself for a mask prompt), whatever the other images are.
* The pass is causal: the image processed at position ``p`` depends on the template and on the images at
  positions ``< p`` only.
* **Order.** A sequential memory cannot be order-free: the memory an image leaves in the bank is encoded
  from its own prediction, which depends on the images processed before it; and SAM 2.1 encodes the
  distance to the template's object pointer and, in the bank, to each entry (the "distance" rule). Even a
  bank that keeps everything (``K >= N``) without resampling leaves the result order-dependent. So the
  processing order is chosen from the content: ``order="similarity"`` (default) processes the other
  images by decreasing cosine similarity of their frame descriptor (the bank's, :func:`make_descriptor` of
  the image embedding) to the template's, ties by input index. The result is then **exactly invariant to
  the order in which the images are given** (up to which of two bit-identical images gets which output),
  and the pass is a curriculum from the images most like the template to the least. ``order="given"``
  processes them in the given order (the official code's behaviour); then only the two guarantees above
  hold.

Defaults: the tracker's (:class:`~medsam2_jax.tracking.TrackerConfig`: self-sorting bank, ``K = 6``,
``c_thresh = 0.5``; the official 2D code keeps 16 entries: pass ``BankConfig(K=16)`` to compare). The
random key of the pass is ``key`` itself (default ``jax.random.key(0)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .memory.bank import make_descriptor
from .model.sam2 import SAM2, resize_bilinear
from .tracking import (TrackerConfig, bucketed, descriptor_grid, encode_frames, make_prompts, pad_frames,
                       run_sequence, take_frames)

ORDERS = ("similarity", "given")


@dataclasses.dataclass(frozen=True)
class OnePromptConfig:
    """``order``: ``"similarity"`` (default, order-invariant) or ``"given"``; ``tracker``: the tracker's
    settings (its bank: self-sorting by default); ``length_bucket``: pad the pass to a multiple of this
    many frames (zero features after the real ones; None: no padding) so sets of different sizes share a
    compiled program."""

    order: str = "similarity"
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    length_bucket: int | None = None

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"OnePromptConfig.order: got {self.order!r}, expected one of {ORDERS}")
        if not isinstance(self.tracker, TrackerConfig):
            raise ValueError(f"OnePromptConfig.tracker: got {type(self.tracker).__name__}, expected a TrackerConfig")
        if self.length_bucket is not None and (not isinstance(self.length_bucket, int) or self.length_bucket < 1):
            raise ValueError(f"OnePromptConfig.length_bucket: got {self.length_bucket!r}, expected None or an int >= 1")


@dataclasses.dataclass
class ImageSetResult:
    """Outputs in the **input** order: ``probs`` ``(N, S, S)`` float32, ``mask_logits`` ``(N, S, S)``,
    ``low_res_masks`` ``(N, S/4, S/4)``, ``iou`` and ``object_score_logits`` ``(N,)``; ``order`` ``(N,)``:
    input indices in processing order (template first); ``similarity`` ``(N,)``: cosine of each image's
    descriptor to the template's; ``trace``: the tracker's per-step bank trace (processing order)."""

    probs: np.ndarray
    mask_logits: np.ndarray
    low_res_masks: np.ndarray
    iou: np.ndarray
    object_score_logits: np.ndarray
    order: np.ndarray
    similarity: np.ndarray
    trace: dict[str, np.ndarray]


def processing_order(similarity: np.ndarray, template_index: int, order: str) -> np.ndarray:
    """Template first, then the others by decreasing ``similarity`` (ties: lower index first) or as given."""
    n = len(similarity)
    others = np.array([i for i in range(n) if i != template_index], np.int64)
    if order == "similarity" and others.size:
        others = others[np.lexsort((others, -np.asarray(similarity, np.float64)[others]))]
    return np.concatenate([[template_index], others]).astype(np.int64)


def segment_image_set(model: SAM2, images: Any, template_index: int, prompt: Mapping[str, Any],
                      config: OnePromptConfig = OnePromptConfig(), *, key: jax.Array | None = None) -> ImageSetResult:
    """Segment the object prompted on ``images[template_index]`` in every image of ``images`` (N, S, S, 3),
    normalised. ``prompt``: ``{"points": (k, 2) xy, "labels": (k,)}``, ``{"box": xyxy}`` (optionally with
    points) or ``{"mask": (S, S)}`` on the template. See the module docstring for what is guaranteed."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be an (N, S, S, 3) array, got shape {images.shape}")
    model.check_images(images)
    n = images.shape[0]
    if not isinstance(template_index, (int, np.integer)) or not 0 <= int(template_index) < n:
        raise ValueError(f"template_index must be an image index in [0, {n - 1}], got {template_index!r}")
    if not isinstance(prompt, Mapping):
        raise ValueError(f"prompt must be a dict (points/labels, box or mask), got {type(prompt).__name__}")
    if "frame" in prompt or "slice" in prompt:
        raise ValueError("prompt must not name a frame: it is on the template image (template_index)")
    template_index = int(template_index)
    cfg = config
    feats = encode_frames(model, images, batch=cfg.tracker.encode_batch, devices=cfg.tracker.encode_devices)
    top = feats["fpn"][-1]
    desc = np.asarray(make_descriptor(top, descriptor_grid(top.shape[1], cfg.tracker.descriptor_grid)), np.float64)
    unit = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit[template_index]
    order = processing_order(sim, template_index, cfg.order)

    length = bucketed(n, cfg.length_bucket)
    prompts = make_prompts([[dict(prompt, frame=0)]], num_frames=length, image_size=model.image_size,
                           config=cfg.tracker)
    key = jax.random.key(0) if key is None else key
    out = run_sequence(model, pad_frames(take_frames(feats, order), length), prompts, key, cfg.tracker, "forward")
    inv = np.argsort(order)
    low = np.asarray(out["low_res_masks"][0, :n])[inv]
    s = model.image_size
    logits = np.asarray(resize_bilinear(jnp.asarray(low), (s, s), antialias=False))
    return ImageSetResult(
        probs=np.asarray(jax.nn.sigmoid(logits)),
        mask_logits=logits,
        low_res_masks=low,
        iou=np.asarray(out["iou"][0, :n])[inv],
        object_score_logits=np.asarray(out["object_score_logits"][0, :n])[inv],
        order=order,
        similarity=sim.astype(np.float32),
        trace={k: np.asarray(v[:, 0]) for k, v in out["trace"].items()},
    )


__all__ = ["OnePromptConfig", "ImageSetResult", "segment_image_set", "processing_order"]
