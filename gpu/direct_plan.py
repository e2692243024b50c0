"""The block-sparse plan of one direct-mode call: tile lists, slots and masks' tables.

:func:`make_plan` runs the selections of :mod:`hyperref.gpu.direct_select` and lays them out
as a :class:`DirectPlan`: per query tile the partial and full own-key tiles (and, transposed,
per key tile the query tiles, for the backward), the gathered slots with their owners and log
weights, and the tables the masks read (picked and routed blocks, the routed tiles' edges).
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
    tiles, the window's edge tiles) and ``full_num``/``full_idx`` (full tiles: the window
    interior, the ``blocktop`` picks, the wholly eligible routed blocks); shape ``(B, H, NT, W)``,
    or ``(1, 1, NT, W)`` when no part picks tiles head by head, ``W`` = :func:`list_width` (the
    most tiles a query tile can list, so that a forward's plan is linear in the length); its
    backward reads the same lists transposed, per key tile the query tiles
    (``q_num``/``q_idx``, ``full_q_num``/``full_q_idx``, (·, ·, NKT, NT); ``None`` in a plan
    made with ``backward=False``). Its mask is index arithmetic and, where a ``blocktop`` part
    picks tiles, membership in ``picks`` (B, H, row blocks of ``pick_block`` rows, count; the
    picked blocks of ``pick_block`` keys, −1 for none; ``None`` without one), where a
    ``blockkeys`` part routes tiles (:func:`routes_tiles`), membership in ``chosen`` (B, H, row
    blocks of ``route_block`` rows, C′; blocks of ``route_key_block`` keys) and the eligibility
    of the key for the row's block: the mask alone says which entries count, the full tiles
    only spare its work, so that FlexAttention's unfused path (which reads the mask alone)
    gives the same answer.

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
    picks: torch.Tensor | None = None
    pick_block: int = 0
    chosen: torch.Tensor | None = None
    route_block: int = 0
    route_key_block: int = 0
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
    """Tile marks ``(partial, full)`` of the own-key call, (1, 1, NT, NKT) or (B, H, NT, NKT) bool.

    Sinks and window come from index arithmetic (the same for every head); ``picks`` (B, H,
    row blocks, count) of ``blocktop`` add full tiles head by head; ``routes = (chosen,
    part)``, the chosen key blocks of a ``blockkeys`` part that :func:`routes_tiles`, add their
    tiles: full where every key is eligible for the tile's row block (or a sink), partial where
    the block straddles the eligible range's end (:func:`_route_edges`). A short last tile may
    be full: FlexAttention cuts the positions beyond the sequence.
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
    tile_keys = lambda table: (g * KB).expand(*table.shape[:2], n_qt, n_kt)  # a tile by its first key
    if picks is not None:
        # picked blocks are whole key tiles wholly visible to every row of the row block
        # (they end before the window of its first row)
        picked = _in_blocks(picks, (tq * QB) // pick_block, tile_keys(picks), pick_block)
        full = full | picked
        partial = partial & ~full
    if routes is not None:
        chosen, part = routes
        routed = _in_blocks(chosen, (tq * QB) // part.block, tile_keys(chosen), part.key_block)
        full = full | (routed & _route_whole(nq, nk, causal, w, part.block, device))
        partial = (partial | routed) & ~full
    return partial, full


def _in_blocks(table, rows, keys, block):
    """Whether each key (B, H, NT, ·) lies in one of the blocks of ``block`` keys that ``table``
    (B, H, R, C) lists (−1: none) at the row ``rows[t]`` (NT,) of its query tile; −1 keys: no.

    A binary search in each tile's sorted blocks: memory of the keys' size, no (NT, NKT) table.
    """
    tab = table[:, :, rows].long()  # (B, H, NT, C)
    shape = torch.broadcast_shapes(tab.shape[:3], keys.shape[:3])
    if tab.shape[-1] == 0:
        return torch.zeros((*shape, keys.shape[-1]), dtype=torch.bool, device=keys.device)
    tab = torch.sort(torch.where(tab >= 0, tab, torch.iinfo(torch.int64).max), dim=-1).values
    kb = torch.where(keys >= 0, keys.long() // block, -1)
    # the table sorted with its −1s past every block: _holds has no padding left to replace
    return _holds(tab.expand(*shape, tab.shape[-1]), kb.expand(*shape, kb.shape[-1]), 0)


def list_width(nq, nk, causal, covered, picks=None, pick_block=0, chosen=None, route_key_block=0) -> int:
    """The most key tiles one query tile's partial or full list can hold (host arithmetic).

    The sink tiles (``⌈s / KB⌉``), the tiles the window's keys of the tile's ``QB`` rows meet
    (causal: the ``QB − 1 + w`` positions ``(c_first − w, c_last]``; non-causal ``QB + 2w``
    positions at most; a run of ``r`` positions meets at most ``⌈r / KB⌉ + 1`` tiles), and the
    tiles of the picked and routed blocks (``count · pick_block / KB``, ``C′ · key_block / KB``);
    at most the key tiles ``NKT``, at least 1.
    """
    s, w = covered
    n_kt = -(-max(nk, 1) // KB)
    span = QB - 1 + w if causal else QB + 2 * w
    width = -(-s // KB) + ((-(-span // KB) + 1) if w else 0)
    if picks is not None:
        width += picks.shape[-1] * (pick_block // KB)
    if chosen is not None:
        width += chosen.shape[-1] * (route_key_block // KB)
    return max(1, min(width, n_kt))


def _route_rows(nq, nk, block, device):
    """Per query tile, the first and last aligned rows of the route block it lies in: (NT,) each."""
    rb = (torch.arange(-(-nq // QB), device=device) * QB) // block
    return rb * block + (nk - nq), torch.clamp((rb + 1) * block, max=nq) - 1 + (nk - nq)


def _route_whole(nq, nk, causal, w, block, device):
    """(NT, NKT) bool: whether every key of tile ``g`` is eligible for query tile ``t``'s route block."""
    n_kt = -(-max(nk, 1) // KB)
    return _whole_at(torch.arange(n_kt, device=device)[None, :], nq, nk, causal, w, block)


def _whole_at(g, nq, nk, causal, w, block):
    """Whether every key of tile ``g`` (NT, ·) is eligible for the route block of its query tile (row ``t``)."""
    g_lo, g_hi = g * KB, torch.clamp((g + 1) * KB, max=nk) - 1
    rf, rl = _route_rows(nq, nk, block, g.device)
    whole = g_hi <= (rf - w)[:, None]
    if not causal:
        whole = (whole | (g_lo >= (rl + w)[:, None])) if w else torch.ones_like(whole)
    return whole


def _route_edges(chosen, key_block, nq, nk, causal, w, block):
    """The routed tiles left partial, (B, H, NT, 2) bool: the one holding ``c_first − w`` and (non-causal)
    the one holding ``c_last + w``, where they straddle; ``None`` where no range ends inside a tile.

    From the chosen blocks (B, H, row blocks of ``block`` rows, C′) alone: two membership tests per
    query tile.
    """
    if not _ends_inside_tiles(nq, nk, causal, w, block):
        return None
    n_qt, n_kt = -(-nq // QB), -(-max(nk, 1) // KB)
    rf, rl = _route_rows(nq, nk, block, chosen.device)
    lo, hi = rf - w, rl + w
    g = torch.clamp(torch.stack([lo, hi], -1) // KB, 0, n_kt - 1)  # (NT, 2) the tiles holding them
    rows = (torch.arange(n_qt, device=chosen.device) * QB) // block
    routed = _in_blocks(chosen, rows, (g * KB).expand(*chosen.shape[:2], n_qt, 2), key_block)
    inside = torch.stack([lo >= 0, hi < nk], -1)
    return routed & ~_whole_at(g, nq, nk, causal, w, block) & inside


def own_layout(nq, nk, causal, covered, picks, pick_block, device, routes=None, marks=True):
    """The own-key call's lists, edges and (``marks``) tile marks: ``(partial, full, edges,
    (kv_num, kv_idx, full_num, full_idx))``, the lists :func:`list_width` wide.

    On CUDA one Triton pass lists the tiles (:func:`hyperref.gpu.direct_kernels.own_tile_lists`),
    writing the (·, ·, NT, NKT) marks only with ``marks`` (``None`` else: what only a backward
    reads); elsewhere the torch form :func:`own_tiles` and :func:`_listing`.
    """
    chosen, part = routes if routes is not None else (None, None)
    width = list_width(nq, nk, causal, covered, picks, pick_block, chosen, part.key_block if part else 0)
    edges = None if part is None else _route_edges(chosen, part.key_block, nq, nk, causal, covered[1], part.block)
    if device.type != "cuda":
        partial, full = own_tiles(nq, nk, causal, covered, picks, pick_block, device, routes)
        lists = (*_listing(partial), *_listing(full))
        most = [int(x.max()) if x.numel() else 0 for x in lists[::2]]
        if max(most) > width:  # list_width bounds them: this would be an error of that bound
            raise ValueError(f"a query tile lists more than the lists' width of {width} tiles")
        lists = tuple(x[..., :width].contiguous() if i % 2 else x for i, x in enumerate(lists))
        return partial, full, edges, lists
    from . import direct_kernels as kern

    out = kern.own_tile_lists(nq, nk, KB, causal, covered, device, picks, pick_block, chosen,
                              part.block if part else 0, part.key_block if part else 0, width=width, marks=marks)
    return out[0], out[1], edges, out[2:]


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
    partial, full, edges, lists = own_layout(nq, nk, causal, covered, picks, pick_block, dev, routes, marks=backward)
    n_qt, n_kt = -(-nq // QB), -(-max(nk, 1) // KB)
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
    if picks is not None and slots:  # keys of the tile's picked blocks are exact: not a gathered term
        gpos = torch.where(_in_blocks(picks, (tq * QB) // pick_block, gpos, pick_block), -1, gpos)
    if routes is not None and slots:  # nor are the eligible keys of the tile's routed blocks
        gpos = torch.where(_in_routed(routes, gpos, nq, nk, causal, covered), -1, gpos)
    gpos = torch.where(gpos >= 0, gpos, NONE).to(torch.int32)
    kv_num, kv_idx, full_num, full_idx = lists
    q_num = q_idx = full_q_num = full_q_idx = None
    if backward:
        q_num, q_idx = _listing(partial.transpose(-2, -1))
        full_q_num, full_q_idx = _listing(full.transpose(-2, -1))
    return DirectPlan(nq=nq, nk=nk, nk_pad=n_kt * KB, slots=slots, kv_num=kv_num, kv_idx=kv_idx,
                      full_num=full_num, full_idx=full_idx, q_num=q_num, q_idx=q_idx, full_q_num=full_q_num,
                      full_q_idx=full_q_idx, gpos=gpos, owner=owner, logw=logw, picks=picks,
                      pick_block=pick_block if picks is not None else 0,
                      chosen=None if routes is None else routes[0],
                      route_block=0 if routes is None else routes[1].block,
                      route_key_block=0 if routes is None else routes[1].key_block, edges=edges)


def _in_routed(routes, keys, nq, nk, causal, covered):
    """Whether each key (B, H, NT, ·) of a query tile is an eligible key of a routed block of it
    (``routes = (chosen, part)``)."""
    chosen, part = routes
    rf, rl = _route_rows(nq, nk, part.block, keys.device)
    rows = (torch.arange(keys.shape[2], device=keys.device) * QB) // part.block
    hit = _in_blocks(chosen, rows, keys, part.key_block)
    return hit & (keys >= 0) & (keys < nk) & _eligible_of(keys, rf, rl, *covered, causal)


def _holds(sorted_keys, keys, nk):
    """Whether each of ``keys`` (·, m) is in the ascending, −1-padded ``sorted_keys`` (·, n)."""
    hs = torch.where(sorted_keys >= 0, sorted_keys, nk + 1).contiguous()
    at = torch.clamp(torch.searchsorted(hs, keys.contiguous()), max=hs.shape[-1] - 1)
    return (torch.gather(hs, -1, at) == keys) & (keys >= 0)
