"""Image encoder (Hiera trunk + FPN neck) against the perturbed PyTorch SAM 2.1, plus the size table.

Every parity case builds the Flax encoder once, loads the PyTorch weights through the strict key map,
jits one function that returns both the trunk stages and the encoder dict, and compares against PyTorch's
``image_encoder.trunk(x)`` and ``image_encoder(x)`` on the same random image batch.

Tolerances (float32, matmul precision "highest" on both sides):

* trunk stages / FPN levels / vision_features: ``atol 1e-4``. Each output passes 12-24 pre-norm blocks of
  matmuls (K up to 3072), softmax attention and exact GELU; float32 summation-order differences are
  ~1e-7 relative per op and grow with depth and magnitude (activations reach |x| ~ 10). Measured max
  |diff|: 1e-6 (stage 1) to 1.3e-5 (b+ stage 3 at 256); 7.6e-6 at 1024 for tiny. An indexing, padding or
  layout bug gives O(0.1-1).
* position encodings: ``atol 1e-5``: a float32 sine of a static grid, no learned weights; measured 2.4e-7.
* bicubic matrix vs ``F.interpolate``: ``atol 1e-5`` on N(0,1) data: 16 float32 products per output;
  measured ~1e-6. JAX's own bicubic (A = -0.5) is off by ~0.4, so the test can fail.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from medsam2_jax.interop.torch_models import (TORCH_CONFIGS, nchw_to_nhwc, perturbed_torch_model,  # noqa: E402
                                             state_dict_numpy)
from medsam2_jax.interop.weights import WeightMismatchError, export_state_dict, iter_entries, load_state_dict  # noqa: E402
from medsam2_jax.model import sizes  # noqa: E402
from medsam2_jax.model.fpn import FpnNeck, ImageEncoder, build_image_encoder  # noqa: E402
from medsam2_jax.model.hiera import Hiera, bicubic_matrix  # noqa: E402
from tests.torch_key_shapes import sam2_key_shapes  # noqa: E402

pytestmark = pytest.mark.torch

FEAT_ATOL = 1e-4
PE_ATOL = 1e-5


def _jitted_encoder(enc: ImageEncoder):
    """One compiled function of (state, images) -> (trunk stages, encoder dict); compiled once per shape."""
    graphdef, state = nnx.split(enc)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m.trunk(x), m(x)

    return run, state


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# (model, image size, batch, non-square width or None)
CASES = [
    pytest.param(("sam2.1_hiera_t", 256, 2, None), id="tiny-256"),
    pytest.param(("sam2.1_hiera_b+", 256, 1, None), id="base_plus-256"),
    pytest.param(("sam2.1_hiera_t", 512, 1, None), id="tiny-512"),
    pytest.param(("sam2.1_hiera_t", 256, 1, 320), id="tiny-256x320"),
    pytest.param(("sam2.1_hiera_t", 1024, 1, None), id="tiny-1024", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    name, size, batch, width = request.param
    width = width or size
    tm = perturbed_torch_model(name, 256 if width != size else size)  # the encoder itself does not depend on S
    sd = state_dict_numpy(tm)
    enc = build_image_encoder(name, rngs=nnx.Rngs(0))
    load_state_dict(enc, sd, prefix="image_encoder.")
    g = torch.Generator().manual_seed(size + batch + width)
    x = torch.randn(batch, 3, size, width, generator=g)
    with torch.inference_mode():
        ref_trunk = [nchw_to_nhwc(t) for t in tm.image_encoder.trunk(x)]
        ref = tm.image_encoder(x)
    run, state = _jitted_encoder(enc)
    xj = jnp.asarray(nchw_to_nhwc(x))
    trunk, out = run(state, xj)
    run(state, xj)  # a second call with the same shapes must reuse the compiled program
    return {
        "name": name,
        "sd": sd,
        "enc": enc,
        "cache_size": run._cache_size(),
        "trunk": [np.asarray(t) for t in trunk],
        "out": jax.tree.map(np.asarray, out),
        "ref_trunk": ref_trunk,
        "ref": {
            "vision_features": nchw_to_nhwc(ref["vision_features"]),
            "vision_pos_enc": [nchw_to_nhwc(t) for t in ref["vision_pos_enc"]],
            "backbone_fpn": [nchw_to_nhwc(t) for t in ref["backbone_fpn"]],
        },
        "shape": (batch, size, width),
    }


def test_trunk_stages_match_torch(case):
    assert len(case["trunk"]) == len(case["ref_trunk"]) == 4
    b, h, w = case["shape"]
    spec = sizes.get_spec(case["name"])
    for i, (ours, ref) in enumerate(zip(case["trunk"], case["ref_trunk"])):
        stride = 4 * 2**i
        assert ours.shape == ref.shape == (b, h // stride, w // stride, spec.embed_dim * 2**i)
        assert _max_abs(ours, ref) < FEAT_ATOL, f"stage {i}: max |diff| {_max_abs(ours, ref):.2e}"


def test_fpn_levels_and_position_encodings_match_torch(case):
    out, ref = case["out"], case["ref"]
    b, h, w = case["shape"]
    assert len(out["backbone_fpn"]) == len(ref["backbone_fpn"]) == 3  # scalp=1 drops the S/32 level
    assert len(out["vision_pos_enc"]) == len(ref["vision_pos_enc"]) == 3
    for i, (ours, theirs) in enumerate(zip(out["backbone_fpn"], ref["backbone_fpn"])):
        assert ours.shape == theirs.shape == (b, h // (4 * 2**i), w // (4 * 2**i), 256)
        assert _max_abs(ours, theirs) < FEAT_ATOL, f"fpn level {i}: max |diff| {_max_abs(ours, theirs):.2e}"
    for i, (ours, theirs) in enumerate(zip(out["vision_pos_enc"], ref["vision_pos_enc"])):
        assert ours.shape == theirs.shape
        assert _max_abs(ours, theirs) < PE_ATOL, f"pos enc {i}: max |diff| {_max_abs(ours, theirs):.2e}"
    vf = out["vision_features"]
    assert vf.shape == (b, h // 16, w // 16, 256)
    assert _max_abs(vf, ref["vision_features"]) < FEAT_ATOL
    # vision_features is the last kept FPN level, which is the top-down fused one.
    np.testing.assert_array_equal(vf, out["backbone_fpn"][-1])


def test_compiled_once(case):
    assert case["cache_size"] == 1


# ------------------------------------------------------------------------------------------------------
# weights: strict load, bit-exact round trip, key set of every size
# ------------------------------------------------------------------------------------------------------
def test_weights_round_trip_bit_exact():
    sd = state_dict_numpy(perturbed_torch_model("sam2.1_hiera_t", 256))
    enc = build_image_encoder("sam2.1_hiera_t", rngs=nnx.Rngs(3))
    load_state_dict(enc, sd, prefix="image_encoder.")
    ours = export_state_dict(enc, prefix="image_encoder.")
    theirs = {k: v for k, v in sd.items() if k.startswith("image_encoder.")}
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_load_rejects_other_size():
    sd = state_dict_numpy(perturbed_torch_model("sam2.1_hiera_t", 256))
    enc = build_image_encoder("sam2.1_hiera_s", rngs=nnx.Rngs(0))
    with pytest.raises(WeightMismatchError, match=r"missing \d+ key\(s\): image_encoder\.trunk\.blocks\.12"):
        load_state_dict(enc, sd, prefix="image_encoder.")


SHORT = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


@pytest.mark.parametrize("short", list(SHORT))
def test_flax_keys_and_shapes_equal_sam2_1_checkpoint(short):
    """The abstract (no memory) Flax encoder of every size has exactly the checkpoint's image_encoder keys.

    The checkpoint's keys and shapes are those of the sam2 package's model of that size, built on the meta
    device (tests/torch_key_shapes.py)."""
    shapes = sam2_key_shapes(f"sam2.1_hiera_{short}")
    want = {k: v for k, v in shapes.items() if k.startswith("image_encoder.")}
    enc = nnx.eval_shape(lambda: build_image_encoder(f"sam2.1_hiera_{SHORT[short]}", rngs=nnx.Rngs(0)))
    got = {}
    for e in iter_entries(enc):
        flax_shape = tuple(e.variable.get_value().shape)
        got["image_encoder." + e.torch_key] = e.rule.to_torch(np.broadcast_to(np.float32(0), flax_shape)).shape
    assert got == want


# ------------------------------------------------------------------------------------------------------
# size table and detect_size
# ------------------------------------------------------------------------------------------------------
def _hiera_config(name: str) -> dict:
    """The trunk's constructor arguments from the package yaml, with Hiera's defaults filled in."""
    import inspect

    import sam2
    from omegaconf import OmegaConf
    from sam2.modeling.backbones.hieradet import Hiera as TorchHiera

    cfg = OmegaConf.load(pathlib.Path(sam2.__file__).parent / TORCH_CONFIGS[name])
    args = {k: p.default for k, p in inspect.signature(TorchHiera.__init__).parameters.items() if k != "self"}
    args.update(OmegaConf.to_container(cfg.model.image_encoder.trunk))
    neck = OmegaConf.to_container(cfg.model.image_encoder.neck)
    return {**args, "backbone_channel_list": neck["backbone_channel_list"], "scalp": cfg.model.image_encoder.scalp,
            "fpn_top_down_levels": neck["fpn_top_down_levels"], "d_model": neck["d_model"],
            "version_2_1": bool(cfg.model.get("proj_tpos_enc_in_obj_ptrs", False)),
            "flags_2_1": {k: bool(cfg.model.get(k, False)) for k in _FLAGS_2_1}}


# The SAM2Base constructor arguments a SAM 2.1 config turns on (all off in 2.0): `ModelSpec.is_2_1` stands for
# all four.
_FLAGS_2_1 = ("no_obj_embed_spatial", "add_tpos_enc_to_obj_ptrs", "proj_tpos_enc_in_obj_ptrs",
              "use_signed_tpos_enc_to_obj_ptrs")


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_spec_equals_package_config(name):
    spec = sizes.get_spec(name)
    cfg = _hiera_config(name)
    assert spec.name == name
    assert spec.embed_dim == cfg["embed_dim"]
    assert spec.num_heads == cfg["num_heads"]
    assert spec.stages == tuple(cfg["stages"])
    assert spec.global_att_blocks == tuple(cfg["global_att_blocks"])
    assert spec.window_spec == tuple(cfg["window_spec"])
    assert spec.window_pos_embed_bkg_spatial_size == tuple(cfg["window_pos_embed_bkg_spatial_size"])
    assert spec.backbone_channel_list == tuple(cfg["backbone_channel_list"])
    assert spec.fpn_top_down_levels == tuple(cfg["fpn_top_down_levels"])
    assert (spec.scalp, spec.d_model) == (cfg["scalp"], cfg["d_model"])
    assert spec.version == ("2.1" if cfg["version_2_1"] else "2.0")
    assert cfg["flags_2_1"] == {k: spec.is_2_1 for k in _FLAGS_2_1}


def test_spec_aliases_and_unknown_name():
    assert sizes.get_spec("sam2.1_hiera_tiny") is sizes.get_spec("sam2.1_hiera_t")
    assert sizes.get_spec("sam2_hiera_base_plus") is sizes.get_spec("sam2_hiera_b+")
    assert sizes.get_spec(" SAM2.1_Hiera_Large ").name == "sam2.1_hiera_l"
    assert sizes.get_spec("sam2.1_hiera_s").stage_ends == (0, 2, 13, 15)
    assert sizes.get_spec("sam2.1_hiera_l").q_pool_blocks == (2, 8, 44)
    with pytest.raises(ValueError, match=r"unknown model name 'sam2.1_hiera_huge'.*sam2\.1_hiera_t.*sam2_hiera_large"):
        sizes.get_spec("sam2.1_hiera_huge")
    with pytest.raises(ValueError, match="valid names"):
        build_image_encoder("hiera_t", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("short", list(SHORT))
def test_detect_size_on_sam2_1_key_lists(short):
    shapes = sam2_key_shapes(f"sam2.1_hiera_{short}")
    assert sizes.detect_size(shapes) == f"sam2.1_hiera_{short}"
    # a wrapped state dict (DataParallel / some fine-tuning scripts) is still recognised
    assert sizes.detect_size({"module." + k: v for k, v in shapes.items()}) == f"sam2.1_hiera_{short}"


def test_detect_size_on_sam2_0_models():
    sd = state_dict_numpy(perturbed_torch_model("sam2_hiera_t", 256))
    assert sizes.detect_size({k: v.shape for k, v in sd.items()}) == "sam2_hiera_t"
    # the other 2.0 sizes, from the package's 2.0 models built on the meta device; their key lists are the
    # 2.1 lists minus the three 2.1-only tensors (the 2.0 yaml differs only there)
    for short in ("s", "b+", "l"):
        shapes = sam2_key_shapes(f"sam2_hiera_{short}")
        v21 = sam2_key_shapes(f"sam2.1_hiera_{short}")
        for k in ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"):
            del v21[k]
        assert shapes == v21
        assert sizes.detect_size(shapes) == f"sam2_hiera_{short}"


def test_detect_size_errors():
    tiny = sam2_key_shapes("sam2.1_hiera_t")
    with pytest.raises(ValueError, match=r"not a SAM 2 checkpoint: no 'image_encoder.trunk.patch_embed.proj.weight'"):
        sizes.detect_size({"encoder.layer.0.weight": (768, 768), "head.bias": (1000,)})
    with pytest.raises(ValueError, match="not a SAM 2 checkpoint"):
        sizes.detect_size({})
    bad = dict(tiny, **{"image_encoder.trunk.patch_embed.proj.weight": (128, 3, 7, 7)})
    with pytest.raises(ValueError, match=r"not a known SAM 2 size: the checkpoint has embed dim 128, 12 Hiera blocks"):
        sizes.detect_size(bad)
    bad = dict(tiny, **{"image_encoder.trunk.pos_embed": (1, 96, 14, 14)})
    with pytest.raises(ValueError, match=r"inconsistent SAM 2 checkpoint.*a tiny model has pos_embed \(1, 96, 7, 7\)"):
        sizes.detect_size(bad)
    encoder_only = {k: v for k, v in tiny.items() if k.startswith("image_encoder.")}
    with pytest.raises(ValueError, match="cannot tell SAM 2.0 from 2.1"):
        sizes.detect_size(encoder_only)
    half = {k: v for k, v in tiny.items() if k != "no_obj_embed_spatial"}
    with pytest.raises(ValueError, match="'obj_ptr_tpos_proj.weight' present but 'no_obj_embed_spatial' absent"):
        sizes.detect_size(half)


# ------------------------------------------------------------------------------------------------------
# bicubic position-embedding resize
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw_in,hw_out", [((7, 7), (64, 64)), ((14, 14), (128, 128)), ((7, 7), (256, 256)),
                                          ((14, 14), (64, 80)), ((7, 9), (5, 3))])
def test_bicubic_matrix_equals_torch_interpolate(hw_in, hw_out):
    g = torch.Generator().manual_seed(hw_in[0] * 1000 + hw_out[1])
    p = torch.randn(1, 5, *hw_in, generator=g)
    ref = F.interpolate(p, size=hw_out, mode="bicubic").numpy()[0]
    mh, mw = bicubic_matrix(hw_in[0], hw_out[0]), bicubic_matrix(hw_in[1], hw_out[1])
    ours = np.einsum("ha,cab,wb->chw", mh, p.numpy()[0], mw)
    assert _max_abs(ours, ref) < 1e-5
    # rows sum to one (interpolation of a constant is that constant)
    np.testing.assert_allclose(mh.sum(1), 1.0, atol=1e-6)
    # JAX's bicubic (Keys A=-0.5, edge renormalised) is not torch's: the matrix is needed
    if hw_out[0] > hw_in[0]:
        theirs = np.asarray(jax.image.resize(jnp.asarray(p.numpy()[0]), (5, *hw_out), "bicubic"))
        assert _max_abs(theirs, ref) > 1e-2


def test_hiera_pos_embed_equals_torch_at_1024():
    """The whole background + window embedding at the 1024 size (256x256 map), without running the trunk."""
    tm = perturbed_torch_model("sam2.1_hiera_b+", 256)
    enc = build_image_encoder("sam2.1_hiera_b+", rngs=nnx.Rngs(0))
    load_state_dict(enc, state_dict_numpy(tm), prefix="image_encoder.")
    with torch.no_grad():
        # N(0,1)-sized embeddings so that a wrong kernel shows (the perturbed ones are only 0.02 in size)
        tm_pe = tm.image_encoder.trunk.pos_embed.detach().clone()
        tm_pw = tm.image_encoder.trunk.pos_embed_window.detach().clone()
        g = torch.Generator().manual_seed(7)
        pe = torch.randn(tm_pe.shape, generator=g)
        pw = torch.randn(tm_pw.shape, generator=g)
        tm.image_encoder.trunk.pos_embed.copy_(pe)
        tm.image_encoder.trunk.pos_embed_window.copy_(pw)
        try:
            ref = tm.image_encoder.trunk._get_pos_embed((256, 256)).numpy()[0]
        finally:
            tm.image_encoder.trunk.pos_embed.copy_(tm_pe)
            tm.image_encoder.trunk.pos_embed_window.copy_(tm_pw)
    enc.trunk.pos_embed.set_value(jnp.asarray(pe.numpy()))
    enc.trunk.pos_embed_window.set_value(jnp.asarray(pw.numpy()))
    ours = np.asarray(enc.trunk._get_pos_embed(256, 256))
    assert ours.shape == ref.shape == (256, 256, 112)
    assert _max_abs(ours, ref) < 1e-5


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder():
    return build_image_encoder("sam2.1_hiera_t", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "shape,dtype,exc,pattern",
    [
        ((3, 256, 256), jnp.float32, ValueError, r"rank 4 \(B, H, W, 3\).*got shape \(3, 256, 256\)"),
        ((1, 3, 256, 256), jnp.float32, ValueError, r"3 channels last.*got shape \(1, 3, 256, 256\).*transpose"),
        ((1, 256, 256, 1), jnp.float32, ValueError, r"3 channels last.*\(1, 256, 256, 1\)"),
        ((1, 250, 250, 3), jnp.float32, ValueError, r"multiple of 32, got 250x250 \(e\.g\. use 256\)"),
        ((1, 256, 200, 3), jnp.float32, ValueError, r"multiple of 32, got 256x200"),
        ((1, 256, 256, 3), jnp.uint8, TypeError, r"floating point.*got dtype uint8"),
        ((1, 256, 256, 3), jnp.int32, TypeError, r"floating point.*got dtype int32"),
    ],
)
def test_bad_input_errors(tiny_encoder, shape, dtype, exc, pattern):
    x = jnp.zeros(shape, dtype)
    with pytest.raises(exc, match=pattern):
        tiny_encoder(x)
    # the same message through jit (checks run on static shapes at trace time)
    graphdef, state = nnx.split(tiny_encoder)
    with pytest.raises(exc, match=pattern):
        jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_bad_input_not_an_array(tiny_encoder):
    with pytest.raises(TypeError, match=r"images must be an array of shape \(B, H, W, 3\), got list"):
        tiny_encoder([[1.0, 2.0, 3.0]])


def test_mismatched_trunk_and_neck():
    trunk = nnx.eval_shape(lambda: Hiera.from_spec(sizes.get_spec("sam2.1_hiera_t"), rngs=nnx.Rngs(0)))
    neck = nnx.eval_shape(lambda: FpnNeck(256, (896, 448, 224, 112), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"trunk \[768, 384, 192, 96\], neck \[896, 448, 224, 112\]"):
        ImageEncoder(trunk, neck, scalp=1)


# ------------------------------------------------------------------------------------------------------
# the benchmark script runs end to end (tiny sizes; it is timed for real by `make bench`)
# ------------------------------------------------------------------------------------------------------
def test_benchmark_script_smoke(tmp_path):
    import json

    from benchmarks import image_encoder as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--image-sizes", "64", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["results"]
    assert res["command"] == "python -m benchmarks.image_encoder --image-sizes 64 --batch-sizes 1 --repeats 1 " \
        f"--warmup 0 --out {out}"
    assert (row["model"], row["image_size"], row["batch"]) == ("sam2.1_hiera_t", 64, 1)
    assert row["jax"]["fps"] > 0 and row["torch"]["fps"] > 0 and row["jax"]["compilations"] == 1
    assert row["max_abs_diff_vision_features"] < FEAT_ATOL  # both frameworks computed the same encoder
    with pytest.raises(SystemExit, match="not a positive multiple of 32"):
        bench.main(["--image-sizes", "100", "--out", str(out)])


def test_patch_embed_matmul_equals_conv():
    """The reshape + matmul patch embedding equals the k7/s4/p3 convolution it replaces (and PyTorch's)."""
    from medsam2_jax.model.hiera import PatchEmbed

    pe = PatchEmbed(16, rngs=nnx.Rngs(0))
    pe.proj.bias.set_value(jnp.linspace(-1.0, 1.0, 16))
    x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
    ours = np.asarray(pe(x))
    assert ours.shape == (2, 16, 24, 16)
    # float32 sums of 147 products in another order: ~1e-6
    assert _max_abs(ours, pe.proj(x)) < 1e-5
    conv = torch.nn.Conv2d(3, 16, 7, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.asarray(pe.proj.kernel[...]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(pe.proj.bias[...])))
        ref = conv(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    assert _max_abs(ours, ref) < 1e-5


def test_images_per_step_does_not_change_results():
    """Chunked batches (lax.map, with a padded last chunk) equal the whole batch at once."""
    enc = build_image_encoder("sam2.1_hiera_t", rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
    outs = {}
    for step in (0, 2, None):
        enc.images_per_step = step
        outs[step] = jax.jit(lambda s, x: nnx.merge(*s)(x))(nnx.split(enc), x)
    for step in (2, None):
        for a, b in zip(jax.tree.leaves(outs[step]), jax.tree.leaves(outs[0])):
            assert a.shape == b.shape and a.shape[0] == 3
            # the same computation per image; XLA may order float32 sums differently for another batch size
            assert _max_abs(a, b) < 1e-5
    with pytest.raises(ValueError, match="images_per_step must be None or an int >= 0, got -1"):
        ImageEncoder(enc.trunk, enc.neck, 1, images_per_step=-1)
