"""Fuzzing the reference: a correct answer or an InputError, never a wrong number, never a crash.

Valid inputs at the edges (lengths 0, 1 and odd, ``nq != nk``, empty batches, logits up to
~1e38 in float32 and beyond float64's range, tiny logits, values near the dtype's maximum,
float16 and longdouble, non-contiguous layouts) are checked against oracles: exact float64 (or
longdouble) attention in the exact limits, the NumPy engine against the Numba engine on the
same draws, invariances, and the convex hull of the visible values for the self-normalized
estimators. Invalid inputs must raise an :class:`hyperref.InputError` naming the problem.
Outcomes are counted in :data:`tests.fuzz.OUTCOMES` (docs/bad_inputs.md, "Fuzzing").
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hyperref import HyperConfig, InputError, exact_attention, hyper_attention, make_draws
from hyperref import exact_set as es

from .fuzz import (FLOAT_DTYPES, Refused, answer, attention_case, check_exact, effective_scale,
                   eps, examples, expect_input_error, gap, heads, max_abs, outside_hull, record,
                   result_dtype, softmax_tolerance, standard_qkv, logit_perturbation, verdict,
                   visible_mask)

F64_MAX = float(np.finfo(np.float64).max)


def _logit_bound(case) -> float:
    """``max(|s|, 1)·d·max|q|·max|k|``: where ``hyper_attention`` widens float32 or refuses (float64);
    the engines form ``q·k`` before scaling it, so the unscaled products count too."""
    with np.errstate(over="ignore"):
        return max(abs(effective_scale(case)), 1.0) * case["q"].shape[-1] * max_abs(case["q"]) * max_abs(case["k"])


def _beyond_float64(case):
    """The documented refusal of hyper_attention: logits that may exceed float64's range."""
    limit = float(np.finfo(result_dtype(case)).max) / 4
    return lambda err: "float64's range" in str(err) and _logit_bound(case) > min(F64_MAX / 4, limit)


# ---------------------------------------------------------------------------------------------
# exact attention


@settings(max_examples=examples(150))
@given(attention_case(), st.booleans())
def test_exact_attention_is_exact(case, return_lse):
    out = answer(lambda: exact_attention(case["q"], case["k"], case["v"], causal=case["causal"],
                                         scale=case["scale"], return_lse=True))
    check_exact(case, *out)


# ---------------------------------------------------------------------------------------------
# hyper_attention in its exact limits


