"""Triton forward kernel of the GPU path: attention over per-row key intervals plus sampled keys.

One launch computes one *piece* of HyperAttention (SPEC §3–§6): a list of
nodes, node ``t`` with query rows ``[q0, q1)`` and key rows ``[k0, k1)``.
Rows and keys are enumerated in *virtual* order: the nodes' rows one after the
other (``perm_q[p]`` is the query of virtual row ``p``), likewise the keys.

* sortLSH nodes (``HAS_PERM``): the virtual order is the node's sorted order;
  row ``p`` attends to the virtual keys ``[lo_p, hi_p)`` of its block and to the
  ``m`` sampled keys of its node whose block tag differs from the row's
  (``masked`` estimator, ``self`` normalizer), each with the additive logit
  bias ``log w_t = −log(m p_t)``;
* causal leaves (no perm): virtual = original order; row ``i`` attends to the
  keys ``[lo_i, hi_i)`` it sees inside its leaf; no samples.

Intervals are nondecreasing in the virtual row and shared by all heads, so a
tile of rows needs keys ``[min lo, max hi)`` only, and key tiles inside
``[max lo, min hi)`` need no mask. Row tiles never cross nodes (a tile map
``T_R0, T_R1, T_NODE`` gives each program its rows). Results go to the
original positions (``nk`` in the kernels' arguments is the number of virtual
keys of the piece). With ``MERGE`` the kernel combines its piece with the
``(out, lse)`` already there (SPEC §1's merge): the causal recursion is one
launch per level, each query appearing at most once per level, so no two
programs touch the same row. A row tile inside one sortLSH block
(``ONE_BLOCK``, decided per piece by the caller) shares one interval and block
tag: its interval tiles and its node's sample tiles are one loop whose masks
are per-column logit offsets. Query head ``bh`` reads key/value head
``(bh // H)·Hk + (bh % H) // G`` (grouped-query attention). Online softmax in
base 2 (FlashAttention-2), fp32 accumulation; ``lse`` in natural-log units.

The tile helpers here (rows, key and sample tiles, the one-block loop's keys) are
also those of :mod:`~hyperref.gpu.kernels_backward`. The causal leaves may instead
be computed by cuDNN (:mod:`hyperref.gpu.leaves`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _LN2, _LOG2E, NEG, _kv_head


@triton.jit
def _gather(PTR, head, idx, s_n, offs, mask):
    """Rows ``idx`` of one head: ``PTR[head + idx·s_n + offs]`` (zeros where ``mask`` is off)."""
    return tl.load(PTR + head + idx[:, None] * s_n + offs[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _original(PERM, perm_row, virtual, mask, HAS_PERM: tl.constexpr):
    """Original index of each virtual row or key: through the permutation, or itself."""
    if HAS_PERM:
        index = tl.load(PERM + perm_row + virtual, mask=mask, other=0).to(tl.int64)
    else:
        index = virtual.to(tl.int64)
    return index


@triton.jit
def _row_tile(T_R0, T_R1, PERM_Q, tile, perm_row, BM: tl.constexpr, HAS_PERM: tl.constexpr):
    """The virtual rows of row tile ``tile`` (from the tile map), their mask and original rows."""
    r0 = tl.load(T_R0 + tile)
    r1 = tl.load(T_R1 + tile)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    return rows, rmask, _original(PERM_Q, perm_row, rows, rmask, HAS_PERM)


@triton.jit
def _program_rows(T_R0, T_R1, PERM_Q, H, HK, G, s_pqb, BM: tl.constexpr, HAS_PERM: tl.constexpr):
    """What a row-tile program works on: its tile, flattened query head, key/value head,
    virtual rows, their mask and original rows (grid: tiles × heads)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows, rmask, qi = _row_tile(T_R0, T_R1, PERM_Q, tile, bh * s_pqb, BM, HAS_PERM)
    return tile, bh, _kv_head(bh, H, HK, G), rows, rmask, qi


