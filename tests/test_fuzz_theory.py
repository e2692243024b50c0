"""Fuzzing the theory: bounds equal their formulas (mpmath at 50 digits) or arguments are refused.

Every argument of the bound functions of :mod:`hyperref.theory.bounds` is drawn from its
domain (with the edges: subnormal, ``1e300``, ``inf`` where a bound may be vacuous, integers
beyond float's range) or from outside it (NaN, negative, strings, bools, arrays, ``None``).
In the domain the answer must be the formula's value within a derived tolerance (``+inf`` only
when that value is beyond float's range); outside it, an :class:`hyperref.InputError` naming the
argument. :func:`hyperref.theory.parameters.attention_parameters` is checked against dense
float64 formulas of SPEC §2 on small inputs.
"""

import math
import sys
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hyperref.theory import bounds
from hyperref.theory.parameters import attention_parameters, spectral_error

from .fuzz import answer, attention_case, examples, expect_input_error, standard_qkv, verdict

mpmath.mp.dps = 50
U = sys.float_info.epsilon / 2
TINY = sys.float_info.min

NOT_REAL = [math.nan, None, "0.5", True, 1j, np.array([0.5, 0.5]), [0.5]]


def _real(lo, hi, *, lo_open=True, hi_open=True, inf=False):
    """Valid reals in ``(lo, hi)`` (ends open or closed) with the extreme floats and numpy scalars."""
    edges = [5e-324, 1e-300, 1e-160, 1e-8, 0.1, 0.5, 1.0 - 2**-53, 1.0, 1.0 + 2**-52, 2.0, 7, 1e10, 1e150,
             1e300, sys.float_info.max, 10**400, math.inf, 0.0, np.float32(0.5), np.float64(3.0), np.int64(4)]

    def ok(x):
        x = float(x) if not isinstance(x, int) or abs(x) < 1e308 else x
        above = lo < x if lo_open else lo <= x
        below = x < hi if hi_open else x <= hi
        return above and below and (inf or x != math.inf)
    pool = [x for x in edges if ok(x)]
    floats = st.floats(min_value=lo, max_value=hi if hi < math.inf else 1e300, exclude_min=lo_open,
                       exclude_max=hi_open, allow_nan=False, allow_infinity=False).filter(ok)
    return st.one_of(st.sampled_from(pool), floats)


def _invalid_real(lo, hi, inf=False):
    outside = [lo - 1.0 if lo > -math.inf else None, -math.inf] + ([] if inf else [math.inf])
    if hi < math.inf:
        outside += [hi + 0.5, hi]
    if lo == 0:
        outside.append(0.0)
    return st.sampled_from([x for x in outside + NOT_REAL if x is not None])


COUNT = st.one_of(st.integers(1, 10**6), st.sampled_from([2**62, 2**63 + 1, 10**30, 10**400, 3.0, np.int64(5)]))
BAD_COUNT = st.sampled_from([0, -3, 2.5, math.inf, math.nan, True, "4", None, np.array([3])])

#: name -> (valid strategy, invalid strategy)
ARGS = {
    "delta": (_real(0, 1), _invalid_real(0, 1)),
    "eps": (_real(0, math.inf), _invalid_real(0, math.inf)),
    "eps1": (_real(0, 1), _invalid_real(0, 1)),
    "nonneg": (_real(0, math.inf, lo_open=False, inf=True), st.sampled_from([-1.0, -1e-300, -math.inf] + NOT_REAL)),
    "alpha": (_real(0, math.inf, lo_open=False), st.sampled_from([-1.0, math.inf] + NOT_REAL)),
    "srank": (st.one_of(st.just(0.0), _real(1, math.inf, lo_open=False)),
              st.sampled_from([0.5, -1.0, math.inf] + NOT_REAL)),
    "rho": (_real(1, math.inf, lo_open=False), st.sampled_from([0.5, 0.0, math.inf] + NOT_REAL)),
    "kappa": (_real(1, math.inf, lo_open=False), st.sampled_from([0.5, math.inf] + NOT_REAL)),
    "count": (COUNT, BAD_COUNT),
    "count0": (st.one_of(st.just(0), COUNT), st.sampled_from([-1, 2.5, True, None])),
}


def _mp(x):
    return mpmath.mpf(int(x)) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else mpmath.mpf(float(x))


def _sqrt(x):
    return mpmath.sqrt(x)


def _ceil(x):
    return int(mpmath.ceil(x))


def _fr(x):
    return Fraction(int(x)) if isinstance(x, (int, np.integer)) else Fraction(float(x))


def _g2_samples(eps, delta, sp, sv):
    return max(1, math.ceil(_fr(sp) * _fr(sv) / (_fr(delta) * _fr(eps) ** 2)))


