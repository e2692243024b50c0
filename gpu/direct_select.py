"""The selections of the block-sparse direct engine (index planning, no gradient).

Each function computes on the device, for every head, what one exact-set part of
:mod:`hyperref.exact_set` selects, in the tile geometry of the engine (``QB``-row query tiles,
``KB``-position key tiles, ``GB``-slot gathered tiles): the ``heavykeys`` keys by sampled column
mass, the ``blocktop`` key blocks by block-mean scores, the ``blockkeys`` key blocks and keys by
the two-stage mass of :class:`~hyperref.exact_set.BlockKeys`, and the sampled residual keys of
every query block with their importance weights (SPEC §6b). The dense torch forms here define
what the Triton kernels of :mod:`hyperref.gpu.direct_kernels` compute (:func:`fused_plan` says
when those run). :mod:`hyperref.gpu.direct_plan` lays the selections out as tile lists and slots.
"""

from __future__ import annotations

import math

import torch

from hyperref.exact_set import BlockKeys, BlockTop, ExactSet, HeavyKeys, _spread

#: query rows per kernel tile, key positions per own-key tile, slots per gathered tile
QB = 128
KB = 128
GB = 128


def fused_plan(q) -> bool:
    """Whether the plan's selections run as the Triton kernels of :mod:`hyperref.gpu.direct_kernels`.

    On CUDA for float16/bfloat16 inputs with a power-of-two head dimension ≥ 16; float32 and
    float64 keep the dense torch forms (the kernels' products would be TF32).
    """
    from .direct_kernels import _pow2

    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _pow2(q.shape[-1])


