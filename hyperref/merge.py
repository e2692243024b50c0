"""Partial softmax results over key sets and their merge (SPEC §1).

A *partial* over a key set ``J`` (with additive logit bias) is the pair
``(o, l)``: ``l_i = log Σ_{j∈J} exp(L_ij)`` and
``o_i = Σ_{j∈J} exp(L_ij − l_i) v_j``. Rows with an empty set have
``l_i = −∞`` and ``o_i = 0``.
"""

from __future__ import annotations

import numpy as np


def partial_softmax(logits: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Partial ``(o, l)`` of rows of ``logits`` (``-inf`` marks excluded keys).

    Parameters
    ----------
    logits : ndarray, shape (rows, keys)
    values : ndarray, shape (keys, dv)

    Returns
    -------
    o : ndarray, shape (rows, dv)
    lse : ndarray, shape (rows,)
    """
    peak = logits.max(axis=1, initial=-np.inf)
    finite = np.isfinite(peak)
    shift = np.where(finite, peak, 0.0)
    weights = np.exp(logits - shift[:, None])
    total = weights.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(finite, shift + np.log(total), -np.inf)
        # normalize before the product: the weights are <= 1, so a finite answer stays finite
        # (values near the dtype's maximum overflowed when the sum was divided afterwards)
        o = (weights / np.where(finite, total, 1.0)[:, None]) @ values.astype(weights.dtype, copy=False)
    with np.errstate(over="ignore"):  # an lse beyond the dtype's range is +inf, honestly
        return o.astype(values.dtype, copy=False), lse.astype(values.dtype, copy=False)


def merge_partials(o1, l1, o2, l2, shift2=None):
    """Merge partials over disjoint key sets.

    .. math:: l = \\log(e^{l_1} + e^{l_2}),\\quad o = e^{l_1 - l} o_1 + e^{l_2 - l} o_2

    Equivalent to adding un-normalized sums and normalizers
    (``approxd``: ``D̃ = D̃_1 + D̃_2``). Rows empty in both stay ``(0, −∞)``. ``shift2``
    (per row): the second partial's answer is ``o_2 e^{shift2}`` (``approxd``,
    :func:`hyperref.estimators.noncausal_partial`); its weight is then ``e^{l_2 + shift2 − l}``.
    """
    lse = np.logaddexp(l1, l2)
    # weights relative to the larger partial, then normalized: they sum to 1 also where lse is
    # too large for its dtype to hold log 2 (float32 lse of 6e6 is rounded to a multiple of 0.5,
    # and exp(l − lse) would then sum to up to e^0.25 + e^0.25)
    peak = np.maximum(l1, l2)
    finite = np.isfinite(peak)
    safe = np.where(finite, peak, 0.0)
    with np.errstate(invalid="ignore"):
        w1 = np.where(finite, np.exp(l1 - safe), 0.0)
        w2 = np.where(finite, np.exp(l2 - safe), 0.0)
    total = np.where(finite, w1 + w2, 1.0)
    if shift2 is not None:  # e^{l2 + shift2 − peak}: the exponents combined before exp
        with np.errstate(over="ignore", invalid="ignore"):
            w2 = np.where(finite, np.exp(l2 + shift2 - safe), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # an answer beyond the range is inf
        second = np.where(o2 == 0, 0.0, (w2 / total)[..., None] * o2)  # a zero stays 0 (0·inf)
        return (w1 / total)[..., None] * o1 + second.astype(o2.dtype, copy=False), lse
