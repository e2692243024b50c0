"""The direct mode (SPEC §6b) as two block-sparse FlexAttention calls, forward and backward.

The reference (:func:`hyperref.direct.direct_head`) defines the function; this
module evaluates it with work proportional to the attended keys, in two calls
over disjoint key sets whose partials are merged by their log normalizers:

* **the own keys** — per query tile of ``QB = 128`` rows, the key tiles of
  ``KB = 128`` positions that hold a key of the exact set for some row of the
  tile: the sink tiles, the tiles the causal window crosses, the key blocks a
  ``blocktop`` part picked. Token-level membership inside a tile is the mask
  ``j visible ∧ (j < s ∨ j in the window of i ∨ j in a picked tile)``, index
  arithmetic and one tile lookup; window tiles that every row of the tile sees
  whole and picked tiles are *full* (no mask work);
* **the gathered keys** — per query tile, ``L`` slots holding copies of single
  keys: the ``heavykeys`` keys of the head and the ``blockkeys`` keys of the tile's
  row block (weight 1; a key of both once), then, for every query
  block of ``bq`` rows inside the tile, its ``m`` sampled keys, each with the
  bias ``log(1 / (m p_j))`` (SPEC §6b). Each query tile is a head of its own
  over its ``L`` slots (no block list to build or search). A slot counts for
  row ``i`` only when it belongs to the row's query block, its key is visible
  and not in the exact set ``E_i`` (so a sampled key is a residual key, as in
  the reference); duplicates of one sampled key add their weights, which is the
  reference's summed weight ``W_ij``.

Merged, the two give ``õ_i`` and ``lse_i``. Gradients come from FlexAttention's
backward (through its ``lse`` too) and the gather's adjoint (an index add into
``k`` and ``v``); the selections and the sampling weights are constants of the
draws, as in every engine of this package.

Supported exact-set parts: ``sinks``, ``window``, ``blocktop``, ``blockkeys``, ``heavykeys``.
Parts whose selection differs row by row inside a tile (``sortlsh``,
``quest``, the ``topk`` oracle) are refused here;
:func:`hyperref.gpu.direct.direct_attention` (dense row chunks) runs them.

Samples are resolved by a binary search on the head's prefix sums of
``‖v_j‖²`` instead of the reference's cumulative sum over each block's support:
the two agree except where a uniform falls within float64 rounding of a
boundary of the cumulative distribution (probability about ``1e-16`` a draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyperref._validation import InputError, check_scale
from hyperref.config import HyperConfig
from hyperref.direct import paper_exact_set
from hyperref.exact_set import BlockKeys, BlockTop, ExactSet, Geometry, HeavyKeys, Sinks, Window

#: query rows per kernel tile, key positions per own-key tile, slots per gathered tile
QB = 128
KB = 128
GB = 128
SUPPORTED = (Sinks, Window, BlockTop, BlockKeys, HeavyKeys)


def check_supported(exact_set: ExactSet, bq: int) -> None:
    """Raise :class:`~hyperref.InputError` unless this engine computes ``exact_set`` with ``bq``-row blocks."""
    bad = [p.describe() for p in exact_set.parts if not isinstance(p, SUPPORTED)]
    if bad:
        raise InputError(f"the block-sparse direct engine computes sinks, window, blocktop, blockkeys and heavykeys "
                         f"parts; {', '.join(bad)} select keys row by row: use "
                         "hyperref.gpu.direct.direct_attention")
    if QB % bq and bq % QB:
        raise InputError(f"query_block must divide {QB} or be a multiple of it, got {bq}")
    for p in exact_set.parts:
        if isinstance(p, BlockTop) and p.block % KB:
            raise InputError(f"the block-sparse direct engine takes blocktop blocks that are multiples of "
                             f"{KB} (whole key tiles), got {p.block}")
        if isinstance(p, BlockKeys) and (p.block % QB or p.block % bq):
            raise InputError(f"the block-sparse direct engine takes blockkeys row blocks that are multiples "
                             f"of {QB} (whole query tiles) and of query_block ({bq}), got {p.block}")


def supports(config: HyperConfig) -> bool:
    """Whether this engine computes ``config`` (a direct-mode config it does not refuse)."""
    if not isinstance(config, HyperConfig) or config.mode != "direct":
        return False
    try:
        check_supported(paper_exact_set(config), config.query_block)
    except InputError:
        return False
    return True


# ---------------------------------------------------------------- selections (index planning, no grad)

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


def block_key_candidates(part: BlockKeys, q, k, scale, causal, covered, reps_mass=None):
    """The coarse stage of :class:`hyperref.exact_set.BlockKeys`: chosen key blocks (B, H, T, C′).

    Ascending, −1 for none. ``reps_mass`` (B, H, T·reps, key blocks): the representatives'
    softmax mass per key block over the eligible keys (:func:`block_key_rep_mass`, or a
    kernel's); computed here when not given.
    """
    nq, nk = q.shape[2], k.shape[2]
    blk, kb = part.block, part.key_block
    n_t, n_kb = -(-nq // blk), -(-nk // kb)
    if reps_mass is None:
        reps_mass = block_key_rep_mass(part, q, k, scale, causal, covered)
    sigma = reps_mass.unflatten(2, (n_t, part.reps)).sum(3)  # (B, H, T, n_kb)
    sigma = sigma.masked_fill(~_blocks_with_eligible(n_t, blk, nq, nk, kb, causal, covered, q.device), -math.inf)
    order, best = _top(sigma, min(part.candidates // kb, n_kb))
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
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        elig = _eligible(tq[t0:t1], blk, nq, nk, causal, covered, j).repeat_interleave(r, dim=0)
        p = torch.where(elig, p, 0.0)
        p = torch.nn.functional.pad(p, (0, n_kb * kb - nk))
        sums.append(p.unflatten(-1, (n_kb, kb)).sum(-1))
    return torch.cat(sums, dim=2)


def _rep_rows(part: BlockKeys, nq: int, device):
    """The representatives ``t·b + ⌈(m+1)·b/reps⌉ − 1`` of every row block, clamped: (T, reps) int64."""
    blk = part.block
    n_t = -(-nq // blk)
    off = torch.tensor([-(-(m + 1) * blk // part.reps) - 1 for m in range(part.reps)], device=device)
    return torch.clamp(torch.arange(n_t, device=device)[:, None] * blk + off[None, :], max=nq - 1)


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
    """The coarse stage's chosen key blocks (B, H, T, C′), ascending, −1 for none: the
    representatives' masses from the Triton kernel where :func:`_fused_block_keys`, else
    :func:`block_key_rep_mass`."""
    from . import direct_kernels as kern

    reps = None
    if _fused_block_keys(part, q):
        reps = kern.block_key_rep_mass(q, k, _rep_rows(part, q.shape[2], q.device), part.block, part.key_block,
                                       scale, causal, covered)
    return block_key_candidates(part, q, k, scale, causal, covered, reps_mass=reps)


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


# ---------------------------------------------------------------- the plan of one call

#: the position stored in a gathered slot that counts for no row
NONE = 2 ** 30


@dataclass(frozen=True)
class DirectPlan:
    """Everything the two kernel calls need besides q, k, v (all tensors on the device).

    The **own-key call** reads ``kv_num``/``kv_idx`` (partial key tiles per query tile: the sink
    tiles, the window's edge tiles) and ``full_num``/``full_idx``
    (full tiles: the window interior, the ``blocktop`` picks); shape ``(B, H, NT, ·)``, or
    ``(1, 1, NT, ·)`` when no part picks tiles head by head; its backward reads the same lists
    transposed, per key tile the query tiles (``q_num``/``q_idx``, ``full_q_num``/``full_q_idx``,
    (·, ·, NKT, ·)). Its mask is index arithmetic and,
    where a ``blocktop`` part picks tiles, a lookup in ``picked`` (B, H, NT, NKT) bool (``None``
    without one), where a ``blockkeys`` part routes tiles (:func:`routes_tiles`), a lookup in
    ``routed`` (B, H, NT, NKT) bool and the eligibility of the key for the row's block of
    ``route_block`` rows: the mask alone says which entries count, the full tiles only spare its
    work, so that FlexAttention's unfused path (which reads the mask alone) gives the same answer.

    The **gathered call** reads ``gpos``/``owner``/``logw`` (B, H, NT, L): per query tile ``L``
    slots, the key position (:data:`NONE` where the slot counts for no row: empty, a sink, a
    picked tile's key, a sampled key of the heavy set), the query block a sample belongs to
    (−1: every row of the tile; ``None`` when every slot belongs to the whole tile), and the
    log weight (0 for heavy keys).
    """

    nq: int
    nk: int
    nk_pad: int
    slots: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor
    gpos: torch.Tensor
    owner: torch.Tensor | None
    logw: torch.Tensor
    picked: torch.Tensor | None = None
    routed: torch.Tensor | None = None
    route_block: int = 0
    edges: torch.Tensor | None = None

    @property
    def n_qt(self) -> int:
        return self.gpos.shape[2]


def _round_up(x: int, r: int) -> int:
    return -(-x // r) * r


def _listing(marks):
    """``(num, idx)`` of boolean tile marks (·, ·, R, n): per row the marked columns, ascending.

    ``idx`` (·, ·, R, n) int32 holds them in its first ``num`` entries (zeros after), by a
    running count and one scatter (on CUDA the kernel
    :func:`hyperref.gpu.direct_kernels.tile_listing`): memory-bound, no sort.
    """
    if marks.is_cuda:
        from . import direct_kernels as kern

        return kern.tile_listing(marks)
    n = marks.shape[-1]
    count = torch.cumsum(marks, dim=-1, dtype=torch.int32)
    slot = torch.where(marks, count - 1, n).long()  # where each marked column goes; the rest → spare
    cols = torch.arange(n, dtype=torch.int32, device=marks.device).expand(marks.shape)
    idx = torch.zeros(*marks.shape[:-1], n + 1, dtype=torch.int32, device=marks.device)
    idx.scatter_(-1, slot, cols)
    return count[..., -1].contiguous(), idx[..., :n].contiguous()


def own_tiles(nq, nk, causal, covered, picks, pick_block, device, routes=None):
    """Tile marks ``(partial, full, picked, routed, edges)`` of the own-key call.

    ``partial``, ``full`` (1, 1, NT, NKT) or (B, H, NT, NKT). Sinks and window come from index
    arithmetic (the same for every head); ``picks`` (B, H, row blocks, count) of ``blocktop``
    add full tiles head by head (``picked``, else ``None``); ``routes = (chosen, part)``, the
    chosen key blocks of a ``blockkeys`` part that :func:`routes_tiles`, add their tiles
    (``routed``, else ``None``): full where every key is eligible for the tile's row block
    (or a sink), partial where the block straddles the eligible range's end (``edges`` (B, H,
    NT, 2): whether the tile holding ``c_first − w``, and the one holding ``c_last + w``, is
    such a tile). A short last
    tile may be full: FlexAttention cuts the positions beyond the sequence.
    """
    s, w = covered
    offset = nk - nq
    n_qt, n_kt = -(-nq // QB), -(-max(nk, 1) // KB)
    tq = torch.arange(n_qt, device=device)
    g = torch.arange(n_kt, device=device)
    c_first = tq * QB + offset
    c_last = torch.clamp((tq + 1) * QB, max=nq) - 1 + offset
    g_lo, g_hi = g * KB, torch.clamp((g + 1) * KB, max=nk) - 1
    seen = (g_lo[None, :] <= c_last[:, None]) if causal else torch.ones(n_qt, n_kt, dtype=torch.bool, device=device)
    partial = (g_lo < s)[None, :] & seen
    full = torch.zeros(n_qt, n_kt, dtype=torch.bool, device=device)
    if w:
        if causal:
            partial = partial | ((g_hi[None, :] > (c_first - w)[:, None]) & seen)
            full = (g_lo[None, :] > (c_last - w)[:, None]) & (g_hi[None, :] <= c_first[:, None])
        else:
            partial = partial | ((g_hi[None, :] > (c_first - w)[:, None]) & (g_lo[None, :] < (c_last + w)[:, None]))
            full = (g_lo[None, :] > (c_last - w)[:, None]) & (g_hi[None, :] < (c_first + w)[:, None])
    partial, full = (partial & ~full)[None, None], full[None, None]
    picked = None
    if picks is not None:
        # picked blocks are whole key tiles wholly visible to every row of the row block
        # (they end before the window of its first row)
        bsz, h = picks.shape[:2]
        per = pick_block // KB
        row_block = (tq * QB) // pick_block
        pk = picks[:, :, row_block]  # (B, H, NT, count), block index or −1
        tiles = (torch.clamp(pk, min=0)[..., None] * per + torch.arange(per, device=device)).flatten(3)
        tiles = torch.where((pk >= 0).repeat_interleave(per, dim=-1), torch.clamp(tiles, max=n_kt), n_kt)
        picked = torch.zeros(bsz, h, n_qt, n_kt + 1, dtype=torch.bool, device=device)
        picked.scatter_(-1, tiles, True)
        picked = picked[..., :n_kt]
        full = full | picked
        partial = partial & ~full
    routed = edges = None
    if routes is not None:
        chosen, part = routes
        bsz, h = chosen.shape[:2]
        per = part.key_block // KB
        row_block = (tq * QB) // part.block
        ck = chosen[:, :, row_block]  # (B, H, NT, C′), key block or −1
        tiles = (torch.clamp(ck, min=0)[..., None] * per + torch.arange(per, device=device)).flatten(3)
        tiles = torch.where((ck >= 0).repeat_interleave(per, dim=-1), torch.clamp(tiles, max=n_kt), n_kt)
        routed = torch.zeros(bsz, h, n_qt, n_kt + 1, dtype=torch.bool, device=device)
        routed.scatter_(-1, tiles, True)
        routed = routed[..., :n_kt]
        rf = row_block * part.block + offset  # the row block's first and last aligned rows
        rl = torch.clamp((row_block + 1) * part.block, max=nq) - 1 + offset
        whole = g_hi[None, :] <= (rf - w)[:, None]
        if not causal:
            whole = (whole | (g_lo[None, :] >= (rl + w)[:, None])) if w else torch.ones_like(whole)
        full = full | (routed & whole)
        partial = (partial | routed) & ~full
        # the routed tiles left partial: the one holding c_first − w (and, non-causal, c_last + w)
        straddle = routed & ~whole
        at = lambda x: torch.clamp(x // KB, 0, n_kt - 1)[None, None, :, None].expand(bsz, h, -1, 1)
        lo, hi = rf - w, rl + w
        edges = torch.cat([torch.gather(straddle, -1, at(lo)) & (lo >= 0)[None, None, :, None],
                           torch.gather(straddle, -1, at(hi)) & (hi < nk)[None, None, :, None]], dim=-1)
    return partial, full, picked, routed, edges


def make_plan(q, k, v, *, causal, scale, config: HyperConfig, heavy_rows, sample_u) -> DirectPlan:
    """Selections, samples and the block-sparse layout of one call (no gradient).

    ``q`` (B, H, nq, d); ``k``, ``v`` (B, H, nk, ·) with the key heads already
    expanded to the query heads; ``heavy_rows`` (B, H, |T|) or ``None``;
    ``sample_u`` (B, H, T, m) float64.
    """
    exact_set, bq = paper_exact_set(config), config.query_block
    bsz, h, nq, _ = q.shape
    nk = k.shape[2]
    dev = q.device
    s, w = exact_set.sink_count, exact_set.window_width
    half = q.dtype in (torch.float16, torch.bfloat16)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    covered = (s, w)
    heavy = picks = bkeys = routes = None
    pick_block = KB
    geom = Geometry(nq, nk, causal)
    for part in exact_set.parts:
        if isinstance(part, HeavyKeys):
            heavy = heavy_keys(part, q, k, heavy_rows, scale, causal, covered, work)
        elif isinstance(part, BlockTop):
            qs, ks = (q, k) if half else (q.to(work), k.to(work))
            picks, pick_block = block_picks(part, qs, ks, causal, covered), part.block
        elif isinstance(part, BlockKeys):
            part = part.within(geom)
            if routes_tiles(part, nk):
                routes = (block_key_chosen(part, q, k, scale, causal, covered), part)
            else:
                bkeys, bkeys_block = block_keys(part, q, k, scale, causal, covered), part.block
    partial, full, picked, routed, edges = own_tiles(nq, nk, causal, covered, picks, pick_block, dev, routes)
    n_qt = partial.shape[2]
    tq = torch.arange(n_qt, device=dev)
    # ---- gathered slots: heavy keys, then m samples per query block inside the tile
    m = sample_u.shape[-1]
    subs = max(1, QB // bq)
    n_heavy = 0 if heavy is None else heavy.shape[-1]
    n_bkeys = 0 if bkeys is None else bkeys.shape[-1]
    slots = _round_up(n_heavy + n_bkeys + subs * m, GB)  # 0: no gathered call
    pos_parts, owner_parts, logw_parts = [], [], []
    if n_heavy:
        hk = heavy[:, :, None, :].expand(bsz, h, n_qt, n_heavy)
        pos_parts.append(torch.where((hk >= s), hk, -1))
        owner_parts.append(torch.full_like(hk, -1))
        logw_parts.append(torch.zeros(hk.shape, dtype=work, device=dev))
    if bkeys is not None:  # the keys of the row block each tile lies in (a heavy key is there already)
        bk = bkeys[:, :, (tq * QB) // bkeys_block]
        if n_heavy:
            bk = torch.where(_holds(heavy[:, :, None, :].expand(bsz, h, n_qt, n_heavy), bk, nk), -1, bk)
        pos_parts.append(bk)
        owner_parts.append(torch.full_like(bk, -1))
        logw_parts.append(torch.zeros(bk.shape, dtype=work, device=dev))
    if m:
        keys, lw = sample_slots(v, sample_u, exact_set, bq, config.sampler, causal, nq)
        if n_heavy:  # a sampled key of the heavy set is exact, not residual
            keys = torch.where(_holds(heavy[:, :, None, :].expand(*keys.shape[:3], n_heavy), keys, nk), -1, keys)
        if bkeys is not None:  # nor one of its row block's chosen keys
            of_block = (torch.arange(keys.shape[2], device=dev) * bq) // bkeys_block
            keys = torch.where(_holds(bkeys[:, :, of_block], keys, nk), -1, keys)
        n_t = keys.shape[2]
        blocks = torch.arange(n_t, device=dev)
        if bq >= QB:  # every tile holds the samples of the one block it lies in
            of_tile = (tq * QB) // bq
            pos_parts.append(keys[:, :, of_tile])
            owner_parts.append(of_tile[:, None].expand(n_qt, m).expand(bsz, h, n_qt, m))
            logw_parts.append(lw[:, :, of_tile].to(work))
        else:  # tile t holds blocks t·subs … t·subs + subs − 1
            pad = n_qt * subs - n_t
            fill = lambda x, value: torch.nn.functional.pad(x, (0, 0, 0, pad), value=value)
            pos_parts.append(fill(keys, -1).reshape(bsz, h, n_qt, subs * m))
            own = torch.nn.functional.pad(blocks, (0, pad), value=-2)[:, None].expand(n_qt * subs, m)
            owner_parts.append(own.reshape(n_qt, subs * m).expand(bsz, h, n_qt, subs * m))
            logw_parts.append(fill(lw.to(work), 0.0).reshape(bsz, h, n_qt, subs * m))
    used = sum(x.shape[-1] for x in pos_parts)
    pad_slots = lambda parts, value, dtype: torch.nn.functional.pad(
        torch.cat(parts, -1).to(dtype) if parts else torch.zeros(bsz, h, n_qt, 0, dtype=dtype, device=dev),
        (0, slots - used), value=value)
    gpos = pad_slots(pos_parts, -1, torch.int64)
    logw = pad_slots(logw_parts, 0.0, work)
    owner = pad_slots(owner_parts, -1, torch.int32) if bq < QB else None
    if picked is not None:  # keys of the tile's picked blocks are exact: not a gathered term
        n_kt = picked.shape[-1]
        tile_of_key = torch.clamp(gpos, min=0) // KB
        in_pick = torch.gather(picked.to(torch.int8), -1, torch.clamp(tile_of_key, max=n_kt - 1)).bool()
        gpos = torch.where(in_pick, -1, gpos)
    if routed is not None:  # nor are the eligible keys of the tile's routed blocks
        gpos = torch.where(_in_routed(routed, routes[1].block, gpos, nq, nk, causal, covered, tq), -1, gpos)
    gpos = torch.where(gpos >= 0, gpos, NONE).to(torch.int32)
    kv_num, kv_idx = _listing(partial)
    full_num, full_idx = _listing(full)
    q_num, q_idx = _listing(partial.transpose(-2, -1))
    full_q_num, full_q_idx = _listing(full.transpose(-2, -1))
    return DirectPlan(nq=nq, nk=nk, nk_pad=partial.shape[-1] * KB, slots=slots, kv_num=kv_num, kv_idx=kv_idx,
                      full_num=full_num, full_idx=full_idx, q_num=q_num, q_idx=q_idx, full_q_num=full_q_num,
                      full_q_idx=full_q_idx, gpos=gpos, owner=owner, logw=logw, picked=picked,
                      routed=routed, route_block=0 if routes is None else routes[1].block, edges=edges)


def _in_routed(routed, block, keys, nq, nk, causal, covered, tq):
    """Whether each key (B, H, NT, ·) of a query tile is an eligible key of a routed tile of it."""
    n_kt = routed.shape[-1]
    rb = (tq * QB) // block
    rf, rl = rb * block + (nk - nq), torch.clamp((rb + 1) * block, max=nq) - 1 + (nk - nq)
    tile = torch.clamp(keys, 0, nk - 1) // KB
    hit = torch.gather(routed.to(torch.int8).expand(*keys.shape[:2], -1, -1), -1,
                       torch.clamp(tile, max=n_kt - 1)).bool()
    return hit & (keys >= 0) & (keys < nk) & _eligible_of(keys, rf, rl, *covered, causal)


def _holds(sorted_keys, keys, nk):
    """Whether each of ``keys`` (·, m) is in the ascending, −1-padded ``sorted_keys`` (·, n)."""
    hs = torch.where(sorted_keys >= 0, sorted_keys, nk + 1).contiguous()
    at = torch.clamp(torch.searchsorted(hs, keys.contiguous()), max=hs.shape[-1] - 1)
    return (torch.gather(hs, -1, at) == keys) & (keys >= 0)


# ---------------------------------------------------------------- the kernel calls

_COMPILED = {}
RECOMPILES = 64  # shapes (lengths, dtypes, slot counts) one compiled function specializes to


def _compiled(name: str, fn):
    """``fn`` compiled once (CUDA), specialized to up to :data:`RECOMPILES` input shapes.

    Past its recompile limit (8 by default) Dynamo would run a function unfused, and the
    unfused FlexAttention ignores the tile lists that the compiled call's masks rely on
    (:func:`_listed_mask`): around the call the limit is raised and reaching it is an error.
    """
    if name not in _COMPILED:
        compiled = torch.compile(fn, dynamic=False)

        def run(*args, **kwargs):
            with torch._dynamo.config.patch(recompile_limit=RECOMPILES, fail_on_recompile_limit_hit=True):
                return compiled(*args, **kwargs)

        _COMPILED[name] = run
    return _COMPILED[name]


def _flex_fn(device_type: str):
    """FlexAttention, compiled on CUDA (eager elsewhere: FlexAttention's reference path)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled("flex", flex_attention) if device_type == "cuda" else flex_attention


def _window_mask(plan: DirectPlan, exact_set: ExactSet, causal: bool):
    """A visible key that is a sink or in the window (index arithmetic only)."""
    s, w = exact_set.sink_count, exact_set.window_width
    offset, nk = plan.nk - plan.nq, plan.nk

    def mask_mod(b, h, i, kv):
        c = i + offset
        if causal:
            return (kv < nk) & (kv <= c) & ((kv < s) | (kv > c - w))
        return (kv < nk) & ((kv < s) | ((c - kv).abs() < w))

    return mask_mod


def _listed_mask(plan: DirectPlan, exact_set: ExactSet, causal: bool):
    """Mask function of the own-key call on its partial tiles (what the compiled kernel reads).

    :func:`_window_mask`, or an eligible key of a routed tile that straddles the end of its row
    block's eligible range (``plan.edges``: causal, the tile holding ``c_first − w``;
    non-causal also the one holding ``c_last + w``). Picked and wholly eligible routed tiles are
    full tiles, where the kernel applies no mask. The lookup is by row only (one load per row
    of a tile, not per entry).
    """
    base = _window_mask(plan, exact_set, causal)
    edges = plan.edges
    if edges is None:
        return base
    s, w, blk, nk, nq, offset = (exact_set.sink_count, exact_set.window_width, plan.route_block, plan.nk,
                                 plan.nq, plan.nk - plan.nq)

    def mask_mod(b, h, i, kv):
        t, rb = i // QB, i // blk
        hh = 0 if edges.shape[1] == 1 else h
        lo = (rb * blk + offset) - w
        keep = base(b, h, i, kv) | (edges[b, hh, t, 0] & (kv >= s) & (kv <= lo) & (kv // KB == lo // KB))
        if not causal and w:
            hi = torch.clamp((rb + 1) * blk, max=nq) - 1 + offset + w
            keep = keep | (edges[b, hh, t, 1] & (kv >= s) & (kv < nk) & (kv >= hi) & (kv // KB == hi // KB))
        return keep

    return mask_mod


def _own_mask(plan: DirectPlan, exact_set: ExactSet, causal: bool):
    """Mask function of the own-key call alone (without tile lists): :func:`_window_mask`, a key of
    a picked tile or an eligible key of a routed tile.

    What FlexAttention's unfused path and the dense form need (they ignore the tile lists);
    a lookup per entry, which the compiled kernel avoids with :func:`_listed_mask`.
    """
    base = _window_mask(plan, exact_set, causal)
    picked, routed, nk, nq = plan.picked, plan.routed, plan.nk, plan.nq
    if picked is None and routed is None:
        return base
    s, w, blk, offset = exact_set.sink_count, exact_set.window_width, plan.route_block, plan.nk - plan.nq

    def lookup(tiles, b, h, i, kv):
        return tiles[b, 0 if tiles.shape[1] == 1 else h, i // QB, torch.clamp(kv // KB, max=tiles.shape[-1] - 1)]

    def mask_mod(b, h, i, kv):
        keep = base(b, h, i, kv)
        if picked is not None:
            keep = keep | (lookup(picked, b, h, i, kv) & (kv < nk))
        if routed is not None:  # an eligible key of the row block (as _eligible_of)
            rb = i // blk
            cf = rb * blk + offset
            elig = (kv >= s) & (kv < nk) & (kv <= cf - w)
            if not causal:
                cl = torch.clamp((rb + 1) * blk, max=nq) - 1 + offset
                elig = ((kv >= s) & (kv < nk) & ((kv <= cf - w) | (kv >= cl + w))) if w else (kv >= s) & (kv < nk)
            keep = keep | (lookup(routed, b, h, i, kv) & elig)
        return keep

    return mask_mod


def _gathered_mods(plan: DirectPlan, exact_set: ExactSet, bq: int, causal: bool):
    """Mask and score functions of the gathered call, whose head axis is (head, query tile).

    Slot ``kv`` of head ``hh = head · NT + t`` counts for row ``i`` of tile ``t`` when it
    belongs to the row's query block and its key is visible and outside the row's window;
    its score gets the slot's log weight.
    """
    w, offset, n_qt = exact_set.window_width, plan.nk - plan.nq, plan.n_qt
    bsz, h = plan.gpos.shape[:2]
    gpos = plan.gpos.reshape(bsz, h * n_qt, plan.slots)
    logw = plan.logw.reshape(bsz, h * n_qt, plan.slots)
    owner = None if plan.owner is None else plan.owner.reshape(bsz, h * n_qt, plan.slots)

    def mask_mod(b, hh, i, kv):
        row = (hh % n_qt) * QB + i
        c = row + offset
        pos = gpos[b, hh, kv]
        if causal:
            keep = pos <= c - w
        else:
            keep = ((c - pos).abs() >= w) & (pos < NONE) if w else pos < NONE
        if owner is not None:
            who = owner[b, hh, kv]
            keep = keep & ((who < 0) | (who == row // bq))
        return keep

    def score_mod(score, b, hh, i, kv):
        return score + logw[b, hh, kv]

    return mask_mod, score_mod


def plan_counts(plan: DirectPlan, exact_set: ExactSet, bq: int, causal: bool):
    """Keys with nonzero weight per row, (B, H, nq) int64: what the two calls attend.

    The own call's listed tiles (a full tile: its keys inside the sequence; a partial
    tile: the keys its mask keeps) plus the distinct gathered slots that count for the
    row (copies of one sampled key count once, as the reference's summed weight).
    """
    nq, nk, n_qt = plan.nq, plan.nk, plan.n_qt
    dev = plan.gpos.device
    i = torch.arange(n_qt * QB, device=dev).view(n_qt, QB)
    mask = _listed_mask(plan, exact_set, causal)

    def listed(num, idx):
        ok = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()  # (·, ·, NT, n)
        return ok, idx.long()

    ok, idx = listed(plan.full_num, plan.full_idx)
    keys_in = torch.clamp(nk - idx * KB, 0, KB)
    own = (keys_in * ok).sum(-1)[..., None].expand(*ok.shape[:3], QB)  # (·, ·, NT, QB)
    ok, idx = listed(plan.kv_num, plan.kv_idx)
    kv = idx[..., None] * KB + torch.arange(KB, device=dev)  # (·, ·, NT, n, KB)
    bb = torch.arange(kv.shape[0], device=dev).view(-1, 1, 1, 1, 1, 1)
    hb = torch.arange(kv.shape[1], device=dev).view(1, -1, 1, 1, 1, 1)
    kept = mask(bb, hb, i[:, :, None, None], kv[:, :, :, None, :, :]) & ok[:, :, :, None, :, None]
    own = own + kept.flatten(-2).sum(-1)
    g_mask, _ = _gathered_mods(plan, exact_set, bq, causal)
    bsz, h = plan.gpos.shape[:2]
    hh = torch.arange(h * n_qt, device=dev)
    b = torch.arange(bsz, device=dev)
    order = torch.sort(plan.gpos.long() * (2 ** 20) + (0 if plan.owner is None else plan.owner.long() + 2),
                       dim=-1, stable=True)
    first = torch.ones_like(order.values, dtype=torch.bool)
    first[..., 1:] = order.values[..., 1:] != order.values[..., :-1]  # the first copy of (key, owner)
    distinct = torch.zeros_like(first).scatter_(-1, order.indices, first).reshape(bsz, h * n_qt, 1, plan.slots)
    kvs = torch.arange(plan.slots, device=dev)
    keep = g_mask(b[:, None, None, None], hh[None, :, None, None], torch.arange(QB, device=dev)[None, None, :, None],
                  kvs[None, None, None, :])
    gathered = (keep & distinct).sum(-1).reshape(bsz, h, n_qt * QB)
    own = own.expand(bsz, h, n_qt, QB).reshape(bsz, h, n_qt * QB)
    return (own + gathered)[:, :, :nq]


def _by_tile(x, n_qt: int, rows: int):
    """(B, H, N, ·) → (B, H·NT, rows, ·): query tiles as heads (the rows padded to NT·rows)."""
    bsz, h, n, d = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, n_qt * rows - n))
    return x.reshape(bsz, h * n_qt, rows, d)


def _gather_slots(x, plan: DirectPlan):
    """The gathered keys or values (B, H·NT, L, ·) of the plan's slots (differentiable: the
    adjoint is an index add)."""
    bsz, h, nk, d = x.shape
    idx = torch.clamp(plan.gpos, max=nk - 1).long().reshape(bsz, h, -1)
    return torch.gather(x, 2, idx[..., None].expand(bsz, h, idx.shape[-1], d)).reshape(
        bsz, h * plan.n_qt, plan.slots, d)


def merge_partials(o1, l1, o2, l2):
    """The two calls' partials merged by :func:`hyperref.gpu.function.merge`, in the dtype of the
    log normalizers (fp32 for half inputs), the output cast back to the dtype of ``o1``."""
    from .function import merge

    out, lse = merge(o1.to(l1.dtype), l1, o2.to(l1.dtype), l2)
    return out.to(o1.dtype), lse


def flex_direct(q, k, v, plan: DirectPlan, *, scale: float, config: HyperConfig, causal: bool,
                kernel_options=None, dense: bool | None = None):
    """``(out, lse)`` of the direct mode from a plan; differentiable in ``q``, ``k``, ``v``.

    Two block-sparse attention calls merged by their log normalizers (:func:`merge_partials`):
    the own keys (sinks, window, picked tiles; a mask of index arithmetic) and the gathered
    slots (heavy keys and samples; each query tile a head of its own over its ``L`` slots).
    ``k``, ``v`` (B, H, nk, ·) have the query heads' count (expanded for GQA). ``dense``:
    the same mask and score functions on dense scores (:func:`_math`; the default off CUDA,
    FlexAttention having no CPU backward); ``False``: FlexAttention, compiled on CUDA, its
    eager path elsewhere.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bsz, h, nq, d = q.shape
    exact_set = paper_exact_set(config)
    math_path = dense or (dense is None and q.device.type != "cuda")
    # the compiled kernel reads the tile lists; the dense form and the unfused path do not
    lists = not math_path and q.device.type == "cuda"
    own_mask = (_listed_mask if lists else _own_mask)(plan, exact_set, causal)
    # the key-to-query lists only serve the backward (a transposition of the tile lists)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if math_path:
        o1, l1 = _math(q, k, v, own_mask, None, scale)
    else:
        o1, l1 = _flex_call(q.device.type, q, k, v, None, own_block_mask(plan, own_mask, grad), scale=scale, kernel_options=kernel_options)
    if not plan.slots:  # nothing gathered: the own keys are the whole answer
        return o1, l1
    q_t = _by_tile(q, plan.n_qt, QB)
    k_g, v_g = _gather_slots(k, plan), _gather_slots(v, plan)
    g_mask, g_score = _gathered_mods(plan, exact_set, config.query_block, causal)
    if math_path:
        o2, l2 = _math(q_t, k_g, v_g, g_mask, g_score, scale)
    else:
        n_g = plan.slots // GB
        g_num = torch.full((1, 1, 1), n_g, dtype=torch.int32, device=q.device)
        g_idx = torch.arange(n_g, dtype=torch.int32, device=q.device)[None, None, None]
        g_bm = BlockMask.from_kv_blocks(g_num, g_idx, BLOCK_SIZE=(QB, GB), mask_mod=g_mask,
                                        seq_lengths=(QB, plan.slots), compute_q_blocks=grad)
        o2, l2 = _flex_call(q.device.type, q_t, k_g, v_g, g_score, g_bm, scale=scale,
                            kernel_options=kernel_options)
    o2 = o2.reshape(bsz, h, plan.n_qt * QB, -1)[:, :, :nq]
    l2 = l2.reshape(bsz, h, plan.n_qt * QB)[:, :, :nq]
    merge = _compiled("merge", merge_partials) if q.device.type == "cuda" else merge_partials
    return merge(o1, l1, o2, l2.to(l1.dtype))


def own_block_mask(plan: DirectPlan, mask_mod, grad: bool):
    """The own-key call's ``BlockMask`` from the plan's tile lists (the key-to-query lists only
    where a backward follows)."""
    from torch.nn.attention.flex_attention import BlockMask

    back = (plan.q_num, plan.q_idx, plan.full_q_num, plan.full_q_idx) if grad else (None,) * 4
    return BlockMask(seq_lengths=(plan.nq, plan.nk), kv_num_blocks=plan.kv_num, kv_indices=plan.kv_idx,
                     full_kv_num_blocks=plan.full_num, full_kv_indices=plan.full_idx, q_num_blocks=back[0],
                     q_indices=back[1], full_q_num_blocks=back[2], full_q_indices=back[3], BLOCK_SIZE=(QB, KB),
                     mask_mod=mask_mod)


def _flex_call(device_type, q, k, v, score_mod, block_mask, *, scale, kernel_options):
    """One FlexAttention call: ``(out, lse)``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return _flex_fn(device_type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     return_lse=True, kernel_options=kernel_options)
    out, aux = _flex_fn(device_type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     kernel_options=kernel_options, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _dense_full(plan: DirectPlan, nq: int):
    """The own-key call's full tiles as a dense (·, ·, nq, nk_pad) mask (what the tile lists say)."""
    n_kt = plan.nk_pad // KB
    listed = torch.arange(plan.full_idx.shape[-1], device=plan.full_idx.device) < plan.full_num[..., None].long()
    full = torch.zeros(*plan.full_idx.shape[:3], n_kt + 1, dtype=torch.bool, device=plan.full_idx.device)
    full.scatter_(-1, torch.where(listed, plan.full_idx.long(), n_kt), True)
    return full[..., :n_kt].repeat_interleave(QB, dim=2)[:, :, :nq].repeat_interleave(KB, dim=3)


def _math(q, k, v, mask_mod, score_mod, scale):
    """A kernel call's function on dense scores (differentiable on any device; small sizes).

    An entry counts when the mask function keeps it, with the score function's bias.
    """
    bsz, h, nq, _ = q.shape
    kv_len = k.shape[2]
    b = torch.arange(bsz, device=q.device)[:, None, None, None]
    hh = torch.arange(h, device=q.device)[None, :, None, None]
    i = torch.arange(nq, device=q.device)[None, None, :, None]
    kv = torch.arange(kv_len, device=q.device)[None, None, None, :]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    keep = mask_mod(b, hh, i, kv)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    if score_mod is not None:
        scores = score_mod(scores, b, hh, i, kv)
    scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (p @ v.to(work)).to(q.dtype), lse


def direct_flex_attention(q, k, v, *, causal: bool = True, scale=None, config: HyperConfig, draws=None,
                          generator=None, kernel_options=None, return_lse: bool = False,
                          return_counts: bool = False):
    """The direct mode of SPEC §6b on the block-sparse FlexAttention engine.

    Parameters
    ----------
    q : tensor (B, H, nq, D); k, v : tensors (B, Hk, nk, D), ``Hk`` dividing ``H``
    causal : bool
        Bottom-right aligned causal mask (row ``i`` sees keys ``j <= i + nk − nq``).
    scale : float, optional
        Default ``1/sqrt(D)``.
    config : HyperConfig
        ``mode="direct"`` with an exact set of ``sinks``, ``window``, ``blocktop``,
        ``heavykeys`` parts; ``query_block`` dividing 128 or a multiple of it.
        Exact attention when ``nq <= config.min_seq_len``, as the reference.
    draws : hyperref.Draws, optional
        The reference's draws (:func:`hyperref.make_draws` for batch shape
        ``(B, H)``): the answer is then the reference's on the same draws.
        Without them the draws are made here from ``generator``.
    generator : torch.Generator, optional
        Source of the draws when ``draws`` is not given.
    kernel_options : dict, optional
        Passed to FlexAttention on CUDA (tile sizes, stages, warps).
    return_lse : bool
        Also return the log normalizer ``lse`` (B, H, nq): float32, float64 for float64 input.
    return_counts : bool
        Also return the number of keys with nonzero weight per row (B, H, nq) int64
        (:func:`plan_counts`), after ``lse`` when both are asked.

    Returns
    -------
    out : tensor (B, H, nq, Dv), the dtype of ``q``; then ``lse`` and ``counts`` when asked.

    Raises
    ------
    InputError
        Shapes, dtypes or draws that do not fit, parts this engine does not compute.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise InputError("q, k, v must be torch tensors")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise InputError(f"q, k, v must have shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not isinstance(config, HyperConfig) or config.mode != "direct":
        raise InputError("direct_flex_attention needs a HyperConfig with mode='direct'")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputError(f"dtype {q.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if not (q.device == k.device == v.device):
        raise InputError("q, k, v must be on the same device")
    bsz, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if k.shape[0] != bsz or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hk == 0 or h % hk:
        raise InputError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if nk == 0:
        raise InputError("k and v are empty: attention needs at least one key")
    exact_set, bq = paper_exact_set(config), config.query_block
    check_supported(exact_set, bq)
    scale = check_scale(scale, d)
    heavy_rows, sample_u = _draws(config, exact_set, nq, nk, d, causal, bsz, h, q.device, draws, generator)
    if h != hk:
        k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    if nq <= config.min_seq_len:  # as the reference: exact attention at short lengths
        out, lse = _exact(q, k, v, scale, causal)
        counts = None
        if return_counts:
            c = torch.arange(nq, device=q.device) + (nk - nq)
            counts = (torch.clamp(c + 1, 0, nk) if causal else torch.full_like(c, nk)).expand(bsz, h, nq)
    else:
        with torch.no_grad():
            plan = make_plan(q.detach(), k.detach(), v.detach(), causal=causal, scale=scale, config=config,
                             heavy_rows=heavy_rows, sample_u=sample_u)
            counts = plan_counts(plan, exact_set, bq, causal) if return_counts else None
        out, lse = flex_direct(q, k, v, plan, scale=scale, config=config, causal=causal,
                               kernel_options=kernel_options)
    extras = ((lse,) if return_lse else ()) + ((counts,) if return_counts else ())
    return (out, *extras) if extras else out


def _exact(q, k, v, scale, causal):
    """Exact attention with the bottom-right causal mask; ``(out, lse)`` (lse −inf: no key)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        hidden = torch.arange(nk, device=q.device)[None, :] > torch.arange(nq, device=q.device)[:, None] + nk - nq
        logits = logits.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (p @ v.to(work)).to(q.dtype), lse


def _draws(config, exact_set, nq, nk, d, causal, bsz, h, device, draws, generator):
    """``(heavy_rows, sample_u)`` on the device: the reference's draws, or fresh ones.

    ``None, None`` when the call is exact (``nq <= config.min_seq_len``).
    """
    heavy_i = next((i for i, p in enumerate(exact_set.parts) if isinstance(p, HeavyKeys)), None)
    n_t = -(-nq // config.query_block)
    if draws is not None:
        from hyperref.draws import Draws, check_draws_contents

        if not isinstance(draws, Draws):
            raise InputError(f"draws must be a hyperref.Draws, got {type(draws).__name__}")
        made_for = (draws.nq, draws.nk, draws.d, draws.causal, tuple(draws.batch_shape))
        if made_for != (nq, nk, d, bool(causal), (bsz, h)) or draws.config != config:
            raise InputError(f"draws were made for (nq, nk, d, causal, batch_shape) = {made_for} and "
                             f"their own config, not {(nq, nk, d, bool(causal), (bsz, h))} and this one")
        check_draws_contents(draws)
        if draws.direct is None:
            return None, None
        rows = None if heavy_i is None else torch.as_tensor(draws.direct.exact[heavy_i], device=device)
        return rows, torch.as_tensor(draws.direct.sample_u, dtype=torch.float64, device=device)
    if nq <= config.min_seq_len:
        return None, None
    u = torch.rand((bsz, h, n_t, config.samples), dtype=torch.float64, device=device, generator=generator)
    rows = None
    if heavy_i is not None:
        n_rows = min(exact_set.parts[heavy_i].rows, nq)
        keys = torch.rand((bsz, h, nq), device=device, generator=generator)
        rows = torch.sort(torch.topk(keys, n_rows, dim=-1).indices, dim=-1).values
    return rows, u