def _g3(m, delta, fro, op, sv):
    if op == 0 or fro == 0 or sv == 0:
        return mpmath.mpf(0)
    if op == math.inf:
        return mpmath.inf if fro == math.inf else mpmath.mpf(0)
    return _sqrt(_mp(fro) ** 2 * _mp(sv) / (_mp(delta) * _mp(m))) / _mp(op)


#: function -> (argument kinds, oracle, result kind: "real" or "count")
FUNCTIONS = {
    "g1_bound": (["nonneg"], lambda eta: _mp(eta), "real"),
    "g2_bound": (["count", "delta", "srank", "srank"],
                 lambda m, d, sp, sv: _sqrt(_mp(sp) * _mp(sv) / (_mp(d) * _mp(m))), "real"),
    "g2_samples": (["eps", "delta", "srank", "srank"], _g2_samples, "count"),
    "g2_samples_alpha": (["eps", "delta", "alpha", "srank", "count", "count"],
                         lambda e, d, a, sv, nq, nk: max(1, math.ceil(_fr(a) * _fr(sv) * _fr(nk) / (
                             _fr(nq) * _fr(d) * _fr(e) ** 2))), "count"),
    "g3_bound": (["count", "delta", "nonneg", "nonneg", "srank"], _g3, "real"),
    "g4_bound": (["nonneg", "nonneg"],
                 lambda e, eta: _mp(eta) if e == 0 else (1 + _mp(eta)) * _mp(e) + _mp(eta), "real"),
    "g5_failure": (["count0", "eps1", "rho", "count"],
                   lambda md, e, rho, nq: min(mpmath.mpf(1), 2 * _mp(nq) * mpmath.exp(
                       -_mp(e) ** 2 * _mp(md) / (2 * _mp(rho) * (1 + _mp(e) / 3)))), "real"),
    "g5_samples": (["eps1", "delta", "rho", "count"],
                   lambda e, d, rho, nq: 2 * _mp(rho) * (1 + _mp(e) / 3) * mpmath.log(2 * _mp(nq) / _mp(d))
                   / _mp(e) ** 2, "ceil"),
    "g5_eta": (["eps1"], lambda e: _mp(e) / (1 - _mp(e)), "real"),
}


def _log_size(args):
    """``Σ |ln x|`` over the positive finite numeric arguments: how far a log-domain or rounded
    evaluation's relative error ``(8 + Σ|ln x|)·4u`` may grow."""
    total = 0.0
    for a in args:
        if isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool) and 0 < a < math.inf:
            total += abs(math.log(a)) if not isinstance(a, int) else abs(math.log(a))
    return total


def _check_value(name, got, want, args):
    """``got`` within ``(8 + Σ|ln x|)·4u·(1 + |ln want|)`` of ``want`` relative: an evaluation by
    logarithms has that relative error in the exponent, which ``exp`` scales by its size."""
    rel = 4 * U * (8 + _log_size(args))
    if want is not None and 0 < want < mpmath.inf:
        rel *= 1 + abs(float(mpmath.log(mpmath.mpf(want))))
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return verdict(False, f"{name}{args} returned {type(got).__name__} {got!r}")
    if want is None:  # the formula is infinite: inf, vacuous
        return verdict(got == math.inf, f"{name}{args} = {got}, expected inf")
    want = mpmath.mpf(want)
    if want > sys.float_info.max:
        return verdict(got == math.inf or abs(mpmath.mpf(got) - want) <= rel * want,
                       f"{name}{args} = {got}, the formula is {mpmath.nstr(want, 8)}")
    ok = not math.isnan(got) and got >= 0 and (abs(mpmath.mpf(got) - want) <= rel * want + 4 * 5e-324)
    verdict(ok, f"{name}{args} = {got!r}, the formula is {mpmath.nstr(want, 17)}")


@settings(max_examples=examples(600))
@given(st.data())
def test_bound_functions_equal_their_formulas_or_refuse(data):
    name = data.draw(st.sampled_from(sorted(FUNCTIONS)), label="function")
    kinds, oracle, result = FUNCTIONS[name]
    bad = data.draw(st.sampled_from([None, None, None] + list(range(len(kinds)))), label="bad argument")
    args = [data.draw(ARGS[kind][1 if i == bad else 0], label=f"arg {i} ({kind})") for i, kind in enumerate(kinds)]
    fn = getattr(bounds, name)
    if bad is not None:
        expect_input_error(lambda: fn(*args), "must", "got")
        return
    got = answer(lambda: fn(*args))
    if result == "count":
        want = oracle(*args)
        if want is None:
            verdict(False, f"{name}{args} = {got}: the formula is infinite")
        verdict(isinstance(got, int) and not isinstance(got, bool) and got == want,
                f"{name}{tuple(args)} = {got!r}, exactly {want}")
        return
    if result == "ceil":  # a float logarithm inside: either neighbour of the exact ceiling
        value = oracle(*args)
        rel = 4 * U * (8 + _log_size(args))
        lo, hi = _ceil(value * (1 - rel)), _ceil(value * (1 + rel))
        verdict(isinstance(got, int) and not isinstance(got, bool) and lo <= got <= hi,
                f"{name}{tuple(args)} = {got!r}, the formula's ceiling is {lo}..{hi}")
        return
    want = oracle(*args)
    _check_value(name, got, None if want == mpmath.inf else want, args)