@triton.jit
def _key_tile(K, V, PERM_K, pk_row, k_head, v_head, j0, nk, s_kn, s_vn, offd, offv,
              BN: tl.constexpr, HAS_PERM: tl.constexpr, MASK: tl.constexpr):
    """Virtual keys ``[j0, j0 + BN)`` and their key and value rows (bounds-checked if ``MASK``)."""
    cols = j0 + tl.arange(0, BN)
    if MASK:
        cmask = cols < nk
    else:
        cmask = cols >= 0
    kj = _original(PERM_K, pk_row, cols, cmask, HAS_PERM)
    return cols, _gather(K, k_head, kj, s_kn, offd, cmask), _gather(V, v_head, kj, s_vn, offv, cmask)


@triton.jit
def _in_interval(cols, lo, hi, rmask):
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & rmask[:, None]


@triton.jit
def _sample_tile(K, V, IDX, BIAS, STAG, smp, ts, tmask, k_head, v_head, s_kn, s_vn, offd, offv):
    """Sampled keys ``ts`` of a node (``smp`` = offset of its samples): key and value rows,
    log weights and block tags."""
    sj = tl.load(IDX + smp + ts, mask=tmask, other=0).to(tl.int64)
    ks = _gather(K, k_head, sj, s_kn, offd, tmask)
    vs = _gather(V, v_head, sj, s_vn, offv, tmask)
    bias = tl.load(BIAS + smp + ts, mask=tmask, other=0.0)
    stag = tl.load(STAG + smp + ts, mask=tmask, other=-2)
    return sj, ks, vs, bias, stag


@triton.jit
def _sample_logits(q, ks, bias, stag, tmask, rtag, rmask, scale_log2, PREC: tl.constexpr):
    """Base-2 logits of rows against sampled keys, bias included, and which pairs count
    (``masked`` estimator: the sample's block differs from the row's)."""
    s = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale_log2 + bias[None, :] * _LOG2E
    valid = tmask[None, :] & (stag[None, :] != rtag[:, None]) & rmask[:, None]
    return s, valid


