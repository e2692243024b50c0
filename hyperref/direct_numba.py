"""The direct mode (SPEC §6b) with Numba: per query block, work in proportion to the keys it attends.

The NumPy reference :func:`hyperref.direct.direct_head` is the definition; this
engine computes the same function of (inputs, draws) without the reference's
dense ``rows × prefix`` logits and membership. For query block ``t`` (rows
``r0 … r1 − 1``, aligned positions ``c_i = i + nk − nq``, ``nkeys`` the keys its
last row may see) one task

1. resolves the block's ``m`` uniforms into distinct sampled keys and their
   summed weights ``Σ_t [j_t = j] / (m p_j)`` by binary search on prefix sums
   of ``‖v_j‖²`` from the support's fixed start ``s`` (``O(m log n)``, not the
   reference's ``O(|U_t|)`` cumulative sum; :func:`block_samples`);
2. gathers the sorted **candidates** ``C_t``: the union over the block's rows of
   the keys of the parts shared by nearby rows — ``sinks`` (``j < s``),
   ``window`` (causal ``[c_first − w + 1, c_last]``, at most ``w + bq − 1`` keys),
   ``heavykeys`` (one key set per head), ``blocktop`` (the picked key blocks of the
   row blocks the query block meets) — and the sampled keys;
3. marks, row by row, the exact-set keys over ``C_t`` and collects each row's
   **extras**: the keys of the parts that differ row by row — ``sortlsh`` (each
   round, the key block of the row's bucket) and ``quest`` (the row's ``keep``
   keys, :func:`quest_keys`) — that are not in ``C_t``;
4. computes the weights ``W_ij`` of SPEC §6b on ``C_t`` (1 on ``E_i``, the sampled
   weight on a visible sampled key outside ``E_i``, else 0) and 1 on the extras,
   the logits ``Q_t K_{C_t}ᵀ`` by BLAS, the extras' by dot products (quest's from
   its own float64 scores), and one partial softmax per row with bias ``log W_ij``.

A task costs ``O(bq · (|C_t| + extras) · (d + dv))`` with
``|C_t| ≤ s + w + bq − 1 + |heavykeys| + Σ blocktop keys + m``, so a head costs
``O(nq · (keys attended + bq) · d)``: near-linear for ``sinks``, ``window``,
``sortlsh``, ``heavykeys`` and the attention of ``blocktop``. The selections
that rank keys cost what the reference's do: ``sortlsh`` hashes and sorts
(``O(n log n)``), ``heavykeys`` scores ``|T|`` rows (``O(|T|·nk·d)``), ``blocktop``
scores every row against every key-block mean (``O(nq·nk/b·d)``), all by the
reference's own ``prepare``. ``quest`` bounds every visible key block for every
row: ``O(nk/b · d)`` a row, a fraction ``1/b`` of exact attention's work, **not**
near-linear (it dominates the cost of :func:`hyperref.presets.causal_lm` from a
few thousand keys on). The oracle ``topk`` is reference-only (:func:`supports`).

Agreement with the reference on the same draws: the attended keys, weights and
counts are the same; logits and sums differ by rounding (summation order). Two
discrete steps compare floating-point numbers computed in another order: the
inverse CDF (a uniform within rounding, ``≈ n·ε`` of a CDF step, may pick the
neighbouring key) and the ``quest`` ranking (float64 bounds and scores, as in the
reference, within ``≈ d·ε`` of each other may swap). Exact ties break as in
the reference (smaller index first). Every task writes its own rows: results do
not depend on the thread schedule. The undecorated kernels stay reachable as
``kernel.py_func``.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, njit, prange
from threadpoolctl import ThreadpoolController

from ._validation import InputError
from .config import HyperConfig
from .direct import paper_exact_set
from .exact_set import BlockTop, ExactSet, Geometry, HeavyKeys, Quest, Sinks, SortLSH, Window
from .numba_kernels import row_chunk_task
from .sampling import squared_row_norms

#: the exact-set parts this engine computes (the oracle ``topk`` is reference-only)
FAST_PARTS = (Sinks, Window, SortLSH, HeavyKeys, BlockTop, Quest)
#: sampler codes of the kernels (SPEC §5)
SAMPLER_CODES = {"rownorm": 0, "uniform": 1, "mixed": 2}
#: dtypes the kernels are compiled for
DTYPES = (np.float32, np.float64)


def supports(exact_set: ExactSet, dtype) -> bool:
    """Whether this engine computes ``exact_set`` on inputs of ``dtype`` (else: the reference)."""
    return np.dtype(dtype) in DTYPES and all(type(p) in FAST_PARTS for p in exact_set.parts)


# ----------------------------------------------------------------------------- sampling


@njit(cache=True)
def _cdf(j, size, pref, total, sampler):
    """CDF of the support's distribution at support index ``j`` (inclusive)."""
    if sampler == 1 or total <= 0.0:  # uniform; rownorm of a zero support is uniform too
        return (j + 1) / size
    if sampler == 0:
        return pref[j + 1] / total
    return 0.5 * (pref[j + 1] / total) + 0.5 * ((j + 1) / size)