def _other_parts(draw):
    """Up to two random exact-set parts (anything united with a covering set still covers)."""
    pool = [es.sinks(draw(st.integers(1, 3))), es.window(draw(st.integers(1, 3))),
            es.sortlsh(draw(st.integers(1, 30)), draw(st.integers(1, 4)), draw(st.integers(1, 2)),
                       centred=draw(st.booleans())),
            es.blocktop(draw(st.integers(1, 4)), draw(st.integers(1, 3))),
            es.heavykeys(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
            es.quest(2, draw(st.integers(2, 8)), draw(st.integers(1, 4))),
            es.topk(draw(st.integers(1, 3)))]
    return draw(st.lists(st.sampled_from(pool), max_size=2))


def _covering_exact_set(draw, nq, nk, causal):
    """An exact set that holds every key each row sees (SPEC §3b), so the direct mode is exact."""
    # sizes just beyond the sequence or far beyond it (int64's maximum and more): the whole sequence
    beyond = draw(st.sampled_from([0, 0, 2**62, 2**63 - 1, 10**30]))
    covering = [es.window(nq + nk + draw(st.integers(1, 3)) + beyond),
                es.sinks(max(1, nk) + draw(st.integers(0, 3)) + beyond),
                es.sortlsh(draw(st.integers(1, 30)), max(1, nk) + draw(st.integers(0, 3)) + beyond,
                           draw(st.integers(1, 2)), centred=draw(st.booleans())),
                es.topk(max(1, nk) + draw(st.integers(0, 2)) + beyond)]
    if not causal:  # causal quest skips the key block that holds a row's own position
        b = draw(st.integers(1, 4))
        covering.append(es.quest(b, b * max(1, -(-nk // b)) + b * draw(st.integers(0, 2)) + beyond,
                                 max(1, nk) + draw(st.integers(0, 2)) + beyond))
    parts = [draw(st.sampled_from(covering))] + _other_parts(draw)
    draw(st.randoms()).shuffle(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out


def _common(draw):
    return dict(bits=draw(st.integers(1, 30)), samples=draw(st.sampled_from([1, 2, 3, 8, 64, 4096])),
                sampler=draw(st.sampled_from(["rownorm", "uniform", "mixed"])),
                approxd_samples=draw(st.integers(1, 12)),
                kappa=draw(st.sampled_from([None, 1, 1.5, 1e6])))


@st.composite
def exact_limit(draw, nq, nk, causal):
    """A HyperConfig whose answer is exact attention for these shapes: ``min_seq_len >= nq``;
    one key block holding every key (``masked`` estimator, either normalizer, causal or not);
    or the direct mode with an exact set that covers every visible key."""
    kind = draw(st.sampled_from(["min_seq_len", "block", "direct"]))
    below = draw(st.integers(1, max(1, nq - 1)))  # min_seq_len < nq when nq >= 2
    if kind == "min_seq_len":
        mode = draw(st.sampled_from(["recursive", "direct"]))
        cfg = dict(_common(draw), min_seq_len=max(1, nq) + draw(st.sampled_from([0, 1, 7, 2**62])),
                   block=draw(st.integers(1, 8)), mode=mode)
        if mode == "recursive":
            cfg.update(estimator=draw(st.sampled_from(["masked", "paper"])),
                       normalizer=draw(st.sampled_from(["self", "approxd"])))
        else:
            cfg.update(exact_set=draw(st.sampled_from([None, es.sinks(1), es.window(2) | es.topk(1)])),
                       samples=draw(st.integers(0, 4)))
        return HyperConfig(**cfg)
    if kind == "block":
        return HyperConfig(**_common(draw), min_seq_len=below,
                           block=max(1, nk) + draw(st.sampled_from([0, 1, 5, 2**62])),
                           normalizer=draw(st.sampled_from(["self", "approxd"])))
    common = _common(draw)
    common.pop("kappa")
    return HyperConfig(**common | dict(samples=draw(st.integers(0, 5))), mode="direct", min_seq_len=below,
                       exact_set=_covering_exact_set(draw, nq, nk, causal),
                       query_block=draw(st.sampled_from([1, 2, 3, 5, 2**62])))


ENGINES = st.sampled_from(["numpy", "numba", None])


@settings(max_examples=examples(200))
@given(st.data())
def test_hyper_attention_is_exact_in_its_exact_limits(data):
    engine = data.draw(ENGINES, label="engine")
    case = data.draw(attention_case(near_max=engine == "numpy"))
    nq, nk = case["q"].shape[-2], case["k"].shape[-2]
    cfg = data.draw(exact_limit(nq, nk, case["causal"]), label="config")
    try:
        out, lse = answer(lambda: hyper_attention(
            case["q"], case["k"], case["v"], causal=case["causal"], scale=case["scale"], config=cfg,
            return_lse=True, engine=engine, rng=data.draw(st.integers(0, 2**32), label="rng")),
            refusal_ok=_beyond_float64(case))
    except Refused:
        return
    # the causal recursion merges each row's partials up to 1 + log2(nq) times (SPEC §6)
    merges = 1 + int(math.log2(nq)) if case["causal"] and nq > cfg.min_seq_len and cfg.mode == "recursive" else 0
    check_exact(case, out, lse, what=f"hyper_attention {engine} {cfg}", merges=merges)


# ---------------------------------------------------------------------------------------------
# HyperConfig construction

INT_FIELDS = ("bits", "block", "samples", "min_seq_len", "approxd_samples", "query_block")
CHOICES = {"estimator": ("masked", "paper"), "sampler": ("rownorm", "uniform", "mixed"),
           "normalizer": ("self", "approxd"), "mode": ("recursive", "direct")}
INT64_MAX = 2**63 - 1
NOT_A_NUMBER = [None, "4", b"4", 4.0, True, np.int64(4) + 0.5, np.array([4]), [4], 1j, float("nan")]


def _int_ok(name, value, mode):
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    least = 0 if (name == "samples" and mode == "direct") else 1
    return least <= value <= (30 if name == "bits" else INT64_MAX)


def _kappa_ok(kappa):
    if kappa is None:
        return True
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        return False
    try:
        return math.isfinite(float(kappa)) and kappa >= 1
    except OverflowError:
        return False


@st.composite
def config_fields(draw):
    """Each HyperConfig field valid, at an edge, or invalid (wrong type, range, value)."""
    fields = {}
    for name in INT_FIELDS:
        fields[name] = draw(st.one_of(st.integers(0, 40), st.sampled_from(
            [-1, 2**31, 2**62, INT64_MAX, 2**63, 10**30, -(10**30)] + NOT_A_NUMBER)))
    for name, allowed in CHOICES.items():
        fields[name] = draw(st.one_of(st.sampled_from(allowed), st.sampled_from(
            ["", "MASKED", " self", None, 1, np.array(["self"]), ("self",), "direct "])))
    fields["kappa"] = draw(st.sampled_from([None, 1, 1.0, 2.5, 1e308, 10**400, 0.5, 0, -1, math.inf,
                                            math.nan, True, "2", np.float64(3.0), np.float32(3.0)]))
    fields["exact_set"] = draw(st.sampled_from([None, es.sinks(2) | es.window(4), es.topk(3), "sinks(2)",
                                                es.sinks(2).parts[0], 0]))
    keep = draw(st.sets(st.sampled_from(sorted(fields))))  # the others take their defaults
    return {name: value for name, value in fields.items() if name in keep}


def _config_valid(fields):
    full = {f.name: f.default for f in dataclasses.fields(HyperConfig)} | fields
    mode = full["mode"]
    ok = all(isinstance(full[n], str) and full[n] in allowed for n, allowed in CHOICES.items())
    ok = ok and all(_int_ok(n, full[n], mode) for n in INT_FIELDS) and _kappa_ok(full["kappa"])
    exact = full["exact_set"]
    ok = ok and (exact is None or (isinstance(exact, es.ExactSet) and mode == "direct"))
    return ok and (mode != "direct" or (full["estimator"], full["normalizer"]) == ("masked", "self"))


@settings(max_examples=examples(300))
@given(config_fields())
def test_hyper_config_is_valid_or_an_input_error(fields):
    if not _config_valid(fields):
        expect_input_error(lambda: HyperConfig(**fields), "HyperConfig", "mode=", "exact_set")
        return
    cfg = answer(lambda: HyperConfig(**fields))
    import json

    same = json.loads(json.dumps(cfg.as_dict())) == cfg.as_dict() and dataclasses.replace(cfg) == cfg
    verdict(same, f"{cfg}: as_dict does not round-trip through JSON")


# ---------------------------------------------------------------------------------------------
# sampled modes: the engines on the same draws, the convex hull, invariances, convergence


@st.composite
def sampled_config(draw, nq, nk, causal):
    """Any HyperConfig that samples at these shapes (``min_seq_len < nq``), recursive or direct."""
    common = _common(draw)
    below = draw(st.integers(1, max(1, nq - 1)))
    if draw(st.booleans()):
        return HyperConfig(**common, min_seq_len=below, block=draw(st.integers(1, 6)),
                           estimator=draw(st.sampled_from(["masked", "paper"])),
                           normalizer=draw(st.sampled_from(["self", "approxd"])))
    common.pop("kappa")
    parts = _other_parts(draw)
    exact = None
    if parts:
        exact = parts[0]
        for p in parts[1:]:
            exact = exact | p
    return HyperConfig(**common | dict(samples=draw(st.integers(0, 9))), mode="direct",
                       min_seq_len=below, exact_set=exact,
                       query_block=draw(st.sampled_from([1, 2, 3, 7, 2**62])))


def _hull_tolerance(case, cfg):
    terms = case["k"].shape[-2] + (cfg.samples if cfg.mode == "recursive" else 0)
    return softmax_tolerance(0.0, terms, 0.0, result_dtype(case)), terms


def _unweighted_rows(case, cfg, out, lse):
    """Rows the direct mode gave no weight (``lse = −inf``: no exact key visible and no sample in
    their residual): their output is 0 by convention (theory/bounds.py, G7), like a row that sees
    no key. Checks that convention and returns the rows (per head) to leave out of the hull."""
    if lse is None:
        return [None] * len(heads(case, out))
    rows = []
    for (qh, kh, _, oh), (_, _, _, lh) in zip(heads(case, out), heads(case, lse[..., None])):
        empty = np.isneginf(np.asarray(lh[..., 0]))
        sees = visible_mask(len(qh), len(kh), case["causal"]).any(axis=1)
        if np.asarray(oh)[empty].any():
            verdict(False, "a row with lse = -inf has a nonzero output")
        if cfg.mode != "direct" and (empty & sees).any():
            verdict(False, "a row that sees keys got lse = -inf outside the direct mode")
        rows.append(empty)
    return rows


def _check_hull(case, cfg, out, what, lse=None):
    """Self-normalized estimators return convex combinations of the values each row sees (rows
    with ``lse = −inf`` in the direct mode: 0, see :func:`_unweighted_rows`)."""
    dtype = result_dtype(case)
    worst = []
    for (qh, kh, vh, oh), empty in zip(heads(case, out), _unweighted_rows(case, cfg, out, lse)):
        vmax = max_abs(vh)
        terms = kh.shape[0] + (cfg.samples if cfg.mode == "recursive" else 0)
        tol = softmax_tolerance(0.0, terms, vmax, dtype)
        visible = visible_mask(len(qh), len(kh), case["causal"])
        if empty is not None and cfg.mode == "direct":
            visible = visible & ~empty[:, None]
        miss = outside_hull(oh, vh, visible, float(tol))
        if miss > 0:
            worst.append((miss, tol))
    verdict(not worst, f"{what}: outside the hull of the visible values by {worst[:2]} (miss, tol)")


def _engines_tolerance(case, cfg, vmax):
    dtype = result_dtype(case)
    terms = case["k"].shape[-2] + cfg.samples
    delta = logit_perturbation(case["q"], case["k"], effective_scale(case), dtype)
    return 2 * softmax_tolerance(delta, terms, vmax, dtype), delta, terms


@settings(max_examples=examples(200))
@given(st.data())
def test_engines_agree_and_self_normalized_answers_are_convex(data):
    case = data.draw(attention_case(max_n=20, allow_empty=False, near_max=False))
    nq, nk = case["q"].shape[-2], case["k"].shape[-2]
    cfg = data.draw(sampled_config(nq, nk, case["causal"]), label="config")
    batch = () if case["q"].ndim == 2 else case["q"].shape[:2]
    draws = make_draws(cfg, nq, nk, case["q"].shape[-1], causal=case["causal"], batch_shape=batch,
                       rng=data.draw(st.integers(0, 2**32), label="rng"))

    def run(engine, config=cfg, drawn=draws):
        return hyper_attention(case["q"], case["k"], case["v"], causal=case["causal"], scale=case["scale"],
                               config=config, draws=drawn, engine=engine, return_lse=True)

    try:
        (a, la), (b, lb) = (answer(lambda: run(e), refusal_ok=_beyond_float64(case)) for e in ("numpy", "numba"))
    except Refused:
        return
    what = f"{cfg}, regime {case['regime']}, dtype {case['dtype'].__name__}, causal {case['causal']}"
    if cfg.normalizer == "self":
        _check_hull(case, cfg, a, "numpy engine " + what, la)
        tol, _, _ = _engines_tolerance(case, cfg, max_abs(case["v"]))
        err = gap(a, b)
        verdict(err <= tol, f"numpy vs numba engine: max|diff| {err:.3g} > {tol:.3g}; {what}")
        return
    # ApproxD: out = o · exp(lse − log d̃) with o the self-normalized answer on the same draws
    self_cfg = dataclasses.replace(cfg, normalizer="self")
    _, lse_self = run("numpy", self_cfg, dataclasses.replace(draws, config=self_cfg))
    with np.errstate(over="ignore", invalid="ignore"):
        factor = np.exp(lse_self.astype(np.float64) - la.astype(np.float64))
        level = np.maximum(np.abs(lse_self), np.abs(la)).astype(np.float64)
    verdict(not np.isnan(a).any(), f"NaN in the ApproxD answer of the reference; {what}")
    verdict(not np.isnan(b).any(), f"NaN in the ApproxD answer of the Numba engine; {what}")
    tol, delta, terms = _engines_tolerance(case, cfg, max_abs(case["v"]))
    u = eps(result_dtype(case)) / 2
    rel = np.expm1(np.minimum(4 * delta + 4 * (terms + 4) * u + 4 * u * level, 700.0))
    with np.errstate(invalid="ignore"):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=-1, initial=0.0)
        size = np.maximum(np.abs(a), np.abs(b)).astype(np.float64).max(axis=-1, initial=0.0)
    # the factor's error, the self-normalized answer's, and each engine's final rounding of out
    bound = factor * (tol + 2 * rel * max_abs(case["v"])) + 4 * u * size
    same_inf = (np.isinf(a) == np.isinf(b)).all()
    fine = np.isinf(bound) | np.isnan(bound) | (diff <= bound) | np.isinf(diff)
    verdict(bool(same_inf and fine.all()), f"ApproxD numpy vs numba: diff {np.nanmax(diff):.3g} beyond the "
                                            f"bound; {what}")


@pytest.mark.parametrize("dtype, big", [(np.float32, 1e37), (np.float64, 1e307)])
@pytest.mark.parametrize("estimator, samples", [("masked", 8), ("paper", 4096)])
def test_numba_kernels_keep_values_near_the_dtype_maximum_finite(dtype, big, estimator, samples):
    n = 64
    q = k = np.zeros((n, 2), dtype)
    v = np.full((n, 2), big, dtype)  # every row's answer is exactly `big`
    cfg = HyperConfig(bits=2, block=n, samples=samples, min_seq_len=8, estimator=estimator)
    reference = hyper_attention(q, k, v, config=cfg, rng=0, engine="numpy")
    out = hyper_attention(q, k, v, config=cfg, rng=0, engine="numba")
    tol = softmax_tolerance(0.0, n + samples, big, dtype)
    assert gap(reference, big) <= tol
    verdict(bool(gap(out, big) <= tol), f"numba engine: {out.max()} where the answer is {big}")


def _permute_draws(draws, perm_b, perm_h):
    """The draws of a batch whose (B, H) axes were permuted by ``perm_b``, ``perm_h``."""
    def take(a):
        return None if a is None else a[perm_b][:, perm_h]
    blocks = {p: dataclasses.replace(bd, lsh_planes=take(bd.lsh_planes), approxd_rows=take(bd.approxd_rows),
                                     approxd_cols=take(bd.approxd_cols), sample_u=take(bd.sample_u))
              for p, bd in draws.blocks.items()}
    direct = None if draws.direct is None else dataclasses.replace(
        draws.direct, exact=tuple(take(a) for a in draws.direct.exact), sample_u=take(draws.direct.sample_u))
    return dataclasses.replace(draws, blocks=blocks, direct=direct)


@settings(max_examples=examples(80))
@given(st.data())
def test_invariances_under_head_permutation_value_shift_and_logit_scaling(data):
    """Three invariances on the same draws: permuting batch and heads permutes the answer;
    ``v + c`` shifts a self-normalized answer by ``c`` (uniform sampler: the draws select the
    same keys); ``(2^a q, 2^-a s)`` gives the same logits and hashes, so the same answer bit for bit."""
    engine = data.draw(st.sampled_from(["numpy", "numba"]), label="engine")
    case = data.draw(attention_case(max_n=16, allow_empty=False, batched=True, near_max=False,
                                    dtypes=[np.float32, np.float64], regimes=("normal", "exact")))
    q, k, v = case["q"], case["k"], case["v"]
    b, h, nq, d = q.shape
    nk = k.shape[2]
    cfg = data.draw(sampled_config(nq, nk, case["causal"]), label="config")
    cfg = dataclasses.replace(cfg, sampler="uniform")
    draws = make_draws(cfg, nq, nk, d, causal=case["causal"], batch_shape=(b, h), rng=data.draw(
        st.integers(0, 2**32), label="rng"))

    def run(q_, k_, v_, drawn, scale=case["scale"], lse=False):
        got = answer(lambda: hyper_attention(q_, k_, v_, causal=case["causal"], scale=scale, config=cfg,
                                             draws=drawn, engine=engine, return_lse=True),
                     refusal_ok=_beyond_float64(case))
        return got if lse else got[0]
    try:
        out, lse = run(q, k, v, draws, lse=True)
    except Refused:
        return
    vmax = max_abs(v)
    tol, _, _ = _engines_tolerance(case, cfg, vmax)
    # batch and heads: permute q, k, v (k, v heads follow their query heads' groups) and the draws
    perm_b = np.asarray(data.draw(st.permutations(range(b)), label="perm_b"), dtype=np.int64)
    group = h // k.shape[1]
    perm_hk = np.asarray(data.draw(st.permutations(range(k.shape[1])), label="perm_hk"), dtype=np.int64)
    perm_h = (perm_hk[:, None] * group + np.arange(group)[None, :]).ravel()
    permuted = run(q[perm_b][:, perm_h], k[perm_b][:, perm_hk], v[perm_b][:, perm_hk],
                   _permute_draws(draws, perm_b, perm_h))
    moved = gap(permuted, out[perm_b][:, perm_h])
    verdict(bool(moved <= tol), f"head permutation changed the answer by {moved} > {tol}; {cfg}")
    # logits 2^a q · k · 2^-a s: the same numbers, the same hashes
    a = data.draw(st.integers(-6, 6), label="a")
    s = effective_scale(case)
    scaled = run(q * np.asarray(2.0 ** a, q.dtype), k, v, draws, scale=s * 2.0 ** -a)
    verdict(np.array_equal(scaled, run(q, k, v, draws, scale=s)), f"(2^{a} q, 2^{-a} s) changed the answer; {cfg}")
    # v + c (self-normalized: rows are convex combinations)
    if cfg.normalizer != "self":
        return
    c = data.draw(st.sampled_from([0.5, -3.0, 1e3]), label="c") * max(vmax, 1.0)
    shifted = run(q, k, v + np.asarray(c, v.dtype), draws)
    tol_c = 2 * _engines_tolerance(case, cfg, vmax + abs(c))[0]
    seen = np.isfinite(lse)  # rows that see no key, or got no weight (direct mode), stay 0
    want = np.where(seen[..., None], out + np.asarray(c, v.dtype), 0)
    verdict(bool(gap(shifted, want) <= tol_c), f"v + {c} did not shift by {c}; {cfg}")


def _relative_error(out, want):
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(out, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-300))


@settings(max_examples=examples(12))
@given(st.data())
def test_error_falls_as_samples_grow(data):
    """The self-normalized estimators converge (SPEC §5): with the ``mixed`` sampler every key has
    probability >= 1/(2 nk), the error falls like m^(-1/2); over 5 draws, 4096 samples beat 16 by
    a factor 3 (16 expected; the margin is for the heavy tails of planted keys), or both are at the
    rounding level."""
    from .strategies import attention_inputs

    q, k, v, regime = data.draw(attention_inputs(n_min=40, n_max=64, d=4), label="inputs")
    causal = data.draw(st.booleans(), label="causal")
    direct = data.draw(st.booleans(), label="direct")
    estimator = "masked" if direct else data.draw(st.sampled_from(["masked", "paper"]), label="estimator")
    want = exact_attention(q, k, v, causal=causal)

    def mean_error(m):
        if direct:
            cfg = HyperConfig(mode="direct", exact_set=es.sinks(1) | es.window(3), samples=m, min_seq_len=8,
                              query_block=8)
        else:
            cfg = HyperConfig(bits=3, block=4, samples=m, min_seq_len=8, estimator=estimator)
        return np.mean([_relative_error(hyper_attention(q, k, v, causal=causal, config=cfg, rng=seed), want)
                        for seed in range(5)])

    small, large = mean_error(16), mean_error(4096)
    floor = softmax_tolerance(logit_perturbation(q, k, 0.5, np.float64), len(k) + 4096, max_abs(v), np.float64)
    floor /= max(float(np.linalg.norm(want)) / math.sqrt(want.size), 1e-300)
    verdict(large <= small / 3 + floor, f"error {small:.3g} at m=16, {large:.3g} at m=4096 ({regime}, "
                                         f"causal {causal}, direct {direct}, {estimator})")


# ---------------------------------------------------------------------------------------------
# invalid inputs of exact_attention and hyper_attention


def _poison(x, value, where):
    x = np.array(x, dtype=np.float64 if x.dtype == np.float16 else x.dtype, order="C")
    x.reshape(-1)[where % x.size] = value
    return x


#: (mutation, the words the InputError must contain)
def _mutations(q, k, v):
    d = q.shape[-1]
    single = q.ndim == 2
    out = {
        "nan in q": (dict(q=_poison(q, np.nan, 3)), ["q", "nan"]),
        "inf in k": (dict(k=_poison(k, np.inf, 1)), ["k", "inf"]),
        "-inf in v": (dict(v=_poison(v, -np.inf, 2)), ["v", "inf"]),
        "int q": (dict(q=q.astype(np.int64)), ["q", "dtype"]),
        "complex k": (dict(k=k.astype(np.complex128)), ["k", "dtype"]),
        "bool v": (dict(v=v > 0), ["v", "dtype"]),
        "object q": (dict(q=q.astype(object)), ["q", "dtype"]),
        "str q": (dict(q=np.full(q.shape, "x")), ["q", "dtype"]),
        "None k": (dict(k=None), ["k"]),
        "ragged q": (dict(q=[[1.0] * d, [1.0] * (d + 1)]), ["q"]),
        "1-d q": (dict(q=q.reshape(-1)), ["shape"]),
        "3-d k": (dict(k=k[None] if single else k[0]), ["shape"]),
        "d mismatch": (dict(k=np.concatenate([k, k[..., :1]], axis=-1)), ["head dimension"]),
        "nk != nv": (dict(v=np.concatenate([v, v[..., :1, :]], axis=-2)), ["length"]),
        "no keys": (dict(k=k[..., :0, :], v=v[..., :0, :]), ["key"]),
        "dv = 0": (dict(v=v[..., :0]), ["dimension"]),
        "scale nan": (dict(scale=math.nan), ["scale"]),
        "scale inf": (dict(scale=-math.inf), ["scale"]),
        "scale str": (dict(scale="0.5"), ["scale"]),
        "scale bool": (dict(scale=True), ["scale"]),
        "scale complex": (dict(scale=1j), ["scale"]),
        "scale array": (dict(scale=np.array([0.5, 0.5])), ["scale"]),
        "scale huge int": (dict(scale=10**400), ["scale"]),
        "causal str": (dict(causal="no"), ["causal"]),
        "causal int": (dict(causal=1), ["causal"]),
        "causal None": (dict(causal=None), ["causal"]),
        "return_lse int": (dict(return_lse=0), ["return_lse"]),
    }
    if not single:
        out["batch mismatch"] = (dict(k=np.concatenate([k, k], axis=0)), ["batch"])
        out["heads not dividing"] = (dict(k=np.concatenate([k] * 3, axis=1)[:, :3],
                                          v=np.concatenate([v] * 3, axis=1)[:, :3]), ["heads"])
        out["zero kv heads"] = (dict(k=k[:, :0], v=v[:, :0]), ["heads"])
    return out


HYPER_MUTATIONS = {
    "config dict": (dict(config={"block": 4}), ["config"]),
    "config str": (dict(config="paper"), ["config"]),
    "engine": (dict(engine="cuda"), ["engine"]),
    "engine None-like": (dict(engine="None"), ["engine"]),
    "rng negative": (dict(rng=-1), ["rng"]),
    "rng str": (dict(rng="seed"), ["rng"]),
    "rng float": (dict(rng=1.5), ["rng"]),
    "draws dict": (dict(draws={}), ["draws"]),
}


@settings(max_examples=examples(200))
@given(st.data())
def test_invalid_attention_inputs_are_input_errors(data):
    case = data.draw(attention_case(max_n=12, allow_empty=False, dtypes=[np.float32, np.float64, np.float16]))
    q, k, v = case["q"], case["k"], case["v"]
    fn = data.draw(st.sampled_from(["exact", "hyper"]), label="function")
    table = _mutations(q, k, v) | (HYPER_MUTATIONS if fn == "hyper" else {})
    name = data.draw(st.sampled_from(sorted(table)), label="mutation")
    change, words = table[name]
    args = dict(q=q, k=k, v=v, causal=case["causal"], scale=case["scale"]) | change
    if fn == "exact":
        expect_input_error(lambda: exact_attention(**args), *words)
    else:
        args.setdefault("config", HyperConfig(block=2, samples=3, min_seq_len=2, approxd_samples=2,
                                              normalizer=data.draw(st.sampled_from(["self", "approxd"]))))
        args.setdefault("engine", data.draw(ENGINES, label="engine"))
        args.setdefault("rng", 0)
        expect_input_error(lambda: hyper_attention(**args), *words)


# ---------------------------------------------------------------------------------------------
# make_draws and hand-built draws


@settings(max_examples=examples(100))
@given(st.data())
def test_make_draws_gives_the_draws_a_call_makes(data):
    """Valid arguments: draws that pass their own check and give the call's answer on the same seed;
    invalid ones: an InputError naming the argument."""
    nq, nk, d = data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12)), data.draw(st.integers(1, 4))
    causal = data.draw(st.booleans())
    cfg = data.draw(st.one_of(sampled_config(max(nq, 2), max(nk, 1), causal),
                              exact_limit(max(nq, 2), max(nk, 1), causal)), label="config")
    batch = data.draw(st.sampled_from([(), (1, 1), (2, 3), (0, 2)]), label="batch_shape")
    seed = data.draw(st.integers(0, 2**64 - 1), label="seed")
    bad = data.draw(st.sampled_from([None, "nq", "nk", "d", "batch", "causal", "rng", "config"]), label="bad")
    args = dict(config=cfg, nq=nq, nk=nk, d=d, causal=causal, batch_shape=batch, rng=seed)
    if bad is not None:
        wrong = {"nq": [-1, 2.0, True, "3", None, np.float64(3)], "nk": [-5, 1.5], "d": [0, -1, 4.0],
                 "batch": ["ab", 3, (2, -1), (2.0,), None, ((1,),)], "causal": [1, "yes", None],
                 "rng": [-1, "x", 0.5, [1, -2]], "config": [None, {"block": 2}, "paper"]}[bad]
        key = {"batch": "batch_shape"}.get(bad, bad)
        args[key] = data.draw(st.sampled_from(wrong), label="value")
        expect_input_error(lambda: make_draws(args.pop("config"), args.pop("nq"), args.pop("nk"),
                                              args.pop("d"), **args), key)
        return
    draws = answer(lambda: make_draws(cfg, nq, nk, d, causal=causal, batch_shape=batch, rng=seed))
    from hyperref.draws import check_draws_contents

    answer(lambda: check_draws_contents(draws))
    if nq == 0 or nk == 0 or 0 in batch:
        verdict(True, "")
        return
    rng = np.random.default_rng(seed)
    shape = (batch or ()) + (nq,)
    q, k, v = rng.standard_normal(shape + (d,)), rng.standard_normal(shape[:-1] + (nk, d)), \
        rng.standard_normal(shape[:-1] + (nk, 2))
    same = [hyper_attention(q, k, v, causal=causal, config=cfg, **kw, engine="numpy")
            for kw in (dict(draws=draws), dict(rng=seed))]
    verdict(np.array_equal(*same), f"make_draws(rng={seed}) is not what the call draws from rng={seed}")


