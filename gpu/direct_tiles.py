"""The direct mode's own-key call as one Triton forward kernel over the plan's tile lists.

:func:`hyperref.gpu.direct_flex.flex_direct` makes the own-key call (sinks, window, the picked
and routed key tiles) with FlexAttention; :func:`own_tiles_forward` computes the same
``(out, lse)`` from the same :class:`~hyperref.gpu.direct_plan.DirectPlan` with a kernel of this
package, for a forward without gradients. Per program ``BM`` rows of one query tile ``t``
(``BM`` dividing ``QB = 128``) run one online softmax (base 2, fp32) over

* the **full** tiles of ``t`` (``full_idx``), every key of which counts for every row: no mask
  but the sequence's end, in sub-tiles of ``BN`` keys;
* the **partial** tiles (``kv_idx``), where an entry counts by
  :func:`hyperref.gpu.direct_flex._listed_mask`: visible and a sink, in the row's window, or an
  eligible key of a routed tile that straddles the end of its row block's eligible range
  (``plan.edges``). Only the sub-tiles of ``PBN`` keys that can hold such a key for some row of
  the program are computed: the span of a tile meeting the sinks (``[0, s)``), the rows' window
  (causal ``(c_lo − w, c_hi]``) and the straddled tile. A sink tile costs ``PBN`` keys instead of
  ``KB``, and with ``BM < QB`` the window's two edge tiles cost a part of ``KB`` each.

The lists are read up to their counts, as FlexAttention reads them; rows that see no key get
``out = 0`` and ``lse = −∞`` (FlexAttention's convention, which the merge of the two calls
reads). GQA: key head ``h // (H / Hk)``; ``nq ≠ nk`` with the bottom-right causal alignment.

Measured side by side on an H200 at n = 131072 (``benchmarks/probes/direct_own_kernel.py``,
results in ``benchmarks/probes/results/direct_own_kernel.md``), this kernel is 9 % (causal) and
12 % (non-causal) slower than FlexAttention's call on the same plan, though it computes fewer
entries; the engine therefore keeps FlexAttention, and this kernel is the measured alternative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .direct_select import KB, QB
from .kernels_common import _LN2, LOG2E, NEG

assert QB == KB == 128, "the kernel's query and key tiles are 128 rows and keys (the literals below)"

#: the default ``(BM, BN, PBN, num_warps, num_stages)`` of :func:`own_tiles_forward`: the fastest
#: measured on an H200 (``benchmarks/probes/results/direct_own_kernel.md``)
TILES = (64, 64, 16, 4, 3)


@triton.jit
def _step(q, acc, m_i, l_i, k_base, v_base, j0, skn, svn, dd, dv, keep, nk,
          scale_log2, BN: tl.constexpr, MASK: tl.constexpr, BOUND: tl.constexpr, PREC: tl.constexpr):
    """One sub-tile of keys ``[j0, j0 + BN)``: the online softmax update (``MASK``: entries
    where ``keep`` holds; ``BOUND``: keys past ``nk`` excluded and not loaded)."""
    j = j0 + tl.arange(0, BN)
    if BOUND or MASK:
        kt = tl.load(k_base + j[:, None] * skn + dd[None, :], mask=(j < nk)[:, None], other=0.0)
        vt = tl.load(v_base + j[:, None] * svn + dv[None, :], mask=(j < nk)[:, None], other=0.0)
    else:
        kt = tl.load(k_base + j[:, None] * skn + dd[None, :])
        vt = tl.load(v_base + j[:, None] * svn + dv[None, :])
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    if MASK:
        s = tl.where(keep, s, NEG)
    elif BOUND:
        s = tl.where((j < nk)[None, :], s, NEG)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    if MASK:
        p = tl.where(keep, p, 0.0)
    elif BOUND:
        p = tl.where((j < nk)[None, :], p, 0.0)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _keep(j, c, rows_ok, nk, sinks, window, e_lo, lo, e_hi, hi, CAUSAL: tl.constexpr, EDGES: tl.constexpr):
    """Which entries (rows × keys ``j``) of a partial tile count (:func:`direct_flex._listed_mask`)."""
    jj = j[None, :]
    cc = c[:, None]
    if CAUSAL:
        keep = (jj <= cc) & ((jj < sinks) | (jj > cc - window))
    else:
        keep = (jj < sinks) | (tl.abs(cc - jj) < window)
    if EDGES:
        keep = keep | (e_lo & (jj >= sinks) & (jj <= lo) & (jj // 128 == lo // 128))
        if not CAUSAL:
            keep = keep | (e_hi & (jj >= sinks) & (jj >= hi) & (jj // 128 == hi // 128))
    return keep & (jj < nk) & rows_ok[:, None]


@triton.jit
def _meets(a, b, lo, hi):
    """The span ``[a, b)`` clipped to ``[lo, hi)``, ``(hi, lo)`` where they do not meet."""
    a2 = tl.maximum(a, lo)
    b2 = tl.minimum(b, hi)
    empty = a2 >= b2
    return tl.where(empty, hi, a2), tl.where(empty, lo, b2)


@triton.jit
def _own_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                    edges_ptr, nq, nk, offset, sinks, window, route_block, scale_log2, H, G, LB, LH, EH, n_qt,
                    width, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    CAUSAL: tl.constexpr, EDGES: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, PBN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G
    r0 = pid * BM
    t = r0 // 128  # the query tile (QB = 128 rows)
    rows = r0 + tl.arange(0, BM)
    rows_ok = rows < nq
    c = rows + offset
    c_lo = r0 + offset
    c_hi = tl.minimum(r0 + BM, nq) - 1 + offset
    dd = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :], mask=rows_ok[:, None], other=0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_i = tl.full((BM,), NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DV), tl.float32)
    lst = ((b % LB) * LH + (h % LH)) * n_qt + t
    # the routed tiles' straddled ends (one route block per query tile: its rows are whole tiles)
    rb = r0 // route_block
    lo = rb * route_block + offset - window
    hi = tl.minimum((rb + 1) * route_block, nq) - 1 + offset + window
    e_lo = False
    e_hi = False
    if EDGES:
        e_at = edges_ptr + (((b % LB) * EH + (h % EH)) * n_qt + t) * 2
        e_lo = tl.load(e_at) != 0
        e_hi = tl.load(e_at + 1) != 0
    n_part = tl.load(kv_num_ptr + lst)
    for e in range(0, n_part):
        g = tl.load(kv_idx_ptr + lst * width + e).to(tl.int64)
        g0 = g * 128
        g1 = tl.minimum(g0 + 128, nk)
        # the hull of what can count here: sinks, the rows' window, a straddled tile
        a, z = _meets(0, sinks, g0, g1)
        if CAUSAL:
            wa, wz = _meets(c_lo - window + 1, c_hi + 1, g0, g1)
        else:
            wa, wz = _meets(c_lo - window + 1, c_hi + window, g0, g1)
        wz = tl.where(window > 0, wz, g0)
        wa = tl.where(window > 0, wa, g1)
        a, z = tl.minimum(a, wa), tl.maximum(z, wz)
        if EDGES:
            la, lz = _meets((lo // 128) * 128, lo + 1, g0, g1)
            la = tl.where(e_lo & (lo >= 0), la, g1)
            lz = tl.where(e_lo & (lo >= 0), lz, g0)
            a, z = tl.minimum(a, la), tl.maximum(z, lz)
            if not CAUSAL:
                ha, hz = _meets(hi, (hi // 128 + 1) * 128, g0, g1)
                ha = tl.where(e_hi, ha, g1)
                hz = tl.where(e_hi, hz, g0)
                a, z = tl.minimum(a, ha), tl.maximum(z, hz)
        a = g0 + ((a - g0) // PBN) * PBN
        for j0 in range(a, z, PBN):
            j = j0 + tl.arange(0, PBN)
            keep = _keep(j, c, rows_ok, nk, sinks, window, e_lo, lo, e_hi, hi, CAUSAL, EDGES)
            acc, m_i, l_i = _step(q, acc, m_i, l_i, k_base, v_base, j0, skn, svn, dd, dv, keep, nk,
                                  scale_log2, PBN, True, False, PREC)
    # the full tiles in one flat loop of sub-tiles (one software-pipelined loop), the
    # sequence's short last tile, if listed (the lists ascend: last), masked after it
    n_full = tl.load(full_num_ptr + lst)
    last = tl.load(full_idx_ptr + lst * width + tl.maximum(n_full - 1, 0)).to(tl.int64) * 128
    short = (n_full > 0) & (last + 128 > nk)
    n_whole = n_full - short.to(tl.int32)
    SUB: tl.constexpr = 128 // BN
    for it in range(0, n_whole * SUB):
        g0 = tl.load(full_idx_ptr + lst * width + it // SUB).to(tl.int64) * 128
        acc, m_i, l_i = _step(q, acc, m_i, l_i, k_base, v_base, g0 + (it % SUB) * BN, skn, svn, dd, dv, None,
                              nk, scale_log2, BN, False, False, PREC)
    if short:
        for sub in tl.static_range(SUB):
            acc, m_i, l_i = _step(q, acc, m_i, l_i, k_base, v_base, last + sub * BN, skn, svn, dd, dv, None,
                                  nk, scale_log2, BN, False, True, PREC)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * son + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows_ok[:, None])
    tl.store(lse_ptr + bh * nq + rows, lse, mask=rows_ok)


def _pow2(x) -> bool:
    return isinstance(x, int) and x >= 16 and not x & (x - 1)


def check_tiles(tiles) -> tuple:
    """``tiles = (BM, BN, PBN, num_warps, num_stages)`` checked: ``BM``, ``BN``, ``PBN`` powers of
    two in [16, 128], ``BM`` dividing the query tile, ``num_warps`` in {1, 2, 4, 8},
    ``num_stages`` in [1, 8]; ``None``: :data:`TILES`."""
    if tiles is None:
        return TILES
    tiles = tuple(tiles)
    if len(tiles) != 5 or not all(isinstance(x, int) and not isinstance(x, bool) for x in tiles):
        raise ValueError(f"tiles must be five ints (BM, BN, PBN, num_warps, num_stages), got {tiles!r}")
    bm, bn, pbn, warps, stages = tiles
    if not all(_pow2(x) and x <= 128 for x in (bm, bn, pbn)):
        raise ValueError(f"BM, BN and PBN must be powers of two in [16, 128], got {bm}, {bn}, {pbn}")
    if warps not in (1, 2, 4, 8) or not 1 <= stages <= 8:
        raise ValueError(f"num_warps must be 1, 2, 4 or 8 and num_stages in [1, 8], got {warps}, {stages}")
    return tiles


def own_tiles_forward(q, k, v, plan, *, sinks: int, window: int, causal: bool, scale: float, tiles=None):
    """``(out, lse)`` of the own-key call of ``plan`` (no gradient): what FlexAttention's call
    with :func:`hyperref.gpu.direct_flex.own_block_mask` computes.

    Parameters
    ----------
    q : tensor (B, H, nq, D); k, v : tensors (B, Hk, nk, D) and (B, Hk, nk, Dv), ``Hk`` dividing ``H``
        float16, bfloat16 or float32 (fp32 products, not TF32), unit-stride last axes, ``D`` and
        ``Dv`` powers of two ≥ 16.
    plan : DirectPlan
        Of these inputs (:func:`~hyperref.gpu.direct_plan.make_plan`); its tile lists and edges.
    sinks, window : int
        The exact set's sink count and window width (``ExactSet.sink_count``, ``window_width``).
    causal : bool
    scale : float
    tiles : tuple, optional
        ``(BM, BN, PBN, num_warps, num_stages)`` (:func:`check_tiles`; default :data:`TILES`).

    Returns
    -------
    out : tensor (B, H, nq, Dv), the dtype of ``q``
    lse : tensor (B, H, nq) float32, natural log; ``−inf`` (and ``out = 0``) where a row sees no key
    """
    bm, bn, pbn, warps, stages = check_tiles(tiles)
    if QB % bm:
        raise ValueError(f"BM must divide the query tile of {QB} rows, got {bm}")
    for x in (q, k, v):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
            raise ValueError("own_tiles_forward takes float16/bfloat16/float32 inputs with unit-stride last axes")
    if not (q.dtype == k.dtype == v.dtype) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-d tensors of one dtype")
    bsz, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    if not (_pow2(d) and _pow2(dv)) or k.shape[3] != d or v.shape[:3] != k.shape[:3] or h % hk:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (plan.nq, plan.nk) != (nq, nk):
        raise ValueError(f"the plan is for (nq, nk) = {(plan.nq, plan.nk)}, not {(nq, nk)}")
    out = torch.empty((bsz, h, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, h, nq), dtype=torch.float32, device=q.device)
    if nq == 0 or bsz * h == 0:
        return out, lse
    lists = [x.contiguous() for x in (plan.kv_num, plan.kv_idx, plan.full_num, plan.full_idx)]
    lb, lh = lists[0].shape[:2]
    edges = plan.edges
    e_ptr = lists[0] if edges is None else edges.to(torch.int8).contiguous()
    eh = 1 if edges is None else edges.shape[1]
    n_qt = -(-nq // QB)
    grid = (n_qt * (QB // bm), bsz * h)
    _own_fwd_kernel[grid](
        q, k, v, out, lse, *lists, e_ptr, nq, nk, nk - nq, int(sinks), int(window), max(plan.route_block, QB),
        float(scale) * LOG2E, h, h // hk, lb, lh, eh, n_qt, lists[1].shape[-1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        CAUSAL=bool(causal), EDGES=edges is not None, D=d, DV=dv, BM=bm, BN=bn, PBN=pbn,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out, lse
