"""Public GPU API: ``hyper_attention`` and the ``HyperAttention`` module (torch SDPA layout)."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch

from hyperref._validation import InputError, check_scale
from hyperref.config import HyperConfig
from hyperref.draws import Draws
from hyperref.plan import OffDiagonal, causal_nodes

from .finite import holds_nonfinite, input_magnitudes, nonfinite_inputs, raise_if_flagged, result_flag
from .function import Plan, pieces_attention, pieces_attention_dense
from .options import KernelOptions, as_kernel_options
from .structure import (Layout, kv_heads, layout_arrays, leaf_intervals, row_sq_norms, sample_nodes,
                        sample_nodes_triton, sorted_order)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
BACKENDS = ("triton", "dense")


def _check(q, k, v, config, backend):
    # what the configuration asks for comes first: no tensor on any device can serve it
    if config.mode != "recursive":
        raise InputError("the GPU kernels implement the paper's mode (mode='recursive'); for "
                         "mode='direct' use hyperref.gpu.direct.direct_attention (its torch twin)")
    if config.estimator != "masked" or config.normalizer != "self":
        raise InputError("the GPU path implements estimator='masked' with normalizer='self'; "
                         "use hyperref (the NumPy reference) for the others")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = DTYPES + ((torch.float64,) if backend == "dense" else ())
    if q.dtype not in allowed:
        raise InputError(f"dtype {q.dtype} is not supported; use one of {allowed}")
    if backend == "triton":
        from . import function as F

        if F.triton is None:
            raise ImportError("the Triton kernels need triton: pip install 'hyperref[gpu]' "
                              "(backend='dense' runs without it)")
        if q.device.type != "cuda" and not F._interpret():
            raise InputError(f"the Triton kernels need CUDA tensors (got {q.device.type}) or "
                             "TRITON_INTERPRET=1; backend='dense' runs on any device")
        if q.device.type != "cuda" and q.dtype == torch.bfloat16:
            raise InputError("the Triton interpreter has no bfloat16 (its answers would be wrong): "
                             "use float16/float32, or a CUDA device")
    if not (q.device == k.device == v.device):
        raise InputError("q, k, v must be on the same device")
    (b, h, nq, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise InputError(f"batch sizes differ: {b}, {bk}, {bv}")
    if hk != hv or hk == 0 or h % hk:
        raise InputError(f"key/value heads ({hk}, {hv}) must be equal and divide query heads ({h})")
    if d != dk or nk != nv:
        raise InputError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d == 0 or dv == 0:
        raise InputError(f"head dimensions must be >= 1, got d={d}, dv={dv}")
    if backend == "triton" and (d not in HEAD_DIMS or dv not in HEAD_DIMS):
        raise InputError(f"head dims must be one of {HEAD_DIMS} for the Triton kernels, got d={d}, dv={dv}")
    if nk == 0 and nq > 0:
        raise InputError("k and v are empty: attention needs at least one key")


def _gaps(ranges, n):
    """The parts of ``[0, n)`` outside the union of the half-open ``ranges``."""
    gaps, end = [], 0
    for a, b in sorted(ranges):
        if a > end:
            gaps.append((end, a))
        end = max(end, b)
    return gaps + ([(end, n)] if end < n else [])


def _flag_unhashed_rows(q, k, flags, levels):
    """Causal fold of the input check: set ``flags[0]`` (q) / ``flags[1]`` (k) if the rows that
    no level's hash kernel reads (e.g. the first leaf's queries) hold NaN/Inf."""
    nodes = [n for level in levels for n in level]
    for i, (x, ranges) in enumerate(((q, [(n.q0, n.q1) for n in nodes]), (k, [(n.k0, n.k1) for n in nodes]))):
        for a, b in _gaps(ranges, x.shape[2]):
            flags[i:i + 1] |= holds_nonfinite(x[:, :, a:b]).int()


def _device_draws(config, b, h, d, device, generator):
    """A function drawing one piece's LSH planes (BH, T, d, r) and sample uniforms (BH, T, m)
    on the device, one call per piece."""
    def draw(nodes):
        planes = torch.randn((b * h, len(nodes), d, config.bits), device=device, generator=generator)
        u = torch.rand((b * h, len(nodes), config.samples), device=device, generator=generator,
                       dtype=torch.float64)
        return planes, u
    return draw


def _from_reference_draws(draws: Draws, config, nq, nk, d, causal, b, h, device):
    if not isinstance(draws, Draws):
        raise InputError(f"draws must be a hyperref.Draws, got {type(draws).__name__}")
    if (draws.nq, draws.nk, draws.d, draws.causal) != (nq, nk, d, bool(causal)) or \
            tuple(draws.batch_shape) != (b, h) or draws.config != config:
        raise InputError("draws were made for another shape, causality or config")
    blocks = {path: (torch.as_tensor(np.asarray(bd.lsh_planes).reshape(b * h, d, -1), device=device),
                     torch.as_tensor(np.asarray(bd.sample_u).reshape(b * h, -1), device=device))
              for path, bd in draws.blocks.items()}

    def draw(nodes):
        return (torch.stack([blocks[n.path][0] for n in nodes], dim=1),
                torch.stack([blocks[n.path][1] for n in nodes], dim=1))
    return draw


@torch.compiler.disable  # integer index plumbing: kept out of compiled graphs
def _piece_plan(qf, kf, vf, layout: Layout, planes, u, sq, config, h, hk, exact_hash, use_triton,
                options: KernelOptions, flags=None):
    """Index tensors of one sortLSH piece (SPEC §3, §5): all nodes of ``layout`` at once.

    ``planes`` (BH, T, d, r) and ``u`` (BH, T, m) are the nodes' draws, ``sq``
    the squared row norms of ``v`` (float64, or ``None`` for the uniform sampler);
    ``options``: the hash and sort settings of the Triton path;
    ``flags`` (int32, 3): the hash kernel flags non-finite rows of q and k there.
    """
    bh = qf.shape[0]
    kv_of = kv_heads(bh, h, hk, qf.device)
    arrays = layout_arrays(layout, config.block, qf.device)
    rb, cb = layout.row_bounds, layout.col_bounds
    q_starts = [n[0] for n in layout.nodes]
    k_starts = [n[2] for n in layout.nodes]
    flag_q, flag_k = (None, None) if flags is None else (flags[0:1], flags[1:2])
    perm_q = sorted_order(qf, planes, rb, q_starts, arrays, "q", kv_of, h, hk, exact_hash, use_triton, flag_q,
                          options=options)
    perm_k, position = sorted_order(kf, planes, cb, k_starts, arrays, "k", kv_of, h, hk, exact_hash,
                                    use_triton, flag_k, positions=True, options=options)
    if use_triton:
        idx, bias, stag = sample_nodes_triton(sq, u, config.sampler, layout, arrays, position)
    else:
        idx, bias = sample_nodes(sq, u, config.sampler, layout, arrays)
        stag = arrays["ktag"][position.gather(1, idx.reshape(bh, -1)).long()].reshape(idx.shape)
        idx, bias, stag = idx.int().contiguous(), bias.contiguous(), stag.contiguous()
    return Plan(perm_q, perm_k, arrays["lo"], arrays["hi"], arrays["rtag"], idx, bias, stag,
                rb, h, hk, layout, config.block)


@torch.compiler.disable
def _level_plan(draw, nodes, qf, kf, vf, sq, config, h, hk, exact_hash, use_triton, options, flags):
    """Draws and index tensors of the sortLSH piece of ``nodes`` (see :func:`_piece_plan`)."""
    layout = Layout(tuple((n.q0, n.q1, n.k0, n.k1) for n in nodes))
    planes, u = draw(nodes)
    return _piece_plan(qf, kf, vf, layout, planes, u, sq, config, h, hk, exact_hash, use_triton, options, flags)


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, config: HyperConfig | None = None,
                    draws: Draws | None = None, generator: torch.Generator | None = None,
                    return_lse: bool = False, exact_hash: bool = False, backend: str = "triton",
                    kernel_options: KernelOptions | Mapping | None = None,
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HyperAttention on the GPU (``masked`` estimator, ``self`` normalizer).

    Parameters
    ----------
    q : Tensor (B, H, N, D); k, v : Tensor (B, Hk, Nk, D), (B, Hk, Nk, Dv), ``Hk | H``
        bf16, fp16 or fp32 (fp64 for ``backend="dense"``); ``D, Dv ∈ {16, 32, 64, 128, 256}``.
    causal : bool
        Bottom-right aligned (SPEC §1): query ``i`` sees key ``j`` iff ``j <= i + Nk − N``.
    scale : float, optional
        Default ``1/sqrt(D)``.
    config : hyperref.HyperConfig, optional
        Must use ``estimator="masked"``, ``normalizer="self"``; any sampler.
    draws : hyperref.Draws, optional
        The reference's draws (batch shape ``(B, H)``): same draws, same answer
        as :func:`hyperref.hyper_attention` (SPEC §8). Else drawn on the device.
    generator : torch.Generator, optional
        For the device draws.
    return_lse : bool
        Also return ``lse`` (B, H, N), float32, natural log; differentiable.
    exact_hash : bool
        Hash and compute sampling probabilities in float64, exactly as the
        reference does (for cross-checks); default float32.
    backend : {"triton", "dense"}
        ``triton``: the fused kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
        ``dense``: the same function by dense torch operations (small N only).
    kernel_options : hyperref.gpu.KernelOptions or dict, optional
        Tuning switches of the Triton kernels (tiles, loops, who computes the causal
        leaves, the sort); the same function whatever they are. Default: the tuned
        choices. Ignored by ``backend="dense"`` (but still checked).

    Returns
    -------
    out : Tensor (B, H, N, Dv); lse : Tensor (B, H, N), only if ``return_lse``

    Notes
    -----
    Exact attention (the same kernels with one interval per row) when
    ``N <= config.min_seq_len``. The sampling probabilities and the LSH are
    not differentiated (the importance weights are constants); gradients,
    including the ``lse`` path, are those of the estimator for those weights.
    """
    config = HyperConfig() if config is None else config
    if not isinstance(config, HyperConfig):
        raise InputError(f"config must be a hyperref.HyperConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    options = as_kernel_options(kernel_options)
    _check(q, k, v, config, backend)
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("exact_hash", exact_hash)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(f"{name} must be a bool, got {type(flag).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = check_scale(scale, d)  # a finite real number (ValueError otherwise)
    levels, leaves = _nodes(nq, nk, causal, config.min_seq_len)
    # with the Triton hash and row-norm kernels, these flag NaN/Inf in the rows they read (all
    # of v; causal: the rows of q and k no level hashes are reduced here); else one reduction
    fold = (backend == "triton" and b * h and nq > config.min_seq_len and not exact_hash
            and config.sampler != "uniform")
    if fold:
        flags = torch.zeros(3, dtype=torch.int32, device=q.device)
        if causal:
            _flag_unhashed_rows(q, k, flags, levels)
        pending = (["q", "k", "v"], flags)  # 0 where finite; read after the kernels ran
    else:
        flags, pending = None, nonfinite_inputs(input_magnitudes(q, k, v))
    if b * h * nq == 0:  # no query rows: an empty answer (the nonempty k, v are still checked)
        raise_if_flagged(pending)
        out, lse = q.new_zeros((b, h, nq, dv)), q.new_zeros((b, h, nq), dtype=torch.float32)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            # in the graph, so that a backward through it gives zero gradients (sums of no entries)
            tie = sum(t.reshape(-1)[:0].sum() for t in (q, k, v))
            out, lse = out + tie, lse + tie.float()
        return (out, lse) if return_lse else out
    # contiguous here (the kernels read rows with unit column stride; the hash and row-norm
    # kernels run before the attention kernels' own .contiguous())
    qf, kf, vf = (t.reshape(-1, *t.shape[2:]).contiguous() for t in (q, k, v))
    if draws is not None:
        draw = _from_reference_draws(draws, config, nq, nk, d, causal, b, h, q.device)
    else:
        draw = _device_draws(config, b, h, d, q.device, generator)
    pieces = []
    if nq <= config.min_seq_len or causal:
        leaf_len = 0
        if causal:
            lo, hi = leaf_intervals(leaves, nq, q.device)
            if nq == nk and len({(f.q1 - f.q0, f.k1 - f.k0) for f in leaves}) == 1:
                leaf_len = leaves[0].q1 - leaves[0].q0  # equal squares (hyperref.gpu.leaves)
        else:
            lo = torch.zeros(nq, dtype=torch.int32, device=q.device)
            hi = torch.full((nq,), nk, dtype=torch.int32, device=q.device)
        pieces.append(Plan(None, None, lo, hi, None, None, None, None, (0, nq), h, hk, leaf_len=leaf_len))
    if nq > config.min_seq_len:
        sq = None if config.sampler == "uniform" else \
            row_sq_norms(vf, exact_hash, use_triton=backend == "triton", flag=None if flags is None else flags[2:3])
        for nodes in levels:
            # Triton: built when the kernels reach the piece (the host prepares a level while the
            # GPU computes the leaves and the previous levels); the draws keep their order
            build = functools.partial(_level_plan, draw, nodes, qf, kf, vf, sq, config, h, hk, exact_hash,
                                      backend == "triton", options, flags)
            pieces.append(build if backend == "triton" else build())
    if backend == "triton":
        out, lse = pieces_attention(qf, kf, vf, pieces, scale, options)
    else:
        out, lse = pieces_attention_dense(qf, kf, vf, pieces, scale)
    # causal rows i < nq − nk see no key (lse −inf, out 0); in the paper's mode every other
    # row has exact keys, so −inf there means every logit overflowed
    first = max(0, nq - nk) if causal else 0
    raise_if_flagged(result_flag(pending, out, lse.reshape(-1, nq), first))
    out = out.reshape(b, h, nq, dv)
    lse = lse.reshape(b, h, nq)
    return (out, lse) if return_lse else out


def _nodes(nq, nk, causal, n_min):
    """Nodes of each sortLSH piece (the whole matrix beyond ``n_min`` rows, or each level's
    off-diagonal blocks) and the causal leaves (a tuple; empty if not causal)."""
    if not causal:
        return ([[OffDiagonal("", 0, nq, 0, nk)]] if nq > n_min else []), ()
    offdiag, leaves = causal_nodes(nq, nk, n_min)
    levels = defaultdict(list)
    for node in offdiag:
        levels[node.depth].append(node)
    return [sorted(levels[depth], key=lambda n: n.q0) for depth in sorted(levels)], tuple(leaves)


class HyperAttention(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`hyper_attention` (no parameters).

    Examples
    --------
    >>> from hyperref import HyperConfig
    >>> attn = HyperAttention(HyperConfig(min_seq_len=64, block=32, samples=32), causal=True)
    """

    def __init__(self, config: HyperConfig | None = None, *, causal: bool = False,
                 scale: float | None = None, backend: str = "triton",
                 kernel_options: KernelOptions | Mapping | None = None) -> None:
        super().__init__()
        self.config = HyperConfig() if config is None else config
        self.causal, self.scale, self.backend = causal, scale, backend
        self.kernel_options = as_kernel_options(kernel_options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                generator: torch.Generator | None = None,
                return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return hyper_attention(q, k, v, causal=self.causal, scale=self.scale, config=self.config,
                               generator=generator, return_lse=return_lse, backend=self.backend,
                               kernel_options=self.kernel_options)
