"""The Numba engine equals the NumPy reference on the same draws."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from hyperref import HyperConfig, hyper_attention, make_draws

COMBOS = list(itertools.product(("masked", "paper"), ("self", "approxd"),
                                ("rownorm", "uniform", "mixed")))


def _inputs(shape_q, shape_k, dv, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = 1.5 * rng.standard_normal(shape_q)
    k = rng.standard_normal(shape_k)
    v = rng.standard_normal(shape_k[:-1] + (dv,))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _both(q, k, v, cfg, causal, seed=3):
    batch = () if q.ndim == 2 else q.shape[:2]
    draws = make_draws(cfg, q.shape[-2], k.shape[-2], q.shape[-1], causal=causal,
                       batch_shape=batch, rng=seed)
    ref = hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, engine="numpy",
                          return_lse=True)
    fast = hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, engine="numba",
                           return_lse=True)
    return ref, fast


def run_without_jit(code: str) -> None:
    """Run ``code`` in a fresh interpreter with ``NUMBA_DISABLE_JIT=1`` (the kernels' Python
    bodies, also for :mod:`hyperref.direct_numba`); it must exit 0 and print ``ok``."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("estimator,normalizer,sampler", COMBOS)
@pytest.mark.parametrize("causal", [False, True])
def test_numba_equals_reference_float64(estimator, normalizer, sampler, causal):
    cfg = HyperConfig(bits=5, block=32, samples=24, min_seq_len=40, approxd_samples=16,
                      estimator=estimator, normalizer=normalizer, sampler=sampler)
    q, k, v = _inputs((2, 4, 301, 16), (2, 2, 301, 16), 8, 0)
    (o_ref, l_ref), (o, l) = _both(q, k, v, cfg, causal)
    assert _rel(o, o_ref) <= 1e-10
    finite = np.isfinite(l_ref)
    assert np.array_equal(finite, np.isfinite(l))
    assert _rel(l[finite], l_ref[finite]) <= 1e-10


@pytest.mark.parametrize("nq,nk", [(257, 100), (100, 257), (513, 513), (130, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_numba_equals_reference_odd_shapes(nq, nk, causal):
    cfg = HyperConfig(bits=4, block=16, samples=16, min_seq_len=20, normalizer="approxd")
    q, k, v = _inputs((nq, 8), (nk, 8), 3, nq + nk)
    (o_ref, l_ref), (o, l) = _both(q, k, v, cfg, causal)
    assert _rel(o, o_ref) <= 1e-10
    assert np.array_equal(np.isfinite(l), np.isfinite(l_ref))


@pytest.mark.parametrize("causal", [False, True])
def test_numba_float32_within_derived_tolerance(causal):
    # tolerance derived from the reference itself: float32 reference vs float64 reference,
    # the fast float32 path may differ from float64 by at most twice that plus a floor
    cfg = HyperConfig(bits=5, block=32, samples=32, min_seq_len=64, normalizer="approxd")
    q, k, v = _inputs((1, 2, 400, 32), (1, 2, 400, 32), 16, 1)
    draws = make_draws(cfg, 400, 400, 32, causal=causal, batch_shape=(1, 2), rng=0)
    ref64 = hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, engine="numpy")
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    ref32 = hyper_attention(q32, k32, v32, causal=causal, config=cfg, draws=draws, engine="numpy")
    fast32 = hyper_attention(q32, k32, v32, causal=causal, config=cfg, draws=draws, engine="numba")
    assert fast32.dtype == np.float32
    floor = 8 * np.finfo(np.float32).eps
    assert _rel(fast32, ref64) <= 2 * _rel(ref32, ref64) + floor


def test_bad_engine():
    from hyperref import InputError
    q = np.ones((10, 2))
    with pytest.raises(InputError, match="engine"):
        hyper_attention(q, q, q, engine="cuda")


def test_kernels_without_jit():
    """A small subset with NUMBA_DISABLE_JIT=1: the kernels' Python bodies give the same answer."""
    code = (
        "import numpy as np\n"
        "from hyperref import HyperConfig, hyper_attention, make_draws\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = rng.standard_normal((3, 1, 2, 90, 8))\n"
        "for causal in (False, True):\n"
        "    for est, nrm in (('masked', 'approxd'), ('paper', 'self')):\n"
        "        cfg = HyperConfig(bits=3, block=16, samples=8, min_seq_len=20, approxd_samples=8,\n"
        "                          estimator=est, normalizer=nrm)\n"
        "        d = make_draws(cfg, 90, 90, 8, causal=causal, batch_shape=(1, 2), rng=1)\n"
        "        a = hyper_attention(q, k, v, causal=causal, config=cfg, draws=d, engine='numpy')\n"
        "        b = hyper_attention(q, k, v, causal=causal, config=cfg, draws=d, engine='numba')\n"
        "        assert np.abs(a - b).max() <= 1e-10 * np.abs(a).max(), (causal, est)\n"
        "print('ok')\n"
    )
    run_without_jit(code)
