"""The autograd Function around the Triton kernels, and its dense torch twin.

``pieces_attention(q, k, v, pieces, scale, kernel_options)`` returns ``(out, lse)`` of a list of
pieces of HyperAttention (each a :class:`Plan` or a callable building it) merged
into one softmax: the sortLSH blocks with their samples (one piece; or one per
level of the causal recursion) and the causal leaves (see :mod:`hyperref.gpu.kernels_forward`,
:mod:`hyperref.gpu.kernels_backward`, :mod:`hyperref.gpu.structure`). Heads are flattened:
``q`` is (B·H, nq, D), ``k, v`` are (B·Hk, nk, ·). Each :class:`Plan` holds a piece's index tensors.

:func:`pieces_attention_dense` computes the same function with dense torch
operations (``O(nq·nk)`` memory: small sizes only) and is differentiable by
autograd: the backward kernels are tested against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import functools
import os

import torch

from . import leaves as L
from . import structure as S
from .options import DEFAULTS, KernelOptions, as_kernel_options

try:
    import triton

    from . import kernels_backward as KB
    from . import kernels_forward as KF
    from .kernels_common import LOG2E
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = KB = KF = None


@dataclass
class Plan:
    """Index tensors of one piece (all on the device of ``q``; see :mod:`hyperref.gpu.structure`).

    ``perm_q`` (BH, R) / ``perm_k`` (BH, C): original query / key of each virtual
    row / key (``None`` for the causal leaves, whose virtual order is the
    original one); ``lo, hi, rtag`` (R,): per virtual row, its interval of
    virtual keys and its block tag; ``idx, bias, stag`` (BH, T, m): each node's
    sampled keys (original indices), their log weights and block tags
    (``None`` without samples); ``row_bounds``: virtual row offsets of the
    ``T`` nodes (host ints); ``H, Hk``: heads; ``layout, block``: the sortLSH
    nodes and block size (``None``, 0 for the leaves); ``leaf_len``: for causal
    leaves that are equal squares, their length (0 otherwise).
    """

    perm_q: torch.Tensor | None
    perm_k: torch.Tensor | None
    lo: torch.Tensor
    hi: torch.Tensor
    rtag: torch.Tensor | None
    idx: torch.Tensor | None
    bias: torch.Tensor | None
    stag: torch.Tensor | None
    row_bounds: tuple
    H: int
    Hk: int
    layout: S.Layout | None = None
    block: int = 0
    leaf_len: int = 0

    @property
    def n_rows(self) -> int:
        return self.row_bounds[-1]

    def one_block(self, tile: int) -> bool:
        """Whether the rows of every tile of ``tile`` rows share one sortLSH block."""
        return self.layout is not None and S.tiles_in_one_block(self.layout, self.block, tile)

    def keys_one_block(self, tile: int) -> bool:
        """Whether every tile of ``tile`` virtual keys lies inside one sortLSH block."""
        return self.layout is not None and S.key_tiles_in_one_block(self.layout, self.block, tile)

    def n_keys(self, nk: int) -> int:
        """Number of virtual keys (``nk`` for the leaves, which have no permutation)."""
        return self.perm_k.shape[1] if self.perm_k is not None else nk


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(d: int, dtype: torch.dtype, device, plan: Plan | None = None,
           options: KernelOptions = DEFAULTS) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for the forward kernel on ``plan``'s piece: those of
    ``options.fwd_tiles`` if set, else the tuned choice."""
    if options.fwd_tiles is not None:
        return options.fwd_tiles
    if _interpret() or device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if d <= 64:  # benchmarks/results/gpu_tiles_*.md (H200, n = 131072)
        return 128, 64, 4, 3
    if d <= 128:  # benchmarks/results/gpu_fwd_tiles_v6.md: one program per block of 256 rows
        return (256, 32, 8, 3) if plan is not None and plan.one_block(256) else (64, 32, 4, 3)
    return 64, 64, 4, 3


