"""Reference PyTorch SAM 2 models for parity tests: random init, every parameter perturbed.

Freshly initialised SAM 2 has zeros (Hiera position embeddings), ones (LayerNorm weights) and 1e-6
(ConvNeXt gamma) that hide porting bugs, so every parameter and buffer gets ``+ 0.02 * N(0, 1)``
(gammas are set to O(0.1..1) so the fuser actually contributes).
"""

from __future__ import annotations

import functools

import numpy as np

from medsam2_jax.parity import TORCH_CONFIGS as CONFIGS  # noqa: E402  (one table of config files)


def perturb_(model, seed: int = 0) -> None:
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


@functools.lru_cache(maxsize=4)
def build_torch_sam2(model_name: str = "sam2.1_hiera_t", image_size: int = 256, seed: int = 0, video: bool = False):
    """A perturbed random-init PyTorch SAM 2 (eval mode, CPU, no post-processing), cached per process."""
    import torch
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    torch.manual_seed(seed)
    s = image_size // 16
    overrides = [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{s},{s}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{s},{s}]",
        "++model.compile_image_encoder=false",
    ]
    if video:
        overrides.append("++model.fill_hole_area=0")
        model = build_sam2_video_predictor(
            CONFIGS[model_name], None, device="cpu", mode="eval", hydra_overrides_extra=overrides,
            apply_postprocessing=False,
        )
    else:
        model = build_sam2(
            CONFIGS[model_name], None, device="cpu", mode="eval", hydra_overrides_extra=overrides,
            apply_postprocessing=False,
        )
    perturb_(model, seed)
    model.eval()
    return model


def state_dict_numpy(module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def nchw_to_nhwc(t) -> np.ndarray:
    return np.transpose(to_numpy(t), (0, 2, 3, 1))


def nhwc_to_nchw(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2))))
