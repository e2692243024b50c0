"""The direct mode and structured exact sets (SPEC §3b, §6b) against brute force."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hyperref import HyperConfig, InputError, exact_attention, hyper_attention, make_draws
from hyperref.direct import block_rows, block_support, n_query_blocks
from hyperref.exact_set import (ExactSet, Geometry, blockkeys, blocktop, heavykeys, quest, sinks, sortlsh,
                                topk, window)

from .test_numba_engine import run_without_jit


def _qkv(n, d=16, nk=None, seed=0, zero_every=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d))
    k = rng.standard_normal((nk or n, d))
    v = rng.standard_normal((nk or n, d))
    if zero_every:
        v[::zero_every] = 0.0
    return q, k, v


def _direct(exact_set, **kw):
    kw.setdefault("min_seq_len", 16)
    return HyperConfig(mode="direct", exact_set=exact_set, **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(200, 200), (130, 257), (257, 130)])
def test_exact_set_covering_everything_is_exact(causal, nq, nk):
    q, k, v = _qkv(nq, nk=nk)
    want, want_lse = exact_attention(q, k, v, causal=causal, return_lse=True)
    for E in (window(nq + nk), topk(nk), sinks(nk)):
        cfg = _direct(E, query_block=32, samples=8)
        out, lse = hyper_attention(q, k, v, causal=causal, config=cfg, rng=0, return_lse=True)
        np.testing.assert_allclose(out, want, atol=1e-12)
        np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_exact_set_membership_by_brute_force():
    n = 40
    q, k, _ = _qkv(n, seed=3)
    geom = Geometry(n, n, True)
    rows = np.arange(n)
    i, j = np.meshgrid(rows, rows, indexing="ij")
    visible = j <= i
    np.testing.assert_array_equal((sinks(3) | window(5)).member_rows(q, k, 0.25, geom, rows, n),
                                  visible & ((j < 3) | (j > i - 5)))
    logits = np.where(visible, q @ k.T * 0.25, -np.inf)
    top = topk(4).member_rows(q, k, 0.25, geom, rows, n)
    assert (top.sum(axis=1) == np.minimum(4, rows + 1)).all()
    kth = np.sort(logits, axis=1)[:, ::-1][rows, np.minimum(3, rows)]
    assert (logits[top] >= np.repeat(kth, top.sum(axis=1))).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("big", [40, 2**62, 2**63 - 1, 10**30])
def test_parts_beyond_the_sequence_act_as_the_whole_sequence(big, causal):
    nq, nk, d = 12, 9, 4
    q, k, _ = _qkv(nq, d=d, nk=nk, seed=5)
    geom = Geometry(nq, nk, causal)
    rows = np.arange(nq)
    visible = geom.visible(rows, nk)
    planes = np.random.default_rng(0).standard_normal((2, d, 3))

    def member(E, draws=(None,)):
        return E.member_rows(q, k, 0.5, geom, rows, nk, draws)
    for E, draws in ((sinks(big), (None,)), (window(big), (None,)), (sortlsh(3, big, 2), (planes,))):
        np.testing.assert_array_equal(member(E, draws), visible, err_msg=E.describe())
    # one key block, ending after the first row's position (causal): picked for every row or none
    np.testing.assert_array_equal(member(blocktop(big, 3)), visible & (not causal))
    if not causal:  # every key block a candidate: the keep best logits
        np.testing.assert_array_equal(member(quest(2, big, 3)), member(topk(3)))
    # just beyond the sequence and far beyond: the same members, the same clamped part
    for make in (lambda b: quest(2, 4, b), lambda b: quest(2, b, 3), lambda b: blocktop(5, b),
                 lambda b: blocktop(b, 2), lambda b: topk(b), lambda b: window(b)):
        near, far = make(max(nq, nk) + 1), make(big)
        np.testing.assert_array_equal(member(far), member(near), err_msg=far.describe())
        assert far.within(geom) == near.within(geom)
    rows_drawn = (np.arange(nq),)
    np.testing.assert_array_equal(member(heavykeys(big, big), rows_drawn),
                                  member(heavykeys(nk, nq), rows_drawn))


def test_sortlsh_part_is_the_paper_mask_in_one_round():
    from hyperref.mask import block_structure, dense_mask

    n, d = 256, 8
    q, k, _ = _qkv(n, d=d, seed=4)
    part = sortlsh(bits=5, block=32).parts[0]
    planes = np.random.default_rng(0).standard_normal((1, d, 5))
    state = part.prepare(q, k, 1.0, Geometry(n, n, False), planes[0:1])
    mine = part.member(state, q, k, 1.0, Geometry(n, n, False), np.arange(n), n)
    np.testing.assert_array_equal(mine, dense_mask(block_structure(q, k, planes[0], 32)))


@given(nq=st.integers(1, 300), extra=st.integers(0, 200), bq=st.integers(1, 70),
       s=st.integers(0, 9), w=st.integers(0, 90), causal=st.booleans())
def test_block_support_holds_every_residual_key(nq, extra, bq, s, w, causal):
    nk = nq + extra
    parts = ([sinks(s)] if s else []) + ([window(w)] if w else [])
    E = ExactSet(tuple(p for e in parts for p in e.parts))
    geom = Geometry(nq, nk, causal)
    z = np.zeros((max(nq, nk), 1))
    for t in range(n_query_blocks(nq, bq)):
        rows = block_rows(t, nq, bq)
        member = E.member_rows(z[:nq], z[:nk], 1.0, geom, rows, nk)
        resid = geom.visible(rows, nk) & ~member
        lo, hi = block_support(t, geom, E, bq)
        cols = np.flatnonzero(resid.any(axis=0))
        assert ((cols >= lo) & (cols < hi)).all()


def _mse(out, want):
    return float(np.mean((out - want) ** 2))


def test_default_sampler_converges_when_values_vanish():
    # SPEC §5 (normalizer bias): with ‖v_j‖ = 0 on a third of the keys, rownorm never samples
    # them, so the self normalizer misses their mass at any m; mixed (the default) converges.
    q, k, v = _qkv(512, seed=1, zero_every=3)
    want = exact_attention(q, k, v, causal=True)
    assert HyperConfig().sampler == "mixed"

    def mse(sampler, m):
        cfg = _direct(window(8), samples=m, sampler=sampler, query_block=8)
        return np.mean([_mse(hyper_attention(q, k, v, causal=True, config=cfg, rng=seed), want)
                        for seed in range(6)])

    small, large = mse("mixed", 2**10), mse("mixed", 2**15)
    assert large < small / 8  # the variance falls like 1/m: 32x expected
    stalled_small, stalled_large = mse("rownorm", 2**10), mse("rownorm", 2**15)
    assert stalled_large > stalled_small / 4  # bias: it stops falling
    assert stalled_large > 10 * large


def test_same_draws_same_answer_and_batched_equals_per_head():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 300, 16))
    k, v = rng.standard_normal((2, 2, 1, 300, 16))
    cfg = _direct(sinks(2) | window(32) | sortlsh(4, 32, 2, centred=True), samples=32, query_block=32)
    draws = make_draws(cfg, 300, 300, 16, causal=True, batch_shape=(2, 3), rng=7)
    out = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws)
    for b in range(2):
        for h in range(3):
            one = hyper_attention(q[b, h], k[b, 0], v[b, 0], causal=True, config=cfg,
                                  draws=draws.head((b, h)))
            np.testing.assert_allclose(out[b, h], one, atol=1e-12)


def test_config_checks():
    with pytest.raises(ValueError, match="mode='direct'"):
        HyperConfig(exact_set=window(4))
    with pytest.raises(ValueError, match="masked estimator"):
        HyperConfig(mode="direct", estimator="paper")
    with pytest.raises(TypeError, match="ExactSet"):
        HyperConfig(mode="direct", exact_set="window(4)")
    with pytest.raises(ValueError, match="mode"):
        HyperConfig(mode="fast")
    with pytest.raises(InputError):
        window(0)
    with pytest.raises(InputError):
        sortlsh(bits=31)
    with pytest.raises(InputError):
        ExactSet(("window",))
    assert HyperConfig(mode="direct", exact_set=sinks(4) | window(8)).as_dict()["exact_set"] == \
        "sinks(4) | window(8)"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sampler", ["mixed", "rownorm", "uniform"])
def test_torch_twin_matches_the_reference_on_the_same_draws(causal, sampler):
    torch = pytest.importorskip("torch")
    from hyperref.gpu.direct import direct_attention

    rng = np.random.default_rng(8)
    nq, nk = 333, 333 if causal else 200
    q = rng.standard_normal((1, 4, nq, 16))
    k, v = rng.standard_normal((2, 1, 2, nk, 16))
    v[..., ::5, :] = 0.0
    E = sinks(3) | window(40) | sortlsh(5, 32, 3, centred=True) | topk(7) | blocktop(16, 2) | heavykeys(5, 30)
    E = E | quest(8, 32, 6)
    cfg = _direct(E, samples=48, query_block=32, sampler=sampler)
    draws = make_draws(cfg, nq, nk, 16, causal=causal, batch_shape=(1, 4), rng=2)
    want, want_lse = hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, return_lse=True)
    got, got_lse, counts = direct_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=causal,
                                            scale=0.25, config=cfg, draws=draws, chunk_rows=64,
                                            return_counts=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    np.testing.assert_allclose(got_lse.numpy(), want_lse, atol=1e-5)  # lse is returned in float32
    assert (counts.numpy() >= 1).all()


def test_quest_bound_is_an_upper_bound_and_full_quest_is_exact():
    from hyperref.exact_set import Quest

    q, k, v = _qkv(300, seed=9)
    part = Quest(block=8, candidates=8, keep=1)
    kmin, kmax, _ = part.prepare(q, k, 0.25, Geometry(300, 300, True), None)
    bound = np.maximum(q, 0) @ kmax.T + np.minimum(q, 0) @ kmin.T
    exact_max = np.stack([(q @ k[g * 8:(g + 1) * 8].T).max(axis=1) for g in range(len(kmin))], axis=1)
    assert (bound >= exact_max - 1e-12).all()
    # every block a candidate and every candidate kept: exact (non-causal, where no key lies
    # between the blocks and the window)
    cfg = _direct(window(16) | quest(8, 304, 300), samples=4, query_block=16)
    np.testing.assert_allclose(hyper_attention(q, k, v, config=cfg, rng=0),
                               exact_attention(q, k, v), atol=1e-12)
    # causal, every block a candidate: a row's quest keys are the `keep` largest logits among
    # the keys of the blocks that end at or before the row
    got = quest(8, 304, 3).member_rows(q, k, 0.25, Geometry(300, 300, True), np.arange(300), 300,
                                       draws=(None,))
    logits = q @ k.T * 0.25
    for i in range(300):
        whole = 300 if i == 299 else 8 * ((i + 1) // 8)  # the last block is short
        want = np.argsort(-logits[i, :whole], kind="stable")[:3]
        assert set(np.flatnonzero(got[i])) == set(want)


def test_heavykeys_and_blocktop_select_what_they_promise():
    from hyperref.exact_set import BlockTop, HeavyKeys

    rng = np.random.default_rng(10)
    n, d = 256, 8
    q, k = rng.standard_normal((2, n, d))
    k[100] = 6 * q.mean(axis=0) / np.linalg.norm(q.mean(axis=0))  # a key most rows attend to
    q += 2 * q.mean(axis=0)
    geom = Geometry(n, n, True)
    rows = np.sort(rng.choice(n, 64, replace=False))
    keys = HeavyKeys(count=1, rows=64).prepare(q, k, 1.0, geom, rows, covered=(4, 16))
    assert keys.tolist() == [100]
    picked = BlockTop(block=32, count=2).prepare(q, k, 1.0, geom, None, covered=(4, 16))
    g_end = np.arange(1, n // 32 + 1) * 32 - 1
    for t, chosen in enumerate(picked):
        allowed = np.flatnonzero(g_end <= t * 32 - 16)
        assert set(chosen[chosen >= 0]) <= set(allowed)
        assert (chosen >= 0).sum() == min(2, len(allowed))


@pytest.mark.parametrize("peaks", [False, True])
@pytest.mark.parametrize("keep", [10, 48])  # 48: every candidate kept, whole key blocks
@pytest.mark.parametrize("causal", [True, False])
def test_blockkeys_selects_what_it_promises(causal, keep, peaks):
    from hyperref.exact_set import BlockKeys, _eligible_keys

    rng = np.random.default_rng(11)
    n, d, s, w = 300, 8, 3, 20
    q, k = rng.standard_normal((2, n, d))
    geom = Geometry(n, n, causal)
    part = BlockKeys(block=64, keep=keep, reps=2, candidates=48, key_block=16, peaks=peaks)
    picked = part.prepare(q, k, 0.5, geom, None, covered=(s, w))
    j = np.arange(n)
    for t, chosen in enumerate(picked):
        lo, hi = 64 * t, min(n, 64 * t + 64)
        elig = _eligible_keys(j, lo, hi - 1, s, w, causal)
        keys = chosen[chosen >= 0]
        assert elig[keys].all() and (np.diff(keys) > 0).all()
        # at most `candidates/key_block` key blocks, and all of `keep` when the candidates hold them
        assert len(np.unique(keys // 16)) <= 3
        assert len(keys) == min(keep, elig.sum()) or len(keys) < keep and elig.sum() > len(keys)
        # the fine stage by brute force: every row of the block, all its keys scored
        reps = np.minimum(lo + np.array([31, 63]), hi - 1)
        logits = q[reps] @ k.T * 0.5
        logits[~geom.visible(reps, n)] = -np.inf
        if peaks:  # the largest eligible logit of a block relative to the representative's largest
            rel = np.where(elig, logits - logits.max(1, keepdims=True), -np.inf)
            sigma = np.array([rel[:, g * 16:g * 16 + 16].max() for g in range(-(-n // 16))])
        else:
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            sigma = np.array([np.where(elig, p.sum(0), 0)[g * 16:g * 16 + 16].sum()
                              if elig[g * 16:g * 16 + 16].any() else -np.inf for g in range(-(-n // 16))])
        blocks = np.argsort(-sigma, kind="stable")[:3]
        cand = np.flatnonzero(elig & np.isin(j // 16, blocks[np.isfinite(sigma[blocks])]))
        rows = np.arange(lo, hi)
        own = (sinks(s) | window(w)).member_rows(q, k, 0.5, geom, rows, n)
        allowed = own.copy()
        allowed[:, cand] = True
        lg = np.where(allowed, q[rows] @ k.T * 0.5, -np.inf)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        pi = np.exp(lg[:, cand] - lse[:, None]).sum(0)
        want = np.sort(cand[np.argsort(-pi, kind="stable")[:keep]])
        np.testing.assert_array_equal(keys, want)


def test_blockkeys_keeping_every_key_is_exact():
    # non-causal without a window every key is eligible to every block: keep them all
    q, k, v = _qkv(300, nk=260, seed=12)
    cfg = _direct(sinks(2) | blockkeys(64, 260, 2, 288, 32), samples=4, query_block=32)
    np.testing.assert_allclose(hyper_attention(q, k, v, config=cfg, rng=0),
                               exact_attention(q, k, v), atol=1e-12)
    with pytest.raises(InputError, match="at least one key block"):
        blockkeys(64, 8, 2, 16, 32)


def test_parse_exact_set_round_trips_and_refuses():
    from hyperref.exact_set import parse_exact_set
    from hyperref.presets import causal_lm

    E = causal_lm().exact_set
    assert parse_exact_set(E.describe()) == E
    E = sinks(4) | window(513) | blockkeys(128, 1024, candidates=1024, peaks=True)
    assert parse_exact_set(E.describe()) == E and "peaks=True" in E.describe()
    assert "peaks" not in blockkeys(128, 1024).describe()
    for bad in ("", "window(x)", "windows(3)", "sinks(4) | quest(block=8, nope=1)", "sinks(-1)"):
        with pytest.raises(InputError):
            parse_exact_set(bad)


def test_gpu_path_refuses_the_direct_mode_instead_of_ignoring_it():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from hyperref import gpu

    q = torch.zeros(1, 1, 64, 16)
    with pytest.raises(ValueError, match="direct_attention"):
        gpu.hyper_attention(q, q, q, causal=True, config=_direct(window(8), samples=4))


# --- the Numba engine of the direct mode (hyperref.direct_numba) on the reference's draws

FULL = (sinks(3) | window(40) | sortlsh(5, 32, 2, centred=True) | blocktop(16, 2) | heavykeys(5, 30)
        | quest(8, 32, 6))
EPS32 = np.finfo(np.float32).eps


def _engines(q, k, v, cfg, causal, seed=2):
    """``(draws, reference, numba)`` of the direct mode; results are ``(out, lse, keys)``."""
    from hyperref.direct import direct_heads as reference
    from hyperref.direct_numba import direct_heads as fast

    draws = make_draws(cfg, q.shape[2], k.shape[2], q.shape[3], causal=causal,
                       batch_shape=q.shape[:2], rng=seed)
    return draws, reference(q, k, v, 0.25, cfg, draws, causal), fast(q, k, v, 0.25, cfg, draws, causal)


def _within(got, ref64, ref32, dtype):
    """SPEC §8, a derived tolerance: ``|got − ref64| ≤ 2·(ε/ε₃₂)·|ref32 − ref64| + 8·ε·max|ref64|``.

    ``|ref32 − ref64|`` is the reference's own float32 rounding on these inputs (the
    same draws, inputs exact in float32); scaled by ``ε/ε₃₂`` it is the rounding
    level of ``dtype``. The fast engine sums in other orders: twice that, plus a floor.
    """
    eps = np.finfo(dtype).eps
    finite = np.isfinite(ref64)
    assert np.array_equal(finite, np.isfinite(got)) and np.array_equal(finite, np.isfinite(ref32))
    err32 = np.abs(ref32[finite].astype(np.float64) - ref64[finite]).max(initial=0.0)
    tol = 2 * (eps / EPS32) * err32 + 8 * eps * np.abs(ref64[finite]).max(initial=1.0)
    err = np.abs(got[finite].astype(np.float64) - ref64[finite]).max(initial=0.0)
    assert err <= tol, (err, tol)


def _gqa_inputs(nq, nk, seed, batch=2, heads=4, kv_heads=2, d=16):
    """Float32-exact inputs (B, H, ·, d) with ``kv_heads`` dividing ``heads``; every 5th value row 0."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, nq, d)).astype(np.float32)
    k, v = rng.standard_normal((2, batch, kv_heads, nk, d)).astype(np.float32)
    v[..., ::5, :] = 0.0
    return q, k, v


