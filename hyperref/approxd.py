"""ApproxD: estimating the row sums ``D`` of the attention matrix (SPEC §4, Algorithm 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mask import BlockStructure


@dataclass(frozen=True)
class ApproxDResult:
    """Output of :func:`approx_d`, all in natural-log units.

    Attributes
    ----------
    log_d : ndarray, shape (nq,)
        ``log d̃_i``.
    log_masked : ndarray, shape (nq,)
        ``log a_i``, the exact masked sums.
    log_residual_estimate : ndarray, shape (nq,)
        ``log ř_i`` (``-inf`` where no sampled key was outside the mask).
    log_tau : float
        ``log τ``, ``τ = max_{i∈T} r_i``.
    log_floor : float
        ``log(τ/κ)``, the floor of the residual estimate.
    kappa : float
        κ used: the configured one, or the estimate ``τ / min_{i∈T} r_i``.
    """

    log_d: np.ndarray
    log_masked: np.ndarray
    log_residual_estimate: np.ndarray
    log_tau: float
    log_floor: float
    kappa: float


def _logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=1, initial=-np.inf)
    shift = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return shift + np.log(np.exp(logits - shift[:, None]).sum(axis=1))


def masked_row_sums(q, k, scale, structure: BlockStructure) -> np.ndarray:
    """``log a_i`` with ``a_i = Σ_j M_ij A_ij`` (exact, cost ``O(nnz(M)·d)``)."""
    log_a = np.full(len(q), -np.inf, dtype=np.result_type(q.dtype, np.float64))  # longdouble stays
    for g in range(structure.n_blocks):
        rows = structure.block_queries(g)
        if len(rows) == 0:
            continue
        logits = scale * (q[rows] @ k[structure.block_keys(g)].T)
        log_a[rows] = _logsumexp_rows(logits)
    return log_a


def residual_row_sums(q, k, scale, structure: BlockStructure, rows: np.ndarray) -> np.ndarray:
    """``log r_i`` for ``i ∈ rows`` with ``r_i = Σ_j (1 − M_ij) A_ij`` (exact)."""
    logits = scale * (q[rows] @ k.T)
    logits[structure.q_block[rows][:, None] == structure.k_block[None, :]] = -np.inf
    return _logsumexp_rows(logits)


def approx_d(q, k, scale, structure: BlockStructure, rows, cols, kappa=None) -> ApproxDResult:
    """Estimate the row sums ``d_i`` of ``A = exp(scale · QKᵀ)`` (SPEC §4).

    .. math::
        \\tilde d_i = a_i + \\max\\Big(\\check r_i,\\ \\frac{\\tau}{\\kappa}\\Big),\\quad
        a_i = \\sum_j M_{ij} A_{ij},\\quad
        \\check r_i = \\frac{n_k}{m_d} \\sum_{t=1}^{m_d} (1 - M_{i\\ell_t}) A_{i\\ell_t},\\quad
        \\tau = \\max_{i \\in T} r_i

    Parameters
    ----------
    q, k : ndarray, shapes (nq, d), (nk, d)
    scale : float
    structure : BlockStructure
        The sortLSH mask.
    rows : ndarray of int64
        The row set ``T`` (draws).
    cols : ndarray of int64, shape (m_d,)
        The keys ``ℓ_t`` (draws).
    kappa : float or None
        Bound on κ; ``None`` uses the heuristic ``κ̂ = τ / min_{i∈T} r_i``, so
        the floor becomes ``min_{i∈T} r_i``.

    Returns
    -------
    ApproxDResult
    """
    nk = len(k)
    log_a = masked_row_sums(q, k, scale, structure)
    log_r_t = residual_row_sums(q, k, scale, structure, rows)
    log_tau = float(log_r_t.max())
    if not np.isfinite(log_tau):  # the mask holds every sampled row entirely
        log_floor, kappa_used = -np.inf, float(kappa) if kappa is not None else 1.0
    elif kappa is None:
        log_floor = float(log_r_t.min())
        kappa_used = float(np.exp(log_tau - log_floor))
    else:
        log_floor, kappa_used = log_tau - np.log(kappa), float(kappa)
    logits = scale * (q @ k[cols].T)
    logits[structure.q_block[:, None] == structure.k_block[cols][None, :]] = -np.inf
    log_rhat = _logsumexp_rows(logits) + np.log(nk / len(cols))
    log_d = np.logaddexp(log_a, np.maximum(log_rhat, log_floor))
    return ApproxDResult(log_d, log_a, log_rhat, log_tau, log_floor, kappa_used)
