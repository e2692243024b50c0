"""Triton kernels of the sampling (SPEC §5): the squared row norms of ``v`` and the samples.

``_sq_norm_kernel`` computes ``‖v_j‖²`` (the ``rownorm`` weights) and can flag NaN/Inf
in the rows it reads (``CHECK``); ``_sample_kernel`` draws each node's keys by binary
searches of the sampling weights' prefix sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _flag_nonfinite


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
