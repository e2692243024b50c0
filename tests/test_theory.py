"""theory/: the bounds, their symbolic identities, and the guarantees tested as SPEC §7 says."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from hyperref import HyperConfig
from hyperref.mask import block_structure, dense_mask
from hyperref.sampling import resolve_samples, sampling_probabilities
from hyperref.theory import bounds, symbolic
from hyperref.theory.parameters import attention_parameters, spectral_error

from .strategies import attention_inputs

QUANTILE = 1 - 1e-6


def test_symbolic_identities():
    assert symbolic.g2_variance_identity() == 0
    assert symbolic.g2_variance_identity(1, 3, 1, 3) == 0
    assert symbolic.g4_composition_identity().is_zero_matrix
    assert symbolic.g1_identity().is_zero_matrix
    assert symbolic.g5_bernstein_exponent() == 0


def test_bound_functions_and_sample_sizes():
    assert bounds.g2_bound(bounds.g2_samples(0.3, 0.1, 5.0, 7.0), 0.1, 5.0, 7.0) <= 0.3
    assert bounds.g2_samples_alpha(0.3, 0.1, 2.0, 7.0, 100, 100) == bounds.g2_samples(0.3, 0.1, 2.0, 7.0)
    m_d = bounds.g5_samples(0.2, 0.05, 3.0, 1000)
    assert bounds.g5_failure(m_d, 0.2, 3.0, 1000) <= 0.05
    assert bounds.g5_failure(m_d - 1, 0.2, 3.0, 1000) > 0.05 * 0.9
    assert bounds.g4_bound(0.1, 0.0) == 0.1 and bounds.g4_bound(0.0, 0.2) == 0.2
    paper = bounds.paper_sample_sizes(0.1, 2.0, 1.5, 10.0, 64, 4096)
    assert paper["lemma2_product"] == pytest.approx(64 * 10 / 0.01)
    with pytest.raises(ValueError):
        bounds.g2_bound(10, 1.5, 1, 1)


@pytest.mark.parametrize("call", [
    lambda: bounds.g1_bound(float("nan")),
    lambda: bounds.g2_bound(0, 0.1, 2.0, 2.0),
    lambda: bounds.g2_bound(10, 0.1, 0.5, 2.0),  # a stable rank is 0 or >= 1
    lambda: bounds.g2_samples(-1.0, 0.1, 2.0, 2.0),  # was 40 samples
    lambda: bounds.g2_samples(0.0, 0.1, 2.0, 2.0),  # was ZeroDivisionError
    lambda: bounds.g2_samples_alpha(0.3, 0.1, 2.0, 7.0, 0, 100),
    lambda: bounds.g3_bound(10, 0.1, -1.0, 1.0, 2.0),
    lambda: bounds.g4_bound(-0.1, 0.0),
    lambda: bounds.g5_failure(10, 0.1, 0.0, 100),  # rho >= 1; was ZeroDivisionError
    lambda: bounds.g5_samples(0.1, 0.1, 1.0, 0),  # was a math domain error
    lambda: bounds.g5_eta(2.0),  # was -2.0
    lambda: bounds.paper_sample_sizes(0.1, 2.0, 0.5, 10.0, 64, 4096),  # kappa >= 1
    lambda: bounds.product_bound(0, 0.1, [1.0], [[1.0]], [1.0], 1.0, 1.0),
])
def test_bound_arguments_outside_their_domain_are_errors(call):
    with pytest.raises(ValueError):
        call()


def test_parameter_inputs_are_checked():
    q = np.random.default_rng(0).standard_normal((20, 4))
    for bad, match in [((q[None, None], q[None, None], q[None, None]), "one head"),
                       ((q * np.nan, q, q), "NaN"), ((q[:0], q, q), "nq, nk >= 1")]:
        with pytest.raises(ValueError, match=match):
            attention_parameters(*bad)
    with pytest.raises(ValueError, match="causal must be a bool"):
        attention_parameters(q, q, q, causal="no")
    with pytest.raises(ValueError, match="one shape"):
        spectral_error(q, q[:5], 1.0, 1.0)
    assert spectral_error(q, q, 1.0, 0.0) == 0.0 and spectral_error(q, 0 * q, 1.0, 0.0) == math.inf


def _dense(q, k, v, scale):
    A = np.exp(scale * (q @ k.T) - (scale * (q @ k.T)).max())
    return A, A.sum(1)


@given(attention_inputs())
def test_parameters_equal_brute_force(inp):
    q, k, v, _ = inp
    par = attention_parameters(q, k, v)
    A, d = _dense(q, k, v, 8**-0.5)
    P = A / d[:, None]
    assert par.alpha == pytest.approx(len(k) * (P**2).sum(0).max(), rel=1e-8)
    assert par.op_p == pytest.approx(np.linalg.norm(P, 2), rel=1e-6)
    assert par.srank_v == pytest.approx((v**2).sum() / np.linalg.norm(v, 2) ** 2, rel=1e-8)
    assert par.op_p >= math.sqrt(len(q) / len(k)) * (1 - 1e-9)  # SPEC §2 facts
    assert par.fro_p**2 <= par.alpha * (1 + 1e-9)


@given(attention_inputs(), st.floats(0.5, 2.0), st.integers(0, 2**31 - 1))
def test_g1_holds_deterministically(inp, spread, seed):
    q, k, v, _ = inp
    A, d = _dense(q, k, v, 8**-0.5)
    P = A / d[:, None]
    rng = np.random.default_rng(seed)
    d_tilde = d * np.exp(spread * rng.uniform(-1, 1, len(d)))
    eta = np.abs(d / d_tilde - 1).max()
    err = np.linalg.norm((A / d_tilde[:, None] - P) @ v, 2)
    assert err <= bounds.g1_bound(eta) * np.linalg.norm(P, 2) * np.linalg.norm(v, 2) * (1 + 1e-9)


def _product_error(P, v, M, u, sampler, masked):
    """Spectral error of the product with exact D: ‖X SᵀS V − X V‖ (X = P or P∘(1−M))."""
    p = sampling_probabilities(v, sampler)
    idx = resolve_samples(u, p)
    counts = np.bincount(idx, minlength=len(v)) / (len(u) * np.where(p > 0, p, 1))
    X = P * (1 - M) if masked else P
    return np.linalg.norm(X @ (counts[:, None] * v) - X @ v, 2)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sampler", ["rownorm", "uniform", "mixed"])
@pytest.mark.parametrize("regime", ["planted", "clustered", "uniform"])
def test_g2_g3_failures_within_binomial_quantile(masked, sampler, regime):
    # fixed inputs (n = 512), R independent seeds, ε in [0.1, 0.5] where the bound is not vacuous
    n, d, R, delta = 512, 8, 200, 0.2
    rng = np.random.default_rng({"planted": 1, "clustered": 2, "uniform": 3}[regime])
    q, k, v = rng.standard_normal((3, n, d))
    if regime == "planted":
        direction = rng.standard_normal(d)
        q = 0.3 * q + 3 * direction / np.linalg.norm(direction)
        k[:8] += 3 * direction / np.linalg.norm(direction)
    elif regime == "clustered":
        centers = 3 * rng.standard_normal((4, d))
        q = centers[rng.integers(0, 4, n)] + 0.2 * q
        k = centers[rng.integers(0, 4, n)] + 0.2 * k
    else:
        q *= 0.05
    A, dsum = _dense(q, k, v, d**-0.5)
    P = A / dsum[:, None]
    st_ = block_structure(q, k, rng.standard_normal((d, 7)), 64)
    M = dense_mask(st_).astype(float)
    op_p, op_v = np.linalg.norm(P, 2), np.linalg.norm(v, 2)
    col = ((P * (1 - M)) ** 2 if masked else P**2).sum(0)
    # choose m so that the bound is ε = 0.3
    p = sampling_probabilities(v, sampler)
    second = float((col * (v**2).sum(1) / p).sum())
    m = max(1, math.ceil(second / (delta * (0.3 * op_p * op_v) ** 2)))
    bound = bounds.product_bound(m, delta, col, v, p, op_p, op_v)
    assert 0.1 <= bound <= 0.5
    failures = sum(_product_error(P, v, M, np.random.default_rng(seed).random(m), sampler, masked)
                   > bound * op_p * op_v for seed in range(R))
    assert failures <= binom.ppf(QUANTILE, R, delta)


def test_paper_estimator_is_unbiased():
    # E[P SᵀS V] = P V: mean over many draws within a CLT tolerance (5 standard errors per entry)
    rng = np.random.default_rng(0)
    n, d, m, R = 64, 4, 16, 4000
    q, k, v = rng.standard_normal((3, n, d))
    A, dsum = _dense(q, k, v, 0.5)
    P = A / dsum[:, None]
    p = sampling_probabilities(v, "mixed")
    draws = np.empty((R, n, d))
    for r in range(R):
        idx = resolve_samples(rng.random(m), p)
        counts = np.bincount(idx, minlength=n) / (m * p)
        draws[r] = P @ (counts[:, None] * v)
    mean, se = draws.mean(0), draws.std(0, ddof=1) / math.sqrt(R)
    assert np.all(np.abs(mean - P @ v) <= 5 * se + 1e-12)


def test_masked_not_worse_than_paper_in_mse():
    rng = np.random.default_rng(4)
    n, d, m, R = 256, 8, 32, 300
    centers = 3 * rng.standard_normal((4, d))
    q = centers[rng.integers(0, 4, n)] + 0.2 * rng.standard_normal((n, d))
    k = centers[rng.integers(0, 4, n)] + 0.2 * rng.standard_normal((n, d))
    v = rng.standard_normal((n, d))
    A, dsum = _dense(q, k, v, d**-0.5)
    P = A / dsum[:, None]
    M = dense_mask(block_structure(q, k, rng.standard_normal((d, 7)), 32)).astype(float)
    p = sampling_probabilities(v, "rownorm")
    se_paper, se_masked = [], []
    for r in range(R):
        idx = resolve_samples(rng.random(m), p)
        c = (np.bincount(idx, minlength=n) / (m * p))[:, None] * v
        se_paper.append(((P @ c - P @ v) ** 2).sum())
        se_masked.append((((P * (1 - M)) @ c - (P * (1 - M)) @ v) ** 2).sum())
    diff = np.array(se_masked) - np.array(se_paper)
    # one-sided: the mean difference is not significantly positive (z < 4.75, p ≈ 1e-6)
    assert diff.mean() <= 4.75 * diff.std(ddof=1) / math.sqrt(R)


@pytest.mark.parametrize("r", [3, 7])
@pytest.mark.parametrize("theta", [0.3, 1.0, 2.0])
def test_lsh_collision_and_adjacency_frequencies(r, theta):
    from hyperref.lsh import buckets

    R, d = 4000, 6
    rng = np.random.default_rng(int(100 * theta) + r)
    x = np.zeros(d)
    x[0] = 1
    y = np.zeros(d)
    y[0], y[1] = math.cos(theta), math.sin(theta)
    same = adjacent = 0
    for _ in range(R):
        planes = rng.standard_normal((d, r))
        hx, hy = buckets(np.stack([x, y]), planes)
        same += hx == hy
        adjacent += (hx - hy) % 2**r in (1, 2**r - 1)
    t = theta / math.pi
    for count, prob in ((same, (1 - t) ** r), (adjacent, 2 * t * (1 - t) ** (r - 1))):
        lo, hi = binom.ppf(1e-6 / 2, R, prob), binom.ppf(1 - 1e-6 / 2, R, prob)
        assert lo <= count <= hi


def test_cli_reports_bounds(capsys):
    import json

    from hyperref.cli import main

    assert main(["run", "--n", "1024", "--d", "16", "--block", "64", "--samples", "64",
                 "--min-seq-len", "256", "--sampler", "uniform", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    b = report["bounds"]
    assert {"eta", "g1", "g2_srank", "g3_srank", "product", "g4", "delta"} <= set(b)
    assert b["g4"] == pytest.approx((1 + b["eta"]) * b["product"] + b["eta"])
    assert isinstance(report["guarantee_held"], bool)
    assert report["guarantee_held"] == (report["error_op"] <= b["g4"])


@given(attention_inputs(n_min=40, n_max=80), st.sampled_from(["paper", "masked"]),
       st.sampled_from(["approxd", "self"]), st.integers(0, 2**31 - 1))
def test_g4_holds_on_the_pipeline(inp, estimator, normalizer, seed):
    """Deterministic: err ≤ (1 + η) ε_prod + η for the actual outputs of hyper_attention."""
    from hyperref import exact_attention, hyper_attention

    q, k, v, _ = inp
    n = len(q)
    cfg = HyperConfig(bits=3, block=8, samples=16, min_seq_len=4, approxd_samples=8,
                      estimator=estimator, normalizer=normalizer)
    out, lse = hyper_attention(q, k, v, config=cfg, rng=seed, return_lse=True, engine="numpy")
    ref, ref_lse = exact_attention(q, k, v, return_lse=True)
    par = attention_parameters(q, k, v, residual_norm=False)
    unit = par.op_p * par.op_v
    ratio = np.exp(lse - ref_lse)  # d̃ / d
    eta = float(np.abs(1 / ratio - 1).max())
    eps_prod = np.linalg.norm(out * ratio[:, None] - ref, 2) / unit  # D⁻¹N − PV
    err = np.linalg.norm(out - ref, 2) / unit
    assert err <= bounds.g4_bound(eps_prod, eta) * (1 + 1e-9) + 1e-12
    assert n == len(out)


def test_g5_failures_within_binomial_quantile():
    """ApproxD with κ = κ_true: Pr[η > ε/(1−ε)] ≤ the G5 bound, over R seeds."""
    from hyperref.approxd import approx_d

    rng = np.random.default_rng(11)
    n, d, R, eps, delta = 512, 8, 100, 0.4, 0.2
    # moderate logits keep the residual entry ratio ρ small, where G5 is not vacuous (m_d < n·ρ)
    q = 0.5 * rng.standard_normal((n, d))
    k = rng.standard_normal((n, d))
    st_ = block_structure(q, k, rng.standard_normal((d, 7)), 64)
    M = dense_mask(st_)
    S = d**-0.5 * q @ k.T
    A = np.exp(S)
    res = np.where(M, 0.0, A)
    r = res.sum(1)
    d_true = A.sum(1)
    kappa = r.max() / r.min()
    rho = float((n * res.max(1) / r).max())
    m_d = bounds.g5_samples(eps, delta, rho, n)
    fail_prob = bounds.g5_failure(m_d, eps, rho, n)
    assert fail_prob <= delta and m_d <= 4 * n
    failures = 0
    for seed in range(R):
        g = np.random.default_rng(seed)
        est = approx_d(q, k, d**-0.5, st_, g.choice(n, 32, replace=False),
                       g.integers(0, n, m_d), kappa=kappa)
        eta = np.abs(d_true / np.exp(est.log_d) - 1).max()
        failures += eta > bounds.g5_eta(eps)
    assert failures <= binom.ppf(QUANTILE, R, fail_prob)


def _g7_workload(seed, zero_v=False):
    """A causal head with planted far heavy keys, and a structured exact set (direct mode)."""
    from hyperref.exact_set import heavykeys, sinks, window

    rng = np.random.default_rng(seed)
    n, d = 384, 8
    q, k, v = rng.standard_normal((3, n, d))
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    q = 0.5 * q + 2.5 * direction
    k[[0, 50, 51, 200]] += 2.5 * direction
    if zero_v:
        v[1::4] = 0.0
    E = sinks(2) | window(32) | heavykeys(2, 64)
    return q, k, v, E


def _direct_runs(q, k, v, cfg, exact_draws, seeds, scale=0.5):
    """``(outputs, normalizer ratios d̃/d)`` of the direct mode over seeds, the exact set's draws fixed."""
    from hyperref import exact_attention, hyper_attention, make_draws

    n = len(q)
    _, exact_lse = exact_attention(q, k, v, causal=True, scale=scale, return_lse=True)
    outs, ratios = [], []
    for seed in seeds:
        fresh = make_draws(cfg, n, n, q.shape[1], causal=True, rng=seed)
        draws = type(fresh)(fresh.nq, fresh.nk, fresh.d, True, (), cfg, {},
                            type(fresh.direct)(exact_draws, fresh.direct.sample_u))
        out, lse = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, scale=scale, return_lse=True)
        outs.append(out)
        ratios.append(np.exp(lse - exact_lse))
    return np.array(outs), np.array(ratios)