@triton.jit
def _sample_block(q, K, V, IDX, BIAS, STAG, smp, t0, m, rtag, rmask, k_head, v_head, s_kn, s_vn,
                  scale_log2, offd, offv, BN: tl.constexpr, PREC: tl.constexpr):
    """Sampled keys ``[t0, t0 + BN)`` of a node for a row tile: key and value rows, base-2
    logits with the bias, and which pairs count."""
    ts = t0 + tl.arange(0, BN)
    tmask = ts < m
    sj, ks, vs, bias, stag = _sample_tile(K, V, IDX, BIAS, STAG, smp, ts, tmask, k_head, v_head,
                                          s_kn, s_vn, offd, offv)
    s, valid = _sample_logits(q, ks, bias, stag, tmask, rtag, rmask, scale_log2, PREC)
    return ks, vs, s, valid


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, valid, MASK: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update with one tile of base-2 logits ``s`` and values ``v``."""
    if MASK:
        s = tl.where(valid, s, NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    if MASK:
        p = tl.where(valid, p, 0.0)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_step(q, acc, m_i, l_i, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi, rmask, nk,
              s_kn, s_vn, scale_log2, offd, offv,
              BN: tl.constexpr, HAS_PERM: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One key tile ``[j0, j0 + BN)`` of the online softmax (masked or known-inside)."""
    cols, k, v = _key_tile(K, V, PERM_K, pk_row, k_head, v_head, j0, nk, s_kn, s_vn, offd, offv,
                           BN, HAS_PERM, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    valid = _in_interval(cols, lo, hi, rmask) if MASK else None
    return _softmax_step(acc, m_i, l_i, s, v, valid, MASK, PREC)


@triton.jit
def _key_ranges(lo, hi, rmask, nk, BN: tl.constexpr):
    """Key tiles of a row tile: masked ``[start, a)``, unmasked ``[a, b)``, masked ``[b, end)``."""
    start = tl.min(tl.where(rmask, lo, nk), axis=0)
    end = tl.max(tl.where(rmask, hi, 0), axis=0)
    lo_max = tl.max(tl.where(rmask, lo, 0), axis=0)
    hi_min = tl.min(tl.where(rmask, hi, nk), axis=0)
    a = start + tl.cdiv(tl.maximum(lo_max - start, 0), BN) * BN
    a = tl.minimum(a, tl.maximum(end, start))
    b = a + tl.maximum(hi_min - a, 0) // BN * BN
    return start, a, b, end


@triton.jit
def _row_interval_tiles(q, acc, m_i, l_i, K, V, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_NODE, tile,
                        rows, rmask, pk_row, s_row, k_head, v_head, nk, m, s_kn, s_vn, scale_log2,
                        offd, offv, BM: tl.constexpr, BN: tl.constexpr, HAS_SAMPLES: tl.constexpr,
                        HAS_PERM: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of a row tile whose rows may have different intervals (any piece):
    key tiles masked at the edges, unmasked inside ``[max lo, min hi)``, then the samples."""
    lo = tl.load(LO + rows, mask=rmask, other=0)
    hi = tl.load(HI + rows, mask=rmask, other=0)
    start, a, b, end = _key_ranges(lo, hi, rmask, nk, BN)
    for j0 in range(start, a, BN):
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi,
                                  rmask, nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, True, PREC)
    for j0 in range(a, b, BN):
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi,
                                  rmask, nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, False, PREC)
    for j0 in range(b, end, BN):
        acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, K, V, PERM_K, pk_row, k_head, v_head, j0, lo, hi,
                                  rmask, nk, s_kn, s_vn, scale_log2, offd, offv, BN, HAS_PERM, True, PREC)
    if HAS_SAMPLES:
        rtag = tl.load(RTAG + rows, mask=rmask, other=-1)
        smp = s_row + tl.load(T_NODE + tile).to(tl.int64) * m
        for t0 in range(0, m, BN):
            ks, vs, s, valid = _sample_block(q, K, V, IDX, BIAS, STAG, smp, t0, m, rtag, rmask, k_head,
                                             v_head, s_kn, s_vn, scale_log2, offd, offv, BN, PREC)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vs, valid, True, PREC)
    return acc, m_i, l_i


@triton.jit
def _one_block_setup(LO, HI, RTAG, T_R0, T_NODE, tile, s_row, m, BN: tl.constexpr):
    """A row tile inside one sortLSH block: its interval ``[lo, hi)``, block tag, the offset
    of its node's samples and the number of interval tiles and of all key tiles."""
    r0 = tl.load(T_R0 + tile)
    lo = tl.load(LO + r0)
    hi = tl.load(HI + r0)
    n_int = tl.cdiv(hi - lo, BN)
    smp = s_row + tl.load(T_NODE + tile).to(tl.int64) * m
    return lo, hi, tl.load(RTAG + r0), smp, n_int, n_int + tl.cdiv(m, BN)


@triton.jit
def _one_block_keys(K, V, PERM_K, IDX, BIAS, STAG, t, lo, hi, rtag, smp, n_int, pk_row, k_head, v_head,
                    m, s_kn, s_vn, offd, offv, BN: tl.constexpr):
    """Key tile ``t`` of a one-block row tile: interval tiles first, then the node's samples.

    Returns key and value rows and a per-column base-2 logit offset: 0 inside
    the interval, the log weight for a sample of another block (``masked``
    estimator), ``NEG`` for the rest (a sample of the row's own block, padding).
    """
    ar = tl.arange(0, BN)
    cols = lo + t * BN + ar
    ts = (t - n_int) * BN + ar
    cmask = cols < hi  # false once t >= n_int (lo + n_int·BN >= hi)
    tmask = (ts >= 0) & (ts < m)
    kj = tl.load(PERM_K + pk_row + cols, mask=cmask, other=0) + tl.load(IDX + smp + ts, mask=tmask, other=0)
    kj = kj.to(tl.int64)
    k = _gather(K, k_head, kj, s_kn, offd, cmask | tmask)
    v = _gather(V, v_head, kj, s_vn, offv, cmask | tmask)
    bias = tl.load(BIAS + smp + ts, mask=tmask, other=0.0)
    stag = tl.load(STAG + smp + ts, mask=tmask, other=-2)
    offset = tl.where(cmask | (tmask & (stag != rtag)), bias * _LOG2E, NEG)
    return k, v, offset


@triton.jit
def _one_block_tiles(q, acc, m_i, l_i, K, V, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_R0, T_NODE, tile,
                     pk_row, s_row, k_head, v_head, m, s_kn, s_vn, scale_log2, offd, offv,
                     BN: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of a row tile inside one sortLSH block (a sortLSH piece; blocks are
    nonempty, so the first tile has a key of every row and the running max is finite).

    All rows share the interval and the block tag, so the interval's key tiles
    and the node's sample tiles are one loop and every mask is a per-column
    logit offset (:func:`_one_block_keys`).
    """
    lo, hi, rtag, smp, n_int, n_all = _one_block_setup(LO, HI, RTAG, T_R0, T_NODE, tile, s_row, m, BN)
    for t in range(0, n_all):
        k, v, offset = _one_block_keys(K, V, PERM_K, IDX, BIAS, STAG, t, lo, hi, rtag, smp, n_int, pk_row,
                                       k_head, v_head, m, s_kn, s_vn, offd, offv, BN)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2 + offset[None, :]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, None, False, PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, PERM_Q, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG, T_R0, T_R1, T_NODE, O, LSE,
                nk, m, H, HK, G, scale_log2,
                s_qb, s_qn, s_kb, s_kn, s_vb, s_vn, s_ob, s_on, s_lb, s_pqb, s_pkb, s_ib,
                D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                HAS_SAMPLES: tl.constexpr, HAS_PERM: tl.constexpr, MERGE: tl.constexpr,
                ONE_BLOCK: tl.constexpr, PREC: tl.constexpr):
    tile, bh, kvh, rows, rmask, qi = _program_rows(T_R0, T_R1, PERM_Q, H, HK, G, s_pqb, BM, HAS_PERM)
    offd = tl.arange(0, D)
    offv = tl.arange(0, DV)
    q = _gather(Q, bh * s_qb, qi, s_qn, offd, rmask)
    m_i = tl.full([BM], NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    pk_row = bh * s_pkb
    k_head = kvh * s_kb
    v_head = kvh * s_vb
    if ONE_BLOCK:
        acc, m_i, l_i = _one_block_tiles(q, acc, m_i, l_i, K, V, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG,
                                         T_R0, T_NODE, tile, pk_row, bh * s_ib, k_head, v_head, m,
                                         s_kn, s_vn, scale_log2, offd, offv, BN, PREC)
    else:
        acc, m_i, l_i = _row_interval_tiles(q, acc, m_i, l_i, K, V, PERM_K, IDX, BIAS, STAG, LO, HI,
                                            RTAG, T_NODE, tile, rows, rmask, pk_row, bh * s_ib,
                                            k_head, v_head, nk, m, s_kn, s_vn, scale_log2, offd, offv,
                                            BM, BN, HAS_SAMPLES, HAS_PERM, PREC)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    o_ptr = O + bh * s_ob + qi[:, None] * s_on + offv[None, :]
    l_ptr = LSE + bh * s_lb + qi
    if MERGE:
        prev2 = tl.load(l_ptr, mask=rmask, other=float("-inf")) * _LOG2E
        o_prev = tl.load(o_ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
        top = tl.maximum(prev2, lse2)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_prev = tl.exp2(prev2 - top)
        w_new = tl.exp2(lse2 - top)
        total = w_prev + w_new
        seen = total > 0.0
        t_safe = tl.where(seen, total, 1.0)
        out = (w_prev[:, None] * o_prev + w_new[:, None] * out) / t_safe[:, None]
        lse2 = tl.where(seen, top + tl.log2(t_safe), float("-inf"))
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(l_ptr, lse2 * _LN2, mask=rmask)
