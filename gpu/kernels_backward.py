"""Triton backward kernels of the GPU path (the gradients of :mod:`~hyperref.gpu.kernels_forward`).

They recompute the probabilities from the final ``lse`` of the whole attention
(every piece is a part of one softmax; ``Δ_i = do_i·o_i − dlse_i``, one pass of
``_delta_kernel``): ``dq`` per row tile, accumulated over pieces in an fp32 buffer;
``dk, dv`` of the interval keys per key tile (rows ``[rstart, rend)`` of the tile
precomputed by the caller), written by the first piece (which covers every key)
and added by the others into fp32 buffers of the key/value heads (atomically when
several query heads share one); ``dk, dv`` of the sampled keys per (sample tile,
row chunk), added atomically. ``_add_into_kernel`` adds an fp32 buffer into a
gradient of another dtype, rounding once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _LOG2E, _kv_head
from .kernels_forward import (_gather, _in_interval, _key_ranges, _key_tile, _one_block_keys, _one_block_setup,
                              _original, _program_rows, _sample_block, _sample_logits, _sample_tile)


@triton.jit
def _delta_kernel(DO, O, LSE, DLSE, DELTA, rows, s_do, s_o, DV: tl.constexpr, BM: tl.constexpr,
                  HAS_DLSE: tl.constexpr):
    """``Δ_i = do_i·o_i − dlse_i`` (the ``dlse`` term only where ``lse_i`` is finite), fp32,
    over the flattened rows of DO and O (row strides ``s_do``, ``s_o``)."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < rows
    offv = tl.arange(0, DV)
    r64 = r.to(tl.int64)
    do = tl.load(DO + r64[:, None] * s_do + offv[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + r64[:, None] * s_o + offv[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * o, axis=1)
    if HAS_DLSE:
        lse = tl.load(LSE + r, mask=rmask, other=0.0)
        dlse = tl.load(DLSE + r, mask=rmask, other=0.0)
        delta -= tl.where(tl.abs(lse) < float("inf"), dlse, 0.0)
    tl.store(DELTA + r, delta, mask=rmask)


@triton.jit
def _add_into_kernel(G, ACC, n, BLOCK: tl.constexpr):
    """``G[i] = G[i] + ACC[i]`` over ``n`` contiguous entries: the sum in fp32 (``ACC``),
    rounded once to the dtype of ``G``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(ACC + offs, mask=mask, other=0.0)
    tl.store(G + offs, (g + acc).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, bh, qi, rmask, s_qb, s_qn, s_ob, s_on, s_lb, offd, offv):
    """What backward needs of a set of rows: q, do, base-2 lse and Δ."""
    q = _gather(Q, bh * s_qb, qi, s_qn, offd, rmask)
    do = _gather(DO, bh * s_ob, qi, s_on, offv, rmask)
    lse2 = tl.load(LSE + bh * s_lb + qi, mask=rmask, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh * s_lb + qi, mask=rmask, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _ds(p, do, v, delta, PREC: tl.constexpr):
    """``dS = P ∘ (dO·Vᵀ − Δ)`` (the softmax backward)."""
    return p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])


@triton.jit
def _dkdv_step(dk, dv, p, q, do, v, delta, PREC: tl.constexpr):
    """Add one row tile's contribution to ``dk`` (unscaled) and ``dv`` of a key tile."""
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = _ds(p, do, v, delta, PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_step(q, do, dq, lse2, delta, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi, rmask, nk,
             s_kn, s_vn, scale_log2, offd, offv,
             BN: tl.constexpr, HAS_PERM: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    cols, k, v = _key_tile(K, V, PERM_K, pk_row, k_head, v_head, j0, nk, s_kn, s_vn, offd, offv,
                           BN, HAS_PERM, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2 - lse2[:, None])
    if MASK:
        p = tl.where(_in_interval(cols, lo, hi, rmask), p, 0.0)
    ds = _ds(p, do, v, delta, PREC)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _dq_one_block(q, do, dq, lse2, delta, K, V, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_R0, T_NODE, tile,
                  pk_row, s_row, k_head, v_head, m, s_kn, s_vn, scale_log2, offd, offv,
                  BN: tl.constexpr, PREC: tl.constexpr):
    """dq (unscaled) of a row tile inside one sortLSH block: one loop, per-column masks."""
    lo, hi, rtag, smp, n_int, n_all = _one_block_setup(LO, HI, RTAG, T_R0, T_NODE, tile, s_row, m, BN)
    for t in range(0, n_all):
        k, v, offset = _one_block_keys(K, V, PERM_K, IDX, BIAS, STAG, t, lo, hi, rtag, smp, n_int, pk_row,
                                       k_head, v_head, m, s_kn, s_vn, offd, offv, BN)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2 + offset[None, :]
        ds = _ds(tl.exp2(s - lse2[:, None]), do, v, delta, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, PERM_Q, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_R0, T_R1, T_NODE,
                   DO, LSE, DELTA, DQ,
                   nk, m, H, HK, G, scale_log2, scale,
                   s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb, s_ib,
                   D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   HAS_SAMPLES: tl.constexpr, HAS_PERM: tl.constexpr, ACCUM: tl.constexpr,
                   ONE_BLOCK: tl.constexpr, PREC: tl.constexpr):
    """dq_i (+)= scale Σ_j P_ij (dP_ij − Δ_i) k_j over the row's interval keys and samples.

    ``DO`` shares the strides of the output (``s_ob, s_on``); ``DQ`` has the
    strides of ``Q`` (fp32 when pieces accumulate: with ``ACCUM`` the piece's dq
    is added to it).
    """
    tile, bh, kvh, rows, rmask, qi = _program_rows(T_R0, T_R1, PERM_Q, H, HK, G, s_pqb, BM, HAS_PERM)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    q, do, lse2, delta = _bwd_rows(Q, DO, LSE, DELTA, bh, qi, rmask, s_qb, s_qn, s_ob, s_on, s_lb,
                                   offd, offv)
    pk_row = bh * s_pkb
    k_head = kvh * s_kb
    v_head = kvh * s_vb
    dq = tl.zeros([BM, D], tl.float32)
    if ONE_BLOCK:
        dq = _dq_one_block(q, do, dq, lse2, delta, K, V, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_R0, T_NODE,
                           tile, pk_row, bh * s_ib, k_head, v_head, m, s_kn, s_vn, scale_log2, offd, offv,
                           BN, PREC)
    else:
        lo = tl.load(LO + rows, mask=rmask, other=0)
        hi = tl.load(HI + rows, mask=rmask, other=0)
        start, a, b, end = _key_ranges(lo, hi, rmask, nk, BN)
        for j0 in range(start, a, BN):
            dq = _dq_step(q, do, dq, lse2, delta, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi, rmask,
                          nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, True, PREC)
        for j0 in range(a, b, BN):
            dq = _dq_step(q, do, dq, lse2, delta, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi, rmask,
                          nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, False, PREC)
        for j0 in range(b, end, BN):
            dq = _dq_step(q, do, dq, lse2, delta, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi, rmask,
                          nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, True, PREC)
        if HAS_SAMPLES:
            rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
            smp = bh * s_ib + tl.load(T_NODE + tile).to(tl.int64) * m
            for t0 in range(0, m, BN):
                ks, vs, s, valid = _sample_block(q, K, V, IDX, BIAS, STAG, smp, t0, m, rtag, rmask, k_head,
                                                 v_head, s_kn, s_vn, scale_log2, offd, offv, BN, PREC)
                ds = _ds(tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0), do, vs, delta, PREC)
                dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PREC)
    dq = dq * scale
    dq_ptr = DQ + bh * s_qb + qi[:, None] * s_qn + offd[None, :]
    if ACCUM:
        dq += tl.load(dq_ptr, mask=rmask[:, None], other=0.0)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _add_rows(PTR, rows_off, val, mask, MODE: tl.constexpr):
    """``PTR[rows_off] = val`` (MODE 0), ``+= val`` by read-add-write when the rows are
    private to the program (1), or atomically (2)."""
    if MODE == 2:
        tl.atomic_add(PTR + rows_off, val, mask=mask)
    elif MODE == 1:
        tl.store(PTR + rows_off, tl.load(PTR + rows_off, mask=mask, other=0.0) + val, mask=mask)
    else:
        tl.store(PTR + rows_off, val, mask=mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PERM_Q, PERM_K, LO, HI, RSTART, REND, DO, LSE, DELTA, DK, DV_,
                     nkv, H, HK, G, scale_log2, scale,
                     s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb,
                     s_dkb, s_dkn, s_dvb, s_dvn,
                     D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_PERM: tl.constexpr, MODE: tl.constexpr, ONE_BLOCK: tl.constexpr,
                     PREC: tl.constexpr):
    """dk, dv of one tile of virtual interval keys (``nkv`` of them), added into the
    fp32 buffers ``DK``, ``DV_`` (B·Hk, Nk, ·) at the key/value head of ``bh``.

    ``ONE_BLOCK``: the key tile lies inside one sortLSH block, so every row of
    ``[rstart, rend)`` sees all its keys and no mask is needed (padding rows and
    columns contribute zeros or are not stored).
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    cols = tile * BN + tl.arange(0, BN)
    cmask = cols < nkv
    kj = _original(PERM_K, bh * s_pkb, cols, cmask, HAS_PERM)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    k = _gather(K, kvh * s_kb, kj, s_kn, offd, cmask)
    v = _gather(V, kvh * s_vb, kj, s_vn, offv, cmask)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    r0 = tl.load(RSTART + tile)
    r1 = tl.load(REND + tile)
    for i0 in range(r0, r1, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < r1
        qi = _original(PERM_Q, bh * s_pqb, rows, rmask, HAS_PERM)
        q, do, lse2, delta = _bwd_rows(Q, DO, LSE, DELTA, bh, qi, rmask, s_qb, s_qn, s_ob, s_on, s_lb,
                                       offd, offv)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        if ONE_BLOCK:
            p = tl.exp2(s - lse2[:, None])
        else:
            lo = tl.load(LO + rows, mask=rmask, other=0)
            hi = tl.load(HI + rows, mask=rmask, other=0)
            valid = _in_interval(cols, lo, hi, rmask) & cmask[None, :]
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dk, dv = _dkdv_step(dk, dv, p, q, do, v, delta, PREC)
    dk = dk * scale
    _add_rows(DK, kvh * s_dkb + kj[:, None] * s_dkn + offd[None, :], dk, cmask[:, None], MODE)
    _add_rows(DV_, kvh * s_dvb + kj[:, None] * s_dvn + offv[None, :], dv, cmask[:, None], MODE)


@triton.jit
def _bwd_samples_kernel(Q, K, V, PERM_Q, IDX, BIAS, STAG, RTAG, C_R0, C_R1, C_NODE, DO, LSE, DELTA,
                        DK, DV_, m, H, HK, G, scale_log2, scale,
                        s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_ib,
                        s_dkb, s_dkn, s_dvb, s_dvn,
                        D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        PREC: tl.constexpr):
    """dk, dv of one tile of a node's sampled keys over one chunk of its rows,
    added atomically into ``DK``, ``DV_`` (a key can be sampled twice)."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    kvh = _kv_head(bh, H, HK, G)
    smp = bh * s_ib + tl.load(C_NODE + chunk).to(tl.int64) * m
    ts = tile * BN + tl.arange(0, BN)
    tmask = ts < m
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    sj, ks, vs, bias, stag = _sample_tile(K, V, IDX, BIAS, STAG, smp, ts, tmask, kvh * s_kb, kvh * s_vb,
                                          s_kn, s_vn, offd, offv)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, DV], tl.float32)
    r0 = tl.load(C_R0 + chunk)
    r1 = tl.load(C_R1 + chunk)
    for i0 in range(r0, r1, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < r1
        qi = _original(PERM_Q, bh * s_pqb, rows, rmask, True)
        q, do, lse2, delta = _bwd_rows(Q, DO, LSE, DELTA, bh, qi, rmask, s_qb, s_qn, s_ob, s_on, s_lb,
                                       offd, offv)
        rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
        s, valid = _sample_logits(q, ks, bias, stag, tmask, rtag, rmask, scale_log2, PREC)
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dk, dv = _dkdv_step(dk, dv, p, q, do, vs, delta, PREC)
    dk = dk * scale
    tl.atomic_add(DK + kvh * s_dkb + sj[:, None] * s_dkn + offd[None, :], dk, mask=tmask[:, None])
    tl.atomic_add(DV_ + kvh * s_dvb + sj[:, None] * s_dvn + offv[None, :], dv, mask=tmask[:, None])
