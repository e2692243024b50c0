"""Numba kernels of HyperAttention: near-linear on the CPU (SPEC §3–§6).

Each kernel is a pure function of (inputs, draws-derived index arrays) that
writes into preallocated outputs, parallel with ``prange`` over
(head, block) or (head, row chunk) tasks. Block products go through
``np.dot`` (BLAS), so a task costs ``O(rows·(b + m)·d)`` time and
``O((rows + b + m)·(d + dv))`` memory; no ``nq × nk`` array exists.

Heads are stacked: ``q`` is ``(H, nq, d)``, ``k``/``v`` are ``(Hk, nk, ·)`` and
``kv_of[h]`` is the key/value head of query head ``h`` (GQA).
Results do not depend on the thread schedule: every task writes its own rows.
The undecorated functions stay reachable as ``kernel.py_func``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

ROW_CHUNK = 256


@njit(cache=True, fastmath={"nsz", "arcp", "contract", "reassoc"})
def _softmax_rows(logits, values, out_o, out_l):
    """Partial softmax of each row of ``logits`` (``-inf`` = excluded) into ``out_o, out_l``.

    The weights are normalized before the product with ``values`` (as
    :func:`hyperref.merge.partial_softmax`): they are at most 1 and sum to 1, so a
    convex combination of finite values stays finite near the dtype's maximum.
    """
    rows, keys = logits.shape
    for r in range(rows):
        peak = logits[r, 0]  # the row's dtype, so float32 rows use expf
        for t in range(1, keys):
            if logits[r, t] > peak:
                peak = logits[r, t]
        if peak == -np.inf:
            out_l[r] = -np.inf
            for t in range(keys):
                logits[r, t] = 0.0
            continue
        total = 0.0
        for t in range(keys):
            w = np.exp(logits[r, t] - peak)
            logits[r, t] = w
            total += w
        out_l[r] = peak + np.log(total)
        for t in range(keys):
            logits[r, t] = logits[r, t] / total
    acc = np.dot(logits, values)
    for r in range(rows):
        for c in range(values.shape[1]):
            out_o[r, c] = acc[r, c] if out_l[r] != -np.inf else 0.0


@njit(cache=True)
def _logsumexp_row(row):
    peak = -np.inf
    for t in range(row.shape[0]):
        if row[t] > peak:
            peak = row[t]
    if peak == -np.inf:
        return -np.inf
    total = 0.0
    for t in range(row.shape[0]):
        total += np.exp(row[t] - peak)
    return peak + np.log(total)


@njit(cache=True)
def _block_task(task, n_blocks, q_starts, block, nk):
    """Task ``task`` of a (head, sortLSH block) loop: head ``h``, block ``g``, the block's
    sorted query rows ``[qs, qe)`` and its sorted keys ``[ks, ke)``."""
    h = task // n_blocks
    g = task - h * n_blocks
    ks = g * block
    return h, g, q_starts[h, g], q_starts[h, g + 1], ks, min(ks + block, nk)


@njit(cache=True)
def row_chunk_task(task, n_chunks, chunk, nq):
    """Task ``task`` of a (head, row chunk) loop of ``n_chunks`` chunks of ``chunk`` rows a head:
    head ``h`` and the chunk's rows ``[r0, r1)``."""
    h = task // n_chunks
    r0 = (task - h * n_chunks) * chunk
    return h, r0, min(nq, r0 + chunk)


@njit(cache=True)
def _gather_rows(x, head, order, start, stop):
    """Rows ``x[head, order[head, start:stop]]`` as a contiguous array."""
    out = np.empty((stop - start, x.shape[2]), dtype=x.dtype)
    for r in range(stop - start):
        out[r] = x[head, order[head, start + r]]
    return out


@njit(parallel=True, cache=True)
def masked_partial(q, k, v, kv_of, scale, perm_q, q_starts, perm_k, block, k_block,
                   samp_idx, samp_logw, out, lse):
    """``masked`` estimator partial (SPEC §5): block keys plus samples outside the block.

    Parameters
    ----------
    perm_q, perm_k : (H, nq), (H, nk) sorted orders; q_starts : (H, G + 1);
    k_block : (H, nk) block of each key; samp_idx, samp_logw : (H, m).
    out : (H, nq, dv), lse : (H, nq), written in original row order.
    """
    n_heads, nq, d = q.shape
    nk, dv = k.shape[1], v.shape[2]
    n_blocks = q_starts.shape[1] - 1
    m = samp_idx.shape[1]
    for task in prange(n_heads * n_blocks):
        h, g, qs, qe, ks, ke = _block_task(task, n_blocks, q_starts, block, nk)
        if qe == qs:
            continue
        hk = kv_of[h]
        nb = ke - ks
        rows = qe - qs
        qg = _gather_rows(q, h, perm_q, qs, qe)
        keys = np.empty((nb + m, d), dtype=q.dtype)
        vals = np.empty((nb + m, dv), dtype=v.dtype)
        bias = np.empty(nb + m, dtype=q.dtype)
        for t in range(nb):
            j = perm_k[h, ks + t]
            keys[t] = k[hk, j]
            vals[t] = v[hk, j]
            bias[t] = 0.0
        for t in range(m):
            j = samp_idx[h, t]
            keys[nb + t] = k[hk, j]
            vals[nb + t] = v[hk, j]
            bias[nb + t] = samp_logw[h, t] if k_block[h, j] != g else -np.inf
        logits = np.dot(qg, keys.T)
        for r in range(rows):
            for t in range(nb + m):
                logits[r, t] = logits[r, t] * scale + bias[t]
        o = np.empty((rows, dv), dtype=v.dtype)
        l = np.empty(rows, dtype=v.dtype)
        _softmax_rows(logits, vals, o, l)
        for r in range(rows):
            i = perm_q[h, qs + r]
            out[h, i] = o[r]
            lse[h, i] = l[r]


