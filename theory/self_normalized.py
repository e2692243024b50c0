"""G7: the self-normalized estimator's error, row by row (SPEC §7), for the direct mode.

For row ``i`` with exact set ``E_i``, residual ``R_i``, estimated residual
entries ``Â_ij = W_ij A_ij`` (SPEC §6b) and ``d̃_i = Σ_{E_i} A_ij + Σ_{R_i} Â_ij``,

.. math::
    \\tilde o_i - o_i = \\frac{1}{\\tilde d_i} \\sum_{j \\in R_i} (\\hat A_{ij} - A_{ij})(v_j - o_i)
                     = \\frac{d_i}{\\tilde d_i}\\, e_i,\\qquad
    e_i = \\sum_{j \\in R_i} (W_{ij} - 1) P_{ij} (v_j - o_i),

the product error of G2/G3 on **row-centred values**. Since ``Â ≥ 0``,
``d̃_i ≥ h_i d_i`` with ``h_i`` the mass of ``E_i`` (deterministically), so
``‖õ_i − o_i‖ ≤ ‖e_i‖ / h_i``. For ``m`` i.i.d. samples from the block's support with
probabilities ``p``, ``E‖e_i‖² = s_i / m`` with the one-sample second moment

.. math:: s_i = \\sum_{j \\in R_i} \\frac{P_{ij}^2 \\|v_j - o_i\\|^2}{p_j}
               - \\Big\\|\\sum_{j \\in R_i} P_{ij}(v_j - o_i)\\Big\\|^2 .

Both ``õ_i`` and ``o_i`` are convex combinations of the values row ``i`` sees, so also
``‖õ_i − o_i‖ ≤ D_i = max_{j visible} ‖v_j − o_i‖`` (where ``h_i = 0`` and no sample lands
in ``R_i``, ``õ_i = 0``: there ``D_i ≥ ‖o_i‖`` as well). With ``E min(X, c) ≤ min(E X, c)``,
Markov's inequality on ``Σ_i ‖õ_i − o_i‖² ≥ ‖Õ − O‖_op²`` gives, with probability ``≥ 1 − δ``,

.. math:: \\|\\tilde O - O\\|_{op} \\le
          \\sqrt{\\frac{1}{\\delta} \\sum_i \\min\\Big(\\frac{s_i}{m\\, h_i^2},\\; D_i^2\\Big)}
          \\qquad \\text{(G7)}.

No normalizer error ``η`` appears: where G4 charges ``max_i |d_i/d̃_i − 1|``
additively, G7 uses only that the output is a convex combination whose weights
on ``E_i`` are exact. :func:`direct_moments` computes ``h_i``, ``s_i`` and the G4
ingredients exactly (``O(nq·nk)``, row blocks), :func:`hyperref.theory.bounds.g7_bound`
evaluates the bound.

The tail form (:func:`hyperref.theory.bounds.g7_tail_bound`) replaces the worst case
``d̃_i ≥ h_i d_i`` by Bernstein's lower tail of the normalizer, which needs
``u_i = Σ_{R_i} P_ij²/p_j`` (``second_mass``), and Markov's inequality over the rows by
Bernstein's inequality over the independent query blocks (docs/mathematics.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hyperref.direct import block_rows, block_support, n_query_blocks, paper_exact_set, support_probabilities
from hyperref.exact_set import Geometry


@dataclass(frozen=True)
class DirectMoments:
    """Per-row terms of G7 (and G3/G4) for one head in the direct mode.

    Attributes
    ----------
    captured : ndarray (nq,)
        ``h_i = Σ_{j∈E_i} P_ij``.
    second_centred : ndarray (nq,)
        ``s_i`` of G7 (one-sample second moment of the centred product error).
    second_raw : ndarray (nq,)
        The same with ``v_j`` in place of ``v_j − o_i`` (the G3 product of the
        numerator with exact ``D``).
    exact : ndarray (nq, dv)
        Exact attention ``o``.
    spread : ndarray (nq,)
        The cap ``D_i² ≥ ‖õ_i − o_i‖²`` that holds for every draw:
        ``max_{j visible} ‖v_j − o_i‖²`` (both rows are convex combinations of the
        visible values), and at least ``‖o_i‖²`` where ``h_i = 0`` (with no sample in
        ``R_i`` the normalizer is 0 and ``õ_i = 0``); 0 for rows that see no key.
    second_mass : ndarray (nq,)
        ``u_i = Σ_{j∈R_i} P_ij² / p_j``, the one-sample second moment of the
        residual normalizer ``Σ_{R_i} W_ij P_ij`` (``inf`` where a residual key of
        positive ``P_ij`` is never sampled); it bounds the normalizer's lower tail
        in the Bernstein form of G7 (:func:`hyperref.theory.bounds.g7_tail_bound`).
    """

    captured: np.ndarray
    second_centred: np.ndarray
    second_raw: np.ndarray
    exact: np.ndarray
    spread: np.ndarray
    second_mass: np.ndarray | None = None


def _second_moment(p_rows, v, prob, centre=None):
    """Rows of ``Σ_j P_ij² ‖v_j − c_i‖² / p_j − ‖Σ_j P_ij (v_j − c_i)‖²`` (``c = 0`` if not given).

    ``inf`` where a key of positive ``P_ij`` and ``v_j ≠ c_i`` has ``p_j = 0`` (it is
    never sampled, and its term is missing from the estimate); a never-sampled key with
    ``v_j = c_i`` contributes nothing, to the estimate or to its mean.
    """
    ratio = np.divide(p_rows**2, prob[None, :], out=np.zeros_like(p_rows), where=prob[None, :] > 0)
    sq = (v**2).sum(axis=1)
    first = ratio @ sq
    mean = p_rows @ v
    never = (p_rows > 0) & (prob[None, :] <= 0)
    if centre is not None:
        first += -2 * ((ratio @ v) * centre).sum(axis=1) + ratio.sum(axis=1) * (centre**2).sum(axis=1)
        mean -= p_rows.sum(axis=1, keepdims=True) * centre
        dist = sq[None, :] - 2 * centre @ v.T + (centre**2).sum(axis=1)[:, None]
        unreachable = (never & (dist > 0)).any(axis=1)
    else:
        unreachable = (never & (sq[None, :] > 0)).any(axis=1)
    return np.where(unreachable, np.inf, np.maximum(first - (mean**2).sum(axis=1), 0.0))


def _mass_moment(p_rows, prob):
    """Rows of ``Σ_j P_ij² / p_j`` (``inf`` where a key of positive ``P_ij`` has ``p_j = 0``)."""
    ratio = np.divide(p_rows**2, prob[None, :], out=np.zeros_like(p_rows), where=prob[None, :] > 0)
    unreachable = ((p_rows > 0) & (prob[None, :] <= 0)).any(axis=1)
    return np.where(unreachable, np.inf, ratio.sum(axis=1))


def direct_moments(q, k, v, scale, config, draws, causal: bool) -> DirectMoments:
    """G7's ``h_i`` and ``s_i`` for one head and its direct-mode draws (``DirectDraws``).

    ``p`` is each block's sampling distribution on its support
    (:func:`hyperref.direct.support_probabilities`); residual keys outside the
    support have probability 0 and make ``s_i`` infinite (they never occur: the
    support holds every residual key, :func:`hyperref.direct.block_support`).
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    nq, nk = len(q), len(k)
    geom = Geometry(nq, nk, causal)
    exact_set, bq = paper_exact_set(config), config.query_block
    states = exact_set.prepare(q, k, scale, geom, draws.exact)
    sq_norms = (v**2).sum(axis=1)
    captured = np.zeros(nq)
    s_centred = np.zeros(nq)
    s_raw = np.zeros(nq)
    exact = np.zeros((nq, v.shape[1]))
    spread = np.zeros(nq)
    s_mass = np.zeros(nq)
    for t in range(n_query_blocks(nq, bq)):
        rows = block_rows(t, nq, bq)
        nkeys = min(nk, rows[-1] + geom.offset + 1) if causal else nk
        if nkeys <= 0:
            continue
        visible = geom.visible(rows, nkeys)
        logits = np.where(visible, q[rows] @ k[:nkeys].T * scale, -np.inf)
        peak = logits.max(axis=1, keepdims=True)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        a = np.exp(logits - peak)
        P = a / np.maximum(a.sum(axis=1, keepdims=True), np.finfo(float).tiny)
        o = P @ v[:nkeys]
        member = exact_set.member(states, q, k, scale, geom, rows, nkeys)
        resid = visible & ~member
        lo, hi = block_support(t, geom, exact_set, bq)
        prob = np.zeros(nkeys)  # no samples: every residual key is unreachable (s_i = inf)
        if hi > lo and config.samples:
            prob[lo:hi] = support_probabilities(sq_norms, lo, hi, config.sampler)
        pr = np.where(resid, P, 0.0)
        captured[rows] = np.where(member, P, 0.0).sum(axis=1)
        s_raw[rows] = _second_moment(pr, v[:nkeys], prob)
        s_centred[rows] = _second_moment(pr, v[:nkeys], prob, centre=o)
        s_mass[rows] = _mass_moment(pr, prob)
        exact[rows] = o
        dist = sq_norms[None, :nkeys] - 2 * o @ v[:nkeys].T + (o**2).sum(axis=1)[:, None]
        spread[rows] = np.where(visible, np.maximum(dist, 0.0), 0.0).max(axis=1)
        # a row with no exact key has d̃_i = 0 when no sample lands in R_i, and then õ_i = 0
        none = captured[rows] == 0
        spread[rows[none]] = np.maximum(spread[rows[none]], (o[none] ** 2).sum(axis=1))
    return DirectMoments(captured, s_centred, s_raw, exact, spread, s_mass)
