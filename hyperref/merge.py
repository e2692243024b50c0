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


def merge_partials(o1, l1, o2, l2):
    """Merge partials over disjoint key sets.

    .. math:: l = \\log(e^{l_1} + e^{l_2}),\\quad o = e^{l_1 - l} o_1 + e^{l_2 - l} o_2

    Equivalent to adding un-normalized sums and normalizers
    (``approxd``: ``D̃ = D̃_1 + D̃_2``). Rows empty in both stay ``(0, −∞)``.
    """
    zero = np.zeros(np.shape(l1), dtype=np.result_type(l1, l2))
    o, lse, _ = merge_shifted(o1, l1, zero, o2, l2, zero)
    return o, lse


def merge_shifted(o1, l1, s1, o2, l2, s2):
    """Merge partials whose answers are ``o_p e^{s_p}`` (``approxd``: ``s_p = lse_p − log d̃_p``).

    A partial ``(o, l, s)`` stands for the numerator ``N = o e^{l + s}`` and the normalizer
    ``D = e^l``, with ``o`` a convex combination of values. The merge adds both:

    .. math::
        l = \\log(e^{l_1} + e^{l_2}),\\quad
        s = \\log(e^{l_1 + s_1} + e^{l_2 + s_2}) - l,\\quad
        o = \\frac{e^{l_1 + s_1} o_1 + e^{l_2 + s_2} o_2}{e^{l_1 + s_1} + e^{l_2 + s_2}}

    with the weights taken relative to the larger exponent, so that they sum to 1 also where
    ``l`` is too large for its dtype to hold ``log 2`` (float32 at 6e6), and nothing overflows
    before the answer ``o e^s`` is formed. Rows empty in both stay ``(0, −∞, 0)``.
    """
    lse = np.logaddexp(l1, l2)
    with np.errstate(invalid="ignore"):
        a1, a2 = l1 + s1, l2 + s2
        peak = np.maximum(a1, a2)
        finite = np.isfinite(peak)
        safe = np.where(finite, peak, 0.0)
        w1 = np.where(finite, np.exp(a1 - safe), 0.0)
        w2 = np.where(finite, np.exp(a2 - safe), 0.0)
        total = np.where(finite, w1 + w2, 1.0)
        shift = np.where(finite & np.isfinite(lse), safe + np.log(total) - lse, 0.0).astype(lse.dtype)
    o = (w1 / total)[..., None] * o1 + (w2 / total)[..., None] * o2
    return o.astype(np.result_type(o1, o2), copy=False), lse, shift
