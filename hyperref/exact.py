"""Exact attention, computed in row blocks (SPEC §1).

Memory is ``O(chunk · nk)`` for the logits of one row block, never
``O(nq · nk)``: at ``n = 65536, d = 64`` float64 the working set stays near
``max_block_bytes`` (64 MiB by default).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .merge import partial_softmax

#: bytes of the logits of one row block
DEFAULT_BLOCK_BYTES = 64 * 2**20


def row_chunk(nk: int, itemsize: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Number of rows whose ``rows × nk`` logits fit in ``max_block_bytes``."""
    return max(1, max_block_bytes // max(1, nk * itemsize * 2))


def scaled_logits(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """``scale · q kᵀ`` in the dtype of ``q``, recomputed wider where it overflows.

    Finite inputs can have logits beyond the dtype's range (float32 entries of
    1e19); the answer is still a convex combination of value rows, so the block
    is recomputed in float64 and, if that overflows too, in ``np.longdouble``,
    and returned in the widest type needed (callers keep the output's dtype).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        logits = (q @ k.T) * q.dtype.type(scale)
        for wider in (np.float64, np.longdouble):
            if np.isfinite(logits).all():
                break
            if np.dtype(wider).itemsize > logits.dtype.itemsize:
                logits = (q.astype(wider) @ k.T.astype(wider)) * wider(scale)
    return logits


def causal_logit_mask(rows: np.ndarray, nk: int, offset: int) -> np.ndarray:
    """Boolean ``(len(rows), nk)``: True where key ``j`` is *hidden* from row ``i``.

    Query ``i`` sees key ``j`` iff ``j <= i + offset`` with ``offset = nk − nq``.
    """
    return np.arange(nk)[None, :] > (rows[:, None] + offset)


def logit_blocks(q: np.ndarray, k: np.ndarray, scale: float, *, causal: bool = False,
                 max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, logits)`` row blocks of ``S = scale · QKᵀ``.

    Causally hidden entries are ``-inf``. Used by exact attention and by the
    parameters in :mod:`hyperref.theory.parameters`.
    """
    nq, nk = len(q), len(k)
    chunk = row_chunk(nk, q.dtype.itemsize, max_block_bytes)
    offset = nk - nq
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        logits = scaled_logits(q[start:stop], k, scale)
        if causal:
            logits[causal_logit_mask(np.arange(start, stop), nk, offset)] = -np.inf
        yield start, stop, logits


def exact_head(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool = False,
               max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact softmax attention of one head; returns ``(out, lse)``.

    .. math:: \\mathrm{Att} = D^{-1} A V,\\quad A = e^{s QK^\\top},\\quad
              \\mathrm{lse}_i = \\log d_i

    Rows that see no key (causal with ``nq > nk``) get ``out = 0`` and
    ``lse = −∞``.
    """
    nq, dv = len(q), v.shape[1]
    out = np.zeros((nq, dv), dtype=v.dtype)
    lse = np.full(nq, -np.inf, dtype=v.dtype)
    if len(k) == 0:
        return out, lse
    if not causal:
        for start, stop, logits in logit_blocks(q, k, scale, max_block_bytes=max_block_bytes):
            out[start:stop], lse[start:stop] = partial_softmax(logits, v)
        return out, lse
    # causal: a row block needs only the keys its last row sees
    nk = len(k)
    offset = nk - nq
    chunk = row_chunk(nk, q.dtype.itemsize, max_block_bytes)
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        kend = min(nk, stop - 1 + offset + 1)
        if kend <= 0:
            continue  # these rows see no key: out 0, lse -inf
        logits = scaled_logits(q[start:stop], k[:kend], scale)
        logits[causal_logit_mask(np.arange(start, stop), kend, offset)] = -np.inf
        out[start:stop], lse[start:stop] = partial_softmax(logits, v[:kend])
    return out, lse