@njit(parallel=True, cache=True)
def paper_partial(q, k, v, kv_of, scale, samp_idx, samp_logw, out, lse):
    """``paper`` estimator partial (SPEC §5): every row on the ``m`` samples."""
    n_heads, nq, d = q.shape
    dv = v.shape[2]
    m = samp_idx.shape[1]
    n_chunks = (nq + ROW_CHUNK - 1) // ROW_CHUNK
    for task in prange(n_heads * n_chunks):
        h, r0, r1 = row_chunk_task(task, n_chunks, ROW_CHUNK, nq)
        hk = kv_of[h]
        keys = np.empty((m, d), dtype=q.dtype)
        vals = np.empty((m, dv), dtype=v.dtype)
        for t in range(m):
            keys[t] = k[hk, samp_idx[h, t]]
            vals[t] = v[hk, samp_idx[h, t]]
        logits = np.dot(np.ascontiguousarray(q[h, r0:r1]), keys.T)
        for r in range(r1 - r0):
            for t in range(m):
                logits[r, t] = logits[r, t] * scale + samp_logw[h, t]
        o = np.empty((r1 - r0, dv), dtype=v.dtype)
        l = np.empty(r1 - r0, dtype=v.dtype)
        _softmax_rows(logits, vals, o, l)
        out[h, r0:r1] = o
        lse[h, r0:r1] = l


@njit(parallel=True, cache=True)
def masked_row_sums(q, k, kv_of, scale, perm_q, q_starts, perm_k, block, log_a):
    """ApproxD step 1: ``log a_i = log Σ_j M_ij A_ij`` (SPEC §4)."""
    n_heads, nq, d = q.shape
    nk = k.shape[1]
    n_blocks = q_starts.shape[1] - 1
    for task in prange(n_heads * n_blocks):
        h, g, qs, qe, ks, ke = _block_task(task, n_blocks, q_starts, block, nk)
        if qe == qs:
            continue
        hk = kv_of[h]
        qg = _gather_rows(q, h, perm_q, qs, qe)
        keys = np.empty((ke - ks, d), dtype=q.dtype)
        for t in range(ke - ks):
            keys[t] = k[hk, perm_k[h, ks + t]]
        logits = np.dot(qg, keys.T) * scale
        for r in range(qe - qs):
            log_a[h, perm_q[h, qs + r]] = _logsumexp_row(logits[r])


@njit(parallel=True, cache=True)
def residual_row_sums(q, k, kv_of, scale, q_block, k_block, rows, log_r):
    """ApproxD step 2: exact ``log r_i`` for the rows ``T`` (SPEC §4); ``rows`` is (H, |T|)."""
    n_heads, n_rows = rows.shape
    nk = k.shape[1]
    for task in prange(n_heads * n_rows):
        h = task // n_rows
        t = task - h * n_rows
        i = rows[h, t]
        logits = np.dot(k[kv_of[h]], q[h, i]) * scale
        own = q_block[h, i]
        for j in range(nk):
            if k_block[h, j] == own:
                logits[j] = -np.inf
        log_r[h, t] = _logsumexp_row(logits)


@njit(parallel=True, cache=True)
def residual_estimates(q, k, kv_of, scale, q_block, k_block, cols, log_rhat):
    """ApproxD step 3: ``log ř_i = log((nk/m_d) Σ_t (1 − M_iℓ_t) A_iℓ_t)`` (SPEC §4)."""
    n_heads, nq, d = q.shape
    nk = k.shape[1]
    md = cols.shape[1]
    n_chunks = (nq + ROW_CHUNK - 1) // ROW_CHUNK
    for task in prange(n_heads * n_chunks):
        h, r0, r1 = row_chunk_task(task, n_chunks, ROW_CHUNK, nq)
        keys = np.empty((md, d), dtype=q.dtype)
        for t in range(md):
            keys[t] = k[kv_of[h], cols[h, t]]
        logits = np.dot(np.ascontiguousarray(q[h, r0:r1]), keys.T) * scale
        for r in range(r1 - r0):
            own = q_block[h, r0 + r]
            for t in range(md):
                if k_block[h, cols[h, t]] == own:
                    logits[r, t] = -np.inf
            log_rhat[h, r0 + r] = _logsumexp_row(logits[r]) + np.log(nk / md)


