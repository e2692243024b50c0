"""Geometry, hashing, sorting and sampling of one piece (mirrors hyperref.lsh/mask/sampling).

A *piece* is what one kernel launch computes: a list of nodes, node ``t`` with
query rows ``[q0, q1)`` and key rows ``[k0, k1)`` (the non-causal call is one
node; a level of the causal recursion is all its off-diagonal blocks). Its rows
and keys are numbered in *virtual* order, node after node: virtual row
``R_t + i`` is the node's ``i``-th row in sorted order, likewise keys from
``C_t``. Everything here is per piece, batched over heads and nodes: one hash
launch and one sort for the queries, the same for the keys, one inverse-CDF
search for the samples of all nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import itertools

import torch

from .options import DEFAULTS, KernelOptions


@dataclass(frozen=True)
class Layout:
    """Nodes ``((q0, q1, k0, k1), ...)`` of one piece, in increasing ``q0`` and ``k0``."""

    nodes: tuple

    @property
    def row_bounds(self) -> tuple:
        """Virtual row offsets ``(R_0 = 0, R_1, ..., R_T)``."""
        return tuple(itertools.accumulate((q1 - q0 for q0, q1, _, _ in self.nodes), initial=0))

    @property
    def col_bounds(self) -> tuple:
        """Virtual key offsets ``(C_0 = 0, C_1, ..., C_T)``."""
        return tuple(itertools.accumulate((k1 - k0 for _, _, k0, k1 in self.nodes), initial=0))


def kv_heads(bh: int, h: int, hk: int, device) -> torch.Tensor:
    """Key/value head of each flattened query head ``b·H + i``: ``b·Hk + i // (H / Hk)``."""
    heads = torch.arange(bh, device=device)
    return (heads // h) * hk + (heads % h) // (h // hk)


def gray_inverse(code: torch.Tensor) -> torch.Tensor:
    """Rank of ``code`` in Gray order (SPEC §3): ``t = c ⊕ (c≫1) ⊕ (c≫2) ⊕ …``."""
    t = code.clone()
    shift = 1
    while shift < 32:
        t ^= t >> shift
        shift *= 2
    return t


def _arange_segments(bounds, starts):
    """For each node ``t``: ``starts[t] + 0, 1, …`` over its ``bounds[t+1] − bounds[t]`` entries."""
    sizes = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.int64)
    node = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    local = torch.arange(bounds[-1], dtype=torch.int64) - torch.tensor(bounds[:-1], dtype=torch.int64)[node]
    return node, local, torch.tensor(starts, dtype=torch.int64)[node] + local