def heavy_scores(q, k, rows, scale, causal, covered, work=torch.float32):
    """Sampled column mass of every key outside ``covered``: (B, H, nk), dense torch form.

    ``q`` (B, H, nq, d), ``k`` (B, H, nk, d); ``rows`` (B, H, |T|). Logits in ``work``
    (half-precision inputs: their own matrix product, accumulated in float32).
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    offset = nk - nq
    qt = torch.gather(q, 2, rows[..., None].expand(b, h, rows.shape[-1], d))
    if q.dtype in (torch.float16, torch.bfloat16):
        logits = (qt @ k.transpose(-1, -2)).to(work) * scale
    else:
        logits = (qt.to(work) @ k.to(work).transpose(-1, -2)) * scale
    j = torch.arange(nk, device=q.device)
    c = (rows + offset)[..., None]
    if causal:
        logits = logits.masked_fill(j > c, -math.inf)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    s, w = covered
    far = j >= s
    if w:
        far = far & ((j <= c - w) if causal else ((c - j).abs() >= w))
    return torch.where(far, p, 0.0).sum(dim=2)


def heavy_keys(part: HeavyKeys, q, k, rows, scale, causal, covered, work=torch.float32):
    """:meth:`hyperref.exact_set.HeavyKeys.prepare` for all heads: (B, H, count) keys, ascending, −1 padded.

    Scores from :func:`hyperref.gpu.direct_kernels.heavy_mass` where :func:`fused_plan`,
    else :func:`heavy_scores`.
    """
    nk = k.shape[2]
    if fused_plan(q):
        from .direct_kernels import heavy_mass

        score = heavy_mass(q, k, rows, scale, causal, covered)
    else:
        score = heavy_scores(q, k, rows, scale, causal, covered, work)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :part.count]
    keep = torch.gather(score, -1, order) > 0
    keys = torch.where(keep, order, nk)  # sort the kept ones, −1 for the rest
    keys = torch.sort(keys, dim=-1).values
    return torch.where(keys < nk, keys, -1)


def block_picks(part: BlockTop, q, k, causal, covered, chunk_blocks: int = 64):
    """:meth:`hyperref.exact_set.BlockTop.prepare` for all heads: (B, H, row blocks, count), −1 for none.

    Scores ``max_{i in t} q_i · k̄_g`` in the dtype of ``q`` (float32 accumulation), row blocks
    in chunks of ``chunk_blocks``; where :func:`fused_plan`, in fp32 by
    :func:`hyperref.gpu.direct_kernels.pick_scores`.
    """
    bsz, h, nq, d = q.shape
    nk, blk = k.shape[2], part.block
    n_kb = -(-nk // blk)
    kpad = torch.nn.functional.pad(k, (0, 0, 0, n_kb * blk - nk)) if nk % blk else k
    sizes = torch.clamp(nk - torch.arange(n_kb, device=k.device) * blk, max=blk).float()
    sums = kpad.unflatten(2, (n_kb, blk)).sum(3, dtype=torch.float64 if k.dtype == torch.float64 else torch.float32)
    means = (sums / sizes[:, None].to(sums.dtype)).to(q.dtype)
    n_rb = -(-nq // blk)
    g_end = torch.clamp((torch.arange(n_kb, device=k.device) + 1) * blk, max=nk) - 1
    fused = None
    if fused_plan(q):  # the scores of all row blocks at once, maxima in registers
        from .direct_kernels import pick_scores

        fused, chunk_blocks = pick_scores(q, means, blk), n_rb
    picks = []
    for r0 in range(0, n_rb, chunk_blocks):
        r1 = min(n_rb, r0 + chunk_blocks)
        if fused is not None:
            score = fused[:, :, r0:r1]
        else:
            rows = q[:, :, r0 * blk:min(nq, r1 * blk)]
            per_row = rows @ means.transpose(-1, -2)  # (B, H, rows, n_kb), the dtype of q
            short = (r1 - r0) * blk - per_row.shape[2]
            if short:  # the last row block is short: its missing rows never win the max
                per_row = torch.nn.functional.pad(per_row, (0, 0, 0, short), value=-math.inf)
            score = per_row.unflatten(2, (r1 - r0, blk)).amax(3).float()  # a max is exact in any dtype
        if causal:
            first = torch.arange(r0, r1, device=k.device) * blk + (nk - nq)
            score = score.masked_fill(g_end[None, :] > (first - covered[1])[:, None], -math.inf)
        order, best = _top(score, part.count)
        picks.append(torch.where(torch.isfinite(best), order, -1))
    out = torch.cat(picks, dim=2)
    if out.shape[-1] < part.count:
        out = torch.nn.functional.pad(out, (0, part.count - out.shape[-1]), value=-1)
    return out


def _eligible(tq, blk, nq, nk, causal, covered, j):
    """:func:`hyperref.exact_set._eligible_keys` of row blocks ``tq`` (T,) over keys ``j``: (T, len(j))."""
    s, w = covered
    c_first = tq * blk + (nk - nq)
    c_last = torch.clamp((tq + 1) * blk, max=nq) - 1 + (nk - nq)
    j = j[None, :]
    if causal:
        return (j >= s) & (j <= (c_first - w)[:, None])
    if not w:
        return (j >= s).expand(len(tq), j.shape[1])
    return (j >= s) & ((j <= (c_first - w)[:, None]) | (j >= (c_last + w)[:, None]))


def block_key_candidates(part: BlockKeys, q, k, scale, causal, covered, rep_scores=None):
    """The coarse stage of :class:`hyperref.exact_set.BlockKeys`: chosen key blocks (B, H, T, C′).

    Ascending, −1 for none. ``rep_scores`` (B, H, T·reps, key blocks): the representatives'
    softmax mass per key block over the eligible keys (:func:`block_key_rep_mass`), with
    ``part.peaks`` their relative peaks (:func:`block_key_rep_peaks`), or a kernel's;
    computed here when not given. The block's score is their sum (``peaks``: maximum).
    """
    nq, nk = q.shape[2], k.shape[2]
    blk, kb = part.block, part.key_block
    n_t, n_kb = -(-nq // blk), -(-nk // kb)
    if rep_scores is None:
        rep_scores = (block_key_rep_peaks if part.peaks else block_key_rep_mass)(part, q, k, scale, causal, covered)
    per_rep = rep_scores.unflatten(2, (n_t, part.reps))
    sigma = per_rep.amax(3) if part.peaks else per_rep.sum(3)  # (B, H, T, n_kb)
    sigma = sigma.masked_fill(~_blocks_with_eligible(n_t, blk, nq, nk, kb, causal, covered, q.device), -math.inf)
    order, best = _top(sigma, coarse_count(part, nk))
    chosen = torch.where(torch.isfinite(best), order, n_kb)
    chosen = torch.sort(chosen, dim=-1).values
    return torch.where(chosen < n_kb, chosen, -1)


def _blocks_with_eligible(n_t, blk, nq, nk, kb, causal, covered, device):
    """Whether key block ``g`` holds a key :func:`_eligible` for row block ``t``: (T, ⌈nk/kb⌉) bool.

    From the ranges' ends: block ``g`` is ``[g·kb, min((g+1)·kb, nk) − 1]``, the eligible keys
    ``j >= s`` and ``j <= c_first − w`` (or, non-causal, ``j >= c_last + w``; all ``j >= s``
    without a window).
    """
    s, w = covered
    tq = torch.arange(n_t, device=device)[:, None]
    g = torch.arange(-(-nk // kb), device=device)[None, :]
    lo, hi = torch.clamp(g * kb, min=s), torch.clamp((g + 1) * kb, max=nk) - 1
    before = lo <= torch.minimum(hi, tq * blk + (nk - nq) - w)
    if causal:
        return before
    if not w:
        return (lo <= hi).expand(n_t, -1)
    after = torch.maximum(lo, torch.clamp((tq + 1) * blk, max=nq) - 1 + (nk - nq) + w) <= hi
    return before | after


def block_key_rep_mass(part: BlockKeys, q, k, scale, causal, covered):
    """The representatives' softmax mass per key block over their block's eligible keys.

    (B, H, T·reps, key blocks), representatives :func:`_rep_rows` (row block ``t`` first);
    dense torch form: the logits of a chunk of row blocks' representatives at a time.
    """
    return _rep_block_scores(part, q, k, scale, causal, covered, peaks=False)


def block_key_rep_peaks(part: BlockKeys, q, k, scale, causal, covered):
    """The representatives' largest eligible logit per key block minus their largest visible
    logit (−inf for a block without an eligible key): (B, H, T·reps, key blocks), as
    :func:`block_key_rep_mass` (the ``peaks`` rule)."""
    return _rep_block_scores(part, q, k, scale, causal, covered, peaks=True)


def _rep_block_scores(part: BlockKeys, q, k, scale, causal, covered, peaks):
    """The dense torch form of :func:`block_key_rep_mass` (``peaks=False``) and :func:`block_key_rep_peaks`."""
    bsz, h, nq, d = q.shape
    nk, blk, kb = k.shape[2], part.block, part.key_block
    n_t, n_kb, r = -(-nq // blk), -(-nk // kb), part.reps
    dev = q.device
    tq = torch.arange(n_t, device=dev)
    j = torch.arange(nk, device=dev)
    reps = _rep_rows(part, nq, dev)  # (T, r)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    sums = []
    step = max(1, 2 ** 24 // max(1, bsz * h * r * nk))
    for t0 in range(0, n_t, step):
        t1 = min(n_t, t0 + step)
        rr = reps[t0:t1].reshape(-1)
        logits = (q[:, :, rr].to(work) @ k.to(work).transpose(-1, -2)) * scale  # (B, H, tc·r, nk)
        if causal:
            logits = logits.masked_fill(j[None, :] > (rr + nk - nq)[:, None], -math.inf)
        elig = _eligible(tq[t0:t1], blk, nq, nk, causal, covered, j).repeat_interleave(r, dim=0)
        if peaks:
            top = logits.amax(-1, keepdim=True)
            rel = torch.where(elig, logits - torch.where(torch.isfinite(top), top, 0.0), -math.inf)
            rel = torch.nn.functional.pad(rel, (0, n_kb * kb - nk), value=-math.inf)
            sums.append(rel.unflatten(-1, (n_kb, kb)).amax(-1))
            continue
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        p = torch.where(elig, p, 0.0)
        p = torch.nn.functional.pad(p, (0, n_kb * kb - nk))
        sums.append(p.unflatten(-1, (n_kb, kb)).sum(-1))
    return torch.cat(sums, dim=2)


def _rep_rows(part: BlockKeys, nq: int, device):
    """The representatives ``t·b + ⌈(m+1)·b/reps⌉ − 1`` of every row block, clamped: (T, reps) int64."""
    blk = part.block
    n_t = -(-nq // blk)
    off = torch.from_numpy(_spread(blk, part.reps))  # the reference's offsets
    rows = torch.clamp(torch.arange(n_t)[:, None] * blk + off[None, :], max=nq - 1)
    # made on the host, copied from pinned memory: a pageable copy would wait for the stream
    return (rows.pin_memory() if device.type == "cuda" else rows).to(device, non_blocking=True)


def block_key_mass(part: BlockKeys, q, k, scale, causal, covered, chosen):
    """The fine stage's ``π_tj`` over the candidates: (B, H, T, C′·B) fp32, −inf off the candidates.

    Slot ``c·B + u`` of block ``t`` is key ``chosen[t, c]·B + u``; dense torch form (a chunk of
    row blocks at a time). ``lse_i`` is over the candidates and the row's sinks and window.
    """
    bsz, h, nq, d = q.shape
    nk, blk, kb = k.shape[2], part.block, part.key_block
    s, w = covered
    n_t = chosen.shape[2]
    dev = q.device
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qp = torch.nn.functional.pad(q, (0, 0, 0, n_t * blk - nq)).unflatten(2, (n_t, blk)).to(work)
    kw = k.to(work)
    u = torch.arange(kb, device=dev)
    # the rows' own keys: the sinks, then the window's span (causal: c_first − w + 1 … c_last)
    span = w + blk - 1 + (w if not causal else 0)
    own_off = torch.arange(span, device=dev)
    out = []
    step = max(1, 2 ** 24 // max(1, bsz * h * blk * (chosen.shape[-1] * kb + s + span)))
    for t0 in range(0, n_t, step):
        t1 = min(n_t, t0 + step)
        tq = torch.arange(t0, t1, device=dev)
        cand = chosen[:, :, t0:t1, :, None] * kb + u  # (B, H, tc, C', kb)
        cand = cand.flatten(3)
        ok = (chosen[:, :, t0:t1, :, None] >= 0).expand(*chosen.shape[:2], t1 - t0, chosen.shape[-1], kb).flatten(3)
        ok = ok & (cand < nk)
        first = tq * blk + (nk - nq)
        ok = ok & _eligible_of(cand, first, torch.clamp((tq + 1) * blk, max=nq) - 1 + (nk - nq), s, w, causal)
        near = (first - w + 1)[:, None] + own_off[None, :]  # (tc, span)
        own = torch.cat([torch.arange(s, device=dev).expand(t1 - t0, s), near], dim=1)  # (tc, s + span)
        idx = torch.cat([own.expand(bsz, h, *own.shape), torch.clamp(cand, 0, nk - 1)], dim=-1)
        keys = torch.gather(kw, 2, torch.clamp(idx, 0, nk - 1).flatten(2)[..., None].expand(-1, -1, -1, d))
        keys = keys.view(bsz, h, t1 - t0, idx.shape[-1], d)
        logits = (qp[:, :, t0:t1] @ keys.transpose(-1, -2)) * scale  # (B, H, tc, blk, s + span + C'kb)
        rows = tq[:, None] * blk + torch.arange(blk, device=dev)[None, :]  # (tc, blk)
        c = (rows + nk - nq)[:, :, None]
        oj = own[:, None, :]
        sink_col = (torch.arange(own.shape[-1], device=dev) < s)[None, None, :]
        near_ok = ((oj > c - w) & (oj <= c)) if causal else ((c - oj).abs() < w)
        # the sink columns, then the window's keys that are not sinks (each key once)
        own_ok = (oj < nk) & (oj <= c if causal else True) & (sink_col | (near_ok & (oj >= s)))
        own_ok = own_ok & (rows < nq)[:, :, None]
        cand_ok = ok[:, :, :, None, :] & (rows < nq)[None, None, :, :, None]
        keep = torch.cat([own_ok.expand(bsz, h, *own_ok.shape), cand_ok.expand(-1, -1, -1, blk, -1)], dim=-1)
        logits = logits.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.exp(logits[..., own.shape[-1]:] - torch.where(torch.isfinite(lse), lse, math.inf))
        pi = p.sum(3).float()
        out.append(pi.masked_fill(~ok, -math.inf))
    return torch.cat(out, dim=2)


def _eligible_of(j, c_first, c_last, s, w, causal):
    """:func:`_eligible` for per-block key indices ``j`` (B, H, T, ·), blocks' ``c_first``/``c_last`` (T,)."""
    cf, cl = c_first[:, None], c_last[:, None]
    if causal:
        return (j >= s) & (j <= cf - w)
    if not w:
        return j >= s
    return (j >= s) & ((j <= cf - w) | (j >= cl + w))


