"""The PyTorch SAM 2 reference models and the array conversions that go with them.

* :func:`build_torch_model`: SAM 2 (or its video predictor) from the ``sam2`` package at any image size,
  CPU, eval mode, no hole filling; from a checkpoint, SAM 2's random initialisation, or that initialisation
  with every parameter perturbed (``seed``).
* :func:`perturbed_torch_model`: the perturbed model without post-processing, cached per process (the
  reference of the module-level parity tests).
* :func:`perturb_`: freshly initialised SAM 2 has zeros (Hiera position embeddings), ones (LayerNorm weights)
  and 1e-6 (ConvNeXt gamma) that hide porting bugs, so every parameter and buffer gets ``+ 0.02 * N(0, 1)``
  (gammas are set to O(0.1..1) so the fuser actually contributes).
* :func:`state_dict_numpy`, :func:`to_numpy`, :func:`nchw_to_nhwc`, :func:`nhwc_to_nchw`: tensors to NumPy
  and back, NCHW (PyTorch) to NHWC (this port) and back.

torch and ``sam2`` are imported inside the functions, so this module imports without them.
"""

from __future__ import annotations

import functools

import numpy as np

TORCH_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml",
}


def torch_config_name(model_name: str) -> str:
    from ..model.sizes import get_spec

    return TORCH_CONFIGS[get_spec(model_name).name]


def perturb_(model, seed: int = 0) -> None:
    """Add ``0.02 * N(0, 1)`` to every floating parameter and buffer of ``model`` in place; layer-scale
    gammas become ``U(0.5, 1)``. Deterministic per ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def build_torch_model(model_name: str, image_size: int, checkpoint: str | None = None, *, video: bool = False,
                      postprocessing: bool = True, seed: int | None = None):
    """The PyTorch reference at ``image_size``: CPU, eval mode, no hole filling.

    ``video``: ``SAM2VideoPredictor`` instead of ``SAM2Base``. ``postprocessing``: SAM 2's own default
    (``apply_postprocessing=True``: dynamic multimask via stability and, for video, binarised memories of
    prompted frames); ``False`` gives the raw module outputs. Hole filling is off because it needs SAM 2's
    CUDA extension (PyTorch skips it on CPU with a warning). ``seed``: ``None`` keeps the weights as built
    (``checkpoint``, or SAM 2's random initialisation from torch's global RNG); an int seeds torch's RNG
    before building and then perturbs every parameter (:func:`perturb_` with that seed).
    """
    import torch
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    s = image_size // 16
    overrides = [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{s},{s}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{s},{s}]",
        "++model.compile_image_encoder=false",
    ]
    cfg = torch_config_name(model_name)
    if seed is not None:
        torch.manual_seed(seed)
    if video:
        model = build_sam2_video_predictor(cfg, checkpoint, device="cpu", mode="eval",
                                           hydra_overrides_extra=overrides, apply_postprocessing=postprocessing)
        model.fill_hole_area = 0
    else:
        model = build_sam2(cfg, checkpoint, device="cpu", mode="eval", hydra_overrides_extra=overrides,
                           apply_postprocessing=postprocessing)
    if seed is not None:
        perturb_(model, seed)
        model.eval()
    return model


@functools.lru_cache(maxsize=4)
def perturbed_torch_model(model_name: str = "sam2.1_hiera_t", image_size: int = 256, seed: int = 0,
                          video: bool = False):
    """``build_torch_model(..., postprocessing=False, seed=seed)``, cached per process: callers share the
    model, so one that changes it works on a ``copy.deepcopy``."""
    return build_torch_model(model_name, image_size, video=video, postprocessing=False, seed=seed)


def state_dict_numpy(module, prefix: str = "") -> dict[str, np.ndarray]:
    """``module.state_dict()`` as float32 NumPy arrays, keys prefixed with ``prefix``."""
    return {prefix + k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nchw_to_nhwc(t) -> np.ndarray:
    """A (B, C, H, W) tensor as a (B, H, W, C) float32 array."""
    return np.transpose(to_numpy(t), (0, 2, 3, 1))


def nhwc_to_nchw(a):
    """A (B, H, W, C) array as a (B, C, H, W) float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))))