def _check_engines(q, k, v, cfg, causal, seed=2):
    """The Numba engine equals the reference on the same draws: keys exactly, out and lse in float32
    and float64 within the derived tolerance."""
    as64 = [x.astype(np.float64) for x in (q, k, v)]
    _, (o64, l64, c64), (f_o64, f_l64, f_c64) = _engines(*as64, cfg, causal, seed)
    _, (o32, l32, c32), (f_o32, f_l32, f_c32) = _engines(q, k, v, cfg, causal, seed)
    assert np.array_equal(f_c64, c64) and np.array_equal(f_c32, c32)
    assert f_o32.dtype == f_l32.dtype == np.float32
    for got, ref64, ref32 in ((f_o64, o64, o32), (f_l64, l64, l32)):
        _within(got, ref64, ref32, np.float64)
    for got, ref64, ref32 in ((f_o32, o64, o32), (f_l32, l64, l32)):
        _within(got, ref64, ref32, np.float32)
    return c64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(333, 333), (257, 130), (130, 257)])
def test_numba_direct_equals_reference(causal, nq, nk):
    q, k, v = _gqa_inputs(nq, nk, seed=nq + nk)
    counts = _check_engines(q, k, v, _direct(FULL, samples=48, query_block=32), causal)
    if causal and nq > nk:
        assert (counts[..., :nq - nk] == 0).all()  # rows that see no key


