"""All randomness of HyperAttention, drawn up front into one frozen record (SPEC §8).

Every engine (NumPy, Numba, torch, Triton) is a deterministic function of
``(inputs, draws)``. The draws depend only on the *shapes* of the problem and
the configuration, never on the data: the data-dependent sample indices
``j_t`` are obtained from the uniforms ``sample_u`` by the inverse CDF of the
sampling distribution (:func:`hyperref.sampling.resolve_samples`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ._validation import InputError, check_bool, check_config, check_count
from .config import HyperConfig
from .plan import causal_nodes


@dataclass(frozen=True)
class BlockDraws:
    """Draws of one non-causal HyperAttention call, for every head at once.

    Arrays carry the leading ``batch_shape`` (``()`` for one head, ``(B, H)``
    for batched input).

    Attributes
    ----------
    lsh_planes : ndarray, shape ``batch_shape + (d, r)``
        Gaussian projections ``W`` of the angular LSH (SPEC §3).
    approxd_rows : ndarray of int64, shape ``batch_shape + (m_d',)``
        Rows ``T`` of ApproxD, uniform without replacement, ``m_d' = min(m_d, nq)``.
    approxd_cols : ndarray of int64, shape ``batch_shape + (m_d,)``
        Keys ``ℓ_t`` of ApproxD, i.i.d. uniform on ``[nk]``.
    sample_u : ndarray of float64, shape ``batch_shape + (m,)``
        Uniforms on ``[0, 1)`` that select the ``m`` sampled keys.
    nq, nk : int
        Query and key lengths of the block these draws were made for.
    """

    lsh_planes: np.ndarray
    approxd_rows: np.ndarray
    approxd_cols: np.ndarray
    sample_u: np.ndarray
    nq: int
    nk: int

    def head(self, index: tuple) -> "BlockDraws":
        """The draws of one head, ``index`` into the batch shape."""
        return BlockDraws(
            self.lsh_planes[index],
            self.approxd_rows[index],
            self.approxd_cols[index],
            self.sample_u[index],
            self.nq,
            self.nk,
        )


@dataclass(frozen=True)
class DirectDraws:
    """Draws of one call in the direct mode (SPEC §6b), for every head at once.

    Attributes
    ----------
    exact : tuple
        One entry per part of the exact set: its random array with leading
        ``batch_shape`` (for ``sortlsh``: the projections, ``(rounds, d, bits)``
        per head), or ``None`` for deterministic parts.
    sample_u : ndarray of float64, shape ``batch_shape + (T, m)``
        Uniforms on ``[0, 1)`` selecting the ``m`` sampled keys of each of the
        ``T = ⌈nq / query_block⌉`` query blocks.
    """

    exact: tuple
    sample_u: np.ndarray

    def head(self, index: tuple) -> "DirectDraws":
        """The draws of one head, ``index`` into the batch shape."""
        return DirectDraws(tuple(None if a is None else a[index] for a in self.exact),
                           self.sample_u[index])


@dataclass(frozen=True)
class Draws:
    """The frozen record of all random choices of one HyperAttention call.

    Attributes
    ----------
    nq, nk, d : int
        Shapes the draws were made for.
    causal : bool
        Whether the call is causal.
    batch_shape : tuple of int
        ``()`` or ``(B, H)``.
    config : HyperConfig
        The configuration the draws were made for.
    blocks : mapping of str to BlockDraws
        Non-causal: one entry, ``""``. Causal: one entry per off-diagonal
        block of the recursion, keyed by its path (:mod:`hyperref.plan`).
        Empty when the call is computed exactly (``nq <= min_seq_len``) or in
        the direct mode.
    direct : DirectDraws or None
        The draws of the direct mode (``config.mode == "direct"``), ``None``
        otherwise or when the call is computed exactly.
    """

    nq: int
    nk: int
    d: int
    causal: bool
    batch_shape: tuple
    config: HyperConfig
    blocks: Mapping[str, BlockDraws] = field(default_factory=dict)
    direct: DirectDraws | None = None

    def head(self, index: tuple) -> "Draws":
        """The draws of one head (``batch_shape`` becomes ``()``)."""
        return Draws(
            self.nq, self.nk, self.d, self.causal, (), self.config,
            {path: blk.head(index) for path, blk in self.blocks.items()},
            None if self.direct is None else self.direct.head(index),
        )


def as_generator(rng) -> np.random.Generator:
    """:func:`numpy.random.default_rng` of ``rng``, with an :class:`InputError` naming ``rng``."""
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as err:
        raise InputError(f"rng must be None, an integer >= 0 or a numpy Generator, got {rng!r} ({err})") from None


def _block_draws(nq, nk, d, batch_shape, config, rng) -> BlockDraws:
    planes = rng.standard_normal(batch_shape + (d, config.bits))
    n_rows = min(config.approxd_samples, nq)
    heads = int(np.prod(batch_shape, dtype=np.int64))
    rows = np.empty((heads, n_rows), dtype=np.int64)
    for h in range(heads):
        rows[h] = rng.choice(nq, size=n_rows, replace=False)
    cols = rng.integers(0, nk, size=batch_shape + (config.approxd_samples,), dtype=np.int64)
    u = rng.random(batch_shape + (config.samples,))
    return BlockDraws(planes, rows.reshape(batch_shape + (n_rows,)), cols, u, nq, nk)


def make_draws(
    config: HyperConfig,
    nq: int,
    nk: int,
    d: int,
    *,
    causal: bool = False,
    batch_shape: tuple = (),
    rng=None,
) -> Draws:
    """Draw every random choice of one HyperAttention call up front.

    Parameters
    ----------
    config : HyperConfig
    nq, nk, d : int
        Query length, key length, head dimension.
    causal : bool
        Draw for the causal recursion (one :class:`BlockDraws` per
        off-diagonal block) instead of one non-causal call.
    batch_shape : tuple of int
        ``()`` for a single head, ``(B, H)`` for batched input (H query heads).
    rng : None, int or numpy.random.Generator
        Source of randomness, normalized by :func:`numpy.random.default_rng`.

    Returns
    -------
    Draws

    Examples
    --------
    >>> dr = make_draws(HyperConfig(min_seq_len=4, block=2, samples=3), 8, 8, 4, rng=0)
    >>> dr.blocks[""].sample_u.shape
    (3,)
    """
    config = check_config(config)
    nq, nk, d = check_count(nq, "nq"), check_count(nk, "nk"), check_count(d, "d", least=1)
    causal = check_bool(causal, "causal")
    if isinstance(batch_shape, (str, bytes)) or not hasattr(batch_shape, "__iter__"):
        raise InputError(f"batch_shape must be a tuple of ints, got {batch_shape!r}")
    batch_shape = tuple(check_count(s, "each batch_shape entry") for s in batch_shape)
    rng = as_generator(rng)
    blocks: dict[str, BlockDraws] = {}
    direct = None
    if nq > config.min_seq_len and nk > 0 and config.mode == "direct":
        from .direct import n_query_blocks, paper_exact_set
        from .exact_set import Geometry

        exact = paper_exact_set(config).draw(Geometry(nq, nk, causal), d, batch_shape, rng)
        u = rng.random(batch_shape + (n_query_blocks(nq, config.query_block), config.samples))
        direct = DirectDraws(exact, u)
    elif nq > config.min_seq_len and nk > 0:
        if causal:
            offdiag, _ = causal_nodes(nq, nk, config.min_seq_len)
            for node in offdiag:
                blocks[node.path] = _block_draws(node.nq, node.nk, d, batch_shape, config, rng)
        else:
            blocks[""] = _block_draws(nq, nk, d, batch_shape, config, rng)
    return Draws(nq, nk, d, bool(causal), batch_shape, config, blocks, direct)


def _check_array(name: str, got, want: np.ndarray, *, low=None, high=None, unit=False) -> None:
    """``got`` has ``want``'s shape and kind; integer entries in ``[low, high)``; uniforms in ``[0, 1)``."""
    if not isinstance(got, np.ndarray) or got.shape != want.shape or got.dtype.kind != want.dtype.kind:
        shape = getattr(got, "shape", None)
        raise InputError(f"draws: {name} must be an array of shape {want.shape} and kind "
                         f"'{want.dtype.kind}', got {type(got).__name__} of shape {shape}")
    if unit and got.size and not ((got >= 0) & (got < 1)).all():
        raise InputError(f"draws: {name} must hold uniforms in [0, 1)")
    if low is not None and got.size and not ((got >= low) & (got < high)).all():
        raise InputError(f"draws: {name} must hold indices in [{low}, {high})")


def check_draws_contents(draws: Draws) -> None:
    """Raise :class:`InputError` unless ``draws`` has the structure and ranges :func:`make_draws` gives.

    Hand-built draws are public values: their arrays must have the shapes of the
    draws the call would make, their uniforms must lie in ``[0, 1)`` and their
    indices in range, or engines would read out of bounds or silently mis-sample.
    """
    skeleton = make_draws(draws.config, draws.nq, draws.nk, draws.d, causal=draws.causal,
                          batch_shape=tuple(draws.batch_shape), rng=0)
    blocks = draws.blocks if isinstance(draws.blocks, Mapping) else None
    if blocks is None or set(blocks) != set(skeleton.blocks):
        raise InputError(f"draws: blocks must be keyed {sorted(skeleton.blocks)}, "
                         f"got {sorted(blocks) if blocks is not None else type(draws.blocks).__name__}")
    for path, want in skeleton.blocks.items():
        got = blocks[path]
        if not isinstance(got, BlockDraws) or (got.nq, got.nk) != (want.nq, want.nk):
            raise InputError(f"draws: block {path!r} must be a BlockDraws for {(want.nq, want.nk)}")
        _check_array(f"block {path!r} lsh_planes", got.lsh_planes, want.lsh_planes)
        _check_array(f"block {path!r} approxd_rows", got.approxd_rows, want.approxd_rows, low=0, high=want.nq)
        _check_array(f"block {path!r} approxd_cols", got.approxd_cols, want.approxd_cols, low=0, high=want.nk)
        _check_array(f"block {path!r} sample_u", got.sample_u, want.sample_u, unit=True)
    if (draws.direct is None) != (skeleton.direct is None):
        raise InputError("draws: direct must be DirectDraws exactly when the call runs the direct mode")
    if skeleton.direct is not None:
        got, want = draws.direct, skeleton.direct
        if not isinstance(got, DirectDraws) or not isinstance(got.exact, tuple) or len(got.exact) != len(want.exact):
            raise InputError(f"draws: direct must be DirectDraws with {len(want.exact)} exact-set entries")
        _check_array("direct sample_u", got.sample_u, want.sample_u, unit=True)
        for i, (g, w) in enumerate(zip(got.exact, want.exact)):
            if w is None:
                if g is not None:
                    raise InputError(f"draws: exact-set part {i} is deterministic; its draw must be None")
                continue
            bounded = dict(low=0, high=draws.nq) if w.dtype.kind == "i" else {}
            _check_array(f"exact-set part {i}", g, w, **bounded)