def test_draws_too_large_for_memory_are_an_input_error():
    """A configuration whose draws cannot be allocated (8 TiB of uniforms) is refused by name."""
    cfg = HyperConfig(samples=2**40, block=4, min_seq_len=4)
    expect_input_error(lambda: make_draws(cfg, 16, 16, 8), "samples", "memory")
    expect_input_error(lambda: hyper_attention(np.zeros((16, 8)), np.zeros((16, 8)), np.zeros((16, 8)),
                                               config=cfg, rng=0), "samples", "memory")
    cfg = HyperConfig(mode="direct", samples=2**40, min_seq_len=4)
    expect_input_error(lambda: make_draws(cfg, 16, 16, 8, causal=True), "samples", "memory")


def _replace_block(draws, path, **change):
    blocks = dict(draws.blocks)
    blocks[path] = dataclasses.replace(blocks[path], **change)
    return dataclasses.replace(draws, blocks=blocks)


@st.composite
def draws_mutation(draw, draws):
    """A hand-built change of ``draws``: ``(draws', words)``; ``words`` is None when the change
    keeps every value (another integer width, a wider float, another memory layout)."""
    cfg = draws.config
    options = []
    for path, bd in draws.blocks.items():
        n_rows = bd.approxd_rows.shape[-1]
        changes = [
            (dict(approxd_rows=bd.approxd_rows.astype(np.int32)), None),
            (dict(approxd_cols=np.asfortranarray(bd.approxd_cols)), None),
            (dict(sample_u=bd.sample_u.astype(np.longdouble)), None),
            (dict(lsh_planes=bd.lsh_planes.astype(np.longdouble)), None),
            (dict(sample_u=np.full_like(bd.sample_u, draw(st.sampled_from([1.0, 1.5, -0.5, np.nan, np.inf])))),
             ["sample_u"]),
            (dict(sample_u=bd.sample_u[..., :-1]), ["sample_u"]),
            (dict(sample_u=(bd.sample_u * 4).astype(np.int64)), ["sample_u"]),
            (dict(sample_u=bd.sample_u.tolist()), ["sample_u"]),
            (dict(approxd_cols=np.full_like(bd.approxd_cols, draw(st.sampled_from([-1, bd.nk, 2**40])))),
             ["approxd_cols"]),
            (dict(approxd_rows=np.full_like(bd.approxd_rows, draw(st.sampled_from([-1, bd.nq])))),
             ["approxd_rows"] if n_rows else None),
            (dict(approxd_rows=bd.approxd_rows.astype(np.float64)), ["approxd_rows"]),
            (dict(lsh_planes=bd.lsh_planes[..., :1, :]), ["lsh_planes"] if draws.d > 1 else None),
            (dict(lsh_planes=None), ["lsh_planes"]),
            (dict(nq=bd.nq + 1), ["block"]),
        ]
        options += [(lambda p=path, c=c: _replace_block(draws, p, **c), w) for c, w in changes]
    if draws.blocks:
        options += [(lambda: dataclasses.replace(draws, blocks={}), ["blocks"]),
                    (lambda: dataclasses.replace(draws, blocks=dict(draws.blocks,
                                                                    extra=next(iter(draws.blocks.values())))),
                     ["blocks"]),
                    (lambda: dataclasses.replace(draws, blocks=list(draws.blocks.values())), ["blocks"]),
                    (lambda: dataclasses.replace(draws, blocks={p: "x" for p in draws.blocks}), ["block"])]
    if draws.direct is not None:
        dd = draws.direct
        options += [
            (lambda: dataclasses.replace(draws, direct=None), ["direct"]),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(dd, sample_u=dd.sample_u[..., :1, :])),
             ["sample_u"] if dd.sample_u.shape[-2] > 1 else None),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(
                dd, sample_u=np.full_like(dd.sample_u, 1.0))), ["sample_u"] if dd.sample_u.size else None),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(dd, exact=dd.exact + (None,))),
             ["exact-set"]),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(dd, exact=list(dd.exact))), ["direct"]),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(
                dd, sample_u=np.asfortranarray(dd.sample_u))), None),
            (lambda: dataclasses.replace(draws, direct=dataclasses.replace(
                dd, sample_u=dd.sample_u.astype(np.longdouble))), None),
        ]
        for i, part in enumerate(dd.exact):
            if part is None:
                options.append((lambda i=i: dataclasses.replace(draws, direct=dataclasses.replace(
                    dd, exact=dd.exact[:i] + (np.zeros(3),) + dd.exact[i + 1:])), ["part"]))
            elif part.dtype.kind == "i":
                options.append((lambda i=i, p=part: dataclasses.replace(draws, direct=dataclasses.replace(
                    dd, exact=dd.exact[:i] + (np.full_like(p, draws.nq),) + dd.exact[i + 1:])),
                    ["part"] if part.size else None))
            else:
                options.append((lambda i=i, p=part: dataclasses.replace(draws, direct=dataclasses.replace(
                    dd, exact=dd.exact[:i] + (p[..., :1],) + dd.exact[i + 1:])),
                    ["part"] if part.shape[-1] > 1 else None))
    else:
        options.append((lambda: dataclasses.replace(draws, direct=draws.blocks), ["direct"]))
    options += [(lambda: dataclasses.replace(draws, nq=draws.nq + 1), ["draws were made"]),
                (lambda: dataclasses.replace(draws, causal=not draws.causal), ["draws were made"]),
                (lambda: dataclasses.replace(draws, config=dataclasses.replace(cfg, samples=cfg.samples + 1)),
                 ["config"]),
                (lambda: dict(vars(draws)), ["draws"])]
    make, words = draw(st.sampled_from(options))
    return make(), words


