"""Each estimator/normalizer equals a dense evaluation of its SPEC §5 formula on the same draws."""

import itertools

import numpy as np
import pytest

from hyperref import HyperConfig, exact_attention, hyper_attention, make_draws
from hyperref.approxd import approx_d
from hyperref.mask import block_structure, dense_mask
from hyperref.sampling import resolve_samples, sampling_probabilities

from .dense import brute_mask, dense_approxd, dense_hyper

COMBOS = list(itertools.product(("masked", "paper"), ("self", "approxd"),
                                ("rownorm", "uniform", "mixed")))


def _inputs(nq, nk, d, dv, seed, scale_logits=1.0):
    rng = np.random.default_rng(seed)
    return (scale_logits * rng.standard_normal((nq, d)), rng.standard_normal((nk, d)),
            rng.standard_normal((nk, dv)))


@pytest.mark.parametrize("estimator,normalizer,sampler", COMBOS)
@pytest.mark.parametrize("nq,nk", [(96, 96), (70, 110), (130, 45)])
def test_estimator_equals_dense_formula(estimator, normalizer, sampler, nq, nk):
    q, k, v = _inputs(nq, nk, 8, 5, nq + nk)
    cfg = HyperConfig(bits=4, block=16, samples=24, min_seq_len=8, approxd_samples=20,
                      estimator=estimator, normalizer=normalizer, sampler=sampler)
    draws = make_draws(cfg, nq, nk, 8, rng=7)
    out, lse = hyper_attention(q, k, v, config=cfg, draws=draws, return_lse=True)
    numer, denom = dense_hyper(q, k, v, 8**-0.5, cfg, draws.blocks[""])
    np.testing.assert_allclose(out, numer / denom[:, None], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, np.log(denom), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kappa", [None, 1.0, 3.0, 1e6])
def test_approxd_equals_formula(kappa):
    nq, nk = 120, 90
    q, k, _ = _inputs(nq, nk, 6, 1, 11, scale_logits=2.0)
    rng = np.random.default_rng(5)
    planes = rng.standard_normal((6, 5))
    rows = rng.choice(nq, 30, replace=False)
    cols = rng.integers(0, nk, 25)
    res = approx_d(q, k, 6**-0.5, block_structure(q, k, planes, 8), rows, cols, kappa)
    A = np.exp(6**-0.5 * q @ k.T)
    M = brute_mask(q, k, planes, 8)
    np.testing.assert_allclose(np.exp(res.log_d), dense_approxd(A, M, rows, cols, kappa), rtol=1e-12)
    np.testing.assert_allclose(np.exp(res.log_masked), (A * M).sum(1), rtol=1e-12)
    r = (A * (1 - M)).sum(1)
    assert np.isclose(np.exp(res.log_tau), r[rows].max(), rtol=1e-12)
    if kappa is None:
        assert np.isclose(res.kappa, r[rows].max() / r[rows].min(), rtol=1e-10)


def test_approxd_floor_never_exceeds_truth_with_true_kappa():
    # SPEC §4: with κ >= κ_true, τ/κ <= min_i r_i, so the floor alone never overshoots
    q, k, _ = _inputs(100, 100, 6, 1, 2, scale_logits=2.0)
    rng = np.random.default_rng(0)
    planes = rng.standard_normal((6, 5))
    st = block_structure(q, k, planes, 10)
    A = np.exp(6**-0.5 * q @ k.T)
    r = (A * (1 - dense_mask(st))).sum(1)
    res = approx_d(q, k, 6**-0.5, st, rng.choice(100, 20, replace=False),
                   rng.integers(0, 100, 10), kappa=r.max() / r.min())
    assert np.exp(res.log_floor) <= r.min() * (1 + 1e-12)


def test_approxd_without_residual():
    # a block covering all keys: r_i = 0 everywhere, d̃ = a = d exactly
    q, k, _ = _inputs(20, 20, 4, 1, 3)
    st = block_structure(q, k, np.ones((4, 2)), 20)
    res = approx_d(q, k, 0.5, st, np.arange(5), np.arange(5))
    np.testing.assert_allclose(np.exp(res.log_d), np.exp(0.5 * q @ k.T).sum(1), rtol=1e-12)


@pytest.mark.parametrize("normalizer", ["self", "approxd"])
@pytest.mark.parametrize("nq,nk", [(100, 100), (77, 120), (150, 61)])
def test_masked_with_block_covering_all_keys_is_exact(normalizer, nq, nk):
    q, k, v = _inputs(nq, nk, 8, 6, 1, scale_logits=3.0)
    cfg = HyperConfig(block=max(nq, nk), samples=16, min_seq_len=4, normalizer=normalizer)
    out, lse = hyper_attention(q, k, v, config=cfg, rng=0, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13)


def test_sampling_concentrated_on_sparse_v_is_exact_for_paper_product():
    # SPEC §7: rownorm sampling with V supported on one key and m samples: every sample is that
    # key with weight 1/m·1/p = 1/m, so the paper numerator is exactly A[:, j] v_j
    q, k, v = _inputs(30, 40, 4, 3, 9)
    v[:] = 0.0
    v[17] = [1.0, -2.0, 0.5]
    cfg = HyperConfig(block=8, samples=5, min_seq_len=4, estimator="paper", normalizer="approxd",
                      sampler="rownorm")
    draws = make_draws(cfg, 30, 40, 4, rng=0)
    numer, _ = dense_hyper(q, k, v, 0.5, cfg, draws.blocks[""])
    A = np.exp(0.5 * q @ k.T)
    np.testing.assert_allclose(numer, A[:, [17]] * v[17], rtol=1e-12)


def test_resolve_samples_follows_probabilities():
    p = sampling_probabilities(np.array([[0.0], [1.0], [2.0], [0.0]]), "rownorm")
    assert np.allclose(p, [0, 0.2, 0.8, 0])
    u = np.linspace(0, 1, 1000, endpoint=False)
    idx = resolve_samples(u, p)
    assert set(idx.tolist()) == {1, 2}
    assert abs((idx == 1).mean() - 0.2) < 0.002
    assert np.all(resolve_samples(np.array([1 - 1e-17, 0.9999999999999999]), p) == 2)
    assert np.allclose(sampling_probabilities(np.zeros((4, 2)), "rownorm"), 0.25)
    assert np.allclose(sampling_probabilities(np.array([[0.0], [1.0]]), "mixed"), [0.25, 0.75])
