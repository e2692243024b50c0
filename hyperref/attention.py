"""Public entry points: exact and HyperAttention on ``(N, D)`` or ``(B, H, N, D)``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._validation import InputError, check_bool, check_config, check_qkv, check_scale
from .causal import causal_head
from .direct import direct_head, paper_exact_set
from .config import HyperConfig
from .draws import Draws, check_draws_contents, make_draws
from .estimators import noncausal_head
from .exact import exact_head

if TYPE_CHECKING:
    from .mask import HeavyMask


def _for_each_head(q, k, v, single, head_fn):
    b, h, nq, _ = q.shape
    group = h // k.shape[1]
    out = np.zeros((b, h, nq, v.shape[3]), dtype=v.dtype)
    lse = np.full((b, h, nq), -np.inf, dtype=v.dtype)
    if nq:
        for bi in range(b):
            for hi in range(h):
                hk = hi // group
                out[bi, hi], lse[bi, hi] = head_fn((bi, hi), q[bi, hi], k[bi, hk], v[bi, hk])
    if single:
        out, lse = out[0, 0], lse[0, 0]
    return out, lse


def exact_attention(q: npt.ArrayLike, k: npt.ArrayLike, v: npt.ArrayLike, *, causal: bool = False,
                    scale: float | None = None,
                    return_lse: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact softmax attention, row-blocked (SPEC §1).

    .. math:: \\mathrm{Att} = D^{-1} e^{s QK^\\top} V, \\qquad
              \\mathrm{lse}_i = \\log \\sum_j e^{s\\, q_i \\cdot k_j}

    Parameters
    ----------
    q : array, shape (N, D) or (B, H, N, D)
    k : array, shape (Nk, D) or (B, Hk, Nk, D), ``Hk`` divides ``H``
    v : array, shape (Nk, Dv) or (B, Hk, Nk, Dv)
    causal : bool
        Bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Nk - N``.
        Rows that see no key get output 0 and ``lse = -inf``.
    scale : float, optional
        Softmax scale ``s``, default ``1/sqrt(D)``.
    return_lse : bool
        Also return ``lse`` (natural log of the row sums, logit units).

    Returns
    -------
    out : ndarray, shape (..., N, Dv)
    lse : ndarray, shape (..., N), only if ``return_lse``

    Raises
    ------
    InputError
        Wrong shapes, non-floating dtypes, NaN/Inf, no keys.

    Examples
    --------
    >>> q = k = v = np.eye(2)
    >>> exact_attention(q, k, v, scale=0.0).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    q, k, v, single = check_qkv(q, k, v)
    causal, return_lse = check_bool(causal, "causal"), check_bool(return_lse, "return_lse")
    s = check_scale(scale, q.shape[3])
    out, lse = _for_each_head(q, k, v, single,
                              lambda _, qh, kh, vh: exact_head(qh, kh, vh, s, causal=causal))
    return (out, lse) if return_lse else out


def _wide_enough(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                 scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``q, k, v`` in a dtype where every logit ``scale · q_i·k_j`` is finite.

    The engines form ``q_i·k_j`` before scaling it, so both must be finite:
    ``max(|scale|, 1) · d · max|q| · max|k|`` bounds them (two reductions, no copy);
    when that exceeds a quarter of the dtype's range, float32 inputs are computed
    in float64 (the caller casts the answer back). Beyond float64's range: :class:`InputError`.
    """
    if q.size == 0 or k.size == 0:
        return q, k, v
    with np.errstate(over="ignore"):
        bound = max(abs(scale), 1.0) * q.shape[-1] * float(np.abs(q).max()) * float(np.abs(k).max())
    if math.isnan(bound):  # 0 · inf: a zero factor (scale 0, or q or k all 0) next to longdouble
        bound = 0.0        # entries beyond float64's range; every logit is 0
    if bound <= float(np.finfo(q.dtype).max) / 4:
        return q, k, v
    if bound <= float(np.finfo(np.float64).max) / 4:
        return q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)
    raise InputError(f"logits or the unscaled products q·k up to {bound:.3g} may exceed float64's range; "
                     "rescale q or k (or the scale)")


