import numpy as np
import pytest

from hyperref.mask import HeavyMask, block_structure, dense_mask

from .dense import brute_mask


@pytest.mark.parametrize("nq,nk,block", [(64, 64, 8), (50, 70, 16), (97, 33, 10), (10, 100, 7),
                                          (5, 5, 8), (1, 9, 3)])
def test_mask_equals_definition(nq, nk, block):
    rng = np.random.default_rng(nq * 1000 + nk)
    q, k = rng.standard_normal((nq, 6)), rng.standard_normal((nk, 6))
    planes = rng.standard_normal((6, 4))
    st = block_structure(q, k, planes, block)
    assert np.array_equal(dense_mask(st).astype(float), brute_mask(q, k, planes, block))
    # every query and key is in exactly one block; blocks cover everything once
    assert sorted(st.perm_q.tolist()) == list(range(nq))
    assert sorted(np.concatenate([st.block_keys(g) for g in range(st.n_blocks)]).tolist()) == list(range(nk))
    assert sorted(np.concatenate([st.block_queries(g) for g in range(st.n_blocks)]).tolist()) == list(range(nq))
    assert st.n_blocks == -(-nk // block)


def test_mask_nnz_about_n_times_b():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 512, 8))
    st = block_structure(q, k, rng.standard_normal((8, 7)), 32)
    assert dense_mask(st).sum() == 512 * 32  # nq == nk, b divides n: exactly nq·b


def test_heavy_mask_rows_match_dense():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((40, 5)), rng.standard_normal((30, 5))
    st = block_structure(q, k, rng.standard_normal((5, 3)), 7)
    hm = HeavyMask.noncausal(st)
    assert np.array_equal(np.vstack([hm.rows(0, 13), hm.rows(13, 40)]), dense_mask(st))
    assert hm.nnz() == dense_mask(st).sum()
