"""The one size table of SAM 2 / SAM 2.1: model name -> :class:`ModelSpec`.

Values are those of the ``sam2`` package's configs (``configs/sam2{,.1}/sam2*_hiera_{t,s,b+,l}.yaml``) with the
``Hiera`` constructor defaults filled in (base_plus uses the defaults for ``stages``, ``global_att_blocks``,
``window_spec`` and the 14x14 background position embedding). SAM 2.0 and 2.1 share every image-encoder value;
2.1 only adds the object-pointer temporal projection, signed pointer positions and ``no_obj_embed_spatial``.

:func:`detect_size` reads a PyTorch state dict's key -> shape map and says which size and version a
checkpoint really is, so that a converter can reject a file that does not match the requested model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

# Keys a full SAM 2 checkpoint has, relative to the model root.
_PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_POS_KEY = "image_encoder.trunk.pos_embed"
_TPOS_PROJ_KEY = "obj_ptr_tpos_proj.weight"
_NO_OBJ_SPATIAL_KEY = "no_obj_embed_spatial"
_BLOCK_RE = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
_NECK_RE = re.compile(r"^image_encoder\.neck\.convs\.(\d+)\.conv\.weight$")


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters of one SAM 2 model size (image encoder) and its version flags."""

    name: str  # canonical name, e.g. "sam2.1_hiera_t"
    size: str  # "tiny" | "small" | "base_plus" | "large"
    version: str  # "2.0" | "2.1"
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    backbone_channel_list: tuple[int, ...]  # neck order: lowest resolution (deepest stage) first
    d_model: int = 256  # FPN neck output channels
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1

    # --- derived Hiera values -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        return tuple(sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages)))

    @property
    def q_pool_blocks(self) -> tuple[int, ...]:
        return tuple(e + 1 for e in self.stage_ends[:-1])

    # --- version (SAM 2.1 turns on four SAM2Base arguments together: no_obj_embed_spatial and the three
    # object-pointer temporal-encoding flags; the model builds and uses them when this is true) --------------
    @property
    def is_2_1(self) -> bool:
        return self.version == "2.1"