@njit(cache=True)
def _probability(sq_j, size, total, sampler):
    """``p_j`` as :func:`hyperref.direct.support_probabilities` writes it."""
    uniform = 1.0 / size
    if sampler == 1:
        return uniform
    rownorm = sq_j / total if total > 0.0 else uniform
    return rownorm if sampler == 0 else 0.5 * rownorm + 0.5 * uniform


@njit(cache=True)
def block_samples(u, sq, pref, lo, hi, sampler, keys, weight):
    """The distinct sampled keys of one block and their summed weights; returns their number.

    Same inverse CDF as :func:`hyperref.direct.sample_block`: ``j_t`` is the first
    support index whose CDF exceeds ``u_t``, found by binary search on
    ``pref[x] = Σ_{l < x} ‖v_{lo+l}‖²`` (prefix sums from the support's start ``lo``).
    Keys with ``p_j = 0`` are never chosen (the CDF does not rise there).

    Parameters
    ----------
    u : (m,) uniforms; sq : (nk,) ``‖v_j‖²`` (scaled); pref : (nk − lo + 1,)
    lo, hi : the support ``[lo, hi)``; sampler : :data:`SAMPLER_CODES`
    keys, weight : (m,) outputs, sorted absolute keys and ``Σ_t [j_t = j] / (m p_j)``
    """
    m = u.shape[0]
    if hi <= lo or m == 0:
        return 0
    size = hi - lo
    total = pref[size]
    idx = np.empty(m, dtype=np.int64)
    for t in range(m):
        a, b = 0, size - 1  # cdf(size − 1) = 1 > u_t
        while a < b:
            mid = (a + b) // 2
            if _cdf(mid, size, pref, total, sampler) > u[t]:
                b = mid
            else:
                a = mid + 1
        idx[t] = a
    idx.sort()
    n = 0
    t = 0
    while t < m:
        first = t
        while t < m and idx[t] == idx[first]:
            t += 1
        j = idx[first]
        keys[n] = j + lo
        weight[n] = (t - first) / (m * _probability(sq[j + lo], size, total, sampler))
        n += 1
    return n


# ----------------------------------------------------------------------------- selections


@njit(cache=True)
def _select(a, m, kth):
    """The ``kth`` smallest (0-based) of ``a[:m]``, reordering ``a[:m]`` (Hoare's quickselect)."""
    lo, hi = 0, m - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))  # median of three
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return a[kth]
    return a[kth]


@njit(cache=True)
def _kth_largest(vals, n, count, buf):
    """The ``count``-th largest of ``vals[:n]`` (``count ≤ n``); ``buf`` is scratch of ``n`` entries.

    A strided sample of 256 values gives a lower bound ``lo`` that about
    ``1.5·count + 32`` values pass; the answer is selected among those (when at
    least ``count`` pass, it is theirs), else among all ``n``.
    """
    target = count + count // 2 + 32
    if n > 4 * target and n >= 1024:
        n_s = 256
        stride = n // n_s
        for x in range(n_s):
            buf[x] = vals[x * stride]
        rank = (target * n_s) // n  # sample values expected above lo
        lo = _select(buf, n_s, n_s - 1 - rank)
        m = 0
        for g in range(n):
            if vals[g] >= lo:
                buf[m] = vals[g]
                m += 1
        if m >= count:
            return _select(buf, m, m - count)
    for g in range(n):
        buf[g] = vals[g]
    return _select(buf, n, n - count)