@pytest.mark.parametrize("sampler", ["rownorm", "uniform"])
def test_numba_direct_samplers(sampler):
    q, k, v = _gqa_inputs(301, 301, seed=3, batch=1)
    _check_engines(q, k, v, _direct(FULL, samples=64, query_block=24, sampler=sampler), True)


def test_numba_direct_repeated_parts_empty_supports_and_no_samples():
    q, k, v = _gqa_inputs(203, 203, seed=4, batch=1, heads=2, kv_heads=1)
    many = (window(8) | window(24) | sinks(2) | sinks(5) | heavykeys(3, 20) | heavykeys(4, 10)
            | sortlsh(4, 16) | sortlsh(3, 32, 2) | quest(8, 24, 4) | quest(4, 16, 3) | blocktop(16, 1)
            | blocktop(32, 2))
    for causal in (True, False):
        _check_engines(q, k, v, _direct(many, samples=40, query_block=16), causal)
        _check_engines(q, k, v, _direct(many, samples=0, query_block=16), causal)
    # supports empty in every block: causal, a window wider than the prefix; non-causal, sinks
    # covering every key. The answer is exact attention.
    for causal, E in ((True, window(500)), (False, sinks(203) | window(3))):
        _check_engines(q, k, v, _direct(E, samples=16, query_block=16), causal)
        got = hyper_attention(q[0, 0], k[0, 0], v[0, 0], causal=causal, config=_direct(E, samples=16),
                              engine="numba", rng=0)
        np.testing.assert_allclose(got, exact_attention(q[0, 0], k[0, 0], v[0, 0], causal=causal),
                                   atol=1e-6)


