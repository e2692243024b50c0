"""The guarantees G1–G5 and G7 of SPEC §7 with explicit constants (docs/mathematics.md §7).

All errors are in units of ``‖P‖_op ‖V‖_op`` (paper Eq. 1). Notation as in
SPEC §2: ``srank(X) = ‖X‖_F²/‖X‖_op²``, ``α = nk max_j ‖P e_j‖²``.

G1 (normalizer, deterministic)
    ``D̃⁻¹A − D⁻¹A = (D D̃⁻¹ − I) P``, hence
    ``‖(D̃⁻¹ − D⁻¹) A V‖_op ≤ η ‖P‖_op‖V‖_op`` with ``η = max_i |d_i/d̃_i − 1|``.

G2 (product, ``paper`` estimator, exact D)
    For ``m`` i.i.d. samples with probabilities ``p``,
    ``E‖P SᵀS V − PV‖_F² = (1/m)(Σ_j ‖Pe_j‖²‖v_j‖²/p_j − ‖PV‖_F²)``
    (verified symbolically in :mod:`hyperref.theory.symbolic`). With ``rownorm``
    sampling this is ``≤ ‖P‖_F²‖V‖_F²/m``; Markov's inequality on the squared
    Frobenius error and ``‖·‖_op ≤ ‖·‖_F`` give, with probability ``≥ 1 − δ``,
    ``err ≤ sqrt(srank(P) srank(V) / (δ m))``, and ``srank(P) ≤ α nk/nq``.

G3 (``masked`` estimator, exact D)
    The error is ``P_res (SᵀS − I) V`` with ``P_res = P∘(1−M)``, so G2 holds
    with ``‖P‖_F`` replaced by ``‖P_res‖_F``:
    ``err ≤ sqrt(‖P_res‖_F² srank(V) / (δ m)) / ‖P‖_op`` — never worse than G2.

G3, direct mode (:func:`g3_direct_bound`)
    Row ``i`` of ``D⁻¹N − PV`` is ``Σ_{j∈R_i} (W_ij − 1) P_ij v_j``, a mean of ``m``
    i.i.d. centred terms from the block's support distribution ``p^{(t)}``:
    ``err ≤ sqrt(Σ_i s^raw_i / (δ m))``. Under ``rownorm`` on ``U_t``,
    ``Σ_i s^raw_i ≤ ‖P_res‖_F² ‖V‖_F²`` with ``P_res = P∘(1−M_E)``: :func:`g3_bound` holds
    with the exact set's ``‖P_res‖_F`` (``mixed``: twice ``‖P_res‖_F²``).

G4 (composition)
    ``D̃⁻¹N − D⁻¹AV = (D̃⁻¹D)(D⁻¹N − PV) + (D̃⁻¹D − I) PV``, so
    ``err ≤ (1 + η) ε_prod + η`` for any normalizer ``d̃`` (deterministic given
    ``ε_prod``, the product error with exact D).

G5 (ApproxD, derived here)
    Fix a row ``i`` and write ``r_i = Σ_j A^res_ij`` with ``A^res = A∘(1−M)``.
    The estimate ``ř_i = (nk/m_d) Σ_t A^res_{iℓ_t}`` is a sum of ``m_d``
    independent terms ``Y_t ∈ [0, nk max_j A^res_ij / m_d]`` with mean
    ``r_i/m_d``. With the residual entry ratio ``ρ_i = nk max_j A^res_ij / r_i``
    (``1 ≤ ρ_i ≤ nk``): ``Var(Y_t) ≤ E Y_t² = (nk/m_d)² (1/nk) Σ_j (A^res_ij)²
    ≤ (nk/m_d²) max_j A^res_ij · r_i``, so ``Σ_t Var(Y_t) ≤ ρ_i r_i²/m_d``, and
    ``|Y_t − E Y_t| ≤ ρ_i r_i/m_d``. Bernstein's inequality with ``t = ε r_i``:

    ``Pr[|ř_i − r_i| ≥ ε r_i] ≤ 2 exp(−ε² m_d / (2 ρ_i (1 + ε/3)))``.

    If ``κ ≥ κ_true`` the floor ``τ/κ ≤ min_i r_i ≤ r_i``, so
    ``max(ř_i, τ/κ)`` lies in ``[(1 − ε) r_i, (1 + ε) r_i]`` whenever ``ř_i``
    does, and then ``|d̃_i − d_i| ≤ ε r_i ≤ ε d_i``, i.e.
    ``|d_i/d̃_i − 1| ≤ ε/(1 − ε)``. A union bound over the ``nq`` rows:

    ``Pr[η > ε/(1 − ε)] ≤ 2 nq exp(−ε² m_d / (2 ρ (1 + ε/3)))``, ``ρ = max_i ρ_i``,

    so ``m_d ≥ 2 ρ (1 + ε/3) log(2 nq / δ) / ε²`` suffices for
    ``η ≤ ε/(1 − ε)`` with probability ``≥ 1 − δ``. (With the estimated κ̂ of
    SPEC §4 the floor may exceed some ``r_i``: no guarantee is claimed.)

G7 (self-normalized estimator, derived here; :mod:`hyperref.theory.self_normalized`)
    ``õ_i − o_i = (d_i/d̃_i) e_i`` with ``e_i`` the product error on row-centred
    values ``v_j − o_i``, and ``d̃_i ≥ h_i d_i`` (``h_i`` the exact set's mass);
    both rows are convex combinations of the visible values, so also
    ``‖õ_i − o_i‖ ≤ D_i = max_j ‖v_j − o_i‖``. With probability ``≥ 1 − δ``:
    ``‖Õ − O‖_op ≤ sqrt(Σ_i min(s_i/(m h_i²), D_i²) / δ)``, ``s_i`` the one-sample
    second moment of ``e_i``. No ``η`` term: the normalizer's error costs only ``1/h_i``.
    Tail form (:func:`g7_tail_bound`): Bernstein's lower tail of the normalizer replaces
    ``1/h_i`` by ``1/λ`` off an event of probability ``π_i(λ)`` (:func:`normalizer_lower_tail`,
    :func:`g7_row_terms`), and Bernstein's inequality over the independent query blocks
    replaces Markov's ``1/δ`` by ``log(1/δ)`` terms; the smallest of the forms holds.

Paper, recalled (SPEC §7): Lemma 1 needs ``m = Ω(κ⁷ α²/ε⁶ · log n)`` for
ApproxD; Lemma 2 needs ``m = Ω(ε⁻² d · srank(D⁻¹A))`` for the product.
:func:`paper_sample_sizes` evaluates them with the hidden constant set to 1.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from hyperref._validation import InputError


# Argument checks. Comparisons are written so that NaN fails them.
_ROUNDING = 1e-9  # stable ranks and entry ratios are >= 1 exactly, computed ones up to rounding


def _check_real(x, name: str) -> None:
    """``x`` is a real number: an int, a float or a NumPy scalar of either (not a bool, not an array)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a real number, got {x!r}")


