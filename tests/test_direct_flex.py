"""The block-sparse FlexAttention engine of the direct mode against the reference, same draws.

On the CPU the engine evaluates its mask and score functions on dense scores
(FlexAttention has no CPU backward); :func:`test_flex_eager_reads_the_mods_the_same_way`
checks that FlexAttention's own eager path gives the same answer from them, and
:func:`test_tile_lists_cover_the_mask` checks the block lists the compiled
kernel reads against the mask. On CUDA the compiled kernel runs (tolerances
from bf16/fp32 rounding of one softmax).
"""

from dataclasses import replace

import numpy as np
import pytest

from hyperref import HyperConfig, InputError, hyper_attention, make_draws
from hyperref.exact_set import blockkeys, blocktop, heavykeys, quest, sinks, sortlsh, window

torch = pytest.importorskip("torch")
flex = pytest.importorskip("torch.nn.attention.flex_attention")
from hyperref.gpu import direct_flex as F  # noqa: E402
from hyperref.gpu import direct_plan as P  # noqa: E402
from hyperref.gpu import direct_select as S  # noqa: E402
from hyperref.gpu.direct import direct_attention  # noqa: E402
from hyperref.gpu.options import flex_kernel_options  # noqa: E402

CUDA = torch.cuda.is_available()

SETS = {
    "sw": sinks(4) | window(64),
    "sw_heavy": sinks(4) | window(64) | heavykeys(8, 32),
    "sw_heavy_top": sinks(3) | window(40) | heavykeys(8, 32) | blocktop(128, 2),
    "top128": sinks(2) | window(130) | blocktop(128, 2),
    "top256": sinks(4) | window(64) | blocktop(256, 1),
    "heavy_only": heavykeys(16, 64),
    # blockkeys(block, keep, reps, candidates, key_block)
    "sw_bkeys": sinks(4) | window(40) | blockkeys(128, 24, 2, 64, 16),
    "sw_heavy_bkeys": sinks(3) | window(40) | heavykeys(8, 32) | blockkeys(128, 24, 3, 48, 16),
    "bkeys256_top": sinks(2) | window(64) | blocktop(128, 1) | blockkeys(256, 30, 2, 64, 32),
    # every candidate kept, whole key tiles: the chosen blocks are own-key tiles
    "sw_route": sinks(4) | window(40) | blockkeys(128, 256, 2, 256, 128),
    "sw_heavy_route": sinks(3) | window(100) | heavykeys(8, 32) | blockkeys(256, 300, 3, 256, 128),
    # w ≡ 1 (mod 128): at nk − nq ≡ 0 the eligible ranges end on tile boundaries (no edge lookup)
    "sw_route_aligned": sinks(4) | window(129) | blockkeys(128, 256, 2, 256, 128),
    # the coarse stage by relative peaks instead of masses (with and without the fine stage)
    "sw_route_peaks": sinks(4) | window(40) | blockkeys(128, 128, 2, 128, 128, peaks=True),
    "sw_bkeys_peaks": sinks(4) | window(40) | blockkeys(128, 24, 3, 64, 16, peaks=True),
}


def _qkv(b, h, hk, nq, nk, d, seed=0, zero_every=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, nq, d))
    k = rng.standard_normal((b, hk, nk, d))
    v = rng.standard_normal((b, hk, nk, d))
    if zero_every:
        v[..., ::zero_every, :] = 0.0
    return q, k, v


def _config(name, bq, m, sampler="mixed"):
    return HyperConfig(mode="direct", exact_set=SETS[name], query_block=bq, samples=m, min_seq_len=8,
                       sampler=sampler)


def _both(q, k, v, cfg, causal, seed=1):
    b, h = q.shape[:2]
    draws = make_draws(cfg, q.shape[2], k.shape[2], q.shape[3], causal=causal, batch_shape=(b, h), rng=seed)
    ref, ref_lse = hyper_attention(q, k, v, config=cfg, draws=draws, causal=causal, return_lse=True,
                                   engine="numpy")
    out, lse = F.direct_flex_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), causal=causal,
                                       config=cfg, draws=draws, return_lse=True)
    return ref, ref_lse, out.numpy(), lse.numpy()


# float64 on both sides: the reference's own rounding differences between two orders of summation
TOL = 1e-12