@settings(max_examples=examples(200))
@given(st.data())
def test_hand_built_draws_are_checked_or_give_the_same_answer(data):
    engine = data.draw(st.sampled_from(["numpy", "numba"]), label="engine")
    causal = data.draw(st.booleans(), label="causal")
    nq, nk, d = data.draw(st.integers(2, 14)), data.draw(st.integers(1, 14)), data.draw(st.integers(1, 4))
    cfg = data.draw(sampled_config(nq, nk, causal), label="config")
    batch = data.draw(st.sampled_from([(), (1, 2)]), label="batch")
    draws = make_draws(cfg, nq, nk, d, causal=causal, batch_shape=batch, rng=data.draw(st.integers(0, 99)))
    changed, words = data.draw(draws_mutation(draws), label="mutation")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(batch + (n, d)) for n in (nq, nk, nk))

    def run(drawn):
        return hyper_attention(q, k, v, causal=causal, config=cfg, draws=drawn, engine=engine)
    if words is not None:
        expect_input_error(lambda: run(changed), *words)
        return
    verdict(np.array_equal(answer(lambda: run(changed)), run(draws)), "the same draws in another container "
                                                                        "changed the answer")


# ---------------------------------------------------------------------------------------------
# parse_exact_set

PART_ARGS = {"sinks": ["count"], "window": ["width"], "sortlsh": ["bits", "block", "rounds", "centred"],
             "blocktop": ["block", "count"], "heavykeys": ["count", "rows"],
             "quest": ["block", "candidates", "keep"], "topk": ["k"]}