@settings(max_examples=examples(60))
@given(st.data())
def test_paper_sample_sizes(data):
    kinds = ["eps", "nonneg", "kappa", "srank", "count", "count"]
    bad = data.draw(st.sampled_from([None, None] + list(range(len(kinds)))), label="bad argument")
    args = [data.draw(ARGS[k][1 if i == bad else 0], label=f"arg {i}") for i, k in enumerate(kinds)]
    if bad is not None:
        expect_input_error(lambda: bounds.paper_sample_sizes(*args), "must", "got")
        return
    eps, alpha, kappa, srank, d, n = args
    got = answer(lambda: bounds.paper_sample_sizes(*args))
    if alpha == math.inf:
        verdict(got["lemma1_approxd"] == (0.0 if n == 1 else math.inf), f"{got}")
        return
    lemma1 = _mp(kappa) ** 7 * _mp(alpha) ** 2 / _mp(eps) ** 6 * mpmath.log(_mp(n))
    lemma2 = _mp(d) * _mp(srank) / _mp(eps) ** 2
    _check_value("paper_sample_sizes lemma1", got["lemma1_approxd"], lemma1, args)
    _check_value("paper_sample_sizes lemma2", got["lemma2_product"], lemma2, args)


@settings(max_examples=examples(60))
@given(st.data())
def test_product_bound(data):
    """``sqrt(Σ_j col_j ‖v_j‖² / p_j / (m δ)) / (‖P‖‖V‖)`` for matching arrays, or an InputError."""
    nk, dv = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    col = rng.random(nk) * 10.0 ** data.draw(st.integers(-150, 150))
    v = rng.standard_normal((nk, dv)) * 10.0 ** data.draw(st.integers(-100, 100))
    p = rng.random(nk) + 0.01
    p /= p.sum()
    args = dict(m=data.draw(ARGS["count"][0]), delta=data.draw(ARGS["delta"][0]), col_sq=col, v=v, p=p,
                op_p=float(rng.random() + 0.1), op_v=float(np.linalg.norm(v, 2)))
    bad = data.draw(st.sampled_from([None, None, "shape col", "shape v", "shape p", "nan col", "negative p",
                                     "p sums to 2", "strings", "m", "delta", "op_p"]), label="bad")
    if bad is not None:
        change = {"shape col": dict(col_sq=col[:-1] if nk > 1 else np.ones(2)),
                  "shape v": dict(v=v[:-1] if nk > 1 else np.ones((2, dv))),
                  "shape p": dict(p=np.append(p, 0.0)), "nan col": dict(col_sq=np.full(nk, np.nan)),
                  "negative p": dict(p=-p), "p sums to 2": dict(p=2 * p), "strings": dict(col_sq=["a"] * nk),
                  "m": dict(m=0), "delta": dict(delta=1.5), "op_p": dict(op_p=-1.0)}[bad]
        expect_input_error(lambda: bounds.product_bound(**(args | change)), "must", "got")
        return
    got = answer(lambda: bounds.product_bound(**args))
    second = sum(_mp(c) * sum(_mp(x) ** 2 for x in row) / _mp(pj) for c, row, pj in zip(col, v, p))
    want = _sqrt(second / (_mp(args["m"]) * _mp(args["delta"]))) / (_mp(args["op_p"]) * _mp(args["op_v"]))
    # the sum of nk terms of products of dv squares in float64: (nk + dv + 4) u relative, halved by sqrt
    _check_value("product_bound", got, want, [args["m"], args["delta"], args["op_p"], args["op_v"],
                                              1 + abs(math.log(float(max(col.max(), 1e-300)))) * (nk + dv)])


# ---------------------------------------------------------------------------------------------
# attention_parameters: dense float64 formulas of SPEC §2


