"""The guarantees G1–G5 and G7 of SPEC §7 with explicit constants.

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

Paper, recalled (SPEC §7): Lemma 1 needs ``m = Ω(κ⁷ α²/ε⁶ · log n)`` for
ApproxD; Lemma 2 needs ``m = Ω(ε⁻² d · srank(D⁻¹A))`` for the product.
:func:`paper_sample_sizes` evaluates them with the hidden constant set to 1.
"""

from __future__ import annotations

import math

import numpy as np

from hyperref._validation import InputError


# Argument checks. Comparisons are written so that NaN fails them.
_ROUNDING = 1e-9  # stable ranks and entry ratios are >= 1 exactly, computed ones up to rounding


def _check_prob(delta: float) -> None:
    if not 0 < delta < 1:
        raise InputError(f"delta must be in (0, 1), got {delta}")


def _check_eps(eps: float, below_one: bool = False) -> None:
    if not (0 < eps < (1 if below_one else math.inf)):
        raise InputError(f"eps must be in (0, {1 if below_one else 'inf'}), got {eps}")


def _check_nonneg(x: float, name: str) -> None:
    """``x >= 0`` (``inf`` allowed: a bound may be vacuous, not wrong)."""
    if not x >= 0:
        raise InputError(f"{name} must be >= 0, got {x}")


def _check_count(x: int, name: str, least: int = 1) -> None:
    if isinstance(x, bool) or not float(x).is_integer() or x < least:
        raise InputError(f"{name} must be an integer >= {least}, got {x}")


def _check_rho(rho: float) -> None:
    """The residual entry ratio ``ρ = max_i nk max_j A^res_ij / r_i`` is ``>= 1``."""
    if not 1 - _ROUNDING <= rho < math.inf:
        raise InputError(f"rho must be a finite number >= 1, got {rho}")


def _check_srank(x: float, name: str) -> None:
    """A stable rank ``‖X‖_F²/‖X‖_op²`` is 0 (the zero matrix, by convention) or ``>= 1``."""
    if not (x == 0 or 1 - _ROUNDING <= x < math.inf):
        raise InputError(f"{name} must be 0 (zero matrix) or a finite number >= 1, got {x}")


def g1_bound(eta: float) -> float:
    """G1: the normalizer's contribution ``η`` (deterministic)."""
    _check_nonneg(eta, "eta")
    return float(eta)


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
    return math.sqrt(srank_p * srank_v / (delta * m))


def g2_samples(eps: float, delta: float, srank_p: float, srank_v: float) -> int:
    """Samples for G2 ≤ ε: ``m = ⌈srank(P) srank(V) / (δ ε²)⌉``."""
    _check_prob(delta)
    _check_eps(eps)
    _check_srank(srank_p, "srank_p")
    _check_srank(srank_v, "srank_v")
    return max(1, math.ceil(srank_p * srank_v / (delta * eps**2)))


def g2_samples_alpha(eps: float, delta: float, alpha: float, srank_v: float, nq: int, nk: int) -> int:
    """Samples for G2 ≤ ε via ``srank(P) ≤ α nk/nq``: ``⌈α srank(V) (nk/nq) / (δ ε²)⌉``."""
    _check_count(nq, "nq")
    _check_count(nk, "nk")
    _check_nonneg(alpha, "alpha")
    return g2_samples(eps, delta, alpha * nk / nq, srank_v)