@st.composite
def exact_set_text(draw):
    """A description: valid parts (positional or keyword arguments, spacing, huge integers),
    or one broken piece (unknown name, bad literal, unknown keyword, out of range, bad syntax)."""
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(PART_ARGS)))
        args = []
        for i, arg in enumerate(PART_ARGS[name][:draw(st.integers(0 if name not in ("sinks", "window", "topk")
                                                                       else 1, len(PART_ARGS[name])))]):
            value = draw(st.booleans()) if arg == "centred" else draw(st.one_of(
                st.integers(1, 40), st.just(10**30)))
            if name == "sortlsh" and arg == "bits":
                value = draw(st.integers(1, 30))
            if name == "quest" and arg == "block":  # candidates (default 1024) must hold a block
                value = draw(st.integers(1, 40))
            if name == "quest" and arg == "candidates":
                value = max(value, int(args[0].split("=")[-1]) if args else 16)
            keyword = draw(st.booleans()) or (len(args) and "=" in args[-1]) or arg == "centred"
            args.append(f"{arg}={value}" if keyword else str(value))
        pieces.append(f"{name}({', '.join(args)})")
    broken = draw(st.sampled_from([None, None, "name", "literal", "keyword", "range", "syntax", "empty",
                                   "bool", "digits"]))
    if broken:
        i = draw(st.integers(0, len(pieces) - 1))
        pieces[i] = {"name": "sink(4)", "literal": "window(2.5)", "keyword": "sinks(size=4)",
                     "range": draw(st.sampled_from(["sinks(0)", "window(-3)", "sortlsh(31)", "quest(16, 8)",
                                                    "topk(0)", "heavykeys(rows=0)"])),
                     "syntax": draw(st.sampled_from(["sinks(4", "sinks 4", "sinks((4))", "sinks(4)(5)",
                                                     "window(w=)", "sinks(4,,)x"])),
                     "empty": "", "bool": "sinks(True)", "digits": "sinks(" + "9" * 5000 + ")"}[broken]
    sep = draw(st.sampled_from(["|", " | ", "|  "]))
    return sep.join(pieces), broken