@pytest.mark.parametrize("name,bq", [("sw", 64), ("sw_heavy", 64), ("sw_heavy_top", 32), ("top128", 128),
                                     ("top256", 256), ("heavy_only", 128), ("sw_bkeys", 64),
                                     ("sw_heavy_bkeys", 32), ("bkeys256_top", 128), ("sw_route", 64),
                                     ("sw_heavy_route", 256), ("sw_route_aligned", 64), ("sw_route_peaks", 64),
                                     ("sw_bkeys_peaks", 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_same_draws_same_answer(name, bq, causal):
    q, k, v = _qkv(1, 2, 2, 300, 300, 16)
    for sampler in ("mixed", "rownorm", "uniform"):
        ref, ref_lse, out, lse = _both(q, k, v, _config(name, bq, 16, sampler), causal)
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(lse, ref_lse, atol=TOL, rtol=0)


@pytest.mark.parametrize("nq,nk", [(130, 390), (390, 130), (1, 257), (257, 1), (129, 129)])
def test_lengths_and_alignment(nq, nk):
    q, k, v = _qkv(2, 2, 2, nq, nk, 8, seed=2)
    ref, ref_lse, out, lse = _both(q, k, v, _config("sw_heavy_top", 32, 8), causal=True)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))  # rows that see no key: lse −inf
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=TOL, rtol=0)


def test_grouped_heads_and_zero_value_rows():
    q, k, v = _qkv(1, 6, 2, 260, 260, 16, seed=3, zero_every=3)
    for sampler in ("rownorm", "mixed"):
        ref, ref_lse, out, lse = _both(q, k, v, _config("sw_heavy", 64, 32, sampler), causal=True)
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(lse, ref_lse, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["sw_heavy_top", "sw_route"])  # with gathered heavy keys; none gathered
def test_no_samples_is_the_exact_set_alone(name):
    q, k, v = _qkv(1, 1, 1, 300, 300, 16, seed=4)
    ref, ref_lse, out, lse = _both(q, k, v, _config(name, 64, 0), causal=True)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=TOL, rtol=0)


def _plan(name, bq, m, nq, nk, causal, seed=5):
    q, k, v = _qkv(1, 2, 2, nq, nk, 16, seed=seed)
    cfg = _config(name, bq, m)
    draws = make_draws(cfg, nq, nk, 16, causal=causal, batch_shape=(1, 2), rng=seed)
    qt, kt, vt = map(torch.tensor, (q, k, v))
    rows, u = F._draws(cfg, cfg.exact_set, nq, nk, 16, causal, 1, 2, qt.device, draws, None)
    return P.make_plan(qt, kt, vt, causal=causal, scale=0.25, config=cfg, heavy_rows=rows, sample_u=u), cfg


@pytest.mark.parametrize("name,bq,nk", [("sw", 64, 700), ("sw_heavy_top", 32, 700), ("top128", 128, 700),
                                        ("top256", 256, 700), ("sw_route", 64, 700), ("sw_route_aligned", 64, 700),
                                        ("sw_route_aligned", 64, 648), ("top128", 128, 1500),
                                        ("sw_route", 64, 1500)])
