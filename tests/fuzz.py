"""Shared pieces of the fuzz suite (``tests/test_fuzz*.py``): outcome counts, oracles, tolerances.

The rule every public function is held to: **a correct answer or an** :class:`hyperref.InputError`,
**never a wrong number, never an unclear crash** (docs/bad_inputs.md). Every generated call is
classified into one of four outcomes and counted in :data:`OUTCOMES`; ``tests/conftest.py``
prints the counts at the end of a run.

* ``correct``: the answer agrees with its oracle within a derived tolerance;
* ``clear error``: an :class:`~hyperref.InputError` whose message names the problem;
* ``wrong``: a number that disagrees with the oracle, or an invalid input accepted;
* ``unclear``: any other exception, or an ``InputError`` that does not name the problem.

Tolerances are derived from the unit roundoff ``u`` of the dtype a result is computed in
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1: an inner product of length
``n`` has absolute error ``<= γ_n Σ|x_i y_i|``, ``γ_n = n u / (1 − n u)``), never chosen by hand.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from hypothesis import event, settings, strategies as st
from hypothesis.errors import InvalidArgument

from hyperref import InputError

OUTCOMES: Counter = Counter()
KINDS = ("correct", "clear error", "wrong", "unclear")

#: real floating dtypes NumPy has here (longdouble only where it is wider than float64)
FLOAT_DTYPES = [np.float16, np.float32, np.float64] + (
    [np.longdouble] if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else [])


def examples(n: int) -> int:
    """``n`` examples in the ``ci`` profile, scaled with the active profile's ``max_examples``."""
    return max(1, n * settings.default.max_examples // 20)


def record(kind: str) -> None:
    """Count one outcome (also a Hypothesis event: ``--hypothesis-show-statistics`` lists them)."""
    assert kind in KINDS, kind
    OUTCOMES[kind] += 1
    try:
        event(f"outcome: {kind}")
    except InvalidArgument:  # outside a Hypothesis test (the xfail regression tests)
        pass


def verdict(ok: bool, message: str) -> None:
    """Record ``correct`` or ``wrong`` and fail the example when wrong."""
    record("correct" if ok else "wrong")
    assert ok, message


def expect_input_error(call, *words):
    """``call()`` must raise an :class:`InputError` whose message contains one of ``words``."""
    try:
        result = call()
    except InputError as err:
        text = str(err).lower()
        named = not words or any(w.lower() in text for w in words)
        record("clear error" if named else "unclear")
        assert named, f"InputError does not name {words}: {err}"
        assert "\n" not in str(err).strip(), f"the message is not one line: {err!r}"
        return err
    except Exception as err:  # noqa: BLE001 - the point is to classify every exception
        record("unclear")
        raise AssertionError(f"expected an InputError naming {words}, got "
                             f"{type(err).__name__}: {err}") from err
    record("wrong")
    raise AssertionError(f"invalid input accepted (expected an InputError naming {words}); "
                         f"returned {type(result).__name__}")


class Refused(Exception):
    """Raised by :func:`answer` when a valid input was refused with an allowed InputError."""


def answer(call, refusal_ok=lambda err: False):
    """``call()`` on a valid input: its result, or :class:`Refused` if it raised an InputError
    that ``refusal_ok`` allows (a documented limit such as logits beyond float64's range).
    Any other exception is an unclear crash."""
    try:
        return call()
    except InputError as err:
        if refusal_ok(err):
            record("clear error")
            raise Refused(str(err)) from None
        record("unclear")
        raise AssertionError(f"valid input refused: {err}") from err
    except Exception as err:  # noqa: BLE001
        record("unclear")
        raise AssertionError(f"valid input crashed: {type(err).__name__}: {err}") from err


def eps(dtype) -> float:
    """Machine epsilon (twice the unit roundoff) of a floating dtype, as a Python float."""
    return float(np.finfo(dtype).eps)


def standard_qkv(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``q, k, v`` of the regression tests: three ``(n, d)`` standard normal arrays, one draw
    ``(3, n, d)`` of ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal((3, n, d))


def longdouble_or_float64():
    return np.longdouble if np.longdouble in FLOAT_DTYPES else np.float64


def oracle_attention(q, k, v, scale, causal):
    """Exact attention of one head in the widest float NumPy has (one O(nq·nk) array).

    Returns ``(out, lse, visible)`` as that wide dtype; rows that see no key give ``out = 0``,
    ``lse = −inf``. Logits are formed in the wide dtype, so float64 inputs whose logits
    exceed float64's range are still exact where ``longdouble`` is the x87 80-bit format.
    """
    wide = longdouble_or_float64()
    q, k, v = (np.asarray(x).astype(wide) for x in (q, k, v))
    nq, nk = len(q), len(k)
    with np.errstate(over="ignore", invalid="ignore"):
        logits = (q @ k.T) * wide(scale)
    visible = visible_mask(nq, nk, causal)
    logits = np.where(visible, logits, -np.inf)
    peak = logits.max(axis=1, initial=-np.inf)
    seen = visible.any(axis=1)
    shift = np.where(seen, peak, 0)
    with np.errstate(under="ignore"):
        w = np.where(visible, np.exp(logits - shift[:, None]), 0)
    total = w.sum(axis=1)
    out = np.where(seen[:, None], (w / np.where(seen, total, 1)[:, None]) @ v, 0)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, shift + np.log(np.where(seen, total, 1)), -np.inf)
    return out, lse, visible


def visible_mask(nq, nk, causal):
    """Bottom-right aligned visibility: query ``i`` sees key ``j`` iff ``j <= i + nk − nq``."""
    if not causal:
        return np.ones((nq, nk), dtype=bool)
    return np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)