def test_numba_direct_breaks_exact_ties_like_the_reference():
    # small integers: every score, bound and key-block mean is exact, so the rankings of quest,
    # heavykeys and blocktop are full of exact ties, broken by the smaller index in both engines
    rng = np.random.default_rng(5)
    q = rng.integers(-1, 2, (1, 2, 200, 8)).astype(np.float32)
    k = rng.integers(-1, 2, (1, 1, 200, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 200, 8)).astype(np.float32)
    E = sinks(1) | window(8) | quest(4, 16, 5) | heavykeys(6, 40) | blocktop(8, 2)
    for causal in (True, False):
        _check_engines(q, k, v, _direct(E, samples=12, query_block=16), causal)


def test_numba_direct_sampling_kernel_is_the_reference_inverse_cdf():
    from hyperref.direct import sample_block
    from hyperref.direct_numba import SAMPLER_CODES, block_samples

    rng = np.random.default_rng(6)
    sq = rng.random(500) ** 4
    sq[::3] = 0.0
    sq[200:260] = 0.0  # a support of zero norms: rownorm falls back to uniform
    u = rng.random(300)
    keys, weight = np.empty(300, np.int64), np.empty(300)
    for lo, hi in ((0, 500), (7, 123), (200, 260), (5, 6), (9, 9)):
        pref = np.concatenate([[0.0], np.cumsum(sq[lo:])])
        for sampler, code in SAMPLER_CODES.items():
            want = sample_block(u, sq, lo, hi, sampler)
            n = block_samples(u, sq, pref, lo, hi, code, keys, weight)
            np.testing.assert_array_equal(keys[:n], want.keys)
            np.testing.assert_allclose(weight[:n], want.weight, rtol=1e-12)