def _as_float(x) -> float:
    """``float(x)``, ``inf`` for integers beyond float's range."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _fraction(x) -> Fraction:
    """The exact rational value of an int or a float (NumPy scalars included)."""
    return Fraction(int(x)) if isinstance(x, (int, np.integer)) else Fraction(float(x))


def _by_logs(pairs) -> float:
    """``Π x^e`` over ``(x, e)`` pairs with ``x >= 0`` (ints of any size, ``inf`` allowed) by
    logarithms: relative error about ``u·Σ|e ln x|``; ``inf`` beyond float's range, 0 below it,
    ``inf`` (vacuous) where infinite factors cancel."""
    if any(x == 0 and e > 0 for x, e in pairs):
        return 0.0
    if any(x == 0 for x, e in pairs):
        return math.inf
    total = sum(e * math.log(x) for x, e in pairs if e)
    if math.isnan(total):
        return math.inf
    try:
        return math.exp(total)
    except OverflowError:
        return math.inf


def _evaluate(plain, pairs) -> float:
    """``plain()`` in float64 when no intermediate over- or underflows, else :func:`_by_logs`."""
    try:
        with np.errstate(all="raise"):
            value = float(plain())
        if math.isfinite(value):
            return value
    except (FloatingPointError, OverflowError, ZeroDivisionError):
        pass
    return _by_logs(pairs)


def _check_prob(delta: float) -> None:
    _check_real(delta, "delta")
    if not 0 < delta < 1:
        raise InputError(f"delta must be in (0, 1), got {delta}")


def _check_eps(eps: float, below_one: bool = False) -> None:
    _check_real(eps, "eps")
    if not (0 < eps < (1 if below_one else math.inf)):
        raise InputError(f"eps must be in (0, {1 if below_one else 'inf'}), got {eps}")


def _check_nonneg(x: float, name: str) -> None:
    """``x >= 0`` (``inf`` allowed: a bound may be vacuous, not wrong)."""
    _check_real(x, name)
    if not x >= 0:
        raise InputError(f"{name} must be >= 0, got {x}")


def _check_count(x: int, name: str, least: int = 1) -> None:
    _check_real(x, name)
    integral = isinstance(x, (int, np.integer)) or (math.isfinite(x) and float(x).is_integer())
    if not integral or x < least:
        raise InputError(f"{name} must be an integer >= {least}, got {x}")


def _check_rho(rho: float) -> None:
    """The residual entry ratio ``ρ = max_i nk max_j A^res_ij / r_i`` is ``>= 1``."""
    _check_real(rho, "rho")
    if not 1 - _ROUNDING <= rho < math.inf:
        raise InputError(f"rho must be a finite number >= 1, got {rho}")


def _check_srank(x: float, name: str) -> None:
    """A stable rank ``‖X‖_F²/‖X‖_op²`` is 0 (the zero matrix, by convention) or ``>= 1``."""
    _check_real(x, name)
    if not (x == 0 or 1 - _ROUNDING <= x < math.inf):
        raise InputError(f"{name} must be 0 (zero matrix) or a finite number >= 1, got {x}")


def g1_bound(eta: float) -> float:
    """G1: the normalizer's contribution ``η`` (deterministic)."""
    _check_nonneg(eta, "eta")
    return _as_float(eta)