def logit_perturbation(q, k, scale, dtype) -> float:
    """Bound ``δ`` on ``|fl(s·q_i·k_j) − s·q_i·k_j|`` over all entries (all heads), in ``dtype``.

    Higham §3.1: ``γ_{d+1} |s| Σ_c |q_ic| |k_jc|`` (the ``+1`` for the product with ``s``).
    Zero for empty inputs.
    """
    wide = np.longdouble if np.asarray(q).dtype == np.longdouble else np.float64
    q, k = (np.abs(np.asarray(x).astype(wide)) for x in (q, k))
    if q.size == 0 or k.size == 0:
        return 0.0
    q, k = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])  # all heads: an upper bound
    if q.size == 0 or k.size == 0:
        return 0.0
    d = q.shape[-1]
    u = eps(dtype) / 2
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    with np.errstate(over="ignore"):
        return float(abs(scale) * gamma * (q @ k.T).max())  # inf where that overflows


def softmax_tolerance(delta: float, terms: int, vmax: float, dtype) -> float:
    """Bound on the output error of a softmax-weighted average of ``terms`` values ``|v| <= vmax``.

    Logits off by at most ``δ`` move the weights by at most ``e^{2δ} − 1`` in ℓ1 (their ratios
    by ``e^{±2δ}``), which moves the average by at most that times ``2·vmax``; the exponentials,
    the sum of the weights, the division and the weighted sum add ``(2·terms + 8)·u`` relative to
    ``vmax`` (``u = eps/2``); and the answer is rounded once to ``dtype``.
    """
    u = eps(dtype) / 2
    spread = math.expm1(min(2 * delta, 700.0)) * 2 * vmax
    return spread + (2 * terms + 10) * u * vmax


def max_abs(x):
    """``max |x|`` as a Python float (a longdouble for longdouble arrays, whose range is wider)."""
    x = np.asarray(x)
    if not x.size:
        return 0.0
    top = np.abs(x).max()
    return top if x.dtype == np.longdouble else float(top)


def gap(a, b):
    """``max |a − b|`` computed in the widest float (NaN where either is NaN)."""
    wide = longdouble_or_float64()
    a, b = np.asarray(a).astype(wide), np.asarray(b).astype(wide)
    if not a.size:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(a == b, 0, np.abs(a - b))  # equal infinities agree
    return np.nan if np.isnan(diff).any() else diff.max()


def outside_hull(out, v, visible, tol) -> float:
    """Largest violation of ``out_i ∈ hull{v_j : visible_ij}`` along the coordinate directions
    and the directions ``v_j − out_i`` (0 when inside within ``tol``); rows that see no key
    must be exactly 0."""
    wide = longdouble_or_float64()  # the check's own rounding: a few units of the widest float
    out, v = np.asarray(out).astype(wide), np.asarray(v).astype(wide)
    tol = tol + softmax_tolerance(0.0, v.shape[-1], max_abs(v), wide)
    worst = 0.0
    for i in range(len(out)):
        vis = v[visible[i]]
        if len(vis) == 0:  # a row that sees no key is 0
            worst = max(worst, math.inf if out[i].any() else 0.0)
            continue
        hi, lo = vis.max(axis=0), vis.min(axis=0)
        worst = max(worst, float((out[i] - hi).max()) - tol, float((lo - out[i]).max()) - tol)
        dirs = vis - vis.mean(axis=0)
        norms = np.linalg.norm(dirs, axis=1)
        dirs = dirs[norms > 0] / norms[norms > 0, None]
        if len(dirs):
            proj = vis @ dirs.T  # (visible keys, directions)
            worst = max(worst, float((out[i] @ dirs.T - proj.max(axis=0)).max()) - tol)
    return max(worst, 0.0)