def _fused_block_keys(part: BlockKeys, q) -> bool:
    """Whether the blockkeys masses come from the Triton kernels (:func:`fused_plan`, a
    power-of-two ``key_block`` in [16, 128] and a power-of-two ``block``)."""
    from . import direct_kernels as kern

    return fused_plan(q) and kern._pow2(part.key_block) and part.key_block <= 128 and kern._pow2(part.block)


def block_key_chosen(part: BlockKeys, q, k, scale, causal, covered):
    """The coarse stage's chosen key blocks (B, H, T, C′), ascending, −1 for none.

    Where :func:`_fused_block_keys`, the Triton kernels: the representatives' log normalizers
    (:func:`~hyperref.gpu.direct_kernels.block_key_rep_lse`), then their sum per row block and
    the ranking (:func:`~hyperref.gpu.direct_kernels.block_key_top`); for the peaks rule with
    at most :data:`~hyperref.gpu.direct_kernels.PEAK_TOP_MAX` blocks per row block, the same
    choice (up to ties that float32 rounding makes) from the representatives' running lists of
    their best blocks (:func:`~hyperref.gpu.direct_kernels.block_key_peak_top`, no per-block
    table); else
    :func:`block_key_candidates` over :func:`block_key_rep_mass`.
    """
    from . import direct_kernels as kern

    if not _fused_block_keys(part, q):
        return block_key_candidates(part, q, k, scale, causal, covered)
    nq, nk = q.shape[2], k.shape[2]
    reps, count = _rep_rows(part, nq, q.device), coarse_count(part, nk)
    if part.peaks and count <= kern.PEAK_TOP_MAX:
        return kern.block_key_peak_top(q, k, reps, part.block, part.key_block, count, scale, causal, covered)
    block_lse, lse = kern.block_key_rep_lse(q, k, reps, part.block, part.key_block, scale, causal, covered,
                                            peaks=part.peaks)
    return kern.block_key_top(block_lse, lse, part.reps, part.block, part.key_block, count, nq, nk, causal, covered,
                              peaks=part.peaks)


