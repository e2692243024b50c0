import numpy as np
import pytest

from hyperref import exact_attention
from hyperref.exact import exact_head


def _dense(q, k, v, scale, causal):
    s = scale * q @ k.T
    if causal:
        nq, nk = s.shape
        s = np.where(np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s.max(1, keepdims=True)
        a = np.exp(s - m)
        return a @ v / a.sum(1, keepdims=True), (m[:, 0] + np.log(a.sum(1)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(50, 50), (30, 70), (70, 30), (1, 1), (5, 1)])
def test_exact_matches_dense(causal, nq, nk):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((nq, 8)), rng.standard_normal((nk, 8)), rng.standard_normal((nk, 3))
    out, lse = exact_attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = _dense(q, k, v, 8**-0.5, causal)
    seen = np.isfinite(ref_lse)
    np.testing.assert_allclose(out[seen], ref[seen], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse[seen], ref_lse[seen], rtol=1e-13)
    assert np.all(out[~seen] == 0) and np.all(np.isneginf(lse[~seen]))


def test_exact_row_blocks_do_not_change_result():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 300, 16))
    full = exact_head(q, k, v, 0.25, causal=True)
    tiny = exact_head(q, k, v, 0.25, causal=True, max_block_bytes=1)
    np.testing.assert_allclose(full[0], tiny[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(full[1], tiny[1], rtol=1e-14)


def test_causal_square_equals_torch_convention_lower_triangle():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 6, 4))
    out = exact_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[0], v[0], rtol=1e-15)  # row 0 sees only key 0


def test_large_logits_are_stable():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 64, 8))
    out, lse = exact_attention(400 * q, k, v, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    ref, ref_lse = _dense(400 * q, k, v, 8**-0.5, False)  # max-shifted dense evaluation
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13)
    assert lse.max() > 709  # exp would overflow without the shift


def test_float32_stays_float32():
    q = np.ones((4, 2), np.float32)
    out, lse = exact_attention(q, q, q, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