def check_draws(draws: Draws, config: HyperConfig, q: np.ndarray, k: np.ndarray, causal: bool,
                single: bool) -> None:
    """Raise :class:`InputError` unless ``draws`` were made for this call."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    want = () if single else (b, h)
    if not isinstance(draws, Draws):
        raise InputError(f"draws must be a hyperref.Draws, got {type(draws).__name__}")
    if (draws.nq, draws.nk, draws.d, draws.causal, tuple(draws.batch_shape)) != (
            nq, nk, d, bool(causal), want):
        raise InputError(
            "draws were made for (nq, nk, d, causal, batch_shape) = "
            f"{(draws.nq, draws.nk, draws.d, draws.causal, tuple(draws.batch_shape))}, "
            f"not {(nq, nk, d, bool(causal), want)}")
    if draws.config != config:
        raise InputError("draws were made for a different HyperConfig")


ENGINES = ("numpy", "numba")


def default_engine() -> str:
    """``"numba"`` when Numba imports, else ``"numpy"``."""
    try:
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency
        return "numpy"
    return "numba"


def hyper_attention(q: npt.ArrayLike, k: npt.ArrayLike, v: npt.ArrayLike, *, causal: bool = False,
                    scale: float | None = None, config: HyperConfig | None = None,
                    draws: Draws | None = None, return_lse: bool = False, engine: str | None = None,
                    rng: int | np.random.Generator | None = None,
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """HyperAttention (Han et al., ICLR 2024), the NumPy reference.

    Non-causal: Algorithm 1 (sortLSH mask), Algorithm 2 (ApproxD, when
    ``config.normalizer == "approxd"``) and Algorithm 3 (sampled product)
    of SPEC §3–§5. Causal: the recursion of SPEC §6. With
    ``config.mode == "direct"``: query blocks with a structured exact set and
    a residual sampled from each block's support (SPEC §3b, §6b), causal or
    not (:mod:`hyperref.direct`). Exact attention when ``N <= config.min_seq_len``.
    Float32 inputs whose logits could overflow are computed in float64.

    .. math::
        \\widetilde{\\mathrm{Att}} = \\tilde D^{-1}\\Big( (A \\circ M) V
            + \\big(A \\circ (1 - M)\\big) S^\\top S V \\Big)
        \\quad (\\text{estimator } \\texttt{masked})

    Parameters
    ----------
    q : array, shape (N, D) or (B, H, N, D)
    k : array, shape (Nk, D) or (B, Hk, Nk, D), ``Hk`` divides ``H``
    v : array, shape (Nk, Dv) or (B, Hk, Nk, Dv)
    causal : bool
        Bottom-right aligned causal mask (SPEC §1).
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    config : HyperConfig, optional
        Defaults to ``HyperConfig()`` (the paper's settings).
    draws : Draws, optional
        The random choices (SPEC §8); made from ``rng`` if not given. Pass
        the same draws to another engine to get the same answer.
    return_lse : bool
        Also return ``lse = log d̃`` (natural log of the normalizer used).
    engine : {"numba", "numpy"}, optional
        ``numpy``: the readable reference; ``numba``: the parallel kernels of
        :mod:`hyperref.numba_kernels` (default when Numba is installed). Both
        compute the same function of (inputs, draws). In the direct mode
        ``numba`` is :mod:`hyperref.direct_numba` (work per query block in
        proportion to the keys it attends); exact sets with the oracle ``topk``
        are computed by the reference on either engine.
    rng : None, int or numpy.random.Generator
        Randomness for the draws, when ``draws`` is not given.

    Returns
    -------
    out : ndarray, shape (..., N, Dv)
    lse : ndarray, shape (..., N), only if ``return_lse``

    Raises
    ------
    InputError
        Invalid inputs, or draws made for another shape/config.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 512, 16))
    >>> cfg = HyperConfig(block=64, samples=64, min_seq_len=128)
    >>> hyper_attention(q, k, v, config=cfg, rng=1).shape
    (512, 16)
    """
    q, k, v, single = check_qkv(q, k, v)
    causal, return_lse = check_bool(causal, "causal"), check_bool(return_lse, "return_lse")
    engine = default_engine() if engine is None else engine
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    config = check_config(HyperConfig() if config is None else config)
    s = check_scale(scale, q.shape[3])
    out_dtype = v.dtype
    q, k, v = _wide_enough(q, k, v, s)
    # one memory layout: BLAS rounds a product of strided operands differently
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    if q.dtype != out_dtype:
        unb = (lambda x: x[0, 0]) if single else (lambda x: x)
        out, lse = hyper_attention(unb(q), unb(k), unb(v), causal=causal, scale=s, config=config,
                                   draws=draws, return_lse=True, engine=engine, rng=rng)
        with np.errstate(over="ignore"):
            out, lse = out.astype(out_dtype), lse.astype(out_dtype)
        return (out, lse) if return_lse else out
    b, h, nq, d = q.shape
    if draws is None:
        draws = make_draws(config, nq, k.shape[2], d, causal=causal,
                           batch_shape=() if single else (b, h), rng=rng)
        check_draws(draws, config, q, k, causal, single)
    else:  # hand-built or reused draws: their shapes, uniforms and indices too
        check_draws(draws, config, q, k, causal, single)
        check_draws_contents(draws)
    exact = nq <= config.min_seq_len
    if not exact and config.mode == "direct":
        from .direct_numba import direct_heads, supports

        if engine == "numba" and b > 0 and h > 0 and supports(paper_exact_set(config), q.dtype):
            out, lse, _ = direct_heads(q, k, v, s, config, draws, causal)
            if single:
                out, lse = out[0, 0], lse[0, 0]
        else:  # engine="numpy", or a part only the reference computes (the oracle topk)
            out, lse = _for_each_head(q, k, v, single, lambda index, qh, kh, vh: direct_head(
                qh, kh, vh, s, config, draws.head(() if single else index).direct, causal))
        return (out, lse) if return_lse else out
    # the kernels are compiled for float32/float64 and a nonempty batch; else the NumPy reference
    numba_ok = q.dtype in (np.float32, np.float64) and b > 0 and h > 0
    if not exact and engine == "numba" and nq and numba_ok:
        from .engine_numba import hyper_heads

        out, lse = hyper_heads(q, k, v, s, config, draws, causal)
        if single:
            out, lse = out[0, 0], lse[0, 0]
        return (out, lse) if return_lse else out

    def head_fn(index, qh, kh, vh):
        if exact:
            return exact_head(qh, kh, vh, s, causal=causal)
        head_draws = draws.head(() if single else index)
        if causal:
            return causal_head(qh, kh, vh, s, config, head_draws)
        return noncausal_head(qh, kh, vh, s, config, head_draws.blocks[""])

    out, lse = _for_each_head(q, k, v, single, head_fn)
    return (out, lse) if return_lse else out


def heavy_mask(q: npt.ArrayLike, k: npt.ArrayLike, *, causal: bool = False,
               config: HyperConfig | None = None, draws: Draws | None = None) -> HeavyMask:
    """The mask ``M`` of exactly computed entries for one head and its draws.

    Parameters
    ----------
    q, k : array, shapes (N, D), (Nk, D)
    causal : bool
    config : HyperConfig, optional
    draws : Draws
        Single-head draws of the call (``draws.head((b, h))`` for batched).

    Returns
    -------
    hyperref.mask.HeavyMask
        All ones (one exact leaf) when ``N <= config.min_seq_len``.
    """
    from .mask import HeavyMask, block_structure
    from .plan import causal_nodes

    config = check_config(HyperConfig() if config is None else config)
    causal = check_bool(causal, "causal")
    q4, k4, _, single = check_qkv(q, k, k)
    if not single:
        raise InputError(f"heavy_mask takes one head, q (N, D) and k (Nk, D); got {np.shape(q)}, {np.shape(k)}")
    qh, kh = q4[0, 0], k4[0, 0]  # the one head
    nq, nk = len(qh), len(kh)
    if nq <= config.min_seq_len:
        return HeavyMask(nq, nk, [(0, nq, 0, nk)], ())
    if draws is None:
        raise InputError("heavy_mask needs the call's draws (hyperref.make_draws) beyond config.min_seq_len rows")
    check_draws(draws, config, q4, k4, causal, single=True)
    check_draws_contents(draws)
    if not causal:
        return HeavyMask.noncausal(block_structure(qh, kh, draws.blocks[""].lsh_planes, config.block))
    offdiag, leaves = causal_nodes(nq, nk, config.min_seq_len)
    blocks = [(n.q0, n.k0, block_structure(qh[n.q0:n.q1], kh[n.k0:n.k1],
                                           draws.blocks[n.path].lsh_planes, config.block))
              for n in offdiag]
    return HeavyMask(nq, nk, [(lf.q0, lf.q1, lf.k0, lf.k1) for lf in leaves], blocks)
