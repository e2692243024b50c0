"""The direct mode: query blocks, a structured exact set and a sampled residual (SPEC §6b).

Rows in their original order are cut into query blocks of ``bq`` rows. For
block ``t`` (rows ``i``, aligned key positions ``c_i = i + nk − nq``):

* the exact set ``E_i`` (:mod:`hyperref.exact_set`), intersected with what row ``i`` sees;
* the residual ``R_i = {visible j} \\ E_i``, sampled from the block's support
  ``U_t = [s, h_t)`` with ``s`` the sink count and, causal,
  ``h_t = c_last − w + 1`` (``w`` the window width; keys past it are in every
  row's window or hidden from it), non-causal ``h_t = nk``;
* ``m`` i.i.d. keys ``j_1 … j_m`` from ``U_t`` with probabilities ``p`` restricted to
  ``U_t`` (:func:`support_probabilities`), drawn by the inverse CDF from the
  uniforms of the draws; a sampled term counts for row ``i`` only when ``j_t ∈ R_i``.

The estimator is a softmax with key weights ``W_ij``:

.. math::
    W_{ij} = [j \\in E_i] + [j \\in R_i] \\sum_t \\frac{[j_t = j]}{m\\, p_j},\\qquad
    \\tilde o_i = \\frac{\\sum_j W_{ij} A_{ij} v_j}{\\sum_j W_{ij} A_{ij}},\\qquad
    \\widetilde{\\mathrm{lse}}_i = \\log \\sum_j W_{ij} A_{ij}

Numerator and normalizer are unbiased for the residual sums of every row
(``E[W_ij] = 1`` on ``R_i``), so with a sampler that gives every key of
``U_t`` positive probability (``uniform``, ``mixed``) the ratio converges to
exact attention as ``m → ∞`` (SPEC §5, normalizer bias). No recursion, no merges.

This module is the readable definition: dense logits and membership over each
block's key prefix, ``O(nq·nk)`` a head. :mod:`hyperref.direct_numba` computes the
same function of (inputs, draws) with work in proportion to the keys attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import HyperConfig
from .exact_set import ExactSet, Geometry
from .merge import partial_softmax
from .sampling import resolve_samples, squared_row_norms


def paper_exact_set(config: HyperConfig) -> ExactSet:
    """The exact set a config uses: ``config.exact_set``, or the paper's sortLSH mask."""
    from .exact_set import sortlsh

    return config.exact_set if config.exact_set is not None else sortlsh(config.bits, config.block, 1)