@njit(parallel=True, cache=True)
def exact_causal_ranges(q, k, v, kv_of, scale, ranges, out, lse):
    """Exact causal attention on row/key ranges (the leaves of SPEC §6).

    ``ranges`` is ``(L, 4)`` of ``(q0, q1, k0, k1)``; inside a range, row
    ``i`` sees key ``j`` iff ``j − k0 <= (i − q0) + (k1 − k0) − (q1 − q0)``.
    """
    n_heads = q.shape[0]
    dv = v.shape[2]
    n_ranges = ranges.shape[0]
    max_rows = 0
    for r in range(n_ranges):
        max_rows = max(max_rows, ranges[r, 1] - ranges[r, 0])
    n_chunks = (max_rows + ROW_CHUNK - 1) // ROW_CHUNK
    for task in prange(n_heads * n_ranges * n_chunks):
        h = task // (n_ranges * n_chunks)
        rest = task - h * n_ranges * n_chunks
        rg = rest // n_chunks
        c = rest - rg * n_chunks
        q0, q1, k0, k1 = ranges[rg, 0], ranges[rg, 1], ranges[rg, 2], ranges[rg, 3]
        r0 = q0 + c * ROW_CHUNK
        if r0 >= q1:
            continue
        r1 = min(q1, r0 + ROW_CHUNK)
        offset = (k1 - k0) - (q1 - q0)
        kend = min(k1, k0 + (r1 - 1 - q0) + offset + 1)  # keys visible to the last row
        if kend <= k0:
            for i in range(r0, r1):
                out[h, i] = 0.0
                lse[h, i] = -np.inf
            continue
        hk = kv_of[h]
        logits = np.dot(np.ascontiguousarray(q[h, r0:r1]),
                        np.ascontiguousarray(k[hk, k0:kend]).T) * scale
        for r in range(r1 - r0):
            last = (r0 + r - q0) + offset  # last visible key, relative to k0
            for t in range(max(last + 1, 0), kend - k0):
                logits[r, t] = -np.inf
        o = np.empty((r1 - r0, dv), dtype=v.dtype)
        l = np.empty(r1 - r0, dtype=v.dtype)
        _softmax_rows(logits, np.ascontiguousarray(v[hk, k0:kend]), o, l)
        out[h, r0:r1] = o
        lse[h, r0:r1] = l


@njit(parallel=True, cache=True)
def merge_into(out, lse, shift, q0, o2, l2, s2, carry_shift):
    """LSE merge of the partial ``(o2, l2, s2)`` into rows ``q0:`` of ``(out, lse, shift)`` (SPEC §1).

    A partial ``(o, l, s)`` stands for the answer ``o·e^s`` (ApproxD: ``s = lse − log d̃``;
    ``self``: 0), merged as :func:`hyperref.merge.merge_shifted`:

    .. math::
        l = \\log(e^{l_1} + e^{l_2}),\\quad
        s = \\log(e^{l_1 + s_1} + e^{l_2 + s_2}) - l,\\quad
        o = \\frac{e^{l_1 + s_1} o_1 + e^{l_2 + s_2} o_2}{e^{l_1 + s_1} + e^{l_2 + s_2}}

    with the weights taken relative to the larger exponent and normalized before they meet
    the values, so that nothing overflows before the answer is formed. ``shift`` is
    written only when ``carry_shift`` (ApproxD); with ``self`` it stays 0, as in the reference.
    """
    n_heads, rows = l2.shape
    for task in prange(n_heads * rows):
        h = task // rows
        r = task - h * rows
        i = q0 + r
        l1 = lse[h, i]
        lb = l2[h, r]
        if lb == -np.inf:
            continue
        if l1 == -np.inf:
            out[h, i] = o2[h, r]
            lse[h, i] = lb
            if carry_shift:
                shift[h, i] = s2[h, r]
            continue
        top = max(l1, lb)
        merged = top + np.log(np.exp(l1 - top) + np.exp(lb - top))
        lse[h, i] = merged
        a1 = l1 + shift[h, i]
        a2 = lb + s2[h, r]
        peak = max(a1, a2)
        if not np.isfinite(peak):  # as the reference: no weight, no shift
            out[h, i] = 0.0
            if carry_shift:
                shift[h, i] = 0.0
            continue
        w1 = np.exp(a1 - peak)
        w2 = np.exp(a2 - peak)
        total = w1 + w2
        for c in range(out.shape[2]):
            out[h, i, c] = (w1 / total) * out[h, i, c] + (w2 / total) * o2[h, r, c]
        if carry_shift:
            shift[h, i] = peak + np.log(total) - merged if np.isfinite(merged) else 0.0
