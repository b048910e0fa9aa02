"""Parity of the memory path's modules (RoPE, memory attention, memory encoder) with PyTorch SAM 2.

Reference: the perturbed random-init ``sam2.1_hiera_t`` at image size 256 (feature maps 16 x 16, so N = 256
query tokens and 256 memory tokens per frame), from
:func:`medsam2_jax.interop.torch_models.perturbed_torch_model`. Weights go through the project's one key map
(:func:`medsam2_jax.interop.weights.load_state_dict`), strictly.

PyTorch's ``MemoryAttention`` is sequence-first ``(tokens, B, C)``; ours is batch-first: the tests transpose
at the boundary. Feature maps are NCHW in PyTorch and NHWC here.

Tolerances (float32 on both sides, matmul precision "highest"), per kind of op:

* RoPE tables: cos/sin of the same float32 angles, computed by two libms -> 1 ulp measured (<= 2.5e-7).
* RoPE rotation: two float32 products and a sum per channel on O(1) inputs -> <= 1e-5.
* Module outputs: chains of float32 matmuls (fan-in up to 2048), LayerNorms and softmax over up to 1856
  keys, outputs of magnitude ~5. Measured max |diff| ~2e-6 on every output; 1e-4 is the project's budget for
  embeddings and leaves ~50x headroom for a different BLAS summation order. Porting errors measured on
  these inputs (scratch mutations): RoPE x/y axes swapped 0.14, keys not rotated 0.18, no pos enc on the
  cross-attention keys 0.09, no 0.1 * curr_pos at input 0.43 -- all caught. A wrong LayerNorm eps (1e-6 for
  1e-5) moves outputs by only 1.2e-5, below any safe tolerance, so the eps values are asserted directly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis  # noqa: E402

from medsam2_jax.interop.torch_models import (nchw_to_nhwc, perturbed_torch_model, state_dict_numpy,  # noqa: E402
                                             to_numpy)
from medsam2_jax.interop.weights import export_state_dict, iter_entries, load_state_dict  # noqa: E402
from medsam2_jax.model.memory_attention import MemoryAttention, build_memory_attention  # noqa: E402
from medsam2_jax.model.memory_encoder import MemoryEncoder  # noqa: E402
from medsam2_jax.model.rope import apply_rope, apply_rope_keys, axial_rope_tables  # noqa: E402

pytestmark = pytest.mark.torch

IMAGE_SIZE = 256
GRID = IMAGE_SIZE // 16  # 16 x 16 feature map
N = GRID * GRID  # query tokens = memory tokens per frame
D_MODEL, MEM_DIM = 256, 64
TOKENS_PER_PTR = D_MODEL // MEM_DIM  # SAM 2 splits each 256-d pointer into 4 tokens of 64
TOL_EMBED = 1e-4  # see the module docstring
B = 2


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def torch_model():
    return perturbed_torch_model("sam2.1_hiera_t", IMAGE_SIZE)


@pytest.fixture(scope="module")
def state_dict(torch_model):
    return state_dict_numpy(torch_model)


@pytest.fixture(scope="module")
def mem_attn(state_dict):
    # The SAM 2.1 builder: a layer template cloned 4 times, like PyTorch's get_clones.
    model = build_memory_attention(feat_sizes=(GRID, GRID), rngs=nnx.Rngs(0))
    load_state_dict(model, state_dict, prefix="memory_attention.")
    return model


@pytest.fixture(scope="module")
def mem_enc(state_dict):
    model = MemoryEncoder(out_dim=MEM_DIM, in_dim=D_MODEL, rngs=nnx.Rngs(1))
    load_state_dict(model, state_dict, prefix="memory_encoder.")
    return model


@nnx.jit(static_argnames=("num_obj_ptr_tokens",))
def _mem_attn_jit(model, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_mask=None):
    return model(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_mask)


def _torch_mem_attn(torch_model, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens):
    """PyTorch MemoryAttention on batch-first NumPy inputs -> batch-first NumPy output."""

    def seq_first(a):
        return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 0, 1)))

    with torch.no_grad():
        out = torch_model.memory_attention(
            curr=seq_first(curr),
            memory=seq_first(memory),
            curr_pos=seq_first(curr_pos),
            memory_pos=seq_first(memory_pos),
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
    return np.swapaxes(to_numpy(out), 0, 1)


def _inputs(seed: int, n_frames: int, n_ptrs: int, batch: int = B):
    rng = np.random.default_rng(seed)
    m = n_frames * N + n_ptrs * TOKENS_PER_PTR
    curr = rng.standard_normal((batch, N, D_MODEL)).astype(np.float32)
    curr_pos = rng.standard_normal((batch, N, D_MODEL)).astype(np.float32)
    memory = rng.standard_normal((batch, m, MEM_DIM)).astype(np.float32)
    memory_pos = rng.standard_normal((batch, m, MEM_DIM)).astype(np.float32)
    return curr, curr_pos, memory, memory_pos


# ----------------------------------------------------------------------------------------------- key map


def test_layer_norm_eps(mem_attn, mem_enc):
    # PyTorch's nn.LayerNorm default (1e-5) in memory attention, LayerNorm2d's 1e-6 in the memory encoder.
    eps_attn = [m.epsilon for _, m in nnx.iter_graph(mem_attn) if isinstance(m, nnx.LayerNorm)]
    eps_enc = [m.epsilon for _, m in nnx.iter_graph(mem_enc) if isinstance(m, nnx.LayerNorm)]
    assert eps_attn == [1e-5] * 13  # 4 layers x norm1..3 + final norm
    assert eps_enc == [1e-6] * 6  # 4 in the mask downsampler + 1 per CXBlock


def test_key_map_round_trip(mem_attn, mem_enc, state_dict):
    cases = ((mem_attn, "memory_attention.", 5_922_304), (mem_enc, "memory_encoder.", 1_384_608))
    for model, prefix, n_params in cases:
        expected = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        assert {e.torch_key for e in iter_entries(model)} == expected
        exported = export_state_dict(model, prefix=prefix)
        assert sum(v.size for v in exported.values()) == n_params  # sam2-reference-facts.md §1.2
        for k, v in exported.items():
            np.testing.assert_array_equal(v, state_dict[k], err_msg=k)
    # The default construction (independent layers, no template) has the same keys.
    default = MemoryAttention(rngs=nnx.Rngs(2))
    assert {e.torch_key for e in iter_entries(default)} == {e.torch_key for e in iter_entries(mem_attn)}


# ----------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dim,end_x,end_y", [(256, GRID, GRID), (64, 8, 4), (256, 64, 64)])
def test_rope_tables_match_compute_axial_cis(dim, end_x, end_y):
    cis = compute_axial_cis(dim=dim, end_x=end_x, end_y=end_y, theta=10000.0)
    cos, sin = axial_rope_tables(dim, end_x, end_y, 10000.0)
    assert cos.shape == sin.shape == tuple(cis.shape) and cos.dtype == np.float32
    # Same float32 angles (freqs rounded as torch rounds them), cos/sin from two libms: measured 1 ulp
    # (6e-8) up to 64 x 64 grids (angles up to 63 rad).
    np.testing.assert_allclose(cos, cis.real.numpy(), rtol=0, atol=2.5e-7)
    np.testing.assert_allclose(sin, cis.imag.numpy(), rtol=0, atol=2.5e-7)


@pytest.mark.parametrize("heads,head_dim,frames,excluded", [(1, 256, 3, 12), (2, 64, 2, 0), (1, 64, 1, 4)])
def test_rope_rotation_matches_apply_rotary_enc(heads, head_dim, frames, excluded):
    end_x, end_y = 8, 4  # non-square, so swapped x / y axes would show
    nq = end_x * end_y
    nk = frames * nq + excluded
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, heads, nq, head_dim)).astype(np.float32)  # torch layout (B, heads, N, D)
    k = rng.standard_normal((2, heads, nk, head_dim)).astype(np.float32)
    cis = compute_axial_cis(dim=head_dim, end_x=end_x, end_y=end_y)
    n_rope = nk - excluded
    kt = torch.from_numpy(k.copy())
    q_ref, kt[:, :, :n_rope] = apply_rotary_enc(
        torch.from_numpy(q), kt[:, :, :n_rope], freqs_cis=cis, repeat_freqs_k=frames > 1
    )
    cos, sin = axial_rope_tables(head_dim, end_x, end_y)
    q_jax = apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)
    k_jax = apply_rope_keys(
        jnp.asarray(k.transpose(0, 2, 1, 3)), cos, sin, num_k_exclude_rope=excluded, repeat=frames > 1
    )
    # Two float32 products and a sum per channel on O(1) values.
    np.testing.assert_allclose(np.asarray(q_jax), q_ref.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(k_jax), kt.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-5)
    # Excluded (pointer) tokens are passed through untouched, bit for bit.
    np.testing.assert_array_equal(np.asarray(k_jax)[:, n_rope:], k.transpose(0, 2, 1, 3)[:, n_rope:])
    # The rotation is not the identity on the rotated part (guards against a no-op).
    assert np.abs(np.asarray(k_jax)[:, nq // 2 : n_rope] - k.transpose(0, 2, 1, 3)[:, nq // 2 : n_rope]).max() > 0.1


def test_rope_keys_bad_input():
    cos, sin = axial_rope_tables(64, 4, 4)
    with pytest.raises(ValueError, match="whole frames of Nq=16"):
        apply_rope_keys(jnp.zeros((1, 40, 1, 64)), cos, sin, num_k_exclude_rope=4, repeat=True)
    with pytest.raises(ValueError, match="num_k_exclude_rope must be in"):
        apply_rope_keys(jnp.zeros((1, 16, 1, 64)), cos, sin, num_k_exclude_rope=17, repeat=True)
    with pytest.raises(ValueError, match="without repeat"):
        apply_rope_keys(jnp.zeros((1, 32, 1, 64)), cos, sin, repeat=False)
    with pytest.raises(ValueError, match="divisible by 4"):
        axial_rope_tables(66, 4, 4)


# ----------------------------------------------------------------------------------------------- memory encoder


@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_matches_torch(torch_model, mem_enc, skip_mask_sigmoid):
    rng = np.random.default_rng(10)
    pix_feat = rng.standard_normal((B, D_MODEL, GRID, GRID)).astype(np.float32)
    masks = (4.0 * rng.standard_normal((B, 1, IMAGE_SIZE, IMAGE_SIZE))).astype(np.float32)
    if skip_mask_sigmoid:  # what SAM 2 feeds: sigmoid(logits) * 20 - 10
        masks = (20.0 / (1.0 + np.exp(-masks)) - 10.0).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.memory_encoder(
            torch.from_numpy(pix_feat), torch.from_numpy(masks), skip_mask_sigmoid=skip_mask_sigmoid
        )
    out = nnx.jit(lambda m, p, k: m(p, k, skip_mask_sigmoid=skip_mask_sigmoid))(
        mem_enc, jnp.asarray(pix_feat.transpose(0, 2, 3, 1)), jnp.asarray(masks.transpose(0, 2, 3, 1))
    )
    feats = nchw_to_nhwc(ref["vision_features"])
    assert out["vision_features"].shape == (B, GRID, GRID, MEM_DIM) == feats.shape
    assert len(out["vision_pos_enc"]) == 1 and out["vision_pos_enc"][0].shape == (B, GRID, GRID, MEM_DIM)
    assert np.abs(feats).max() > 1.0  # the comparison is not of near-zero tensors
    np.testing.assert_allclose(np.asarray(out["vision_features"]), feats, rtol=0, atol=TOL_EMBED)
    # Sine encoding: the same float32 formula; measured 6e-8.
    np.testing.assert_allclose(
        np.asarray(out["vision_pos_enc"][0]), nchw_to_nhwc(ref["vision_pos_enc"][0]), rtol=0, atol=1e-6
    )


def test_memory_encoder_bad_input(mem_enc):
    with pytest.raises(ValueError, match=r"masks must be \(B, h\*16, w\*16, 1\)"):
        mem_enc(jnp.zeros((1, GRID, GRID, D_MODEL)), jnp.zeros((1, 128, 128, 1)))
    with pytest.raises(ValueError, match="pix_feat must be"):
        mem_enc(jnp.zeros((1, D_MODEL, GRID, GRID)), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))


# ----------------------------------------------------------------------------------------------- memory attention


@pytest.mark.parametrize("n_frames,n_ptrs", [(1, 0), (2, 4), (7, 16), (1, 16), (7, 0), (2, 0)])
def test_memory_attention_matches_torch(torch_model, mem_attn, n_frames, n_ptrs):
    curr, curr_pos, memory, memory_pos = _inputs(20 + n_frames + n_ptrs, n_frames, n_ptrs)
    n_ptr_tokens = n_ptrs * TOKENS_PER_PTR
    ref = _torch_mem_attn(torch_model, curr, curr_pos, memory, memory_pos, n_ptr_tokens)
    out = _mem_attn_jit(mem_attn, *map(jnp.asarray, (curr, curr_pos, memory, memory_pos)), n_ptr_tokens)
    assert out.shape == (B, N, D_MODEL)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL_EMBED)


def _padded_bank(seed: int):
    """A fixed-size bank: 7 frame slots (2 valid) + 16 pointer slots (3 valid) per batch element.

    Invalid slots hold garbage (huge values, NaN, inf). Returns the bank, its mask, and per batch element
    the truncated memory PyTorch sees (element 1 lists its valid slots in reverse order: slot order must
    not matter).
    """
    n_slots, n_ptr_slots = 7, 16
    valid_frames = [(1, 4), (6, 0)]
    valid_ptrs = [(0, 5, 11), (15, 3, 2)]
    rng = np.random.default_rng(seed)
    m = n_slots * N + n_ptr_slots * TOKENS_PER_PTR
    curr = rng.standard_normal((B, N, D_MODEL)).astype(np.float32)
    curr_pos = rng.standard_normal((B, N, D_MODEL)).astype(np.float32)
    memory = (1e3 * rng.standard_normal((B, m, MEM_DIM))).astype(np.float32)
    memory_pos = (1e3 * rng.standard_normal((B, m, MEM_DIM))).astype(np.float32)
    mask = np.zeros((B, m), bool)
    truncated = []
    for b in range(B):
        f_idx = [np.arange(s * N, (s + 1) * N) for s in valid_frames[b]]
        p_idx = [n_slots * N + np.arange(p * TOKENS_PER_PTR, (p + 1) * TOKENS_PER_PTR) for p in valid_ptrs[b]]
        idx = np.concatenate(f_idx + p_idx)
        memory[b, idx] = rng.standard_normal((idx.size, MEM_DIM))
        memory_pos[b, idx] = rng.standard_normal((idx.size, MEM_DIM))
        mask[b, idx] = True
        truncated.append((memory[b, idx][None], memory_pos[b, idx][None], len(p_idx) * TOKENS_PER_PTR))
    # Non-finite garbage in an invalid frame slot and an invalid pointer slot.
    memory[0, 2 * N + 7, 3] = np.nan
    memory_pos[0, 5 * N + 1, 0] = np.inf
    memory[1, n_slots * N + 1 * TOKENS_PER_PTR, 5] = -np.inf
    memory_pos[1, n_slots * N + 9 * TOKENS_PER_PTR + 2, 1] = np.nan
    return curr, curr_pos, memory, memory_pos, mask, truncated, n_ptr_slots * TOKENS_PER_PTR


def test_padded_bank_equals_torch_on_truncated_memory(torch_model, mem_attn):
    curr, curr_pos, memory, memory_pos, mask, truncated, n_ptr_tokens = _padded_bank(30)
    out = _mem_attn_jit(
        mem_attn, *map(jnp.asarray, (curr, curr_pos, memory, memory_pos)), n_ptr_tokens, jnp.asarray(mask)
    )
    out = np.asarray(out)
    assert np.isfinite(out).all()
    for b, (mem_b, pos_b, n_ptr_b) in enumerate(truncated):
        ref = _torch_mem_attn(torch_model, curr[b : b + 1], curr_pos[b : b + 1], mem_b, pos_b, n_ptr_b)
        np.testing.assert_allclose(out[b : b + 1], ref, rtol=0, atol=TOL_EMBED, err_msg=f"batch element {b}")


def test_all_keys_masked_is_finite_and_ignores_memory(mem_attn):
    curr, curr_pos, memory, memory_pos, mask, _, n_ptr_tokens = _padded_bank(31)
    mask[1] = False  # element 1: an empty bank
    args = [jnp.asarray(curr), jnp.asarray(curr_pos)]
    out_a = np.asarray(_mem_attn_jit(mem_attn, *args, jnp.asarray(memory), jnp.asarray(memory_pos), n_ptr_tokens,
                                     jnp.asarray(mask)))
    other = np.random.default_rng(5).standard_normal(memory.shape).astype(np.float32)
    memory_b = np.where(mask[..., None], memory, other)
    memory_pos_b = np.where(mask[..., None], memory_pos, -other)
    out_b = np.asarray(_mem_attn_jit(mem_attn, *args, jnp.asarray(memory_b), jnp.asarray(memory_pos_b),
                                     n_ptr_tokens, jnp.asarray(mask)))
    assert np.isfinite(out_a).all()
    np.testing.assert_array_equal(out_a, out_b)  # masked contents cannot matter, bit for bit
    # Documented semantics: with no valid key the cross-attention block contributes only out_proj's bias.
    cross = mem_attn.layers[0].cross_attn_image
    q = jnp.asarray(curr[:1])
    y = cross(q, jnp.asarray(np.nan_to_num(memory[:1])), jnp.asarray(np.nan_to_num(memory[:1])),
              num_k_exclude_rope=n_ptr_tokens, key_mask=jnp.zeros((1, memory.shape[1]), bool))
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(cross.out_proj.bias[...]), y.shape))


def test_gradients_flow_to_valid_slots_only(mem_attn):
    curr, curr_pos, memory, memory_pos, mask, _, n_ptr_tokens = _padded_bank(32)
    weights = jnp.asarray(np.random.default_rng(6).standard_normal((B, N, D_MODEL)).astype(np.float32))

    def loss(mem, mem_pos):
        out = mem_attn(jnp.asarray(curr), jnp.asarray(curr_pos), mem, mem_pos, n_ptr_tokens, jnp.asarray(mask))
        return jnp.sum(out * weights)

    g_mem, g_pos = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(memory), jnp.asarray(memory_pos))
    for g in (np.asarray(g_mem), np.asarray(g_pos)):
        assert np.isfinite(g).all()
        token_norm = np.linalg.norm(g, axis=-1)  # (B, M)
        assert (token_norm[~mask] == 0).all()
        assert (token_norm[mask] > 0).all()  # every valid frame token and every valid pointer token


def test_dropout_runs_when_not_deterministic(mem_attn):
    curr, curr_pos, memory, memory_pos = map(jnp.asarray, _inputs(40, 2, 4))
    n_ptr_tokens = 4 * TOKENS_PER_PTR
    mask = jnp.ones(memory.shape[:2], bool).at[:, :N].set(False)

    def run(seed):
        return np.asarray(mem_attn(curr, curr_pos, memory, memory_pos, n_ptr_tokens, mask,
                                   deterministic=False, rngs=nnx.Rngs(dropout=seed)))

    det = np.asarray(mem_attn(curr, curr_pos, memory, memory_pos, n_ptr_tokens, mask))
    a, a2, b = run(0), run(0), run(1)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_array_equal(a, a2)  # reproducible given the key
    assert np.abs(a - b).max() > 1e-2  # a different key drops different units
    assert np.abs(a - det).max() > 1e-2  # dropout is active (rate 0.1)
    with pytest.raises(ValueError, match="deterministic=False needs rngs"):
        mem_attn(curr, curr_pos, memory, memory_pos, n_ptr_tokens, deterministic=False)


def _textbook_cross_attention(attn, q, k, v, n_excl, key_mask, drop_key=None, rate=0.0):
    """RoPEAttention written out the long way: values through v_proj *before* the weighted sum."""
    from medsam2_jax.model.rope import apply_rope, apply_rope_keys

    b, nq, _ = q.shape
    nk = k.shape[1]
    hd = attn.internal_dim // attn.num_heads
    qh = attn.q_proj(q).reshape(b, nq, attn.num_heads, hd)
    kh = attn.k_proj(k).reshape(b, nk, attn.num_heads, hd)
    vh = attn.v_proj(v).reshape(b, nk, attn.num_heads, hd)
    cos, sin = attn.rope_tables(nq)
    qh = apply_rope(qh, cos, sin)
    kh = apply_rope_keys(kh, cos, sin, num_k_exclude_rope=n_excl, repeat=True)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(hd)
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    if drop_key is not None:
        keep = jax.random.bernoulli(drop_key, 1.0 - rate, w.shape)
        w = jnp.where(keep, w / (1.0 - rate), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, vh).reshape(b, nq, attn.internal_dim)
    return attn.out_proj(out)


def test_low_rank_value_product_equals_textbook_attention(mem_attn):
    """The cross-attention attends over the 64-channel memory and projects values afterwards (4x fewer FLOPs);
    with and without dropout on the weights (where rows no longer sum to one, so v_proj's bias is scaled by
    the row sum) it equals v_proj-then-attend up to float32 rounding."""
    curr, _, memory, memory_pos = map(jnp.asarray, _inputs(60, 2, 4))
    n_ptr_tokens = 4 * TOKENS_PER_PTR
    mask = jnp.ones(memory.shape[:2], bool).at[:, N // 2:N].set(False)
    attn = mem_attn.layers[1].cross_attn_image
    assert attn.kv_in_dim < attn.internal_dim // attn.num_heads  # the low-rank path is the one under test
    k_in = memory + memory_pos
    det = attn(curr, k_in, memory, num_k_exclude_rope=n_ptr_tokens, key_mask=mask)
    ref = _textbook_cross_attention(attn, curr, k_in, memory, n_ptr_tokens, mask)
    # |out| <= 0.3; measured 1.6e-7 (float32 rounding of the same sums in another order).
    assert np.abs(np.asarray(det) - np.asarray(ref)).max() < 2e-6
    drop = attn(curr, k_in, memory, num_k_exclude_rope=n_ptr_tokens, key_mask=mask, deterministic=False,
                rngs=nnx.Rngs(dropout=3))
    ref_drop = _textbook_cross_attention(attn, curr, k_in, memory, n_ptr_tokens, mask,
                                         drop_key=nnx.Rngs(dropout=3).dropout(), rate=attn.dropout_p)
    assert np.abs(np.asarray(drop) - np.asarray(det)).max() > 1e-2  # dropout acted
    assert np.abs(np.asarray(drop) - np.asarray(ref_drop)).max() < 2e-6


def test_memory_attention_bad_input(mem_attn):
    curr, curr_pos, memory, memory_pos = map(jnp.asarray, _inputs(50, 1, 1, batch=1))
    ptr = TOKENS_PER_PTR
    with pytest.raises(ValueError, match=r"memory must be \(B=1, M, 64\)"):
        mem_attn(curr, curr_pos, jnp.zeros((1, N, D_MODEL)), jnp.zeros((1, N, D_MODEL)), 0)
    with pytest.raises(ValueError, match="must be whole frames of N=256"):
        mem_attn(curr, curr_pos, memory, memory_pos, ptr + 1)
    with pytest.raises(ValueError, match="num_obj_ptr_tokens must be a static int"):
        mem_attn(curr, curr_pos, memory, memory_pos, memory.shape[1] + 1)
    with pytest.raises(ValueError, match="memory_mask must be bool"):
        mem_attn(curr, curr_pos, memory, memory_pos, ptr, jnp.ones(memory.shape[:2], jnp.float32))
    with pytest.raises(ValueError, match="memory_pos must have memory's shape"):
        mem_attn(curr, curr_pos, memory, memory_pos[:, :-1], ptr)
    with pytest.raises(ValueError, match="curr must be"):
        mem_attn(curr[..., :64], None, memory, memory_pos, ptr)