def _bwd_tiles(kernel: str, d: int, dtype: torch.dtype, device,
               options: KernelOptions = DEFAULTS) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for a backward kernel, ``dq``, ``dkdv`` or ``smp``: those
    set by ``options`` (:meth:`KernelOptions.tiles`), else the tuned choice."""
    chosen = options.tiles(kernel)
    if chosen is not None:
        return chosen
    if _interpret() or device.type != "cuda":
        return 16, 16, 4, 1
    if kernel == "dq" and d <= 64 and dtype != torch.float32:  # benchmarks/results/gpu_ab_bwd_v4.md
        return 64, 32, 4, 2
    if d > 128 and dtype == torch.float32:  # 64 × 64 tiles need more shared memory than sm_90
        return 32, 32, 4, 2  # has (dq: 279 KB of 227 KB; benchmarks/results/gpu_resources_sm90.md)
    return 64, 64, 4, 2


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def _dummy(device):
    """A placeholder pointer for absent index tensors (never read)."""
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


def _samples(plan: Plan) -> int:
    return plan.idx.shape[-1] if plan.idx is not None else 0


def _sample_chunks(plan: Plan, BM: int, device):
    """Row chunks for the sampled-key backward: about 32 per piece, never crossing a node."""
    rows = max(BM, triton.cdiv(triton.cdiv(plan.n_rows, 32), BM) * BM)
    return S.tile_map(plan.row_bounds, rows, device)


def _add_into(g: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``g += acc`` in place, the sum in fp32 (``acc``) rounded once to ``g``'s dtype (one
    Triton pass over contiguous tensors; torch's mixed-dtype add otherwise)."""
    if g.is_contiguous() and acc.is_contiguous() and g.shape == acc.shape and acc.dtype == torch.float32:
        n = g.numel()
        KB._add_into_kernel[(triton.cdiv(n, 4096),)](g, acc, n, BLOCK=4096, num_warps=8)
        return g
    return torch.add(g, acc, out=g)


def _built(piece) -> Plan:
    """The plan of a piece given as a :class:`Plan` or as a callable returning one."""
    return piece if isinstance(piece, Plan) else piece()


