"""Key sampling distributions of the output estimator (SPEC §5, Algorithm 3)."""

from __future__ import annotations

import numpy as np


def sampling_probabilities(v: np.ndarray, sampler: str) -> np.ndarray:
    """Probabilities ``p_j`` of sampling key ``j`` (float64).

    .. math::
        p^{\\mathrm{rownorm}}_j = \\frac{\\|v_j\\|^2}{\\|V\\|_F^2},\\qquad
        p^{\\mathrm{uniform}}_j = \\frac{1}{n_k},\\qquad
        p^{\\mathrm{mixed}} = \\tfrac12 p^{\\mathrm{rownorm}} + \\tfrac12 p^{\\mathrm{uniform}}

    ``rownorm`` falls back to uniform when ``V = 0``.

    Parameters
    ----------
    v : ndarray, shape (nk, dv)
    sampler : {"rownorm", "uniform", "mixed"}

    Returns
    -------
    ndarray of float64, shape (nk,), summing to 1
    """
    nk = len(v)
    uniform = np.full(nk, 1.0 / nk)
    if sampler == "uniform":
        return uniform
    sq = squared_row_norms(v)
    total = sq.sum()
    rownorm = sq / total if total > 0 else uniform
    if sampler == "rownorm":
        return rownorm
    if sampler == "mixed":
        return 0.5 * rownorm + 0.5 * uniform
    raise ValueError(f"unknown sampler {sampler!r}")


def squared_row_norms(v: np.ndarray) -> np.ndarray:
    """``‖v_j‖² / c²`` in float64 with ``c = max |v|`` (probabilities are ratios of these; the
    scale keeps them finite when ``‖v_j‖²`` itself would overflow)."""
    v = v.astype(np.float64)
    peak = float(np.abs(v).max(initial=0.0))
    if peak > 0:
        v = v / peak
    return np.einsum("ij,ij->i", v, v)


def resolve_samples(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sample indices ``j_t`` from uniforms ``u_t`` by the inverse CDF of ``p``.

    Keys with ``p_j = 0`` are never selected (also at rounding edges).

    Parameters
    ----------
    u : ndarray, shape (m,), values in ``[0, 1)``
    p : ndarray, shape (nk,)

    Returns
    -------
    ndarray of int64, shape (m,)

    Examples
    --------
    >>> resolve_samples(np.array([0.1, 0.6]), np.array([0.5, 0.0, 0.5])).tolist()
    [0, 2]
    """
    cdf = np.cumsum(p)
    idx = np.searchsorted(cdf, u * cdf[-1], side="right")
    last = int(np.flatnonzero(p > 0)[-1])
    return np.minimum(idx, last).astype(np.int64)


def sample_keys(u: np.ndarray, v: np.ndarray, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """Sampled keys and their log importance weights ``log(1 / (m p_j))``.

    Returns
    -------
    idx : ndarray of int64, shape (m,)
    log_w : ndarray of float64, shape (m,)
    """
    p = sampling_probabilities(v, sampler)
    idx = resolve_samples(u, p)
    return idx, -np.log(len(u) * p[idx])