def test_numba_direct_in_the_public_api_and_the_oracle_stays_reference():
    from hyperref.direct_numba import direct_heads

    q, k, v = _gqa_inputs(300, 300, seed=7, batch=1, heads=1, kv_heads=1)
    cfg = _direct(FULL, samples=32, query_block=32)
    draws = make_draws(cfg, 300, 300, 16, causal=True, rng=1)
    ref = hyper_attention(q[0, 0], k[0, 0], v[0, 0], causal=True, config=cfg, draws=draws,
                          engine="numpy", return_lse=True)
    fast = hyper_attention(q[0, 0], k[0, 0], v[0, 0], causal=True, config=cfg, draws=draws,
                           return_lse=True)  # the default engine
    for got, want in zip(fast, ref):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
    oracle = _direct(sinks(2) | topk(5), samples=8, query_block=32)
    draws = make_draws(oracle, 300, 300, 16, causal=True, batch_shape=(1, 1), rng=1)
    np.testing.assert_array_equal(
        hyper_attention(q, k, v, causal=True, config=oracle, draws=draws, engine="numba"),
        hyper_attention(q, k, v, causal=True, config=oracle, draws=draws, engine="numpy"))
    with pytest.raises(InputError, match="topk"):
        direct_heads(q, k, v, 0.25, oracle, draws, True)


