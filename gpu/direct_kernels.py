"""Triton kernels of the direct mode's plan: heavy-key column mass, block-pick scores, blockkeys masses, sample
search, tile lists.

Each kernel computes on the GPU what a torch function of :mod:`hyperref.gpu.direct_select`
(the tile listing and the own-key tiles: of :mod:`hyperref.gpu.direct_plan`) computes with
dense intermediates, without them:

* ``heavykeys`` (:func:`heavy_mass`): for the sampled rows ``T`` of a head, the
  column mass ``Σ_{i∈T} P_ij`` over the keys outside the sinks and window, ``P``
  the exact softmax rows. Two passes over the keys: the rows' ``lse`` (online, base
  2), then per key tile the masked sum of ``exp(s_ij − lse_i)``. Work
  ``2·|T|·nk·d`` multiply-adds, memory ``O(nk)`` (the dense form holds ``|T|·nk``
  probabilities);
* ``blocktop`` (:func:`pick_scores`): ``σ_tg = max_{i∈t} q_i · k̄_g`` per row block
  ``t`` and key block ``g``, the maximum taken in registers (the dense form writes
  every ``q_i · k̄_g``);
* ``blockkeys`` (:func:`block_key_rep_mass`, :func:`block_key_fine_mass`): the
  representatives' softmax mass per key block over their row block's eligible keys
  (the ``lse`` pass of :func:`heavy_mass`, then one program per head, representative
  tile and key block; :func:`block_key_rep_lse` its log normalizers, and
  :func:`block_key_top` the coarse choice from them: per row block the sum over its
  representatives and the best key blocks, in registers; with ``peaks`` maxima in place of
  the log-sum-exps and of the sum, no exponential per logit, and :func:`block_key_peak_top`
  the same choice (up to ties that float32 rounding makes) from each representative's running
  list of its best blocks, without the per-block table), and the fine stage's ``π_tj``
  over each row block's candidates
  (one program per head and row block: the rows' ``lse`` over sinks, window and
  candidates, then the column sums; the dense forms hold ``rows × candidates``
  logits);
* samples (:func:`sample_search`): the inverse-CDF binary search of each uniform
  on the head's prefix sums, one program per query block, the searches of its
  ``m`` samples side by side (the torch form runs ``⌈log2 nk⌉`` passes over all of
  them, each a gather);
* tile lists (:func:`tile_listing`): the marked columns of each row of tile marks, in
  order, by a running count (the torch form a cumulative sum and a scatter over the
  whole array);
* own-key tiles (:func:`own_tile_lists`): per query tile its partial and full key tiles
  (sinks and window by index arithmetic, the picked and routed blocks from their tables)
  listed in one pass, in lists as wide as the most tiles a query tile can list, the
  (B, H, NT, NKT) marks written only where a backward transposes them (the torch form
  :func:`hyperref.gpu.direct_plan.own_tiles` some twenty dense operations on the marks,
  then two listings).

Logits in fp32 from the inputs' dtype (tensor-core products, fp32 accumulation).
On the CPU the kernels run under ``TRITON_INTERPRET=1`` (tests, float32 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # a finite "masked" logit: fully masked tiles give no NaN


@triton.jit
def _heavy_lse_kernel(q_ptr, k_ptr, rows_ptr, lse_ptr, nk, R, offset, scale_log2, H, chunk,
                      sqb, sqh, sqn, skb, skh, skn,
                      CAUSAL: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    split = tl.program_id(2)  # keys [split·chunk, (split + 1)·chunk): a partial lse per split
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    live = r < R
    rows = tl.load(rows_ptr + bh * R + r, mask=live, other=0)
    dd = tl.arange(0, D)
    qt = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :], mask=live[:, None], other=0.0)
    c = rows + offset
    m = tl.full((BR,), _NEG, tl.float32)
    acc = tl.zeros((BR,), tl.float32)
    end = tl.minimum(nk, (split + 1) * chunk)
    for j0 in range(split * chunk, end, BN):
        j = j0 + tl.arange(0, BN)
        kt = tl.load(k_ptr + b * skb + h * skh + j[:, None] * skn + dd[None, :], mask=(j < end)[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kt)) * scale_log2
        seen = (j < end)[None, :]
        if CAUSAL:
            seen = seen & (j[None, :] <= c[:, None])
        s = tl.where(seen, s, _NEG)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.where(seen, tl.exp2(s - m_new[:, None]), 0.0)
        acc = acc * tl.exp2(m - m_new) + tl.sum(p, 1)
        m = m_new
    n_split = tl.num_programs(2)
    tl.store(lse_ptr + (bh * n_split + split) * R + r, m + tl.log2(acc), mask=live)  # base 2; −inf: no key


@triton.jit
def _heavy_mass_kernel(q_ptr, k_ptr, rows_ptr, lse_ptr, score_ptr, nk, R, offset, scale_log2, H, sinks, window,
                       sqb, sqh, sqn, skb, skh, skn,
                       CAUSAL: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    j = tl.program_id(1) * BN + tl.arange(0, BN)
    dd = tl.arange(0, D)
    kt = tl.load(k_ptr + b * skb + h * skh + j[:, None] * skn + dd[None, :], mask=(j < nk)[:, None], other=0.0)
    mass = tl.zeros((BN,), tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        live = r < R
        rows = tl.load(rows_ptr + bh * R + r, mask=live, other=0)
        lse = tl.load(lse_ptr + bh * R + r, mask=live, other=0.0)
        qt = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kt)) * scale_log2
        c = (rows + offset)[:, None]
        jj = j[None, :]
        far = live[:, None] & (jj < nk) & (jj >= sinks)
        if CAUSAL:
            far = far & (jj <= c - window) & (jj <= c)
        else:
            far = far & (tl.abs(c - jj) >= window)
        mass += tl.sum(tl.where(far, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(score_ptr + bh * nk + j, mass, mask=j < nk)


def _pow2(x: int) -> bool:
    """A power of two ≥ 16 (what ``tl.dot`` and ``tl.arange`` take for a tile side)."""
    return x >= 16 and not x & (x - 1)


def _check_dot_inputs(name, *xs):
    """Raise unless ``xs`` are float16/bfloat16/float32 with a unit-stride power-of-two last axis ≥ 16."""
    x = xs[0]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not _pow2(x.shape[-1]):
        raise ValueError(f"{name} takes float16/bfloat16/float32 inputs with a power-of-two d >= 16")
    if any(t.stride(-1) != 1 for t in xs):
        raise ValueError(f"{name} needs unit-stride head dimensions")


def heavy_mass(q, k, rows, scale, causal, covered):
    """Column mass ``Σ_{i∈T} P_ij`` of the keys outside ``covered = (sinks, window)``: (B, H, nk) fp32.

    ``q`` (B, H, nq, d), ``k`` (B, H, nk, d), ``rows`` (B, H, ``|T|``) int64, ``d`` a power of two ≥ 16.
    """
    _check_dot_inputs("heavy_mass", q, k)
    bsz, h, nq, d = q.shape
    nk, n_rows = k.shape[2], rows.shape[-1]
    rows = rows.contiguous()
    score = torch.empty(bsz, h, nk, dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3])
    br, bn = 64, 64
    # the rows' lse in splits of the key axis (enough programs to fill the device), then combined
    n_split = max(1, min(64, triton.cdiv(nk, 4096)))
    chunk = triton.cdiv(triton.cdiv(nk, n_split), bn) * bn
    n_split = triton.cdiv(nk, chunk)
    parts = torch.empty(bsz, h, n_split, n_rows, dtype=torch.float32, device=q.device)
    _heavy_lse_kernel[(bsz * h, triton.cdiv(n_rows, br), n_split)](
        q, k, rows, parts, nk, n_rows, nk - nq, scale * LOG2E, h, chunk, *strides,
        CAUSAL=bool(causal), D=d, BR=br, BN=bn)
    lse = torch.logsumexp(parts * LN2, dim=2) * LOG2E  # base 2 again
    _heavy_mass_kernel[(bsz * h, triton.cdiv(nk, bn))](
        q, k, rows, lse, score, nk, n_rows, nk - nq, scale * LOG2E, h, int(covered[0]), int(covered[1]), *strides,
        CAUSAL=bool(causal), D=d, BR=br, BN=bn)
    return score


@triton.jit
def _pick_score_kernel(q_ptr, means_ptr, score_ptr, nq, n_kb, n_rb, H, sqb, sqh, sqn,
                       BLK: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    bh = tl.program_id(2)
    b, h = bh // H, bh % H
    t = tl.program_id(1)
    g = tl.program_id(0) * BG + tl.arange(0, BG)
    dd = tl.arange(0, D)
    km = tl.load(means_ptr + bh * n_kb * D + g[:, None] * D + dd[None, :], mask=(g < n_kb)[:, None], other=0.0)
    best = tl.full((BG,), float("-inf"), tl.float32)
    for r0 in range(0, BLK, BR):
        i = t * BLK + r0 + tl.arange(0, BR)
        live = (i < nq) & (r0 + tl.arange(0, BR) < BLK)
        qt = tl.load(q_ptr + b * sqb + h * sqh + i[:, None] * sqn + dd[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(km))
        best = tl.maximum(best, tl.max(tl.where(live[:, None], s, float("-inf")), 0))
    tl.store(score_ptr + (bh * n_rb + t) * n_kb + g, best, mask=g < n_kb)


def pick_scores(q, means, block):
    """``σ_tg = max_{i∈t} q_i · k̄_g``: (B, H, row blocks, key blocks) fp32.

    ``q`` (B, H, nq, d), ``means`` (B, H, key blocks, d) in the dtype of ``q``; row blocks of
    ``block`` rows.
    """
    _check_dot_inputs("pick_scores", q)
    bsz, h, nq, d = q.shape
    n_kb = means.shape[2]
    n_rb = -(-nq // block)
    means = means.to(q.dtype).contiguous()
    score = torch.empty(bsz, h, n_rb, n_kb, dtype=torch.float32, device=q.device)
    br = min(64, triton.next_power_of_2(block))
    bg = 64
    # key-block chunks on the fastest axis: the programs of one row block run together and
    # read its rows once from memory
    _pick_score_kernel[(triton.cdiv(n_kb, bg), n_rb, bsz * h)](
        q, means, score, nq, n_kb, n_rb, h, *q.stride()[:3], BLK=block, D=d, BR=br, BG=bg)
    return score


@triton.jit
def _sample_search_kernel(pre_ptr, u_ptr, lo_ptr, hi_ptr, a_ptr, total_ptr, lastp_ptr, idx_ptr, nk, T, M,
                          STEPS: tl.constexpr, ROWNORM: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)  # one (head, query block)
    bh = pid // T
    t = pid % T
    lo = tl.load(lo_ptr + t)
    hi = tl.load(hi_ptr + t)
    pre = pre_ptr + bh * (nk + 1)
    base = tl.load(pre + lo)
    total = tl.load(total_ptr + pid)
    a = tl.load(a_ptr + pid)
    safe_total = tl.where(total > 0, total, 1.0)
    size = tl.maximum(hi - lo, 1).to(tl.float64)
    last = tl.maximum(hi - 1, 0)
    f_last = a * ((tl.load(pre + last + 1) - base) / safe_total) + (1 - a) * ((last + 1 - lo).to(tl.float64) / size)
    for m0 in range(0, M, BM):
        mm = m0 + tl.arange(0, BM)
        live = mm < M
        u = tl.load(u_ptr + pid * M + mm, mask=live, other=0.0)
        target = u * f_last
        left = tl.zeros((BM,), tl.int64) + lo
        right = tl.zeros((BM,), tl.int64) + last
        for _ in range(STEPS):
            mid = (left + right) // 2
            cdf = a * ((tl.load(pre + mid + 1) - base) / safe_total) + (1 - a) * ((mid + 1 - lo).to(tl.float64) / size)
            go = cdf <= target
            left = tl.where(go, mid + 1, left)
            right = tl.where(go, right, mid)
        idx = tl.minimum(left, last)
        if ROWNORM:
            idx = tl.minimum(idx, tl.load(lastp_ptr + pid))
        tl.store(idx_ptr + pid * M + mm, idx, mask=live)


def sample_search(pre, u, lo, hi, a, total, last_positive=None):
    """Sampled key per uniform: the smallest ``j`` in ``[lo_t, hi_t)`` with ``F_t(j) > u·F_t(hi_t − 1)``.

    ``pre`` (B, H, nk + 1) float64 prefix sums of the head's squared row norms; ``u``
    (B, H, T, m) float64; ``lo``, ``hi`` (T,) int64 support bounds of each query block;
    ``a`` (B, H, T) the row-norm share of the mixture and ``total`` (B, H, T) the support's
    mass, float64; ``last_positive`` (B, H, T) int64: the ``rownorm`` sampler's last key of
    positive norm in the support (``None`` otherwise). ``F_t`` as
    :func:`hyperref.gpu.direct_select.sample_slots`. Returns (B, H, T, m) int64.
    """
    bsz, h, n_t, m = u.shape
    nk = pre.shape[-1] - 1
    idx = torch.empty(bsz, h, n_t, m, dtype=torch.int64, device=u.device)
    if idx.numel() == 0:
        return idx
    lastp = last_positive.contiguous() if last_positive is not None else a  # unread without ROWNORM
    _sample_search_kernel[(bsz * h * n_t,)](
        pre.contiguous(), u.contiguous(), lo.contiguous(), hi.contiguous(), a.contiguous(), total.contiguous(),
        lastp, idx, nk, n_t, m, STEPS=max(1, int(nk).bit_length()), ROWNORM=last_positive is not None,
        BM=min(128, triton.next_power_of_2(max(m, 16))))
    return idx


# ---------------------------------------------------------------- blockkeys: coarse and fine mass

@triton.jit
def _online(m, acc, s, ok):
    """One tile of an online base-2 log-sum-exp per row (masked entries excluded)."""
    s = tl.where(ok, s, _NEG)
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.where(ok, tl.exp2(s - m_new[:, None]), 0.0)
    return m_new, acc * tl.exp2(m - m_new) + tl.sum(p, 1)


@triton.jit
def _keep_top(tv, ti, v, g):
    """Key block ``g`` of value ``v`` (BR,) into each row's running list of its ``CNT`` best
    blocks (``tv`` values, ``ti`` blocks, (BR, CNT)), by value, ties by the smaller block.

    The blocks come in ascending order, so a new one enters only above the list's smallest
    value, and evicts, among the entries of that value, the one of the largest block (placeholder
    entries hold −inf and distinct negative blocks)."""
    least = tl.min(tv, 1)
    low = tv == least[:, None]
    evict = tl.max(tl.where(low, ti, -(2 ** 30)), 1)
    put = low & (ti == evict[:, None]) & (v > least)[:, None]
    return tl.where(put, v[:, None], tv), tl.where(put, g, ti).to(tl.int32)  # g: int64 in the causal kernel


@triton.jit
def _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window, scale_log2, skn, dd,
                   CAUSAL: tl.constexpr, MASKED: tl.constexpr, KB: tl.constexpr, PEAKS: tl.constexpr,
                   TOP: tl.constexpr):
    """One key block ``g`` of the coarse kernel: the rows' running (max, sum) and the block's
    base-2 log-sum-exp over its eligible keys, stored at ``part_row + g`` (``PEAKS``: the
    running max alone and the block's largest eligible logit, base 2, no exponential; ``TOP``:
    that logit kept in the rows' running lists of their best blocks instead of stored).
    ``MASKED=False``: a block every key of which is visible and eligible for every row (no masks)."""
    j = g * KB + tl.arange(0, KB)
    if MASKED:
        kt = tl.load(kbase + j[:, None] * skn + dd[None, :], mask=(j < nk)[:, None], other=0.0)
    else:
        kt = tl.load(kbase + j[:, None] * skn + dd[None, :])
    s = tl.dot(qt, tl.trans(kt))
    # one exponential per logit, relative to the block's largest visible one: the running
    # lse takes the block's sum, the eligible keys' log-sum-exp the masked sum of the same terms
    if MASKED:
        jj = j[None, :]
        seen = live[:, None] & (jj < nk)
        if CAUSAL:
            seen = seen & (jj <= c[:, None])
        s = tl.where(seen, s, _NEG)
        mb = tl.max(s, 1) * scale_log2
        elig = seen & (jj >= sinks)
        if CAUSAL:
            elig = elig & (jj <= cf[:, None] - window)
        else:
            elig = elig & ((jj <= cf[:, None] - window) | (jj >= cl[:, None] + window) | (window == 0))
        if PEAKS:
            pk = tl.max(tl.where(elig, s, _NEG), 1)
            lb = tl.where(pk == _NEG, float("-inf"), pk * scale_log2)  # −inf: no eligible key
        else:
            p = tl.where(seen, tl.exp2(s * scale_log2 - mb[:, None]), 0.0)
            lb = mb + tl.log2(tl.sum(tl.where(elig, p, 0.0), 1))  # base 2; −inf: no eligible key
            total = tl.sum(p, 1)
    else:
        mb = tl.max(s, 1) * scale_log2
        lb = mb
        if not PEAKS:
            p = tl.exp2(s * scale_log2 - mb[:, None])
            total = tl.sum(p, 1)
            lb = mb + tl.log2(total)
    m_new = tl.maximum(m, mb)
    if not PEAKS:
        acc = acc * tl.exp2(m - m_new) + total * tl.exp2(mb - m_new)
    if TOP:
        tv, ti = _keep_top(tv, ti, lb, g)
    else:
        tl.store(part_row + g, lb, mask=live)
    return m_new, acc, tv, ti


@triton.jit
def _block_key_rep_kernel(q_ptr, k_ptr, rows_ptr, lse_ptr, part_ptr, tv_ptr, ti_ptr, nq, nk, R, reps, blk, offset,
                          scale_log2, H, n_kb, chunk_blocks, sinks, window, sqb, sqh, sqn, skb, skh, skn,
                          CAUSAL: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, KB: tl.constexpr,
                          PEAKS: tl.constexpr, TOP: tl.constexpr, CNT: tl.constexpr):
    """``TOP`` (peaks rule): per row and split the ``CNT`` best key blocks, at
    ``tv_ptr``/``ti_ptr`` ((bh·n_split + split)·R + r)·CNT, instead of every block's peak."""
    bh = tl.program_id(0).to(tl.int64)  # (bh·R + r)·n_kb passes 2³¹ at long sequences
    b, h = bh // H, bh % H
    split = tl.program_id(2)  # key blocks [split·chunk_blocks, …): a partial lse of the rows per split
    r0 = tl.program_id(1) * BR
    r = r0 + tl.arange(0, BR)
    live = r < R
    rows = tl.load(rows_ptr + r, mask=live, other=0)  # the same rows for every head
    t = r // reps
    c = rows + offset
    cf = t * blk + offset
    cl = tl.minimum((t + 1) * blk, nq) - 1 + offset
    dd = tl.arange(0, D)
    qt = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :], mask=live[:, None], other=0.0)
    kbase = k_ptr + b * skb + h * skh
    part_row = part_ptr + (bh * R + r) * n_kb
    m = tl.full((BR,), _NEG, tl.float32)
    acc = tl.zeros((BR,), tl.float32)
    tv = tl.full((BR, CNT), float("-inf"), tl.float32)  # TOP: the running lists (else unused)
    ti = tl.zeros((BR, CNT), tl.int32) - 1 - tl.arange(0, CNT)[None, :]
    g0 = split * chunk_blocks
    g_end = tl.minimum(n_kb, (split + 1) * chunk_blocks)
    if CAUSAL:  # no visible key beyond the last row's position
        g_end = tl.minimum(g_end, (tl.max(tl.where(live, c, -1)) + KB) // KB)
    # the blocks wholly visible and eligible for every row of the program need no mask: past
    # the sinks, whole, before the first row block's window (non-causal: or after the last's)
    t_lo = r0 // reps
    t_hi = (tl.minimum(r0 + BR, R) - 1) // reps
    cf_min = t_lo * blk + offset
    cl_max = tl.minimum((t_hi + 1) * blk, nq) - 1 + offset
    whole_end = nk // KB
    lo = tl.minimum(tl.maximum((sinks + KB - 1) // KB, g0), g_end)
    if CAUSAL:
        before = tl.maximum(cf_min - window + 1, 0) // KB
    else:
        before = tl.where(window == 0, whole_end, tl.maximum(cf_min - window + 1, 0) // KB)
    hi = tl.maximum(tl.minimum(tl.minimum(before, whole_end), g_end), lo)
    a_lo = g_end  # non-causal with a window: the whole blocks after the last row block's window
    a_hi = g_end
    if not CAUSAL:
        a_lo = tl.where(window == 0, g_end, tl.minimum(tl.maximum((cl_max + window + KB - 1) // KB, hi), g_end))
        a_hi = tl.maximum(tl.minimum(whole_end, g_end), a_lo)
    for g in range(g0, lo):
        m, acc, tv, ti = _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window,
                                        scale_log2, skn, dd, CAUSAL, True, KB, PEAKS, TOP)
    for g in range(lo, hi):
        m, acc, tv, ti = _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window,
                                        scale_log2, skn, dd, CAUSAL, False, KB, PEAKS, TOP)
    for g in range(hi, a_lo):
        m, acc, tv, ti = _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window,
                                        scale_log2, skn, dd, CAUSAL, True, KB, PEAKS, TOP)
    for g in range(a_lo, a_hi):
        m, acc, tv, ti = _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window,
                                        scale_log2, skn, dd, CAUSAL, False, KB, PEAKS, TOP)
    for g in range(a_hi, g_end):
        m, acc, tv, ti = _rep_key_block(qt, kbase, g, m, acc, part_row, tv, ti, live, c, cf, cl, nk, sinks, window,
                                        scale_log2, skn, dd, CAUSAL, True, KB, PEAKS, TOP)
    n_split = tl.num_programs(2)
    if TOP:
        at = ((bh * n_split + split) * R + r)[:, None] * CNT + tl.arange(0, CNT)[None, :]
        tl.store(tv_ptr + at, tv, mask=live[:, None])
        tl.store(ti_ptr + at, ti, mask=live[:, None])
    if PEAKS:  # the rows' largest visible logit (−inf: none in this split)
        part = tl.where(m == _NEG, float("-inf"), m)
    else:
        part = m + tl.log2(acc)
    tl.store(lse_ptr + (bh * n_split + split) * R + r, part, mask=live)


def _check_block_key_inputs(q, k, key_block):
    _check_dot_inputs("the blockkeys kernels", q, k)
    if not _pow2(key_block):
        raise ValueError(f"the blockkeys kernels take a power-of-two key_block >= 16, got {key_block}")


def block_key_rep_mass(q, k, reps, block, key_block, scale, causal, covered, launch=None, peaks=False):
    """The representatives' softmax mass per key block over their block's eligible keys
    (``peaks``: their largest eligible logit per key block minus their largest visible one,
    the ``rep_scores`` of the ``peaks`` rule).

    ``reps`` (T, r) int64 rows (``r`` per row block of ``block`` rows, row block ``t``
    first); returns (B, H, T·r, ⌈nk/key_block⌉) fp32, the ``rep_scores`` of
    :func:`hyperref.gpu.direct_select.block_key_candidates`:
    ``Σ_{j ∈ g, j eligible for t} exp(s_ij − lse_i)``, ``lse_i`` over the row's visible keys,
    eligibility as :func:`hyperref.gpu.direct_select._eligible`; ``exp2`` of the two log
    normalizers of :func:`block_key_rep_lse`.
    """
    block_lse, lse = block_key_rep_lse(q, k, reps, block, key_block, scale, causal, covered, launch, peaks)
    return (block_lse - lse[..., None]) * LN2 if peaks else torch.exp2(block_lse - lse[..., None])


def block_key_rep_lse(q, k, reps, block, key_block, scale, causal, covered, launch=None, peaks=False):
    """Base-2 log normalizers of the representatives: per eligible key block and per row.

    ``reps`` (T, r) int64 rows as :func:`block_key_rep_mass`; returns ``block_lse`` (B, H,
    T·r, ⌈nk/key_block⌉) fp32, ``log2 Σ_{j ∈ g, j eligible for t} 2^{s_ij log2 e}`` (−inf for
    none), and ``lse`` (B, H, T·r) fp32 over the row's visible keys (+inf for a row that sees
    none, so that its mass ``2^{block_lse − lse}`` is 0). One pass over the keys: each
    key block's log-sum-exp over its eligible keys and the row's running ``lse`` (in splits of
    the key axis, merged after); one exponential per logit, taken relative to the key block's
    largest visible logit, so that a block whose eligible keys lie more than 126 (base 2) below
    it counts mass 0. ``launch``: launch parameters (``BR`` rows per program, ``num_warps``,
    ``num_stages``, ``split_keys`` keys per split of the key axis) over the defaults. ``peaks``: maxima instead of log-sum-exps (the key
    block's largest eligible logit and the row's largest visible one, base 2, −inf / +inf
    for none), no exponential per logit.
    """
    bsz, h, _, _ = q.shape
    n_kb = triton.cdiv(k.shape[2], key_block)
    block_lse = torch.full((bsz, h, reps.numel(), n_kb), float("-inf"), dtype=torch.float32, device=q.device)
    lse = _coarse_pass(q, k, reps, block, key_block, scale, causal, covered, launch, peaks, block_lse=block_lse)
    return block_lse, lse


#: keys per split of the coarse kernel's key axis (at most 32 splits; ``launch["split_keys"]`` sets it)
SPLIT_KEYS = 4096


def _splits(nk, key_block, launch=None):
    """The coarse kernel's splits of the key axis, at most 32 of about ``split_keys`` keys (``launch``'s,
    default :data:`SPLIT_KEYS`): (splits, key blocks per split)."""
    per = int((launch or {}).get("split_keys", SPLIT_KEYS))
    if per < 1:
        raise ValueError(f"split_keys must be at least 1, got {per}")
    n_kb = triton.cdiv(nk, key_block)
    chunk_blocks = triton.cdiv(n_kb, max(1, min(32, triton.cdiv(nk, per))))
    return triton.cdiv(n_kb, chunk_blocks), chunk_blocks


def _coarse_pass(q, k, reps, block, key_block, scale, causal, covered, launch, peaks, block_lse=None, tops=None):
    """One launch of the coarse kernel and the merge of its splits: the rows' base-2 lse (peaks: max)
    (B, H, T·r); the per-block normalizers go to ``block_lse``, or (peaks rule) each row's and
    split's best blocks to ``tops`` = (values, blocks) (B, H, splits, T·r, CNT)."""
    _check_block_key_inputs(q, k, key_block)
    if key_block > 128:
        raise ValueError(f"the blockkeys coarse kernel takes key_block <= 128, got {key_block}")
    bsz, h, nq, d = q.shape
    nk = k.shape[2]
    n_t, r = reps.shape
    n_rows = n_t * r
    n_kb = triton.cdiv(nk, key_block)
    rows = reps.reshape(n_rows).contiguous()
    strides = (*q.stride()[:3], *k.stride()[:3])
    # 128 rows per program for the peaks rule, 64 for the mass rule (probes/results/coarse_launch.md)
    opts = {"BR": 128 if peaks else 64, "num_warps": 4, "num_stages": 3, **(launch or {})}
    n_split, chunk_blocks = _splits(nk, key_block, opts)
    opts.pop("split_keys", None)
    parts = torch.empty(bsz, h, n_split, n_rows, dtype=torch.float32, device=q.device)
    tv, ti = tops if tops is not None else (parts, parts)
    _block_key_rep_kernel[(bsz * h, triton.cdiv(n_rows, opts["BR"]), n_split)](
        q, k, rows, parts, parts if block_lse is None else block_lse, tv, ti, nq, nk, n_rows, r, block, nk - nq,
        scale * LOG2E, h, n_kb, chunk_blocks, int(covered[0]), int(covered[1]), *strides, CAUSAL=bool(causal), D=d,
        KB=key_block, PEAKS=bool(peaks), TOP=tops is not None, CNT=1 if tops is None else tv.shape[-1], **opts)
    lse = torch.empty(bsz, h, n_rows, dtype=torch.float32, device=q.device)
    if lse.numel():
        _merge_splits_kernel[(bsz * h, triton.cdiv(n_rows, 128))](parts, lse, n_rows, n_split, PEAKS=bool(peaks),
                                                                   BR=128)
    return lse


#: the most key blocks per row block that the peaks rule chooses from running lists
#: (:func:`block_key_peak_top`); more go through the normalizer table (:func:`block_key_top`)
PEAK_TOP_MAX = 16


def block_key_peak_top(q, k, reps, block, key_block, count, scale, causal, covered, launch=None):
    """The coarse stage's choice by the peaks rule without the per-block table: (B, H, T, count) int64.

    The blocks of :func:`block_key_top` over :func:`block_key_rep_lse` (``peaks=True``) but
    where float32 rounding makes two different peaks tie (``p_mB < p_mC`` with
    ``fl(p_mB − M_m) = fl(p_mC − M_m)``: the table takes the smaller block, the lists the larger
    peak; both are blocks of the same rounded ``σ``): per row block ``t`` the ``count`` key
    blocks of largest ``σ_tg = max_m (p_mg − M_m)``,
    ``p_mg`` representative ``m``'s largest eligible logit in block ``g`` and ``M_m`` its
    largest visible one, ties by the smaller block, ascending, −1 for none. The coarse kernel
    keeps, per representative and split of the key axis, its ``CNT = 2^⌈log2 count⌉`` blocks
    of largest ``p_mg`` (a shift by ``M_m`` keeps each representative's order); a block among
    the ``count`` best by ``σ`` is among the best ``count`` of the representative that attains
    its maximum, so the union of those lists holds the answer, and one program per (batch·head,
    row block) takes it from there. Memory per head ``O(T·r·splits·CNT)`` (at most 32 splits),
    where the table holds ``T·r·⌈nk/key_block⌉`` entries. ``1 ≤ count ≤`` :data:`PEAK_TOP_MAX`.
    """
    if not 1 <= count <= PEAK_TOP_MAX:
        raise ValueError(f"block_key_peak_top takes 1 <= count <= {PEAK_TOP_MAX}, got {count}")
    bsz, h, nq, _ = q.shape
    nk = k.shape[2]
    n_t, r = reps.shape
    cnt = triton.next_power_of_2(count)
    n_split, _ = _splits(nk, key_block, launch)
    shape = (bsz, h, n_split, n_t * r, cnt)
    tops = (torch.empty(shape, dtype=torch.float32, device=q.device),
            torch.empty(shape, dtype=torch.int32, device=q.device))
    lse = _coarse_pass(q, k, reps, block, key_block, scale, causal, covered, launch, True, tops=tops)
    out = torch.full((bsz, h, n_t, count), -1, dtype=torch.int64, device=q.device)
    if out.numel():
        _peak_select_kernel[(bsz * h * n_t,)](*tops, lse, out, n_t, r, n_split, count, CNT=cnt,
                                              NE=triton.next_power_of_2(r * n_split * cnt),
                                              NC=triton.next_power_of_2(count),
                                              num_warps=4 if r * n_split * cnt <= 2048 else 8)
    return out


@triton.jit
def _peak_select_kernel(tv_ptr, ti_ptr, lse_ptr, out_ptr, T, reps, n_split, count, CNT: tl.constexpr,
                        NE: tl.constexpr, NC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (batch·head, row block) per program
    bh, t = pid // T, pid % T
    R = T * reps
    e = tl.arange(0, NE)  # entry (representative m, split, slot)
    live = e < reps * n_split * CNT
    m = e // (n_split * CNT)
    sp = (e // CNT) % n_split
    row = t * reps + m
    at = ((bh * n_split + sp) * R + row) * CNT + e % CNT
    g = tl.load(ti_ptr + at, mask=live, other=-1)
    x = tl.load(tv_ptr + at, mask=live, other=float("-inf")) - tl.load(lse_ptr + bh * R + row, mask=live, other=0.0)
    x = tl.where(live & (g >= 0) & (x == x), x, float("-inf"))
    slot = tl.arange(0, NC)
    chosen = tl.full((NC,), -1, tl.int32)
    for i in range(count):  # the largest left, ties by the smaller block; a block's σ is its best entry
        top = tl.max(x, 0)
        first = tl.min(tl.where(x == top, g, 2 ** 30), 0)
        chosen = tl.where(slot == i, tl.where(top > float("-inf"), first, -1), chosen)
        x = tl.where(g == first, float("-inf"), x)
    # ascending, the −1s last: each chosen block's place is the number of chosen blocks below it
    below = tl.sum(((chosen[None, :] < chosen[:, None]) & (chosen[None, :] >= 0)).to(tl.int32), 1)
    tl.store(out_ptr + pid * count + below, chosen.to(tl.int64), mask=chosen >= 0)


@triton.jit
def _merge_splits_kernel(parts_ptr, lse_ptr, R, n_split, PEAKS: tl.constexpr, BR: tl.constexpr):
    """The rows' base-2 lse from their per-split partial ones (``PEAKS``: their maximum); +inf
    where no split saw a key (or where non-finite logits make it NaN), so that the rows' masses are 0."""
    bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    live = r < R
    m = tl.full((BR,), float("-inf"), tl.float32)
    for sp in range(n_split):
        m = tl.maximum(m, tl.load(parts_ptr + (bh * n_split + sp) * R + r, mask=live, other=float("-inf")))
    safe = tl.where(m > float("-inf"), m, 0.0)
    if PEAKS:
        lse = tl.where(m > float("-inf"), m, float("inf"))
    else:
        acc = tl.zeros((BR,), tl.float32)
        for sp in range(n_split):
            acc += tl.exp2(tl.load(parts_ptr + (bh * n_split + sp) * R + r, mask=live, other=float("-inf")) - safe)
        lse = tl.where(m > float("-inf"), safe + tl.log2(acc), float("inf"))
    tl.store(lse_ptr + bh * R + r, tl.where(lse == lse, lse, float("inf")), mask=live)  # NaN (inf logits): mass 0


@triton.jit
def _block_key_top_kernel(blse_ptr, lse_ptr, out_ptr, T, reps, n_kb, count, nq, nk, offset, blk, kb, sinks, window,
                          CAUSAL: tl.constexpr, PEAKS: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (batch·head, row block) per program
    bh, t = pid // T, pid % T
    g = tl.arange(0, NB)
    live = g < n_kb
    if PEAKS:
        sigma = tl.full((NB,), float("-inf"), tl.float32)
    else:
        sigma = tl.zeros((NB,), tl.float32)
    for m in range(reps):
        row = bh * T * reps + t * reps + m
        lse = tl.load(lse_ptr + row)
        score = tl.load(blse_ptr + row * n_kb + g, mask=live, other=float("-inf")) - lse
        if PEAKS:
            sigma = tl.maximum(sigma, score)
        else:
            sigma += tl.exp2(score)
    # key blocks holding an eligible key of row block t (direct_select._blocks_with_eligible)
    lo = tl.maximum(g * kb, sinks)
    hi = tl.minimum((g + 1) * kb, nk) - 1
    ok = lo <= tl.minimum(hi, t * blk + offset - window)
    if not CAUSAL:
        after = tl.maximum(lo, tl.minimum((t + 1) * blk, nq) - 1 + offset + window) <= hi
        ok = tl.where(window == 0, lo <= hi, ok | after)
    x = tl.where(ok & live, sigma, float("-inf"))
    chosen = tl.zeros((NB,), tl.int32)
    for _ in range(count):  # the largest left, ties by the smaller block (as direct_select._top)
        top = tl.max(x, 0)
        first = tl.min(tl.where(x == top, g, NB), 0)
        chosen = tl.where((g == first) & (x > float("-inf")), 1, chosen)
        x = tl.where(g == first, float("-inf"), x)
    slot = tl.cumsum(chosen, 0) - 1
    tl.store(out_ptr + pid * count + slot, g.to(tl.int64), mask=chosen != 0)


def block_key_top(block_lse, lse, n_reps, block, key_block, count, nq, nk, causal, covered, peaks=False):
    """The coarse stage's choice from :func:`block_key_rep_lse`'s normalizers: (B, H, T, count) int64.

    Per row block ``t`` the ``count`` key blocks of largest ``σ_tg = Σ_m 2^{block_lse − lse}``
    (``peaks``: ``max_m (block_lse − lse)``) over its ``n_reps`` representatives among the blocks that hold a key eligible for it, ties
    by the smaller block, ascending, −1 for none: the answer of
    :func:`hyperref.gpu.direct_select.block_key_candidates` given the masses
    :func:`block_key_rep_mass`, with ``σ`` summed in registers (one program per head and row
    block, ``count`` rounds of a maximum) instead of the dense masses, their sum, mask and ranking.
    """
    bsz, h, n_rows, n_kb = block_lse.shape
    if n_rows % n_reps or lse.shape != block_lse.shape[:3]:
        raise ValueError(f"block_key_top takes (B, H, T·reps, key blocks) and (B, H, T·reps) normalizers, got "
                         f"{tuple(block_lse.shape)} and {tuple(lse.shape)} with n_reps={n_reps}")
    n_t = n_rows // n_reps
    out = torch.full((bsz, h, n_t, count), -1, dtype=torch.int64, device=block_lse.device)
    if out.numel():
        _block_key_top_kernel[(bsz * h * n_t,)](
            block_lse.contiguous(), lse.contiguous(), out, n_t, n_reps, n_kb, count, nq, nk, nk - nq, block, key_block,
            int(covered[0]), int(covered[1]), CAUSAL=bool(causal), PEAKS=bool(peaks), NB=triton.next_power_of_2(n_kb),
            num_warps=4 if n_kb <= 2048 else 8)
    return out


@triton.jit
def _candidate_tile(kbase, j0, nk, sinks, e_hi, e_lo, skn, dd, BN: tl.constexpr):
    """Keys ``j0 … j0 + BN − 1`` of a candidate block: which are eligible, and their key rows.

    ``j0 < 0`` (no candidate: block −1) gives none; eligible is ``j <= e_hi or j >= e_lo``.
    """
    j = j0 + tl.arange(0, BN)
    col = (j >= 0) & (j < nk) & (j >= sinks) & ((j <= e_hi) | (j >= e_lo))
    return col, tl.load(kbase + j[:, None] * skn + dd[None, :], mask=col[:, None], other=0.0)


@triton.jit
def _block_key_fine_kernel(q_ptr, k_ptr, chosen_ptr, pi_ptr, nq, nk, offset, scale_log2, H, T, C, sinks, window,
                           sqb, sqh, sqn, skb, skh, skn,
                           CAUSAL: tl.constexpr, D: tl.constexpr, BLK: tl.constexpr, KB: tl.constexpr,
                           BN: tl.constexpr, SP: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    t = tl.program_id(1)
    rows = t * BLK + tl.arange(0, BLK)
    live = rows < nq
    c = rows + offset
    cf = t * BLK + offset
    cl = tl.minimum((t + 1) * BLK, nq) - 1 + offset
    dd = tl.arange(0, D)
    qt = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :], mask=live[:, None], other=0.0)
    kbase = k_ptr + b * skb + h * skh
    m = tl.full((BLK,), _NEG, tl.float32)
    acc = tl.zeros((BLK,), tl.float32)
    # pass 1, the rows' lse: their sinks, their window's keys that are not sinks, the candidates
    js = tl.arange(0, SP)
    ks = tl.load(kbase + js[:, None] * skn + dd[None, :], mask=((js < sinks) & (js < nk))[:, None], other=0.0)
    oks = live[:, None] & (js < sinks)[None, :] & (js < nk)[None, :]
    if CAUSAL:
        oks = oks & (js[None, :] <= c[:, None])
    m, acc = _online(m, acc, tl.dot(qt, tl.trans(ks)) * scale_log2, oks)
    lo = tl.maximum(tl.maximum(cf - window + 1, sinks), 0)
    if CAUSAL:
        hi = tl.minimum(cl, nk - 1)
    else:
        hi = tl.minimum(cl + window - 1, nk - 1)
    if window == 0:
        hi = lo - 1
    for j0 in range(lo, hi + 1, BN):
        j = j0 + tl.arange(0, BN)
        kt = tl.load(kbase + j[:, None] * skn + dd[None, :], mask=(j <= hi)[:, None], other=0.0)
        jj, cc = j[None, :], c[:, None]
        ok = live[:, None] & (jj <= hi) & (jj >= sinks)
        if CAUSAL:
            ok = ok & (jj > cc - window) & (jj <= cc)
        else:
            ok = ok & (tl.abs(cc - jj) < window)
        m, acc = _online(m, acc, tl.dot(qt, tl.trans(kt)) * scale_log2, ok)
    # the block's eligible keys: j <= e_hi or j >= e_lo (as direct_select._eligible)
    e_hi = cf - window
    e_lo = nk
    if not CAUSAL:
        e_lo = cl + window
        if window == 0:
            e_hi = nk
    cbase = chosen_ptr + (bh * T + t) * C
    for ci in range(0, C):
        gc = tl.load(cbase + ci)
        for u0 in range(0, KB, BN):
            colc, kc = _candidate_tile(kbase, gc * KB + u0, nk, sinks, e_hi, e_lo, skn, dd, BN)
            m, acc = _online(m, acc, tl.dot(qt, tl.trans(kc)) * scale_log2, live[:, None] & colc[None, :])
    lse = m + tl.log2(acc)
    seen = live & (acc > 0)
    lse = tl.where(seen, lse, 0.0)
    # pass 2: π_tj = Σ_i exp(s_ij − lse_i) over the candidates, −inf off them
    pbase = pi_ptr + (bh * T + t) * C * KB
    for ci in range(0, C):
        gp = tl.load(cbase + ci)
        for u0 in range(0, KB, BN):
            colp, kp = _candidate_tile(kbase, gp * KB + u0, nk, sinks, e_hi, e_lo, skn, dd, BN)
            sp = tl.dot(qt, tl.trans(kp)) * scale_log2
            pp = tl.where(seen[:, None] & colp[None, :], tl.exp2(sp - lse[:, None]), 0.0)
            slot = ci * KB + u0 + tl.arange(0, BN)
            tl.store(pbase + slot, tl.where(colp, tl.sum(pp, 0), float("-inf")))


def block_key_fine_mass(q, k, chosen, block, key_block, scale, causal, covered, launch=None):
    """``π_tj`` over each row block's candidate keys: (B, H, T, C′·key_block) fp32, −inf off them.

    ``chosen`` (B, H, T, C′) int64 candidate key blocks (−1 for none), the coarse stage's
    answer; slot ``c·key_block + u`` of block ``t`` is key ``chosen[t, c]·key_block + u``.
    ``π_tj = Σ_{i∈t} exp(s_ij − lse_i)``, ``lse_i`` over the candidates and the row's sinks and
    window (two passes over the keys, one program per head and row block, nothing of size
    ``rows × candidates`` in memory): :func:`hyperref.gpu.direct_select.block_key_mass`.
    ``block`` a power of two. ``launch``: launch parameters (``BN`` keys per tile,
    ``num_warps``, ``num_stages``) over the defaults (``benchmarks/probes/block_keys_tiles.py``).
    """
    _check_block_key_inputs(q, k, key_block)
    if not _pow2(block):
        raise ValueError(f"the blockkeys fine kernel takes a power-of-two row block >= 16, got {block}")
    bsz, h, nq, d = q.shape
    nk = k.shape[2]
    n_t, n_c = chosen.shape[2], chosen.shape[3]
    chosen = chosen.contiguous()
    pi = torch.empty(bsz, h, n_t, n_c * key_block, dtype=torch.float32, device=q.device)
    if pi.numel() == 0:
        return pi
    s = int(covered[0])
    opts = {"BN": min(32, key_block), "num_warps": 4, "num_stages": 3, **(launch or {})}
    _block_key_fine_kernel[(bsz * h, n_t)](
        q, k, chosen, pi, nq, nk, nk - nq, scale * LOG2E, h, n_t, n_c, s, int(covered[1]),
        *q.stride()[:3], *k.stride()[:3], CAUSAL=bool(causal), D=d, BLK=block, KB=key_block,
        SP=max(16, triton.next_power_of_2(max(s, 1))), **opts)
    return pi


@triton.jit
def _listing_kernel(marks_ptr, num_ptr, idx_ptr, R, n, s_bh, s_r, s_c, BN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # offsets past 2³¹ at long sequences
    base = marks_ptr + (pid // R) * s_bh + (pid % R) * s_r
    count = tl.program_id(0) * 0
    for c0 in range(0, n, BN):
        cols = c0 + tl.arange(0, BN)
        ok = cols < n
        mk = tl.load(base + cols * s_c, mask=ok, other=0).to(tl.int32)
        slot = count + tl.cumsum(mk, 0) - 1
        tl.store(idx_ptr + pid * n + slot, cols, mask=ok & (mk != 0))
        count += tl.sum(mk, 0)
    tl.store(num_ptr + pid, count)


def tile_listing(marks):
    """``(num, idx)`` of boolean tile marks (P, Q, R, n), any strides: per row the marked
    columns ascending in the first ``num`` entries of ``idx`` (P, Q, R, n) int32, zeros after;
    ``num`` (P, Q, R) int32. One program per row: a running count over chunks of columns, each
    marked column stored at its count (the torch form :func:`hyperref.gpu.direct_plan._listing`).
    """
    if marks.dim() != 4 or marks.dtype != torch.bool:
        raise ValueError(f"tile_listing takes (P, Q, R, n) bool marks, got {tuple(marks.shape)} {marks.dtype}")
    p, q, r, n = marks.shape
    flat = marks.view(torch.uint8)
    if q > 1 and flat.stride(0) != q * flat.stride(1) and p > 1:
        flat = flat.contiguous()
    s_bh = flat.stride(1) if q > 1 else flat.stride(0)
    num = torch.empty(p, q, r, dtype=torch.int32, device=marks.device)
    idx = torch.zeros(p, q, r, n, dtype=torch.int32, device=marks.device)
    if num.numel():
        _listing_kernel[(p * q * r,)](flat, num, idx, r, n, s_bh, flat.stride(2), flat.stride(3), BN=1024)
    return num, idx


# ---------------------------------------------------------------- own-key tiles: marks and lists

@triton.jit
def _chosen_hit(g, tab_ptr, row, n, per):
    """Whether tile ``g`` lies in one of the ``n`` blocks (of ``per`` tiles) listed at ``row``."""
    hit = g < 0
    for c in range(n):
        blk = tl.load(tab_ptr + row * n + c)
        hit = hit | ((g // per == blk) & (blk >= 0))
    return hit != 0


@triton.jit
def _own_tiles_kernel(picks_ptr, chosen_ptr, part_ptr, full_ptr, kvn_ptr, kvi_ptr, fn_ptr, fi_ptr, NT, n_kt,
                      width, nq, nk, offset, sinks, window, pick_block, n_pick_rb, n_pick, per_p, route_block,
                      n_route_rb, n_route, per_r, TILE: tl.constexpr, CAUSAL: tl.constexpr, PICKS: tl.constexpr,
                      ROUTES: tl.constexpr, MARKS: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (batch·head, query tile); one grid axis: no 65535 limit
    bh, t = pid // NT, pid % NT
    row = (bh * NT + t) * n_kt  # this tile's row of the marks
    lrow = (bh * NT + t) * width  # and of the lists
    c_first = t * TILE + offset
    c_last = tl.minimum((t + 1) * TILE, nq) - 1 + offset
    rp = (t * TILE) // pick_block
    rr = (t * TILE) // route_block
    rf = rr * route_block + offset  # the route block's first and last aligned rows
    rl = tl.minimum((rr + 1) * route_block, nq) - 1 + offset
    n_part = t * 0
    n_full = t * 0
    for c0 in range(0, n_kt, BN):
        g = c0 + tl.arange(0, BN)
        live = g < n_kt
        g_lo = g * TILE
        g_hi = tl.minimum((g + 1) * TILE, nk) - 1
        if CAUSAL:
            seen = g_lo <= c_last
        else:
            seen = live
        partial = (g_lo < sinks) & seen
        full = g < 0
        if window > 0:
            if CAUSAL:
                partial = partial | ((g_hi > c_first - window) & seen)
                full = (g_lo > c_last - window) & (g_hi <= c_first)
            else:
                partial = partial | ((g_hi > c_first - window) & (g_lo < c_last + window))
                full = (g_lo > c_last - window) & (g_hi < c_first + window)
        full = full & live
        partial = partial & live & ~full
        if PICKS:  # picked blocks: whole tiles every row of the tile sees
            picked = _chosen_hit(g, picks_ptr, bh * n_pick_rb + rp, n_pick, per_p) & live
            full = full | picked
            partial = partial & ~full
        if ROUTES:  # routed blocks: full where every key is eligible for the route block
            routed = _chosen_hit(g, chosen_ptr, bh * n_route_rb + rr, n_route, per_r) & live
            whole = g_hi <= rf - window
            if not CAUSAL:
                if window > 0:
                    whole = whole | (g_lo >= rl + window)
                else:
                    whole = live
            full = full | (routed & whole)
            partial = (partial | routed) & ~full
        if MARKS:
            tl.store(part_ptr + row + g, partial.to(tl.int8), mask=live)
            tl.store(full_ptr + row + g, full.to(tl.int8), mask=live)
        mp = partial.to(tl.int32)
        mf = full.to(tl.int32)
        sp = n_part + tl.cumsum(mp, 0) - 1
        sf = n_full + tl.cumsum(mf, 0) - 1
        tl.store(kvi_ptr + lrow + sp, g.to(tl.int32), mask=live & partial & (sp < width))
        tl.store(fi_ptr + lrow + sf, g.to(tl.int32), mask=live & full & (sf < width))
        n_part += tl.sum(mp, 0)
        n_full += tl.sum(mf, 0)
    for c0 in range(0, width, BN):  # the lists' tails are zeros
        g = c0 + tl.arange(0, BN)
        tl.store(kvi_ptr + lrow + g, tl.zeros((BN,), tl.int32), mask=(g < width) & (g >= n_part))
        tl.store(fi_ptr + lrow + g, tl.zeros((BN,), tl.int32), mask=(g < width) & (g >= n_full))
    tl.store(kvn_ptr + bh * NT + t, n_part.to(tl.int32))
    tl.store(fn_ptr + bh * NT + t, n_full.to(tl.int32))


def own_tile_lists(nq, nk, tile, causal, covered, device, picks=None, pick_block=0, chosen=None, route_block=0,
                   route_key_block=0, width=None, marks=True):
    """The own-key call's tile lists, and optionally its tile marks, in one pass (one program per
    query tile).

    Computes the lists :func:`tile_listing` would make of the partial and full marks of
    :func:`hyperref.gpu.direct_plan.own_tiles` (what that function computes with dense torch
    operations). ``tile`` is the square tile size; ``covered = (sinks, window)``; ``picks``
    (B, H, row blocks of ``pick_block`` rows, count) and ``chosen`` (B, H, row blocks of
    ``route_block`` rows, C′) list blocks of ``pick_block`` and ``route_key_block`` keys (−1:
    none), ``None`` where the part is absent. ``width``: the lists' last dimension (default
    NKT), at least the most tiles a query tile lists (:func:`hyperref.gpu.direct_plan.list_width`
    bounds it; entries past it are not written, and off CUDA a row that lists more is an error).
    Returns ``(partial, full, kv_num, kv_idx, full_num, full_idx)``: bool marks (P, Q, NT,
    NKT), ``None`` with ``marks=False`` (the lists need no marks: a forward alone keeps its
    memory linear in the length), and int32 lists (P, Q, NT, width) as :func:`tile_listing`;
    ``(P, Q) = (B, H)`` where a part is given, else (1, 1).
    """
    dev = device
    heads = next((tuple(x.shape[:2]) for x in (picks, chosen) if x is not None), (1, 1))
    n_qt, n_kt = -(-nq // tile), -(-max(nk, 1) // tile)
    width = n_kt if width is None else int(width)
    if width < 1:
        raise ValueError(f"the lists' width must be at least 1, got {width}")
    shape = (*heads, n_qt, n_kt)
    held = [torch.empty(shape, dtype=torch.bool, device=dev) for _ in range(2)] if marks else [None, None]
    kv_num, full_num = (torch.empty(shape[:3], dtype=torch.int32, device=dev) for _ in range(2))
    kv_idx, full_idx = (torch.empty((*shape[:3], width), dtype=torch.int32, device=dev) for _ in range(2))
    if n_qt == 0:
        return (*held, kv_num, kv_idx, full_num, full_idx)
    dummy = kv_num  # an unread pointer where a part is absent
    pk = picks.contiguous() if picks is not None else dummy
    ck = chosen.contiguous() if chosen is not None else dummy
    mk = [m.view(torch.int8) if m is not None else dummy for m in held]
    _own_tiles_kernel[(heads[0] * heads[1] * n_qt,)](
        pk, ck, mk[0], mk[1], kv_num, kv_idx, full_num, full_idx, n_qt, n_kt, width, nq, nk, nk - nq,
        int(covered[0]), int(covered[1]), max(pick_block, 1), pk.shape[2] if picks is not None else 0,
        pk.shape[3] if picks is not None else 0, max(pick_block // tile, 1), max(route_block, 1),
        ck.shape[2] if chosen is not None else 0, ck.shape[3] if chosen is not None else 0,
        max(route_key_block // tile, 1), TILE=tile, CAUSAL=bool(causal), PICKS=picks is not None,
        ROUTES=chosen is not None, MARKS=bool(marks), BN=1024)
    # on CUDA the check would hold the host until the kernel ends: the width is a bound there
    if width < n_kt and not kv_num.is_cuda and int(torch.maximum(kv_num.max(), full_num.max())) > width:
        raise ValueError(f"a query tile lists more than the lists' width of {width} tiles")
    return (*held, kv_num, kv_idx, full_num, full_idx)