def g2_bound(m: int, delta: float, srank_p: float, srank_v: float) -> float:
    """G2: ``sqrt(srank(P) srank(V) / (δ m))``, holding with probability ``≥ 1 − δ``.

    Examples
    --------
    >>> round(g2_bound(100, 0.1, 4.0, 2.5), 6)
    1.0
    """
    _check_prob(delta)
    _check_count(m, "m")
    _check_srank(srank_p, "srank_p")
    _check_srank(srank_v, "srank_v")
    def plain():
        return np.sqrt(np.float64(srank_p) * np.float64(srank_v) / (np.float64(delta) * np.float64(m)))
    return _evaluate(plain, [(srank_p, 0.5), (srank_v, 0.5), (delta, -0.5), (m, -0.5)])


def g2_samples(eps: float, delta: float, srank_p: float, srank_v: float) -> int:
    """Samples for G2 ≤ ε: ``m = ⌈srank(P) srank(V) / (δ ε²)⌉``."""
    _check_prob(delta)
    _check_eps(eps)
    _check_srank(srank_p, "srank_p")
    _check_srank(srank_v, "srank_v")
    # exact rational arithmetic on the given floats: no overflow, no rounding at the ceiling
    ratio = _fraction(srank_p) * _fraction(srank_v) / (_fraction(delta) * _fraction(eps) ** 2)
    return max(1, math.ceil(ratio))


def g2_samples_alpha(eps: float, delta: float, alpha: float, srank_v: float, nq: int, nk: int) -> int:
    """Samples for G2 ≤ ε via ``srank(P) ≤ α nk/nq``: ``⌈α srank(V) (nk/nq) / (δ ε²)⌉``."""
    _check_prob(delta)
    _check_eps(eps)
    _check_count(nq, "nq")
    _check_count(nk, "nk")
    _check_nonneg(alpha, "alpha")
    if not alpha < math.inf:
        raise InputError(f"alpha must be finite, got {alpha}")
    _check_srank(srank_v, "srank_v")
    # α nk/nq bounds srank(P) from above; it need not be a stable rank itself (it may be < 1)
    return max(1, math.ceil(_fraction(alpha) * _fraction(srank_v) * _fraction(nk)
                            / (_fraction(nq) * _fraction(delta) * _fraction(eps) ** 2)))


def g3_bound(m: int, delta: float, fro_res: float, op_p: float, srank_v: float) -> float:
    """G3: ``sqrt(‖P_res‖_F² srank(V) / (δ m)) / ‖P‖_op`` (``masked`` estimator, exact D)."""
    _check_prob(delta)
    _check_count(m, "m")
    _check_srank(srank_v, "srank_v")
    _check_nonneg(fro_res, "fro_res")
    _check_nonneg(op_p, "op_p")
    if op_p == 0 or fro_res == 0 or srank_v == 0:  # P = 0, so P_res = 0: no error
        return 0.0
    if op_p == math.inf:
        return math.inf if fro_res == math.inf else 0.0
    def plain():
        return np.sqrt(np.float64(fro_res) ** 2 * np.float64(srank_v) / (np.float64(delta) * np.float64(m))) / op_p
    return _evaluate(plain, [(fro_res, 1), (srank_v, 0.5), (delta, -0.5), (m, -0.5), (op_p, -1)])


