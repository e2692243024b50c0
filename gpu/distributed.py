"""Head-parallel HyperAttention over ``torch.distributed`` (the DeepSpeed-Ulysses exchange).

Each rank holds a contiguous shard of the sequence, for all heads:
``q`` (B, H, N/W, D), ``k, v`` (B, Hk, Nk/W, ·) on each of W ranks, shards in rank
order. One all-to-all turns that into the full sequence for H/W query heads
(and Hk/W key/value heads: rank r gets query heads ``[r·H/W, (r+1)·H/W)`` and
key/value heads ``[r·Hk/W, (r+1)·Hk/W)``, which keeps every GQA group on one
rank); each rank runs ordinary single-device :func:`hyperref.gpu.hyper_attention`; a
second all-to-all returns sequence shards of the output (and ``lse``).
Backward runs the same exchanges in reverse (each exchange's gradient is the
opposite exchange), so gradients equal those of the single-process call on
the same draws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hyperref._validation import InputError
from hyperref.draws import BlockDraws, Draws

from .attention import hyper_attention
from .options import as_kernel_options


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``out[j] = x_on_rank_j[my_rank]`` along dim 0 (size W)."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, world: int, group) -> torch.Tensor:
    # (B, H, n, ·) sequence shard, all heads -> (B, H/W, W·n, ·) full sequence, my heads
    b, h, n = x.shape[:3]
    rest = x.shape[3:]
    chunks = x.reshape(b, world, h // world, n, *rest).movedim(1, 0)
    received = _all_to_all(chunks, group)  # [j] = rank j's sequence shard of my heads
    return received.movedim(0, 2).reshape(b, h // world, world * n, *rest)


def _head_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    # (B, H/W, W·n, ·) -> (B, H, n, ·): the inverse exchange
    b, hw, total = x.shape[:3]
    rest = x.shape[3:]
    n = total // world
    chunks = x.reshape(b, hw, world, n, *rest).movedim(2, 0)
    received = _all_to_all(chunks, group)  # [j] = rank j's heads of my sequence shard
    return received.movedim(0, 1).reshape(b, world * hw, n, *rest)


class _Exchange(torch.autograd.Function):
    """One all-to-all exchange; its gradient is the opposite exchange."""

    @staticmethod
    def forward(ctx, x, world, group, to_heads: bool):
        ctx.world, ctx.group, ctx.to_heads = world, group, to_heads
        return (_seq_to_head if to_heads else _head_to_seq)(x, world, group)

    @staticmethod
    def backward(ctx, grad):
        back = _head_to_seq if ctx.to_heads else _seq_to_head
        return back(grad, ctx.world, ctx.group), None, None, None


def _head_slice(draws: Draws, h0: int, h1: int) -> Draws:
    """The draws of query heads ``[h0, h1)`` (batch shape (B, H) -> (B, h1 − h0))."""
    def cut(bd: BlockDraws) -> BlockDraws:
        return BlockDraws(bd.lsh_planes[:, h0:h1], bd.approxd_rows[:, h0:h1], bd.approxd_cols[:, h0:h1],
                          bd.sample_u[:, h0:h1], bd.nq, bd.nk)

    b = draws.batch_shape[0]
    return Draws(draws.nq, draws.nk, draws.d, draws.causal, (b, h1 - h0), draws.config,
                 {path: cut(bd) for path, bd in draws.blocks.items()})


def hyper_attention_distributed(q, k, v, *, group=None, causal=False, scale=None, config=None,
                                draws=None, generator=None, return_lse=False, exact_hash=False,
                                backend="triton", kernel_options=None):
    """HyperAttention of a sequence sharded over the ranks of ``group``.

    Parameters
    ----------
    q : Tensor (B, H, N/W, D); k, v : Tensor (B, Hk, Nk/W, D), (B, Hk, Nk/W, Dv)
        This rank's contiguous shard of the sequence (rank order), all heads.
        Every rank must hold shards of the same length.
    group : ProcessGroup, optional
        Default: the world.
    draws : hyperref.Draws, optional
        Draws for the *whole* problem, batch shape (B, H), identical on every
        rank; each rank uses its heads' part. Without it each rank draws on
        its device from ``generator``.
    Other arguments as :func:`hyperref.gpu.hyper_attention` (``kernel_options`` is checked
    before any exchange and applies on every rank).

    Returns
    -------
    out : Tensor (B, H, N/W, Dv), this rank's shard; lse : Tensor (B, H, N/W) if ``return_lse``

    Raises
    ------
    hyperref.InputError
        Heads not divisible by the world size, shards of different lengths, bad ``kernel_options``.
    """
    options = as_kernel_options(kernel_options)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    b, h, n_loc, _ = q.shape
    hk = k.shape[1]
    if h % world or hk % world:
        raise InputError(f"query heads ({h}) and key/value heads ({hk}) must both be divisible by "
                         f"the world size ({world})")
    lengths = torch.tensor([n_loc, k.shape[2]], dtype=torch.int64, device=q.device)
    gathered = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(gathered, lengths, group=group)
    if any(not torch.equal(g, lengths) for g in gathered):
        raise InputError("every rank must hold sequence shards of the same length; got "
                         f"{[tuple(g.tolist()) for g in gathered]}")
    qh, kh, vh = (_Exchange.apply(x, world, group, True) for x in (q, k, v))
    per = h // world
    local_draws = _head_slice(draws, rank * per, (rank + 1) * per) if draws is not None else None
    out, lse = hyper_attention(qh, kh, vh, causal=causal, scale=scale, config=config, draws=local_draws,
                               generator=generator, return_lse=True, exact_hash=exact_hash, backend=backend,
                               kernel_options=options)
    out = _Exchange.apply(out, world, group, False)
    if not return_lse:
        return out
    return out, _Exchange.apply(lse[..., None], world, group, False)[..., 0]


class DistributedHyperAttention(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`hyper_attention_distributed`."""

    def __init__(self, config=None, *, group=None, causal=False, scale=None, backend="triton",
                 kernel_options=None):
        super().__init__()
        self.config, self.group, self.causal, self.scale, self.backend = config, group, causal, scale, backend
        self.kernel_options = as_kernel_options(kernel_options)

    def forward(self, q, k, v, *, draws=None, generator=None, return_lse=False):
        return hyper_attention_distributed(q, k, v, group=self.group, causal=self.causal, scale=self.scale,
                                           config=self.config, draws=draws, generator=generator,
                                           return_lse=return_lse, backend=self.backend,
                                           kernel_options=self.kernel_options)
