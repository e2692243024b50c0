"""The autograd Function around the Triton kernels, and its dense torch twin.

``interval_attention(q, k, v, plan)`` returns ``(out, lse)`` of one piece of
HyperAttention: the sortLSH blocks with their samples, or the causal leaves
(see :mod:`gpu.kernels`). Heads are flattened: ``q`` is (B·H, nq, D), ``k, v``
are (B·Hk, nk, ·). ``plan`` holds the index tensors.

:func:`interval_attention_dense` computes the same function with dense torch
operations (``O(nq·nk)`` memory: small sizes only) and is differentiable by
autograd: the backward kernels are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
import os

import torch

try:
    import triton

    from . import kernels as K
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None
    K = None


@dataclass
class Plan:
    """Index tensors of one piece (all on the device of ``q``).

    ``perm_q`` (BH, nq) / ``perm_k`` (BH, nk): sorted orders (``None`` for the
    causal leaves); ``lo, hi, rtag`` (nq,): per sorted row, its key interval
    and block tag; ``idx, bias, stag`` (BH, m): sampled keys, their log
    weights and block tags (``None`` without samples); ``H, Hk``: heads.
    """

    perm_q: torch.Tensor | None
    perm_k: torch.Tensor | None
    lo: torch.Tensor
    hi: torch.Tensor
    rtag: torch.Tensor | None
    idx: torch.Tensor | None
    bias: torch.Tensor | None
    stag: torch.Tensor | None
    H: int
    Hk: int


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(d: int, dtype: torch.dtype, device) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for the forward kernel."""
    if _interpret() or device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if d <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 2


def _bwd_tiles(d: int, dtype: torch.dtype, device) -> tuple[int, int, int, int]:
    if _interpret() or device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32 or d > 64:
        return 64, 64, 4, 2
    return 64, 64, 4, 3


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dummy(device):
    return torch.zeros(1, dtype=torch.int32, device=device)


def _index_args(plan: Plan, device):
    """The plan's index pointers, in the order the forward and dq kernels take them
    (PERM_Q, PERM_K, IDX, BIAS, STAG, LO, HI, RTAG), absent ones replaced by a dummy,
    and their row strides (s_pqb, s_pkb, s_ib)."""
    dummy = _dummy(device)
    pick = lambda t: dummy if t is None else t  # noqa: E731
    pointers = (pick(plan.perm_q), pick(plan.perm_k), pick(plan.idx), pick(plan.bias),
                pick(plan.stag), plan.lo, plan.hi, pick(plan.rtag))
    strides = tuple(0 if t is None else t.stride(0) for t in (plan.perm_q, plan.perm_k, plan.idx))
    return pointers, strides