def product_bound(m: int, delta: float, col_sq, v, p, op_p: float, op_v: float) -> float:
    r"""G2/G3 for any sampler, from the exact second moment (SPEC §7, G2's identity).

    .. math::
        \mathbb{E}\|X S^\top S V - XV\|_F^2 \le \frac1m \sum_j
        \frac{\|X e_j\|^2 \|v_j\|^2}{p_j}

    with ``X = P`` (``paper``) or ``X = P∘(1−M)`` (``masked``) and ``col_sq[j]
    = ‖X e_j‖²``; Markov's inequality gives, with probability ``≥ 1 − δ``,
    ``err ≤ sqrt(that / δ) / (‖P‖_op‖V‖_op)``. For ``rownorm`` sampling this
    equals the srank form of :func:`g2_bound` / :func:`g3_bound`. Keys with
    ``p_j = 0`` must have ``v_j = 0`` (their terms are 0).
    """
    import numpy as np

    _check_prob(delta)
    _check_count(m, "m")
    _check_nonneg(op_p, "op_p")
    _check_nonneg(op_v, "op_v")
    try:
        col_sq, v, p = (np.asarray(x, dtype=np.float64) for x in (col_sq, v, p))
    except (TypeError, ValueError) as err:
        raise InputError(f"col_sq, v and p must be arrays of real numbers: {err}") from None
    nk = len(col_sq) if col_sq.ndim == 1 else -1
    if col_sq.ndim != 1 or v.ndim != 2 or v.shape[0] != nk or p.shape != (nk,):
        raise InputError(f"col_sq (nk,), v (nk, dv) and p (nk,) must match, got shapes {col_sq.shape}, "
                         f"{v.shape}, {p.shape}")
    if not (np.isfinite(col_sq).all() and (col_sq >= 0).all() and np.isfinite(v).all()):
        raise InputError("col_sq must hold finite numbers >= 0 and v finite numbers")
    # p: a probability vector, its sum 1 up to the rounding of a float32 sum of nk terms
    if not (np.isfinite(p).all() and (p >= 0).all() and abs(p.sum() - 1) <= max(nk, 1) * 2.0**-23):
        raise InputError(f"p must be a probability vector (entries >= 0 summing to 1), got sum {p.sum()}")
    if nk == 0 or op_p == 0 or op_v == 0 or math.inf in (op_p, op_v):
        return 0.0  # P = 0 or V = 0: no error; an infinite norm leaves the error at 0
    # scaled by the largest entries, so that the squares and the sum stay in range
    c, vmax = float(col_sq.max()), float(np.abs(v).max())
    row_sq = np.einsum("ij,ij->i", v / vmax, v / vmax) if vmax > 0 else np.zeros(nk)
    col = col_sq / c if c > 0 else col_sq
    pos = p > 0
    if np.any(~pos & (col * row_sq > 0)):
        return math.inf
    scaled = float((col[pos] * row_sq[pos] / p[pos]).sum())
    if scaled == 0:
        return 0.0
    return _by_logs([(c, 0.5), (vmax, 1), (scaled, 0.5), (m, -0.5), (delta, -0.5), (op_p, -1), (op_v, -1)])


def g7_bound(m: int, delta: float, captured, second_centred, op_p: float, op_v: float,
             spread=None) -> float:
    """G7: ``sqrt(Σ_i min(s_i/(m h_i²), D_i²) / δ) / (‖P‖_op ‖V‖_op)``, with probability ``≥ 1 − δ``.

    Parameters
    ----------
    m : int
        Samples per query block.
    delta : float
        Failure probability.
    captured, second_centred : array (nq,)
        ``h_i`` and ``s_i`` (:func:`hyperref.theory.self_normalized.direct_moments`).
    op_p, op_v : float
        ``‖P‖_op``, ``‖V‖_op``.
    spread : array (nq,), optional
        ``D_i²``, the largest squared distance of a visible value from ``o_i``;
        without it the cap is not applied (``D_i = ∞``).

    Returns
    -------
    float
        ``inf`` when uncapped and a row with residual error has ``h_i = 0`` or an
        unreachable residual key. A row with ``h_i = 0`` counts as ``D_i²`` even when
        ``s_i = 0``: its normalizer may be ``0``, and then its output is ``0``.
        :func:`g7_tail_bound` is the tighter form.

    Examples
    --------
    >>> round(g7_bound(100, 0.1, [0.5, 1.0], [0.01, 0.0], 1.0, 1.0), 6)
    0.063246
    >>> round(g7_bound(100, 0.1, [0.0, 1.0], [0.01, 0.0], 1.0, 1.0, spread=[0.004, 0.0]), 6)
    0.2
    """
    _check_count(m, "m")
    _check_prob(delta)
    h = np.asarray(captured, dtype=float)
    cap = np.full(h.shape, np.inf) if spread is None else spread
    _check_nonneg(op_p, "op_p")
    _check_nonneg(op_v, "op_v")
    total = float(g7_row_terms(m, h, second_centred, cap).sum())
    denom = op_p * op_v
    if total == 0:
        return 0.0
    return math.inf if denom == 0 else math.sqrt(total / delta) / denom


