"""Fine-grained parameters of an attention instance (SPEC §2), memory-light.

Everything is computed from row blocks of the logits
(:func:`hyperref.exact.logit_blocks`), so no ``nq × nk`` array is formed
unless it is small (``nq·nk <= cache_entries``, default ``2**22``). The
operator norm of ``P`` (or of the residual ``P∘(1−M)``) comes from block
Krylov iteration on the implicit Gram operator ``PᵀP`` with a Rayleigh–Ritz
step on the whole basis: the returned value is a lower bound of
``‖P‖_op`` whose Ritz pair has relative residual ``<= 1e-6`` (reported), so
``‖P‖_op²`` has an eigenvalue within that relative distance; tests compare
it with the dense ``numpy.linalg.norm(P, 2)``. The passes run in the input
dtype (float32 stays float32) and accumulate in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math
import sys

import numpy as np

from hyperref._validation import InputError, check_bool, check_qkv, check_scale
from hyperref.draws import as_generator
from hyperref.exact import causal_logit_mask, logit_blocks
from hyperref.mask import HeavyMask

#: what a mask must have (:class:`~hyperref.mask.HeavyMask`, ``ExactSetMask``)
_MASK_INTERFACE = ("nq", "nk", "rows", "nnz")


def _widened(lse: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``lse`` in a dtype that holds the row log-sums of ``logits`` (longdouble beyond float64)."""
    wide = np.result_type(lse.dtype, logits.dtype)
    return lse if wide == lse.dtype else lse.astype(wide)


class SoftmaxOperator:
    """The softmax matrix ``P`` (optionally ``P∘(1−M)``) as an implicit operator.

    Parameters
    ----------
    q, k : ndarray, shapes (nq, d), (nk, d)
    scale : float
    causal : bool
    mask : HeavyMask, optional
        Required for the residual.
    residual : bool
        Apply ``P∘(1−M)`` instead of ``P``.
    lse : ndarray, optional
        Row log-sums of ``A`` (computed by one pass if not given), float64 or, for
        logits beyond float64's range, longdouble.
    cache_entries : int
        Keep the blocks in memory when ``nq·nk`` is at most this.
    """

    def __init__(self, q, k, scale, causal=False, mask: HeavyMask | None = None,
                 residual=False, lse=None, cache_entries=2**22):
        if residual and mask is None:
            raise ValueError("the residual operator needs a mask")
        self.q, self.k, self.scale, self.causal = q, k, scale, causal
        self.mask, self.residual = mask, residual
        self.shape = (len(q), len(k))
        self._cache = [] if len(q) * len(k) <= cache_entries else None
        self._cached = False
        if lse is None:
            lse = np.empty(len(q))
            for start, stop, logits in logit_blocks(q, k, scale, causal=causal):
                lse = _widened(lse, logits)
                peak = logits.max(axis=1)
                peak = np.where(np.isfinite(peak), peak, 0.0)
                with np.errstate(divide="ignore"):
                    lse[start:stop] = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        # rows that see no key (causal, nq > nk) are zero rows of P
        self.lse = np.where(np.isfinite(lse), lse, 0.0)

    def blocks(self):
        """Yield ``(start, stop, block)`` of the operator's rows (in the input dtype)."""
        if self._cached:
            yield from self._cache
            return
        for start, stop, logits in logit_blocks(self.q, self.k, self.scale, causal=self.causal):
            logits -= self.lse[start:stop, None].astype(logits.dtype)
            block = np.exp(logits, out=logits)
            if self.residual:
                block[self.mask.rows(start, stop)] = 0.0
            if self._cache is not None:
                self._cache.append((start, stop, block))
            yield start, stop, block
        if self._cache is not None:
            self._cached = True

    def gram(self, x: np.ndarray) -> np.ndarray:
        """``PᵀP x`` in one pass over the row blocks (accumulated in float64)."""
        out = np.zeros((self.shape[1],) + x.shape[1:])
        xc = x.astype(self.q.dtype)
        for _, _, block in self.blocks():
            out += block.T @ (block @ xc)
        return out

    def op_norm(self, k=8, tol=1e-6, maxiter=30, rng=0) -> tuple[float, float]:
        """``(‖·‖_op, relative residual)`` by block Krylov iteration on ``PᵀP``.

        Each pass applies ``PᵀP`` to a block of ``k`` vectors and extends the
        Krylov basis; a Rayleigh–Ritz step on the whole basis gives the Ritz
        value ``θ ≤ λ_max(PᵀP)``. It stops when the Ritz pair's residual
        ``‖PᵀP x − θx‖ / θ <= tol``: then an eigenvalue lies within
        ``tol·θ`` of ``θ``. The first block holds the all-ones direction (the
        top right singular vector of uniform attention) and ``k − 1``
        Gaussian vectors.
        """
        n = self.shape[1]
        k = min(k, n)
        rng = np.random.default_rng(rng)
        x = np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)])
        basis = [np.linalg.qr(x)[0]]
        images = []
        theta, resid = 0.0, math.inf
        for _ in range(maxiter):
            images.append(self.gram(basis[-1]))
            v, w = np.hstack(basis), np.hstack(images)
            h = v.T @ w
            evals, evecs = np.linalg.eigh(0.5 * (h + h.T))
            theta, u = float(evals[-1]), evecs[:, -1]
            if theta <= 0:
                return 0.0, 0.0
            resid = float(np.linalg.norm(w @ u - theta * (v @ u)) / theta)
            if resid <= tol or v.shape[1] >= n:
                break
            new = images[-1]
            for _ in range(2):  # re-orthogonalize against the whole basis
                new = new - v @ (v.T @ new)
            # drop directions that were (numerically) inside the basis already: their
            # remainder is rounding noise, and normalizing it would break orthogonality
            scale_ = float(np.linalg.norm(images[-1], axis=0).max())
            q_new, r_new = np.linalg.qr(new)
            keep = np.abs(np.diag(r_new)) > 1e-8 * max(scale_, 1e-300)
            if not keep.any():
                break
            q_new = q_new[:, keep]
            q_new, _ = np.linalg.qr(q_new - v @ (v.T @ q_new))
            basis.append(q_new)
        return math.sqrt(theta), resid


