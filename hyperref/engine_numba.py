"""The Numba engine: the same computation as the NumPy reference, heads stacked.

Drivers mirror :mod:`hyperref.estimators` (non-causal) and
:mod:`hyperref.causal` (recursion) step by step; hashing and sorting stay in
NumPy (``O(n log n)``), the arithmetic runs in :mod:`hyperref.numba_kernels`.
Same draws ⇒ same answer as the reference up to floating-point rounding.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from . import numba_kernels as nk_
from .config import HyperConfig
from .draws import BlockDraws, Draws
from .mask import block_structure
from .plan import causal_nodes
from .sampling import sample_keys


def _stacked(draws: BlockDraws, n_heads: int) -> BlockDraws:
    """Draws with the batch shape flattened to ``(n_heads,)``."""
    return BlockDraws(
        draws.lsh_planes.reshape((n_heads,) + draws.lsh_planes.shape[-2:]),
        draws.approxd_rows.reshape(n_heads, -1),
        draws.approxd_cols.reshape(n_heads, -1),
        draws.sample_u.reshape(n_heads, -1),
        draws.nq, draws.nk,
    )


def noncausal_partial_heads(q, k, v, kv_of, scale, config: HyperConfig, draws: BlockDraws):
    """Non-causal HyperAttention of stacked heads as ``(o, lse, shift)``: the answer is ``o · e^shift``.

    The stacked-head twin of :func:`hyperref.estimators.noncausal_partial`: ``o`` is the
    self-normalized estimator's convex combination of values; with ``approxd``, ``lse``
    becomes ``log d̃`` and ``shift = lse_self − log d̃`` (else 0), kept apart so that the
    causal merge combines exponents before ``e^shift``, which may overflow, is formed.

    Parameters
    ----------
    q : ndarray (H, nq, d); k, v : ndarray (Hk, nk, d), (Hk, nk, dv), C-contiguous
    kv_of : ndarray of int64 (H,)
        Key/value head of each query head.
    draws : BlockDraws
        With batch shape flattened to ``(H,)``.

    Returns
    -------
    out : ndarray (H, nq, dv); lse, shift : ndarray (H, nq)
    """
    n_heads, nq, _ = q.shape
    dv = v.shape[2]
    structures = [block_structure(q[h], k[kv_of[h]], draws.lsh_planes[h], config.block)
                  for h in range(n_heads)]
    perm_q = np.stack([s.perm_q for s in structures])
    perm_k = np.stack([s.perm_k for s in structures])
    q_starts = np.stack([s.q_starts for s in structures])
    q_block = np.stack([s.q_block for s in structures])
    k_block = np.stack([s.k_block for s in structures])
    samples = [sample_keys(draws.sample_u[h], v[kv_of[h]], config.sampler) for h in range(n_heads)]
    idx = np.stack([s[0] for s in samples])
    log_w = np.stack([s[1] for s in samples]).astype(q.dtype)
    out = np.zeros((n_heads, nq, dv), dtype=v.dtype)
    lse = np.full((n_heads, nq), -np.inf, dtype=v.dtype)
    s = q.dtype.type(scale)
    kernels = {  # the estimators of SPEC §5 (hyperref.estimators.ESTIMATORS)
        "masked": lambda: nk_.masked_partial(q, k, v, kv_of, s, perm_q, q_starts, perm_k,
                                             config.block, k_block, idx, log_w, out, lse),
        "paper": lambda: nk_.paper_partial(q, k, v, kv_of, s, idx, log_w, out, lse),
    }
    kernels[config.estimator]()
    shift = np.zeros((n_heads, nq), dtype=lse.dtype)
    if config.normalizer == "approxd":
        log_d = _approx_d(q, k, kv_of, scale, config, draws, perm_q, q_starts, perm_k,
                          q_block, k_block).astype(v.dtype)
        with np.errstate(invalid="ignore"):
            shift = np.where(np.isfinite(lse), lse - log_d, 0.0).astype(lse.dtype)
        lse = log_d
    return out, lse, shift


def _shifted(out, shift):
    """The answer ``out · e^shift`` (ApproxD); a zero ``out`` stays 0 where ``e^shift`` overflows."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond the range: inf, honestly
        scaled = out * np.exp(shift)[..., None].astype(out.dtype)
    return np.where(out == 0, out, scaled)


