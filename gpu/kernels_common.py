"""Pieces shared by the Triton kernel families of the GPU path.

The families: :mod:`~hyperref.gpu.kernels_forward` (attention over per-row key
intervals plus sampled keys), :mod:`~hyperref.gpu.kernels_backward` (its gradients),
:mod:`~hyperref.gpu.kernels_sort` (the sortLSH hash and the counting sort) and
:mod:`~hyperref.gpu.kernels_sample` (row norms and the inverse-CDF samples). Shared
here: the base-2 constants, the grouped-query head map and the non-finite flag.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # for the launchers (Python floats)
NEG = tl.constexpr(-1.0e30)  # "masked" logit; finite, so fully masked tiles give no NaN
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _kv_head(bh, H, HK, G):
    return (bh // H) * HK + (bh % H) // G


@triton.jit
def _flag_nonfinite(FLAG, x):
    """Set ``FLAG[0] = 1`` if the tile ``x`` holds a NaN or ±Inf (the input check, folded into
    a kernel that reads every row anyway)."""
    bad = tl.zeros([1], tl.int32) + tl.sum(tl.where((x == x) & (tl.abs(x) < float("inf")), 0, 1))
    tl.store(FLAG + tl.arange(0, 1), tl.full([1], 1, tl.int32), mask=bad > 0)
