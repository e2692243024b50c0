"""The direct mode (SPEC §6b) in torch: the reference's function of (inputs, draws), all heads at once.

Twin of :func:`hyperref.direct.direct_head` (the readable definition): the
same exact set, supports, inverse-CDF samples and key weights ``W_ij``,
evaluated with dense torch operations on row chunks, so it runs on any
device. Work and memory are ``O(nq·nk)`` per head (row chunks of
``chunk_rows``): meant for cross-checking and for models at moderate ``n``
(a language model's 8192-token prefill on one GPU), not as the fast kernel.
"""

from __future__ import annotations

import math

import torch

from hyperref._validation import InputError
from hyperref.direct import block_support, paper_exact_set
import numpy as np

from hyperref.exact_set import BlockKeys, BlockTop, Geometry, HeavyKeys, Quest, Sinks, SortLSH, TopK, Window


def _gray_inverse(c):
    shift = 1
    while shift < 64:
        c = c ^ (c >> shift)
        shift *= 2
    return c


def _buckets(x, planes):
    """``gray⁻¹`` of the sign codes (:func:`hyperref.lsh.buckets`); x (H, n, d), planes (H, d, r)."""
    bits = (x @ planes.to(x.dtype)) > 0
    weights = 2 ** torch.arange(planes.shape[-1], device=x.device, dtype=torch.int64)
    return _gray_inverse((bits.to(torch.int64) * weights).sum(-1))


