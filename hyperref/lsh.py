"""Hamming-sorted angular LSH (SPEC §3, the hashing of Algorithm 1)."""

from __future__ import annotations

import numpy as np


def gray(t):
    """Binary-reflected Gray code ``gray(t) = t XOR (t >> 1)``.

    Examples
    --------
    >>> [int(gray(t)) for t in range(4)]
    [0, 1, 3, 2]
    """
    t = np.asarray(t, dtype=np.int64)
    return t ^ (t >> 1)


def gray_inverse(c):
    """Inverse of :func:`gray`: the rank of code ``c`` in Gray order.

    .. math:: t = c \\oplus (c \\gg 1) \\oplus (c \\gg 2) \\oplus \\cdots

    Examples
    --------
    >>> [int(gray_inverse(gray(t))) for t in range(8)]
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    t = np.array(c, dtype=np.int64, copy=True)
    shift = 1
    while shift < 64:
        t ^= t >> shift
        shift *= 2
    return t


def sign_codes(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Integer codes ``c(x) = Σ_k [x·W_k > 0] 2^k`` of the rows of ``x``.

    Parameters
    ----------
    x : ndarray, shape (n, d)
    planes : ndarray, shape (d, r)

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    bits = (x @ planes.astype(x.dtype, copy=False)) > 0
    weights = np.left_shift(np.int64(1), np.arange(planes.shape[1], dtype=np.int64))
    return bits.astype(np.int64) @ weights


def buckets(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Bucket ``h(x) = gray⁻¹(c(x))`` in ``[0, 2^r)``.

    Consecutive buckets (cyclically) have codes that differ in exactly one
    bit, so sorting by ``h`` puts near-identical sign patterns next to each
    other. The public implementations sort by ``gray(c)`` instead, which
    does not have this property (SPEC §3).

    .. math:: h(x) = \\mathrm{gray}^{-1}\\Big(\\sum_k [x^\\top W_k > 0]\\,2^k\\Big)

    Examples
    --------
    >>> planes = np.eye(2)
    >>> buckets(np.array([[1.0, 1.0], [-1.0, 1.0]]), planes).tolist()
    [2, 3]
    """
    return gray_inverse(sign_codes(x, planes))
