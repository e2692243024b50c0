"""The sortLSH block structure and its mask ``M`` (SPEC §3, Algorithm 1).

The mask is never formed as an ``nq × nk`` array (except by
:func:`dense_mask`, for tests): it is held as index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lsh import buckets


@dataclass(frozen=True)
class BlockStructure:
    """Sorted orders and block memberships of queries and keys.

    Attributes
    ----------
    perm_q : ndarray of int64, shape (nq,)
        Query indices in sorted order (stable sort by bucket, ties by index).
    perm_k : ndarray of int64, shape (nk,)
        Key indices in sorted order.
    q_block : ndarray of int64, shape (nq,)
        Block of each query, indexed by original query index.
    k_block : ndarray of int64, shape (nk,)
        Block of each key, indexed by original key index.
    q_starts : ndarray of int64, shape (G + 1,)
        Sorted queries of block ``g`` are ``perm_q[q_starts[g]:q_starts[g+1]]``.
    block : int
        Key block size ``b``; sorted keys of block ``g`` are
        ``perm_k[g*b : min((g+1)*b, nk)]``.
    """

    perm_q: np.ndarray
    perm_k: np.ndarray
    q_block: np.ndarray
    k_block: np.ndarray
    q_starts: np.ndarray
    block: int

    @property
    def n_blocks(self) -> int:
        return len(self.q_starts) - 1

    def block_queries(self, g: int) -> np.ndarray:
        """Original indices of the queries in block ``g``."""
        return self.perm_q[self.q_starts[g]:self.q_starts[g + 1]]

    def block_keys(self, g: int) -> np.ndarray:
        """Original indices of the keys in block ``g``."""
        return self.perm_k[g * self.block:(g + 1) * self.block]


def query_blocks(nq: int, nk: int, block: int) -> np.ndarray:
    """Block of the query at each sorted position ``p``.

    .. math:: g(p) = \\min(\\lfloor p\\, n_k / (n_q b) \\rfloor,\\ G - 1),
              \\quad G = \\lceil n_k / b \\rceil
    """
    block = min(block, max(nk, 1))  # one block holds every key; keeps nq·block in int64
    n_blocks = -(-nk // block)
    p = np.arange(nq, dtype=np.int64)
    return np.minimum((p * nk) // (nq * block), n_blocks - 1)


def block_structure(q: np.ndarray, k: np.ndarray, planes: np.ndarray, block: int) -> BlockStructure:
    """Hash, sort and cut into blocks (SPEC §3).

    Parameters
    ----------
    q : ndarray, shape (nq, d)
    k : ndarray, shape (nk, d), ``nk >= 1``
    planes : ndarray, shape (d, r)
        The LSH projections of the draws.
    block : int
        Key block size ``b``.

    Returns
    -------
    BlockStructure
    """
    nq, nk = len(q), len(k)
    block = min(block, max(nk, 1))  # a block beyond nk is one block of every key
    perm_q = np.argsort(buckets(q, planes), kind="stable")
    perm_k = np.argsort(buckets(k, planes), kind="stable")
    sorted_q_block = query_blocks(nq, nk, block)
    q_block = np.empty(nq, dtype=np.int64)
    q_block[perm_q] = sorted_q_block
    k_block = np.empty(nk, dtype=np.int64)
    k_block[perm_k] = np.arange(nk, dtype=np.int64) // block
    n_blocks = -(-nk // block)
    q_starts = np.searchsorted(sorted_q_block, np.arange(n_blocks + 1), side="left")
    return BlockStructure(perm_q, perm_k, q_block, k_block, q_starts.astype(np.int64), block)


def dense_mask(structure: BlockStructure) -> np.ndarray:
    """The mask ``M_ij = [block(q_i) == block(k_j)]`` as a dense boolean array (tests only)."""
    return structure.q_block[:, None] == structure.k_block[None, :]


class HeavyMask:
    """The mask ``M`` of the entries a HyperAttention call computes exactly.

    Non-causal: the sortLSH block mask (SPEC §3). Causal: the union over the
    recursion (SPEC §6) of the exact leaves and the block masks of every
    off-diagonal block. Rows are produced on demand, a row range at a time,
    so the mask is never held as an ``nq × nk`` array.

    Parameters
    ----------
    nq, nk : int
    leaves : list of (q0, q1, k0, k1)
        Key ranges computed exactly for row ranges.
    blocks : list of (q0, k0, BlockStructure)
        Off-diagonal blocks with their structure (relative indices).
    """

    def __init__(self, nq: int, nk: int, leaves=(), blocks=()):
        self.nq, self.nk = nq, nk
        self.leaves = list(leaves)
        self.blocks = list(blocks)

    @classmethod
    def noncausal(cls, structure: BlockStructure) -> "HeavyMask":
        return cls(len(structure.q_block), len(structure.k_block), (), [(0, 0, structure)])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Boolean mask rows ``[start, stop)``, shape ``(stop − start, nk)``."""
        out = np.zeros((stop - start, self.nk), dtype=bool)
        for q0, q1, k0, k1 in self.leaves:
            lo, hi = max(start, q0), min(stop, q1)
            if lo < hi:
                out[lo - start:hi - start, k0:k1] = True
        for q0, k0, st in self.blocks:
            lo, hi = max(start, q0), min(stop, q0 + len(st.q_block))
            if lo < hi:
                qb = st.q_block[lo - q0:hi - q0]
                out[lo - start:hi - start, k0:k0 + len(st.k_block)] |= (
                    qb[:, None] == st.k_block[None, :])
        return out

    def nnz(self) -> int:
        """Number of ones (computed a row block at a time)."""
        step = max(1, 2**24 // max(1, self.nk))
        return int(sum(self.rows(s, min(self.nq, s + step)).sum()
                       for s in range(0, self.nq, step)))