def g3_direct_bound(m: int, delta: float, second_raw, op_p: float, op_v: float) -> float:
    r"""G3 for the direct mode: the numerator's product error with exact ``D``, w.p. ``≥ 1 − δ``.

    Parameters
    ----------
    m, delta, op_p, op_v
        As in :func:`g7_bound`: samples per query block, failure probability,
        ``‖P‖_op`` and ``‖V‖_op``.
    second_raw : array (nq,)
        ``s^raw_i``, the one-sample second moment of row ``i``'s residual estimate
        (:attr:`hyperref.theory.self_normalized.DirectMoments.second_raw`).

    Returns
    -------
    float
        The bound in units of ``‖P‖_op‖V‖_op`` (``inf`` if a row's second moment is).

    Notes
    -----
    Row ``i`` of ``D⁻¹N − PV`` is ``Σ_{j∈R_i} (W_ij − 1) P_ij v_j``, a mean of ``m``
    i.i.d. centred terms drawn from the block's support (docs/mathematics.md §6b, §7), so

    .. math::
        \mathbb E\|D^{-1}N - PV\|_F^2 = \frac1m\sum_i s^{\rm raw}_i,\qquad
        s^{\rm raw}_i = \sum_{j\in R_i}\frac{P_{ij}^2\|v_j\|^2}{p^{(t)}_j}
                       - \Big\|\sum_{j\in R_i}P_{ij}v_j\Big\|^2,

    and Markov's inequality gives ``‖D⁻¹N − PV‖_op ≤ sqrt(Σ_i s^raw_i / (δ m))``. With
    ``rownorm`` restricted to ``U_t``, ``Σ_i s^raw_i ≤ Σ_t ‖P_res,t‖_F² ‖V_{U_t}‖_F² ≤
    ‖P_res‖_F² ‖V‖_F²`` (``P_res = P∘(1−M_E)``), so :func:`g3_bound` with the exact set's
    ``‖P_res‖_F`` (:func:`hyperref.theory.exact_set_parameters.exact_set_parameters`) holds;
    ``mixed`` (``p ≥ ½ rownorm``) doubles ``‖P_res‖_F²``.

    Examples
    --------
    >>> round(g3_direct_bound(100, 0.1, [0.3, 0.1], 1.0, 2.0), 6)
    0.1
    """
    _check_count(m, "m")
    _check_prob(delta)
    s = np.asarray(second_raw, dtype=float)
    if s.ndim != 1 or np.isnan(s).any() or (s < 0).any():
        raise InputError("second_raw must be a 1-d array of numbers >= 0")
    _check_nonneg(op_p, "op_p")
    _check_nonneg(op_v, "op_v")
    total = float(s.sum())
    if total == 0:
        return 0.0
    denom = op_p * op_v
    return math.inf if denom == 0 else math.sqrt(total / (delta * m)) / denom


def _check_rows(name: str, arr: np.ndarray, like: np.ndarray) -> None:
    if arr.shape != like.shape or arr.ndim != 1 or np.isnan(arr).any() or (arr < 0).any():
        raise InputError(f"{name} must be a 1-d array of numbers >= 0, as long as captured")