def test_numba_direct_kernels_without_jit():
    """A small subset with NUMBA_DISABLE_JIT=1: the kernels' Python bodies give the reference's answer."""
    code = (
        "import numpy as np\n"
        "from hyperref import HyperConfig, make_draws\n"
        "from hyperref.direct import direct_heads as ref\n"
        "from hyperref.direct_numba import direct_heads as fast\n"
        "from hyperref.exact_set import sinks, window, sortlsh, blocktop, heavykeys, quest\n"
        "rng = np.random.default_rng(0)\n"
        "q = rng.standard_normal((1, 2, 70, 8))\n"
        "k, v = rng.standard_normal((2, 1, 1, 61, 8))\n"
        "E = sinks(2) | window(9) | sortlsh(3, 8, 2) | blocktop(8, 1) | heavykeys(3, 10) | quest(4, 8, 3)\n"
        "cfg = HyperConfig(mode='direct', exact_set=E, samples=12, query_block=16, min_seq_len=8)\n"
        "for causal in (True, False):\n"
        "    d = make_draws(cfg, 70, 61, 8, causal=causal, batch_shape=(1, 2), rng=1)\n"
        "    o, l, c = ref(q, k, v, 0.3, cfg, d, causal)\n"
        "    fo, fl, fc = fast(q, k, v, 0.3, cfg, d, causal)\n"
        "    f = np.isfinite(l)\n"
        "    assert (c == fc).all() and (f == np.isfinite(fl)).all(), causal\n"
        "    assert np.abs(o - fo).max() <= 1e-12 and np.abs(l[f] - fl[f]).max() <= 1e-12, causal\n"
        "print('ok')\n"
    )
    run_without_jit(code)