def n_query_blocks(nq: int, bq: int) -> int:
    """``⌈nq / bq⌉``."""
    return -(-nq // bq)


def block_rows(t: int, nq: int, bq: int) -> np.ndarray:
    """Rows of query block ``t``: ``t·bq … min((t+1)·bq, nq) − 1``."""
    return np.arange(t * bq, min((t + 1) * bq, nq), dtype=np.int64)


def block_support(t: int, geom: Geometry, exact_set: ExactSet, bq: int) -> tuple[int, int]:
    """The sampling support ``U_t = [lo, hi)`` of query block ``t`` (SPEC §6b).

    Contains every residual key of the block's rows; empty (``hi <= lo``) when
    the exact set covers everything the block sees.

    Examples
    --------
    >>> from hyperref.exact_set import sinks, window
    >>> block_support(3, Geometry(1024, 1024, True), sinks(4) | window(128), 64)
    (4, 128)
    """
    lo = exact_set.sink_count
    if geom.causal:
        c_last = min((t + 1) * bq, geom.nq) - 1 + geom.offset
        hi = min(c_last + 1, c_last - exact_set.window_width + 1) if exact_set.window_width else c_last + 1
    else:
        hi = geom.nk
    hi = max(0, min(hi, geom.nk))
    return lo, max(lo, hi)


def support_probabilities(sq_norms: np.ndarray, lo: int, hi: int, sampler: str) -> np.ndarray:
    """Probabilities over the support ``[lo, hi)`` (float64, summing to 1).

    .. math::
        p^{\\mathrm{rownorm}}_j = \\frac{\\|v_j\\|^2}{\\sum_{l \\in U} \\|v_l\\|^2},\\quad
        p^{\\mathrm{uniform}}_j = \\frac{1}{|U|},\\quad
        p^{\\mathrm{mixed}} = \\tfrac12 p^{\\mathrm{rownorm}} + \\tfrac12 p^{\\mathrm{uniform}}

    ``rownorm`` falls back to uniform when every ``v_j`` of the support is 0.
    """
    size = hi - lo
    uniform = np.full(size, 1.0 / size)
    if sampler == "uniform":
        return uniform
    sq = sq_norms[lo:hi]
    total = sq.sum()
    rownorm = sq / total if total > 0 else uniform
    return rownorm if sampler == "rownorm" else 0.5 * rownorm + 0.5 * uniform


@dataclass(frozen=True)
class BlockSamples:
    """The sampled keys of one query block: distinct keys and their summed weights.

    ``keys`` are absolute positions; ``weight[k] = Σ_t [j_t = keys[k]] / (m p_{keys[k]})``.
    """

    keys: np.ndarray
    weight: np.ndarray


def sample_block(u: np.ndarray, sq_norms: np.ndarray, lo: int, hi: int, sampler: str) -> BlockSamples:
    """Resolve the block's uniforms ``u`` (shape ``(m,)``) into keys of ``[lo, hi)``."""
    if hi <= lo or len(u) == 0:
        return BlockSamples(np.zeros(0, np.int64), np.zeros(0))
    p = support_probabilities(sq_norms, lo, hi, sampler)
    idx = resolve_samples(u, p)
    keys, counts = np.unique(idx, return_counts=True)
    return BlockSamples(keys + lo, counts / (len(u) * p[keys]))


def block_weights(member: np.ndarray, visible: np.ndarray, samples: BlockSamples) -> np.ndarray:
    """The key weights ``W_ij`` of one block (rows × key prefix), SPEC §6b."""
    w = member.astype(np.float64)
    resid = visible & ~member
    cols = samples.keys[samples.keys < w.shape[1]]
    wt = samples.weight[:len(cols)]
    w[:, cols] += resid[:, cols] * wt[None, :]
    return w


def direct_heads(q, k, v, scale, config: HyperConfig, draws, causal: bool):
    """The direct mode on batched heads; returns ``(out, lse, keys)``.

    ``q`` is (B, H, nq, d), ``k, v`` (B, Hk, nk, ·) with ``Hk`` dividing ``H``;
    ``draws`` has batch shape ``(B, H)``. ``keys`` (B, H, nq) counts the keys
    with nonzero weight of every row: exact plus distinct sampled residual keys.
    """
    b, h, nq, _ = q.shape
    group = h // k.shape[1]
    out = np.zeros((b, h, nq, v.shape[3]), dtype=v.dtype)
    lse = np.full((b, h, nq), -np.inf, dtype=v.dtype)
    keys = np.zeros((b, h, nq), dtype=np.int64)
    for bi in range(b):
        for hi in range(h):
            counts = []
            out[bi, hi], lse[bi, hi] = direct_head(q[bi, hi], k[bi, hi // group], v[bi, hi // group],
                                                   scale, config, draws.head((bi, hi)).direct,
                                                   causal, counts=counts)
            keys[bi, hi] = counts[0]
    return out, lse, keys


def direct_head(q, k, v, scale, config: HyperConfig, draws, causal: bool, *, counts=None):
    """The direct mode of one head; returns ``(out, lse)``.

    Parameters
    ----------
    q, k, v : ndarray, shapes (nq, d), (nk, d), (nk, dv)
    scale : float
    config : HyperConfig
        ``mode="direct"``; its exact set, ``query_block``, ``samples``, ``sampler``.
    draws : hyperref.draws.DirectDraws
        This head's draws.
    causal : bool
    counts : list, optional
        If given, receives the number of keys with nonzero weight of every row
        (exact + distinct sampled residual keys), an ``(nq,)`` int array.

    Returns
    -------
    out : ndarray, shape (nq, dv)
    lse : ndarray, shape (nq,)
    """
    nq, nk, dv = len(q), len(k), v.shape[1]
    geom = Geometry(nq, nk, causal)
    exact_set, bq = paper_exact_set(config), config.query_block
    states = exact_set.prepare(q, k, scale, geom, draws.exact)
    sq_norms = squared_row_norms(v)
    out = np.zeros((nq, dv), dtype=v.dtype)
    lse = np.full(nq, -np.inf, dtype=v.dtype)
    used = np.zeros(nq, dtype=np.int64)
    for t in range(n_query_blocks(nq, bq)):
        rows = block_rows(t, nq, bq)
        nkeys = min(nk, rows[-1] + geom.offset + 1) if causal else nk
        if nkeys <= 0:
            continue  # these rows see no key: out 0, lse −inf
        lo, hi = block_support(t, geom, exact_set, bq)
        samples = sample_block(draws.sample_u[t], sq_norms, lo, hi, config.sampler)
        member = exact_set.member(states, q, k, scale, geom, rows, nkeys)
        w = block_weights(member, geom.visible(rows, nkeys), samples)
        with np.errstate(divide="ignore"):
            logits = (q[rows] @ k[:nkeys].T) * q.dtype.type(scale) + np.log(w).astype(q.dtype)
        out[rows], lse[rows] = partial_softmax(logits, v[:nkeys])
        used[rows] = (w > 0).sum(axis=1)
    if counts is not None:
        counts.append(used)
    return out, lse
