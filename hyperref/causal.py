"""Causal HyperAttention by recursion (SPEC §6, Algorithm 4)."""

from __future__ import annotations

import numpy as np

from .config import HyperConfig
from .draws import Draws
from .estimators import noncausal_partial
from .exact import exact_head
from .merge import merge_shifted
from .plan import causal_nodes


def causal_head(q, k, v, scale, config: HyperConfig, draws: Draws):
    """Causal HyperAttention of one head; returns ``(out, lse)``.

    .. math::
        \\mathrm{causal}(Q, K, V) = \\begin{bmatrix}
            \\mathrm{causal}(Q_1, K_1, V_1) \\\\
            \\mathrm{causal}(Q_2, K_2, V_2) \\oplus \\mathrm{hyper}(Q_2, K_1, V_1)
        \\end{bmatrix}

    where ``⊕`` is the LSE merge (:func:`hyperref.merge.merge_shifted`, exponents combined before
    the answer ``o·e^s`` is formed),
    which for ``approxd`` is the same as adding un-normalized sums and
    normalizers. Leaves (``nq <= min_seq_len``) are exact. The split points
    are those of :func:`hyperref.plan.causal_nodes` (bottom-right causal
    alignment, odd lengths and ``nq != nk`` included).
    """
    nq, dv = len(q), v.shape[1]
    out = np.zeros((nq, dv), dtype=v.dtype)
    lse = np.full(nq, -np.inf, dtype=v.dtype)
    offdiag, leaves = causal_nodes(nq, len(k), config.min_seq_len)
    for leaf in leaves:
        out[leaf.q0:leaf.q1], lse[leaf.q0:leaf.q1] = exact_head(
            q[leaf.q0:leaf.q1], k[leaf.k0:leaf.k1], v[leaf.k0:leaf.k1], scale, causal=True)
    shift = np.zeros(nq, dtype=lse.dtype)  # the answer is out · e^shift (approxd; 0 for self)
    for node in offdiag:
        o2, l2, shift2 = noncausal_partial(q[node.q0:node.q1], k[node.k0:node.k1], v[node.k0:node.k1],
                                           scale, config, draws.blocks[node.path])
        rows = slice(node.q0, node.q1)
        out[rows], lse[rows], merged = merge_shifted(out[rows], lse[rows], shift[rows], o2, l2, shift2)
        if config.normalizer == "approxd":  # self: the shift is 0 (up to the rounding of lse)
            shift[rows] = merged
    if config.normalizer == "approxd":
        with np.errstate(over="ignore", invalid="ignore"):  # beyond the range: inf, honestly
            scaled = out * np.exp(shift)[:, None].astype(v.dtype)
        out = np.where(out == 0, out, scaled)
    return out, lse
