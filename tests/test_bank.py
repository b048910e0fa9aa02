"""The self-sorting memory bank (medsam2_jax/memory/bank.py) against an independent NumPy statement of the
paper's eqs. 2–5 (tests/bank_reference.py), plus properties, statistics, transformations and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from medsam2_jax.memory import bank as B
from tests.bank_reference import RefBank, probabilities, sam2_nonconditioning_memories, total_dissimilarity

D = 6  # descriptor size: small, so that random descriptors are far from orthogonal and cosines vary
PAYLOAD = {"x": jax.ShapeDtypeStruct((3,), jnp.float32), "ptr": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16)}
# float32 cosines (unit vectors, HIGHEST matmul) differ from float64 by ~1e-7 per term; a total
# dissimilarity sums <= K+1 of them. Two candidates closer than this may legitimately be ordered
# differently in float32 and float64: such near ties are followed, not failed (and counted).
TIE_TOL = 2e-5
# derandomize: the same examples on every run (CI stays reproducible); 25 examples keep it cheap on 2 cores.
HYP = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def entry(frame):
    return {"x": jnp.full((3,), frame, jnp.float32), "ptr": jnp.full((2, 2), frame, jnp.bfloat16)}


def batched_entry(frames):
    f = jnp.asarray(frames, jnp.float32)
    ptr = jnp.broadcast_to(f[:, None, None], (len(frames), 2, 2)).astype(jnp.bfloat16)
    return {"x": jnp.repeat(f[:, None], 3, 1), "ptr": ptr}


def stack(tree, n):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


@functools.lru_cache(maxsize=None)
def jit_update(cfg):
    return jax.jit(functools.partial(B.update_with_info, cfg=cfg))


@functools.lru_cache(maxsize=None)
def jit_resample(cfg):
    """(view, slots, drawn_valid) of one draw: resample and draw_slots with the same key."""
    def f(bank, query, key):
        view, drawn_valid = B.resample(bank, query, key, cfg)
        return view, B.draw_slots(bank, query, key, cfg), drawn_valid
    return jax.jit(f)


def make_bank(cfg, descs, valid, frames, confs=None):
    """A bank in an arbitrary state (not necessarily reachable by updates)."""
    k = cfg.K
    valid = np.asarray(valid, bool)
    frames = np.where(valid, np.asarray(frames), -1).astype(np.int32)
    confs = np.where(valid, np.ones(k) if confs is None else np.asarray(confs), 0).astype(np.float32)
    b = B.init(k, PAYLOAD, np.shape(descs)[-1])
    return b.replace(
        payload={"x": jnp.asarray(np.where(valid[:, None], frames[:, None], 0) * np.ones((k, 3)), jnp.float32),
                 "ptr": jnp.asarray(np.where(valid[:, None, None], frames[:, None, None], 0) * np.ones((k, 2, 2)),
                                    jnp.bfloat16)},
        descriptor=jnp.asarray(np.where(valid[:, None], descs, 0), jnp.float32),
        confidence=jnp.asarray(confs),
        frame_idx=jnp.asarray(frames),
        valid=jnp.asarray(valid),
        stamp=jnp.asarray(np.where(valid, np.arange(k), -1), jnp.int32),
        clock=jnp.asarray(k, jnp.int32),  # newer than every stamp
    )


def kept(bank):
    return set(np.asarray(bank.frame_idx)[np.asarray(bank.valid)].tolist())


def run_sequence(cfg, descs, confs):
    """Feed frames 0..T-1 one by one through the jitted update; returns the banks and infos."""
    upd = jit_update(cfg)
    bank = B.init(cfg, PAYLOAD, descs.shape[1])
    out = []
    for t in range(len(confs)):
        new, info = upd(bank, entry(t), jnp.asarray(descs[t], jnp.float32), jnp.float32(confs[t]), jnp.int32(t))
        out.append((bank, new, info))
        bank = new
    return out


def assert_banks_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------------------
# Config, init and input errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("policy", "lifo"), ("weighting", "max"), ("tpos_rule", "time"), ("K", 0), ("K", 2.0),
    ("num_maskmem", 1), ("c_thresh", float("nan")), ("temperature", 0.0), ("linear_eps", -1e-6),
    ("use_threshold", 1),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"BankConfig.{field}: got"):
        B.BankConfig(**{field: value})


def test_config_is_hashable_and_fifo_ignores_switches():
    a, b = B.BankConfig(), B.BankConfig()
    assert hash(a) == hash(b) and a == b
    fifo = B.BankConfig.sam2_fifo()
    assert fifo.K == fifo.num_slots == 6 == fifo.num_maskmem - 1
    assert not (fifo.threshold_on or fifo.dissimilarity_on or fifo.resampling_on)
    assert a.threshold_on and a.dissimilarity_on and a.resampling_on


def test_init_is_empty_with_static_shapes():
    cfg = B.BankConfig(K=4)
    b = B.init(cfg, PAYLOAD, 8)
    assert_banks_equal(b, B.init(4, PAYLOAD, 8))  # K as an int or from the config
    assert b.payload["x"].shape == (4, 3) and b.payload["ptr"].shape == (4, 2, 2)
    assert b.payload["ptr"].dtype == jnp.bfloat16
    assert b.descriptor.shape == (4, 8) and b.valid.shape == (4,) and not np.any(np.asarray(b.valid))
    assert np.all(np.asarray(b.frame_idx) == -1) and int(b.clock) == 0 and int(B.num_valid(b)) == 0


def test_bad_inputs_raise_clear_errors():
    cfg = B.BankConfig(K=3)
    b = B.init(cfg, PAYLOAD, D)
    d = jnp.zeros(D)
    with pytest.raises(ValueError, match=r"payload_entry\['ptr'\] has shape \(4,\), expected \(2, 2\)"):
        B.update(b, {"x": jnp.zeros(3), "ptr": jnp.zeros(4)}, d, 1.0, 0, cfg)
    with pytest.raises(ValueError, match="payload_entry has structure"):
        B.update(b, {"x": jnp.zeros(3)}, d, 1.0, 0, cfg)
    with pytest.raises(ValueError, match=r"descriptor has shape \(5,\), expected \(6,\)"):
        B.update(b, entry(0), jnp.zeros(5), 1.0, 0, cfg)
    with pytest.raises(ValueError, match="confidence must be a scalar"):
        B.update(b, entry(0), d, jnp.ones(1), 0, cfg)
    with pytest.raises(ValueError, match="cfg.K=4"):
        B.update(b, entry(0), d, 1.0, 0, B.BankConfig(K=4))
    with pytest.raises(ValueError, match="use jax.vmap"):
        B.update(stack(b, 2), entry(0), d, 1.0, 0, cfg)
    with pytest.raises(ValueError, match="query_descriptor has shape"):
        B.resample(b, jnp.zeros(D + 1), jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="descriptor_dim must be"):
        B.init(cfg, PAYLOAD, 0)
    with pytest.raises(ValueError, match="init: K must be"):
        B.init(0, PAYLOAD, D)


# --------------------------------------------------------------------------------------------------------
# Against the NumPy reference (eqs. 2-5)
# --------------------------------------------------------------------------------------------------------

REF_CFGS = {
    "paper": B.BankConfig(K=5),
    "no_threshold": B.BankConfig(K=5, use_threshold=False),
    "threshold_only": B.BankConfig(K=5, use_dissimilarity=False),
    "fifo": B.BankConfig.sam2_fifo(K=5),
}


@pytest.mark.parametrize("name", list(REF_CFGS))
def test_update_matches_numpy_reference(name):
    cfg = REF_CFGS[name]
    n_seq, steps = 16, 24
    rng = np.random.default_rng(1234)
    descs = rng.normal(size=(n_seq, steps, D))
    for s in range(n_seq):  # exact duplicates of an earlier frame, 15% of the time: exact ties in eq. 2
        for t in range(1, steps):
            if rng.random() < 0.15:
                descs[s, t] = descs[s, rng.integers(t)]
    descs = descs.astype(np.float32).astype(np.float64)  # both sides see the same numbers
    confs = rng.uniform(0.2, 1.0, size=(n_seq, steps)).astype(np.float32).astype(np.float64)

    step = jax.jit(jax.vmap(functools.partial(B.update_with_info, cfg=cfg)))
    bank = stack(B.init(cfg, PAYLOAD, D), n_seq)
    refs = [RefBank(cfg.K) for _ in range(n_seq)]
    near_ties = exact_dup_ties = 0
    frames, valid = np.asarray(bank.frame_idx), np.asarray(bank.valid)
    for t in range(steps):
        before = [set(frames[s][valid[s]].tolist()) for s in range(n_seq)]
        bank, info = step(bank, batched_entry([t] * n_seq), jnp.asarray(descs[:, t], jnp.float32),
                          jnp.asarray(confs[:, t], jnp.float32), jnp.full((n_seq,), t, jnp.int32))
        frames, valid = np.asarray(bank.frame_idx), np.asarray(bank.valid)
        for s in range(n_seq):
            got = set(frames[s][valid[s]].tolist())
            near = refs[s].offer(t, descs[s, t], confs[s, t], policy=cfg.policy, use_threshold=cfg.use_threshold,
                                 use_dissimilarity=cfg.use_dissimilarity, c_thresh=cfg.c_thresh, tie_tol=TIE_TOL)
            if near is not None and len(near) > 1:
                near_ties += 1
                dropped = (before[s] | {t}) - got
                assert len(dropped) == 1 and dropped <= near, (name, s, t, dropped, near)
                tied = [c for c in refs[s].last_candidates if c["frame"] in near]
                if all(np.array_equal(c["desc"], tied[0]["desc"]) for c in tied):
                    exact_dup_ties += 1  # the documented rule: among exact ties the newest is dropped
                    assert dropped == {max(tied, key=lambda c: c["stamp"])["frame"]}, (name, s, t)
                refs[s].force(got)
            assert got == refs[s].frames(), (name, s, t)
            assert bool(info.inserted[s]) == (t in got)
        # the payload and the stored confidence travel with their entry
        x = np.asarray(bank.payload["x"])[..., 0]
        np.testing.assert_array_equal(x[valid], frames[valid])
        np.testing.assert_array_equal(np.asarray(bank.payload["ptr"], np.float32)[..., 0, 0][valid], frames[valid])
        conf_of = np.take_along_axis(confs, np.maximum(frames, 0), axis=1)
        np.testing.assert_array_equal(np.asarray(bank.confidence)[valid], conf_of[valid].astype(np.float32))
    if cfg.dissimilarity_on:
        assert exact_dup_ties > 0, "the exact-tie branch was not exercised"
    print(f"{name}: near ties followed {near_ties}, of which exact duplicates {exact_dup_ties}")


def test_total_dissimilarity_matches_reference():
    rng = np.random.default_rng(7)
    descs = rng.normal(size=(7, D)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    got = np.asarray(B.total_dissimilarity(jnp.asarray(descs), jnp.asarray(valid)))
    want = total_dissimilarity(descs[valid].astype(np.float64))
    # float32 unit vectors and HIGHEST matmul vs float64: ~1e-7 per term, <= 6 terms.
    np.testing.assert_allclose(got[valid], want, atol=2e-6, rtol=0)
    assert np.all(np.isneginf(got[~valid]))


@pytest.mark.parametrize("weighting,temperature", [("linear", 1.0), ("softmax", 1.0), ("softmax", 0.2)])
def test_probabilities_match_numpy_reference(weighting, temperature):
    cfg = B.BankConfig(K=6, weighting=weighting, temperature=temperature)
    rng = np.random.default_rng(11)
    n = 64
    descs = rng.normal(size=(n, 6, D))
    valid = rng.random((n, 6)) < 0.7
    valid[:, 0] |= ~valid.any(1)  # at least one valid entry (the empty bank has its own test)
    query = rng.normal(size=(n, D))
    banks = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[make_bank(cfg, descs[i], valid[i], np.arange(6)) for i in range(n)])
    probs = jax.jit(jax.vmap(functools.partial(B.sampling_probabilities, cfg=cfg)))
    p = np.asarray(probs(banks, jnp.asarray(query, jnp.float32)))
    for i in range(n):
        want = probabilities(np.asarray(banks.descriptor[i])[valid[i]], query[i].astype(np.float32), weighting,
                             cfg.linear_eps, temperature)
        # float32 cosines (~1e-7) and one float32 normalisation: 1e-6 absolute on probabilities.
        np.testing.assert_allclose(p[i][valid[i]], want, atol=1e-6, rtol=0)
        assert np.all(p[i][~valid[i]] == 0)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def _plane_bank(cfg, cosines):
    """A bank whose descriptors have the given cosines with the query (1, 0); None = empty slot."""
    descs = np.array([[c, np.sqrt(1 - c * c)] if c is not None else [0, 0] for c in cosines])
    return make_bank(cfg, descs, [c is not None for c in cosines], np.arange(len(cosines))), jnp.array([1.0, 0.0])


@pytest.mark.parametrize("weighting,temperature", [("linear", 1.0), ("softmax", 0.5)])
def test_sampling_frequencies_match_eq4_chi_square(weighting, temperature):
    cfg = B.BankConfig(K=6, weighting=weighting, temperature=temperature)
    cosines = [0.9, 0.6, 0.3, None, 0.1, -0.4]
    bank, query = _plane_bank(cfg, cosines)
    n_calls = 4000  # x K = 24000 draws
    keys = jax.random.split(jax.random.key(2024), n_calls)
    slots = jax.jit(jax.vmap(lambda k: B.draw_slots(bank, query, k, cfg)))(keys)
    slots = np.asarray(slots).ravel()
    counts = np.bincount(slots, minlength=6)
    assert counts[3] == 0 and np.all(slots >= 0)  # the empty slot is never drawn; every draw is valid
    if weighting == "linear":
        p = np.array([0.9, 0.6, 0.3, 0.0, 0.1, 1e-6])
    else:
        p = np.exp(np.array([0.9, 0.6, 0.3, -np.inf, 0.1, -0.4]) / temperature)
    p /= p.sum()
    cells = p * slots.size >= 5  # chi-square needs expected counts >= 5
    if weighting == "linear":
        assert not cells[5] and counts[5] <= 2  # cos < 0: clamped to eps, expected 0.01 draws
    obs, exp = counts[cells], p[cells] / p[cells].sum() * counts[cells].sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # ... and the test has power: the same counts are far from uniform.
    assert stats.chisquare(obs, np.full(obs.size, obs.sum() / obs.size)).pvalue < 1e-10


# --------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------------------


@st.composite
def sequences(draw, ks=(1, 3, 5)):
    k = draw(st.sampled_from(ks))
    n = draw(st.integers(1, 14))
    confs = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    descs = rng.normal(size=(n, D))
    for t in range(1, n):
        if rng.random() < 0.25:
            descs[t] = descs[rng.integers(t)]  # exact duplicates
    return k, np.asarray(confs, np.float64), descs.astype(np.float32)


@HYP
@given(sequences(), st.booleans())
def test_update_invariants(seq, dissimilarity):
    k, confs, descs = seq
    cfg = B.BankConfig(K=k, use_dissimilarity=dissimilarity)
    accepted = 0
    for t, (old, new, info) in enumerate(run_sequence(cfg, descs, confs)):
        ok = confs[t] >= cfg.c_thresh
        accepted += ok
        v = np.asarray(new.valid)
        assert v.sum() <= k and v.sum() == min(k, accepted)  # never more than K; free slots filled first
        assert bool(info.accepted) == ok
        if not ok:  # a low-confidence entry never enters: the bank is unchanged, bit for bit
            assert_banks_equal(old, new)
            assert not bool(info.inserted) and int(info.slot) == -1
        assert np.all(np.asarray(new.confidence)[v] >= cfg.c_thresh)
        assert all(confs[f] >= cfg.c_thresh for f in kept(new))
        # empty slots hold their init values; stamps of valid entries are distinct
        assert np.all(np.asarray(new.frame_idx)[~v] == -1) and np.all(np.asarray(new.stamp)[~v] == -1)
        assert np.all(np.asarray(new.payload["x"])[~v] == 0) and np.all(np.asarray(new.descriptor)[~v] == 0)
        assert len(set(np.asarray(new.stamp)[v].tolist())) == v.sum()
        assert int(new.clock) == int(old.clock) + int(bool(info.inserted))
        if not dissimilarity and ok:
            assert t in kept(new)  # threshold-only: a confident frame always enters (evicting the oldest)


def _permute(bank, perm):
    return bank.replace(**{f: jax.tree.map(lambda x: x[perm], getattr(bank, f))
                           for f in ("payload", "descriptor", "confidence", "frame_idx", "valid", "stamp")})


@HYP
@given(sequences(ks=(3, 5)), st.integers(0, 2**31 - 1))
def test_kept_set_does_not_depend_on_slot_order(seq, seed):
    k, confs, descs = seq
    cfg = B.BankConfig(K=k, tpos_rule="rank")
    bank = run_sequence(cfg, descs, confs)[-1][1]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(k)
    permuted = _permute(bank, perm)
    upd = jit_update(cfg)
    for t in range(3):  # offer the same new entries to both; one may duplicate a stored descriptor
        d = descs[rng.integers(len(descs))] if rng.random() < 0.5 else rng.normal(size=D).astype(np.float32)
        args = (entry(100 + t), jnp.asarray(d), jnp.float32(0.9), jnp.int32(100 + t))
        d_of = dict(zip(np.asarray(bank.frame_idx), np.asarray(upd(bank, *args)[1].dissimilarity)))
        pd_of = dict(zip(np.asarray(permuted.frame_idx), np.asarray(upd(permuted, *args)[1].dissimilarity)))
        # eq. 2 itself is exactly permutation-equivariant (rows are summed in sorted order): same bits per frame
        assert {f: x for f, x in d_of.items() if f >= 0} == {f: x for f, x in pd_of.items() if f >= 0}
        bank, info = upd(bank, *args)
        permuted, pinfo = upd(permuted, *args)
        assert kept(bank) == kept(permuted)
        assert np.asarray(info.dissimilarity)[k] == np.asarray(pinfo.dissimilarity)[k]
    # the rank temporal rule is slot-order independent too
    def by_frame(b):
        return np.asarray(B.temporal_index(b, 104, cfg))[np.argsort(np.asarray(b.frame_idx))]

    np.testing.assert_array_equal(by_frame(bank), by_frame(permuted))


@HYP
@given(st.lists(st.booleans(), min_size=5, max_size=5), st.integers(0, 2**31 - 1),
       st.sampled_from(["linear", "softmax"]))
def test_invalid_slots_never_sampled(valid, seed, weighting):
    cfg = B.BankConfig(K=5, weighting=weighting)
    rng = np.random.default_rng(seed)
    bank = make_bank(cfg, rng.normal(size=(5, D)), valid, np.arange(5))
    query = jnp.asarray(rng.normal(size=D), jnp.float32)
    view, slots, drawn_valid = jit_resample(cfg)(bank, query, jax.random.key(seed))
    slots, vv = np.asarray(slots), np.asarray(view.valid)
    np.testing.assert_array_equal(np.asarray(drawn_valid), vv)
    valid = np.asarray(valid)
    if valid.any():
        assert np.all(vv) and np.all(valid[slots])  # K draws, all from valid slots
        np.testing.assert_array_equal(np.asarray(view.frame_idx), slots)
        np.testing.assert_array_equal(np.asarray(view.payload["x"])[:, 0], slots)
    else:  # all-invalid bank: categorical's silent index 0 is caught
        assert not vv.any() and np.all(slots == -1) and np.all(np.asarray(view.frame_idx) == -1)
        assert np.all(np.asarray(view.payload["x"]) == 0)
        assert np.all(np.asarray(B.sampling_probabilities(bank, query, cfg)) == 0)


# --------------------------------------------------------------------------------------------------------
# Determinism, transformations, compilation
# --------------------------------------------------------------------------------------------------------


def _random_banks(cfg, n, seed):
    rng = np.random.default_rng(seed)
    valid = rng.random((n, cfg.K)) < 0.8
    valid[0] = False  # one empty bank in the batch
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[
        make_bank(cfg, rng.normal(size=(cfg.K, D)), valid[i], rng.permutation(50)[: cfg.K])
        for i in range(n)]), rng


def test_same_key_same_draw():
    cfg = B.BankConfig(K=6)
    bank, query = _plane_bank(cfg, [0.9, 0.6, 0.3, None, 0.1, 0.5])
    a = jit_resample(cfg)(bank, query, jax.random.key(5))
    b = jit_resample(cfg)(bank, query, jax.random.key(5))
    assert_banks_equal(a, b)
    others = [np.asarray(jit_resample(cfg)(bank, query, jax.random.key(s))[1]) for s in range(6, 12)]
    assert any(not np.array_equal(o, np.asarray(a[1])) for o in others)  # the key does matter


def test_vmap_over_8_banks_equals_8_single_calls():
    cfg = B.BankConfig(K=4)
    banks, rng = _random_banks(cfg, 8, 3)
    descs = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    confs = jnp.asarray(rng.uniform(0.3, 1.0, 8), jnp.float32)
    frames = jnp.arange(60, 68, dtype=jnp.int32)
    keys = jax.random.split(jax.random.key(0), 8)
    upd = jax.jit(jax.vmap(functools.partial(B.update_with_info, cfg=cfg)))
    rd = jax.jit(jax.vmap(functools.partial(B.read, cfg=cfg)))
    batched = jax.device_get((upd(banks, batched_entry(list(range(60, 68))), descs, confs, frames),))
    vb = jax.tree.map(jnp.asarray, batched[0][0])
    batched += jax.device_get((rd(vb, descs, frames + 1, keys),))
    single = jax.jit(lambda b, e, d, c, f, key: (B.update_with_info(b, e, d, c, f, cfg),
                                                 B.read(B.update(b, e, d, c, f, cfg), d, f + 1, key, cfg)))
    host_banks = jax.device_get(banks)
    for i in range(8):
        b_i = jax.tree.map(lambda x: x[i], host_banks)
        got = jax.device_get(single(b_i, entry(60 + i), descs[i], confs[i], frames[i], keys[i]))
        assert_banks_equal(jax.tree.map(lambda x: x[i], batched), got)


def test_scan_over_40_updates_traces_once_and_keeps_shapes():
    cfg = B.BankConfig(K=4)
    traces = []

    def body(bank, xs):
        traces.append(1)
        desc, conf, frame, key = xs
        r = B.read(bank, desc, frame, key, cfg)
        bank = B.update(bank, entry(frame), desc, conf, frame, cfg)
        return bank, (B.num_valid(bank), r.view.valid.sum())

    run = jax.jit(lambda bank, xs: jax.lax.scan(body, bank, xs))
    b0 = B.init(cfg, PAYLOAD, D)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        xs = (jnp.asarray(rng.normal(size=(40, D)), jnp.float32), jnp.asarray(rng.uniform(0, 1, 40), jnp.float32),
              jnp.arange(40, dtype=jnp.int32), jax.random.split(jax.random.key(seed), 40))
        out, (nv, nread) = run(b0, xs)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), out) == jax.tree.map(lambda x: (x.shape, x.dtype), b0)
        nv = np.asarray(nv)
        assert nv[-1] == 4 and np.all(np.diff(nv) >= 0) and nv[0] <= 1  # it filled up inside one trace
    assert len(traces) == 1

    # Step by step from Python: one compile for empty, partly filled and full banks alike.
    count = []

    def counted(bank, e, d, c, f):
        count.append(1)
        return B.update(bank, e, d, c, f, cfg)

    step = jax.jit(counted)
    bank = b0
    for t in range(40):
        bank = step(bank, entry(t), jnp.ones(D) * (t % 3 - 1), jnp.float32(0.9), jnp.int32(t))
    assert int(B.num_valid(bank)) == 4 and len(count) == 1


# --------------------------------------------------------------------------------------------------------
# Policies, ties, temporal rule, gradients
# --------------------------------------------------------------------------------------------------------


def test_fifo_keeps_exactly_the_last_k_frames_in_order():
    cfg = B.BankConfig.sam2_fifo(K=4)
    rng = np.random.default_rng(0)
    confs = rng.uniform(0, 1, 15)  # ignored by fifo
    for t, (_, bank, info) in enumerate(run_sequence(cfg, rng.normal(size=(15, D)), confs)):
        order = np.asarray(B.chronological_slots(bank))[: min(t + 1, 4)]
        np.testing.assert_array_equal(np.asarray(bank.frame_idx)[order], np.arange(max(0, t - 3), t + 1))
        assert int(info.slot) == t % 4  # a ring buffer: slots never move
        assert int(info.evicted_frame) == (t - 4 if t >= 4 else -1)
    view, drawn_valid = B.resample(bank, jnp.ones(D), jax.random.key(0), cfg)  # fifo never resamples
    assert_banks_equal(view, bank)
    assert np.all(np.asarray(drawn_valid))
    np.testing.assert_array_equal(np.asarray(B.draw_slots(bank, jnp.ones(D), jax.random.key(0), cfg)), np.arange(4))


def test_fifo_read_reproduces_sam2_memory_selection():
    """Frame 0 and 5 prompted (kept outside the bank, as SAM 2 keeps them in cond_frame_outputs); every
    other frame is stored. At each frame the valid entries and their t_rel must be SAM 2's."""
    cfg = B.BankConfig.sam2_fifo()
    upd = jit_update(cfg)
    bank = B.init(cfg, PAYLOAD, D)
    stored = set()
    rd = jax.jit(functools.partial(B.read, cfg=cfg))
    for t in range(1, 16):
        r = jax.device_get(rd(bank, jnp.ones(D), jnp.int32(t), jax.random.key(0)))
        got = {int(f): int(tr) for f, tr, v in zip(r.view.frame_idx, r.t_rel, r.view.valid) if v}
        assert got == sam2_nonconditioning_memories(t, stored), t
        np.testing.assert_array_equal(np.asarray(r.tpos_row), np.asarray(r.t_rel) - 1)
        if t != 5:
            bank = upd(bank, entry(t), jnp.ones(D), jnp.float32(0.1), jnp.int32(t))[0]
            stored.add(t)


