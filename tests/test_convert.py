"""The converter CLI, model directories and convert/parity.py, on a perturbed random tiny SAM 2.1 checkpoint.

One PyTorch tiny model (perturbed, object-score bias +2 so that the object is present) is saved once per
module in the three formats the converter reads: Meta's ``{"model": sd}``, a bare state dict and
Medical-SAM2's ``{"model": sd, "parameter": ...}`` with a DataParallel ``module.`` prefix and bf16 tensors.
Each is converted with ``convert/sam2_to_flax.py``'s ``main(argv)`` and loaded with ``load_model``: the
loaded weights must equal the file's bit for bit, and the loaded model's outputs equal PyTorch's (tolerances
of ``medsam2_jax.interop.parity``, justified there and in tests/test_parity_model.py).

Bad input uses tiny files: state dicts of stride-0 zero tensors (``torch.zeros(1).expand(shape)``, a few KB
on disk) built from the key and shape lists of the installed sam2 package, read from models built on
PyTorch's meta device (tests/torch_key_shapes.py), so that no large PyTorch model is ever materialised.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from medsam2_jax import api  # noqa: E402
from medsam2_jax.interop import parity, torch_checkpoint, torch_models, weights  # noqa: E402
from medsam2_jax.interop.torch_models import perturb_  # noqa: E402
from medsam2_jax.model.sam2 import normalize_images  # noqa: E402
from tests.torch_key_shapes import sam2_key_shapes  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
S = 256
NAME = "sam2.1_hiera_t"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_convert_{name}", ROOT / "convert" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sam2_to_flax = _load_script("sam2_to_flax")
parity_cli = _load_script("parity")


def _key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes of the sam2 package's model ``name`` (built on the meta device)."""
    return sam2_key_shapes(name)


