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

    def head(self, index: tuple[int, ...]) -> BlockDraws:
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

    exact: tuple[np.ndarray | None, ...]
    sample_u: np.ndarray

    def head(self, index: tuple[int, ...]) -> DirectDraws:
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
    batch_shape: tuple[int, ...]
    config: HyperConfig
    blocks: Mapping[str, BlockDraws] = field(default_factory=dict)
    direct: DirectDraws | None = None

    def head(self, index: tuple[int, ...]) -> Draws:
        """The draws of one head (``batch_shape`` becomes ``()``)."""
        return Draws(
            self.nq, self.nk, self.d, self.causal, (), self.config,
            {path: blk.head(index) for path, blk in self.blocks.items()},
            None if self.direct is None else self.direct.head(index),
        )


def as_generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    """:func:`numpy.random.default_rng` of ``rng``, with an :class:`InputError` naming ``rng``."""
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as err:
        raise InputError(f"rng must be None, an integer >= 0 or a numpy Generator, got {rng!r} ({err})") from None


def _block_shapes(nq: int, d: int, config: HyperConfig) -> dict:
    """One head's array shapes of a :class:`BlockDraws` (``nq`` rows in the block)."""
    return {"lsh_planes": (d, config.bits), "approxd_rows": (min(config.approxd_samples, nq),),
            "approxd_cols": (config.approxd_samples,), "sample_u": (config.samples,)}


def _planned_blocks(config: HyperConfig, nq: int, nk: int, causal: bool) -> dict:
    """``{path: (nq, nk)}`` of the :class:`BlockDraws` a call of the recursive mode has."""
    if config.mode != "recursive" or nq <= config.min_seq_len or nk == 0:
        return {}
    if not causal:
        return {"": (nq, nk)}
    return {node.path: (node.nq, node.nk) for node in causal_nodes(nq, nk, config.min_seq_len)[0]}


def _direct_shapes(config: HyperConfig, nq: int, nk: int, d: int, causal: bool):
    """``(sample_u shape, exact-set draw shapes)`` of one head in the direct mode, or ``None``."""
    if config.mode != "direct" or nq <= config.min_seq_len or nk == 0:
        return None
    from .direct import n_query_blocks, paper_exact_set
    from .exact_set import Geometry

    u_shape = (n_query_blocks(nq, config.query_block), config.samples)
    return u_shape, paper_exact_set(config).draw_shapes(Geometry(nq, nk, causal), d)


def _block_draws(nq, nk, d, batch_shape, config, rng) -> BlockDraws:
    shape = {name: batch_shape + one for name, one in _block_shapes(nq, d, config).items()}
    planes = rng.standard_normal(shape["lsh_planes"])
    n_rows = shape["approxd_rows"][-1]
    heads = int(np.prod(batch_shape, dtype=np.int64))
    rows = np.empty((heads, n_rows), dtype=np.int64)
    for h in range(heads):
        rows[h] = rng.choice(nq, size=n_rows, replace=False)
    cols = rng.integers(0, nk, size=shape["approxd_cols"], dtype=np.int64)
    u = rng.random(shape["sample_u"])
    return BlockDraws(planes, rows.reshape(shape["approxd_rows"]), cols, u, nq, nk)