def _lsh_blocks(part: SortLSH, q, k, planes, nq, nk):
    """Per round, the sortLSH block of every query and key: (rounds, H, nq), (rounds, H, nk)."""
    keys = k - k.mean(dim=1, keepdim=True) if part.centred else k
    n_blocks = -(-nk // part.block)
    p = torch.arange(nq, device=q.device, dtype=torch.int64)
    sorted_q_block = torch.clamp((p * nk) // (nq * part.block), max=n_blocks - 1)
    sorted_k_block = torch.arange(nk, device=q.device, dtype=torch.int64) // part.block
    qb, kb = [], []
    for r in range(part.rounds):
        w = planes[:, r]
        perm_q = torch.sort(_buckets(q, w), dim=-1, stable=True).indices
        perm_k = torch.sort(_buckets(keys, w), dim=-1, stable=True).indices
        qb.append(torch.empty_like(perm_q).scatter_(1, perm_q, sorted_q_block.expand_as(perm_q)))
        kb.append(torch.empty_like(perm_k).scatter_(1, perm_k, sorted_k_block.expand_as(perm_k)))
    return torch.stack(qb), torch.stack(kb)


def _member(parts, states, logits, rows, geom: Geometry):
    """Boolean (H, rows, nk): ``j ∈ E_i`` and visible (``logits`` already −inf where hidden)."""
    nk = logits.shape[-1]
    j = torch.arange(nk, device=logits.device)
    c = (rows + geom.offset)[:, None]
    out = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for part, state in zip(parts, states):
        if isinstance(part, Sinks):
            out |= (j < part.count)[None, None, :]
        elif isinstance(part, Window):
            near = ((j > c - part.width) & (j <= c)) if geom.causal else (c - j).abs() < part.width
            out |= near[None]
        elif isinstance(part, SortLSH):
            qb, kb = state
            out |= (qb[:, :, rows, None] == kb[:, :, None, :]).any(dim=0)
        elif isinstance(part, BlockTop):
            picked = state[:, rows // part.block]  # (H, rows, count), −1 for none
            out |= (picked[..., None] == (j // part.block)[None, None, None, :]).any(dim=2)
        elif isinstance(part, BlockKeys):
            picked = state[:, rows // part.within(geom).block]  # (H, rows, keep), −1 for none
            mark = torch.zeros((*picked.shape[:2], nk + 1), dtype=torch.bool, device=logits.device)
            out |= mark.scatter_(-1, torch.where((picked >= 0) & (picked < nk), picked, nk), True)[..., :nk]
        elif isinstance(part, HeavyKeys):
            out |= state[:, None, :nk]
        elif isinstance(part, Quest):
            out |= _quest_member(part, state, logits, rows, geom)
        elif isinstance(part, TopK):
            top = torch.topk(logits, min(part.k, nk), dim=-1).indices
            out |= torch.zeros_like(out).scatter_(-1, top, True)
        else:
            raise InputError(f"the torch direct mode has no implementation of {part.describe()}")
    return out & torch.isfinite(logits)


def _sample_weights(sq, u, geom: Geometry, exact_set, bq, sampler, m):
    """Per query block, the summed importance weight of every key: (H, T, nk) float64.

    Same inverse CDF as :func:`hyperref.direct.sample_block` on the block's support.
    """
    n_heads, n_t = u.shape[0], u.shape[1]
    nk = sq.shape[-1]
    out = torch.zeros((n_heads, n_t, nk), dtype=torch.float64, device=sq.device)
    j = torch.arange(nk, device=sq.device)
    for t in range(n_t):
        lo, hi = block_support(t, geom, exact_set, bq)
        if hi <= lo or m == 0:
            continue
        inside = (j >= lo) & (j < hi)
        size = hi - lo
        uniform = inside.to(torch.float64) / size
        if sampler == "uniform":
            p = uniform.expand(n_heads, nk)
        else:
            part = torch.where(inside, sq, 0.0)
            total = part.sum(-1, keepdim=True)
            rownorm = torch.where(total > 0, part / torch.where(total > 0, total, 1.0), uniform)
            p = rownorm if sampler == "rownorm" else 0.5 * rownorm + 0.5 * uniform
        cdf = torch.cumsum(p[:, lo:hi], dim=-1)
        idx = torch.searchsorted(cdf, (u[:, t] * cdf[:, -1:]).contiguous(), right=True)
        last = (hi - lo - 1) - torch.argmax(torch.flip(p[:, lo:hi] > 0, dims=[-1]).to(torch.int8), dim=-1)
        idx = torch.minimum(idx, last[:, None]) + lo
        w = 1.0 / (m * torch.gather(p, 1, idx))
        out[:, t].scatter_add_(1, idx, w)
    return out


def direct_attention(q, k, v, *, causal: bool, scale: float, config, draws, chunk_rows: int = 1024,
                     return_counts: bool = False):
    """The direct mode of SPEC §6b on torch tensors, the reference's draws.

    Parameters
    ----------
    q : tensor (B, H, nq, D); k, v : tensors (B, Hk, nk, D), ``Hk`` divides ``H``
    causal : bool
    scale : float
    config : HyperConfig
        ``mode="direct"``.
    draws : hyperref.Draws
        Made by :func:`hyperref.make_draws` for batch shape ``(B, H)``.
    chunk_rows : int
        Query rows per dense chunk (a multiple of ``config.query_block`` is used).
    return_counts : bool
        Also return the number of keys with nonzero weight per row, (B, H, nq).

    Returns
    -------
    out : tensor (B, H, nq, Dv) in the dtype of ``v``; lse : tensor (B, H, nq) float32
    """
    b, h, nq, _ = q.shape
    hk, nk = k.shape[1], k.shape[2]
    group = h // hk
    geom = Geometry(nq, nk, causal)
    exact_set, bq = paper_exact_set(config), config.query_block
    dev = q.device
    chunk = max(bq, (chunk_rows // bq) * bq)
    out = torch.zeros((b, h, nq, v.shape[-1]), dtype=v.dtype, device=dev)
    lse = torch.full((b, h, nq), -math.inf, dtype=torch.float32, device=dev)
    counts = torch.zeros((b, h, nq), dtype=torch.int64, device=dev)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    for bi in range(b):
        qh = q[bi].to(work)
        kh = k[bi].repeat_interleave(group, dim=0).to(work)
        vh = v[bi].repeat_interleave(group, dim=0).to(work)
        dr = draws.direct.head((bi,))
        states = []
        covered = (exact_set.sink_count, exact_set.window_width)
        for part, arr in zip(exact_set.parts, dr.exact):
            if isinstance(part, SortLSH):
                planes = torch.as_tensor(arr, device=dev, dtype=torch.float64).to(work)
                states.append(_lsh_blocks(part, qh, kh, planes, nq, nk))
            elif isinstance(part, Quest):
                starts = torch.arange(0, nk, part.block, device=dev)
                kb = torch.nn.functional.pad(kh.double(), (0, 0, 0, len(starts) * part.block - nk),
                                             value=float("nan")).unflatten(1, (len(starts), part.block))
                states.append((torch.nan_to_num(kb, nan=math.inf).amin(2),
                               torch.nan_to_num(kb, nan=-math.inf).amax(2), qh.double(), kh.double(),
                               scale, covered[1]))
            elif isinstance(part, (BlockTop, BlockKeys, HeavyKeys)):
                states.append(_host_selection(part, qh, kh, scale, geom, arr, covered))
            else:
                states.append(None)
        v64 = vh.detach().double()  # sampling probabilities are constants of the draws (no gradient)
        peak = v64.abs().amax()
        sq = ((v64 / torch.where(peak > 0, peak, 1.0)) ** 2).sum(-1)  # as hyperref.sampling.squared_row_norms
        u = torch.as_tensor(dr.sample_u, device=dev)
        wsamp = _sample_weights(sq, u, geom, exact_set, bq, config.sampler, config.samples)
        for r0 in range(0, nq, chunk):
            r1 = min(nq, r0 + chunk)
            rows = torch.arange(r0, r1, device=dev)
            kend = min(nk, r1 - 1 + geom.offset + 1) if causal else nk
            if kend <= 0:
                continue
            logits = (qh[:, r0:r1] @ kh[:, :kend].transpose(1, 2)) * scale
            if causal:
                hidden = torch.arange(kend, device=dev)[None, :] > (rows + geom.offset)[:, None]
                logits = logits.masked_fill(hidden[None], -math.inf)
            member = _member(exact_set.parts, [_cut(s, kend) for s in states], logits, rows, geom)
            resid = torch.isfinite(logits) & ~member
            w = member.to(torch.float64) + resid * wsamp[:, rows // bq, :kend]
            logits = logits + torch.log(w).to(work)
            peak = logits.amax(-1, keepdim=True)
            finite = torch.isfinite(peak)
            e = torch.exp(logits - torch.where(finite, peak, 0.0))
            total = e.sum(-1, keepdim=True)
            o = (e @ vh[:, :kend]) / torch.where(finite, total, 1.0)
            out[bi, :, r0:r1] = o.to(v.dtype)
            lse[bi, :, r0:r1] = torch.where(finite, peak + torch.log(total), -math.inf)[..., 0].float()
            counts[bi, :, r0:r1] = (w > 0).sum(-1)
    return (out, lse, counts) if return_counts else (out, lse)


def _quest_member(part: Quest, state, logits, rows, geom: Geometry):
    """:meth:`hyperref.exact_set.Quest.member` for all heads: (H, rows, nk) bool (float64 scores)."""
    kmin, kmax, q, k, scale, w = state
    b, nk = part.block, logits.shape[-1]
    qr = q[:, rows]
    bound = qr.clamp(min=0) @ kmax.transpose(1, 2) + qr.clamp(max=0) @ kmin.transpose(1, 2)
    if geom.causal:
        n_kb = kmin.shape[1]
        g_end = torch.clamp(torch.arange(1, n_kb + 1, device=q.device) * b, max=k.shape[1]) - 1
        far = g_end[None, :] <= (rows + geom.offset - w)[:, None]
        bound = bound.masked_fill(~far[None], -math.inf)
    # topk, not a stable sort: exact ties of float64 bounds or logits are the only way to differ
    order = torch.topk(bound, min(part.candidates // b, bound.shape[-1]), dim=-1).indices
    ok = torch.isfinite(torch.gather(bound, -1, order))
    picked = torch.zeros(bound.shape, dtype=torch.bool, device=q.device).scatter_(-1, order, ok)
    cand = picked.repeat_interleave(b, dim=-1)[..., :nk]
    scored = torch.where(cand, (qr @ k[:, :nk].transpose(1, 2)) * scale, -math.inf)
    best = torch.topk(scored, min(part.keep, nk), dim=-1).indices
    ok = torch.isfinite(torch.gather(scored, -1, best))
    return torch.zeros(scored.shape, dtype=torch.bool, device=q.device).scatter_(-1, best, ok)


def _host_selection(part, q, k, scale, geom, draws, covered):
    """The key selection of a ``blocktop``, ``blockkeys`` or ``heavykeys`` part, per head, by the reference.

    These selections are index planning (scores of ``O(nq·nk/b)`` or
    ``O(|T|·nk)`` entries): the reference's own ``prepare`` computes them on the
    host, so both engines use the same keys. Returns, on the device of ``q``,
    the chosen key blocks (H, row blocks, count), the chosen keys (H, row blocks, keep) or a
    key mark (H, nk).
    """
    qs, ks = q.detach().cpu().numpy(), k.detach().cpu().numpy()
    picked = [part.prepare(qs[h], ks[h], scale, geom, None if draws is None else draws[h], covered)
              for h in range(len(qs))]
    if isinstance(part, (BlockTop, BlockKeys)):
        return torch.as_tensor(np.stack(picked), device=q.device)
    mark = torch.zeros((len(qs), k.shape[1]), dtype=torch.bool, device=q.device)
    for h, keys in enumerate(picked):
        mark[h, torch.as_tensor(keys, device=q.device, dtype=torch.int64)] = True
    return mark


def _cut(state, kend):
    """A part's state with keys past ``kend`` dropped (sortLSH key blocks)."""
    if state is None or not isinstance(state, tuple) or len(state) != 2:
        return state
    qb, kb = state
    return qb, kb[..., :kend]