# ---------------------------------------------------------------------------------------------
# strategies


def as_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values in another memory layout: C, Fortran, strided view, reversed view."""
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "strided":  # every other element of a twice-as-long axis
        if x.ndim == 0 or x.shape[-2] == 0:
            return x
        big = np.zeros(x.shape[:-2] + (2 * x.shape[-2], x.shape[-1]), dtype=x.dtype)
        big[..., ::2, :] = x
        return big[..., ::2, :]
    if layout == "reversed":  # negative strides
        return x[..., ::-1, :][..., ::-1, :]
    return np.ascontiguousarray(x)


LAYOUTS = ("C", "F", "strided", "reversed")


@st.composite
def shapes(draw, max_n=9, batched=None, allow_empty=True):
    """``(q shape, k shape, v shape)``: single head or (B, H, N, D) with ``Hk | H``;
    lengths 0–``max_n`` (``nq != nk`` and odd included), ``nk >= 1`` when ``nq >= 1``."""
    lo = 0 if allow_empty else 1
    nq = draw(st.integers(lo, max_n))
    nk = draw(st.integers(1 if nq else lo, max_n))
    d, dv = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    batched = draw(st.booleans()) if batched is None else batched
    if not batched:
        return (nq, d), (nk, d), (nk, dv)
    b = draw(st.integers(0 if allow_empty else 1, 2))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 2))
    return (b, h, nq, d), (b, hk, nk, d), (b, hk, nk, dv)


@st.composite
def attention_case(draw, max_n=9, dtypes=None, batched=None, allow_empty=True, regimes=None,
                   near_max=True):
    """Valid attention inputs at the edges, by construction.

    Regimes of ``q, k``: ``normal`` (Gaussian, logit scale 10⁻³–30), ``exact`` (small integers
    times powers of two and a power-of-two scale: every logit is exact in the dtype, so their
    size can go up to ~1e38 in float32 and beyond float64's range in float64), ``tiny`` (entries
    ~1e-30, whose products underflow). Values ``v``: Gaussian at scales 2⁻⁴⁰–2⁴⁰ or near the dtype's
    maximum. Layouts C, Fortran, strided and reversed.

    ``near_max=False`` keeps ``|v| <= 2⁴⁰`` (for the Numba engine, whose kernels overflow
    near the maximum: ``test_numba_kernels_keep_values_near_the_dtype_maximum_finite``).

    Returns a dict with ``q, k, v, scale, causal, regime, dtype, exact_logits``.
    """
    dtype = draw(st.sampled_from(dtypes or FLOAT_DTYPES))
    qs, ks, vs = draw(shapes(max_n=max_n, batched=batched, allow_empty=allow_empty))
    regime = draw(st.sampled_from(regimes or ("normal", "exact", "tiny")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fi = np.finfo(dtype)
    if regime == "exact":
        # |q|, |k| <= 4·2^e, d <= 5: every q·k is an integer times 2^(eq+ek) of size <= 80
        top = {np.float16: 4, np.float32: 60, np.float64: 530}.get(dtype, 4000)
        eq, ek = draw(st.integers(-top, top)), draw(st.integers(-top, top))
        es = draw(st.integers(-4, 4))
        wide = dtype == np.longdouble  # its exponents go beyond float64's: scaled below
        q = rng.integers(-4, 5, qs) * (1.0 if wide else 2.0 ** eq)
        k = rng.integers(-4, 5, ks) * (1.0 if wide else 2.0 ** ek)
        scale = 2.0 ** es
    elif regime == "tiny":
        q = rng.standard_normal(qs) * 1e-30
        k = rng.standard_normal(ks) * 1e-30
        scale = None
    else:
        logit_scale = 10.0 ** draw(st.floats(-3, math.log10(30)))
        d = qs[-1]
        q = rng.standard_normal(qs) * math.sqrt(logit_scale)
        k = rng.standard_normal(ks) * math.sqrt(logit_scale)
        scale = draw(st.sampled_from([None, 1.0 / d, -0.5, 0.0, 1.0]))
    if near_max and draw(st.booleans()):
        vmag = fi.max * draw(st.sampled_from([0.25, 0.5])) / 4  # near the maximum
    else:
        vmag = min(2.0 ** draw(st.integers(-40, 40)), float(fi.max) / 8)
    v = rng.standard_normal(vs) * (float(vmag) if dtype != np.longdouble else 1.0)
    if dtype == np.longdouble:  # exponents beyond float64's range: scale in longdouble
        q, k, v = (np.asarray(x).astype(dtype) for x in (q, k, v))
        if regime == "exact":
            q, k = q * np.exp2(np.longdouble(eq)), k * np.exp2(np.longdouble(ek))
        v = v * np.longdouble(vmag)
    q, k, v = (np.asarray(x).astype(dtype) for x in (q, k, v))
    q, k, v = (as_layout(x, draw(st.sampled_from(LAYOUTS))) for x in (q, k, v))
    return dict(q=q, k=k, v=v, scale=scale, causal=draw(st.booleans()), regime=regime,
                dtype=dtype, exact_logits=regime == "exact")


def result_dtype(case) -> np.dtype:
    """The dtype a public call returns for these inputs (float16 is computed in float32)."""
    return np.result_type(case["q"].dtype, case["k"].dtype, case["v"].dtype, np.float32)


def effective_scale(case) -> float:
    return 1.0 / math.sqrt(case["q"].shape[-1]) if case["scale"] is None else float(case["scale"])


def heads(case, out):
    """``[(q, k, v, out) per head]`` of a (possibly batched) case and its output."""
    q, k, v = case["q"], case["k"], case["v"]
    if q.ndim == 2:
        return [(q, k, v, out)]
    group = q.shape[1] // k.shape[1]
    return [(q[b, h], k[b, h // group], v[b, h // group], out[b, h])
            for b in range(q.shape[0]) for h in range(q.shape[1])]


def check_exact(case, out, lse=None, what="exact attention", merges=0):
    """``verdict`` of ``out`` (and ``lse``) against :func:`oracle_attention`, head by head.

    Output tolerance: :func:`softmax_tolerance` with the logit bound of the dtype the call
    computes in (0 for exact logits), plus the oracle's own rounding. ``lse``: off by at most
    ``δ + (terms + 4)·u`` plus one rounding of its size; ``±inf`` where the true value is beyond
    the dtype's range. ``merges``: how many log-sum-exp merges a row went through (the causal
    recursion); each weighs its partials by ``e^(l − lse)`` with ``lse`` rounded to the dtype,
    which moves the weights by up to ``e^(2u|lse|)`` and the answer by that times ``2 max|v|``.
    """
    dtype = result_dtype(case)
    if out.dtype != dtype:
        verdict(False, f"{what}: dtype {out.dtype}, expected {dtype}")
    s = effective_scale(case)
    wide = longdouble_or_float64()
    lse_heads = [None] * len(heads(case, out)) if lse is None else [h[3] for h in heads(case, lse[..., None])]
    bad = []
    for hi, ((qh, kh, vh, oh), lh) in enumerate(zip(heads(case, out), lse_heads)):
        want, want_lse, _ = oracle_attention(qh, kh, vh, s, case["causal"])
        delta = 0.0 if case["exact_logits"] else logit_perturbation(qh, kh, s, dtype)
        vmax = max_abs(vh)
        tol = softmax_tolerance(delta, kh.shape[0], vmax, dtype) + softmax_tolerance(0.0, kh.shape[0], vmax, wide)
        if merges and np.isfinite(want_lse).any():
            size = float(np.abs(want_lse[np.isfinite(want_lse)]).max()) + 1
            tol += math.expm1(min(2 * merges * eps(dtype) * size, 700.0)) * 2 * vmax
        err = max_abs(np.asarray(oh, dtype=wide) - want) if oh.size else 0.0
        if not err <= tol:  # NaN fails
            bad.append(("out", hi, err, tol))
        if lh is None or not lh.size:
            continue
        lh = np.asarray(lh[..., 0], dtype=wide)
        u = eps(dtype) / 2
        big = np.abs(want_lse) > np.finfo(dtype).max
        ok_inf = np.isinf(lh) & big & (np.sign(lh) == np.sign(want_lse))
        same_inf = np.isneginf(lh) & np.isneginf(want_lse)
        finite = np.isfinite(want_lse) & ~big
        with np.errstate(invalid="ignore"):
            gap = np.abs(lh - want_lse)
        lse_tol = delta + (kh.shape[0] + 4) * u + 2 * u * np.abs(want_lse)
        okay = ok_inf | same_inf | (finite & (gap <= lse_tol))
        if not okay.all():
            i = int(np.flatnonzero(~okay)[0])
            bad.append(("lse", hi, float(lh[i]), float(want_lse[i])))
    verdict(not bad, f"{what}: {bad[:3]} (part, head, got/err, want/tol); regime {case['regime']}, "
                     f"dtype {case['dtype'].__name__}, causal {case['causal']}")
