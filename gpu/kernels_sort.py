"""Triton kernels of the sortLSH order (SPEC §3): the hash and the counting sort.

The hash kernel computes the sort keys
``node_base + gray⁻¹(c(x))·n_node + local_index`` (unique, so any sort is stable), or
for few buckets (``r ≤ 8`` bits) the buckets alone, ordered by a stable counting sort
(``_bucket_count_kernel`` counts per chunk, ``_bucket_scatter_kernel`` places each row):
the same order. The hash kernel can flag NaN/Inf in the rows it reads (``CHECK``): the
input check without a separate pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _flag_nonfinite, _kv_head


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
