"""Public API: batching, GQA, draws, defaults and input validation."""

import numpy as np
import pytest

from hyperref import HyperConfig, InputError, exact_attention, hyper_attention, make_draws

CFG = HyperConfig(bits=4, block=16, samples=16, min_seq_len=16, approxd_samples=8)


def _batched(b=2, h=4, hk=2, nq=80, nk=64, d=8, dv=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, nq, d)), rng.standard_normal((b, hk, nk, d)),
            rng.standard_normal((b, hk, nk, dv)))


@pytest.mark.parametrize("causal", [False, True])
def test_batched_gqa_equals_per_head(causal):
    q, k, v = _batched()
    draws = make_draws(CFG, 80, 64, 8, causal=causal, batch_shape=(2, 4), rng=1)
    out, lse = hyper_attention(q, k, v, causal=causal, config=CFG, draws=draws, return_lse=True)
    assert out.shape == (2, 4, 80, 5) and lse.shape == (2, 4, 80)
    for b in range(2):
        for h in range(4):
            o1, l1 = hyper_attention(q[b, h], k[b, h // 2], v[b, h // 2], causal=causal, config=CFG,
                                     draws=draws.head((b, h)), return_lse=True)
            np.testing.assert_array_equal(out[b, h], o1)
            np.testing.assert_array_equal(lse[b, h], l1)


def test_same_seed_same_answer_and_generator_accepted():
    q, k, v = _batched()
    a = hyper_attention(q, k, v, config=CFG, rng=5)
    b = hyper_attention(q, k, v, config=CFG, rng=np.random.default_rng(5))
    c = hyper_attention(q, k, v, config=CFG, rng=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_heads_get_independent_draws():
    q, k, v = _batched(b=1, h=2, hk=1)
    q[0, 1] = q[0, 0]
    out = hyper_attention(q, k, v, config=CFG, rng=0)
    assert not np.array_equal(out[0, 0], out[0, 1])


def test_float32_stays_float32():
    q, k, v = (a.astype(np.float32) for a in _batched())
    out, lse = hyper_attention(q, k, v, config=CFG, rng=0, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    ref = hyper_attention(*(a.astype(np.float64) for a in (q, k, v)), config=CFG, rng=0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_default_config_is_the_papers():
    cfg = HyperConfig()
    assert (cfg.bits, cfg.block, cfg.samples, cfg.min_seq_len) == (7, 256, 256, 4096)


def test_short_inputs_are_exact_under_defaults():
    q, k, v = _batched(nq=100, nk=100)
    np.testing.assert_allclose(hyper_attention(q, k, v, rng=0), exact_attention(q, k, v), rtol=1e-14)


def test_empty_queries_give_empty_output():
    q, k, v = _batched(nq=0)
    out, lse = hyper_attention(q, k, v, config=CFG, rng=0, return_lse=True)
    assert out.shape == (2, 4, 0, 5) and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), "all be"),
    (lambda q, k, v: (q, k[:, :, :, :4], v), "head dimension"),
    (lambda q, k, v: (q, k, v[:, :, :10]), "same length"),
    (lambda q, k, v: (q, k[:1], v[:1]), "batch sizes"),
    (lambda q, k, v: (q[:, :3], k, v), "must divide"),
    (lambda q, k, v: (q, k[:, :1], v), "same number of heads"),
    (lambda q, k, v: (q.astype(int), k, v), "floating"),
    (lambda q, k, v: (q, k.astype(complex), v), "floating"),
    (lambda q, k, v: (np.where(q > 2, np.nan, q), k, v), "NaN or Inf"),
    (lambda q, k, v: (q, np.where(k > 2, np.inf, k), v), "NaN or Inf"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "at least one key"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), "head dimensions"),
])
@pytest.mark.parametrize("fn", [hyper_attention, exact_attention])
def test_bad_input_raises(bad, match, fn):
    with pytest.raises(InputError, match=match):
        fn(*bad(*_batched()))


def test_bad_scale_and_config_and_draws():
    q, k, v = _batched()
    with pytest.raises(InputError, match="finite"):
        hyper_attention(q, k, v, scale=float("nan"))
    with pytest.raises(InputError, match="HyperConfig"):
        hyper_attention(q, k, v, config={"block": 3})
    draws = make_draws(CFG, 80, 64, 8, batch_shape=(2, 4), rng=0)
    with pytest.raises(InputError, match="draws were made for"):
        hyper_attention(q, k, v, causal=True, config=CFG, draws=draws)
    with pytest.raises(InputError, match="draws were made for"):
        hyper_attention(q[:, :, :70], k, v, config=CFG, draws=draws)
    with pytest.raises(InputError, match="different HyperConfig"):
        hyper_attention(q, k, v, config=HyperConfig(block=8, min_seq_len=16), draws=draws)


@pytest.mark.parametrize("fn", [exact_attention, hyper_attention])
def test_causal_must_be_a_bool(fn):
    # "no" is truthy: taken as a flag it would silently give the causal answer
    q, k, v = _batched()
    with pytest.raises(InputError, match="causal must be a bool"):
        fn(q, k, v, causal="no")
    assert np.array_equal(fn(q, k, v, causal=np.bool_(True)), fn(q, k, v, causal=True))
    with pytest.raises(InputError, match="causal must be a bool"):
        make_draws(CFG, 80, 80, 8, causal=1)
    with pytest.raises(InputError, match="return_lse must be a bool"):
        fn(q, k, v, return_lse="no")


@pytest.mark.parametrize("args,kwargs,match", [
    ((CFG, -5, 10, 4), {}, "nq must be an integer"),
    ((CFG, 100.5, 100, 4), {}, "nq must be an integer"),
    ((CFG, 100, 100, 0), {}, "d must be an integer >= 1"),
    ((CFG, 100, 100, 4), dict(batch_shape=(-1, 2)), "batch_shape entry"),
    ((CFG, 100, 100, 4), dict(batch_shape="ab"), "tuple of ints"),
    (({"block": 3}, 100, 100, 4), {}, "HyperConfig"),
])
def test_make_draws_checks_its_arguments(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        make_draws(*args, **kwargs)


def test_heavy_mask_checks_its_arguments():
    from hyperref.attention import heavy_mask

    q = np.random.default_rng(0).standard_normal((80, 8))
    draws = make_draws(CFG, 80, 80, 8, rng=0)
    assert heavy_mask(q, q, config=CFG, draws=draws).nq == 80
    for args, kwargs, match in [((q[None], q[None]), dict(draws=draws), "all be"),
                                ((q, q[:, :4]), dict(draws=draws), "head dimension"),
                                ((q, q), {}, "needs the call's draws"),
                                ((q, q), dict(draws=draws, causal=True), "draws were made for"),
                                ((q, q), dict(draws=draws, config={"block": 3}), "HyperConfig")]:
        with pytest.raises(InputError, match=match):
            heavy_mask(*args, **{"config": CFG, **kwargs})


@pytest.mark.parametrize("kwargs,exc", [
    (dict(block=0), ValueError), (dict(samples=-1), ValueError), (dict(bits=31), ValueError),
    (dict(bits=2.5), TypeError), (dict(block=True), TypeError),
    (dict(estimator="exact"), ValueError), (dict(sampler="topk"), ValueError),
    (dict(normalizer="none"), ValueError), (dict(kappa=0.5), ValueError),
    (dict(kappa=float("inf")), ValueError), (dict(kappa="2"), TypeError),
])
def test_config_validation(kwargs, exc):
    with pytest.raises(exc):
        HyperConfig(**kwargs)
