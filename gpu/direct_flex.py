"""The direct mode (SPEC §6b) as two block-sparse FlexAttention calls, forward and backward.

The reference (:func:`hyperref.direct.direct_head`) defines the function; this
module evaluates it with work proportional to the attended keys, in two calls
over disjoint key sets whose partials are merged by their log normalizers:

* **the own keys** — per query tile of ``QB = 128`` rows, the key tiles of
  ``KB = 128`` positions that hold a key of the exact set for some row of the
  tile: the sink tiles, the tiles the causal window crosses, the key blocks a
  ``blocktop`` part picked or a ``blockkeys`` part routed, listed per query tile
  in lists as wide as the most tiles one can list (a forward's plan is linear in
  the length). Token-level membership inside a tile is the mask
  ``j visible ∧ (j < s ∨ j in the window of i ∨ j in a picked or routed block)``;
  the compiled kernel, which reads the lists, needs index arithmetic and, where a
  routed block straddles the end of its row block's eligible range, one lookup per
  row (:func:`_listed_mask`); window tiles that every row of the tile sees whole,
  picked tiles and wholly eligible routed tiles are *full* (no mask work);
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

The selections are :mod:`hyperref.gpu.direct_select`, their layout as tile lists and slots
:mod:`hyperref.gpu.direct_plan` (:class:`~hyperref.gpu.direct_plan.DirectPlan`); this module
holds the masks, the two calls, their merge and the public function.

Samples are resolved by a binary search on the head's prefix sums of
``‖v_j‖²`` instead of the reference's cumulative sum over each block's support:
the two agree except where a uniform falls within float64 rounding of a
boundary of the cumulative distribution (probability about ``1e-16`` a draw).
"""

from __future__ import annotations

import math

import torch

from hyperref._validation import InputError, check_scale
from hyperref.config import HyperConfig
from hyperref.direct import paper_exact_set
from hyperref.exact_set import BlockKeys, BlockTop, ExactSet, HeavyKeys, Sinks, Window

from .direct_plan import NONE, DirectPlan, make_plan
from .direct_select import GB, KB, QB
from .finite import OVERFLOW, input_magnitudes, nonfinite_inputs, raise_if_flagged, result_flag, with_flag
from .options import flex_kernel_options

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
    a picked block or an eligible key of a routed block.

    What FlexAttention's unfused path and the dense form need (they ignore the tile lists);
    a lookup in the block tables per entry, which the compiled kernel avoids with
    :func:`_listed_mask`.
    """
    base = _window_mask(plan, exact_set, causal)
    picks, chosen, nk, nq = plan.picks, plan.chosen, plan.nk, plan.nq
    if picks is None and chosen is None:
        return base
    s, w, blk, offset = exact_set.sink_count, exact_set.window_width, plan.route_block, plan.nk - plan.nq

    def member(table, rows, keys, b, h, i, kv):
        """Whether key ``kv`` lies in a block of ``keys`` keys that ``table`` lists for row ``i``."""
        hh = 0 if table.shape[1] == 1 else h
        r = torch.clamp(i // rows, max=table.shape[2] - 1)
        hit = kv < 0
        for c in range(table.shape[-1]):
            blk_c = table[b, hh, r, c]
            hit = hit | ((blk_c >= 0) & (kv // keys == blk_c))
        return hit

    def mask_mod(b, h, i, kv):
        keep = base(b, h, i, kv)
        if picks is not None:
            keep = keep | (member(picks, plan.pick_block, plan.pick_block, b, h, i, kv) & (kv < nk))
        if chosen is not None:  # an eligible key of the row block (as _eligible_of)
            rb = i // blk
            cf = rb * blk + offset
            elig = (kv >= s) & (kv < nk) & (kv <= cf - w)
            if not causal:
                cl = torch.clamp((rb + 1) * blk, max=nq) - 1 + offset
                elig = ((kv >= s) & (kv < nk) & ((kv <= cf - w) | (kv >= cl + w))) if w else (kv >= s) & (kv < nk)
            keep = keep | (member(chosen, blk, plan.route_key_block, b, h, i, kv) & elig)
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
    eager path elsewhere. A call that needs gradients through FlexAttention needs a plan made
    with ``backward=True`` (:func:`~hyperref.gpu.direct_plan.make_plan`; refused otherwise).
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
    where a backward follows).

    The lists are narrower than the key tiles (:func:`~hyperref.gpu.direct_plan.list_width`):
    FlexAttention's kernels read them up to their counts, but ``BlockMask.to_dense``,
    ``to_string`` and its printed form size the dense mask by the lists' width and fail on
    this mask; :func:`_dense_full` and :func:`plan_counts` are the dense views.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if grad and plan.q_num is None:
        raise ValueError("a backward needs the plan's key-to-query lists: make it with backward=True")
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
        ``blockkeys``, ``heavykeys`` parts; ``query_block`` dividing 128 or a multiple of it.
        Exact attention when ``nq <= config.min_seq_len``, as the reference.
    draws : hyperref.Draws, optional
        The reference's draws (:func:`hyperref.make_draws` for batch shape
        ``(B, H)``): the answer is then the reference's on the same draws.
        Without them the draws are made here from ``generator``.
    generator : torch.Generator, optional
        Source of the draws when ``draws`` is not given.
    kernel_options : dict, optional
        FlexAttention's tuning options (tile sizes, stages, warps) for both calls on CUDA,
        checked by :func:`hyperref.gpu.options.flex_kernel_options`.
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
        Shapes, dtypes or draws that do not fit, parts this engine does not compute; NaN or
        Inf in ``q``, ``k`` or ``v``; logits that could leave the range of the arithmetic
        (``max(|scale|, 1)·D·max|q|·max|k|`` at least half of float32's largest number, float64's
        for float64 input), or weighted values that did. These are checked on the device and
        read in one sync after the kernels are queued.
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
    kernel_options = flex_kernel_options(kernel_options, max_tile=min(QB, KB))
    scale = check_scale(scale, d)
    pending = _input_flags(q, k, v, scale)
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
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        with torch.no_grad():
            plan = make_plan(q.detach(), k.detach(), v.detach(), causal=causal, scale=scale, config=config,
                             heavy_rows=heavy_rows, sample_u=sample_u, backward=backward)
            counts = plan_counts(plan, exact_set, bq, causal) if return_counts else None
        out, lse = flex_direct(q, k, v, plan, scale=scale, config=config, causal=causal,
                               kernel_options=kernel_options)
    raise_if_flagged(result_flag(pending, out, lse))  # lse −inf: a row with no key, output 0
    extras = ((lse,) if return_lse else ()) + ((counts,) if return_counts else ())
    return (out, *extras) if extras else out


def _input_flags(q, k, v, scale):
    """Pending device flags (:mod:`hyperref.gpu.finite`): NaN/Inf in each nonempty input, and
    ``overflow`` where a logit or a partial dot product could leave the range of the arithmetic
    (``max(|scale|, 1)·D·max|q|·max|k|`` at least half its largest number), read after the
    kernels."""
    big = input_magnitudes(q, k, v)
    pending = nonfinite_inputs(big)
    if "q" in big and "k" in big:
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        bound = max(abs(scale), 1.0) * q.shape[3] * big["q"].to(work) * big["k"].to(work)
        pending = with_flag(pending, OVERFLOW, bound >= torch.finfo(work).max / 2)
    return pending


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