def make_draws(
    config: HyperConfig,
    nq: int,
    nk: int,
    d: int,
    *,
    causal: bool = False,
    batch_shape: tuple[int, ...] = (),
    rng: int | np.random.Generator | None = None,
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
    direct = None
    try:
        if _direct_shapes(config, nq, nk, d, causal) is not None:
            from .direct import paper_exact_set
            from .exact_set import Geometry

            exact = paper_exact_set(config).draw(Geometry(nq, nk, causal), d, batch_shape, rng)
            u_shape, _ = _direct_shapes(config, nq, nk, d, causal)
            direct = DirectDraws(exact, rng.random(batch_shape + u_shape))
        blocks = {path: _block_draws(bnq, bnk, d, batch_shape, config, rng)
                  for path, (bnq, bnk) in _planned_blocks(config, nq, nk, causal).items()}
    except MemoryError as err:  # e.g. config.samples = 2**40: terabytes of uniforms
        raise InputError(f"the draws do not fit in memory (config.samples={config.samples}, "
                         f"config.approxd_samples={config.approxd_samples}, batch_shape={batch_shape}): "
                         f"{err}") from None
    return Draws(nq, nk, d, bool(causal), batch_shape, config, blocks, direct)


def _check_array(name: str, got, shape: tuple, kind: str, *, high=None, unit=False) -> None:
    """``got`` has ``shape`` and dtype kind; integer entries in ``[0, high)``; uniforms in ``[0, 1)``."""
    if not isinstance(got, np.ndarray) or got.shape != shape or got.dtype.kind != kind:
        raise InputError(f"draws: {name} must be an array of shape {shape} and kind '{kind}', "
                         f"got {type(got).__name__} of shape {getattr(got, 'shape', None)}")
    if unit and got.size and not ((got >= 0) & (got < 1)).all():
        raise InputError(f"draws: {name} must hold uniforms in [0, 1)")
    if high is not None and got.size and not ((got >= 0) & (got < high)).all():
        raise InputError(f"draws: {name} must hold indices in [0, {high})")


def check_draws_contents(draws: Draws) -> None:
    """Raise :class:`InputError` unless ``draws`` has the structure and ranges :func:`make_draws` gives.

    Hand-built draws are public values: their arrays must have the shapes of the
    draws the call would make, their uniforms must lie in ``[0, 1)`` and their
    indices in range, or engines would read out of bounds or silently mis-sample.
    Nothing is drawn: the shapes come from the same plan :func:`make_draws` follows.
    """
    config, batch = draws.config, tuple(draws.batch_shape)
    planned = _planned_blocks(config, draws.nq, draws.nk, draws.causal)
    blocks = draws.blocks if isinstance(draws.blocks, Mapping) else None
    if blocks is None or set(blocks) != set(planned):
        raise InputError(f"draws: blocks must be keyed {sorted(planned)}, "
                         f"got {sorted(blocks) if blocks is not None else type(draws.blocks).__name__}")
    for path, (bnq, bnk) in planned.items():
        got = blocks[path]
        if not isinstance(got, BlockDraws) or (got.nq, got.nk) != (bnq, bnk):
            raise InputError(f"draws: block {path!r} must be a BlockDraws for {(bnq, bnk)}")
        shapes = _block_shapes(bnq, draws.d, config)
        _check_array(f"block {path!r} lsh_planes", got.lsh_planes, batch + shapes["lsh_planes"], "f")
        _check_array(f"block {path!r} approxd_rows", got.approxd_rows, batch + shapes["approxd_rows"], "i",
                     high=bnq)
        _check_array(f"block {path!r} approxd_cols", got.approxd_cols, batch + shapes["approxd_cols"], "i",
                     high=bnk)
        _check_array(f"block {path!r} sample_u", got.sample_u, batch + shapes["sample_u"], "f", unit=True)
    direct = _direct_shapes(config, draws.nq, draws.nk, draws.d, draws.causal)
    if (draws.direct is None) != (direct is None):
        raise InputError("draws: direct must be DirectDraws exactly when the call runs the direct mode")
    if direct is not None:
        (u_shape, part_shapes), got = direct, draws.direct
        if not isinstance(got, DirectDraws) or not isinstance(got.exact, tuple) or len(got.exact) != len(part_shapes):
            raise InputError(f"draws: direct must be DirectDraws with {len(part_shapes)} exact-set entries")
        _check_array("direct sample_u", got.sample_u, batch + u_shape, "f", unit=True)
        for i, (g, want) in enumerate(zip(got.exact, part_shapes)):
            if want is None:
                if g is not None:
                    raise InputError(f"draws: exact-set part {i} is deterministic; its draw must be None")
                continue
            shape, kind = want
            _check_array(f"exact-set part {i}", g, batch + shape, kind, high=draws.nq if kind == "i" else None)
