"""Input checking at the public boundary ("public validates, private computes")."""

from __future__ import annotations

import math
import sys

import numpy as np
import numpy.typing as npt

from .config import HyperConfig


class InputError(ValueError, TypeError):
    """Invalid input to a public function (shapes, dtypes, values), in every engine.

    A :class:`ValueError` and a :class:`TypeError`, so code that catches either keeps working.
    """


def as_float_array(x, name: str) -> np.ndarray:
    """``x`` as a floating ndarray; raises :class:`InputError` otherwise."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged nested lists, objects NumPy cannot read
        raise InputError(f"{name} must be a real floating-point array: {err}") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    return arr


def check_qkv(q: npt.ArrayLike, k: npt.ArrayLike,
              v: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Validate and normalize ``q, k, v`` to ``(B, H, N, D)``.

    Returns
    -------
    q, k, v : ndarray
        Batched 4-d views in a common floating dtype (float32 stays float32,
        float16 is computed in float32).
    single : bool
        True if the input was single-head ``(N, D)``.
    """
    q, k, v = as_float_array(q, "q"), as_float_array(k, "k"), as_float_array(v, "v")
    if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (2, 4):
        raise InputError(
            "q, k, v must all be (N, D) or all be (B, H, N, D); got shapes "
            f"{q.shape}, {k.shape}, {v.shape}")
    single = q.ndim == 2
    if single:
        q, k, v = q[None, None], k[None, None], v[None, None]
    (b, h, nq, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise InputError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if hk != hv:
        raise InputError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or h % hk != 0:
        raise InputError(f"key/value heads ({hk}) must divide query heads ({h})")
    if d != dk:
        raise InputError(f"q and k must have the same head dimension, got {d} and {dk}")
    if nk != nv:
        raise InputError(f"k and v must have the same length, got {nk} and {nv}")
    if d == 0 or dv == 0:
        raise InputError(f"head dimensions must be >= 1, got d={d}, dv={dv}")
    if nk == 0 and nq > 0:
        raise InputError("k and v are empty: attention needs at least one key")
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.size and not np.isfinite(arr).all():
            raise InputError(f"{name} contains NaN or Inf")
    dtype = np.result_type(q.dtype, k.dtype, v.dtype, np.float32)
    return q.astype(dtype, copy=False), k.astype(dtype, copy=False), v.astype(dtype, copy=False), single


def check_count(value, name: str, least: int = 0) -> int:
    """``value`` as an int if it is an integer ``>= least`` (bools and floats are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def check_config(config):
    """``config`` if it is a :class:`hyperref.HyperConfig`; :class:`InputError` otherwise."""
    if not isinstance(config, HyperConfig):
        raise InputError(f"config must be a HyperConfig, got {type(config).__name__}")
    return config


def check_bool(value, name: str) -> bool:
    """``value`` if it is a bool (Python or NumPy); a string such as ``"no"`` would be truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_scale(scale, d: int) -> float:
    """The softmax scale, default ``1/sqrt(d)``; must be a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise InputError(f"scale must be a real number, got {scale!r}")
    if not abs(scale) <= sys.float_info.max:  # NaN, ±inf and integers beyond float's range
        raise InputError(f"scale must be finite, got {scale}")
    return float(scale)
