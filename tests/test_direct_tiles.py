"""The own-key call's Triton kernel (:mod:`hyperref.gpu.direct_tiles`) against the dense function
of the same plan.

The kernel reads the plan's tile lists; the dense form (:func:`direct_flex._math` of
:func:`direct_flex._own_mask`) reads the mask alone, so agreement checks the lists, the sub-tile
spans the kernel skips to and the mask together. Inputs float32 (IEEE products), the dense form
in float64: the difference is float32 rounding of one softmax over at most a few hundred keys
of logits |s| ≲ 6, ~1e-6 (tolerance 2e-5). On the CPU the kernel runs under ``TRITON_INTERPRET=1``.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.nn.attention.flex_attention")
from hyperref.direct import paper_exact_set  # noqa: E402
from hyperref.gpu import direct_flex as F  # noqa: E402
from hyperref.gpu.direct_tiles import TILES, check_tiles, own_tiles_forward  # noqa: E402

from .test_direct_flex import _plan, _qkv  # noqa: E402

CUDA = torch.cuda.is_available()
RUNS = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not RUNS, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if CUDA else "cpu"
TOL = 2e-5


def _dense(q, k, v, plan, exact_set, causal, scale):
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return F._math(q.double(), k.double(), v.double(), F._own_mask(plan, exact_set, causal), None, scale)


def _plan_of(name, bq, causal, q, k, v):
    """The plan of ``q`` against ``k, v`` (their key heads expanded to the query heads), on the CPU."""
    from hyperref import make_draws
    from hyperref.gpu import direct_plan as P

    from .test_direct_flex import _config

    (b, h, nq, d), nk = q.shape, k.shape[2]
    cfg = _config(name, bq, 16)
    draws = make_draws(cfg, nq, nk, d, causal=causal, batch_shape=(b, h), rng=5)
    rows, u = F._draws(cfg, cfg.exact_set, nq, nk, d, causal, b, h, q.device, draws, None)
    ke, ve = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))
    return P.make_plan(q, ke, ve, causal=causal, scale=0.25, config=cfg, heavy_rows=rows, sample_u=u), cfg


def _check(name, bq, nq, nk, causal, tiles, hk=2):
    q, k, v = (torch.tensor(x, dtype=torch.float32) for x in _qkv(1, 2, hk, nq, nk, 16, seed=5))
    plan, cfg = _plan_of(name, bq, causal, q, k, v)
    E = paper_exact_set(cfg)
    to = lambda x: x.to(DEV)
    out, lse = own_tiles_forward(to(q), to(k), to(v), _to_device(plan), sinks=E.sink_count,
                                 window=E.window_width, causal=causal, scale=0.25, tiles=tiles)
    ref, ref_lse = _dense(q, k, v, plan, E, causal, 0.25)
    np.testing.assert_allclose(out.cpu().double().numpy(), ref.numpy(), atol=TOL, rtol=0)
    np.testing.assert_array_equal(torch.isinf(lse).cpu().numpy(), torch.isinf(ref_lse).numpy())
    fin = torch.isfinite(ref_lse)
    np.testing.assert_allclose(lse.cpu().double()[fin].numpy(), ref_lse[fin].numpy(), atol=TOL, rtol=0)
    return plan


def _to_device(plan):
    from dataclasses import fields, replace

    return replace(plan, **{f.name: getattr(plan, f.name).to(DEV) for f in fields(plan)
                            if isinstance(getattr(plan, f.name), torch.Tensor)})


# sinks + window; routed blocks with straddled ends (edges); picked blocks; aligned routes at nq ≠ nk;
# lengths not multiples of the tiles, nq < nk and nq > nk
CASES = [("sw", 64, 300, 300), ("sw_route", 64, 300, 700), ("top128", 128, 300, 1500),
         ("sw_heavy_route", 128, 300, 330), ("sw_route_aligned", 64, 300, 648), ("sw_route_peaks", 64, 390, 130)]


@pytest.mark.parametrize("name,bq,nq,nk", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_is_the_dense_function_of_its_plan(name, bq, nq, nk, causal):
    _check(name, bq, nq, nk, causal, None)


@pytest.mark.parametrize("tiles", [(64, 32, 16, 4, 1), (32, 16, 32, 4, 1), (16, 16, 16, 2, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_every_tile_shape_gives_the_same_function(tiles, causal):
    """Smaller row tiles skip more sub-tiles (the window's edges, a sink tile's tail): the same answer."""
    plan = _check("sw_route", 64, 300, 700, causal, tiles)
    assert plan.edges is not None  # the straddled routed tiles are exercised


def test_grouped_key_heads():
    _check("sw_route", 64, 300, 700, True, None, hk=1)


def test_rows_without_keys_are_zero_with_lse_minus_inf():
    """Causal nq > nk: the first rows see no key (out 0, lse −∞, as FlexAttention gives them)."""
    _check("sw", 64, 390, 130, True, (32, 32, 32, 4, 1))


@pytest.mark.parametrize("tiles, message", [((128, 64, 64, 4), "five ints"), ((256, 64, 64, 4, 3), "powers of two"),
                                            ((128, 48, 64, 4, 3), "powers of two"), ((128, 64, 64, 3, 3), "num_warps"),
                                            ((128, 64, 64, 4, 0), "num_stages"), ((128.0, 64, 64, 4, 3), "five ints")])
def test_tiles_are_checked(tiles, message):
    with pytest.raises(ValueError, match=message):
        check_tiles(tiles)
    assert check_tiles(None) == TILES


def test_inputs_are_checked():
    plan, cfg = _plan("sw", 64, 16, 300, 300, True)
    q, k, v = (torch.tensor(x, dtype=torch.float32) for x in _qkv(1, 2, 2, 300, 300, 16, seed=5))
    kw = dict(sinks=4, window=64, causal=True, scale=0.25)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        own_tiles_forward(q.double(), k.double(), v.double(), plan, **kw)
    with pytest.raises(ValueError, match="the plan is for"):
        own_tiles_forward(q[:, :, :200], k, v, plan, **kw)
    with pytest.raises(ValueError, match="shapes do not fit"):
        own_tiles_forward(q[..., :12], k[..., :12], v, plan, **kw)