@settings(max_examples=examples(200))
@given(exact_set_text())
def test_parse_exact_set_reads_descriptions_back_or_names_the_problem(text_broken):
    text, broken = text_broken
    if broken:
        expect_input_error(lambda: es.parse_exact_set(text), "exact-set", "exact set", "must", "bad arguments")
        return
    parsed = answer(lambda: es.parse_exact_set(text))
    again = es.parse_exact_set(parsed.describe())
    verdict(again == parsed and again.describe() == parsed.describe(), f"{text!r} does not round-trip")


@settings(max_examples=examples(60))
@given(st.one_of(st.text(max_size=40), st.binary(max_size=8), st.none(), st.integers(),
                 st.lists(st.text(max_size=5), max_size=2)))
def test_parse_exact_set_of_arbitrary_input(text):
    try:
        result = es.parse_exact_set(text)
    except InputError as err:
        record("clear error")
        assert str(err)
        return
    except Exception as err:  # noqa: BLE001
        record("unclear")
        raise AssertionError(f"parse_exact_set({text!r}) crashed: {type(err).__name__}: {err}") from err
    verdict(isinstance(result, es.ExactSet) and es.parse_exact_set(result.describe()) == result,
            f"parse_exact_set({text!r}) gave {result!r}")


@pytest.mark.parametrize("part", [es.blocktop(2**62, 3), es.quest(2, 4, 2**62), es.quest(2, 2**62, 3),
                                  es.sortlsh(3, 2**62, 1),
                                  es.quest(2, 10**30, 3), es.sortlsh(3, 10**30, 2), es.sortlsh(3, 2**63 - 1, 1),
                                  es.sinks(10**30), es.window(10**30)], ids=str)
