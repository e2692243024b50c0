"""Triton kernels of the GPU path: attention over per-row key intervals plus sampled keys.

One forward kernel serves both parts of HyperAttention (SPEC §3–§6):

* sortLSH blocks (``HAS_PERM``): row ``p`` *in sorted order* is query
  ``perm_q[p]``; it attends to the sorted keys ``perm_k[lo_p:hi_p]`` of its
  block and to the ``m`` sampled keys ``idx_t`` whose block tag differs from
  the row's (``masked`` estimator, ``self`` normalizer), each with the
  additive logit bias ``log w_t = −log(m p_t)``;
* causal leaves (no perm): row ``i`` attends to keys ``[lo_i, hi_i)`` (the
  keys it sees inside its leaf); no samples.

Intervals are nondecreasing in the row index and shared by all heads, so a
tile of rows needs keys ``[lo_first, hi_last)`` only. Rows and keys are
gathered through the permutations inside the kernels and results are written
at the original positions, so every tensor the caller sees is in original
order. Query head ``bh`` reads key/value head ``(bh // H)·Hk + (bh % H) // G``
(grouped-query attention). Online softmax in base 2 (FlashAttention-2), fp32
accumulation; ``lse`` is returned in natural-log units.

Backward (recomputing the probabilities from ``lse``; ``Δ_i = do_i·o_i − dlse_i``):
``dq`` per row tile; ``dk, dv`` of the interval keys per key tile (rows
``[rstart, rend)`` of the tile precomputed by the caller), written per query
head; partial ``dk, dv`` of the sampled keys per (sample tile, row chunk),
summed and scattered by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # for the launchers (Python floats)
NEG = tl.constexpr(-1.0e30)  # "masked" logit; finite, so fully masked tiles give no NaN
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _kv_head(bh, H, HK, G):
    return (bh // H) * HK + (bh % H) // G


@triton.jit
def _fwd_kernel(Q, K, V, PERM_Q, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, O, LSE,
                nq, nk, m, H, HK, G, scale_log2,
                s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb, s_ib,
                D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                HAS_SAMPLES: tl.constexpr, HAS_PERM: tl.constexpr, PREC: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < nq
    if HAS_PERM:
        qi = tl.load(PERM_Q + bh * s_pqb + rows, mask=rmask, other=0).to(tl.int64)
    else:
        qi = rows.to(tl.int64)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    q = tl.load(Q + bh * s_qb + qi[:, None] * s_qn + offd[None, :], mask=rmask[:, None], other=0.0)
    lo = tl.load(LO + rows, mask=rmask, other=0)
    hi = tl.load(HI + rows, mask=rmask, other=0)
    start = tl.min(tl.where(rmask, lo, nk), axis=0)
    end = tl.max(tl.where(rmask, hi, 0), axis=0)
    m_i = tl.full([BM], NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    for j0 in range(start, end, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < nk
        if HAS_PERM:
            kj = tl.load(PERM_K + bh * s_pkb + cols, mask=cmask, other=0).to(tl.int64)
        else:
            kj = cols.to(tl.int64)
        k = tl.load(K + kvh * s_kb + kj[:, None] * s_kn + offd[None, :], mask=cmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & rmask[:, None]
        s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.where(valid, tl.exp2(s - m_new[:, None]), 0.0)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kvh * s_vb + kj[:, None] * s_vn + offv[None, :], mask=cmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if HAS_SAMPLES:
        rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
        for t0 in range(0, m, BN):
            ts = t0 + tl.arange(0, BN)
            tmask = ts < m
            sj = tl.load(IDX + bh * s_ib + ts, mask=tmask, other=0).to(tl.int64)
            ks = tl.load(K + kvh * s_kb + sj[:, None] * s_kn + offd[None, :], mask=tmask[:, None], other=0.0)
            bias = tl.load(BIAS + bh * s_ib + ts, mask=tmask, other=0.0)
            stag = tl.load(STAG + bh * s_ib + ts, mask=tmask, other=-2)
            s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale_log2 + bias[None, :] * _LOG2E
            valid = tmask[None, :] & (stag[None, :] != rtag[:, None]) & rmask[:, None]
            s = tl.where(valid, s, NEG)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.where(valid, tl.exp2(s - m_new[:, None]), 0.0)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vs = tl.load(V + kvh * s_vb + sj[:, None] * s_vn + offv[None, :], mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vs.dtype), vs, input_precision=PREC)
            m_i = m_new
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(O + bh * s_ob + qi[:, None] * s_on + offv[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + bh * s_lb + qi, lse, mask=rmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, PERM_Q, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, DO, LSE, DELTA, DQ,
                   nq, nk, m, H, HK, G, scale_log2, scale,
                   s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb, s_ib,
                   D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   HAS_SAMPLES: tl.constexpr, HAS_PERM: tl.constexpr, PREC: tl.constexpr):
    """dq_i = scale Σ_j P_ij (dP_ij − Δ_i) k_j over the row's interval keys and samples.

    ``DO`` shares the strides of the output (``s_ob, s_on``), ``DQ`` those of ``Q``.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < nq
    if HAS_PERM:
        qi = tl.load(PERM_Q + bh * s_pqb + rows, mask=rmask, other=0).to(tl.int64)
    else:
        qi = rows.to(tl.int64)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    q = tl.load(Q + bh * s_qb + qi[:, None] * s_qn + offd[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + bh * s_ob + qi[:, None] * s_on + offv[None, :], mask=rmask[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * s_lb + qi, mask=rmask, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh * s_lb + qi, mask=rmask, other=0.0)
    lo = tl.load(LO + rows, mask=rmask, other=0)
    hi = tl.load(HI + rows, mask=rmask, other=0)
    start = tl.min(tl.where(rmask, lo, nk), axis=0)
    end = tl.max(tl.where(rmask, hi, 0), axis=0)
    dq = tl.zeros([BM, D], tl.float32)
    for j0 in range(start, end, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < nk
        if HAS_PERM:
            kj = tl.load(PERM_K + bh * s_pkb + cols, mask=cmask, other=0).to(tl.int64)
        else:
            kj = cols.to(tl.int64)
        k = tl.load(K + kvh * s_kb + kj[:, None] * s_kn + offd[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + kvh * s_vb + kj[:, None] * s_vn + offv[None, :], mask=cmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & rmask[:, None]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if HAS_SAMPLES:
        rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
        for t0 in range(0, m, BN):
            ts = t0 + tl.arange(0, BN)
            tmask = ts < m
            sj = tl.load(IDX + bh * s_ib + ts, mask=tmask, other=0).to(tl.int64)
            ks = tl.load(K + kvh * s_kb + sj[:, None] * s_kn + offd[None, :], mask=tmask[:, None], other=0.0)
            vs = tl.load(V + kvh * s_vb + sj[:, None] * s_vn + offv[None, :], mask=tmask[:, None], other=0.0)
            bias = tl.load(BIAS + bh * s_ib + ts, mask=tmask, other=0.0)
            stag = tl.load(STAG + bh * s_ib + ts, mask=tmask, other=-2)
            s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale_log2 + bias[None, :] * _LOG2E
            valid = tmask[None, :] & (stag[None, :] != rtag[:, None]) & rmask[:, None]
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vs), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + bh * s_qb + qi[:, None] * s_qn + offd[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PERM_Q, PERM_K, LO, HI, RSTART, REND, DO, LSE, DELTA, DK, DV_,
                     nq, nk, H, HK, G, scale_log2, scale,
                     s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb,
                     s_dkb, s_dkn, s_dvb, s_dvn,
                     D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_PERM: tl.constexpr, PREC: tl.constexpr):
    """dk, dv of one tile of interval keys, per query head (``DK``, ``DV_`` are (B·H, nk, ·))."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    cols = tile * BN + tl.arange(0, BN)
    cmask = cols < nk
    if HAS_PERM:
        kj = tl.load(PERM_K + bh * s_pkb + cols, mask=cmask, other=0).to(tl.int64)
    else:
        kj = cols.to(tl.int64)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    k = tl.load(K + kvh * s_kb + kj[:, None] * s_kn + offd[None, :], mask=cmask[:, None], other=0.0)
    v = tl.load(V + kvh * s_vb + kj[:, None] * s_vn + offv[None, :], mask=cmask[:, None], other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    r0 = tl.load(RSTART + tile)
    r1 = tl.load(REND + tile)
    for i0 in range(r0, r1, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < r1
        if HAS_PERM:
            qi = tl.load(PERM_Q + bh * s_pqb + rows, mask=rmask, other=0).to(tl.int64)
        else:
            qi = rows.to(tl.int64)
        q = tl.load(Q + bh * s_qb + qi[:, None] * s_qn + offd[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + bh * s_ob + qi[:, None] * s_on + offv[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE + bh * s_lb + qi, mask=rmask, other=0.0) * _LOG2E
        delta = tl.load(DELTA + bh * s_lb + qi, mask=rmask, other=0.0)
        lo = tl.load(LO + rows, mask=rmask, other=0)
        hi = tl.load(HI + rows, mask=rmask, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        valid = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & rmask[:, None] & cmask[None, :]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + bh * s_dkb + kj[:, None] * s_dkn + offd[None, :], dk, mask=cmask[:, None])
    tl.store(DV_ + bh * s_dvb + kj[:, None] * s_dvn + offv[None, :], dv, mask=cmask[:, None])


@triton.jit
def _bwd_samples_kernel(Q, K, V, PERM_Q, IDX, BIAS, STAG, RTAG, DO, LSE, DELTA, DKS, DVS,
                        nq, m, H, HK, G, chunk_rows, scale_log2, scale,
                        s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_ib,
                        s_pb, s_pc, s_pn, s_pvb, s_pvc, s_pvn,
                        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        PREC: tl.constexpr):
    """Partial dk, dv of the sampled keys over one chunk of sorted rows."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    ts = tile * BN + tl.arange(0, BN)
    tmask = ts < m
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    sj = tl.load(IDX + bh * s_ib + ts, mask=tmask, other=0).to(tl.int64)
    ks = tl.load(K + kvh * s_kb + sj[:, None] * s_kn + offd[None, :], mask=tmask[:, None], other=0.0)
    vs = tl.load(V + kvh * s_vb + sj[:, None] * s_vn + offv[None, :], mask=tmask[:, None], other=0.0)
    bias = tl.load(BIAS + bh * s_ib + ts, mask=tmask, other=0.0)
    stag = tl.load(STAG + bh * s_ib + ts, mask=tmask, other=-2)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    r0 = chunk * chunk_rows
    r1 = tl.minimum(r0 + chunk_rows, nq)
    for i0 in range(r0, r1, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < r1
        qi = tl.load(PERM_Q + bh * s_pqb + rows, mask=rmask, other=0).to(tl.int64)
        q = tl.load(Q + bh * s_qb + qi[:, None] * s_qn + offd[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(DO + bh * s_ob + qi[:, None] * s_on + offv[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE + bh * s_lb + qi, mask=rmask, other=0.0) * _LOG2E
        delta = tl.load(DELTA + bh * s_lb + qi, mask=rmask, other=0.0)
        rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
        s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale_log2 + bias[None, :] * _LOG2E
        valid = tmask[None, :] & (stag[None, :] != rtag[:, None]) & rmask[:, None]
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(vs), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    tl.store(DKS + bh * s_pb + chunk * s_pc + ts[:, None] * s_pn + offd[None, :], dk, mask=tmask[:, None])
    tl.store(DVS + bh * s_pvb + chunk * s_pvc + ts[:, None] * s_pvn + offv[None, :], dv, mask=tmask[:, None])