def coarse_count(part: BlockKeys, nk: int) -> int:
    """Key blocks the coarse stage chooses per row block: ``min(⌊candidates/key_block⌋, ⌈nk/key_block⌉)``."""
    return min(part.candidates // part.key_block, -(-nk // part.key_block))


def routes_tiles(part: BlockKeys, nk: int) -> bool:
    """Whether a ``blockkeys`` part (within its geometry) keeps every eligible key of its chosen
    blocks and those blocks are whole key tiles: then the own-key call attends them as tiles
    (no fine stage, no gathered copies).

    Every candidate is kept when ``keep`` is at least the candidates' key count
    ``⌊candidates/key_block⌋·key_block`` or ``nk``.
    """
    kb = part.key_block
    return kb % KB == 0 and part.keep >= min(part.candidates // kb * kb, nk)


def block_keys(part: BlockKeys, q, k, scale, causal, covered):
    """:meth:`hyperref.exact_set.BlockKeys.prepare` for all heads: (B, H, T, keep), ascending, −1 padded.

    Where :func:`fused_plan` (``key_block`` a power of two in [16, 128], ``block`` one ≥ 16) both stages'
    masses come from the Triton kernels of :mod:`hyperref.gpu.direct_kernels`, else from the
    dense torch forms here.
    """
    nk, kb = k.shape[2], part.key_block
    from . import direct_kernels as kern

    chosen = block_key_chosen(part, q, k, scale, causal, covered)
    if _fused_block_keys(part, q):
        pi = kern.block_key_fine_mass(q, k, chosen, part.block, kb, scale, causal, covered)
    else:
        pi = block_key_mass(part, q, k, scale, causal, covered, chosen)
    order, best = _top(pi, min(part.keep, pi.shape[-1]))
    slot_key = (torch.gather(chosen, -1, order // kb) * kb + order % kb)
    keys = torch.where(torch.isfinite(best) & (torch.gather(chosen, -1, order // kb) >= 0), slot_key, nk)
    keys = torch.sort(keys, dim=-1).values
    keys = torch.where(keys < nk, keys, -1)
    if keys.shape[-1] < part.keep:
        keys = torch.nn.functional.pad(keys, (0, part.keep - keys.shape[-1]), value=-1)
    return keys


def _top(score, count: int):
    """Indices and values of the ``count`` largest entries of the last axis, ties by smaller index.

    A few rounds of ``argmax`` (which returns the first maximum) for small counts, a
    stable sort otherwise.
    """
    if count > 8 or count >= score.shape[-1]:
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]
        return order, torch.gather(score, -1, order)
    score = score.clone()
    order, best = [], []
    for _ in range(count):
        i = score.argmax(dim=-1, keepdim=True)
        order.append(i)
        best.append(torch.gather(score, -1, i))
        score.scatter_(-1, i, -math.inf)
    return torch.cat(order, -1), torch.cat(best, -1)


def sample_slots(v, u, exact_set: ExactSet, bq: int, sampler: str, causal: bool, nq: int):
    """Sampled keys and their log weights per query block: (B, H, T, m) int64 and float32.

    The support of block ``t`` is :func:`hyperref.direct.block_support`; the
    probabilities :func:`hyperref.direct.support_probabilities`, resolved by the
    inverse CDF on the head's prefix sums of ``‖v_j‖²`` (scaled by the peak
    ``|v|`` as :func:`hyperref.sampling.squared_row_norms`). Keys outside every
    support are −1.
    """
    bsz, h, nk, _ = v.shape
    n_t, m = u.shape[2], u.shape[3]
    dev = v.device
    peak = v.abs().amax(dim=(-1, -2), keepdim=True).double()
    unit = torch.where(peak > 0, peak, 1.0)
    if v.dtype == torch.float64:  # scaled before squaring: no overflow near the dtype's maximum
        sq = ((v / unit) ** 2).sum(-1)  # (B, H, nk)
    else:  # squares of narrower floats fit in float64; no float64 copy of v
        sq = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64).square() / unit[..., 0] ** 2
    pre = torch.nn.functional.pad(torch.cumsum(sq, -1), (1, 0))  # pre[j] = Σ_{l<j} sq_l
    t = torch.arange(n_t, device=dev)
    lo = torch.full_like(t, min(exact_set.sink_count, nk))
    if causal:
        c_last = torch.clamp((t + 1) * bq, max=nq) - 1 + (nk - nq)
        w = exact_set.window_width
        hi = (c_last - w + 1) if w else c_last + 1
    else:
        hi = torch.full_like(t, nk)
    hi = torch.clamp(hi, 0, nk)
    hi = torch.maximum(hi, lo)
    size = (hi - lo).to(torch.float64)  # (T,)
    lo_b, hi_b = lo.expand(bsz, h, n_t), hi.expand(bsz, h, n_t)
    total = torch.gather(pre, -1, hi_b) - torch.gather(pre, -1, lo_b)  # (B, H, T)
    base = torch.gather(pre, -1, lo_b)
    use_norm = (total > 0) & (sampler != "uniform")
    a = torch.where(use_norm, 0.5 if sampler == "mixed" else 1.0, 0.0)  # weight of the rownorm part
    safe_total = torch.where(total > 0, total, 1.0)

    def cdf(j):  # F(j) = P(key <= j), j (B, H, T, m) absolute key indices in [lo, hi)
        rn = (torch.gather(pre, -1, (j + 1).flatten(2)).view_as(j) - base[..., None]) / safe_total[..., None]
        un = (j + 1 - lo[:, None]).to(torch.float64) / torch.clamp(size, min=1.0)[:, None]
        return a[..., None] * rn + (1 - a[..., None]) * un

    last_pos = None
    if sampler == "rownorm":  # never a key with p_j = 0: the last positive key of the support
        pos = torch.where(sq > 0, torch.arange(nk, device=dev), -1)
        lastp = torch.gather(torch.cummax(pos, dim=-1).values, -1, torch.clamp(hi_b - 1, min=0))
        last_pos = torch.where(total > 0, lastp, hi_b - 1)
    if v.is_cuda:
        from .direct_kernels import sample_search

        idx = sample_search(pre, u, lo, hi, a.to(torch.float64), total, last_pos)
    else:
        idx = _search(cdf, u, lo, hi, hi_b, nk, last_pos)
    p = a[..., None] * torch.gather(sq, -1, idx.flatten(2)).view_as(idx) / safe_total[..., None] \
        + (1 - a[..., None]) / torch.clamp(size, min=1.0)[:, None]
    logw = -torch.log(m * p)
    empty = (hi <= lo)[:, None].expand(bsz, h, n_t, m)
    return torch.where(empty, -1, idx), torch.where(empty, 0.0, logw)


def _search(cdf, u, lo, hi, hi_b, nk, last_pos):
    """The inverse-CDF binary search of :func:`sample_slots` in torch: (B, H, T, m) int64."""
    bsz, h, n_t, m = u.shape
    # smallest j in [lo, hi) with F(j) > u · F(hi − 1): a binary search of ⌈log2 nk⌉ steps
    target = u * cdf(torch.clamp(hi_b - 1, min=0)[..., None].expand(bsz, h, n_t, m))
    left = lo[:, None].expand(bsz, h, n_t, m).clone()
    right = torch.clamp(hi - 1, min=0)[:, None].expand(bsz, h, n_t, m).clone()
    for _ in range(max(1, int(nk).bit_length())):
        mid = (left + right) // 2
        go_right = cdf(mid) <= target
        left = torch.where(go_right, mid + 1, left)
        right = torch.where(go_right, right, mid)
    idx = torch.minimum(left, torch.clamp(hi - 1, min=0)[:, None])
    return idx if last_pos is None else torch.minimum(idx, last_pos[..., None])
