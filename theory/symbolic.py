"""Symbolic checks (sympy) of the identities behind G2, G4 and G5 (SPEC §7).

Each function returns the simplified difference between the two sides, which
is 0 when the identity holds; ``tests/test_theory.py`` asserts it.
"""

from __future__ import annotations

import itertools

import sympy as sp


def g2_variance_identity(nq: int = 2, nk: int = 3, dv: int = 2, m: int = 2) -> sp.Expr:
    """``E‖P SᵀS V − PV‖_F² − (1/m)(Σ_j ‖Pe_j‖²‖v_j‖²/p_j − ‖PV‖_F²)``, exactly.

    ``P``, ``V`` and the distribution ``p`` (last entry ``1 − Σ`` of the others)
    are symbols; the expectation is the finite sum over all ``nk^m`` sample
    sequences. ``SᵀS = (1/m) Σ_t e_{j_t} e_{j_t}ᵀ / p_{j_t}``.
    """
    P = sp.Matrix(nq, nk, lambda i, j: sp.Symbol(f"P{i}{j}", real=True))
    V = sp.Matrix(nk, dv, lambda i, j: sp.Symbol(f"V{i}{j}", real=True))
    free = sp.symbols(f"p0:{nk - 1}", positive=True)
    p = list(free) + [1 - sum(free)]
    target = P * V
    expectation = 0
    for seq in itertools.product(range(nk), repeat=m):
        prob = sp.Mul(*[p[j] for j in seq])
        C = sp.zeros(nk, nk)
        for j in seq:
            C[j, j] += 1 / (m * p[j])
        err = P * C * V - target
        expectation += prob * sum(e**2 for e in err)
    col_sq = [sum(P[i, j] ** 2 for i in range(nq)) for j in range(nk)]
    row_sq = [sum(V[j, c] ** 2 for c in range(dv)) for j in range(nk)]
    formula = (sum(col_sq[j] * row_sq[j] / p[j] for j in range(nk))
               - sum(e**2 for e in target)) / m
    return sp.simplify(sp.together(expectation - formula))


def g4_composition_identity(n: int = 3, dv: int = 2) -> sp.Matrix:
    """``D̃⁻¹N − D⁻¹AV − [(D̃⁻¹D)(D⁻¹N − D⁻¹AV) + (D̃⁻¹D − I) D⁻¹AV]`` (zero matrix)."""
    d = sp.symbols(f"d0:{n}", positive=True)
    dt = sp.symbols(f"dt0:{n}", positive=True)
    D, Dt = sp.diag(*d), sp.diag(*dt)
    N = sp.Matrix(n, dv, lambda i, j: sp.Symbol(f"N{i}{j}"))
    AV = sp.Matrix(n, dv, lambda i, j: sp.Symbol(f"X{i}{j}"))
    lhs = Dt.inv() * N - D.inv() * AV
    rhs = (Dt.inv() * D) * (D.inv() * N - D.inv() * AV) + (Dt.inv() * D - sp.eye(n)) * D.inv() * AV
    return sp.simplify(lhs - rhs)


def g1_identity(n: int = 3) -> sp.Matrix:
    """``D̃⁻¹A − D⁻¹A − (D D̃⁻¹ − I) D⁻¹A`` (zero matrix)."""
    d = sp.symbols(f"d0:{n}", positive=True)
    dt = sp.symbols(f"dt0:{n}", positive=True)
    D, Dt = sp.diag(*d), sp.diag(*dt)
    A = sp.Matrix(n, n, lambda i, j: sp.Symbol(f"A{i}{j}"))
    return sp.simplify(Dt.inv() * A - D.inv() * A - (D * Dt.inv() - sp.eye(n)) * D.inv() * A)


def g5_bernstein_exponent() -> sp.Expr:
    """Bernstein's exponent ``t²/(2(σ² + bt/3))`` with ``t = εr``, ``σ² = ρr²/m``,
    ``b = ρr/m``, minus the stated ``ε² m / (2ρ(1 + ε/3))`` (zero)."""
    eps, r, rho, m = sp.symbols("epsilon r rho m", positive=True)
    t, var, b = eps * r, rho * r**2 / m, rho * r / m
    return sp.simplify(t**2 / (2 * (var + b * t / 3)) - eps**2 * m / (2 * rho * (1 + eps / 3)))
