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
    from hyperref import hyper_attention, make_draws
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
    failures = 0
    for seed in range(R):
        fresh = make_draws(cfg, n, n, q.shape[1], causal=True, rng=seed + 1)
        draws = type(fresh)(fresh.nq, fresh.nk, fresh.d, True, (), cfg, {},
                            type(fresh.direct)(draws0.direct.exact, fresh.direct.sample_u))
        out = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, scale=0.5)
        failures += spectral_error(out, mom.exact, params.op_p, params.op_v) > bound
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