@dataclass(frozen=True)
class Parameters:
    """The fine-grained parameters of SPEC §2 for one head.

    Attributes
    ----------
    alpha : float
        ``nk · max_j ‖P e_j‖²``.
    alpha_res : float
        ``nk · max_j ‖(P∘(1−M)) e_j‖²`` (``nan`` without a mask).
    kappa : float
        ``max_i r_i / min_i r_i`` over rows with ``r_i > 0`` (``nan`` without a mask).
    kappa_zero_rows : int
        Rows with ``r_i = 0`` (excluded from κ).
    srank_p, srank_v, srank_res : float
        Stable ranks ``‖X‖_F²/‖X‖_op²``.
    op_p, op_v, op_res : float
        Operator norms (``op_p``, ``op_res`` by subspace iteration).
    op_p_residual : float
        Relative residual of the ``op_p`` Ritz pair.
    fro_p, fro_res : float
        Frobenius norms.
    heavy_mass_min, heavy_mass_mean : float
        ``min_i`` and mean of ``h_i = Σ_j M_ij A_ij / d_i`` over rows with ``d_i > 0``.
    max_abs_logit : float
        ``max |S_ij|`` over visible entries.
    nnz_mask : int
        Number of ones of ``M``.
    col_sq, col_sq_res : ndarray, shape (nk,)
        Squared column norms ``‖P e_j‖²`` and ``‖(P∘(1−M)) e_j‖²`` (the latter
        ``None`` without a mask), for :func:`hyperref.theory.bounds.product_bound`.
    """

    nq: int
    nk: int
    alpha: float
    alpha_res: float
    kappa: float
    kappa_zero_rows: int
    srank_p: float
    srank_v: float
    srank_res: float
    op_p: float
    op_v: float
    op_res: float
    op_p_residual: float
    fro_p: float
    fro_res: float
    heavy_mass_min: float
    heavy_mass_mean: float
    max_abs_logit: float
    nnz_mask: int
    col_sq: np.ndarray | None = None
    col_sq_res: np.ndarray | None = None

    def as_dict(self) -> dict:
        """The scalar parameters (the column-norm arrays left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("col_sq", "col_sq_res")}


def attention_parameters(q, k, v, scale=None, *, causal=False, mask: HeavyMask | None = None,
                         residual_norm=True, rng=0, norm_p=None) -> Parameters:
    """Compute the parameters of SPEC §2 for one head, exactly and memory-light.

    Parameters
    ----------
    q, k, v : ndarray, shapes (nq, d), (nk, d), (nk, dv)
    scale : float, optional
        Default ``1/sqrt(d)``.
    causal : bool
        Use the causal softmax matrix (bottom-right aligned).
    mask : HeavyMask or ExactSetMask, optional
        The mask of exactly computed entries: the paper's
        (:func:`hyperref.attention.heavy_mask`) or an exact set's membership
        (:class:`hyperref.theory.exact_set_parameters.ExactSetMask`; any object with
        ``nq``, ``nk``, ``rows(start, stop)`` and ``nnz()``); without it the
        mask-dependent parameters are ``nan``.
    residual_norm : bool
        Also compute ``‖P∘(1−M)‖_op`` (one more iterative solve).
    rng : None, int or numpy.random.Generator
        Seed of the subspace iteration's start block.
    norm_p : tuple of float, optional
        ``(‖P‖_op, relative residual)`` from an earlier call on the same ``q``, ``k``,
        ``scale`` and ``causal`` (``op_p``, ``op_p_residual``): skips that solve.

    Returns
    -------
    Parameters

    Raises
    ------
    InputError
        Bad inputs; a mask without ``nq``, ``nk``, ``rows`` and ``nnz`` or of another
        shape; an ``rng`` that :func:`numpy.random.default_rng` refuses; a logit
        beyond the range of the widest float (``np.longdouble``).

    Notes
    -----
    .. math::
        \\alpha = n_k \\max_j \\|P e_j\\|^2,\\quad
        \\kappa = \\frac{\\max_i r_i}{\\min_i r_i},\\quad
        \\mathrm{srank}(X) = \\frac{\\|X\\|_F^2}{\\|X\\|_{op}^2}
    """
    q, k, v, single = check_qkv(q, k, v)
    if not single:
        raise InputError(f"q, k, v must be one head, shapes (nq, d), (nk, d), (nk, dv); got {q.shape[:2]} "
                         "batch and head axes")
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    if not (len(q) and len(k)):
        raise InputError(f"the parameters need nq, nk >= 1, got nq={len(q)}, nk={len(k)}")
    causal = check_bool(causal, "causal")
    scale = check_scale(scale, q.shape[1])
    if norm_p is not None and not (isinstance(norm_p, tuple) and len(norm_p) == 2
                                   and all(isinstance(x, (int, float)) and x >= 0 for x in norm_p)):
        raise InputError(f"norm_p must be a pair (op_p, op_p_residual) of numbers >= 0, got {norm_p!r}")
    if mask is not None and not all(hasattr(mask, name) for name in _MASK_INTERFACE):
        raise InputError(f"mask must be a HeavyMask or an ExactSetMask (nq, nk, rows, nnz), "
                         f"got {type(mask).__name__}")
    if mask is not None and (mask.nq, mask.nk) != (len(q), len(k)):
        raise InputError(f"mask is for a {mask.nq} x {mask.nk} matrix, not {len(q)} x {len(k)}")
    as_generator(rng)  # refused here, not deep in the solve; each solve starts from rng itself
    dtype = q.dtype  # check_qkv's common dtype, float32 or wider
    v = v.astype(np.float64)
    nq, nk = len(q), len(k)
    col_sq = np.zeros(nk)
    col_sq_res = np.zeros(nk)
    lse = np.empty(nq)
    log_r = np.full(nq, -np.inf)
    heavy = np.zeros(nq)
    fro_sq = fro_sq_res = 0.0
    max_logit = 0.0
    for start, stop, logits in logit_blocks(q, k, scale, causal=causal):
        finite = np.isfinite(logits)
        if causal:  # hidden entries are -inf
            in_range = (finite | causal_logit_mask(np.arange(start, stop), nk, nk - nq)).all()
            max_logit = max(max_logit, float(np.abs(logits[finite]).max(initial=0.0)))
        else:
            in_range = finite.all()
            max_logit = max(max_logit, float(np.abs(logits).max()))
        if not in_range:
            raise InputError(f"the logits scale·q·kᵀ must be finite; they are beyond the range of "
                             f"{logits.dtype} (up to {np.format_float_scientific(np.finfo(logits.dtype).max, 2)})")
        lse, log_r = _widened(lse, logits), _widened(log_r, logits)
        peak = logits.max(axis=1)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        logits -= peak[:, None].astype(logits.dtype)
        a = np.exp(logits, out=logits)
        d = a.sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore"):
            lse[start:stop] = peak + np.log(d)
        p = a
        p *= (1.0 / np.where(d > 0, d, 1.0))[:, None].astype(p.dtype)
        p_sq = p * p
        col_sq += p_sq.sum(axis=0, dtype=np.float64)
        fro_sq += float(p_sq.sum(dtype=np.float64))
        if mask is not None:
            m = mask.rows(start, stop)
            heavy[start:stop] = np.where(m, p, 0.0).sum(axis=1, dtype=np.float64)
            p_sq[m] = 0.0
            col_sq_res += p_sq.sum(axis=0, dtype=np.float64)
            fro_sq_res += float(p_sq.sum(dtype=np.float64))
            # r_i = d_i (1 − h_i), in logs relative to the row peak
            with np.errstate(divide="ignore"):
                log_r[start:stop] = lse[start:stop] + np.log(
                    np.where(m, 0.0, p).sum(axis=1, dtype=np.float64))
    if norm_p is None:
        op_p, op_p_resid = SoftmaxOperator(q, k, scale, causal, lse=lse).op_norm(rng=rng)
    else:
        op_p, op_p_resid = (float(x) for x in norm_p)
    op_v = float(np.linalg.norm(v, 2)) if v.size else 0.0
    fro_v_sq = float((v * v).sum())
    nan = float("nan")
    alpha_res = kappa = srank_res = op_res = fro_res = nan
    zero_rows, hmin, hmean, nnz = 0, nan, nan, 0
    if mask is not None:
        alpha_res = float(nk * col_sq_res.max())
        fro_res = math.sqrt(fro_sq_res)
        positive = np.isfinite(log_r)
        zero_rows = int((~positive).sum())
        kappa = float(np.exp(log_r[positive].max() - log_r[positive].min())) if positive.any() else nan
        seen = np.isfinite(lse)  # rows that see at least one key
        hmin, hmean = (float(heavy[seen].min()), float(heavy[seen].mean())) if seen.any() else (nan, nan)
        nnz = mask.nnz()
        if residual_norm and fro_sq_res > 0:
            op_res = SoftmaxOperator(q, k, scale, causal, mask, residual=True, lse=lse).op_norm(rng=rng)[0]
            srank_res = fro_sq_res / op_res**2
        elif fro_sq_res == 0:
            op_res, srank_res = 0.0, 0.0
    return Parameters(
        nq=nq, nk=nk,
        alpha=float(nk * col_sq.max()),
        alpha_res=alpha_res,
        kappa=kappa,
        kappa_zero_rows=zero_rows,
        srank_p=fro_sq / op_p**2,
        srank_v=fro_v_sq / op_v**2 if op_v > 0 else 0.0,
        srank_res=srank_res,
        op_p=op_p, op_v=op_v, op_res=op_res, op_p_residual=op_p_resid,
        fro_p=math.sqrt(fro_sq), fro_res=fro_res,
        heavy_mass_min=hmin, heavy_mass_mean=hmean,
        max_abs_logit=max_logit, nnz_mask=nnz,
        col_sq=col_sq, col_sq_res=col_sq_res if mask is not None else None,
    )


def spectral_error(approx, exact, op_p: float, op_v: float) -> float:
    """``‖Ãtt − Att‖_op / (‖P‖_op ‖V‖_op)`` (paper Eq. 1, SPEC §1).

    The numerator is the exact largest singular value of the ``nq × dv``
    difference (LAPACK SVD), the denominator uses the norms of
    :func:`attention_parameters`.

    Parameters
    ----------
    approx, exact : array_like, shape (nq, dv)
        Finite outputs.
    op_p, op_v : float
        ``‖P‖_op`` and ``‖V‖_op``, finite and ``>= 0``.

    Returns
    -------
    float
        ``0`` when ``approx = exact``; ``inf`` when only ``‖P‖_op ‖V‖_op`` is 0.

    Raises
    ------
    InputError
        Arrays of other shapes or not finite; norms that are not finite numbers ``>= 0``.

    Examples
    --------
    >>> round(spectral_error(np.ones((2, 1)), np.zeros((2, 1)), 1.0, 2.0), 6)  # sqrt(2) / 2
    0.707107
    """
    try:
        approx, exact = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise InputError(f"approx and exact must be real arrays: {err}") from None
    if approx.shape != exact.shape or approx.ndim != 2:
        raise InputError(f"approx and exact must be (nq, dv) arrays of one shape, got {approx.shape}, {exact.shape}")
    if not (np.isfinite(approx).all() and np.isfinite(exact).all()):
        raise InputError("approx and exact must be finite, got NaN or inf")
    for name, x in (("op_p", op_p), ("op_v", op_v)):
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
            raise InputError(f"{name} must be a real number >= 0, got {x!r}")
    if not (0 <= op_p <= sys.float_info.max and 0 <= op_v <= sys.float_info.max):
        raise InputError(f"op_p and op_v must be finite and >= 0, got {op_p}, {op_v}")
    err = float(np.linalg.norm(approx - exact, 2)) if approx.size else 0.0
    denom = op_p * op_v
    if denom > 0:
        return err / denom
    return 0.0 if err == 0 else math.inf  # V = 0: exact is 0, any nonzero answer is unboundedly wrong
