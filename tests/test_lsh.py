import numpy as np
import pytest

from hyperref.lsh import buckets, gray, gray_inverse

from .dense import brute_buckets


def popcount(x):
    return bin(int(x)).count("1")


@pytest.mark.parametrize("r", range(1, 11))
def test_consecutive_buckets_differ_in_one_bit(r):
    # bucket h holds code gray(h); cyclic neighbours differ in exactly one bit
    codes = gray(np.arange(2**r))
    for h in range(2**r):
        nxt = codes[(h + 1) % 2**r]
        assert popcount(codes[h] ^ nxt) == 1


@pytest.mark.parametrize("r", range(1, 11))
def test_gray_inverse_is_inverse(r):
    t = np.arange(2**r)
    assert np.array_equal(gray_inverse(gray(t)), t)
    assert np.array_equal(gray(gray_inverse(t)), t)
    assert sorted(gray_inverse(t).tolist()) == t.tolist()  # a permutation of the buckets


def test_public_implementations_order_is_wrong():
    # SPEC §3: sorting by gray(c) leaves 31 of the 127 adjacent pairs >= 2 bits apart (r = 7)
    r = 7
    codes_by_wrong_rank = np.argsort(gray(np.arange(2**r)))  # code at each rank
    bad = sum(popcount(codes_by_wrong_rank[i] ^ codes_by_wrong_rank[i + 1]) >= 2
              for i in range(2**r - 1))
    assert bad == 31
    right = gray(np.arange(2**r))
    assert all(popcount(right[i] ^ right[i + 1]) == 1 for i in range(2**r - 1))


def test_buckets_match_brute_force():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 12))
    planes = rng.standard_normal((12, 7))
    assert np.array_equal(buckets(x, planes), brute_buckets(x, planes))


def test_buckets_float32_matches_sign_pattern():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    planes = rng.standard_normal((8, 5))
    assert np.array_equal(buckets(x, planes), brute_buckets(x.astype(np.float64),
                                                           planes.astype(np.float32).astype(np.float64)))