def test_g7_row_identity_and_deterministic_h_bound():
    # õ_i − o_i = (d_i/d̃_i) e_i with e_i the centred product error, and ‖õ_i − o_i‖ ≤ ‖e_i‖/h_i
    from hyperref import hyper_attention, make_draws
    from hyperref.direct import block_rows, block_support, block_weights, sample_block
    from hyperref.exact_set import Geometry
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(0)
    n = len(q)
    cfg = HyperConfig(mode="direct", exact_set=E, samples=16, query_block=32, min_seq_len=64)
    draws = make_draws(cfg, n, n, q.shape[1], causal=True, rng=1)
    out = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, scale=0.5)
    mom = direct_moments(q, k, v, 0.5, cfg, draws.direct, True)
    geom = Geometry(n, n, True)
    states = E.prepare(q, k, 0.5, geom, draws.direct.exact)
    sq = (v**2).sum(axis=1)
    for t in range(n // 32):
        rows = block_rows(t, n, 32)
        nkeys = rows[-1] + 1
        A = np.exp(q[rows] @ k[:nkeys].T * 0.5) * geom.visible(rows, nkeys)
        P = A / A.sum(axis=1, keepdims=True)
        o = P @ v[:nkeys]
        member = E.member(states, q, k, 0.5, geom, rows, nkeys)
        lo, hi = block_support(t, geom, E, 32)
        W = block_weights(member, geom.visible(rows, nkeys), sample_block(draws.direct.sample_u[t], sq, lo, hi, "mixed"))
        resid = geom.visible(rows, nkeys) & ~member
        e = np.einsum("rk,rkd->rd", np.where(resid, (W - 1) * P, 0.0), v[None, :nkeys] - o[:, None, :])
        ratio = A.sum(axis=1) / (W * A).sum(axis=1)
        np.testing.assert_allclose(out[rows] - o, ratio[:, None] * e, atol=1e-12)
        h = mom.captured[rows]
        assert (np.linalg.norm(out[rows] - o, axis=1) <= np.linalg.norm(e, axis=1) / h + 1e-12).all()
        np.testing.assert_allclose(mom.exact[rows], o, atol=1e-12)


@pytest.mark.parametrize("sampler", ["mixed", "uniform"])
def test_g7_failures_within_binomial_quantile(sampler):
    from hyperref import make_draws
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(3)
    n, R, delta = len(q), 200, 0.2
    base = HyperConfig(mode="direct", exact_set=E, samples=1, query_block=32, min_seq_len=64, sampler=sampler)
    draws0 = make_draws(base, n, n, q.shape[1], causal=True, rng=0)
    mom = direct_moments(q, k, v, 0.5, base, draws0.direct, True)  # E is deterministic given its draws
    params = attention_parameters(q, k, v, 0.5, causal=True)
    # m so that the bound is 0.3 (every seed reuses the exact set's draws, only the samples change)
    m = max(1, math.ceil((mom.second_centred / mom.captured**2).sum()
                         / (delta * (0.3 * params.op_p * params.op_v) ** 2)))
    bound = bounds.g7_bound(m, delta, mom.captured, mom.second_centred, params.op_p, params.op_v,
                            spread=mom.spread)
    assert 0.1 <= bound <= 0.5
    cfg = HyperConfig(mode="direct", exact_set=E, samples=m, query_block=32, min_seq_len=64, sampler=sampler)
    outs, _ = _direct_runs(q, k, v, cfg, draws0.direct.exact, range(1, R + 1))
    failures = sum(spectral_error(out, mom.exact, params.op_p, params.op_v) > bound for out in outs)
    assert failures <= binom.ppf(QUANTILE, R, delta)


def test_g7_does_not_vanish_when_rownorm_misses_zero_values():
    # SPEC §5: keys with v_j = 0 are never sampled by rownorm: uncapped G7 is infinite, and the capped
    # one stays at its cap as m grows, while with mixed it falls like 1/sqrt(m)
    from hyperref import make_draws
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(4, zero_v=True)
    for sampler, finite in (("rownorm", False), ("mixed", True)):
        cfg = HyperConfig(mode="direct", exact_set=E, samples=8, query_block=32, min_seq_len=64, sampler=sampler)
        draws = make_draws(cfg, len(q), len(k), q.shape[1], causal=True, rng=0)
        mom = direct_moments(q, k, v, 0.5, cfg, draws.direct, True)
        assert math.isfinite(bounds.g7_bound(8, 0.1, mom.captured, mom.second_centred, 1.0, 1.0)) == finite
        capped = [bounds.g7_bound(m, 0.1, mom.captured, mom.second_centred, 1.0, 1.0, spread=mom.spread)
                  for m in (2**4, 2**14)]
        assert (capped[1] < capped[0] / 10) == finite


# ---- parameters of a structured exact set (docs/mathematics.md §2, §3b) ----

def _dense_exact_set_parameters(q, k, v, E, scale, causal, draws):
    """Brute force: the dense membership of every part, P, and the §2 / §3b quantities."""
    from hyperref.exact_set import ExactSet, Geometry

    nq, nk = len(q), len(k)
    geom = Geometry(nq, nk, causal)
    states = E.prepare(q, k, scale, geom, draws)
    rows = np.arange(nq)
    parts = [ExactSet((p,)).member((s,), q, k, scale, geom, rows, nk) for p, s in zip(E.parts, states)]
    union = np.any(parts, axis=0)
    assert (union == E.member(states, q, k, scale, geom, rows, nk)).all()
    visible = geom.visible(rows, nk)
    S = np.where(visible, scale * q @ k.T, -np.inf)
    A = np.exp(S - S.max())
    P = A / A.sum(1, keepdims=True)
    res = np.where(union, 0.0, P)
    r = np.where(union, 0.0, A).sum(1)
    s_, w_ = E.sink_count, E.window_width
    j = np.arange(nk)[None, :]
    c = rows[:, None] + nk - nq
    far = visible & (j >= s_)
    if w_:
        far &= (j <= c - w_) if causal else (np.abs(c - j) >= w_)

    def top(weights, counts):
        srt = -np.sort(-weights, axis=1)
        return np.array([srt[i, :counts[i]].sum() for i in range(nq)])

    def recall(member):
        n_all, n_far = member.sum(1), (member & far).sum(1)
        return ((P * member).sum() / top(P, n_all).sum(),
                (P * (member & far)).sum() / top(np.where(far, P, 0), n_far).sum() if n_far.any() else math.nan)

    out = {"alpha_res": nk * (res**2).sum(0).max(), "fro_res": np.linalg.norm(res),
           "op_res": np.linalg.norm(res, 2), "kappa": r[r > 0].max() / r[r > 0].min(),
           "kappa_zero_rows": int((r == 0).sum()), "mass": (P * union).sum(1),
           "keys": union.sum(1).mean(), "far_keys": (union & far).sum(1).mean(), "nnz": int(union.sum())}
    out["recall"], out["far_recall"] = recall(union)
    out["parts"] = []
    for i, mp in enumerate(parts):
        others = np.any([x for t, x in enumerate(parts) if t != i], axis=0) if len(parts) > 1 else np.zeros_like(mp)
        rec, far_rec = recall(mp)
        out["parts"].append({"mass": (P * mp).sum(1), "keys": mp.sum(1).mean(), "far_keys": (mp & far).sum(1).mean(),
                             "recall": rec, "far_recall": far_rec,
                             "gain": ((P * union).sum(1) - (P * others).sum(1)).mean(),
                             "alpha_res": nk * (np.where(mp, 0, P) ** 2).sum(0).max()})
    return out


_EXACT_SETS = {
    "preset-like": "sinks(2) | window(8) | heavykeys(count=4, rows=16) | quest(block=4, candidates=16, keep=4)",
    "paper + sinks": "sinks(3) | sortlsh(bits=3, block=8, rounds=2)",
    "blocktop": "window(6) | blocktop(block=8, count=2)",
}


@pytest.mark.parametrize("name", list(_EXACT_SETS))
@pytest.mark.parametrize("causal, nq, nk", [(True, 96, 96), (False, 80, 96), (True, 64, 96)])
@pytest.mark.parametrize("cache_bytes", [2**28, 0])
def test_exact_set_parameters_equal_brute_force(name, causal, nq, nk, cache_bytes):
    from hyperref.exact_set import Geometry, parse_exact_set
    from hyperref.theory.exact_set_parameters import exact_set_parameters

    E = parse_exact_set(_EXACT_SETS[name])
    rng = np.random.default_rng(nq + nk)
    q, k, v = rng.standard_normal((nq, 6)), rng.standard_normal((nk, 6)), rng.standard_normal((nk, 5))
    k[[5, 40, 41]] += 2.0 * q.mean(0) / np.linalg.norm(q.mean(0))  # far keys with more mass
    draws = E.draw(Geometry(nq, nk, causal), 6, (), np.random.default_rng(3))
    got = exact_set_parameters(q, k, v, E, 0.7, causal=causal, draws=draws, part_params=True,
                               cache_bytes=cache_bytes)
    want = _dense_exact_set_parameters(q, k, v, E, 0.7, causal, draws)
    par = got.params
    assert got.alpha_res == pytest.approx(want["alpha_res"], rel=1e-9)
    assert par.fro_res == pytest.approx(want["fro_res"], rel=1e-9)
    assert par.op_res == pytest.approx(want["op_res"], rel=1e-6)
    assert got.srank_res == pytest.approx(want["fro_res"] ** 2 / want["op_res"] ** 2, rel=1e-5)
    assert got.kappa == pytest.approx(want["kappa"], rel=1e-9)
    assert par.kappa_zero_rows == want["kappa_zero_rows"] and par.nnz_mask == want["nnz"]
    assert got.mass_mean == pytest.approx(want["mass"].mean(), rel=1e-9)
    assert got.mass_min == pytest.approx(want["mass"].min(), rel=1e-9)
    assert (got.keys_mean, got.far_keys_mean) == pytest.approx((want["keys"], want["far_keys"]))
    assert got.recall == pytest.approx(want["recall"], rel=1e-9) and got.recall <= 1 + 1e-12
    assert got.far_recall == pytest.approx(want["far_recall"], rel=1e-9, nan_ok=True)
    assert len(got.parts) == len(E.parts)
    for part, ref in zip(got.parts, want["parts"]):
        assert part.mass_mean == pytest.approx(ref["mass"].mean(), rel=1e-9, abs=1e-15)
        assert part.mass_min == pytest.approx(ref["mass"].min(), rel=1e-9, abs=1e-15)
        assert (part.keys_mean, part.far_keys_mean) == pytest.approx((ref["keys"], ref["far_keys"]))
        assert part.gain_mean == pytest.approx(ref["gain"], rel=1e-9, abs=1e-15)
        assert part.recall == pytest.approx(ref["recall"], rel=1e-9, nan_ok=True)
        assert part.far_recall == pytest.approx(ref["far_recall"], rel=1e-9, nan_ok=True)
        assert part.params.alpha_res == pytest.approx(ref["alpha_res"], rel=1e-9)
        assert part.params.op_p == par.op_p  # the ‖P‖_op solve is shared
        # a part's marginal gain is at most what it captures alone
        assert part.gain_mean <= part.mass_mean + 1e-12


def test_exact_set_recall_of_the_oracle_is_one_and_inputs_are_checked():
    from hyperref.exact_set import Geometry, heavykeys, sinks, topk, window
    from hyperref.theory.exact_set_parameters import exact_set_parameters

    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 64, 4))
    assert exact_set_parameters(q, k, v, topk(5), parts=False).recall == pytest.approx(1.0, rel=1e-12)
    # the oracle's budget is the row's own: a set and its topk at that budget, sinks + window strictly below
    sw = exact_set_parameters(q, k, v, sinks(2) | window(4))
    assert sw.recall < 1 and math.isnan(sw.far_recall) and sw.far_keys_mean == 0
    assert exact_set_parameters(q, k, v, "sinks(2) | window(4)").recall == sw.recall  # parsed description
    geom = Geometry(64, 64, True)
    E = sinks(2) | heavykeys(4, 8)
    bad = [(dict(exact_set=sinks(2) | window(4), draws=(None,)), "one entry per part"),
           (dict(exact_set=E, draws=(None, np.zeros(3, np.int64))), "shape"),
           (dict(exact_set=E, draws=(None, np.full(8, 99, np.int64))), "row indices"),
           (dict(exact_set=E, draws=(np.zeros(1), E.draw(geom, 4, (), rng)[1])), "deterministic"),
           (dict(exact_set="nothing(3)"), "unknown exact-set part"), (dict(exact_set=3), "ExactSet"),
           (dict(exact_set=sinks(2), causal="yes"), "causal must be a bool"),
           (dict(exact_set=sinks(2), parts=1), "parts must be a bool")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            exact_set_parameters(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="one head"):
        exact_set_parameters(q[None, None], k[None, None], v[None, None], sinks(2))
    with pytest.raises(ValueError, match="norm_p"):
        attention_parameters(q, k, v, norm_p=(1.0,))


# ---- G3 for the direct mode: the numerator's product error with exact D ----

@pytest.mark.parametrize("sampler, zero_v", [("mixed", False), ("uniform", False), ("rownorm", True)])
def test_g3_direct_failures_within_binomial_quantile(sampler, zero_v):
    # D⁻¹N − PV (numerator over the exact normalizer) stays within G3-direct on all but a
    # binomial number of seeds; rownorm with zero values is included: the numerator needs no
    # v_j = 0 key (unlike the self-normalizer, SPEC §5)
    from hyperref import exact_attention, make_draws
    from hyperref.theory.exact_set_parameters import exact_set_parameters
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(5, zero_v=zero_v)
    n, R, delta = len(q), 200, 0.2
    base = HyperConfig(mode="direct", exact_set=E, samples=1, query_block=32, min_seq_len=64, sampler=sampler)
    draws0 = make_draws(base, n, n, q.shape[1], causal=True, rng=0)
    mom = direct_moments(q, k, v, 0.5, base, draws0.direct, True)
    params = attention_parameters(q, k, v, 0.5, causal=True)
    exact = exact_attention(q, k, v, causal=True, scale=0.5)
    m = max(1, math.ceil(mom.second_raw.sum() / (delta * (0.3 * params.op_p * params.op_v) ** 2)))
    bound = bounds.g3_direct_bound(m, delta, mom.second_raw, params.op_p, params.op_v)
    assert 0.1 <= bound <= 0.5
    if sampler != "uniform":  # the srank corollary with the exact set's ‖P∘(1−M_E)‖_F (×2 for mixed)
        es = exact_set_parameters(q, k, v, E, 0.5, draws=draws0.direct.exact, parts=False, residual_norm=False)
        factor = 2.0 if sampler == "mixed" else 1.0
        srank = bounds.g3_bound(m, delta, math.sqrt(factor) * es.params.fro_res, params.op_p, params.srank_v)
        assert bound <= srank * (1 + 1e-9)
    cfg = HyperConfig(mode="direct", exact_set=E, samples=m, query_block=32, min_seq_len=64, sampler=sampler)
    outs, ratios = _direct_runs(q, k, v, cfg, draws0.direct.exact, range(1, R + 1))
    numerators = outs * ratios[:, :, None]  # N_i / d_i = õ_i d̃_i / d_i
    failures = sum(spectral_error(x, exact, params.op_p, params.op_v) > bound for x in numerators)
    assert failures <= binom.ppf(QUANTILE, R, delta)


# ---- G7, tail form: Bernstein for the normalizer and over the query blocks ----

def _samples_for(target, bound_of_m):
    """Smallest m (a power-of-two bisection) with ``bound_of_m(m) <= target``: the bound falls with m."""
    lo, hi = 1, 1
    while bound_of_m(hi) > target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if bound_of_m(mid) <= target else (mid, hi)
    return hi


def test_normalizer_lower_tail_failures_within_binomial_quantile():
    # Pr[d̃_i < λ_i d_i] ≤ π_i(λ_i) row by row, with λ_i chosen so that π_i(λ_i) = 0.2
    from hyperref import make_draws
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(6)
    n, R, m, level = len(q), 200, 32, 0.2
    cfg = HyperConfig(mode="direct", exact_set=E, samples=m, query_block=32, min_seq_len=64, sampler="mixed")
    draws0 = make_draws(cfg, n, n, q.shape[1], causal=True, rng=0)
    mom = direct_moments(q, k, v, 0.5, cfg, draws0.direct, True)
    # rows with a residual whose tail bound drops below the level somewhere in (h_i, 1)
    near_h = bounds.normalizer_lower_tail(m, mom.captured, mom.second_mass, np.minimum(mom.captured + 1e-9, 1))
    rows = np.nonzero((mom.captured < 0.6) & (near_h < level / 2))[0][::5][:12]
    assert len(rows) >= 8
    h, u = mom.captured[rows], mom.second_mass[rows]
    lam_lo, lam_hi = h.copy(), np.ones_like(h)
    for _ in range(60):  # π_i increases with λ on (h_i, 1), to 1 at λ = 1: bisect π_i(λ_i) = level
        mid = (lam_lo + lam_hi) / 2
        above = bounds.normalizer_lower_tail(m, h, u, mid) > level
        lam_lo, lam_hi = np.where(above, lam_lo, mid), np.where(above, mid, lam_hi)
    lam = lam_lo
    pi = bounds.normalizer_lower_tail(m, h, u, lam)
    assert np.all((pi <= level) & (pi > level / 2)) and np.all(lam > h)
    _, ratios = _direct_runs(q, k, v, cfg, draws0.direct.exact, range(1, R + 1))
    failures = (ratios[:, rows] < lam[None, :]).sum(axis=0)
    assert np.all(failures <= binom.ppf(QUANTILE, R, pi))
    assert np.all(ratios >= mom.captured[None, :] * (1 - 1e-12))  # d̃_i ≥ h_i d_i on every draw


@pytest.mark.parametrize("sampler", ["mixed", "uniform"])
def test_g7_tail_failures_within_binomial_quantile(sampler):
    # each form of the tail bound (Markov over rows, Bernstein over query blocks) and their
    # minimum hold on all but a binomial number of seeds; the row terms bound the mean
    from hyperref import make_draws
    from hyperref.theory.self_normalized import direct_moments

    q, k, v, E = _g7_workload(7)
    n, R, delta, bq = len(q), 200, 0.2, 8
    base = HyperConfig(mode="direct", exact_set=E, samples=1, query_block=bq, min_seq_len=64, sampler=sampler)
    draws0 = make_draws(base, n, n, q.shape[1], causal=True, rng=0)
    mom = direct_moments(q, k, v, 0.5, base, draws0.direct, True)
    params = attention_parameters(q, k, v, 0.5, causal=True)
    args = (mom.captured, mom.second_centred, mom.second_mass, mom.spread, params.op_p, params.op_v)

    def tail(m):
        return bounds.g7_tail_bound(m, delta, *args, query_block=bq)

    m = _samples_for(0.3, tail)
    forms = bounds.g7_tail_forms(m, delta, *args, query_block=bq)
    old = bounds.g7_bound(m, delta, mom.captured, mom.second_centred, params.op_p, params.op_v, spread=mom.spread)
    assert 0.1 <= min(forms.values()) <= 0.3 < old
    cfg = HyperConfig(mode="direct", exact_set=E, samples=m, query_block=bq, min_seq_len=64, sampler=sampler)
    outs, _ = _direct_runs(q, k, v, cfg, draws0.direct.exact, range(1, R + 1))
    errors = np.array([spectral_error(o, mom.exact, params.op_p, params.op_v) for o in outs])
    limit = binom.ppf(QUANTILE, R, delta)
    for name, value in forms.items():
        assert (errors > value).sum() <= limit, name
    assert (errors > min(forms.values())).sum() <= limit
    # E‖õ_i − o_i‖² ≤ b_i, summed over rows: the mean over seeds within a one-sided CLT margin
    terms = bounds.g7_row_terms(m, mom.captured, mom.second_centred, mom.spread, mom.second_mass)
    sq = ((outs - mom.exact[None]) ** 2).sum(axis=(1, 2))
    assert sq.mean() <= terms.sum() + 4.75 * sq.std(ddof=1) / math.sqrt(R)
    # the tail form is the tighter one here, and not far above the measured (1 − δ)-quantile
    assert min(forms.values()) < old
    assert min(forms.values()) <= 12 * np.quantile(errors, 1 - delta)  # measured: 7.1–7.5


def test_g7_tail_bound_edge_cases():
    # a row with no exact key may get d̃_i = 0 (output 0): the cap covers it; s_i = 0 rows are exact
    h, s, u, cap = np.array([0.0, 1.0, 0.5]), np.array([0.0, 0.0, 0.02]), np.array([1.0, 0.0, 0.5]), np.ones(3)
    terms = bounds.g7_row_terms(10, h, s, cap, u)
    assert terms[0] > 0 and terms[1] == 0 and 0 < terms[2] <= bounds.g7_row_terms(10, h, s, cap)[2]
    assert bounds.g7_row_terms(10, h, s, cap)[0] == 1.0  # the capped form: the cap itself
    assert bounds.g7_tail_bound(10, 0.1, [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], 1.0, 1.0) == 0.0
    for call in (lambda: bounds.g7_tail_forms(10, 0.1, h, s, None, cap, 1.0, 1.0),
                 lambda: bounds.g7_row_terms(10, h, s, cap[:2], u),
                 lambda: bounds.g7_tail_bound(10, 0.1, h, s, u, cap, 1.0, 1.0, query_block=0),
                 lambda: bounds.normalizer_lower_tail(10, h, u, h - 0.1),
                 lambda: bounds.g3_direct_bound(10, 0.1, [-1.0], 1.0, 1.0)):
        with pytest.raises(ValueError):
            call()


def test_g7_cap_holds_on_every_draw_also_for_rows_without_exact_keys():
    # ‖õ_i − o_i‖² ≤ D_i² for every draw; a row with h_i = 0 whose samples all miss R_i has õ_i = 0,
    # so its cap includes ‖o_i‖² (row 0 of a causal sortlsh-only set: the cap was 0, the error ‖v_0‖²)
    from hyperref import hyper_attention, make_draws
    from hyperref.exact_set import sortlsh
    from hyperref.theory.self_normalized import direct_moments

    rng = np.random.default_rng(0)
    n = 512
    q, k, v = rng.standard_normal((3, n, 8))
    cfg = HyperConfig(mode="direct", exact_set=sortlsh(7, 32, 1), samples=16, query_block=64, min_seq_len=64)
    missed = 0
    for seed in range(10):
        draws = make_draws(cfg, n, n, 8, causal=True, rng=seed)
        out = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, scale=0.5)
        mom = direct_moments(q, k, v, 0.5, cfg, draws.direct, True)
        err = ((out - mom.exact) ** 2).sum(axis=1)
        assert np.all(err <= mom.spread * (1 + 1e-9) + 1e-12)
        missed += int((mom.captured == 0).any() and (np.abs(out).sum(axis=1) == 0).any())
    assert missed > 0  # the case the cap must cover did occur
