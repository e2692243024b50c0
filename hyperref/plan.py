"""Geometry of the causal recursion (SPEC §6, Algorithm 4), shared by all engines.

Causal convention (SPEC §1): query ``i`` sees key ``j`` iff
``j <= i + (nk - nq)`` (bottom-right aligned, as FlashAttention >= 2.1).

A node of the recursion covers query rows ``[q0, q1)`` and key rows
``[k0, k1)`` with the same alignment ``(k1 - k0) - (q1 - q0) = offset``. If the
node has ``nq <= n_min`` rows (or no keys) it is a leaf, computed exactly.
Otherwise the rows split at ``qm = nq // 2`` and the keys at
``km = clip(qm + offset, 0, nk)``:

* rows ``[0, qm)`` see only keys ``[0, km)`` — child ``path + "0"``;
* rows ``[qm, nq)`` see keys ``[km, nk)`` causally — child ``path + "1"`` —
  and **all** keys ``[0, km)`` — the non-causal off-diagonal block, which
  HyperAttention approximates and which carries the draws of node ``path``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OffDiagonal:
    """One non-causal off-diagonal block of the recursion.

    ``path`` names it ("" is the root split, then "0"/"1" for first/second half),
    ``depth`` is ``len(path)``; rows ``[q0, q1)`` attend to keys ``[k0, k1)``.
    """

    path: str
    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def depth(self) -> int:
        return len(self.path)

    @property
    def nq(self) -> int:
        return self.q1 - self.q0

    @property
    def nk(self) -> int:
        return self.k1 - self.k0


@dataclass(frozen=True)
class Leaf:
    """A leaf: exact causal attention of rows ``[q0, q1)`` on keys ``[k0, k1)``."""

    path: str
    q0: int
    q1: int
    k0: int
    k1: int


def split(nq: int, nk: int) -> tuple[int, int]:
    """Return the split ``(qm, km)`` of a causal node with ``nq`` rows and ``nk`` keys."""
    qm = nq // 2
    km = min(max(qm + (nk - nq), 0), nk)
    return qm, km


def causal_nodes(nq: int, nk: int, n_min: int) -> tuple[list[OffDiagonal], list[Leaf]]:
    """All off-diagonal blocks and leaves of the causal recursion, in pre-order.

    Parameters
    ----------
    nq, nk : int
        Query and key lengths of the root.
    n_min : int
        Leaf size: a node with ``nq <= n_min`` rows is computed exactly.

    Returns
    -------
    offdiag : list of OffDiagonal
        Blocks approximated by non-causal HyperAttention (absolute row ranges).
    leaves : list of Leaf
        Blocks computed by exact causal attention; leaves with no keys are
        included (their rows see nothing: output 0, ``lse = -inf``).

    Examples
    --------
    >>> off, leaves = causal_nodes(8, 8, 2)
    >>> [(o.path, o.q0, o.q1, o.k0, o.k1) for o in off]
    [('', 4, 8, 0, 4), ('0', 2, 4, 0, 2), ('1', 6, 8, 4, 6)]
    """
    offdiag: list[OffDiagonal] = []
    leaves: list[Leaf] = []

    def visit(path: str, q0: int, q1: int, k0: int, k1: int) -> None:
        nq_, nk_ = q1 - q0, k1 - k0
        if nq_ <= n_min or nk_ == 0:
            leaves.append(Leaf(path, q0, q1, k0, k1))
            return
        qm, km = split(nq_, nk_)
        if km > 0:
            offdiag.append(OffDiagonal(path, q0 + qm, q1, k0, k0 + km))
        visit(path + "0", q0, q0 + qm, k0, k0 + km)
        visit(path + "1", q0 + qm, q1, k0 + km, k1)

    if nq > 0:
        visit("", 0, nq, 0, nk)
    return offdiag, leaves