# (short suffix, long alias, embed_dim, num_heads, stages, global_att_blocks, window_spec, bkg size)
_SIZES = (
    ("t", "tiny", 96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    ("s", "small", 96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    ("b+", "base_plus", 112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    ("l", "large", 144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
)
_PREFIXES = (("2.1", "sam2.1_hiera_"), ("2.0", "sam2_hiera_"))

SPECS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}
for _version, _prefix in _PREFIXES:
    for _short, _long, _c, _h, _stages, _gab, _ws, _bkg in _SIZES:
        _name = _prefix + _short
        SPECS[_name] = ModelSpec(
            name=_name,
            size=_long,
            version=_version,
            embed_dim=_c,
            num_heads=_h,
            stages=_stages,
            global_att_blocks=_gab,
            window_spec=_ws,
            window_pos_embed_bkg_spatial_size=_bkg,
            backbone_channel_list=(8 * _c, 4 * _c, 2 * _c, _c),
        )
        _ALIASES[_name] = _name
        _ALIASES[_prefix + _long] = _name

MODEL_NAMES: tuple[str, ...] = tuple(SPECS)
ALL_NAMES: tuple[str, ...] = tuple(_ALIASES)


def canonical_name(name: str) -> str:
    """``"sam2.1_hiera_tiny"`` -> ``"sam2.1_hiera_t"``; raises ``ValueError`` listing the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"model_name must be a string, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown model name {name!r}; valid names are: {', '.join(ALL_NAMES)}")
    return _ALIASES[key]


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a model name or alias (e.g. ``sam2.1_hiera_t`` or ``sam2.1_hiera_tiny``)."""
    return SPECS[canonical_name(name)]


def _find_root(keys: Sequence[str]) -> str:
    """The prefix under which the SAM 2 keys live ('' for a plain state dict, e.g. 'module.' if wrapped)."""
    for k in keys:
        if k.endswith(_PATCH_KEY):
            return k[: -len(_PATCH_KEY)]
    shown = ", ".join(repr(k) for k in list(keys)[:8]) or "(no keys)"
    raise ValueError(
        f"not a SAM 2 checkpoint: no '{_PATCH_KEY}' tensor among its {len(keys)} keys "
        f"(first keys: {shown}); expected the state dict of a SAM 2 / SAM 2.1 model"
    )


def detect_size(shapes: Mapping[str, Sequence[int]]) -> str:
    """Which SAM 2 model a state dict is, from its key -> shape map: e.g. ``"sam2.1_hiera_b+"``.

    Reads the trunk's embedding width (``patch_embed.proj.weight``), the number of Hiera blocks, the
    background position-embedding size and the neck's input channels; the version is 2.1 when the
    object-pointer temporal projection (``obj_ptr_tpos_proj``) is present. Keys may carry a common prefix
    (e.g. ``module.``). Raises ``ValueError`` when the map is not a full SAM 2 state dict or matches no size.
    """
    keys = list(shapes)
    root = _find_root(keys)
    rel = {k[len(root):]: tuple(int(d) for d in shapes[k]) for k in keys if k.startswith(root)}

    patch = rel[_PATCH_KEY]
    if len(patch) != 4 or patch[1:] != (3, 7, 7):
        raise ValueError(f"not a SAM 2 checkpoint: '{root}{_PATCH_KEY}' has shape {patch}, expected (C, 3, 7, 7)")
    embed_dim = patch[0]
    blocks = {int(m.group(1)) for k in rel if (m := _BLOCK_RE.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    pos = rel.get(_POS_KEY)
    bkg = tuple(pos[2:]) if pos is not None and len(pos) == 4 else None
    neck = {int(m.group(1)): rel[k][1] for k in rel if (m := _NECK_RE.match(k))}
    channels = tuple(neck[i] for i in sorted(neck))

    found = f"embed dim {embed_dim}, {depth} Hiera blocks, pos_embed {pos}, neck input channels {list(channels)}"
    size = None
    for spec in SPECS.values():
        if spec.version == "2.1" and spec.embed_dim == embed_dim and spec.depth == depth:
            size = spec
            break
    if size is None:
        raise ValueError(
            f"not a known SAM 2 size: the checkpoint has {found}; known sizes (embed dim, blocks): "
            + ", ".join(f"{s.size} ({s.embed_dim}, {s.depth})" for s in SPECS.values() if s.version == "2.1")
        )
    if bkg != size.window_pos_embed_bkg_spatial_size or channels != size.backbone_channel_list:
        bh, bw = size.window_pos_embed_bkg_spatial_size
        raise ValueError(
            f"inconsistent SAM 2 checkpoint: {found}; a {size.size} model has pos_embed (1, {embed_dim}, {bh}, {bw}) "
            f"and neck input channels {list(size.backbone_channel_list)}"
        )

    if not any(k.startswith(("sam_mask_decoder.", "memory_attention.", "memory_encoder.")) for k in rel):
        raise ValueError(
            f"cannot tell SAM 2.0 from 2.1: the state dict has a {size.size} image encoder but no mask decoder or "
            "memory keys; expected a full SAM 2 model state dict"
        )
    has_tpos = _TPOS_PROJ_KEY in rel
    has_no_obj = _NO_OBJ_SPATIAL_KEY in rel
    if has_tpos != has_no_obj:
        raise ValueError(
            f"inconsistent SAM 2 checkpoint: '{_TPOS_PROJ_KEY}' {'present' if has_tpos else 'absent'} but "
            f"'{_NO_OBJ_SPATIAL_KEY}' {'present' if has_no_obj else 'absent'}; SAM 2.1 has both, SAM 2.0 neither"
        )
    prefix = "sam2.1_hiera_" if has_tpos else "sam2_hiera_"
    short = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}[size.size]
    return prefix + short