def _dense_parameters(q, k, v, scale, causal):
    wide = np.longdouble
    logits = (q.astype(wide) @ k.T.astype(wide)) * wide(scale)
    nq, nk = logits.shape
    visible = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq) if causal else np.ones_like(logits, bool)
    logits = np.where(visible, logits, -np.inf)
    peak = logits.max(axis=1, keepdims=True)
    a = np.where(visible, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0)
    p = (a / np.maximum(a.sum(axis=1, keepdims=True), np.finfo(wide).tiny)).astype(np.float64)
    op = float(np.linalg.norm(p, 2))
    return dict(alpha=nk * float((p ** 2).sum(axis=0).max()), fro_p=float(np.linalg.norm(p)), op_p=op,
                max_abs_logit=float(np.abs(np.where(visible, logits, 0)).max()))


@settings(max_examples=examples(60))
@given(st.data())
def test_attention_parameters_equal_the_dense_formulas(data):
    case = data.draw(attention_case(max_n=10, allow_empty=False, batched=False, near_max=False,
                                    dtypes=[np.float32, np.float64], regimes=("normal",)))
    q, k, v, causal = case["q"], case["k"], case["v"], case["causal"]
    s = 1 / math.sqrt(q.shape[1]) if case["scale"] is None else case["scale"]
    par = answer(lambda: attention_parameters(q, k, v, case["scale"], causal=causal))
    want = _dense_parameters(q, k, v, s, causal)
    u = np.finfo(np.result_type(q.dtype, np.float32)).eps
    # logits off by d·u·|s|·|q||k| move P by that (relative), the Krylov value is within 1e-6 (residual)
    delta = (q.shape[1] + 1) * u * abs(s) * float((np.abs(q) @ np.abs(k).T).max()) + (len(k) + 4) * u
    rel = math.expm1(2 * delta) * 4 + 4 * u * len(k)
    bad = [key for key in ("alpha", "fro_p", "max_abs_logit")
           if not abs(getattr(par, key) - want[key]) <= rel * max(want[key], 1e-300) + 1e-300]
    op_tol = max(par.op_p_residual, 1e-6) + rel  # a Ritz value: within its residual of an eigenvalue
    if not abs(par.op_p - want["op_p"]) <= 2 * op_tol * want["op_p"]:
        bad.append("op_p")
    verdict(not bad, f"attention_parameters: {[(b, getattr(par, b), want[b]) for b in bad]}")


def test_attention_parameters_with_logits_beyond_float64():
    """Logits near 1e320 (longdouble in exact attention) keep their row log-sums in longdouble."""
    q, k, v = standard_qkv(6, 4)
    par = answer(lambda: attention_parameters(q * 1e160, k * 1e160, v),
                 refusal_ok=lambda err: "range" in str(err))
    verdict(math.isfinite(par.op_p) and math.isfinite(par.alpha), f"{par}")
    want = _dense_parameters(q * 1e160, k * 1e160, v, 0.5, False)
    bad = [key for key in ("alpha", "fro_p", "op_p") if not abs(getattr(par, key) - want[key]) <= 1e-6 * want[key]]
    verdict(not bad, f"attention_parameters: {[(b, getattr(par, b), want[b]) for b in bad]}")


@pytest.mark.parametrize("kwargs, word", [(dict(mask="x"), "mask"), (dict(rng=-1), "rng")])
def test_attention_parameters_refuses_bad_mask_and_rng(kwargs, word):
    q = np.random.default_rng(0).standard_normal((6, 4))
    expect_input_error(lambda: attention_parameters(q, q, q, **kwargs), word)


@pytest.mark.parametrize("mutation", [
    pytest.param(lambda a: (np.full_like(a, np.nan), a, 1.0, 1.0), id="nan approx"),
    pytest.param(lambda a: (a, np.full_like(a, np.inf), 1.0, 1.0), id="inf exact"),
    pytest.param(lambda a: (a, a, "1", 1.0), id="str op_p"),
    pytest.param(lambda a: (a, a, 1.0, None), id="None op_v"),
    pytest.param(lambda a: (a, a, math.nan, 1.0), id="nan op_p"),
    pytest.param(lambda a: (a, a[:-1], 1.0, 1.0), id="shape"),
    pytest.param(lambda a: (a[0], a[0], 1.0, 1.0), id="1-d"),
])
def test_spectral_error_refuses_what_it_cannot_measure(mutation):
    a = np.random.default_rng(0).standard_normal((5, 3))
    expect_input_error(lambda: spectral_error(*mutation(a)), "must", "nan", "inf", "finite")


def test_float32_scalars_are_computed_in_float64():
    """``g5_failure(7, np.float32(0.5), 1, 1)`` was rounded to float32 (0.9447330813 vs 0.9447331055)."""
    want = float(2 * mpmath.exp(-mpmath.mpf(0.25) * 7 / (2 * (1 + mpmath.mpf(0.5) / 3))))
    got = bounds.g5_failure(7, np.float32(0.5), 1.0, 1)
    verdict(abs(got - min(want, 1.0)) <= 8 * U, f"{got} vs {want}")
