"""Non-causal HyperAttention of one head: Algorithms 1–3 (SPEC §3–§5).

The estimators are written as partial softmaxes (:mod:`hyperref.merge`) over
weighted key sets: an importance weight ``w_j = 1/(m p_j)`` enters as the
additive logit bias ``log w_j``. Then

* ``masked``: keys = the query's block (bias 0) ∪ the samples outside it;
* ``paper``: keys = all samples;

and the normalizer is either the partial's own ``lse`` (``self``) or
``log d̃`` from ApproxD (``approxd``), in which case the output is
``o · exp(lse − log d̃)``.
"""

from __future__ import annotations

import numpy as np

from .approxd import approx_d
from .config import HyperConfig
from .draws import BlockDraws
from .exact import row_chunk
from .mask import BlockStructure, block_structure
from .merge import partial_softmax
from .sampling import sample_keys


def masked_partial(q, k, v, scale, structure: BlockStructure, idx, log_w):
    """Partial of the ``masked`` estimator (SPEC §5).

    .. math::
        N_i = \\sum_j M_{ij} A_{ij} v_j
            + \\sum_{t} (1 - M_{i j_t}) \\frac{A_{i j_t}}{m\\, p_{j_t}} v_{j_t}

    returned as ``(o, lse)`` with ``o_i = N_i / Z_i`` and ``lse_i = log Z_i``,
    ``Z_i`` the same sum with ``v`` replaced by 1.
    """
    nq, dv = len(q), v.shape[1]
    out = np.zeros((nq, dv), dtype=v.dtype)
    lse = np.full(nq, -np.inf, dtype=v.dtype)
    k_samp, v_samp = k[idx], v[idx]
    samp_block = structure.k_block[idx]
    bias = log_w.astype(q.dtype)
    for g in range(structure.n_blocks):
        rows = structure.block_queries(g)
        if len(rows) == 0:
            continue
        keys = structure.block_keys(g)
        block_logits = scale * (q[rows] @ k[keys].T)
        samp_logits = scale * (q[rows] @ k_samp.T) + bias
        samp_logits[:, samp_block == g] = -np.inf
        out[rows], lse[rows] = partial_softmax(
            np.concatenate([block_logits, samp_logits], axis=1),
            np.concatenate([v[keys], v_samp], axis=0),
        )
    return out, lse


def paper_partial(q, k, v, scale, idx, log_w):
    """Partial of the ``paper`` estimator (SPEC §5): ``Ãtt = D̃⁻¹ A SᵀS V``.

    .. math:: N_i = \\sum_t \\frac{A_{i j_t}}{m\\, p_{j_t}} v_{j_t}
    """
    nq, dv = len(q), v.shape[1]
    out = np.zeros((nq, dv), dtype=v.dtype)
    lse = np.full(nq, -np.inf, dtype=v.dtype)
    k_samp, v_samp = k[idx], v[idx]
    bias = log_w.astype(q.dtype)
    chunk = row_chunk(len(idx), q.dtype.itemsize)
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        out[start:stop], lse[start:stop] = partial_softmax(
            scale * (q[start:stop] @ k_samp.T) + bias, v_samp)
    return out, lse


#: the output estimators of SPEC §5 by name: ``(q, k, v, scale, structure, idx, log_w) -> (o, lse)``
ESTIMATORS = {
    "masked": masked_partial,
    "paper": lambda q, k, v, scale, structure, idx, log_w: paper_partial(q, k, v, scale, idx, log_w),
}


def noncausal_partial(q, k, v, scale, config: HyperConfig, draws: BlockDraws,
                      structure: BlockStructure | None = None):
    """Non-causal HyperAttention of one head as ``(o, lse, shift)``: the answer is ``o · e^shift``.

    ``o`` and ``lse`` are the self-normalized estimator's (a convex combination of values and
    its log-normalizer). With the ``self`` normalizer ``shift = 0``; with ``approxd``, ``lse``
    becomes ``log d̃`` and ``shift = lse_self − log d̃``, kept apart so that a merge (the causal
    recursion) can combine exponents before exponentiating: ``e^shift`` may overflow where the
    merged answer does not.
    """
    if structure is None:
        structure = block_structure(q, k, draws.lsh_planes, config.block)
    idx, log_w = sample_keys(draws.sample_u, v, config.sampler)
    out, lse = ESTIMATORS[config.estimator](q, k, v, scale, structure, idx, log_w)
    shift = np.zeros(len(q), dtype=lse.dtype)
    if config.normalizer == "approxd":
        log_d = approx_d(q, k, scale, structure, draws.approxd_rows,
                         draws.approxd_cols, config.kappa).log_d.astype(v.dtype)
        with np.errstate(invalid="ignore"):
            shift = np.where(np.isfinite(lse), lse - log_d, 0.0).astype(lse.dtype)
        lse = log_d
    return out, lse, shift


def noncausal_head(q, k, v, scale, config: HyperConfig, draws: BlockDraws,
                   structure: BlockStructure | None = None):
    """Non-causal HyperAttention of one head; returns ``(out, lse)``.

    Parameters
    ----------
    q, k, v : ndarray, shapes (nq, d), (nk, d), (nk, dv); ``nk >= 1``
    scale : float
    config : HyperConfig
    draws : BlockDraws
        Draws of this head and block (:func:`hyperref.draws.make_draws`).
    structure : BlockStructure, optional
        Precomputed sortLSH structure of these draws.

    Returns
    -------
    out : ndarray, shape (nq, dv)
        ``D̃⁻¹ N``.
    lse : ndarray, shape (nq,)
        ``log d̃`` of the normalizer used.
    """
    out, lse, shift = noncausal_partial(q, k, v, scale, config, draws, structure)
    if config.normalizer == "approxd":
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = out * np.exp(shift)[:, None].astype(v.dtype)
        out = np.where(out == 0, out, scaled)  # a zero numerator stays 0 when e^shift overflows
    return out, lse