class _PiecesAttention(torch.autograd.Function):
    """``(out, lse)`` of a list of pieces merged into one softmax (SPEC §1, §6).

    The first piece must cover every row (the LSH piece, or the causal leaves);
    the others are merged into it in place by the forward kernel. A piece may be
    given as a callable returning its :class:`Plan`: it is built when reached, so
    the host prepares a level of the causal recursion (hashing, sorting,
    sampling launches and their index plumbing) while the GPU runs the kernels
    already queued (the leaves, the previous levels). Only ``q, k,
    v, out, lse`` and the index tensors are kept for backward: memory ``O(n·d)``.
    Equal square causal leaves may be computed by cuDNN (:mod:`hyperref.gpu.leaves`,
    ``options.leaves``); their backward then runs there too unless a gradient
    flows into ``lse``. ``options`` (:class:`~hyperref.gpu.KernelOptions`) picks tiles,
    loops and leaves.
    """

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale: float, options: KernelOptions):
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[2]
        ctx.set_materialize_grads(False)
        ctx.leaves = None
        pieces = list(pieces)
        first = pieces[0] = _built(pieces[0])
        leaves = options.leaves
        if leaves != "triton" and L.supported(q, k, v, first.leaf_len, first.H != first.Hk, leaves):
            out, lse, state = L.forward(q, k, v, first.leaf_len, scale, leaves)
            ctx.leaves = (leaves, state)
        else:
            out = torch.empty((bh, nq, dv), device=q.device, dtype=q.dtype)
            lse = torch.empty((bh, nq), device=q.device, dtype=torch.float32)
        for i in range(len(pieces)):
            if i == 0 and ctx.leaves is not None:
                continue
            plan = pieces[i] = _built(pieces[i])
            BM, BN, warps, stages = _tiles(d, q.dtype, q.device, plan, options)
            pointers, index_strides = _index_args(plan, q.device)
            t_r0, t_r1, t_node = S.tile_map(plan.row_bounds, BM, q.device)
            KF._fwd_kernel[(t_r0.shape[0], bh)](
                q, k, v, *pointers, t_r0, t_r1, t_node, out, lse,
                plan.n_keys(nk), _samples(plan), plan.H, plan.Hk, plan.H // plan.Hk, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), lse.stride(0), *index_strides,
                D=d, DV=dv, BM=BM, BN=BN, HAS_SAMPLES=plan.idx is not None,
                HAS_PERM=plan.perm_q is not None, MERGE=i > 0,
                ONE_BLOCK=options.one_block and plan.one_block(BM), PREC=_prec(q.dtype),
                num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.scale, ctx.options = pieces, scale, options
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients are not differentiable
            raise RuntimeError("hyperref.gpu.hyper_attention (Triton) has no double backward; use backend='dense' "
                               "for gradients of gradients (small N)")
        q, k, v, out, lse = ctx.saved_tensors
        scale, options = ctx.scale, ctx.options
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[2]
        dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
        delta = torch.empty((bh, nq), device=q.device, dtype=torch.float32)
        dlse_arg = dlse.float().contiguous() if dlse is not None else delta
        KB._delta_kernel[(triton.cdiv(bh * nq, 64),)](dout, out, lse, dlse_arg, delta, bh * nq,
                                                      dout.stride(1), out.stride(1), DV=dv, BM=64,
                                                      HAS_DLSE=dlse is not None, num_warps=4)
        prec = _prec(q.dtype)
        # dq accumulates over pieces in fp32 (one piece: written once, in q's dtype);
        # dk, dv in fp32: the first piece writes every key (atomically if heads share it)
        group = ctx.pieces[0].H // ctx.pieces[0].Hk
        vendor = ctx.leaves is not None and dlse is None  # (the vendor backward has no dlse term)
        if vendor:
            backend, state = ctx.leaves
            leaf_grads = L.backward(dout, q, k, v, out, lse, ctx.pieces[0].leaf_len, scale, backend, state)
            if len(ctx.pieces) == 1:
                return (*leaf_grads, None, None, None)
            # the levels add into zeroed fp32 buffers; the leaves' gradients are added at the end
            # in one pass that also converts (not copied to fp32 first and back at the end)
            dq = torch.zeros((bh, nq, d), device=q.device, dtype=torch.float32)
            dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
            dvv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        else:
            dq = torch.empty((bh, nq, d), device=q.device,
                             dtype=torch.float32 if len(ctx.pieces) > 1 else q.dtype)
            alloc = torch.empty if group == 1 else torch.zeros
            dk = alloc(k.shape, device=q.device, dtype=torch.float32)
            dvv = alloc(v.shape, device=q.device, dtype=torch.float32)
        dummy = _dummy(q.device)
        for i, plan in enumerate(ctx.pieces):
            if i == 0 and vendor:
                continue
            has_perm = plan.perm_q is not None
            m = _samples(plan)
            pointers, index_strides = _index_args(plan, q.device)
            BM, BN, warps, stages = _bwd_tiles("dq", d, q.dtype, q.device, options)
            t_r0, t_r1, t_node = S.tile_map(plan.row_bounds, BM, q.device)
            KB._bwd_dq_kernel[(t_r0.shape[0], bh)](
                q, k, v, *pointers, t_r0, t_r1, t_node, dout, lse, delta, dq,
                plan.n_keys(nk), m, plan.H, plan.Hk, group, scale * LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), lse.stride(0), *index_strides,
                D=d, DV=dv, BM=BM, BN=BN, HAS_SAMPLES=m > 0, HAS_PERM=has_perm, ACCUM=i > 0,
                ONE_BLOCK=options.one_block and plan.one_block(BM), PREC=prec, num_warps=warps,
                num_stages=stages)
            # interval keys: rows [rstart, rend) of each key tile (intervals are monotone)
            BM, BN, warps, stages = _bwd_tiles("dkdv", d, q.dtype, q.device, options)
            n_keys = plan.n_keys(nk)
            tiles = torch.arange(0, n_keys, BN, device=q.device, dtype=torch.int32)
            rstart = torch.searchsorted(plan.hi, tiles, right=True).int()
            rend = torch.searchsorted(plan.lo, torch.clamp(tiles + BN, max=n_keys), right=False).int()
            KB._bwd_dkdv_kernel[(tiles.shape[0], bh)](
                q, k, v, plan.perm_q if has_perm else dummy, plan.perm_k if has_perm else dummy,
                plan.lo, plan.hi, rstart, rend, dout, lse, delta, dk, dvv,
                n_keys, plan.H, plan.Hk, group, scale * LOG2E, scale,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), lse.stride(0), index_strides[0], index_strides[1],
                dk.stride(0), dk.stride(1), dvv.stride(0), dvv.stride(1),
                D=d, DV=dv, BM=BM, BN=BN, HAS_PERM=has_perm,
                MODE=2 if group > 1 else (0 if i == 0 else 1),
                ONE_BLOCK=options.one_block and plan.keys_one_block(BN), PREC=prec,
                num_warps=warps, num_stages=stages)
            if m > 0:
                BM, BN, warps, stages = _bwd_tiles("smp", d, q.dtype, q.device, options)
                c_r0, c_r1, c_node = _sample_chunks(plan, BM, q.device)
                KB._bwd_samples_kernel[(triton.cdiv(m, BN), c_r0.shape[0], bh)](
                    q, k, v, plan.perm_q, plan.idx, plan.bias, plan.stag, plan.rtag,
                    c_r0, c_r1, c_node, dout, lse, delta, dk, dvv,
                    m, plan.H, plan.Hk, group, scale * LOG2E, scale,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    dout.stride(0), dout.stride(1), lse.stride(0), index_strides[0], index_strides[2],
                    dk.stride(0), dk.stride(1), dvv.stride(0), dvv.stride(1),
                    D=d, DV=dv, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages)
        if vendor:  # the sum in fp32, rounded once to the inputs' dtype
            return (*(_add_into(g, acc) for g, acc in zip(leaf_grads, (dq, dk, dvv))), None, None, None)
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None, None