@njit(cache=True)
def _top(vals, n, count, chosen, buf):
    """Indices of the ``count`` largest of ``vals[:n]``, ties by smaller index, in increasing order.

    The set a stable argsort of ``−vals`` takes first; returns its size ``min(n, count)``.
    ``buf`` is scratch of ``n`` entries.
    """
    if n <= count:
        for g in range(n):
            chosen[g] = g
        return n
    thr = _kth_largest(vals, n, count, buf)
    above = 0
    for g in range(n):
        if vals[g] > thr:
            above += 1
    ties = count - above
    c = 0
    for g in range(n):
        if vals[g] > thr:
            chosen[c] = g
            c += 1
        elif vals[g] == thr and ties > 0:
            chosen[c] = g
            c += 1
            ties -= 1
    return c


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _dot(a, b):
    """``a · b`` accumulated in float64 (any summation order)."""
    acc = 0.0
    for c in range(a.shape[0]):
        acc += a[c] * b[c]
    return acc


@njit(cache=True)
def _far_blocks(c, w, b, nk, n_kb):
    """Key blocks ``g`` (a prefix) with ``min((g+1)·b, nk) − 1 ≤ c − w``: quest's causal candidates."""
    lim = c - w
    if lim < 0:
        return 0
    f = min(n_kb, (lim + 1) // b)
    if f < n_kb and min((f + 1) * b, nk) - 1 <= lim:
        f += 1  # the last, short block
    return f


@njit(parallel=True, cache=True)
def quest_keys(q64, k64, kv_of, kmin, kmax, block, n_cand, keep, scale, offset, w, causal, bq,
               out_keys, out_logits, col0):
    """The keys :meth:`hyperref.exact_set.Quest.member` gives every row, in float64 like it.

    Per query block: the bounds ``β_ig`` of the key blocks wholly before each
    row's window (causal; all blocks otherwise) by two BLAS products; per row the
    ``n_cand`` blocks of highest bound; the exact scores of their keys, computed
    key block by key block for all the rows that chose it (a block is read once
    per query block, not once per row); per row the ``keep`` best (ties by smaller
    index). ``O(nk/b · d + n_cand·b · d)`` a row.

    Parameters
    ----------
    q64 : (H, nq, d) float64; k64 : (Hk, nk, d) float64; kmin, kmax : (H, n_kb, d)
    out_keys : (H, nq, X) int64, row ``i``'s keys written to columns ``col0 … col0 + keep − 1``
        (``−1`` where a row has fewer).
    out_logits : (H, nq, X) float64, their logits ``scale · q_i · k_j``
    """
    n_heads, nq, d = q64.shape
    nk = k64.shape[1]
    n_kb = kmin.shape[1]
    n_t = (nq + bq - 1) // bq
    for task in prange(n_heads * n_t):
        h, r0, r1 = row_chunk_task(task, n_t, bq, nq)
        rows = r1 - r0
        hk = kv_of[h]
        g_max = _far_blocks(r1 - 1 + offset, w, block, nk, n_kb) if causal else n_kb
        if g_max == 0:
            continue
        qb = np.ascontiguousarray(q64[h, r0:r1])
        bound = (np.dot(np.maximum(qb, 0.0), np.ascontiguousarray(kmax[h, :g_max]).T)
                 + np.dot(np.minimum(qb, 0.0), np.ascontiguousarray(kmin[h, :g_max]).T))
        chosen = np.empty((rows, n_cand), dtype=np.int64)
        n_chosen = np.empty(rows, dtype=np.int64)
        start = np.zeros(g_max + 1, dtype=np.int64)
        buf = np.empty(max(g_max, n_cand * block), dtype=np.float64)
        for r in range(rows):
            far = _far_blocks(r0 + r + offset, w, block, nk, n_kb) if causal else n_kb
            n_chosen[r] = _top(bound[r], far, n_cand, chosen[r], buf)
            for x in range(n_chosen[r]):
                start[chosen[r, x] + 1] += 1
        for g in range(g_max):
            start[g + 1] += start[g]
        members = np.empty(start[g_max], dtype=np.int64)  # the rows that chose block g, in order
        fill = start[:g_max].copy()
        for r in range(rows):
            for x in range(n_chosen[r]):
                g = chosen[r, x]
                members[fill[g]] = r
                fill[g] += 1
        score = np.full((rows, n_cand * block), -np.inf)  # −inf past nk (a short last block)
        ptr = np.zeros(rows, dtype=np.int64)
        for g in range(g_max):  # each row meets its blocks in increasing order
            for e in range(start[g], start[g + 1]):
                r = members[e]
                for y in range(min(block, nk - g * block)):
                    score[r, ptr[r] + y] = _dot(qb[r], k64[hk, g * block + y]) * scale
                ptr[r] += block
        best = np.empty(keep, dtype=np.int64)
        for r in range(rows):
            n_keep = _top(score[r], ptr[r], keep, best, buf)
            col = col0
            for x in range(n_keep):
                j = chosen[r, best[x] // block] * block + best[x] % block
                if j < nk and score[r, best[x]] > -np.inf:
                    out_keys[h, r0 + r, col] = j
                    out_logits[h, r0 + r, col] = score[r, best[x]]
                    col += 1


# ----------------------------------------------------------------------------- the blocks


@njit(cache=True)
def _add(j, pos, cand, nc):
    """Append key ``j`` to the candidates unless marked (``pos[j] != −1``)."""
    if pos[j] == -1:
        pos[j] = -2
        cand[nc] = j
        nc += 1
    return nc


@njit(cache=True)
def _mark(j, logit, r, rid, pos, stamp, weight, extras, ext_logit, ne):
    """Exact-set key ``j`` of row ``r``: membership on the candidates, else a new extra.

    ``logit`` is its logit when known (quest scored it), else NaN (computed later).
    """
    p = pos[j]
    if p >= 0:
        weight[r, p] = 1.0
    elif stamp[j] != rid:
        stamp[j] = rid
        extras[ne] = j
        ext_logit[ne] = logit
        ne += 1
    return ne


@njit(cache=True)
def _one_block(h, t, q, k, v, kv_of, scale, offset, causal, bq, s, w, heavy, bt_picks, bt_block,
               lsh_qblock, lsh_keys, lsh_block, extra_keys, extra_logits, sq, pref, sample_u, sampler,
               pos, stamp, out, lse, counts):
    """Query block ``t`` of head ``h`` (steps 1–4 of the module docstring); ``pos``, ``stamp`` scratch."""
    nq, d = q.shape[1], q.shape[2]
    nk, dv = k.shape[1], v.shape[2]
    hk = kv_of[h]
    r0 = t * bq
    r1 = min(nq, r0 + bq)
    rows = r1 - r0
    c_first, c_last = r0 + offset, r1 - 1 + offset
    nkeys = min(nk, c_last + 1) if causal else nk
    if nkeys <= 0:
        return  # these rows see no key: out 0, lse −inf, no keys
    # 1. samples of the support [lo, hi) (hyperref.direct.block_support)
    lo = s
    hi = (c_last + 1 - w if w > 0 else c_last + 1) if causal else nk
    hi = max(lo, max(0, min(hi, nk)))
    m = sample_u.shape[2]
    s_keys = np.empty(m, dtype=np.int64)
    s_weight = np.empty(m, dtype=np.float64)
    ns = block_samples(sample_u[h, t], sq[hk], pref[hk], lo, hi, sampler, s_keys, s_weight)
    # 2. candidates: sinks, window, heavy keys, blocktop blocks, samples
    n_parts, n_picks = bt_picks.shape[0], bt_picks.shape[3]
    w_lo = max(0, c_first - w + 1)
    w_hi = min(nkeys - 1, c_last) if causal else min(nk - 1, c_last + w - 1)
    cap = min(s, nkeys) + (max(0, w_hi - w_lo + 1) if w > 0 else 0) + heavy.shape[1] + ns
    for p in range(n_parts):
        b = bt_block[p]
        cap += ((r1 - 1) // b - r0 // b + 1) * n_picks * b
    cand = np.empty(cap, dtype=np.int64)
    nc = 0
    for j in range(min(s, nkeys)):
        nc = _add(j, pos, cand, nc)
    if w > 0:
        for j in range(w_lo, w_hi + 1):
            nc = _add(j, pos, cand, nc)
    for x in range(heavy.shape[1]):
        if heavy[h, x] < nkeys:
            nc = _add(heavy[h, x], pos, cand, nc)
    for p in range(n_parts):
        b = bt_block[p]
        for rb in range(r0 // b, (r1 - 1) // b + 1):
            for x in range(n_picks):
                g = bt_picks[p, h, rb, x]
                if g >= 0:
                    for j in range(g * b, min((g + 1) * b, nkeys)):
                        nc = _add(j, pos, cand, nc)
    for x in range(ns):
        if s_keys[x] < nkeys:
            nc = _add(s_keys[x], pos, cand, nc)
    cand = np.sort(cand[:nc])
    for c in range(nc):
        pos[cand[c]] = c
    # 3. membership over the candidates and each row's extras; then the sampled weights
    weight = np.zeros((rows, nc), dtype=np.float64)
    n_rounds, n_extra = lsh_qblock.shape[1], extra_keys.shape[2]
    x_cap = n_extra
    for rr in range(n_rounds):
        x_cap += lsh_block[rr]
    extras = np.empty((rows, x_cap), dtype=np.int64)
    ext_logit = np.empty((rows, x_cap), dtype=np.float64)
    n_ext = np.zeros(rows, dtype=np.int64)
    for r in range(rows):
        i = r0 + r
        ci = i + offset
        last = min(ci, nkeys - 1) if causal else nkeys - 1  # the last key row i sees
        if last < 0:
            continue
        for j in range(min(s, last + 1)):
            weight[r, pos[j]] = 1.0
        if w > 0:
            for j in range(max(0, ci - w + 1), min(last, ci + w - 1) + 1):
                weight[r, pos[j]] = 1.0
        for x in range(heavy.shape[1]):
            if heavy[h, x] <= last:
                weight[r, pos[heavy[h, x]]] = 1.0
        for p in range(n_parts):
            b = bt_block[p]
            for x in range(n_picks):
                g = bt_picks[p, h, i // b, x]
                if g >= 0:
                    for j in range(g * b, min((g + 1) * b, last + 1)):
                        weight[r, pos[j]] = 1.0
        rid = h * nq + i
        ne = 0
        for x in range(n_extra):
            j = extra_keys[h, i, x]
            if 0 <= j <= last:
                ne = _mark(j, extra_logits[h, i, x], r, rid, pos, stamp, weight, extras[r],
                           ext_logit[r], ne)
        for rr in range(n_rounds):
            b = lsh_block[rr]
            g = lsh_qblock[h, rr, i]
            for x in range(g * b, min((g + 1) * b, nk)):
                j = lsh_keys[h, rr, x]
                if j <= last:
                    ne = _mark(j, np.nan, r, rid, pos, stamp, weight, extras[r], ext_logit[r], ne)
        n_ext[r] = ne
        for x in range(ns):  # a visible sampled key outside E_i: its summed weight
            j = s_keys[x]
            if j <= last and weight[r, pos[j]] == 0.0:
                weight[r, pos[j]] = s_weight[x]
    for c in range(nc):
        pos[cand[c]] = -1
    # 4. logits on the candidates (BLAS) and the extras (dot products); one softmax per row
    keys = np.empty((nc, d), dtype=k.dtype)
    vals = np.empty((nc, dv), dtype=v.dtype)
    for c in range(nc):
        keys[c] = k[hk, cand[c]]
        vals[c] = v[hk, cand[c]]
    qb = np.ascontiguousarray(q[h, r0:r1])
    logits = np.dot(qb, keys.T) if nc > 0 else np.zeros((rows, 0), dtype=q.dtype)
    ext_e = np.empty(x_cap, dtype=np.float64)
    ext_o = np.zeros((rows, dv), dtype=np.float64)
    for r in range(rows):
        i = r0 + r
        ne = n_ext[r]
        peak = -np.inf
        used = ne
        for c in range(nc):
            wt = weight[r, c]
            if wt == 1.0:
                logits[r, c] = logits[r, c] * scale
            elif wt > 0.0:
                logits[r, c] = logits[r, c] * scale + np.log(wt)
            else:
                logits[r, c] = -np.inf
                continue
            used += 1
            if logits[r, c] > peak:
                peak = logits[r, c]
        for x in range(ne):
            known = ext_logit[r, x]
            ext_e[x] = known if known == known else _dot(q[h, i], k[hk, extras[r, x]]) * scale
            if ext_e[x] > peak:
                peak = ext_e[x]
        counts[h, i] = used
        if peak == -np.inf:
            for c in range(nc):
                logits[r, c] = 0.0
            continue  # out 0, lse −inf
        total = 0.0
        for c in range(nc):
            e = np.exp(logits[r, c] - peak) if weight[r, c] > 0.0 else 0.0
            logits[r, c] = e
            total += e
        for x in range(ne):
            ext_e[x] = np.exp(ext_e[x] - peak)
            total += ext_e[x]
        lse[h, i] = peak + np.log(total)
        inv = 1.0 / total
        for c in range(nc):
            logits[r, c] = logits[r, c] * inv
        for x in range(ne):
            e = ext_e[x] * inv
            j = extras[r, x]
            for col in range(dv):
                ext_o[r, col] += e * v[hk, j, col]
    o = np.dot(logits, vals) if nc > 0 else np.zeros((rows, dv), dtype=v.dtype)
    for r in range(rows):
        if lse[h, r0 + r] == -np.inf:
            continue
        for col in range(dv):
            out[h, r0 + r, col] = o[r, col] + ext_o[r, col]


@njit(parallel=True, cache=True)
def direct_blocks(q, k, v, kv_of, scale, offset, causal, bq, s, w, heavy, bt_picks, bt_block,
                  lsh_qblock, lsh_keys, lsh_block, extra_keys, extra_logits, sq, pref, sample_u,
                  sampler, n_chunks, out, lse, counts):
    """The direct mode of stacked heads, one task per (head, query block) (SPEC §6b).

    Parameters
    ----------
    q : (H, nq, d); k, v : (Hk, nk, ·); kv_of : (H,) key/value head of each query head
    scale : scalar of q's dtype; offset : ``nk − nq``; causal : bool; bq : rows per block
    s, w : sink count and window width of the exact set
    heavy : (H, nh) int64, the heavy keys of each head, padded with ``nk``
    bt_picks : (P, H, n_rb, count) int64 key blocks per row block of each blocktop part
        (``−1``: none); bt_block : (P,) their block sizes
    lsh_qblock : (H, R, nq) bucket block of each row, every sortLSH round;
    lsh_keys : (H, R, nk) keys in block order (block ``g``: positions ``g·b … (g+1)·b − 1``);
    lsh_block : (R,) block sizes
    extra_keys : (H, nq, X) int64, more exact-set keys of each row (quest), ``−1`` padded;
    extra_logits : (H, nq, X) float64, their logits (as :func:`quest_keys` scored them)
    sq : (Hk, nk) ``‖v_j‖²`` (scaled); pref : (Hk, nk − s + 1) their prefix sums from ``s``
    sample_u : (H, T, m) uniforms; sampler : :data:`SAMPLER_CODES`
    n_chunks : tasks are dealt to this many chunks (strided), each with its own scratch
    out : (H, nq, dv) zeros; lse : (H, nq) −inf; counts : (H, nq) zeros — written per row
    """
    n_heads, nq = q.shape[0], q.shape[1]
    nk = k.shape[1]
    n_t = (nq + bq - 1) // bq
    n_tasks = n_heads * n_t
    n_chunks = max(1, min(n_tasks, n_chunks))
    for chunk in prange(n_chunks):
        pos = np.full(nk, -1, dtype=np.int64)  # candidate slot of a key, −1: none
        stamp = np.full(nk, -1, dtype=np.int64)  # last row that took a key as an extra
        for task in range(chunk, n_tasks, n_chunks):  # strided: early and late blocks mixed
            h = task // n_t
            _one_block(h, task - h * n_t, q, k, v, kv_of, scale, offset, causal, bq, s, w, heavy,
                       bt_picks, bt_block, lsh_qblock, lsh_keys, lsh_block, extra_keys, extra_logits,
                       sq, pref, sample_u, sampler, pos, stamp, out, lse, counts)


# ----------------------------------------------------------------------------- the driver


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """One :class:`threadpoolctl.ThreadpoolController` (finding the libraries costs milliseconds)."""
    return ThreadpoolController()


def _per_head(arr, batch_shape, n_heads):
    """``arr`` with its leading ``batch_shape`` flattened to ``(n_heads,)``."""
    return arr.reshape((n_heads,) + arr.shape[len(batch_shape):])


def _float64_below(u):
    """``u`` as C-contiguous float64, each entry the largest float64 ``<= u``.

    Hand-built draws may hold uniforms of any float dtype. The kernels compare them with
    float64 CDF values ``c`` (:func:`block_samples`: ``c > u``), and ``c > u`` exactly when
    ``c`` exceeds the float64 below ``u``, so the sampled keys are those of ``u`` itself;
    float16, float32 and float64 uniforms (and longdouble ones that float64 holds) are
    unchanged.
    """
    below = np.ascontiguousarray(u, dtype=np.float64)
    if u.dtype.itemsize > below.dtype.itemsize:
        with np.errstate(invalid="ignore"):
            above = below > u
        below[above] = np.nextafter(below[above], -np.inf)
    return below


def _stack(rows, fill, dtype=np.int64):
    """Equal-length 2-d stack of 1-d arrays, padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for x, r in enumerate(rows):
        out[x, :len(r)] = r
    return out


def direct_heads(q, k, v, scale, config: HyperConfig, draws, causal: bool):
    """The direct mode of ``(B, H, N, D)`` inputs with the Numba kernels; returns ``(out, lse, keys)``.

    Same contract as :func:`hyperref.direct.direct_heads` (the reference): ``draws``
    is the call's :class:`hyperref.Draws`, for batch shape ``(B, H)`` or ``()``
    with ``B = H = 1``; ``keys`` (B, H, nq) counts the keys of nonzero weight of
    every row.

    Raises
    ------
    InputError
        The exact set has a part this engine does not compute (the oracle ``topk``)
        or the dtype is not float32/float64: :func:`supports` says which.

    Examples
    --------
    >>> from hyperref import make_draws
    >>> from hyperref.direct import direct_heads as reference
    >>> from hyperref.exact_set import sinks, sortlsh, window
    >>> cfg = HyperConfig(mode="direct", exact_set=sinks(2) | window(16) | sortlsh(4, 16),
    ...                   samples=8, query_block=16, min_seq_len=16)
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 1, 100, 8))
    >>> draws = make_draws(cfg, 100, 100, 8, causal=True, batch_shape=(1, 1), rng=0)
    >>> out, lse, keys = direct_heads(q, k, v, 0.35, cfg, draws, True)
    >>> ref_out, ref_lse, ref_keys = reference(q, k, v, 0.35, cfg, draws, True)
    >>> bool((keys == ref_keys).all()), bool(np.abs(out - ref_out).max() < 1e-12)
    (True, True)
    """
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    exact_set, bq = paper_exact_set(config), config.query_block
    if not supports(exact_set, q.dtype):
        raise InputError(f"the Numba direct engine computes {', '.join(p.kind for p in FAST_PARTS)} on "
                         f"float32/float64; got {exact_set.describe()} on {q.dtype} "
                         "(engine='numpy' computes every part)")
    geom = Geometry(nq, nk, causal)
    exact_set = exact_set.within(geom)  # sizes beyond the sequence act as the whole sequence
    n_heads, group = b * h, h // hk
    qs = np.ascontiguousarray(q.reshape(n_heads, nq, d))
    ks = np.ascontiguousarray(k.reshape(b * hk, nk, d))
    vs = np.ascontiguousarray(v.reshape(b * hk, nk, dv))
    kv_of = np.array([bi * hk + hi // group for bi in range(b) for hi in range(h)], dtype=np.int64)
    direct, batch = draws.direct, tuple(draws.batch_shape)
    u = _float64_below(_per_head(direct.sample_u, batch, n_heads))
    part_draws = [None if a is None else _per_head(a, batch, n_heads) for a in direct.exact]
    states = [exact_set.prepare(qs[x], ks[kv_of[x]], scale, geom,
                                tuple(None if a is None else a[x] for a in part_draws))
              for x in range(n_heads)]
    s, w = exact_set.sink_count, exact_set.window_width
    by_kind = lambda kind: [(p, [st[x] for st in states]) for x, p in enumerate(exact_set.parts)
                            if p.kind == kind]
    heavy_parts = [sts for _, sts in by_kind("heavykeys")]
    heavy = _stack([np.unique(np.concatenate([np.zeros(0, np.int64)] + [sts[x] for sts in heavy_parts]))
                    for x in range(n_heads)], nk)
    tops = by_kind("blocktop")
    n_rb = max((len(sts[0]) for _, sts in tops), default=1)
    n_picks = max((sts[0].shape[1] for _, sts in tops), default=1)
    bt_picks = np.full((len(tops), n_heads, n_rb, n_picks), -1, dtype=np.int64)
    for p, (_, sts) in enumerate(tops):
        for x, st in enumerate(sts):
            bt_picks[p, x, :st.shape[0], :st.shape[1]] = st
    bt_block = np.array([part.block for part, _ in tops], dtype=np.int64)
    qblock, kblock, lsh_block = [], [], []
    for part, sts in by_kind("sortlsh"):
        qblock.append(np.stack([st[0] for st in sts], axis=0))
        kblock.append(np.stack([np.argsort(st[1], axis=1, kind="stable") for st in sts], axis=0))
        lsh_block += [part.block] * part.rounds
    lsh_qblock = (np.ascontiguousarray(np.concatenate(qblock, axis=1)) if qblock
                  else np.zeros((n_heads, 0, nq), np.int64))
    lsh_keys = (np.ascontiguousarray(np.concatenate(kblock, axis=1)) if kblock
                else np.zeros((n_heads, 0, nk), np.int64))
    lsh_block = np.array(lsh_block, dtype=np.int64)
    quests = by_kind("quest")
    extra = np.full((n_heads, nq, sum(part.keep for part, _ in quests)), -1, dtype=np.int64)
    extra_logits = np.zeros(extra.shape)
    sq = np.stack([squared_row_norms(vs[x]) for x in range(b * hk)])
    pref = np.zeros((b * hk, max(nk - s, 0) + 1))
    np.cumsum(sq[:, s:], axis=1, out=pref[:, 1:])
    out = np.zeros((n_heads, nq, dv), dtype=v.dtype)
    lse = np.full((n_heads, nq), -np.inf, dtype=v.dtype)
    counts = np.zeros((n_heads, nq), dtype=np.int64)
    # the kernels parallelize over tasks and call BLAS inside each: one BLAS thread per task
    with _blas_controller().limit(limits=1, user_api="blas"):
        if quests:
            q64, k64 = qs.astype(np.float64), ks.astype(np.float64)
            col = 0
            for part, sts in quests:
                kmin = np.stack([st[0] for st in sts])
                kmax = np.stack([st[1] for st in sts])
                quest_keys(q64, k64, kv_of, kmin, kmax, part.block, part.candidates // part.block,
                           part.keep, float(scale), nk - nq, sts[0][2], causal, bq, extra,
                           extra_logits, col)
                col += part.keep
        direct_blocks(qs, ks, vs, kv_of, qs.dtype.type(scale), nk - nq, causal, bq, s, w, heavy,
                      bt_picks, bt_block, lsh_qblock, lsh_keys, lsh_block, extra, extra_logits, sq,
                      pref, u, SAMPLER_CODES[config.sampler], 4 * get_num_threads(), out, lse, counts)
    shape = (b, h, nq)
    return out.reshape(shape + (dv,)), lse.reshape(shape), counts.reshape(shape)
