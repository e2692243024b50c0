"""The block-sparse plan of one direct-mode call: tile lists, slots and masks' tables.

:func:`make_plan` runs the selections of :mod:`hyperref.gpu.direct_select` and lays them out
as a :class:`DirectPlan`: per query tile the partial and full own-key tiles (and, transposed,
per key tile the query tiles, for the backward), the gathered slots with their owners and log
weights, and the tables the masks read (picked and routed tiles, the routed tiles' edges).
:mod:`hyperref.gpu.direct_flex` makes the two FlexAttention calls from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperref.config import HyperConfig
from hyperref.direct import paper_exact_set
from hyperref.exact_set import BlockKeys, BlockTop, Geometry, HeavyKeys

from .direct_select import (GB, KB, QB, _eligible_of, block_key_chosen, block_keys, block_picks, heavy_keys,
                            routes_tiles, sample_slots)

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
    (·, ·, NKT, ·); ``None`` in a plan made with ``backward=False``). Its mask is index arithmetic and,
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
    q_num: torch.Tensor | None
    q_idx: torch.Tensor | None
    full_q_num: torch.Tensor | None
    full_q_idx: torch.Tensor | None
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
    such a tile; ``None`` where no range ends inside a tile, :func:`_ends_inside_tiles`). A short last
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
        full = full | (routed & _route_whole(nq, nk, causal, w, part.block, device))
        partial = (partial | routed) & ~full
        edges = _route_edges(routed, nq, nk, causal, w, part.block)
    return partial, full, picked, routed, edges


def _route_rows(nq, nk, block, device):
    """Per query tile, the first and last aligned rows of the route block it lies in: (NT,) each."""
    rb = (torch.arange(-(-nq // QB), device=device) * QB) // block
    return rb * block + (nk - nq), torch.clamp((rb + 1) * block, max=nq) - 1 + (nk - nq)


def _route_whole(nq, nk, causal, w, block, device):
    """(NT, NKT) bool: whether every key of tile ``g`` is eligible for query tile ``t``'s route block."""
    n_kt = -(-max(nk, 1) // KB)
    g = torch.arange(n_kt, device=device)
    g_lo, g_hi = g * KB, torch.clamp((g + 1) * KB, max=nk) - 1
    rf, rl = _route_rows(nq, nk, block, device)
    whole = g_hi[None, :] <= (rf - w)[:, None]
    if not causal:
        whole = (whole | (g_lo[None, :] >= (rl + w)[:, None])) if w else torch.ones_like(whole)
    return whole


def _route_edges(routed, nq, nk, causal, w, block):
    """The routed tiles left partial, (B, H, NT, 2) bool: the one holding ``c_first − w`` and (non-causal)
    the one holding ``c_last + w``, where they straddle; ``None`` where no range ends inside a tile."""
    if not _ends_inside_tiles(nq, nk, causal, w, block):
        return None
    bsz, h, _, n_kt = routed.shape
    straddle = routed & ~_route_whole(nq, nk, causal, w, block, routed.device)
    rf, rl = _route_rows(nq, nk, block, routed.device)
    at = lambda x: torch.clamp(x // KB, 0, n_kt - 1)[None, None, :, None].expand(bsz, h, -1, 1)
    lo, hi = rf - w, rl + w
    return torch.cat([torch.gather(straddle, -1, at(lo)) & (lo >= 0)[None, None, :, None],
                      torch.gather(straddle, -1, at(hi)) & (hi < nk)[None, None, :, None]], dim=-1)


def own_layout(nq, nk, causal, covered, picks, pick_block, device, routes=None):
    """:func:`own_tiles` and the lists of its partial and full marks: ``(partial, full, picked,
    routed, edges, (kv_num, kv_idx, full_num, full_idx))``.

    On CUDA one Triton pass computes the marks and lists them
    (:func:`hyperref.gpu.direct_kernels.own_tile_lists`); elsewhere the torch form and
    :func:`_listing`.
    """
    if device.type != "cuda":
        partial, full, picked, routed, edges = own_tiles(nq, nk, causal, covered, picks, pick_block, device, routes)
        return partial, full, picked, routed, edges, (*_listing(partial), *_listing(full))
    from . import direct_kernels as kern

    chosen, part = routes if routes is not None else (None, None)
    out = kern.own_tile_lists(nq, nk, KB, causal, covered, device, picks, pick_block, chosen,
                              part.block if part else 0, part.key_block if part else 0)
    partial, full, picked, routed = out[:4]
    edges = None if part is None else _route_edges(routed, nq, nk, causal, covered[1], part.block)
    return partial, full, picked, routed, edges, out[4:]


def _ends_inside_tiles(nq, nk, causal, w, block):
    """Whether some row block's eligible key range ends inside a key tile (host arithmetic).

    The range of row block ``t`` ends at ``c_first − w`` (keys ``j <= c_first − w``) and,
    non-causal with a window, starts at ``c_last + w``; a routed tile can straddle it only
    where that end is not a tile boundary. When none does (causal: ``w ≡ nk − nq + 1 mod
    128``, the row blocks being whole tiles; non-causal besides every ``c_last + w`` on a
    boundary; e.g. ``w = 513`` at ``nq = nk``) every routed tile is full and the own-key
    call's mask is index arithmetic alone (no ``edges``).
    """
    if not causal and not w:
        return False  # every key past the sinks is eligible: a routed tile is whole
    tq = torch.arange(-(-nq // QB))
    rb = (tq * QB) // block
    rf = rb * block + (nk - nq)
    lo = rf - w
    inside = ((lo >= 0) & (lo % KB != KB - 1)).any()
    if not causal:
        hi = torch.clamp((rb + 1) * block, max=nq) - 1 + (nk - nq) + w
        inside = inside | ((hi < nk) & (hi % KB != 0)).any()
    return bool(inside)


def make_plan(q, k, v, *, causal, scale, config: HyperConfig, heavy_rows, sample_u, backward=True) -> DirectPlan:
    """Selections, samples and the block-sparse layout of one call (no gradient).

    Parameters
    ----------
    q : tensor ``(B, H, nq, d)``
    k, v : tensors ``(B, H, nk, ·)``, the key heads already expanded to the query heads
    causal : bool
    scale : float
    config : HyperConfig
        ``mode="direct"`` with parts :func:`hyperref.gpu.direct_flex.check_supported` accepts.
    heavy_rows : tensor ``(B, H, |T|)`` or None
        The sampled rows of the ``heavykeys`` column mass (the draws').
    sample_u : tensor ``(B, H, T, m)`` float64
        The uniforms of the ``m`` samples of each of the ``T`` query blocks.
    backward : bool
        Whether to list the key-to-query tiles a backward reads (the transposed lists);
        ``False`` leaves them ``None`` (a forward alone: two listings fewer).

    Returns
    -------
    DirectPlan
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
    partial, full, picked, routed, edges, lists = own_layout(nq, nk, causal, covered, picks, pick_block, dev, routes)
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
    if picked is not None and slots:  # keys of the tile's picked blocks are exact: not a gathered term
        n_kt = picked.shape[-1]
        tile_of_key = torch.clamp(gpos, min=0) // KB
        in_pick = torch.gather(picked.to(torch.int8), -1, torch.clamp(tile_of_key, max=n_kt - 1)).bool()
        gpos = torch.where(in_pick, -1, gpos)
    if routed is not None and slots:  # nor are the eligible keys of the tile's routed blocks
        gpos = torch.where(_in_routed(routed, routes[1].block, gpos, nq, nk, causal, covered), -1, gpos)
    gpos = torch.where(gpos >= 0, gpos, NONE).to(torch.int32)
    kv_num, kv_idx, full_num, full_idx = lists
    q_num = q_idx = full_q_num = full_q_idx = None
    if backward:
        q_num, q_idx = _listing(partial.transpose(-2, -1))
        full_q_num, full_q_idx = _listing(full.transpose(-2, -1))
    return DirectPlan(nq=nq, nk=nk, nk_pad=partial.shape[-1] * KB, slots=slots, kv_num=kv_num, kv_idx=kv_idx,
                      full_num=full_num, full_idx=full_idx, q_num=q_num, q_idx=q_idx, full_q_num=full_q_num,
                      full_q_idx=full_q_idx, gpos=gpos, owner=owner, logw=logw, picked=picked,
                      routed=routed, route_block=0 if routes is None else routes[1].block, edges=edges)


def _in_routed(routed, block, keys, nq, nk, causal, covered):
    """Whether each key (B, H, NT, ·) of a query tile is an eligible key of a routed tile of it."""
    n_kt = routed.shape[-1]
    rf, rl = _route_rows(nq, nk, block, keys.device)
    tile = torch.clamp(keys, 0, nk - 1) // KB
    hit = torch.gather(routed.to(torch.int8).expand(*keys.shape[:2], -1, -1), -1,
                       torch.clamp(tile, max=n_kt - 1)).bool()
    return hit & (keys >= 0) & (keys < nk) & _eligible_of(keys, rf, rl, *covered, causal)


def _holds(sorted_keys, keys, nk):
    """Whether each of ``keys`` (·, m) is in the ascending, −1-padded ``sorted_keys`` (·, n)."""
    hs = torch.where(sorted_keys >= 0, sorted_keys, nk + 1).contiguous()
    at = torch.clamp(torch.searchsorted(hs, keys.contiguous()), max=hs.shape[-1] - 1)
    return (torch.gather(hs, -1, at) == keys) & (keys >= 0)