def test_fifo_read_window_follows_the_direction():
    """SAM 2's window is the num_maskmem - 1 frames *behind* the current one in the tracking direction: going
    backward from frame 10 that is frames 11..16, going forward frames 4..9 (the tracker calls read so)."""
    cfg = B.BankConfig.sam2_fifo()
    bank = make_bank(cfg, np.ones((6, D)), [True] * 6, [3, 9, 11, 12, 17, 10])
    rd = jax.jit(functools.partial(B.read, cfg=cfg))
    for direction, want in ((1, {9: 1}), (-1, {11: 1, 12: 2})):
        r = jax.device_get(rd(bank, jnp.ones(D), jnp.int32(10), jax.random.key(0), direction=direction))
        got = {int(f): int(tr) for f, tr, v in zip(r.view.frame_idx, r.t_rel, r.view.valid) if v}
        assert got == want, direction
        np.testing.assert_array_equal(np.asarray(r.slots) >= 0, np.asarray(r.view.valid))


def _unit_rows(rng, n):
    x = rng.normal(size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ties_keep_the_older_entry():
    cfg = B.BankConfig(K=3)
    a, b, c, e = _unit_rows(np.random.default_rng(3), 4)
    # (1) the new entry is an exact duplicate of a stored one: equal D, the stored (older) one stays
    bank = make_bank(cfg, np.stack([a, b, c]), [True] * 3, [10, 11, 12])
    for perm in ([0, 1, 2], [2, 0, 1]):
        pb = _permute(bank, np.array(perm))
        new, info = jit_update(cfg)(pb, entry(13), jnp.asarray(a), jnp.float32(1.0), jnp.int32(13))
        dis = np.asarray(info.dissimilarity)
        assert dis[perm.index(0)] == dis[3] == dis.min()  # an exact tie, bit for bit
        assert kept(new) == {10, 11, 12} and not bool(info.inserted)
    # (2) two stored duplicates tie: the newer of the two is dropped (stamp 1 > stamp 0)
    bank = make_bank(cfg, np.stack([a, a, b]), [True] * 3, [10, 11, 12])
    new, info = jit_update(cfg)(bank, entry(13), jnp.asarray(e), jnp.float32(1.0), jnp.int32(13))
    assert kept(new) == {10, 12, 13} and int(info.slot) == 1 and int(info.evicted_frame) == 11
    # (3) K = 1: both candidates always tie (eq. 2 is symmetric), so the first confident entry stays
    k1 = B.BankConfig(K=1)
    out = run_sequence(k1, _unit_rows(np.random.default_rng(4), 5), np.array([0.2, 0.9, 0.8, 0.95, 0.7]))
    assert kept(out[-1][1]) == {1}


def test_temporal_index_rules():
    frames = np.array([3, 9, 7, 9, 0, 20])
    valid = np.array([True, True, True, True, False, True])
    bank = make_bank(B.BankConfig(), np.ones((6, D)), valid, frames)
    dist = B.temporal_index(bank, 10, B.BankConfig(tpos_rule="distance"))
    np.testing.assert_array_equal(np.asarray(dist), [6, 1, 3, 1, 6, 6])  # clipped to [1, 6]; invalid -> 6
    rank = B.temporal_index(bank, 10, B.BankConfig(tpos_rule="rank"))
    # distances 7, 1, 3, 1, -, 10 -> dense ranks 3, 1, 2, 1, -, 4
    np.testing.assert_array_equal(np.asarray(rank), [3, 1, 2, 1, 6, 4])


def test_threshold_boundary_and_nan():
    cfg = B.BankConfig(K=3)
    bank = B.init(cfg.K, PAYLOAD, D)
    upd = jit_update(cfg)
    d = jnp.ones(D)
    for conf, enters in ((cfg.c_thresh, True), (np.nextafter(np.float32(cfg.c_thresh), np.float32(0)), False),
                         (np.nan, False)):
        _, info = upd(bank, entry(1), d, jnp.float32(conf), jnp.int32(1))
        assert bool(info.inserted) == enters, conf  # c >= c_thresh enters; below or NaN does not


def test_read_self_sorting_without_resampling():
    cfg = B.BankConfig(K=4, use_resampling=False)
    bank = make_bank(cfg, np.eye(4, D), [True, True, False, True], [1, 8, 0, 30])
    r = jax.jit(functools.partial(B.read, cfg=cfg))(bank, jnp.ones(D), jnp.int32(10), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(r.view.valid), [True, True, False, True])  # no window: 30 stays
    np.testing.assert_array_equal(np.asarray(r.t_rel), [6, 2, 6, 6])
    np.testing.assert_array_equal(np.asarray(r.tpos_row), [5, 1, 5, 5])
    np.testing.assert_array_equal(np.asarray(r.slots), [0, 1, -1, 3])


def test_without_resampling_the_view_is_the_bank():
    cfg = B.BankConfig(K=4, use_resampling=False)
    bank = make_bank(cfg, np.eye(4, D), [True, False, True, True], [1, 2, 3, 4])
    view, drawn_valid = B.resample(bank, jnp.ones(D), jax.random.key(0), cfg)
    assert_banks_equal(view, bank)
    np.testing.assert_array_equal(np.asarray(drawn_valid), [True, False, True, True])
    np.testing.assert_array_equal(np.asarray(B.draw_slots(bank, jnp.ones(D), jax.random.key(0), cfg)), [0, -1, 2, 3])


def test_gradients_flow_through_the_payload_not_the_selection():
    cfg = B.BankConfig(K=5)
    bank, query = _plane_bank(cfg, [0.9, None, 0.6, 0.3, 0.8])
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    key = jax.random.key(9)

    def loss(payload_x, descriptor):
        b = bank.replace(payload={**bank.payload, "x": payload_x}, descriptor=descriptor)
        view, _ = B.resample(b, query, key, cfg)
        return jnp.sum(view.payload["x"] * w)

    gx, gd = jax.jit(jax.grad(loss, argnums=(0, 1)))(bank.payload["x"], bank.descriptor)
    slots = np.asarray(jit_resample(cfg)(bank, query, key)[1])
    want = np.zeros((5, 3), np.float32)
    for k, s in enumerate(slots):
        want[s] += np.asarray(w[k])  # each draw sends its gradient back to the slot it came from
    np.testing.assert_allclose(np.asarray(gx), want, rtol=0, atol=1e-6)
    assert np.all(np.asarray(gx)[1] == 0) and np.abs(want).sum() > 0
    assert np.all(np.asarray(gd) == 0)  # selection is discrete: no gradient into the scores

    # update: the new entry's payload gets the gradient of the slot it was written to, or none
    def loss_update(x, conf):
        new = B.update(bank, {"x": x, "ptr": jnp.zeros((2, 2), jnp.bfloat16)}, jnp.array([0.0, 1.0]), conf, 50, cfg)
        return jnp.sum(new.payload["x"] * w)

    grad_update = jax.jit(jax.grad(loss_update))
    g_in = grad_update(jnp.ones(3), jnp.float32(0.9))  # slot 1 was free: written there
    np.testing.assert_allclose(np.asarray(g_in), np.asarray(w[1]), rtol=0, atol=0)
    assert np.all(np.asarray(grad_update(jnp.ones(3), jnp.float32(0.1))) == 0)  # rejected


def test_make_descriptor_pools_a_grid():
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 8)).astype(np.float32)
    want = x.reshape(2, 4, 4, 4, 4, 8).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(B.make_descriptor(jnp.asarray(x), 4)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(B.make_descriptor(jnp.asarray(x[0]), 16)), x[0].reshape(-1), atol=0)
    with pytest.raises(ValueError, match="not divisible by grid=4"):
        B.make_descriptor(jnp.zeros((10, 12, 8)), 4)