def _zeros_sd(shapes: dict[str, tuple[int, ...]]) -> dict[str, "torch.Tensor"]:
    """Stride-0 tensors: torch.save stores one element each, loading restores the shapes."""
    return {k: torch.zeros(1).expand(shape) if shape else torch.zeros(()) for k, shape in shapes.items()}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The perturbed torch model, its float32 numpy state dict and the three checkpoint files."""
    d = tmp_path_factory.mktemp("ckpt")
    tm = torch_models.build_torch_model(NAME, S)
    perturb_(tm, 5)
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias += 2.0
    tsd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    files = {"meta": d / "meta.pt", "bare": d / "bare.pt", "medsam2": d / "medsam2.pt"}
    torch.save({"model": tsd}, files["meta"])
    torch.save(tsd, files["bare"])
    # Medical-SAM2's train_3d.py: bf16 weights, nn.DataParallel names, the model's direct parameters beside.
    torch.save({"model": {"module." + k: v.to(torch.bfloat16) for k, v in tsd.items()},
                "parameter": {k: torch.nn.Parameter(v.clone()) for k, v in tsd.items() if "." not in k}},
               files["medsam2"])
    sd = {k: v.float().numpy() for k, v in tsd.items()}
    return {"torch": tm, "sd": sd, "files": files, "dir": d}


def _convert(ckpt_file, out, *extra) -> int:
    return sam2_to_flax.main(["--checkpoint", str(ckpt_file), "--model-name", NAME, "--image-size", str(S),
                              "--out", str(out), *extra])


@pytest.fixture(scope="module")
def converted(ckpt):
    """The Meta-format file converted by the CLI, with --export-torch."""
    out = ckpt["dir"] / "model_meta"
    exported = ckpt["dir"] / "exported.pt"
    assert _convert(ckpt["files"]["meta"], out, "--export-torch", str(exported)) == 0
    return out, exported


def _image_batch():
    rng = np.random.default_rng(11)
    smooth = np.asarray(normalize_images(parity.smooth_image(S)), np.float32)
    return np.stack([rng.standard_normal((S, S, 3)).astype(np.float32), smooth])


def _assert_rows(rows):
    bad = [r for r in rows if not r.ok]
    assert rows and not bad, "rows over tolerance:\n" + parity.format_rows(bad)


# ------------------------------------------------------------------------------------------------ formats
def test_meta_format_converts_and_matches_torch(ckpt, converted, capsys):
    out, _ = converted
    meta = json.loads((out / api.META_FILE).read_text())
    assert meta["model_name"] == NAME and meta["image_size"] == S and meta["num_tensors"] == len(ckpt["sd"])
    model = api.load_model(out)
    assert model.model_name == NAME and model.image_size == S
    exported = torch_checkpoint.export_torch_state_dict(model)
    assert exported.keys() == ckpt["sd"].keys()
    assert all(_bits_equal(exported[k], ckpt["sd"][k]) for k in exported)
    points = np.tile(np.array([[[0.4, 0.45], [0.8, 0.2]]], np.float32) * S, (2, 1, 1))
    labels = np.array([[1, 0], [1, 0]], np.int32)
    rows = parity.image_path_rows(ckpt["torch"], model, _image_batch(), points, labels)
    _assert_rows(rows)


def test_bare_state_dict(ckpt, tmp_path):
    assert _convert(ckpt["files"]["bare"], tmp_path / "m") == 0
    exported = torch_checkpoint.export_torch_state_dict(api.load_model(tmp_path / "m"))
    assert exported.keys() == ckpt["sd"].keys()
    assert all(_bits_equal(exported[k], ckpt["sd"][k]) for k in exported)


def test_medical_sam2_format_bf16_module_prefix(ckpt, tmp_path):
    """bf16 -> float32 is exact, so the loaded weights are the file's bf16 values bit for bit (outputs then
    equal those of a PyTorch model holding the same weights, as checked for the Meta format above)."""
    assert _convert(ckpt["files"]["medsam2"], tmp_path / "m") == 0
    exported = torch_checkpoint.export_torch_state_dict(api.load_model(tmp_path / "m"))
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in ckpt["sd"].items()}
    assert exported.keys() == rounded.keys()
    assert all(_bits_equal(exported[k], rounded[k]) for k in exported)
    assert not all(_bits_equal(rounded[k], ckpt["sd"][k]) for k in rounded)  # the rounding did happen


def test_export_torch_round_trip_is_bit_exact(ckpt, converted, capsys):
    _, exported = converted
    obj = torch.load(exported, map_location="cpu", weights_only=True)
    back = obj["model"]
    assert back.keys() == ckpt["sd"].keys()
    for k, v in back.items():
        assert v.dtype == torch.float32 and v.is_contiguous()
        assert _bits_equal(v.numpy(), ckpt["sd"][k]), k
    # SAM 2's own strict loader takes the exported file.
    tm = copy.deepcopy(ckpt["torch"])
    tm.load_state_dict(back, strict=True)


def test_export_reports_round_trip(ckpt, tmp_path, capsys):
    assert _convert(ckpt["files"]["bare"], tmp_path / "m", "--export-torch", str(tmp_path / "x.pt")) == 0
    assert "round trip bit-exact" in capsys.readouterr().out


def test_load_at_another_image_size(ckpt, converted):
    """Converted at 256, loaded at 512: the same weights, and PyTorch built at 512 agrees."""
    out, _ = converted
    model = api.load_model(out, image_size=512)
    assert model.image_size == 512 and model.sam_prompt_encoder.input_image_size == (512, 512)
    exported = torch_checkpoint.export_torch_state_dict(model)
    assert all(_bits_equal(exported[k], ckpt["sd"][k]) for k in exported)
    tm = torch_models.build_torch_model(NAME, 512)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt["sd"].items()}, strict=True)
    images = np.asarray(normalize_images(parity.smooth_image(512)), np.float32)[None]
    tfeats, feats = parity.torch_image_features(tm, images), parity.jax_encode(model, images)
    assert feats["backbone_fpn"][0].shape == (1, 128, 128, 32)
    _assert_rows(parity.predict_rows(tm, model, tfeats, feats, "click at 512",
                                     points=np.array([[[300.0, 420.0]]], np.float32),
                                     labels=np.array([[1]], np.int32)))


# ------------------------------------------------------------------------------------------------ models
def test_loaded_model_is_concrete_eval_and_holds_no_rng_state(converted):
    out, _ = converted
    model = api.load_model(out)
    assert api.abstract_paths(model) == []
    leaves = jax_leaves(model)
    assert leaves and all(type(x).__name__ == "ArrayImpl" for x in leaves)
    assert len(nnx.state(model, nnx.RngState)) == 0  # nothing random is carried (dropout needs rngs=)
    assert model.sam_mask_decoder.deterministic is True
    # The memory attention is usable as loaded: deterministic by default, same output twice; dropout only
    # with explicit rngs, and a clear error without them.
    rng = np.random.default_rng(0)
    h = S // 16
    curr = rng.standard_normal((1, h * h, 256)).astype(np.float32)
    mem = rng.standard_normal((1, 2 * h * h + 4, 64)).astype(np.float32)
    pos = rng.standard_normal((1, h * h, 256)).astype(np.float32)
    mpos = rng.standard_normal(mem.shape).astype(np.float32)
    a = model.memory_attention(curr, pos, mem, mpos, num_obj_ptr_tokens=4)
    b = model.memory_attention(curr, pos, mem, mpos, num_obj_ptr_tokens=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(a)).all()
    with pytest.raises(ValueError, match="rngs"):
        model.memory_attention(curr, pos, mem, mpos, num_obj_ptr_tokens=4, deterministic=False)
    c = model.memory_attention(curr, pos, mem, mpos, num_obj_ptr_tokens=4, deterministic=False,
                               rngs=nnx.Rngs(dropout=0))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3  # dropout (0.1) does act when asked for


def jax_leaves(model):
    import jax

    return jax.tree_util.tree_leaves(nnx.state(model))


def test_abstract_model_is_detected():
    model = api.build_model(NAME, S, abstract=True)
    assert len(api.abstract_paths(model)) == len(list(weights.iter_entries(model))) == 471
    with pytest.raises(RuntimeError, match="not filled"):
        api.finish_model(model, "test")
    with pytest.raises(ValueError, match="unfilled"):
        api.save_model(model, "/nonexistent/never-written")


def test_random_model_is_deterministic_per_seed():
    a = torch_checkpoint.export_torch_state_dict(api.random_model(NAME, S, seed=3))
    b = torch_checkpoint.export_torch_state_dict(api.random_model(NAME, S, seed=3))
    c = torch_checkpoint.export_torch_state_dict(api.random_model(NAME, S, seed=4))
    assert all(_bits_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a)
    # Nothing left at an exact 0 / 1 initialisation.
    assert not any(np.all(v == 0) or np.all(v == 1) for v in a.values())


@pytest.mark.parametrize("size", [0, 100, 250, -32, "256"])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size must be"):
        api.build_model(NAME, size)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_shapes():
    return _key_shapes(NAME)


def _fails(ckpt_file, tmp_path, capsys, *, model=NAME) -> str:
    rc = sam2_to_flax.main(["--checkpoint", str(ckpt_file), "--model-name", model, "--image-size", str(S),
                            "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ")
    assert not (tmp_path / "out").exists()  # nothing written on failure
    return err


def _save(tmp_path, name, obj) -> pathlib.Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("other,long", [("sam2.1_hiera_s", "small"), ("sam2.1_hiera_b+", "base_plus"),
                                        ("sam2.1_hiera_l", "large")])
def test_another_size_is_named(other, long, tmp_path, capsys):
    path = _save(tmp_path, f"{long}.pt", {"model": _zeros_sd(_key_shapes(other))})
    assert path.stat().st_size < 1_000_000
    err = _fails(path, tmp_path, capsys)
    assert f"holds a {other} ({long}" in err and f"not {NAME}" in err and f"--model-name {other}" in err


def test_sam20_file_with_sam21_name(tiny_shapes, tmp_path, capsys):
    v20 = {k: s for k, s in tiny_shapes.items() if not k.startswith(("obj_ptr_tpos_proj.", "no_obj_embed_spatial"))}
    err = _fails(_save(tmp_path, "v20.pt", {"model": _zeros_sd(v20)}), tmp_path, capsys)
    assert "SAM 2.0 checkpoint" in err and "--model-name sam2_hiera_t" in err and "obj_ptr_tpos_proj" in err


def test_sam21_file_with_sam20_name(tiny_shapes, tmp_path, capsys):
    err = _fails(_save(tmp_path, "v21.pt", {"model": _zeros_sd(tiny_shapes)}), tmp_path, capsys,
                 model="sam2_hiera_tiny")
    assert "SAM 2.1 checkpoint" in err and "--model-name sam2.1_hiera_t" in err


@pytest.mark.parametrize("kind", ["other-model", "list", "text", "pickled-module", "non-tensor-entry", "int-tensor"])
def test_not_sam2(kind, tiny_shapes, tmp_path, capsys):
    if kind == "other-model":
        path = _save(tmp_path, "resnet.pt", {"model": {"conv1.weight": torch.zeros(64, 3, 7, 7),
                                                       "fc.weight": torch.zeros(10, 512)}})
        expect = "not a SAM 2 checkpoint: no 'image_encoder.trunk.patch_embed.proj.weight'"
    elif kind == "list":
        path = _save(tmp_path, "list.pt", [torch.zeros(3)])
        expect = "expected a SAM 2 checkpoint"
    elif kind == "text":
        path = tmp_path / "notes.pt"
        path.write_text("this is not a checkpoint\n")
        expect = "cannot be read as a PyTorch checkpoint"
    elif kind == "pickled-module":  # torch.save(model) instead of its state dict
        path = _save(tmp_path, "module.pt", torch.nn.Linear(2, 2))
        expect = "holds Python objects other than tensors and containers (torch.nn.modules.linear.Linear)"
    elif kind == "non-tensor-entry":
        path = _save(tmp_path, "mixed.pt", {"model": {**_zeros_sd(tiny_shapes), "epoch": 3}})
        expect = "entry 'epoch' is a int, not a tensor"
    else:
        path = _save(tmp_path, "int.pt", {"model": {**_zeros_sd(tiny_shapes), "steps": torch.zeros(2, dtype=torch.int64)}})
        expect = "tensor 'steps' has dtype torch.int64"
    err = _fails(path, tmp_path, capsys)
    assert expect in err and str(path) in err


def test_truncated_file(ckpt, tmp_path, capsys):
    data = ckpt["files"]["meta"].read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    err = _fails(path, tmp_path, capsys)
    assert "cannot be read as a PyTorch checkpoint" in err and "Is the file complete" in err
    assert f"{len(data) // 2:,} bytes" in err


def test_empty_file_and_directory(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "the file is empty" in _fails(empty, tmp_path, capsys)
    assert "is a directory" in _fails(tmp_path, tmp_path, capsys)
    assert "no such checkpoint file" in _fails(tmp_path / "missing.pt", tmp_path, capsys)


def test_missing_key(tiny_shapes, tmp_path, capsys):
    sd = _zeros_sd(tiny_shapes)
    del sd["sam_mask_decoder.iou_token.weight"]
    err = _fails(_save(tmp_path, "missing.pt", {"model": sd}), tmp_path, capsys)
    assert "missing tensor(s) 1: sam_mask_decoder.iou_token.weight" in err and "incomplete" in err


def test_extra_key(tiny_shapes, tmp_path, capsys):
    sd = _zeros_sd(tiny_shapes)
    sd["adapter.lora_A.weight"] = torch.zeros(4, 256)
    err = _fails(_save(tmp_path, "extra.pt", {"model": sd}), tmp_path, capsys)
    assert "unexpected tensor(s) 1: adapter.lora_A.weight" in err and "remove the keys" in err


def test_misshaped_tensor(tiny_shapes, tmp_path, capsys):
    sd = _zeros_sd(tiny_shapes)
    sd["memory_encoder.out_proj.weight"] = torch.zeros(1).expand(32, 256, 1, 1)
    err = _fails(_save(tmp_path, "shape.pt", {"model": sd}), tmp_path, capsys)
    assert ("memory_encoder.out_proj.weight: the file has (32, 256, 1, 1), a sam2.1_hiera_t model expects "
            "(64, 256, 1, 1)") in err


def test_nan_tensor(tiny_shapes, tmp_path, capsys):
    sd = _zeros_sd(tiny_shapes)
    sd["image_encoder.trunk.blocks.3.attn.qkv.bias"] = torch.full((1,), float("nan")).expand(1152)
    err = _fails(_save(tmp_path, "nan.pt", {"model": sd}), tmp_path, capsys)
    assert "image_encoder.trunk.blocks.3.attn.qkv.bias: 1152 of 1152 values are NaN or inf" in err
    assert "corrupt" in err


def test_all_problems_listed_together(tiny_shapes, tmp_path, capsys):
    sd = _zeros_sd(tiny_shapes)
    del sd["no_mem_embed"]
    sd["extra.bias"] = torch.zeros(3)
    sd["no_obj_ptr"] = torch.zeros(1, 255)
    err = _fails(_save(tmp_path, "many.pt", {"model": sd}), tmp_path, capsys)
    assert "missing tensor(s) 1: no_mem_embed" in err and "unexpected tensor(s) 1: extra.bias" in err
    assert "no_obj_ptr: the file has (1, 255)" in err


def test_bad_arguments(ckpt, tmp_path, capsys):
    f = ckpt["files"]["meta"]
    assert sam2_to_flax.main(["--checkpoint", str(f), "--model-name", "sam3_hiera_t", "--out", str(tmp_path)]) == 2
    assert "unknown model name 'sam3_hiera_t'" in capsys.readouterr().err
    assert sam2_to_flax.main(["--checkpoint", str(f), "--model-name", NAME, "--image-size", "1000",
                              "--out", str(tmp_path / "o")]) == 2
    assert "image_size must be a positive multiple of 32" in capsys.readouterr().err


def test_load_model_errors(converted, tmp_path):
    out, exported = converted
    with pytest.raises(api.CheckpointError, match="not a medsam2-jax model directory.*convert/sam2_to_flax.py"):
        api.load_model(tmp_path)
    with pytest.raises(api.CheckpointError, match="is a file; load_model reads a model directory"):
        api.load_model(exported)
    with pytest.raises(api.CheckpointError, match="no such model directory"):
        api.load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / api.META_FILE).write_text("{not json")
    with pytest.raises(api.CheckpointError, match="unreadable model description"):
        api.load_model(broken)
    (broken / api.META_FILE).write_text((out / api.META_FILE).read_text())
    with pytest.raises(api.CheckpointError, match="params/ is missing"):
        api.load_model(broken)
    (broken / "params").mkdir()
    with pytest.raises(api.CheckpointError, match="cannot be restored"):
        api.load_model(broken)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        api.load_model(out, image_size=300)


# ------------------------------------------------------------------------------------------------ parity CLI
def test_parity_cli_help():
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "parity.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--checkpoint", "--model-name", "--model DIR", "--image-size", "--video", "--frames"):
        assert flag in r.stdout


def test_parity_cli_fails_on_corrupted_weights(ckpt, capsys):
    """The check is able to fail: one converted tensor shifted by 0.05 makes the image path rows fail and
    the exit status 1 (in process, so the compiled programs of the tests above are reused)."""
    rc = parity_cli.main(["--checkpoint", str(ckpt["files"]["meta"]), "--model-name", NAME, "--image-size", str(S),
                          "--corrupt-for-test"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL image_encoder.trunk stage 0" in out and "FAIL: " in out and "PASS" not in out.splitlines()[-1]


def test_parity_cli_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("x")
    assert parity_cli.main(["--checkpoint", str(bad), "--model-name", NAME, "--image-size", str(S)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert parity_cli.main(["--checkpoint", str(bad), "--model-name", NAME, "--image-size", "100"]) == 2
    assert "--image-size must be a positive multiple of 32" in capsys.readouterr().err


@pytest.mark.slow
def test_parity_cli_passes_with_video(ckpt, converted):
    """The user's command on a perturbed checkpoint, in a fresh process: every row passes, video included,
    checking the converted directory (--model DIR) rather than an in-memory conversion."""
    out, _ = converted
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=os.environ.get("MEDSAM2_JAX_CACHE", str(ROOT / ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    r = subprocess.run([sys.executable, str(ROOT / "convert" / "parity.py"), "--checkpoint",
                        str(ckpt["files"]["meta"]), "--model-name", NAME, "--image-size", str(S), "--video",
                        "--frames", "3", "--model", str(out), "--json", str(ckpt["dir"] / "rows.json")],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "PASS"
    rows = json.loads((ckpt["dir"] / "rows.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    assert all(row["ok"] for row in rows)
    assert sum(n.startswith("video (3 frames): frame ") and "mask logits" in n for n in names) == 3
    assert any(n.startswith("box, one mask") for n in names) and any(n.startswith("box + click") for n in names)


# ------------------------------------------------------------------------------------------------ public API
def test_public_api_is_lazy_and_complete():
    r = subprocess.run([sys.executable, "-c", "import sys, medsam2_jax as m; print('jax' in sys.modules, "
                        "' '.join(m.__all__))"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    loaded_jax, names = r.stdout.split(maxsplit=1)
    assert loaded_jax == "False"  # `import medsam2_jax` stays fast: nothing heavy until a name is used
    import medsam2_jax

    for name in ("load_model", "save_model", "build_model", "random_model", "SAM2", "normalize_images",
                 "track", "make_prompts", "TrackerConfig", "BankConfig"):
        assert name in names.split() and getattr(medsam2_jax, name) is not None
    assert medsam2_jax.load_model is api.load_model and medsam2_jax.SAM2.predict_masks is not None
    assert callable(medsam2_jax.SAM2.encode_image)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medsam2_jax.nope  # noqa: B018


def test_public_api_bad_input(converted):
    """Clear errors from ``model.encode_image`` / ``model.predict_masks`` before any computation."""
    import jax.numpy as jnp

    out, _ = converted
    model = api.load_model(out)
    with pytest.raises(ValueError, match="rank|(B, H, W, 3)"):
        model.encode_image(jnp.zeros((S, S, 3)))
    with pytest.raises((ValueError, TypeError), match="floating point"):
        model.encode_image(jnp.zeros((1, S, S, 3), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        model.encode_image(jnp.zeros((1, 100, 100, 3)))
    with pytest.raises(ValueError, match=f"must be {S}x{S} for this model"):
        model.encode_image(jnp.zeros((1, 2 * S, 2 * S, 3)))
    feats = parity.jax_encode(model, np.zeros((1, S, S, 3), np.float32))
    with pytest.raises(ValueError, match="points must lie inside the image"):
        model.predict_masks(feats, points=np.array([[[S + 10.0, 5.0]]], np.float32), labels=np.array([[1]]))
    with pytest.raises(ValueError, match="boxes must lie inside the image"):
        model.predict_masks(feats, boxes=np.array([[-3.0, 0.0, 10.0, 10.0]], np.float32))
    with pytest.raises(ValueError, match="mask_inputs must be"):
        model.predict_masks(feats, mask_inputs=np.zeros((1, S, S), np.float32))