def g7_row_terms(m: int, captured, second_centred, spread, second_mass=None, *, grid: int = 64) -> np.ndarray:
    r"""Per-row bounds ``b_i ≥ E‖õ_i − o_i‖²`` of G7 (direct mode, docs/mathematics.md §7).

    Parameters
    ----------
    m : int
        Samples per query block.
    captured, second_centred, spread : array (nq,)
        ``h_i``, ``s_i`` and the cap ``D_i²``
        (:func:`hyperref.theory.self_normalized.direct_moments`).
    second_mass : array (nq,), optional
        ``u_i = Σ_{j∈R_i} P_ij²/p_j``. Without it, the capped form
        ``min(s_i/(m h_i²), D_i²)``; with it, the normalizer-tail form below.
    grid : int
        Number of levels ``λ`` tried per row.

    Returns
    -------
    ndarray (nq,)

    Notes
    -----
    On the event ``d̃_i ≥ λ d_i`` the identity ``õ_i − o_i = (d_i/d̃_i) e_i`` gives
    ``‖õ_i − o_i‖ ≤ ‖e_i‖/λ``; off it, ``‖õ_i − o_i‖ ≤ D_i``. The normalizer's residual part
    is a mean of ``m`` i.i.d. terms ``X ≥ 0`` with mean ``1 − h_i`` and variance
    ``σ_i² = u_i − (1 − h_i)²``, and ``1 − h_i − X ≤ 1 − h_i``, so Bernstein's inequality
    bounds its lower tail:

    .. math::
        b_i = \min\Big(D_i^2,\ \min_{\lambda\in\Lambda_i}
              \Big[\frac{s_i}{m\lambda^2} + D_i^2\,\pi_i(\lambda)\Big]\Big),\qquad
        \pi_i(\lambda) = \exp\Big(-\frac{m(1-\lambda)^2}
              {2\big(\sigma_i^2 + (1-h_i)(1-\lambda)/3\big)}\Big),

    with ``π_i(h_i) = 0`` (``d̃_i ≥ h_i d_i`` always) and
    ``Λ_i = {h_i + (1 − h_i) k/grid : k = 0 … grid − 1}`` (``k ≥ 1`` when ``h_i = 0``).
    ``λ = h_i`` alone is the capped form, so the tail form is never larger. Rows with
    ``s_i = 0`` and ``h_i > 0`` are exact (``b_i = 0``).

    Examples
    --------
    >>> g7_row_terms(100, [0.5, 1.0], [0.01, 0.0], [1.0, 1.0]).round(6)
    array([0.0004, 0.    ])
    >>> bool(g7_row_terms(100, [0.5], [0.01], [1.0], [0.6])[0] < 0.0004)
    True
    """
    _check_count(m, "m")
    _check_count(grid, "grid")
    h = np.asarray(captured, dtype=float)
    s = np.asarray(second_centred, dtype=float)
    cap = np.asarray(spread, dtype=float)
    u = None if second_mass is None else np.asarray(second_mass, dtype=float)
    _check_rows("captured", h, h)
    for name, arr in (("second_centred", s), ("spread", cap), ("second_mass", u)):
        if arr is not None:
            _check_rows(name, arr, h)
    h = np.minimum(h, 1.0)  # a mass is <= 1; rounding may give 1 + ulp
    exact_row = (s == 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        capped = np.where(exact_row, 0.0, np.minimum(np.where(h > 0, s / (m * h**2), np.inf), cap))
    if u is None:
        return capped
    out = capped.copy()
    steps = np.arange(1, grid) / grid
    for start in range(0, len(h), 4096):  # rows in chunks: (rows, grid) temporaries
        sl = slice(start, start + 4096)
        hh, ss, cc, uu = h[sl, None], s[sl, None], cap[sl, None], u[sl, None]
        lam = hh + (1 - hh) * steps[None, :]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            terms = ss / (m * lam**2) + cc * _lower_tail(m, hh, uu, lam)
        best = np.where(np.isfinite(terms), terms, np.inf).min(axis=1)
        out[sl] = np.where(exact_row[sl], 0.0, np.minimum(out[sl], best))
    return out


def _lower_tail(m, h, u, lam):
    """Bernstein's ``Pr[d̃_i < λ d_i] ≤ π_i(λ)`` (broadcasting; 1 where ``u_i = ∞``, for ``λ > h_i``)."""
    gap = np.maximum(1 - lam, 0.0)
    var = np.maximum(u - (1 - h) ** 2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tail = np.exp(-m * gap**2 / (2 * (var + (1 - h) * gap / 3)))
    return np.where(np.isfinite(u), np.nan_to_num(tail, nan=1.0), 1.0)


def normalizer_lower_tail(m: int, captured, second_mass, lam) -> np.ndarray:
    r"""Bernstein's bound on ``Pr[d̃_i < λ_i d_i]`` for the direct mode's self-normalizer.

    Parameters
    ----------
    m : int
        Samples per query block.
    captured, second_mass : array (nq,)
        ``h_i`` and ``u_i = Σ_{j∈R_i} P_ij²/p_j``
        (:func:`hyperref.theory.self_normalized.direct_moments`).
    lam : array (nq,)
        Levels ``λ_i ∈ [h_i, 1]``.

    Returns
    -------
    ndarray (nq,)
        ``π_i(λ_i)``; ``0`` where ``λ_i = h_i`` (``d̃_i ≥ h_i d_i`` always), ``1`` where
        ``u_i = ∞`` (a residual key is never sampled).

    Notes
    -----
    ``d̃_i/d_i = h_i + (1/m) Σ_t X_t`` with i.i.d. ``X_t = [j_t∈R_i] P_{ij_t}/p_{j_t} ≥ 0``,
    ``E X_t = 1 − h_i``, ``Var X_t = σ_i² = u_i − (1 − h_i)²``. The centred terms
    ``(1 − h_i − X_t)/m`` are at most ``(1 − h_i)/m``, so the one-sided Bernstein inequality gives

    .. math::
        \Pr[\tilde d_i < \lambda d_i] \le \exp\Big(-\frac{m(1-\lambda)^2}
        {2\big(\sigma_i^2 + (1-h_i)(1-\lambda)/3\big)}\Big).

    Examples
    --------
    >>> normalizer_lower_tail(100, [0.5, 0.5], [0.5, 0.5], [0.5, 0.9]).round(4)
    array([0.    , 0.1534])
    """
    _check_count(m, "m")
    h, u, lam = (np.asarray(x, dtype=float) for x in (captured, second_mass, lam))
    _check_rows("captured", h, h)
    _check_rows("second_mass", u, h)
    h = np.minimum(h, 1.0)
    if lam.shape != h.shape or np.isnan(lam).any() or (lam < h - _ROUNDING).any() or (lam > 1).any():
        raise InputError("lam must be a 1-d array of levels in [captured, 1], as long as captured")
    return np.where(lam <= h, 0.0, _lower_tail(m, h, u, lam))


def _sum_tail(terms: np.ndarray, cap: np.ndarray, delta: float, query_block: int) -> float:
    """Bernstein bound on ``Σ_t Y_t`` for independent ``Y_t ∈ [0, C_t]`` with ``E Y_t ≤ B_t``."""
    starts = np.arange(0, len(terms), query_block)
    b_t = np.add.reduceat(terms, starts) if len(terms) else np.zeros(0)
    c_t = np.add.reduceat(cap, starts) if len(terms) else np.zeros(0)
    var = float(np.minimum(c_t * b_t, c_t**2 / 4).sum())
    big = float(c_t.max(initial=0.0))
    log = math.log(1 / delta)
    return float(b_t.sum()) + big * log / 3 + math.sqrt((big * log / 3) ** 2 + 2 * var * log)


def g7_tail_forms(m: int, delta: float, captured, second_centred, second_mass, spread,
                  op_p: float, op_v: float, *, query_block: int = 64, grid: int = 64,
                  normalizer_tail: bool = True) -> dict:
    r"""The three forms of G7's tail bound, each valid with probability ``≥ 1 − δ``.

    Parameters
    ----------
    m, delta, captured, second_centred, second_mass, spread
        As in :func:`g7_row_terms`; ``spread`` (the caps ``D_i²``) is required.
    op_p, op_v : float
        ``‖P‖_op``, ``‖V‖_op``.
    query_block : int
        Rows per query block: blocks use independent samples.
    grid : int
        Levels ``λ`` per row (:func:`g7_row_terms`).
    normalizer_tail : bool
        Row terms of the normalizer-tail form (default) or of the capped form (then
        ``second_mass`` is not used); both are valid, the first is never larger.

    Returns
    -------
    dict
        ``{"markov", "bernstein", "cap"}`` in units of ``‖P‖_op‖V‖_op``.

    Notes
    -----
    With the row terms ``b_i`` of :func:`g7_row_terms` and ``Y_t = Σ_{i∈t}‖õ_i − o_i‖²``
    (independent over the query blocks ``t``, ``0 ≤ Y_t ≤ C_t = Σ_{i∈t} D_i²``,
    ``E Y_t ≤ B_t = Σ_{i∈t} b_i``, ``Var Y_t ≤ min(C_t B_t, C_t²/4)``):

    .. math::
        \text{markov} = \sqrt{\tfrac1\delta\textstyle\sum_t B_t},\qquad
        \text{bernstein} = \sqrt{\textstyle\sum_t B_t + \frac{cL}{3}
            + \sqrt{\big(\frac{cL}{3}\big)^2 + 2VL}},\qquad
        \text{cap} = \sqrt{\textstyle\sum_t C_t},

    ``L = log(1/δ)``, ``c = max_t C_t``, ``V = Σ_t min(C_t B_t, C_t²/4)`` (one-sided
    Bernstein inequality), all divided by ``‖P‖_op‖V‖_op`` and bounding
    ``‖Õ − O‖_op ≤ ‖Õ − O‖_F``. All three depend on the inputs (and the exact set's
    draws) only, not on the samples, so their minimum (:func:`g7_tail_bound`) holds with
    probability ``≥ 1 − δ`` as well.
    """
    _check_prob(delta)
    _check_count(query_block, "query_block")
    _check_nonneg(op_p, "op_p")
    _check_nonneg(op_v, "op_v")
    if (normalizer_tail and second_mass is None) or spread is None:
        raise InputError("the tail form of G7 needs second_mass and spread (direct_moments gives both)")
    terms = g7_row_terms(m, captured, second_centred, spread, second_mass if normalizer_tail else None, grid=grid)
    cap = np.asarray(spread, dtype=float)
    sums = {"markov": float(terms.sum()) / delta, "bernstein": _sum_tail(terms, cap, delta, query_block),
            "cap": float(cap.sum())}
    denom = op_p * op_v
    if float(terms.sum()) == 0:
        return {name: 0.0 for name in sums}
    return {name: (math.inf if denom == 0 else math.sqrt(val) / denom) for name, val in sums.items()}


def g7_tail_bound(m: int, delta: float, captured, second_centred, second_mass, spread,
                  op_p: float, op_v: float, *, query_block: int = 64, grid: int = 64) -> float:
    """G7, tail form: the smallest of :func:`g7_tail_forms`, with probability ``≥ 1 − δ``.

    Examples
    --------
    >>> h, s, u, cap = [0.5] * 128, [0.01] * 128, [0.6] * 128, [1.0] * 128
    >>> old = g7_bound(100, 0.1, h, s, 1.0, 1.0, spread=cap)
    >>> new = g7_tail_bound(100, 0.1, h, s, u, cap, 1.0, 1.0, query_block=4)
    >>> round(old, 3), round(new, 3)
    (0.716, 0.526)
    """
    return min(g7_tail_forms(m, delta, captured, second_centred, second_mass, spread, op_p, op_v,
                             query_block=query_block, grid=grid).values())


def g4_bound(eps_prod: float, eta: float) -> float:
    """G4: ``(1 + η) ε_prod + η``."""
    _check_nonneg(eps_prod, "eps_prod")
    _check_nonneg(eta, "eta")
    eps_prod, eta = _as_float(eps_prod), _as_float(eta)
    if eps_prod == 0:  # (1 + η)·0 is 0 also for η = inf
        return eta
    return (1.0 + eta) * eps_prod + eta


def g5_failure(m_d: int, eps: float, rho: float, nq: int) -> float:
    """G5: ``Pr[η > ε/(1−ε)] ≤ min(1, 2 nq exp(−ε² m_d / (2ρ(1 + ε/3))))`` (needs κ ≥ κ_true)."""
    _check_eps(eps, below_one=True)
    _check_count(m_d, "m_d", least=0)
    _check_count(nq, "nq")
    _check_rho(rho)
    eps = float(eps)  # a float32 scalar would round the arithmetic below to float32
    if m_d == 0:
        return 1.0
    # exponent ε² m_d / (2ρ(1 + ε/3)), then min(1, 2 nq e^-exponent) = exp(min(0, log(2 nq) − exponent))
    exponent = _by_logs([(eps, 2), (m_d, 1), (2, -1), (rho, -1), (1 + eps / 3, -1)])
    return math.exp(min(0.0, math.log(2 * nq) - exponent))


def g5_samples(eps: float, delta: float, rho: float, nq: int) -> int:
    """G5: ``m_d = ⌈2ρ(1 + ε/3) log(2nq/δ) / ε²⌉`` gives ``η ≤ ε/(1−ε)`` w.p. ``≥ 1 − δ``."""
    _check_prob(delta)
    _check_eps(eps, below_one=True)
    _check_count(nq, "nq")
    _check_rho(rho)
    log_term = math.log(2 * nq) - math.log(delta)  # no overflow of 2 nq / δ
    return math.ceil(2 * _fraction(rho) * (1 + _fraction(eps) / 3) * Fraction(log_term) / _fraction(eps) ** 2)


def g5_eta(eps: float) -> float:
    """The ``η`` level ``ε/(1 − ε)`` that G5 guarantees."""
    _check_eps(eps, below_one=True)
    eps = float(eps)
    return eps / (1 - eps)


def paper_sample_sizes(eps: float, alpha: float, kappa: float, srank_p: float, d: int, n: int) -> dict:
    """The paper's recalled Ω-bounds with constant 1 (SPEC §7), next to ours.

    Returns ``{"lemma1_approxd": κ⁷α²/ε⁶·log n, "lemma2_product": d·srank(P)/ε²}``.
    """
    _check_eps(eps)
    _check_nonneg(alpha, "alpha")
    _check_real(kappa, "kappa")
    if not 1 <= kappa < math.inf:
        raise InputError(f"kappa must be a finite number >= 1, got {kappa}")
    _check_srank(srank_p, "srank_p")
    _check_count(d, "d")
    _check_count(n, "n")

    def rounded(value: Fraction) -> float:  # exact, rounded once; inf beyond float's range
        try:
            return float(value)
        except OverflowError:
            return math.inf
    log_n = Fraction(math.log(n))
    if alpha == math.inf:
        lemma1 = 0.0 if log_n == 0 else math.inf
    else:
        lemma1 = rounded(_fraction(kappa) ** 7 * _fraction(alpha) ** 2 / _fraction(eps) ** 6 * log_n)
    return {
        "lemma1_approxd": lemma1,
        "lemma2_product": rounded(_fraction(d) * _fraction(srank_p) / _fraction(eps) ** 2),
    }