def g3_bound(m: int, delta: float, fro_res: float, op_p: float, srank_v: float) -> float:
    """G3: ``sqrt(‖P_res‖_F² srank(V) / (δ m)) / ‖P‖_op`` (``masked`` estimator, exact D)."""
    _check_prob(delta)
    _check_count(m, "m")
    _check_srank(srank_v, "srank_v")
    _check_nonneg(fro_res, "fro_res")
    _check_nonneg(op_p, "op_p")
    if op_p == 0:  # P = 0, so P_res = 0: no error
        return 0.0
    return math.sqrt(fro_res**2 * srank_v / (delta * m)) / op_p


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
    col_sq = np.asarray(col_sq, dtype=np.float64)
    row_sq = np.einsum("ij,ij->i", np.asarray(v, dtype=np.float64), np.asarray(v, dtype=np.float64))
    p = np.asarray(p, dtype=np.float64)
    pos = p > 0
    if np.any(~pos & (col_sq * row_sq > 0)):
        return math.inf
    second = float((col_sq[pos] * row_sq[pos] / p[pos]).sum()) / m
    denom = op_p * op_v
    return math.sqrt(second / delta) / denom if denom > 0 else 0.0


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
        unreachable residual key.

    Examples
    --------
    >>> round(g7_bound(100, 0.1, [0.5, 1.0], [0.01, 0.0], 1.0, 1.0), 6)
    0.063246
    >>> round(g7_bound(100, 0.1, [0.0, 1.0], [0.01, 0.0], 1.0, 1.0, spread=[0.004, 0.0]), 6)
    0.2
    """
    _check_count(m, "m")
    _check_prob(delta)
    h, s = np.asarray(captured, dtype=float), np.asarray(second_centred, dtype=float)
    cap = np.full(h.shape, np.inf) if spread is None else np.asarray(spread, dtype=float)
    for name, arr in (("captured", h), ("second_centred", s), ("spread", cap)):
        if arr.shape != h.shape or arr.ndim != 1 or np.isnan(arr).any() or (arr < 0).any():
            raise InputError(f"{name} must be a 1-d array of numbers >= 0, as long as captured")
    _check_nonneg(op_p, "op_p")
    _check_nonneg(op_v, "op_v")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.minimum(np.where(s > 0, s / (m * h**2), 0.0), cap)
    total = float(terms.sum())
    denom = op_p * op_v
    if total == 0:
        return 0.0
    return math.inf if denom == 0 else math.sqrt(total / delta) / denom


def g4_bound(eps_prod: float, eta: float) -> float:
    """G4: ``(1 + η) ε_prod + η``."""
    _check_nonneg(eps_prod, "eps_prod")
    _check_nonneg(eta, "eta")
    return (1.0 + eta) * eps_prod + eta


def g5_failure(m_d: int, eps: float, rho: float, nq: int) -> float:
    """G5: ``Pr[η > ε/(1−ε)] ≤ min(1, 2 nq exp(−ε² m_d / (2ρ(1 + ε/3))))`` (needs κ ≥ κ_true)."""
    _check_eps(eps, below_one=True)
    _check_count(m_d, "m_d", least=0)
    _check_count(nq, "nq")
    _check_rho(rho)
    return min(1.0, 2 * nq * math.exp(-eps**2 * m_d / (2 * rho * (1 + eps / 3))))


def g5_samples(eps: float, delta: float, rho: float, nq: int) -> int:
    """G5: ``m_d = ⌈2ρ(1 + ε/3) log(2nq/δ) / ε²⌉`` gives ``η ≤ ε/(1−ε)`` w.p. ``≥ 1 − δ``."""
    _check_prob(delta)
    _check_eps(eps, below_one=True)
    _check_count(nq, "nq")
    _check_rho(rho)
    return math.ceil(2 * rho * (1 + eps / 3) * math.log(2 * nq / delta) / eps**2)


def g5_eta(eps: float) -> float:
    """The ``η`` level ``ε/(1 − ε)`` that G5 guarantees."""
    _check_eps(eps, below_one=True)
    return eps / (1 - eps)


def paper_sample_sizes(eps: float, alpha: float, kappa: float, srank_p: float, d: int, n: int) -> dict:
    """The paper's recalled Ω-bounds with constant 1 (SPEC §7), next to ours.

    Returns ``{"lemma1_approxd": κ⁷α²/ε⁶·log n, "lemma2_product": d·srank(P)/ε²}``.
    """
    _check_eps(eps)
    _check_nonneg(alpha, "alpha")
    if not 1 <= kappa < math.inf:
        raise InputError(f"kappa must be a finite number >= 1, got {kappa}")
    _check_srank(srank_p, "srank_p")
    _check_count(d, "d")
    _check_count(n, "n")
    return {
        "lemma1_approxd": kappa**7 * alpha**2 / eps**6 * math.log(n),
        "lemma2_product": d * srank_p / eps**2,
    }
