"""The causal recursion (SPEC §6) against a dense recursion and exact causal attention."""

import numpy as np
import pytest

from hyperref import HyperConfig, exact_attention, hyper_attention, make_draws
from hyperref.plan import causal_nodes

from .dense import dense_causal


def _inputs(nq, nk, d=6, dv=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nq, d)), rng.standard_normal((nk, d)), rng.standard_normal((nk, dv))


SHAPES = [(64, 64), (65, 65), (97, 97), (50, 81), (81, 50), (33, 7), (7, 33), (128, 1)]


@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("estimator,normalizer", [("masked", "self"), ("masked", "approxd"),
                                                  ("paper", "self"), ("paper", "approxd")])
def test_causal_equals_dense_recursion(nq, nk, estimator, normalizer):
    q, k, v = _inputs(nq, nk, seed=nq * nk)
    cfg = HyperConfig(bits=3, block=4, samples=6, min_seq_len=5, approxd_samples=4,
                      estimator=estimator, normalizer=normalizer)
    draws = make_draws(cfg, nq, nk, 6, causal=True, rng=2)
    out, lse = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, return_lse=True)
    numer, denom = dense_causal(q, k, v, 6**-0.5, cfg, draws)
    seen = denom > 0
    np.testing.assert_allclose(out[seen], numer[seen] / denom[seen, None], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse[seen], np.log(denom[seen]), rtol=1e-12, atol=1e-12)
    assert np.all(out[~seen] == 0) and np.all(lse[~seen] == -np.inf)


@pytest.mark.parametrize("nq,nk", SHAPES)
def test_causal_with_exact_blocks_is_exact(nq, nk):
    # masked with a block covering every off-diagonal block's keys: each level is exact,
    # so the recursion must reproduce exact causal attention (tests splits and merges)
    q, k, v = _inputs(nq, nk, seed=1)
    cfg = HyperConfig(block=max(nq, nk), samples=3, min_seq_len=3)
    out, lse = hyper_attention(q, k, v, causal=True, config=cfg, rng=0, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], ref_lse[np.isfinite(ref_lse)], rtol=1e-12)


@pytest.mark.parametrize("nq,nk", SHAPES)
def test_causal_below_min_seq_len_is_exact(nq, nk):
    q, k, v = _inputs(nq, nk, seed=3)
    cfg = HyperConfig(block=2, samples=2, min_seq_len=max(nq, nk))
    np.testing.assert_allclose(hyper_attention(q, k, v, causal=True, config=cfg, rng=0),
                               exact_attention(q, k, v, causal=True), rtol=1e-14, atol=0)


@pytest.mark.parametrize("nq,nk,n_min", [(100, 100, 7), (99, 140, 10), (140, 99, 10), (31, 2, 3)])
def test_plan_covers_visible_entries_once(nq, nk, n_min):
    offdiag, leaves = causal_nodes(nq, nk, n_min)
    cover = np.zeros((nq, nk), int)
    for lf in leaves:
        rows = np.arange(lf.q0, lf.q1)[:, None]
        cols = np.arange(lf.k0, lf.k1)[None, :]
        # inside a leaf, the causal mask with the leaf's own alignment
        vis = cols - lf.k0 <= rows - lf.q0 + ((lf.k1 - lf.k0) - (lf.q1 - lf.q0))
        cover[lf.q0:lf.q1, lf.k0:lf.k1] += vis
    for n in offdiag:
        cover[n.q0:n.q1, n.k0:n.k1] += 1
    visible = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)
    assert np.array_equal(cover, visible.astype(int))