class _IntervalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[2]
        out = torch.empty((bh, nq, dv), device=q.device, dtype=q.dtype)
        lse = torch.empty((bh, nq), device=q.device, dtype=torch.float32)
        BM, BN, warps, stages = _tiles(d, q.dtype, q.device)
        has_perm = plan.perm_q is not None
        has_samples = plan.idx is not None
        m = plan.idx.shape[1] if has_samples else 0
        pointers, index_strides = _index_args(plan, q.device)
        grid = (triton.cdiv(nq, BM), bh)
        K._fwd_kernel[grid](
            q, k, v, *pointers, out, lse,
            nq, nk, m, plan.H, plan.Hk, plan.H // plan.Hk, scale * K.LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), *index_strides,
            D=d, DV=dv, BM=BM, BN=BN, HAS_SAMPLES=has_samples, HAS_PERM=has_perm,
            PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[2]
        dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
        delta = delta.contiguous()
        BM, BN, warps, stages = _bwd_tiles(d, q.dtype, q.device)
        has_perm = plan.perm_q is not None
        has_samples = plan.idx is not None
        dummy = _dummy(q.device)
        m = plan.idx.shape[1] if has_samples else 0
        group = plan.H // plan.Hk
        prec = _prec(q.dtype)
        sq = (plan.perm_q.stride(0) if has_perm else 0, plan.perm_k.stride(0) if has_perm else 0)
        dq = torch.empty_like(q)
        pointers, index_strides = _index_args(plan, q.device)
        K._bwd_dq_kernel[(triton.cdiv(nq, BM), bh)](
            q, k, v, *pointers, dout, lse, delta, dq,
            nq, nk, m, plan.H, plan.Hk, group, scale * K.LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), *index_strides,
            D=d, DV=dv, BM=BM, BN=BN, HAS_SAMPLES=has_samples, HAS_PERM=has_perm, PREC=prec,
            num_warps=warps, num_stages=stages)
        # interval keys: rows [rstart, rend) of each key tile (intervals are monotone)
        tiles = torch.arange(0, nk, BN, device=q.device, dtype=torch.int32)
        rstart = torch.searchsorted(plan.hi, tiles, right=True).int()
        rend = torch.searchsorted(plan.lo, torch.clamp(tiles + BN, max=nk), right=False).int()
        dk_h = torch.zeros((bh, nk, d), device=q.device, dtype=torch.float32)
        dv_h = torch.zeros((bh, nk, dv), device=q.device, dtype=torch.float32)
        K._bwd_dkdv_kernel[(triton.cdiv(nk, BN), bh)](
            q, k, v, plan.perm_q if has_perm else dummy, plan.perm_k if has_perm else dummy,
            plan.lo, plan.hi, rstart, rend, dout, lse, delta, dk_h, dv_h,
            nq, nk, plan.H, plan.Hk, group, scale * K.LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), sq[0], sq[1],
            dk_h.stride(0), dk_h.stride(1), dv_h.stride(0), dv_h.stride(1),
            D=d, DV=dv, BM=BM, BN=BN, HAS_PERM=has_perm, PREC=prec,
            num_warps=warps, num_stages=stages)
        if has_samples:
            chunk_rows = max(BM, triton.cdiv(triton.cdiv(nq, 32), BM) * BM)
            n_chunks = triton.cdiv(nq, chunk_rows)
            dks = torch.empty((bh, n_chunks, m, d), device=q.device, dtype=torch.float32)
            dvs = torch.empty((bh, n_chunks, m, dv), device=q.device, dtype=torch.float32)
            K._bwd_samples_kernel[(triton.cdiv(m, BN), n_chunks, bh)](
                q, k, v, plan.perm_q, plan.idx, plan.bias, plan.stag, plan.rtag,
                dout, lse, delta, dks, dvs,
                nq, m, plan.H, plan.Hk, group, chunk_rows, scale * K.LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), lse.stride(0), sq[0], plan.idx.stride(0),
                dks.stride(0), dks.stride(1), dks.stride(2), dvs.stride(0), dvs.stride(1), dvs.stride(2),
                D=d, DV=dv, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages)
            index = plan.idx.long()
            dk_h.scatter_add_(1, index[..., None].expand(-1, -1, d), dks.sum(1))
            dv_h.scatter_add_(1, index[..., None].expand(-1, -1, dv), dvs.sum(1))
        n_kv = k.shape[0]
        dk = dk_h.view(n_kv, group, nk, d).sum(1).to(k.dtype)
        dvv = dv_h.view(n_kv, group, nk, dv).sum(1).to(v.dtype)
        return dq, dk, dvv, None, None


def interval_attention(q, k, v, plan: Plan, scale: float):
    """``(out, lse)`` of one piece through the Triton kernels (differentiable)."""
    if K is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install triton)")
    if q.device.type != "cuda" and not _interpret():
        raise RuntimeError("the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    return _IntervalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)


def interval_attention_dense(q, k, v, plan: Plan, scale: float):
    """The same ``(out, lse)`` by dense torch operations (autograd-differentiable)."""
    bh, nq, d = q.shape
    nk = k.shape[1]
    group = plan.H // plan.Hk
    heads = torch.arange(bh, device=q.device)
    kv_of = (heads // plan.H) * plan.Hk + (heads % plan.H) // group
    kk, vv = k[kv_of], v[kv_of]
    if plan.perm_q is not None:
        pq, pk = plan.perm_q.long(), plan.perm_k.long()
        qs = q.gather(1, pq[..., None].expand(-1, -1, d))
        ks = kk.gather(1, pk[..., None].expand(-1, -1, d))
        vs = vv.gather(1, pk[..., None].expand(-1, -1, vv.shape[2]))
    else:
        qs, ks, vs = q, kk, vv
    cols = torch.arange(nk, device=q.device)
    valid = (cols[None, :] >= plan.lo.long()[:, None]) & (cols[None, :] < plan.hi.long()[:, None])
    logits = torch.einsum("bid,bjd->bij", qs, ks) * scale
    logits = logits.masked_fill(~valid[None], float("-inf"))
    values = vs
    if plan.idx is not None:
        idx = plan.idx.long()
        ksmp = kk.gather(1, idx[..., None].expand(-1, -1, d))
        vsmp = vv.gather(1, idx[..., None].expand(-1, -1, vv.shape[2]))
        ls = torch.einsum("bid,bjd->bij", qs, ksmp) * scale + plan.bias.to(q.dtype)[:, None, :]
        keep = plan.stag[:, None, :] != plan.rtag[None, :, None]
        logits = torch.cat([logits, ls.masked_fill(~keep, float("-inf"))], dim=2)
        values = torch.cat([vs, vsmp], dim=1)
    lse = torch.logsumexp(logits, dim=2)
    seen = torch.isfinite(lse)
    prob = torch.exp(logits - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
    out = prob @ values
    if plan.perm_q is not None:
        inv = torch.argsort(plan.perm_q.long(), dim=1)
        out = out.gather(1, inv[..., None].expand(-1, -1, out.shape[2]))
        lse = lse.gather(1, inv)
    return out, lse