@lru_cache(maxsize=128)
def layout_arrays(layout: Layout, block: int, device) -> dict:
    """Per virtual row / key arrays of a piece (cached; shared by all heads).

    ``lo, hi, rtag`` (int32, R): the row's key interval of its sortLSH block in
    virtual key coordinates and the block's tag (tags are unique across nodes);
    ``ktag`` (int32, C): the tag of each virtual key position;
    ``col_node`` (int64): node of each virtual key;
    ``row_x0, row_n``/``col_x0, col_n``: first original index and size of that node;
    ``col_orig`` (int64, C): original key of virtual key ``c`` *before* sorting;
    ``{row,col}_{starts,ends,orig0,sizes}`` (int64, T): per node, its virtual
    range, its first original index and its size.
    """
    rb, cb = layout.row_bounds, layout.col_bounds
    r_node, r_local, _ = _arange_segments(rb, [n[0] for n in layout.nodes])
    c_node, c_local, c_orig = _arange_segments(cb, [n[2] for n in layout.nodes])
    nq = torch.tensor([n[1] - n[0] for n in layout.nodes], dtype=torch.int64)
    nk = torch.tensor([n[3] - n[2] for n in layout.nodes], dtype=torch.int64)
    n_blocks = (nk + block - 1) // block
    tag0 = torch.cumsum(n_blocks, 0) - n_blocks
    g = torch.clamp((r_local * nk[r_node]) // (nq[r_node] * block), max=n_blocks[r_node] - 1)
    c0 = torch.tensor(cb[:-1], dtype=torch.int64)
    lo = c0[r_node] + g * block
    hi = torch.minimum(lo + block, c0[r_node] + nk[r_node])
    arrays = dict(lo=lo, hi=hi, rtag=tag0[r_node] + g, ktag=tag0[c_node] + c_local // block,
                  col_node=c_node, col_orig=c_orig,
                  row_x0=torch.tensor([n[0] for n in layout.nodes])[r_node], row_n=nq[r_node],
                  col_x0=torch.tensor([n[2] for n in layout.nodes])[c_node], col_n=nk[c_node],
                  row_r0=torch.tensor(rb[:-1])[r_node], col_r0=c0[c_node])
    for side, bounds, starts in (("row", rb, [n[0] for n in layout.nodes]),
                                 ("col", cb, [n[2] for n in layout.nodes])):
        arrays[f"{side}_starts"] = torch.tensor(bounds[:-1])  # per node: virtual start,
        arrays[f"{side}_ends"] = torch.tensor(bounds[1:])  # virtual end,
        arrays[f"{side}_orig0"] = torch.tensor(starts)  # first original index,
        arrays[f"{side}_sizes"] = arrays[f"{side}_ends"] - arrays[f"{side}_starts"]  # size
    out = {}
    for name, t in arrays.items():
        small = name in ("lo", "hi", "rtag", "ktag")
        out[name] = t.to(torch.int32 if small else torch.int64).to(device)
    return out


@torch.compiler.disable
@lru_cache(maxsize=128)
def leaf_intervals(leaves: tuple, nq: int, device):
    """Per row ``i``: keys ``[lo, hi)`` it sees inside its causal leaf (SPEC §6)."""
    lo = torch.zeros(nq, dtype=torch.int64)
    hi = torch.zeros(nq, dtype=torch.int64)
    for leaf in leaves:
        rows = torch.arange(leaf.q0, leaf.q1, dtype=torch.int64)
        offset = (leaf.k1 - leaf.k0) - (leaf.q1 - leaf.q0)
        lo[leaf.q0:leaf.q1] = leaf.k0
        hi[leaf.q0:leaf.q1] = torch.clamp(leaf.k0 + (rows - leaf.q0) + offset + 1, leaf.k0, leaf.k1)
    return lo.int().to(device), hi.int().to(device)


@lru_cache(maxsize=256)
def tile_map(bounds: tuple, tile: int, device):
    """Tiles of at most ``tile`` rows that never cross a node: (start, end, node), int32 each."""
    r0, r1, node = [], [], []
    for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for s in range(a, b, tile):
            r0.append(s)
            r1.append(min(s + tile, b))
            node.append(t)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(r0), as_t(r1), as_t(node)


@lru_cache(maxsize=256)
def tiles_in_one_block(layout: Layout, block: int, tile: int) -> bool:
    """Whether every row tile of :func:`tile_map` lies inside one sortLSH block of its node
    (then the rows of a tile share their key interval and block tag): the first and last
    row of each tile have the same block tag (read from the host copy of the layout's arrays)."""
    if any(k1 == k0 for _, _, k0, k1 in layout.nodes):  # a node without keys has no blocks
        return False
    cpu = torch.device("cpu")
    rtag = layout_arrays(layout, block, cpu)["rtag"]
    r0, r1, _ = tile_map(layout.row_bounds, tile, cpu)
    return bool((rtag[r0.long()] == rtag[r1.long() - 1]).all())


@lru_cache(maxsize=256)
def key_tiles_in_one_block(layout: Layout, block: int, tile: int) -> bool:
    """Whether every tile ``[c, c + tile)`` of virtual keys (``c`` a multiple of ``tile``) lies
    inside one sortLSH block: blocks and nodes' key ranges start at multiples of ``tile``."""
    return block % tile == 0 and all(c % tile == 0 for c in layout.col_bounds[:-1])


def _sort_keys_torch(x, planes, bounds, starts, kv_of, exact):
    """Sort keys ``(R_t << r) + bucket·n_t + local`` by torch operations (any device)."""
    bh = planes.shape[0]
    r = planes.shape[-1]
    weights = 1 << torch.arange(r, device=x.device, dtype=torch.int64)
    keys = []
    for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = x[kv_of, starts[t]:starts[t] + (b - a)]
        if exact:
            bits = torch.stack([(rows[i].double() @ planes[i, t].double()) > 0 for i in range(bh)])
        else:
            bits = torch.matmul(rows, planes[:, t].to(rows.dtype)) > 0
        bucket = gray_inverse((bits.long() * weights).sum(-1))
        local = torch.arange(b - a, device=x.device)
        keys.append((a << r) + bucket * (b - a) + local)
    return torch.cat(keys, dim=1)


@lru_cache(maxsize=256)
def _node_chunks(bounds: tuple, chunk: int, device):
    """For the chunks of :func:`tile_map` ``(bounds, chunk)``: each node's first chunk and one
    past its last (int32 each)."""
    _, _, node = tile_map(bounds, chunk, torch.device("cpu"))
    nodes = torch.arange(len(bounds) - 1, dtype=torch.int32)
    c0 = torch.searchsorted(node, nodes, right=False)
    c1 = torch.searchsorted(node, nodes, right=True)
    return c0.int().to(device), c1.int().to(device)


def _counting_sort(codes, bounds, arrays, pre, n_orig, n_buckets, positions, chunk, tile):
    """Stable sort of each node's rows by bucket (Triton, two passes over ``codes``).

    ``codes`` (BH, R) int32 buckets in ``[0, n_buckets)``; chunks of ``chunk`` rows (one
    program each, never crossing a node), ``tile`` rows at a time. Returns the original index
    of each virtual row (BH, R) int32 and, with ``positions``, the virtual row of each
    original index (BH, ``n_orig``) int32 (entries outside the piece's nodes unset).
    """
    from . import kernels_sort as K

    bh, total = codes.shape
    device = codes.device
    c_r0, c_r1, c_node = tile_map(bounds, chunk, device)
    n_chunks = c_r0.shape[0]
    nb = max(16, n_buckets)  # a power of two
    counts = torch.empty((bh, n_chunks, nb), dtype=torch.int32, device=device)
    K._bucket_count_kernel[(n_chunks, bh)](codes, counts, c_r0, c_r1, n_chunks, codes.stride(0),
                                          NB=nb, BM=tile, num_warps=4)
    node_c0, node_c1 = _node_chunks(bounds, chunk, device)
    perm = torch.empty((bh, total), dtype=torch.int32, device=device)
    pos = torch.empty((bh, n_orig), dtype=torch.int32, device=device) if positions else perm
    K._bucket_scatter_kernel[(n_chunks, bh)](
        codes, counts, c_r0, c_r1, c_node, node_c0, node_c1, arrays[f"{pre}_starts"], arrays[f"{pre}_orig0"],
        perm, pos, n_chunks, codes.stride(0), perm.stride(0), pos.stride(0),
        NB=nb, BM=tile, HAS_POS=positions, num_warps=4)
    return perm, (pos if positions else None)


def sorted_order(x, planes, bounds, starts, arrays, side, kv_of, H, Hk, exact, use_triton, flag=None,
                 positions=False, options: KernelOptions = DEFAULTS):
    """Original indices of each head's rows of ``x`` in virtual (sorted) order, int32 (BH, R).

    ``x`` (BHx, n, d) with ``BHx`` = BH (queries) or B·Hk (keys, read through
    ``kv_of``); ``planes`` (BH, T, d, r); nodes' rows are ``[starts[t], …)``.
    The order within a node is the stable sort by bucket ``gray⁻¹(c(x))``.
    ``flag`` (int32, Triton hash only): set to 1 if a hashed row holds NaN/Inf.
    With ``positions``, returns ``(perm, pos)``: ``pos`` (BH, n) int32 the virtual
    row of each original row of the piece's nodes (the inverse permutation).

    With ``use_triton``, ``options`` sets the hash kernel's rows per program and when and
    how the counting sort orders few buckets (on CUDA, and under the Triton interpreter only
    with ``options.counting_on_cpu``: its tile sorts are slow there; the CPU tests check it
    against the torch sort directly, tests/test_gpu.py::test_hash_kernel_matches_torch_hash).
    """
    bh = planes.shape[0]
    r = planes.shape[-1]
    total = bounds[-1]
    pre = "row" if side == "q" else "col"
    counting = (use_triton and not exact and r <= options.counting_bits
                and (x.is_cuda or options.counting_on_cpu))
    wide = (total << r) >= 2 ** 31 and not counting
    if use_triton and not exact:
        from . import kernels_sort as K
        from .function import _prec

        BM = options.hash_rows
        t_r0, t_r1, t_node = tile_map(bounds, BM, x.device)
        keys = torch.empty((bh, total), dtype=torch.int64 if wide else torch.int32, device=x.device)
        planes = planes.contiguous()
        heads = (H, Hk, H // Hk) if side == "k" else (1, 1, 1)  # queries: head bh is row bh
        K._hash_kernel[(t_r0.shape[0], bh)](
            x, planes, keys, t_r0, t_r1, t_node,
            arrays[f"{pre}_starts"], arrays[f"{pre}_orig0"], arrays[f"{pre}_sizes"],
            keys if flag is None else flag,
            *heads, r, x.stride(0), x.stride(1), planes.stride(0), planes.stride(1), keys.stride(0),
            D=x.shape[2], RP=max(16, _next_pow2(r)), BM=BM, PREC=_prec(x.dtype),
            CHECK=flag is not None, CODES=counting, num_warps=4)
        if counting:
            perm, pos = _counting_sort(keys, bounds, arrays, pre, x.shape[1], 1 << r, positions,
                                       options.sort_chunk, options.sort_tile)
            return (perm, pos) if positions else perm
    else:
        if flag is not None:
            raise ValueError("the non-finite flag is set by the Triton hash kernel only")
        index = torch.arange(bh, device=x.device) if side == "q" else kv_of
        keys = _sort_keys_torch(x, planes, bounds, starts, index, exact)
        if not wide:
            keys = keys.int()
    s = torch.sort(keys, dim=-1).values.long()
    r0, x0, n = arrays[f"{pre}_r0"], arrays[f"{pre}_x0"], arrays[f"{pre}_n"]
    local = (s - (r0 << r)) % n
    perm = (x0 + local).int().contiguous()
    if not positions:
        return perm
    pos = torch.empty((bh, x.shape[1]), dtype=torch.int32, device=x.device)
    pos.scatter_(1, perm.long(), torch.arange(total, device=x.device, dtype=torch.int32).expand(bh, -1))
    return perm, pos


def _next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (``tl.arange`` sizes)."""
    return 1 << max(0, (n - 1).bit_length())


@torch.compiler.disable
def row_sq_norms(v: torch.Tensor, exact: bool, use_triton: bool = False, flag=None) -> torch.Tensor:
    """Squared row norms ``‖v_j‖²`` of (B·Hk, n, dv) in float64 (computed from ``v`` detached).

    ``exact``: in float64; else accumulated in float32 (one Triton pass with ``use_triton``,
    which also sets ``flag`` (int32) to 1 if ``v`` holds NaN/Inf).
    """
    vd = v.detach()
    if flag is not None and (exact or not use_triton or vd.dtype == torch.float64):
        raise ValueError("the non-finite flag is set by the Triton kernel only")
    if exact:
        return (vd.double() ** 2).sum(-1)
    if use_triton and vd.dtype != torch.float64:
        from . import kernels_sample as K

        rows = vd.shape[0] * vd.shape[1]
        out = torch.empty(vd.shape[:2], dtype=torch.float32, device=vd.device)
        BM = 64
        K._sq_norm_kernel[(-(-rows // BM),)](vd, out, out if flag is None else flag, rows, vd.shape[1],
                                            vd.stride(0), vd.stride(1), D=vd.shape[2], BM=BM,
                                            CHECK=flag is not None, num_warps=4)
        return out.double()
    acc = torch.float64 if vd.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(vd, dim=-1, dtype=acc).double() ** 2


def prefix_sums(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Inclusive prefix sums along the last dim of a 2-d tensor, in two levels: within blocks
    of ``block`` entries, then the blocks' exclusive running totals added (torch's scan of
    one long float64 row per head is slow on the GPU; this is the same sum up to rounding)."""
    rows, n = x.shape
    if n <= 2 * block:
        return torch.cumsum(x, dim=-1)
    pad = -n % block
    inner = torch.nn.functional.pad(x, (0, pad)).view(rows, -1, block).cumsum(dim=-1)
    totals = inner[:, :, -1].cumsum(dim=-1)
    inner[:, 1:] += totals[:, :-1, None]
    return inner.view(rows, -1)[:, :n].contiguous()


def _inverse_cdf(cum, starts, ends, u):
    """Per node ``t`` and uniform ``u``: the first key of ``[start_t, end_t)`` whose prefix sum
    exceeds ``base + u·(top − base)`` (inverse CDF by one search over all nodes).

    ``cum`` (R, C) float64 prefix sums of nonnegative weights over the piece's virtual keys,
    ``u`` (R·g, T, m): the ``g`` query heads of row ``r`` of ``cum`` are ``r·g … r·g + g − 1``.
    Returns virtual key indices (R, g·T·m) and each node's total (R, T).
    """
    rows, (n_heads, n_nodes, m) = cum.shape[0], u.shape
    padded = torch.nn.functional.pad(cum, (1, 0))
    base, top = padded[:, starts], padded[:, ends]
    ug = u.double().reshape(rows, n_heads // rows, n_nodes, m)
    target = base[:, None, :, None] + ug * (top - base)[:, None, :, None]
    c = torch.searchsorted(cum, target.reshape(rows, -1), right=True).reshape(ug.shape)
    # rounding can put the target at the node's top: take its last key of positive weight, the
    # first position where the prefix sum reaches the top (later keys add exact zeros)
    c = torch.minimum(c, torch.searchsorted(cum, top.contiguous(), right=False)[:, None, :, None])
    # inside the node whatever the input (NaN/Inf inputs are refused after the launches)
    c = torch.maximum(torch.minimum(c, (ends - 1)[None, None, :, None]), starts[None, None, :, None])
    return c.reshape(rows, -1), top - base


def _sampling_weights(sq, sampler, arrays):
    """Per virtual key weights (R, C) float64 whose prefix sums the inverse CDF searches, and
    whether they are unnormalized (``rownorm``: ``‖v_j‖²``, ``p_j`` = weight / node total; the
    others: the probabilities themselves). ``R`` = B·Hk (1 for ``uniform``)."""
    c_node, c_orig, col_n = arrays["col_node"], arrays["col_orig"], arrays["col_n"]
    uniform = (1.0 / col_n.double())[None, :]
    if sampler == "rownorm":
        return sq[:, c_orig], True
    if sampler == "uniform":
        return uniform, False
    s = sq[:, c_orig]
    padded = torch.nn.functional.pad(prefix_sums(s), (1, 0))
    tot = (padded[:, arrays["col_ends"]] - padded[:, arrays["col_starts"]])[:, c_node]
    rownorm = torch.where(tot > 0, s / torch.where(tot > 0, tot, 1.0), uniform)
    return 0.5 * rownorm + 0.5 * uniform, False


def sample_nodes(sq, u, sampler, layout: Layout, arrays):
    """Sampled keys of every node of a piece by inverse CDF (SPEC §5), batched over nodes.

    ``sq`` (B·Hk, Nk) float64 squared row norms of ``v`` (unused for ``uniform``),
    ``u`` (BH, T, m) uniforms (query heads ``j·G … j·G + G − 1`` read key/value head ``j``).
    Node ``t`` samples its keys ``[k0, k1)`` with the sampler's probabilities
    restricted to them. Returns original key indices ``idx`` (BH, T, m) int64 and
    log-weights ``−log(m p_j)`` (float32).

    ``rownorm`` searches the prefix sums of ``‖v_j‖²`` themselves (target
    ``S_start + u·total``; a node whose rows of ``v`` are all zero samples
    uniformly), the others the prefix sums of the normalized probabilities; both
    per key/value head, shared by its query heads. :func:`sample_nodes_triton` is
    the same search in one Triton launch.
    """
    bh, n_nodes, m = u.shape
    c_orig = arrays["col_orig"]
    starts, ends = arrays["col_starts"], arrays["col_ends"]
    w, ratio = _sampling_weights(sq, sampler, arrays)
    c, tot = _inverse_cdf(prefix_sums(w), starts, ends, u)
    if ratio:
        shape = (w.shape[0], bh // w.shape[0], n_nodes, m)
        tot = tot[:, None, :, None].expand(shape).reshape(c.shape)
        # a node whose rows of v are all zero samples uniformly (the reference's probabilities)
        first = starts[None, None, :, None].expand(shape).reshape(c.shape)
        n_node = (ends - starts)[None, None, :, None].expand(shape).reshape(c.shape)
        pick = torch.minimum((u.double().reshape(c.shape) * n_node).long(), n_node - 1)
        c = torch.where(tot > 0, c, first + pick)
        p = torch.where(tot > 0, w.gather(1, c) / torch.where(tot > 0, tot, 1.0), 1.0 / n_node.double())
    else:
        p = w.gather(1, c)
    log_w = -torch.log(m * p)
    return c_orig[c].reshape(bh, n_nodes, m), log_w.float().reshape(bh, n_nodes, m)


def sample_nodes_triton(sq, u, sampler, layout: Layout, arrays, position):
    """:func:`sample_nodes` by one Triton launch (a program per head and node: binary searches
    of the weights' prefix sums), with each sample's block tag: returns ``idx`` (BH, T, m)
    int32, log-weights float32 and ``stag`` int32 = ``ktag[position[bh, idx]]``, where
    ``position`` (BH, Nk) int32 is the virtual key of each original key (the key sort's
    inverse permutation)."""
    from . import kernels_sample as K

    bh, n_nodes, m = u.shape
    w, ratio = _sampling_weights(sq, sampler, arrays)
    cum = prefix_sums(w)
    idx = torch.empty((bh, n_nodes, m), dtype=torch.int32, device=u.device)
    bias = torch.empty((bh, n_nodes, m), dtype=torch.float32, device=u.device)
    stag = torch.empty((bh, n_nodes, m), dtype=torch.int32, device=u.device)
    cb = layout.col_bounds
    longest = max(b - a for a, b in zip(cb[:-1], cb[1:]))
    K._sample_kernel[(bh, n_nodes)](
        cum, w, u.contiguous(), arrays["col_starts"], arrays["col_ends"], arrays["col_orig"], position,
        arrays["ktag"], idx, bias, stag, n_nodes, m, bh // w.shape[0], cum.stride(0), w.stride(0),
        position.stride(0), BLOCK=min(256, _next_pow2(m)), RATIO=ratio, STEPS=longest.bit_length() + 1,
        num_warps=4, enable_fp_fusion=False)  # targets rounded as torch rounds them (no FMA)
    return idx, bias, stag