def noncausal_heads(q, k, v, kv_of, scale, config: HyperConfig, draws: BlockDraws):
    """Non-causal HyperAttention of stacked heads; returns ``(out, lse)``.

    :func:`noncausal_partial_heads` with the answer formed, as
    :func:`hyperref.estimators.noncausal_head`.
    """
    out, lse, shift = noncausal_partial_heads(q, k, v, kv_of, scale, config, draws)
    if config.normalizer == "approxd":
        out = _shifted(out, shift)
    return out, lse


def _approx_d(q, k, kv_of, scale, config, draws, perm_q, q_starts, perm_k, q_block, k_block):
    """ApproxD (SPEC §4) with the kernels; same formulas as :func:`hyperref.approxd.approx_d`."""
    n_heads, nq, _ = q.shape
    s = q.dtype.type(scale)
    log_a = np.full((n_heads, nq), -np.inf, dtype=q.dtype)
    nk_.masked_row_sums(q, k, kv_of, s, perm_q, q_starts, perm_k, config.block, log_a)
    rows = np.ascontiguousarray(draws.approxd_rows)
    cols = np.ascontiguousarray(draws.approxd_cols)
    log_r = np.empty(rows.shape, dtype=q.dtype)
    nk_.residual_row_sums(q, k, kv_of, s, q_block, k_block, rows, log_r)
    log_rhat = np.empty((n_heads, nq), dtype=q.dtype)
    nk_.residual_estimates(q, k, kv_of, s, q_block, k_block, cols, log_rhat)
    log_tau = log_r.max(axis=1)
    if config.kappa is None:
        log_floor = np.where(np.isfinite(log_tau), log_r.min(axis=1), -np.inf)
    else:
        log_floor = np.where(np.isfinite(log_tau), log_tau - np.log(config.kappa), -np.inf)
    return np.logaddexp(log_a, np.maximum(log_rhat, log_floor[:, None]))


def causal_heads(q, k, v, kv_of, scale, config: HyperConfig, blocks: dict):
    """Causal HyperAttention of stacked heads (SPEC §6): exact leaves, merged off-diagonals.

    As :func:`hyperref.causal.causal_head`: the off-diagonal partials carry their shift
    (ApproxD) through the merges, and the answer ``o · e^shift`` is formed once at the end.
    """
    n_heads, nq, _ = q.shape
    out = np.zeros((n_heads, nq, v.shape[2]), dtype=v.dtype)
    lse = np.full((n_heads, nq), -np.inf, dtype=v.dtype)
    shift = np.zeros((n_heads, nq), dtype=v.dtype)
    approxd = config.normalizer == "approxd"
    offdiag, leaves = causal_nodes(nq, k.shape[1], config.min_seq_len)
    ranges = np.array([[lf.q0, lf.q1, lf.k0, lf.k1] for lf in leaves], dtype=np.int64)
    nk_.exact_causal_ranges(q, k, v, kv_of, q.dtype.type(scale), ranges, out, lse)
    for node in offdiag:
        o2, l2, s2 = noncausal_partial_heads(
            np.ascontiguousarray(q[:, node.q0:node.q1]), np.ascontiguousarray(k[:, node.k0:node.k1]),
            np.ascontiguousarray(v[:, node.k0:node.k1]), kv_of, scale, config, blocks[node.path])
        nk_.merge_into(out, lse, shift, node.q0, o2, l2, s2, approxd)
    if approxd:
        out = _shifted(out, shift)
    return out, lse


def hyper_heads(q, k, v, scale, config: HyperConfig, draws: Draws, causal: bool):
    """HyperAttention of ``(B, H, N, D)`` inputs with the Numba kernels; returns ``(out, lse)``."""
    b, h, nq, d = q.shape
    hk = k.shape[1]
    group = h // hk
    qs = np.ascontiguousarray(q.reshape(b * h, nq, d))
    ks = np.ascontiguousarray(k.reshape(b * hk, k.shape[2], d))
    vs = np.ascontiguousarray(v.reshape(b * hk, v.shape[2], v.shape[3]))
    kv_of = np.array([bi * hk + hi // group for bi in range(b) for hi in range(h)], dtype=np.int64)
    n_heads = b * h
    blocks = {path: _stacked(bd, n_heads) for path, bd in draws.blocks.items()}
    # the kernels parallelize over tasks and call BLAS inside each task: one BLAS
    # thread per task, or OpenBLAS's own threads oversubscribe the cores
    with threadpool_limits(limits=1, user_api="blas"):
        if causal:
            out, lse = causal_heads(qs, ks, vs, kv_of, scale, config, blocks)
        else:
            out, lse = noncausal_heads(qs, ks, vs, kv_of, scale, config, blocks[""])
    return out.reshape(b, h, nq, -1), lse.reshape(b, h, nq)