@pytest.mark.parametrize("causal", [True, False])
def test_tile_lists_cover_the_mask(name, bq, nk, causal):
    """The own-key call computes exactly the exact set's sinks, window and picked blocks.

    Its entries (the mask function on the listed tiles, full tiles whole) against the
    reference's membership of those parts (:meth:`hyperref.exact_set.ExactSet.member_rows`),
    row by row, head by head; heavy keys go to the gathered call. The aligned window at
    ``nk − nq = 128`` has no straddling routed tile, so no edge table. At ``nk = 1500`` the
    lists are narrower than the key tiles (:func:`~hyperref.gpu.direct_plan.list_width`).
    """
    from hyperref.exact_set import ExactSet, Geometry, HeavyKeys

    nq = 520
    plan, cfg = _plan(name, bq, 16, nq, nk, causal)
    if name.startswith("sw_route"):
        assert (plan.edges is None) == (name == "sw_route_aligned" and nk == 648)
    q, k, _ = _qkv(1, 2, 2, nq, nk, 16, seed=5)
    own_parts = ExactSet(tuple(p for p in cfg.exact_set.parts if not isinstance(p, HeavyKeys)))
    n_qt, n_kt = -(-nq // S.QB), plan.nk_pad // S.KB
    assert plan.kv_idx.shape[-1] == plan.full_idx.shape[-1] <= n_kt
    assert plan.kv_idx.shape[-1] < n_kt or nk < 1500
    mask_mod = F._listed_mask(plan, cfg.exact_set, causal)  # what the compiled kernel reads
    full_all = F._dense_full(plan, nq)
    for hh in range(2):
        want = own_parts.member_rows(q[0, hh], k[0, hh], 0.25, Geometry(nq, nk, causal), np.arange(nq), nk)
        at = lambda x: x[0, min(hh, x.shape[1] - 1)]
        listed = torch.zeros(n_qt, n_kt, dtype=torch.bool)
        for t in range(n_qt):
            listed[t, at(plan.kv_idx)[t, :at(plan.kv_num)[t]].long()] = True
        in_listed = listed.repeat_interleave(S.QB, 0)[:nq].repeat_interleave(S.KB, 1)
        kept = mask_mod(torch.tensor(0), torch.tensor(hh), torch.arange(nq)[:, None],
                        torch.arange(plan.nk_pad)[None, :]) & in_listed
        full = at(full_all)
        assert not (kept & full).any(), "a tile is both partial and full"
        got = (kept | full)[:, :nk].numpy()  # FlexAttention cuts positions beyond the sequence
        np.testing.assert_array_equal(got, want)
        # the backward's key-to-query lists: the same tiles transposed, each list ascending
        for fwd, bwd in (((plan.kv_num, plan.kv_idx), (plan.q_num, plan.q_idx)),
                         ((plan.full_num, plan.full_idx), (plan.full_q_num, plan.full_q_idx))):
            rows = _listed_tiles(at(fwd[0]), at(fwd[1]), n_kt)
            cols = _listed_tiles(at(bwd[0]), at(bwd[1]), n_qt)
            np.testing.assert_array_equal(cols.T, rows)


def test_a_forward_plan_has_no_key_to_query_lists():
    """``backward=False``: the same forward lists, no transposed ones, and a backward refused."""
    q, k, v = _qkv(1, 2, 2, 300, 300, 16, seed=5)
    cfg = _config("sw_route", 64, 16)
    draws = make_draws(cfg, 300, 300, 16, causal=True, batch_shape=(1, 2), rng=5)
    qt, kt, vt = map(torch.tensor, (q, k, v))
    rows, u = F._draws(cfg, cfg.exact_set, 300, 300, 16, True, 1, 2, qt.device, draws, None)
    both = [P.make_plan(qt, kt, vt, causal=True, scale=0.25, config=cfg, heavy_rows=rows, sample_u=u,
                        backward=b) for b in (True, False)]
    for name in ("kv_num", "kv_idx", "full_num", "full_idx", "gpos", "logw"):
        assert torch.equal(getattr(both[0], name), getattr(both[1], name)), name
    assert both[0].q_num is not None
    assert all(getattr(both[1], x) is None for x in ("q_num", "q_idx", "full_q_num", "full_q_idx"))
    mask_mod = F._listed_mask(both[1], cfg.exact_set, True)
    F.own_block_mask(both[1], mask_mod, grad=False)
    with pytest.raises(ValueError, match="backward=True"):
        F.own_block_mask(both[1], mask_mod, grad=True)


def _listed_tiles(num, idx, n_cols):
    """Dense (rows, n_cols) marks of a tile listing, checking each row's list is ascending."""
    out = np.zeros((num.shape[0], n_cols), dtype=bool)
    for r in range(num.shape[0]):
        cols = idx[r, :int(num[r])].numpy()
        assert (np.diff(cols) > 0).all(), "a tile list is not ascending"
        out[r, cols] = True
    return out


@pytest.mark.parametrize("name,bq", [("sw", 32), ("sw_heavy", 256), ("sw_heavy_top", 32), ("top128", 128),
                                     ("sw_heavy_route", 128)])
def test_flex_eager_reads_the_mods_the_same_way(name, bq):
    """FlexAttention's eager path applies the mask function alone (it ignores the tile lists),
    so the mask says which entries count, the picked tiles' too; it is also what a compiled
    call falls back to past the recompile limit."""
    import warnings

    nq, nk = 300, 330
    plan, cfg = _plan(name, bq, 16, nq, nk, True)
    q, k, v = (torch.tensor(x) for x in _qkv(1, 2, 2, nq, nk, 16, seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns that eager is unfused
        got = F.flex_direct(q, k, v, plan, scale=0.25, config=cfg, causal=True, dense=False)
    want = F.flex_direct(q, k, v, plan, scale=0.25, config=cfg, causal=True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=TOL, rtol=0)


def test_selections_match_the_reference():
    from hyperref.exact_set import Geometry

    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((1, 2, 300, 16)), rng.standard_normal((1, 2, 300, 16))
    part = heavykeys(8, 32).parts[0]
    rows = np.sort(np.stack([rng.choice(300, 32, replace=False) for _ in range(2)]))[None]
    got = S.heavy_keys(part, torch.tensor(q), torch.tensor(k), torch.tensor(rows), 0.25, True, (4, 64))
    top = blocktop(128, 3).parts[0]
    picks = S.block_picks(top, torch.tensor(q), torch.tensor(k), True, (4, 64))
    for hh in range(2):
        want = part.prepare(q[0, hh], k[0, hh], 0.25, Geometry(300, 300, True), rows[0, hh], (4, 64))
        np.testing.assert_array_equal(got[0, hh][got[0, hh] >= 0].numpy(), want)
        np.testing.assert_array_equal(picks[0, hh].numpy(),
                                      top.prepare(q[0, hh], k[0, hh], 0.25, Geometry(300, 300, True), None,
                                                  (4, 64)))


def test_gradients_match_the_dense_twin():
    q, k, v = _qkv(1, 2, 1, 200, 200, 8, seed=7)
    cfg = _config("sw_heavy_top", 32, 16)
    draws = make_draws(cfg, 200, 200, 8, causal=True, batch_shape=(1, 2), rng=3)
    grads = []
    for fn in ("flex", "dense"):
        qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
        if fn == "flex":
            out, lse = F.direct_flex_attention(qt, kt, vt, causal=True, config=cfg, draws=draws, return_lse=True)
        else:
            out, lse = direct_attention(qt, kt, vt, causal=True, scale=8 ** -0.5, config=cfg, draws=draws)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        ((out * w).sum() + (lse.to(out.dtype) * 0.3).sum()).backward()
        grads.append([t.grad.numpy() for t in (qt, kt, vt)])
    for a, b in zip(*grads):
        # the dense twin's lse is float32: its gradient path carries float32 rounding
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_refusals():
    q = torch.zeros(1, 1, 256, 16)
    for E in (sinks(4) | sortlsh(7, 64, 1), sinks(4) | quest(8, 64, 16)):
        cfg = HyperConfig(mode="direct", exact_set=E, min_seq_len=8)
        with pytest.raises(InputError, match="row by row"):
            F.direct_flex_attention(q, q, q, config=cfg)
    with pytest.raises(InputError, match="query_block"):
        F.direct_flex_attention(q, q, q, config=HyperConfig(mode="direct", exact_set=sinks(4), query_block=48,
                                                             min_seq_len=8))
    with pytest.raises(InputError, match="mode='direct'"):
        F.direct_flex_attention(q, q, q, config=HyperConfig())
    cfg = HyperConfig(mode="direct", exact_set=sinks(4) | window(32), min_seq_len=8)
    wrong = make_draws(cfg, 128, 128, 16, causal=True, batch_shape=(1, 1), rng=0)
    with pytest.raises(InputError, match="draws were made for"):
        F.direct_flex_attention(q, q, q, config=cfg, draws=wrong)


@pytest.mark.parametrize("n", [300, 6])  # the block-sparse engine; exact attention (n <= min_seq_len)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_nonfinite_inputs_are_refused(name, n):
    # as the reference: NaN/Inf anywhere in an input is an error, whether or not a row attends it
    cfg = _config("sw_route_peaks", 64, 8)
    clean = dict(zip("qkv", (torch.tensor(x, dtype=torch.float32) for x in _qkv(1, 2, 1, n, n, 16, seed=6))))
    for value, where in ((float("nan"), (0, 0, n - 1, 3)), (float("inf"), (0, 0, n // 2, 0)),
                         (float("-inf"), (0, 0, 0, 15))):
        xs = dict(clean)
        xs[name] = xs[name].clone()
        xs[name][where] = value
        for causal in (True, False):
            with pytest.raises(InputError, match=f"{name} contains NaN or Inf"):
                F.direct_flex_attention(xs["q"], xs["k"], xs["v"], causal=causal, config=cfg)
    F.direct_flex_attention(clean["q"], clean["k"], clean["v"], causal=True, config=cfg)


def test_logits_beyond_the_range_are_refused_and_large_ones_computed():
    cfg = _config("sw_route_peaks", 64, 8)
    q, k, v = (torch.tensor(x, dtype=torch.float32) for x in _qkv(1, 2, 1, 300, 300, 16, seed=7))
    # |q|·|k| ≈ 1e38·D: float32 logits (and their partial sums) would overflow
    with pytest.raises(InputError, match="range"):
        F.direct_flex_attention(q * 1e19, k * 1e19, v, causal=True, config=cfg)
    # every logit −4e38, −inf in float32: the rows would come out as if they saw no key (0)
    # where the answer is the mean of the values; only the bound on the inputs can tell
    ones = torch.ones_like(k)
    with pytest.raises(InputError, match="range"):
        F.direct_flex_attention(-1e19 * torch.ones_like(q), 1e19 * ones, v, causal=True, config=cfg)
    # 1e9 · 1e9 · D: large logits, within range: the reference's answer (one key per row wins)
    draws = make_draws(cfg, 300, 300, 16, causal=True, batch_shape=(1, 2), rng=3)
    qb, kb = q.double() * 1e9, k.double() * 1e9
    want = hyper_attention(qb.numpy(), kb.numpy(), v.double().numpy(), causal=True, config=cfg, draws=draws,
                           engine="numpy")
    got = F.direct_flex_attention(qb.float(), kb.float(), v, causal=True, config=cfg, draws=draws)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5, rtol=0)



@pytest.mark.parametrize("options, message", [
    ([("BLOCK_M", 64)], "must be a dict"),
    ({"BLOCK_MM": 64}, "unknown kernel option 'BLOCK_MM'"),
    ({"fwd_BLOCK_N": 256}, "power of two from 16 to 128"),
    ({"BLOCK_M": 48}, "power of two"),
    ({"BLOCK_M": True}, "power of two"),
    ({"num_warps": 3}, "1, 2, 4, 8 or 16"),
    ({"bwd_num_stages": 0}, "from 1 to 8"),
    ({"ROWS_GUARANTEED_SAFE": True}, "wrong numbers"),
    ({"BLOCKS_ARE_CONTIGUOUS": True}, "wrong numbers"),
])
def test_kernel_options_are_checked(options, message):
    q = torch.zeros(1, 1, 256, 16)
    cfg = HyperConfig(mode="direct", exact_set=sinks(4) | window(32), min_seq_len=8)
    with pytest.raises(InputError, match=message):
        F.direct_flex_attention(q, q, q, config=cfg, kernel_options=options)


def test_valid_kernel_options_pass_unchanged():
    options = {"BLOCK_M": 64, "fwd_BLOCK_N": 32, "bwd_BLOCK_M1": 16, "num_warps": 4, "num_stages": 2,
               "PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False}
    checked = flex_kernel_options(options, max_tile=128)
    assert checked == options and checked is not options
    assert flex_kernel_options(None, max_tile=128) is None

CUDA_SET = sinks(4) | window(256) | heavykeys(64, 256) | blocktop(128, 2)


@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
def test_compiled_kernel_matches_the_reference():
    q, k, v = _qkv(1, 4, 2, 2048, 2048, 64, seed=8)
    cfg = HyperConfig(mode="direct", exact_set=CUDA_SET, query_block=128, samples=64, min_seq_len=8)
    draws = make_draws(cfg, 2048, 2048, 64, causal=True, batch_shape=(1, 4), rng=1)
    qt, kt, vt = (torch.tensor(x, dtype=torch.float32, device="cuda") for x in (q, k, v))
    out, lse = F.direct_flex_attention(qt, kt, vt, causal=True, config=cfg, draws=draws, return_lse=True)
    ref, ref_lse = hyper_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                                   config=cfg, draws=draws, causal=True, return_lse=True, engine="numpy")
    # float32 logits of |s| ≲ 6 and TF32-free products: ~1e-6; the kernel's exp2 path adds a few ulps
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse.cpu().numpy(), ref_lse, atol=2e-5, rtol=0)


CUDA_BKEYS = sinks(4) | window(256) | blockkeys(128, 384, 2, 1024)
CUDA_ROUTE = sinks(4) | window(256) | blockkeys(128, 512, 2, 512)  # the chosen blocks as own-key tiles
CUDA_PEAKS = sinks(4) | window(257) | blockkeys(128, 768, 4, 768, peaks=True)


@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("exact_set", [CUDA_SET, CUDA_BKEYS, CUDA_ROUTE, CUDA_PEAKS],
                         ids=["blocktop", "blockkeys", "routed", "peaks"])
def test_compiled_half_kernel_matches_the_dense_function_of_its_plan(dtype, tol, exact_set):
    """Half inputs: selections in half precision may differ from the float64 reference's, so the
    kernel is checked against the same function of the same plan on dense float32 scores."""
    q, k, v = (torch.tensor(x, dtype=dtype, device="cuda") for x in _qkv(1, 4, 4, 2048, 2048, 64, seed=8))
    cfg = HyperConfig(mode="direct", exact_set=exact_set, query_block=64, samples=64, min_seq_len=8)
    gen = torch.Generator("cuda").manual_seed(0)
    rows, u = F._draws(cfg, exact_set, 2048, 2048, 64, True, 1, 4, q.device, None, gen)
    plan = P.make_plan(q, k, v, causal=True, scale=0.125, config=cfg, heavy_rows=rows, sample_u=u)
    out, lse = F.flex_direct(q, k, v, plan, scale=0.125, config=cfg, causal=True)
    ref, ref_lse = F.flex_direct(q, k, v, plan, scale=0.125, config=cfg, causal=True, dense=True)
    np.testing.assert_allclose(out.float().cpu().numpy(), ref.float().cpu().numpy(), atol=tol, rtol=0)
    np.testing.assert_allclose(lse.float().cpu().numpy(), ref_lse.float().cpu().numpy(), atol=tol, rtol=0)


@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_blockkeys_kernels_on_cuda_are_the_dense_masses(causal):
    """The compiled selection kernels (bf16 products, fp32 sums) against the dense fp32 forms."""
    from hyperref.gpu import direct_kernels as K

    q, k, _ = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in _qkv(1, 4, 4, 4096, 4096, 64, seed=5))
    part, covered = CUDA_BKEYS.parts[-1], (4, 256)
    reps = K.block_key_rep_mass(q, k, S._rep_rows(part, 4096, q.device), part.block, part.key_block, 0.125,
                                causal, covered)
    want = S.block_key_rep_mass(part, q, k, 0.125, causal, covered)
    np.testing.assert_allclose(reps.cpu().numpy(), want.cpu().numpy(), atol=1e-5, rtol=1e-4)
    chosen = S.block_key_candidates(part, q, k, 0.125, causal, covered, rep_scores=want)
    # the ranking kernel on the kernel's normalizers: the torch ranking of the same masses
    block_lse, lse = K.block_key_rep_lse(q, k, S._rep_rows(part, 4096, q.device), part.block, part.key_block,
                                         0.125, causal, covered)
    top = K.block_key_top(block_lse, lse, part.reps, part.block, part.key_block, chosen.shape[-1], 4096, 4096,
                          causal, covered)
    same = S.block_key_candidates(part, q, k, 0.125, causal, covered, rep_scores=torch.exp2(block_lse - lse[..., None]))
    assert torch.equal(top, same)
    # the peaks rule: relative peaks against the dense form, the ranking against the torch one
    peaks = K.block_key_rep_mass(q, k, S._rep_rows(part, 4096, q.device), part.block, part.key_block, 0.125,
                                 causal, covered, peaks=True)
    want_peaks = S.block_key_rep_peaks(part, q, k, 0.125, causal, covered)
    assert torch.equal(torch.isinf(peaks), torch.isinf(want_peaks))
    np.testing.assert_allclose(peaks.cpu().numpy(), want_peaks.cpu().numpy(), atol=1e-4, rtol=0)
    block_pk, row_max = K.block_key_rep_lse(q, k, S._rep_rows(part, 4096, q.device), part.block, part.key_block,
                                            0.125, causal, covered, peaks=True)
    top = K.block_key_top(block_pk, row_max, part.reps, part.block, part.key_block, chosen.shape[-1], 4096, 4096,
                          causal, covered, peaks=True)
    same = S.block_key_candidates(replace(part, peaks=True), q, k, 0.125, causal, covered,
                                  rep_scores=block_pk - row_max[..., None])
    assert torch.equal(top, same)
    # the running lists of the best blocks: the table's choice
    listed = K.block_key_peak_top(q, k, S._rep_rows(part, 4096, q.device), part.block, part.key_block,
                                  chosen.shape[-1], 0.125, causal, covered)
    assert torch.equal(listed, top)
    pi = K.block_key_fine_mass(q, k, chosen, part.block, part.key_block, 0.125, causal, covered)
    want = S.block_key_mass(part, q, k, 0.125, causal, covered, chosen)
    np.testing.assert_allclose(pi.cpu().numpy(), want.cpu().numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("exact_set", [sinks(4) | window(128) | heavykeys(32, 128) | blocktop(128, 2),
                                       sinks(4) | window(128) | heavykeys(32, 128) | blockkeys(128, 256, 2, 256)],
                         ids=["blocktop", "routed"])
def test_compiled_gradients_match_the_dense_twin(exact_set):
    q, k, v = _qkv(1, 4, 2, 1024, 1024, 64, seed=9)
    cfg = HyperConfig(mode="direct", exact_set=exact_set, query_block=64, samples=32, min_seq_len=8)
    draws = make_draws(cfg, 1024, 1024, 64, causal=True, batch_shape=(1, 4), rng=2)
    grads = []
    for fn in ("flex", "dense"):
        qt, kt, vt = (torch.tensor(x, dtype=torch.float32, device="cuda", requires_grad=True) for x in (q, k, v))
        if fn == "flex":
            out, lse = F.direct_flex_attention(qt, kt, vt, causal=True, config=cfg, draws=draws, return_lse=True)
        else:
            out, lse = direct_attention(qt, kt, vt, causal=True, scale=0.125, config=cfg, draws=draws)
        w = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        ((out * w).sum() + (lse * 0.3).sum()).backward()
        grads.append([t.grad.double().cpu().numpy() for t in (qt, kt, vt)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)


@pytest.mark.parametrize("count", [1, 3, 8, 9])
def test_top_breaks_ties_by_the_smaller_index(count):
    score = torch.tensor([[0.0, 2.0, 2.0, -float("inf"), 1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    order, best = S._top(score, count)
    want = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]
    np.testing.assert_array_equal(order.numpy(), want.numpy())
    np.testing.assert_array_equal(best.numpy(), torch.gather(score, -1, want).numpy())


@pytest.mark.parametrize("name,bq", [("sw_heavy_top", 32), ("sw_heavy_bkeys", 64), ("top256", 256),
                                     ("sw_heavy_route", 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_counts_are_the_reference_counts(name, bq, causal):
    q, k, v = _qkv(1, 2, 2, 300, 290, 16, seed=4)
    cfg = _config(name, bq, 16)
    draws = make_draws(cfg, 300, 290, 16, causal=causal, batch_shape=(1, 2), rng=3)
    _, _, want = direct_attention(*(torch.tensor(x) for x in (q, k, v)), causal=causal, scale=0.25, config=cfg,
                                  draws=draws, return_counts=True)
    _, got = F.direct_flex_attention(*(torch.tensor(x) for x in (q, k, v)), causal=causal, scale=0.25,
                                     config=cfg, draws=draws, return_counts=True)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,blk,kb,covered", [(300, 300, 64, 32, (4, 32)), (200, 500, 32, 16, (0, 0)),
                                                  (257, 120, 64, 32, (3, 1)), (129, 129, 128, 16, (1, 16)),
                                                  (100, 1000, 64, 128, (7, 300))])
def test_blocks_with_eligible_is_the_dense_any(causal, nq, nk, blk, kb, covered):
    n_t, n_kb = -(-nq // blk), -(-nk // kb)
    elig = S._eligible(torch.arange(n_t), blk, nq, nk, causal, covered, torch.arange(nk))
    want = torch.nn.functional.pad(elig, (0, n_kb * kb - nk)).unflatten(-1, (n_kb, kb)).any(-1)
    got = S._blocks_with_eligible(n_t, blk, nq, nk, kb, causal, covered, torch.device("cpu"))
    assert torch.equal(got, want)
