"""Hashing, sorting, intervals and samples in torch (mirrors hyperref.lsh/mask/sampling)."""

from __future__ import annotations

from functools import lru_cache

import torch


def gray_inverse(code: torch.Tensor) -> torch.Tensor:
    """Rank of ``code`` in Gray order (SPEC §3): ``t = c ⊕ (c≫1) ⊕ (c≫2) ⊕ …``."""
    t = code.clone()
    shift = 1
    while shift < 32:
        t ^= t >> shift
        shift *= 2
    return t


def lsh_sort(x: torch.Tensor, planes: torch.Tensor, exact_hash: bool) -> torch.Tensor:
    """Stable sort order of the rows of ``x`` (BH, n, d) by bucket ``gray⁻¹(c(x))``.

    ``planes`` is (BH, d, r). With ``exact_hash`` the projections are computed in
    float64 (a head at a time), as the reference does; else in float32.
    """
    r = planes.shape[-1]
    weights = (1 << torch.arange(r, device=x.device, dtype=torch.int64))
    if exact_hash:
        bits = torch.stack([(x[h].double() @ planes[h].double()) > 0 for h in range(x.shape[0])])
    else:
        bits = torch.matmul(x, planes.to(x.dtype)) > 0  # in the input dtype: no upcast copy
    codes = (bits.long() * weights).sum(-1)  # integer matmul is not implemented on CUDA
    bucket = gray_inverse(codes)
    n = x.shape[1]
    if r + max(1, (n - 1).bit_length()) <= 31:
        # unique int32 keys bucket·n + index: an unstable radix sort gives the stable order
        key = (bucket * n + torch.arange(n, device=x.device)).int()
        return torch.sort(key, dim=-1).values.long() % n
    return torch.argsort(bucket, dim=-1, stable=True)


@lru_cache(maxsize=64)
def lsh_intervals(nq: int, nk: int, block: int, device):
    """Per sorted row ``p``: key interval ``[lo, hi)`` of its block and its block tag (int32)."""
    n_blocks = -(-nk // block)
    p = torch.arange(nq, device=device, dtype=torch.int64)
    g = torch.clamp((p * nk) // (nq * block), max=n_blocks - 1)
    lo = g * block
    hi = torch.clamp(lo + block, max=nk)
    return lo.int(), hi.int(), g.int()


@lru_cache(maxsize=64)
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


def sample_keys(v: torch.Tensor, u: torch.Tensor, kv_of: torch.Tensor, sampler: str, exact: bool):
    """Indices and log-weights ``−log(m p_j)`` of the sampled keys (SPEC §5).

    ``v`` is (B·Hk, nk, dv), ``u`` (BH, m) uniforms, ``kv_of`` (BH,) the kv head of
    each query head. Probabilities are computed from ``v`` detached: the
    importance weights are constants for autograd.
    """
    nk = v.shape[1]
    m = u.shape[1]
    uniform = torch.full((v.shape[0], nk), 1.0 / nk, device=v.device, dtype=torch.float64)
    if sampler == "uniform":
        p = uniform
    else:
        vd = v.detach()
        if exact:
            sq = (vd.double() ** 2).sum(-1)
        else:
            acc = torch.float64 if vd.dtype == torch.float64 else torch.float32
            sq = torch.linalg.vector_norm(vd, dim=-1, dtype=acc).double() ** 2
        total = sq.sum(-1, keepdim=True)
        rownorm = torch.where(total > 0, sq / torch.where(total > 0, total, 1.0), uniform)
        p = rownorm if sampler == "rownorm" else 0.5 * rownorm + 0.5 * uniform
    p = p[kv_of]
    cdf = torch.cumsum(p, dim=-1)
    idx = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True)
    positive = p > 0
    last = nk - 1 - torch.argmax(positive.flip(-1).int(), dim=-1, keepdim=True)
    idx = torch.minimum(idx, last)
    log_w = -torch.log(m * p.gather(1, idx))
    return idx, log_w.float()
