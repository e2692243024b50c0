"""hyperref.theory.parameters against brute force (SPEC §2)."""

import math

import numpy as np
import pytest

from hyperref import HyperConfig, InputError, make_draws
from hyperref.attention import heavy_mask
from hyperref.theory.parameters import SoftmaxOperator, attention_parameters, spectral_error

from .dense import brute_mask


def _dense_p(q, k, scale, causal):
    s = scale * q @ k.T
    if causal:
        nq, nk = s.shape
        s = np.where(np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq, s, -np.inf)
    a = np.exp(s - np.where(np.isfinite(s).any(1), s.max(1), 0)[:, None])
    return a / np.maximum(a.sum(1, keepdims=True), 1e-300), np.exp(s)  # empty rows: P row 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,logit_scale", [(120, 120, 1.0), (90, 150, 3.0), (150, 90, 0.3)])
def test_parameters_equal_brute_force(causal, nq, nk, logit_scale):
    rng = np.random.default_rng(nq + nk)
    q = logit_scale * rng.standard_normal((nq, 8))
    k, v = rng.standard_normal((nk, 8)), rng.standard_normal((nk, 5))
    cfg = HyperConfig(bits=4, block=16, samples=8, min_seq_len=20)
    draws = make_draws(cfg, nq, nk, 8, causal=causal, rng=3)
    mask = heavy_mask(q, k, causal=causal, config=cfg, draws=draws)
    par = attention_parameters(q, k, v, causal=causal, mask=mask)
    P, A = _dense_p(q, k, 8**-0.5, causal)
    M = np.vstack([mask.rows(i, i + 1) for i in range(nq)]).astype(float)
    if not causal:
        np.testing.assert_array_equal(M, brute_mask(q, k, draws.blocks[""].lsh_planes, 16))
    R = P * (1 - M)
    r = (A * (1 - M)).sum(1)
    rel = dict(rtol=1e-9)
    np.testing.assert_allclose(par.alpha, nk * (P**2).sum(0).max(), **rel)
    np.testing.assert_allclose(par.alpha_res, nk * (R**2).sum(0).max(), **rel)
    np.testing.assert_allclose(par.op_p, np.linalg.norm(P, 2), rtol=1e-6)
    np.testing.assert_allclose(par.op_res, np.linalg.norm(R, 2), rtol=1e-6)
    np.testing.assert_allclose(par.srank_p, (P**2).sum() / np.linalg.norm(P, 2)**2, rtol=1e-5)
    np.testing.assert_allclose(par.srank_res, (R**2).sum() / np.linalg.norm(R, 2)**2, rtol=1e-5)
    np.testing.assert_allclose(par.srank_v, (v**2).sum() / np.linalg.norm(v, 2)**2, **rel)
    pos = r > 0
    np.testing.assert_allclose(par.kappa, r[pos].max() / r[pos].min(), **rel)
    assert par.kappa_zero_rows == (~pos).sum()
    seen = A.sum(1) > 0
    np.testing.assert_allclose(par.heavy_mass_mean, ((A * M).sum(1)[seen] / A.sum(1)[seen]).mean(), **rel)
    visible = A > 0 if causal else np.ones_like(A, bool)
    np.testing.assert_allclose(par.max_abs_logit, np.abs(8**-0.5 * q @ k.T)[visible].max(), **rel)
    assert par.nnz_mask == M.sum()
    # SPEC §2 facts
    assert par.op_p >= np.sqrt(nq / nk) * (1 - 1e-9) or causal
    assert par.fro_p**2 <= par.alpha * (1 + 1e-9)
    assert par.srank_v <= min(nk, 5) + 1e-9


def test_op_norm_of_uniform_attention():
    q = np.zeros((300, 4))
    k = np.random.default_rng(0).standard_normal((200, 4))
    sigma, resid = SoftmaxOperator(q, k, 1.0).op_norm()
    assert abs(sigma - np.sqrt(300 / 200)) < 1e-9 and resid < 1e-6


def test_op_norm_without_cache_matches_cached():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 400, 8))
    a = SoftmaxOperator(q, k, 0.5).op_norm()[0]
    b = SoftmaxOperator(q, k, 0.5, cache_entries=0).op_norm()[0]
    assert abs(a - b) < 1e-9 * a


def test_spectral_error_definition():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 30, 4))
    assert np.isclose(spectral_error(a, b, 2.0, 3.0), np.linalg.norm(a - b, 2) / 6.0)
    assert spectral_error(a, a, 1.0, 1.0) == 0.0


@pytest.mark.parametrize("seed", range(40))
def test_op_norm_near_rank_one(seed):
    # regression: every query on the same few heavy keys makes P nearly rank one; the Krylov
    # basis then meets directions it already holds, which must be dropped, not normalized
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(32, 97)), 8
    q, k, v = rng.standard_normal((3, n, d))
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    q = 0.3 * q + rng.uniform(2, 8) * direction
    k[: int(rng.integers(1, 5))] += rng.uniform(2, 8) * direction
    P, _ = _dense_p(q, k, 8**-0.5, False)
    assert attention_parameters(q, k, v).op_p == pytest.approx(np.linalg.norm(P, 2), rel=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_parameters_with_logits_beyond_float64(causal):
    # logits near 1e320 are longdouble blocks: the row log-sums follow them, P stays exact
    if np.finfo(np.longdouble).max <= np.finfo(np.float64).max:
        pytest.skip("longdouble is float64 here")
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 12, 4))
    big = 1e160
    par = attention_parameters(q * big, k * big, v, causal=causal)
    s = (q.astype(np.longdouble) * big) @ (k.astype(np.longdouble) * big).T * np.longdouble(0.5)
    if causal:
        s = np.where(np.tri(12, dtype=bool), s, -np.inf)
    a = np.exp(s - s.max(1, keepdims=True))
    P = (a / a.sum(1, keepdims=True)).astype(np.float64)
    np.testing.assert_allclose(par.alpha, 12 * (P**2).sum(0).max(), rtol=1e-9)
    np.testing.assert_allclose(par.fro_p, np.linalg.norm(P), rtol=1e-9)
    np.testing.assert_allclose(par.op_p, np.linalg.norm(P, 2), rtol=1e-6)
    assert par.max_abs_logit == np.inf  # beyond float64's range


@pytest.mark.parametrize("causal", [False, True])
def test_parameters_refuse_logits_beyond_longdouble(causal):
    big = np.longdouble(10) ** 3000
    q = np.random.default_rng(6).standard_normal((8, 4)).astype(np.longdouble) * big
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(q @ q.T).all():
            pytest.skip("longdouble holds these logits here")
    with pytest.raises(InputError, match="range"):
        attention_parameters(q, q, np.ones((8, 2)), causal=causal)


@pytest.mark.parametrize("op_p, op_v", [(math.inf, 1.0), (1.0, 10**400), (True, 1.0), (1.0, np.array(1.0))])
def test_spectral_error_refuses_norms_it_cannot_divide_by(op_p, op_v):
    a = np.ones((3, 2))
    with pytest.raises(InputError, match="op_"):
        spectral_error(a, 0 * a, op_p, op_v)
