"""Public GPU API: ``hyper_attention`` and the ``HyperAttention`` module (torch SDPA layout)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from hyperref.config import HyperConfig
from hyperref.draws import Draws
from hyperref.plan import causal_nodes

from .function import Plan, interval_attention, interval_attention_dense
from .structure import leaf_intervals, lsh_intervals, lsh_sort, sample_keys

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
BACKENDS = ("triton", "dense")


def _check(q, k, v, config, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = DTYPES + ((torch.float64,) if backend == "dense" else ())
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} is not supported; use one of {allowed}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    (b, h, nq, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: {b}, {bk}, {bv}")
    if hk != hv or hk == 0 or h % hk:
        raise ValueError(f"key/value heads ({hk}, {hv}) must be equal and divide query heads ({h})")
    if d != dk or nk != nv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if backend == "triton" and (d not in HEAD_DIMS or dv not in HEAD_DIMS):
        raise ValueError(f"head dims must be one of {HEAD_DIMS} for the Triton kernels, got d={d}, dv={dv}")
    if nk == 0 and nq > 0:
        raise ValueError("k and v are empty: attention needs at least one key")
    if config.estimator != "masked" or config.normalizer != "self":
        raise ValueError("the GPU path implements estimator='masked' with normalizer='self'; "
                         "use hyperref (the NumPy reference) for the others")
    # one device sync for all three: amax/amin propagate NaN and show ±Inf
    tensors = [(name, t) for name, t in (("q", q), ("k", k), ("v", v)) if t.numel()]
    if tensors:
        extremes = torch.stack([torch.stack(torch.aminmax(t)).float() for _, t in tensors])
        finite = torch.isfinite(extremes).all(dim=1).tolist()
        for (name, _), ok in zip(tensors, finite):
            if not ok:
                raise ValueError(f"{name} contains NaN or Inf")


def _device_draws(config, nq, nk, d, causal, b, h, device, generator):
    """Draw the LSH planes and sample uniforms on the device: {path: (planes, u)}."""
    paths = []
    if nq > config.min_seq_len and nk > 0:
        if causal:
            paths = [(n.path) for n in causal_nodes(nq, nk, config.min_seq_len)[0]]
        else:
            paths = [""]
    out = {}
    for path in paths:
        planes = torch.randn((b * h, d, config.bits), device=device, generator=generator)
        u = torch.rand((b * h, config.samples), device=device, generator=generator, dtype=torch.float64)
        out[path] = (planes, u)
    return out


def _from_reference_draws(draws: Draws, config, nq, nk, d, causal, b, h, device):
    if not isinstance(draws, Draws):
        raise TypeError(f"draws must be a hyperref.Draws, got {type(draws).__name__}")
    if (draws.nq, draws.nk, draws.d, draws.causal) != (nq, nk, d, bool(causal)) or \
            tuple(draws.batch_shape) != (b, h) or draws.config != config:
        raise ValueError("draws were made for another shape, causality or config")
    return {path: (torch.as_tensor(np.asarray(bd.lsh_planes).reshape(b * h, d, -1), device=device),
                   torch.as_tensor(np.asarray(bd.sample_u).reshape(b * h, -1), device=device))
            for path, bd in draws.blocks.items()}


def _lsh_plan(qf, kf, vf, planes, u, config, b, h, hk, exact_hash):
    """Index tensors of a non-causal sortLSH piece over flattened heads (SPEC §3, §5)."""
    bh, nq, d = qf.shape
    nk = kf.shape[1]
    group = h // hk
    heads = torch.arange(bh, device=qf.device)
    kv_of = (heads // h) * hk + (heads % h) // group
    perm_q = lsh_sort(qf, planes, exact_hash)
    perm_k = lsh_sort(kf if group == 1 else kf[kv_of], planes, exact_hash)
    lo, hi, rtag = lsh_intervals(nq, nk, config.block, qf.device)
    idx, bias = sample_keys(vf, u, kv_of, config.sampler, exact_hash)
    position = torch.empty_like(perm_k)
    position.scatter_(1, perm_k, torch.arange(nk, device=qf.device).expand(bh, nk))
    stag = (position.gather(1, idx) // config.block).int()
    return Plan(perm_q.int().contiguous(), perm_k.int().contiguous(), lo, hi, rtag,
                idx.int().contiguous(), bias.contiguous(), stag.contiguous(), h, hk)


def _merge(o1, l1, o2, l2):
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


def hyper_attention(q, k, v, *, causal=False, scale=None, config=None, draws=None, generator=None,
                    return_lse=False, exact_hash=False, backend="triton"):
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
        raise TypeError(f"config must be a hyperref.HyperConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, k, v, config, backend)
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if nq == 0:
        out = q.new_zeros((b, h, 0, dv))
        return (out, q.new_zeros((b, h, 0), dtype=torch.float32)) if return_lse else out
    fn = interval_attention if backend == "triton" else interval_attention_dense
    qf, kf, vf = q.reshape(b * h, nq, d), k.reshape(b * hk, nk, d), v.reshape(b * hk, nk, dv)
    if draws is not None:
        dev_draws = _from_reference_draws(draws, config, nq, nk, d, causal, b, h, q.device)
    else:
        dev_draws = _device_draws(config, nq, nk, d, causal, b, h, q.device, generator)

    if nq <= config.min_seq_len or causal:
        leaves = causal_nodes(nq, nk, config.min_seq_len)[1] if causal else None
        if causal:
            lo, hi = leaf_intervals(tuple(leaves), nq, q.device)
        else:
            lo = torch.zeros(nq, dtype=torch.int32, device=q.device)
            hi = torch.full((nq,), nk, dtype=torch.int32, device=q.device)
        out, lse = fn(qf, kf, vf, Plan(None, None, lo, hi, None, None, None, None, h, hk), scale)
    if nq > config.min_seq_len and not causal:
        planes, u = dev_draws[""]
        out, lse = fn(qf, kf, vf, _lsh_plan(qf, kf, vf, planes, u, config, b, h, hk, exact_hash), scale)
    elif nq > config.min_seq_len:
        out, lse = _causal_offdiag(qf, kf, vf, out, lse, dev_draws, config, b, h, hk,
                                   scale, exact_hash, fn)
    out = out.reshape(b, h, nq, dv)
    lse = lse.reshape(b, h, nq)
    return (out, lse) if return_lse else out


def _causal_offdiag(qf, kf, vf, out, lse, dev_draws, config, b, h, hk, scale, exact_hash, fn):
    """Add the off-diagonal blocks of the recursion (SPEC §6), one launch per level and shape."""
    nq, nk = qf.shape[1], kf.shape[1]
    offdiag, _ = causal_nodes(nq, nk, config.min_seq_len)
    groups = defaultdict(list)
    for node in offdiag:
        groups[(node.depth, node.nq, node.nk)].append(node)
    levels = defaultdict(list)
    for (depth, nqn, nkn), nodes in sorted(groups.items()):
        qg = torch.cat([qf[:, n.q0:n.q1] for n in nodes], dim=0)
        kg = torch.cat([kf[:, n.k0:n.k1] for n in nodes], dim=0)
        vg = torch.cat([vf[:, n.k0:n.k1] for n in nodes], dim=0)
        planes = torch.cat([dev_draws[n.path][0] for n in nodes], dim=0)
        u = torch.cat([dev_draws[n.path][1] for n in nodes], dim=0)
        og, lg = fn(qg, kg, vg, _lsh_plan(qg, kg, vg, planes, u, config, b * len(nodes), h, hk,
                                          exact_hash), scale)
        bh = qf.shape[0]
        for i, n in enumerate(nodes):
            levels[depth].append((n.q0, n.q1, og[i * bh:(i + 1) * bh], lg[i * bh:(i + 1) * bh]))
    for depth in sorted(levels):
        pieces = sorted(levels[depth], key=lambda t: t[0])
        o_parts, l_parts, cursor = [], [], 0
        for q0, q1, o, l in pieces:
            if q0 > cursor:
                o_parts.append(out.new_zeros((out.shape[0], q0 - cursor, out.shape[2])))
                l_parts.append(lse.new_full((lse.shape[0], q0 - cursor), float("-inf")))
            o_parts.append(o)
            l_parts.append(l)
            cursor = q1
        if cursor < nq:
            o_parts.append(out.new_zeros((out.shape[0], nq - cursor, out.shape[2])))
            l_parts.append(lse.new_full((lse.shape[0], nq - cursor), float("-inf")))
        out, lse = _merge(out, lse, torch.cat(o_parts, dim=1), torch.cat(l_parts, dim=1))
    return out, lse


class HyperAttention(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`hyper_attention` (no parameters).

    Examples
    --------
    >>> from hyperref import HyperConfig
    >>> attn = HyperAttention(HyperConfig(min_seq_len=64, block=32, samples=32), causal=True)
    """

    def __init__(self, config=None, *, causal=False, scale=None, backend="triton"):
        super().__init__()
        self.config = HyperConfig() if config is None else config
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q, k, v, *, generator=None, return_lse=False):
        return hyper_attention(q, k, v, causal=self.causal, scale=self.scale, config=self.config,
                               generator=generator, return_lse=return_lse, backend=self.backend)