def test_exact_set_parts_larger_than_the_sequence(part):
    """Blocks, widths, counts and candidates beyond the sequence (beyond int64 too) act as the
    whole sequence: both engines answer inside the hull and agree on the same draws."""
    q, k, v = standard_qkv(12, 4)
    cfg = HyperConfig(mode="direct", exact_set=part, samples=3, min_seq_len=2, query_block=5)
    for causal in (False, True):
        case = dict(q=q, k=k, v=v, causal=causal, scale=None)
        out = {}
        for engine in ("numpy", "numba"):
            out[engine] = answer(lambda: hyper_attention(q, k, v, causal=causal, config=cfg, rng=0,
                                                         engine=engine))
            _check_hull(case, cfg, out[engine], f"{part} causal={causal} engine={engine}")
        tol, _, _ = _engines_tolerance(case, cfg, max_abs(v))
        err = gap(out["numpy"], out["numba"])
        verdict(err <= tol, f"{part} causal={causal}: numpy vs numba engine: max|diff| {err:.3g} > {tol:.3g}")


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_causal_merge_stays_convex_when_float32_cannot_hold_log_2(engine):
    """Row 2 sees two keys of logit 6291456 (a float32 with ulp 0.5), one in its exact leaf and one
    in its off-diagonal block: the merged weights must still sum to 1 (they summed to 1.21)."""
    big = 1.5 * 2**22
    q = np.ones((4, 1), np.float32)
    k = np.array([[big], [-big], [big], [-big]], np.float32)
    v = np.ones((4, 2), np.float32)
    cfg = HyperConfig(bits=1, block=4, samples=2, min_seq_len=2)  # block >= nk: exact
    out = hyper_attention(q, k, v, causal=True, scale=1.0, config=cfg, rng=0, engine=engine)
    verdict(bool(gap(out, 1.0) <= softmax_tolerance(0.0, 4, 1.0, np.float32)), f"{engine}: {out[:, 0]}")


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_numba_approxd_keeps_a_finite_answer_when_its_factor_overflows(engine):
    q = np.array([[2, -2, -1], [4, -4, 3], [3, -2, 0], [3, -3, 4], [3, -2, 3], [4, -1, -1], [-4, 1, -2]],
                 np.float16)
    k = np.array([[-3, -1, 3], [1, 3, -4], [0, 0, 0], [3, -3, -2], [3, -4, -4], [2, 4, 1]], np.float16)
    v = np.array([[0.6763], [0.073], [0.536], [1.026], [0.251], [0.004436]], np.float16)
    cfg = HyperConfig(bits=1, block=1, samples=1, min_seq_len=1, sampler="rownorm", normalizer="approxd",
                      approxd_samples=1)
    draws = make_draws(cfg, 7, 6, 3, causal=True, rng=2)
    out = hyper_attention(q, k, v, scale=8.0, causal=True, config=cfg, draws=draws, engine=engine)
    verdict(bool(np.isfinite(out).all()), f"{engine}: {out.ravel()}")


