"""Tuning switches of the Triton path, as one validated value (FlexAttention's ``kernel_options``).

>>> from hyperref.gpu import KernelOptions
>>> KernelOptions(leaves="triton", fwd_tiles=(64, 32, 4, 3)).fwd_tiles
(64, 32, 4, 3)
>>> as_kernel_options({"one_block": False}) == KernelOptions(one_block=False)
True

The defaults are the choices measured on an H200 (``benchmarks/GPU_RESULTS.md``); no
option changes the function computed, only how the kernels compute it (the tests check
each non-default path against the default one). ``backend="dense"`` and the NumPy
reference ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from hyperref._validation import InputError

#: who may compute the exact causal leaves: a vendor kernel (``hyperref.gpu.leaves.BACKENDS``)
#: where it applies, or always the Triton kernel
LEAVES = ("cudnn", "flash", "triton")

#: the kernels whose tiles an option may set: the forward, the three backward kernels, and
#: ``bwd`` for all three backward kernels at once
TILE_PASSES = ("fwd", "dq", "dkdv", "smp", "bwd")

_WARPS = (1, 2, 4, 8, 16)
_STAGES = range(1, 9)
_TILE_ROWS = (16, 1024)  # powers of two in this range: tl.arange sizes, tl.dot's minimum of 16


@dataclass(frozen=True)
class KernelOptions:
    """Tuning switches of :func:`hyperref.gpu.hyper_attention`'s Triton kernels.

    Passed as ``kernel_options=KernelOptions(...)`` or as a dict of the same fields
    (``kernel_options={"leaves": "triton"}``); unknown fields and bad values raise
    :class:`hyperref.InputError`. The defaults are the tuned choices; every option gives
    the same function, computed another way (bitwise the same where the arithmetic is
    the same, e.g. the two sorts; within rounding where tiles change the summation order).

    Parameters
    ----------
    one_block : bool
        Default True. Row tiles inside one sortLSH block run the single loop over their
        interval and samples (per-column masks); False: always the general loops
        (per-row intervals, 2-d masks).
    leaves : {"cudnn", "flash", "triton"}
        Default ``"cudnn"``. Who computes the exact causal leaves when they are equal
        squares and heads are not grouped (:mod:`hyperref.gpu.leaves`: CUDA, fp16/bf16,
        ``d = dv ∈ {64, 128}``): cuDNN or FlashAttention-2 through torch's SDPA
        operators; ``"triton"``: always the Triton kernel (as in every other case).
    fwd_tiles, dq_tiles, dkdv_tiles, smp_tiles : tuple of 4 int, optional
        Default None (the tuned choice per head dim, dtype and device). ``(BM, BN,
        num_warps, num_stages)`` of the forward kernel, the ``dq`` kernel, the ``dk, dv``
        kernel of the interval keys and that of the sampled keys. ``BM, BN``: powers of
        two in [16, 1024]; ``num_warps`` in {1, 2, 4, 8, 16}; ``num_stages`` in [1, 8].
        Set tiles apply on every device (the Triton interpreter's own choice is 16 × 16);
        tiles too large for the device's shared memory fail at launch.
    bwd_tiles : tuple of 4 int, optional
        Default None. The tiles of the three backward kernels, where ``dq_tiles``,
        ``dkdv_tiles`` or ``smp_tiles`` does not set them.
    counting_bits : int
        Default 8, in [0, 8]. With at most this many LSH bits (``config.bits``), the rows
        are ordered by a stable counting sort of their buckets (two Triton passes);
        with more (0: always), by torch's sort of unique sort keys. Same order.
    counting_on_cpu : bool
        Default False. Use the counting sort under the Triton interpreter too (its tile
        sorts are slow there); on CUDA it is used whenever ``counting_bits`` allows.
    hash_rows : int
        Default 64; a power of two in [16, 1024]. Rows per program of the hash kernel.
    sort_chunk : int
        Default 2048, >= 1. Rows per program of the counting sort (chunks never cross
        a node).
    sort_tile : int
        Default 256; a power of two in [16, 1024]. Rows the counting sort sorts at a time
        inside a chunk.

    Raises
    ------
    hyperref.InputError
        A value of the wrong type or out of its range.

    Examples
    --------
    >>> KernelOptions(counting_bits=0, sort_tile=128).tiles("dq") is None   # the tuned dq tiles
    True
    >>> KernelOptions(bwd_tiles=(64, 64, 4, 2)).tiles("dq")
    (64, 64, 4, 2)
    >>> KernelOptions(hash_rows=100)
    Traceback (most recent call last):
    ...
    hyperref._validation.InputError: kernel_options: hash_rows must be a power of two in [16, 1024], got 100
    """

    one_block: bool = True
    leaves: str = "cudnn"
    fwd_tiles: tuple[int, int, int, int] | None = None
    dq_tiles: tuple[int, int, int, int] | None = None
    dkdv_tiles: tuple[int, int, int, int] | None = None
    smp_tiles: tuple[int, int, int, int] | None = None
    bwd_tiles: tuple[int, int, int, int] | None = None
    counting_bits: int = 8
    counting_on_cpu: bool = False
    hash_rows: int = 64
    sort_chunk: int = 2048
    sort_tile: int = 256

    def __post_init__(self):
        for name in ("one_block", "counting_on_cpu"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))
        if not isinstance(self.leaves, str) or self.leaves not in LEAVES:
            raise InputError(f"kernel_options: leaves must be one of {LEAVES}, got {self.leaves!r}")
        for kernel in TILE_PASSES:
            name = f"{kernel}_tiles"
            object.__setattr__(self, name, _tiles(name, getattr(self, name)))
        object.__setattr__(self, "counting_bits", _integer("counting_bits", self.counting_bits, 0, 8))
        object.__setattr__(self, "sort_chunk", _integer("sort_chunk", self.sort_chunk, 1, None))
        for name in ("hash_rows", "sort_tile"):
            object.__setattr__(self, name, _power_of_two(name, getattr(self, name), *_TILE_ROWS))

    def tiles(self, kernel: str) -> tuple[int, int, int, int] | None:
        """The tiles set for ``kernel`` (one of ``fwd``, ``dq``, ``dkdv``, ``smp``), or None.

        A backward kernel without its own setting takes ``bwd_tiles``.
        """
        own = getattr(self, f"{kernel}_tiles")
        return own if own is not None or kernel == "fwd" else self.bwd_tiles


def as_kernel_options(value: KernelOptions | Mapping | None) -> KernelOptions:
    """``value`` as :class:`KernelOptions`: None gives the defaults, a mapping its fields.

    Raises
    ------
    hyperref.InputError
        Neither None, a KernelOptions nor a mapping; an unknown field (the message lists
        the known ones); a bad value.
    """
    if value is None:
        return DEFAULTS
    if isinstance(value, KernelOptions):
        return value
    if not isinstance(value, Mapping):
        raise InputError("kernel_options must be a hyperref.gpu.KernelOptions or a dict, "
                         f"got {type(value).__name__}")
    known = [f.name for f in fields(KernelOptions)]
    unknown = [key for key in value if key not in known]
    if unknown:
        raise InputError(f"kernel_options: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"the options are {', '.join(known)}")
    return KernelOptions(**value)


#: tile-size options of FlexAttention (optionally ``fwd_``/``bwd_``-prefixed)
_FLEX_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
#: promises about the mask that the direct engine's masks do not keep: every row has a key (its
#: gathered call has rows with no slot of theirs) and contiguous block lists
_FLEX_BROKEN_PROMISES = ("ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS")


def flex_kernel_options(value: Mapping | None, max_tile: int) -> dict | None:
    """A checked copy of the FlexAttention ``kernel_options`` of the block-sparse direct engine.

    Keys are FlexAttention's (``torch.nn.attention.flex_attention.FlexKernelOptions`` of the
    installed torch), optionally prefixed ``fwd_`` or ``bwd_``. Tile sizes must be powers of two
    from 16 to ``max_tile`` (they tile the plan's blocks), ``num_warps`` one of
    {1, 2, 4, 8, 16}, ``num_stages`` from 1 to 8; ``ROWS_GUARANTEED_SAFE`` and
    ``BLOCKS_ARE_CONTIGUOUS`` cannot be promised (rows without keys and scattered block lists
    occur there).

    Raises
    ------
    hyperref.InputError
        Anything else: a typo would otherwise be ignored, a broken promise give wrong numbers.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(f"kernel_options must be a dict, got {type(value).__name__}")
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions

        known = set(FlexKernelOptions.__annotations__)
    except ImportError:  # a torch without the typed options: names are not checked
        known = None
    out = {}
    for key, option in value.items():
        if not isinstance(key, str):
            raise InputError(f"kernel_options keys must be strings, got {key!r}")
        base = key.removeprefix("fwd_").removeprefix("bwd_")
        if known is not None and base not in known:
            raise InputError(f"unknown kernel option {key!r}; FlexAttention's are {', '.join(sorted(known))} "
                             "(optionally prefixed fwd_ or bwd_)")
        whole = _is_int(option)
        if base in _FLEX_TILES and not (whole and 16 <= option <= max_tile and option & (option - 1) == 0):
            raise InputError(f"kernel option {key} must be a power of two from 16 to {max_tile}, got {option!r}")
        if base == "num_warps" and not (whole and option in _WARPS):
            raise InputError(f"kernel option {key} must be 1, 2, 4, 8 or 16, got {option!r}")
        if base == "num_stages" and not (whole and option in _STAGES):
            raise InputError(f"kernel option {key} must be an integer from 1 to 8, got {option!r}")
        if base in _FLEX_BROKEN_PROMISES and option:
            raise InputError(f"kernel option {key}=True promises what the direct engine's masks do not keep "
                             "(rows without keys, scattered key tiles): it would give wrong numbers")
        out[key] = int(option) if whole else option
    return out


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"kernel_options: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _integer(name, value, low, high):
    """``value`` as an int in ``[low, high]`` (``high`` None: no upper bound)."""
    if not _is_int(value):
        raise InputError(f"kernel_options: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"kernel_options: {name} must be {where}, got {value}")
    return int(value)


def _power_of_two(name, value, low, high):
    """``value`` as an int, a power of two in ``[low, high]``."""
    if not _is_int(value):
        raise InputError(f"kernel_options: {name} must be an int, got {type(value).__name__}")
    if not (low <= value <= high) or value & (value - 1):
        raise InputError(f"kernel_options: {name} must be a power of two in [{low}, {high}], got {value}")
    return int(value)


def _tiles(name, value):
    """``value`` as a tuple of 4 ints ``(BM, BN, num_warps, num_stages)``, checked (None passes)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 4 or not all(_is_int(x) for x in value):
        raise InputError(f"kernel_options: {name} must be None or (BM, BN, num_warps, num_stages), "
                         f"4 ints, got {value!r}")
    bm, bn, warps, stages = (int(x) for x in value)
    _power_of_two(f"{name} BM", bm, *_TILE_ROWS)
    _power_of_two(f"{name} BN", bn, *_TILE_ROWS)
    if warps not in _WARPS:
        raise InputError(f"kernel_options: {name} num_warps must be one of {_WARPS}, got {warps}")
    if stages not in _STAGES:
        raise InputError(f"kernel_options: {name} num_stages must be in [1, 8], got {stages}")
    return bm, bn, warps, stages


#: the defaults (the tuned choices); what ``kernel_options=None`` means
DEFAULTS = KernelOptions()