@torch.compiler.disable  # under torch.compile the kernels run eagerly (one graph break)
def pieces_attention(q, k, v, pieces, scale: float, kernel_options: KernelOptions | Mapping | None = None):
    """``(out, lse)`` of the merged pieces through the Triton kernels (differentiable).

    ``kernel_options``: a :class:`~hyperref.gpu.KernelOptions`, a dict of its fields, or None
    (the defaults); bad ones raise :class:`hyperref.InputError`.
    """
    options = as_kernel_options(kernel_options)
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install triton)")
    if q.device.type != "cuda" and not _interpret():
        raise RuntimeError("the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    return _PiecesAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), list(pieces), scale, options)


def merge(o1, l1, o2, l2):
    """LSE merge (SPEC §1), safe for rows empty in both (autograd-friendly)."""
    top = torch.maximum(l1, l2)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    total = w1 + w2
    has = total > 0
    safe = torch.where(has, total, torch.ones_like(total))
    lse = torch.where(has, top + torch.log(safe), torch.full_like(top, float("-inf")))
    out = (w1 / safe)[..., None].to(o1.dtype) * o1 + (w2 / safe)[..., None].to(o2.dtype) * o2
    return out, lse


@torch.compiler.disable  # integer index work, done eagerly under torch.compile
def _dense_masks(plan: Plan, bh: int, n_keys: int, device):
    """Index tensors of the dense twin: each query head's kv head (BH,), the interval
    mask (R, C), and, with samples, the kept samples (BH, R, T, m): the row's own
    node's samples whose block tag differs from the row's."""
    kv_of = S.kv_heads(bh, plan.H, plan.Hk, device)
    cols = torch.arange(n_keys, device=device)
    valid = (cols[None, :] >= plan.lo.long()[:, None]) & (cols[None, :] < plan.hi.long()[:, None])
    keep = None
    if plan.idx is not None:
        rb = plan.row_bounds
        sizes = torch.tensor([b - a for a, b in zip(rb[:-1], rb[1:])], device=device)
        node = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
        own = torch.nn.functional.one_hot(node, len(sizes)).bool()  # (R, T): the row's node
        keep = own[None, :, :, None] & (plan.stag[:, None] != plan.rtag[None, :, None, None])
    return kv_of, valid, keep


def _piece_dense(q, k, v, plan: Plan, scale: float):
    """One piece by dense torch operations: (out, lse) over all rows (−inf where absent)."""
    bh, nq, d = q.shape
    nk = k.shape[1]
    kv_of, valid, keep = _dense_masks(plan, bh, plan.n_keys(nk), q.device)
    kk, vv = k[kv_of], v[kv_of]
    if plan.perm_q is not None:
        pq, pk = plan.perm_q.long(), plan.perm_k.long()
        qs = q.gather(1, pq[..., None].expand(-1, -1, d))
        ks = kk.gather(1, pk[..., None].expand(-1, -1, d))
        vs = vv.gather(1, pk[..., None].expand(-1, -1, vv.shape[2]))
    else:
        qs, ks, vs = q, kk, vv
    logits = torch.einsum("bid,bjd->bij", qs, ks) * scale
    logits = logits.masked_fill(~valid[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=2)
    if plan.idx is not None:
        idx = plan.idx.long()  # (BH, T, m)
        ksmp = kk.gather(1, idx.reshape(bh, -1, 1).expand(-1, -1, d)).reshape(*idx.shape, d)
        vsmp = vv.gather(1, idx.reshape(bh, -1, 1).expand(-1, -1, vv.shape[2])).reshape(*idx.shape, -1)
        # logits of every row against every node's samples; only the row's own node is kept
        ls = torch.einsum("bid,btjd->bitj", qs, ksmp) * scale + plan.bias.to(q.dtype)[:, None]
        ls = ls.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(torch.cat([logits, ls.flatten(2)], dim=2), dim=2)
    seen = torch.isfinite(lse)
    shift = torch.where(seen, lse, torch.zeros_like(lse))[..., None]
    out = torch.exp(logits - shift) @ vs
    if plan.idx is not None:
        out = out + torch.einsum("bitj,btjd->bid", torch.exp(ls - shift[..., None]), vsmp)
    if plan.perm_q is None:
        return out, lse
    full = out.new_zeros((bh, nq, out.shape[2]))
    full_lse = lse.new_full((bh, nq), float("-inf"))
    full = full.scatter(1, plan.perm_q.long()[..., None].expand(-1, -1, out.shape[2]), out)
    full_lse = full_lse.scatter(1, plan.perm_q.long(), lse)
    return full, full_lse


def pieces_attention_dense(q, k, v, pieces, scale: float):
    """The same ``(out, lse)`` by dense torch operations (autograd-differentiable)."""
    out, lse = None, None
    for plan in pieces:
        o, l = _piece_dense(q, k, v, _built(plan), scale)
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    return out, lse