def test_approxd_causal_merge_of_a_block_whose_factor_overflows():
    """The recursion's first block has ``e^(lse − log d̃) = e^130`` (beyond float32), a later block
    a normalizer ``e^256`` that brings the merged answer back to about 6.7: the reference must
    combine the exponents before forming it (it gave NaN)."""
    q = np.array([3, 1, 0, -2, -2, -4, -4, -4, -3, 3, 1, 4, 0, 1, 4, 2], np.float32).reshape(1, 2, 8, 1)
    k = np.array([1, 0, 1, 4, -2, 3, 2, -4, -1, 3, 0, -4, 2], np.float32).reshape(1, 1, 13, 1)
    v = np.array([-0.7322674, -0.544259, -0.31630015, 0.41163054, 1.0425134, -0.12853466, 1.3664634,
                  -0.6651947, 0.35151008, 0.90347016, 0.0940123, -0.7434993, -0.9217254],
                 np.float32).reshape(1, 1, 13, 1)
    cfg = HyperConfig(bits=1, block=1, samples=1, min_seq_len=1, sampler="uniform", normalizer="approxd",
                      approxd_samples=1)
    out = hyper_attention(q, k, v, causal=True, scale=16.0, config=cfg, rng=0, engine="numpy")
    wide = hyper_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal=True,
                           scale=16.0, config=cfg, rng=0, engine="numpy")  # e^130 fits in float64
    # exponents near 258 carry a float32 rounding of 258·u each; three of them enter e^s
    lse = hyper_attention(q, k, v, causal=True, scale=16.0, config=cfg, rng=0, engine="numpy", return_lse=True)[1]
    size = float(np.abs(lse).max())
    tol = math.expm1(3 * size * eps(np.float32)) * max_abs(wide) + softmax_tolerance(0.0, 14, max_abs(wide),
                                                                                          np.float32)
    verdict(bool(np.isfinite(out).all() and gap(out, wide) <= tol), f"{out[0, 0, :, 0]} vs {wide[0, 0, :, 0]}")


def test_direct_numba_engine_takes_hand_built_longdouble_uniforms():
    """Longdouble uniforms (accepted by the draws check and by the reference; numba's TypingError
    before) that float64 holds give the answer of their float64 values bit for bit, and the NumPy
    engine's on the same draws within the engines' tolerance."""
    q, k, v = standard_qkv(8, 2)
    cfg = HyperConfig(mode="direct", exact_set=es.sinks(1), samples=2, min_seq_len=2, query_block=2)
    draws = make_draws(cfg, 8, 8, 2, rng=0)
    wide = dataclasses.replace(draws, direct=dataclasses.replace(
        draws.direct, sample_u=draws.direct.sample_u.astype(np.longdouble)))
    want = hyper_attention(q, k, v, config=cfg, draws=draws, engine="numba")
    out = answer(lambda: hyper_attention(q, k, v, config=cfg, draws=wide, engine="numba"))
    verdict(np.array_equal(out, want), "longdouble uniforms changed the answer")
    tol, _, _ = _engines_tolerance(dict(q=q, k=k, v=v, causal=False, scale=None), cfg, max_abs(v))
    err = gap(out, hyper_attention(q, k, v, config=cfg, draws=wide, engine="numpy"))
    verdict(err <= tol, f"numpy vs numba engine on longdouble uniforms: max|diff| {err:.3g} > {tol:.3g}")


@pytest.mark.skipif(np.longdouble not in FLOAT_DTYPES, reason="longdouble is float64 here")
def test_direct_numba_engine_samples_longdouble_uniforms_just_below_a_cdf_step():
    """A longdouble uniform just below a CDF step (``1/2 − 2^-60``, which rounds to ``1/2`` in
    float64) samples the key below the step, as the reference's longdouble search does: the
    Numba engine takes the float64 below it, not the nearest."""
    q, k, v = standard_qkv(9, 2)
    cfg = HyperConfig(mode="direct", exact_set=es.sinks(1), samples=2, min_seq_len=2, query_block=9,
                      sampler="uniform")  # support [1, 9): CDF steps j/8, exact in binary
    draws = make_draws(cfg, 9, 9, 2, rng=0)
    tiny = np.longdouble(2.0) ** -60
    u = np.array([[0.5, 0.25]], np.longdouble) - tiny
    below = dataclasses.replace(draws, direct=dataclasses.replace(draws.direct, sample_u=u))
    want = hyper_attention(q, k, v, config=cfg, draws=below, engine="numpy")
    out = answer(lambda: hyper_attention(q, k, v, config=cfg, draws=below, engine="numba"))
    tol, _, _ = _engines_tolerance(dict(q=q, k=k, v=v, causal=False, scale=None), cfg, max_abs(v))
    err = gap(out, want)
    verdict(err <= tol, f"numpy vs numba engine just below a CDF step: max|diff| {err:.3g} > {tol:.3g}")


@pytest.mark.skipif(np.longdouble not in FLOAT_DTYPES, reason="longdouble is float64 here")
def test_longdouble_inputs_keep_their_precision_and_range():
    """ApproxD kept ``log a_i`` in float64 (a longdouble answer off by 1e-16), and the logit bound
    of entries beyond float64's range times a zero factor was ``0·inf = nan``: a valid input refused."""
    q, k, v = (x.astype(np.longdouble) for x in standard_qkv(6, 2))
    cfg = HyperConfig(bits=1, block=6, samples=1, min_seq_len=1, approxd_samples=1, normalizer="approxd")
    case = dict(q=q, k=k, v=v, scale=None, causal=False, regime="normal", dtype=np.longdouble,
                exact_logits=False)
    check_exact(case, *hyper_attention(q, k, v, config=cfg, rng=0, engine="numpy", return_lse=True))
    huge = q * np.exp2(np.longdouble(3000))  # beyond float64's range; k = 0: every logit is 0
    zero = np.zeros_like(k)
    case = dict(case, q=huge, k=zero, exact_logits=True)
    out = answer(lambda: hyper_attention(huge, zero, v, config=cfg, rng=0, engine="numpy", return_lse=True))
    check_exact(case, *out)
