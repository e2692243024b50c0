"""Triton kernels of the GPU path: attention over per-row key intervals plus sampled keys.

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

Backward (recomputing the probabilities from the final ``lse`` of the whole
attention — every piece is a part of one softmax; ``Δ_i = do_i·o_i − dlse_i``,
one pass of ``_delta_kernel``):
``dq`` per row tile, accumulated over pieces in an fp32 buffer; ``dk, dv`` of
the interval keys per key tile (rows ``[rstart, rend)`` of the tile
precomputed by the caller), written by the first piece (which covers every
key) and added by the others into fp32 buffers of the key/value heads
(atomically when several query heads share one); ``dk, dv`` of the sampled
keys per (sample tile, row chunk), added atomically.

The hash kernel computes the sortLSH sort keys of SPEC §3:
``node_base + gray⁻¹(c(x))·n_node + local_index`` (unique, so any sort is stable), or
for few buckets (``r ≤ 8`` bits) the buckets alone, ordered by a stable counting sort
(``_bucket_count_kernel`` counts per chunk, ``_bucket_scatter_kernel`` places each row):
the same order. ``_sample_kernel`` draws each node's keys by binary searches of the
sampling weights' prefix sums (SPEC §5). The hash and the row-norm kernels can flag
NaN/Inf in the rows they read (``CHECK``): the input check without a separate pass.
The causal leaves may instead be computed by cuDNN (:mod:`hyperref.gpu.leaves`).
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
def _flag_nonfinite(FLAG, x):
    """Set ``FLAG[0] = 1`` if the tile ``x`` holds a NaN or ±Inf (the input check, folded into
    a kernel that reads every row anyway)."""
    bad = tl.zeros([1], tl.int32) + tl.sum(tl.where((x == x) & (tl.abs(x) < float("inf")), 0, 1))
    tl.store(FLAG + tl.arange(0, 1), tl.full([1], 1, tl.int32), mask=bad > 0)


@triton.jit
def _sq_norm_kernel(X, OUT, FLAG, rows, n, s_xb, s_xn, D: tl.constexpr, BM: tl.constexpr,
                    CHECK: tl.constexpr):
    """``OUT[i] = ‖x_i‖²`` (fp32 accumulation) of the rows of X (B, n, D), flattened;
    with ``CHECK``, flags non-finite entries in ``FLAG``."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = r < rows
    offd = tl.arange(0, D)
    x = tl.load(X + (r // n).to(tl.int64)[:, None] * s_xb + (r % n).to(tl.int64)[:, None] * s_xn
                + offd[None, :], mask=rmask[:, None], other=0.0)
    if CHECK:
        _flag_nonfinite(FLAG, x)
    x = x.to(tl.float32)
    tl.store(OUT + r, tl.sum(x * x, axis=1), mask=rmask)


@triton.jit
def _hash_kernel(X, PLANES, KEYS, T_R0, T_R1, T_NODE, NODE_R0, NODE_X0, NODE_N, FLAG,
                 H, HK, G, r, s_xb, s_xn, s_pb, s_pn, s_kb,
                 D: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
                 CHECK: tl.constexpr, CODES: tl.constexpr):
    """Sort keys of one tile of virtual rows: ``(R0_t << r) + bucket·n_t + local``
    (with ``CODES``: the bucket ``gray⁻¹(c(x))`` alone, for the counting sort).

    ``PLANES`` is (BH, nodes, D, r) contiguous in its last two dims; ``X`` row
    ``x0_t + local`` of head ``kv_head(bh)`` is hashed with node ``t``'s planes.
    With ``CHECK``, non-finite entries of the rows are flagged in ``FLAG``.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    xh = _kv_head(bh, H, HK, G)
    node = tl.load(T_NODE + tile)
    r0 = tl.load(T_R0 + tile)
    r1 = tl.load(T_R1 + tile)
    nr0 = tl.load(NODE_R0 + node).to(tl.int64)
    x0 = tl.load(NODE_X0 + node).to(tl.int64)
    n = tl.load(NODE_N + node).to(tl.int64)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    local = rows.to(tl.int64) - nr0
    offd = tl.arange(0, D)
    cols = tl.arange(0, RP)
    x = tl.load(X + xh * s_xb + (x0 + local)[:, None] * s_xn + offd[None, :], mask=rmask[:, None], other=0.0)
    if CHECK:
        _flag_nonfinite(FLAG, x)
    planes = tl.load(PLANES + bh * s_pb + node * s_pn + offd[:, None] * r + cols[None, :],
                     mask=cols[None, :] < r, other=0.0)
    proj = tl.dot(x, planes.to(x.dtype), input_precision=PREC)
    weights = tl.where(cols < r, tl.full([RP], 1, tl.int64) << cols.to(tl.int64), 0)
    code = tl.sum(tl.where(proj > 0, weights[None, :], 0), axis=1)
    code ^= code >> 1
    code ^= code >> 2
    code ^= code >> 4
    code ^= code >> 8
    code ^= code >> 16
    if CODES:
        key = code
    else:
        key = (nr0 << r) + code * n + local
    tl.store(KEYS + bh * s_kb + rows, key.to(KEYS.dtype.element_ty), mask=rmask)


@triton.jit
def _bucket_codes(CODES, rows, rmask, NB: tl.constexpr):
    """The buckets of ``rows``; masked rows get bucket ``2·NB − 1`` (past every real one)."""
    return tl.load(CODES + rows, mask=rmask, other=2 * NB - 1)


@triton.jit
def _bucket_count_kernel(CODES, COUNTS, C_R0, C_R1, n_chunks, s_cb,
                         NB: tl.constexpr, BM: tl.constexpr):
    """Counting sort, pass 1: ``COUNTS[bh, chunk, b]`` = rows of the chunk in bucket ``b < NB``."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    r0 = tl.load(C_R0 + chunk)
    r1 = tl.load(C_R1 + chunk)
    acc = tl.zeros([2 * NB], tl.int32)
    for s in range(r0, r1, BM):
        rows = s + tl.arange(0, BM)
        acc += tl.histogram(_bucket_codes(CODES + bh * s_cb, rows, rows < r1, NB), 2 * NB)
    bins = tl.arange(0, 2 * NB)
    tl.store(COUNTS + (bh * n_chunks + chunk) * NB + bins, acc, mask=bins < NB)


@triton.jit
def _run_start(c1, s1, c2, s2):
    """Scan step: the first position of each element's run of equal (sorted) buckets."""
    return c2, tl.where(c1 == c2, s1, s2)


@triton.jit
def _bucket_scatter_kernel(CODES, COUNTS, C_R0, C_R1, C_NODE, NODE_C0, NODE_C1, NODE_R0, NODE_X0,
                           PERM, POS, n_chunks, s_cb, s_pb, s_ob,
                           NB: tl.constexpr, BM: tl.constexpr, HAS_POS: tl.constexpr):
    """Counting sort, pass 2 (stable): row ``p`` of the chunk, bucket ``b``, goes to virtual
    position ``R0_t`` + (rows of node ``t`` in smaller buckets) + (rows in ``b`` in the node's
    earlier chunks: chunks ``[C0_t, C1_t)`` are the node's, counted by pass 1) + (earlier rows
    of the chunk in ``b``); ``PERM[bh, position]`` = its original index ``x0_t + (p − R0_t)``
    and, with ``HAS_POS``, ``POS[bh, original] = position``. Each tile of ``BM`` rows is sorted
    by (bucket, row): a row's rank in its bucket is its sorted position minus the start of its
    bucket's run."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    r0 = tl.load(C_R0 + chunk)
    r1 = tl.load(C_R1 + chunk)
    node = tl.load(C_NODE + chunk)
    node_r0 = tl.load(NODE_R0 + node)
    shift = tl.load(NODE_X0 + node) - node_r0  # original index − virtual row
    bins = tl.arange(0, 2 * NB)
    total = tl.zeros([2 * NB], tl.int32)
    before = tl.zeros([2 * NB], tl.int32)
    for c in range(tl.load(NODE_C0 + node), tl.load(NODE_C1 + node)):
        counts = tl.load(COUNTS + (bh * n_chunks + c) * NB + bins, mask=bins < NB, other=0)
        total += counts
        before += tl.where(c < chunk, counts, 0)
    base = (node_r0 + tl.cumsum(total, 0) - total + before).to(tl.int32)
    lane = tl.arange(0, BM)
    for s in range(r0, r1, BM):
        codes = _bucket_codes(CODES + bh * s_cb, s + lane, s + lane < r1, NB)
        packed = tl.sort(codes * BM + lane)  # unique: sorted by bucket, then by row
        code = packed // BM
        _, start = tl.associative_scan((code, lane), 0, _run_start)
        dest = tl.gather(base, code, 0) + lane - start
        orig = s + packed % BM + shift
        valid = code < NB
        tl.store(PERM + bh * s_pb + dest, orig.to(tl.int32), mask=valid)
        if HAS_POS:
            tl.store(POS + bh * s_ob + orig, dest, mask=valid)
        base += tl.histogram(codes, 2 * NB)


@triton.jit
def _first_index(ROW, lo, hi, target, STRICT: tl.constexpr, STEPS: tl.constexpr):
    """Per lane: the first ``i`` in ``[lo, hi)`` with ``ROW[i] > target`` (``STRICT``) or
    ``ROW[i] >= target``, else ``hi`` (binary search of a nondecreasing row; ``STEPS`` ≥
    bit length of the longest range + 1)."""
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(ROW + mid, mask=active, other=0.0)
        if STRICT:
            right = val <= target
        else:
            right = val < target
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _sample_kernel(CUM, W, U, STARTS, ENDS, COL_ORIG, POS, KTAG, IDX, BIAS, STAG,
                   n_nodes, m, G, s_cr, s_wr, s_pb,
                   BLOCK: tl.constexpr, RATIO: tl.constexpr, STEPS: tl.constexpr):
    """Inverse-CDF samples of node ``t`` for head ``bh`` (SPEC §5; hyperref.gpu.structure.sample_nodes).

    ``CUM`` (R, C) float64 prefix sums of the weights ``W`` over the piece's virtual keys, row
    ``bh // G``. Sample ``j``: target ``base + u_j·(top − base)`` (``base``, ``top``: the
    prefix sums before and at the node's keys), key = the first whose prefix sum exceeds it,
    at most the node's last key of positive weight. ``p`` = ``W`` there (``RATIO``: divided
    by the node total; a node of total 0 samples uniformly). Writes the original key, the
    log-weight ``−log(m p)`` and its block tag ``KTAG[POS[bh, key]]``.
    """
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    row = bh // G
    start = tl.load(STARTS + t)
    end = tl.load(ENDS + t)
    cum = CUM + row * s_cr
    base = tl.load(cum + tl.maximum(start - 1, 0))
    base = tl.where(start > 0, base, 0.0)
    top = tl.load(cum + end - 1)
    tot = top - base
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.int64)
    # rounding can put a target at the top: the first key whose prefix sum reaches the top
    last = _first_index(cum, zero + start, zero + end, zero.to(tl.float64) + top, False, STEPS)
    n_node = end - start
    for j0 in range(0, m, BLOCK):
        offs = j0 + lanes
        mask = offs < m
        u = tl.load(U + (bh * n_nodes + t) * m + offs, mask=mask, other=0.0)
        c = _first_index(cum, zero + start, zero + end, base + u * tot, True, STEPS)
        c = tl.maximum(tl.minimum(tl.minimum(c, last), end - 1), start)
        if RATIO:
            pick = tl.minimum((u * n_node).to(tl.int64), n_node - 1)
            c = tl.where(tot > 0, c, start + pick)
            w = tl.load(W + row * s_wr + c, mask=mask, other=1.0)
            p = tl.where(tot > 0, w / tl.where(tot > 0, tot, 1.0), 1.0 / n_node.to(tl.float64))
        else:
            p = tl.load(W + row * s_wr + c, mask=mask, other=1.0)
        key = tl.load(COL_ORIG + c, mask=mask, other=0)
        tag = tl.load(KTAG + tl.load(POS + bh * s_pb + key, mask=mask, other=0), mask=mask, other=0)
        out = (bh * n_nodes + t) * m + offs
        tl.store(IDX + out, key.to(tl.int32), mask=mask)
        tl.store(BIAS + out, (-tl.log(m * p)).to(tl.float32), mask=mask)
        tl.store(STAG + out, tag, mask=mask)


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
