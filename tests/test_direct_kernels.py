"""The Triton kernels of the direct mode's plan against the dense torch forms they replace.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set by ``conftest.py``) in float32;
on CUDA in float32 with TF32-free products they would differ by TF32 rounding, so these
tests run the kernels on the CPU or not at all (the compiled engine's tests in
``test_direct_flex.py`` cover the CUDA path end to end).
"""

import os
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels are compared in float32 under the Triton interpreter", allow_module_level=True)

from hyperref.exact_set import BlockKeys, sinks, window  # noqa: E402
from hyperref.gpu import direct_plan as P  # noqa: E402
from hyperref.gpu import direct_select as S  # noqa: E402
from hyperref.gpu import direct_kernels as K  # noqa: E402


def _qk(b, h, nq, nk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g) * 1.5


# float32 sums of up to |T| = 40 probabilities, each with a few ulps from exp2 vs exp
MASS_TOL = 2e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,covered", [(150, 150, (4, 32)), (70, 200, (0, 0)), (200, 90, (3, 1)),
                                           (129, 129, (1, 0)), (300, 9000, (4, 32))])
def test_heavy_mass_is_the_sampled_column_mass(causal, nq, nk, covered):
    q, k = _qk(1, 2, nq, nk, 16, seed=nq + nk)
    rows = torch.sort(torch.stack([torch.randperm(nq)[:40] for _ in range(2)])[None], dim=-1).values
    got = K.heavy_mass(q, k, rows, 0.3, causal, covered)
    want = S.heavy_scores(q, k, rows, 0.3, causal, covered)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=MASS_TOL, rtol=0)


@pytest.mark.parametrize("nq,block", [(300, 64), (257, 128), (100, 16)])
def test_pick_scores_are_row_block_maxima(nq, block):
    q, k = _qk(2, 1, nq, 333, 32, seed=nq)
    n_kb = -(-333 // block)
    means = torch.randn(2, 1, n_kb, 32, generator=torch.Generator().manual_seed(1))
    got = K.pick_scores(q, means, block)
    per_row = torch.nn.functional.pad(q @ means.transpose(-1, -2), (0, 0, 0, -nq % block), value=-float("inf"))
    want = per_row.unflatten(2, (-1, block)).amax(3)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["mixed", "rownorm", "uniform"])
@pytest.mark.parametrize("causal", [True, False])
def test_sample_search_is_the_torch_search(sampler, causal):
    """The same keys bit for bit: the same float64 arithmetic in the same order."""
    g = torch.Generator().manual_seed(3)
    nq = nk = 700
    v = torch.randn(1, 2, nk, 8, generator=g, dtype=torch.float64)
    v[..., ::5, :] = 0.0  # keys of zero norm: the rownorm sampler must never pick one
    u = torch.rand(1, 2, -(-nq // 64), 48, generator=g, dtype=torch.float64)
    E = sinks(4) | window(100)
    seen = {}

    def spy(name, fn):
        def wrapped(*args):
            seen[name] = fn(*args)
            return seen[name]
        return wrapped

    # the torch search, then the kernel on the same prefix sums and bounds
    real_search = S._search
    S._search = spy("torch", real_search)
    try:
        keys, logw = S.sample_slots(v, u, E, 64, sampler, causal, nq)
    finally:
        S._search = real_search
    sq = (v / v.abs().amax(dim=(-1, -2), keepdim=True)).square().sum(-1)
    pre = torch.nn.functional.pad(torch.cumsum(sq, -1), (1, 0))
    t = torch.arange(u.shape[2])
    lo = torch.full_like(t, 4)
    hi = torch.clamp((torch.clamp((t + 1) * 64, max=nq) - 1 - 100 + 1) if causal else torch.full_like(t, nk), 0, nk)
    hi = torch.maximum(hi, lo)
    total = pre[..., hi] - pre[..., lo]
    a = torch.where((total > 0) & (sampler != "uniform"), 0.5 if sampler == "mixed" else 1.0, 0.0).double()
    last_pos = None
    if sampler == "rownorm":
        pos = torch.where(sq > 0, torch.arange(nk), -1)
        last_pos = torch.gather(torch.cummax(pos, dim=-1).values, -1, torch.clamp(hi - 1, min=0).expand(1, 2, -1))
        last_pos = torch.where(total > 0, last_pos, (hi - 1).expand(1, 2, -1))
    got = K.sample_search(pre, u, lo, hi, a, total, last_pos)
    np.testing.assert_array_equal(got.numpy(), seen["torch"].numpy())
    if sampler == "rownorm":
        norms = torch.gather(sq, -1, torch.clamp(keys, min=0).flatten(2)).view_as(keys)
        assert (norms[keys >= 0] > 0).all(), "the rownorm sampler picked a key of zero norm"


BLOCKKEY_CASES = [  # causal, nq, nk, covered, BlockKeys(block, keep, reps, candidates, key_block)
    (True, 300, 300, (4, 32), BlockKeys(64, 40, 2, 96, 32)),
    (True, 200, 500, (0, 0), BlockKeys(32, 20, 3, 64, 16)),
    (True, 257, 120, (3, 1), BlockKeys(64, 30, 2, 64, 32)),
    (False, 300, 300, (4, 32), BlockKeys(64, 40, 2, 96, 32)),
    (False, 150, 400, (0, 0), BlockKeys(32, 20, 1, 64, 64)),
    (False, 129, 129, (1, 16), BlockKeys(128, 16, 4, 32, 16)),
]


# programs of 16 rows: later row blocks' programs have key blocks that need no mask (past the
# sinks, before the first row block's window; non-causal also after the last one's)
UNMASKED_CASES = [
    (True, 600, 600, (4, 32), BlockKeys(64, 40, 2, 96, 16)),
    (False, 600, 610, (4, 32), BlockKeys(64, 40, 2, 96, 16)),
    (False, 400, 520, (2, 0), BlockKeys(32, 20, 2, 64, 16)),
    (True, 500, 700, (0, 0), BlockKeys(32, 20, 1, 64, 32)),
]


# more than 4096 keys: the rows' lse in several splits of the key axis, merged after
SPLIT_CASES = [
    (True, 300, 9000, (4, 32), BlockKeys(64, 40, 2, 256, 128)),
    (False, 200, 12500, (1, 0), BlockKeys(128, 40, 3, 256, 64)),
]


@pytest.mark.parametrize("causal,nq,nk,covered,part,launch",
                         [(*c, None) for c in BLOCKKEY_CASES + SPLIT_CASES] + [(*c, {"BR": 16}) for c in UNMASKED_CASES])
def test_block_key_rep_mass_is_the_dense_mass(causal, nq, nk, covered, part, launch):
    q, k = _qk(1, 2, nq, nk, 16, seed=nq + 3 * nk)
    reps = S._rep_rows(part, nq, q.device)
    got = K.block_key_rep_mass(q, k, reps, part.block, part.key_block, 0.3, causal, covered, launch=launch)
    want = S.block_key_rep_mass(part, q, k, 0.3, causal, covered)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=MASS_TOL, rtol=0)
    # the peaks rule: relative logits of size ~10, a few float32 ulps through base 2 and back
    got = K.block_key_rep_mass(q, k, reps, part.block, part.key_block, 0.3, causal, covered, launch=launch,
                               peaks=True)
    want = S.block_key_rep_peaks(part, q, k, 0.3, causal, covered)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=0)


TOP_CASES = BLOCKKEY_CASES + [  # more candidates than key blocks; rows with no eligible block
    (True, 256, 256, (4, 200), BlockKeys(64, 40, 4, 512, 16)),
    (False, 100, 700, (0, 0), BlockKeys(16, 20, 2, 16 * 20, 16)),
]


@pytest.mark.parametrize("peaks", [False, True])
@pytest.mark.parametrize("causal,nq,nk,covered,part", TOP_CASES)
def test_block_key_top_is_the_candidates_of_the_masses(causal, nq, nk, covered, part, peaks):
    """The same key blocks as the dense sum (``peaks``: maximum), mask and ranking of the same scores."""
    part = replace(part, peaks=peaks)
    q, k = _qk(2, 2, nq, nk, 16, seed=nq + 7 * nk)
    reps = S._rep_rows(part, nq, q.device)
    block_lse, lse = K.block_key_rep_lse(q, k, reps, part.block, part.key_block, 0.3, causal, covered, peaks=peaks)
    score = block_lse - lse[..., None] if peaks else torch.exp2(block_lse - lse[..., None])
    want = S.block_key_candidates(part, q, k, 0.3, causal, covered, rep_scores=score)
    got = K.block_key_top(block_lse, lse, part.reps, part.block, part.key_block, S.coarse_count(part, nk), nq, nk,
                          causal, covered, peaks=peaks)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


PEAK_TOP_CASES = [(*c, None) for c in TOP_CASES + SPLIT_CASES if S.coarse_count(c[4], c[2]) <= K.PEAK_TOP_MAX] + [
    (*c, {"BR": 16}) for c in UNMASKED_CASES] + [
    # other splits of the key axis: one split, and splits that are not multiples of the default
    (*c, {"split_keys": keys}) for c in SPLIT_CASES[:1] + UNMASKED_CASES[:1] for keys in (1 << 20, 1000, 128)]


@pytest.mark.parametrize("causal,nq,nk,covered,part,launch", PEAK_TOP_CASES)
def test_block_key_peak_top_is_the_choice_of_the_table(causal, nq, nk, covered, part, launch):
    """The running lists of the best blocks choose what the per-block table and its ranking choose."""
    part = replace(part, peaks=True)
    q, k = _qk(2, 2, nq, nk, 16, seed=nq + 7 * nk)
    reps = S._rep_rows(part, nq, q.device)
    count = S.coarse_count(part, nk)
    block_lse, lse = K.block_key_rep_lse(q, k, reps, part.block, part.key_block, 0.3, causal, covered, peaks=True)
    want = K.block_key_top(block_lse, lse, part.reps, part.block, part.key_block, count, nq, nk, causal, covered,
                           peaks=True)
    got = K.block_key_peak_top(q, k, reps, part.block, part.key_block, count, 0.3, causal, covered, launch=launch)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,covered,part", [(300, 320, (4, 32), BlockKeys(64, 40, 2, 96, 32)),
                                                (256, 512, (0, 16), BlockKeys(32, 40, 3, 128, 16))])
def test_block_key_peak_top_breaks_ties_by_the_smaller_block(causal, nq, nk, covered, part):
    """Key blocks that repeat one block's keys tie exactly: the smaller blocks win, as in the ranking
    of the table (a list that lets an equal later block in, or evicts the smaller of two equal
    entries, chooses otherwise)."""
    part = replace(part, peaks=True)
    gen = torch.Generator().manual_seed(nq)
    q = torch.randn(2, 2, nq, 16, generator=gen)
    base = torch.randn(2, 2, part.key_block, 16, generator=gen)
    k = base.repeat(1, 1, -(-nk // part.key_block), 1)[:, :, :nk].clone()
    k[:, :, ::7] += 0.5 * torch.randn(k[:, :, ::7].shape, generator=gen)  # a few keys differ, most blocks tie
    reps = S._rep_rows(part, nq, q.device)
    count = S.coarse_count(part, nk)
    block_lse, lse = K.block_key_rep_lse(q, k, reps, part.block, part.key_block, 0.3, causal, covered, peaks=True)
    want = S.block_key_candidates(part, q, k, 0.3, causal, covered, rep_scores=block_lse - lse[..., None])
    for launch in (None, {"BR": 16}):
        got = K.block_key_peak_top(q, k, reps, part.block, part.key_block, count, 0.3, causal, covered, launch=launch)
        assert torch.equal(got, want)


@pytest.mark.parametrize("causal,covered,nq,count,want_table,want_lists", [
    (False, (0, 0), 16, 2, [0, 2], [1, 2]),
    (True, (0, 16), 48, 1, [-1, 0, 0], [-1, 0, 1]),  # the row's largest logit in its window
])
def test_block_key_peak_top_ranks_by_the_peak_where_rounding_ties(causal, covered, nq, count, want_table,
                                                                  want_lists):
    """Peaks one float32 ulp apart (−10 and its upper neighbour) whose differences from the row's
    largest logit (+10) round to the same value: the table's ranking sees a tie and takes the
    smaller block, the lists keep the larger peak (the documented difference)."""
    pb = np.float32(-10.0)
    vals = [pb, np.nextafter(pb, np.float32(0)), np.float32(10.0)]
    part = BlockKeys(16, 16, 1, count * 16, 16, peaks=True)
    q = torch.zeros(1, 1, nq, 16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 48, 16)
    for g, x in enumerate(vals):
        k[0, 0, g * 16:(g + 1) * 16, 0] = float(x)
    scale = 1 / K.LOG2E  # logits in base 2 are the keys' first coordinates
    reps = S._rep_rows(part, nq, q.device)
    block_pk, row_max = K.block_key_rep_lse(q, k, reps, 16, 16, scale, causal, covered, peaks=True)
    table = K.block_key_top(block_pk, row_max, 1, 16, 16, count, nq, 48, causal, covered, peaks=True)
    lists = K.block_key_peak_top(q, k, reps, 16, 16, count, scale, causal, covered)
    assert table.flatten().tolist() == want_table
    assert lists.flatten().tolist() == want_lists


def test_block_key_peak_top_refuses_too_many_blocks():
    q, k = _qk(1, 1, 64, 64, 16, seed=1)
    reps = S._rep_rows(BlockKeys(16, 16, 1, 16, 16), 64, q.device)
    with pytest.raises(ValueError, match="count"):
        K.block_key_peak_top(q, k, reps, 16, 16, K.PEAK_TOP_MAX + 1, 0.3, True, (0, 0))


def test_block_key_top_refuses_mismatched_normalizers():
    with pytest.raises(ValueError, match="normalizers"):
        K.block_key_top(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6), 4, 16, 16, 2, 96, 64, True, (0, 0))
    with pytest.raises(ValueError, match="normalizers"):
        K.block_key_top(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 5), 2, 16, 16, 2, 96, 64, True, (0, 0))


@pytest.mark.parametrize("causal,nq,nk,covered,part", BLOCKKEY_CASES)
def test_block_key_fine_mass_is_the_dense_mass(causal, nq, nk, covered, part):
    """Over the coarse stage's candidates and over random ones (any key block, −1 for none)."""
    q, k = _qk(1, 2, nq, nk, 16, seed=nq + 5 * nk)
    chosen = S.block_key_candidates(part, q, k, 0.3, causal, covered)
    n_kb = -(-nk // part.key_block)
    g = torch.Generator().manual_seed(nq)
    other = torch.randint(-1, n_kb, chosen.shape, generator=g)
    for c in (chosen, other):
        got = K.block_key_fine_mass(q, k, c, part.block, part.key_block, 0.3, causal, covered)
        want = S.block_key_mass(part, q, k, 0.3, causal, covered, c)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        # π sums up to `block` probabilities: float32 rounding relative to the sum
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=MASS_TOL, rtol=1e-5)


def test_fused_plan_only_for_half_precision_on_cuda():
    q = torch.zeros(1, 1, 4, 64)
    assert not S.fused_plan(q)
    assert not S.fused_plan(q.half())  # not on CUDA here


def test_refusals():
    with pytest.raises(ValueError, match="power-of-two"):
        K.heavy_mass(torch.zeros(1, 1, 4, 12), torch.zeros(1, 1, 4, 12), torch.zeros(1, 1, 2, dtype=torch.long),
                     1.0, True, (0, 0))
    with pytest.raises(ValueError, match="power-of-two"):
        K.pick_scores(torch.zeros(1, 1, 4, 16, dtype=torch.float64), torch.zeros(1, 1, 1, 16), 4)
    with pytest.raises(ValueError, match="key_block"):
        K.block_key_rep_mass(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.long),
                             4, 24, 1.0, True, (0, 0))
    with pytest.raises(ValueError, match="row block"):
        K.block_key_fine_mass(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16),
                              torch.zeros(1, 1, 1, 1, dtype=torch.long), 48, 16, 1.0, True, (0, 0))
    with pytest.raises(ValueError, match="key_block <= 128"):
        K.block_key_rep_mass(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.long),
                             4, 256, 1.0, True, (0, 0))


@pytest.mark.parametrize("shape,transposed", [((1, 1, 9, 40), False), ((2, 3, 7, 1500), False),
                                              ((2, 3, 50, 6), True), ((1, 4, 1100, 5), True)])
def test_tile_listing_is_the_torch_listing(shape, transposed):
    """Rows longer than one chunk of columns, transposed (strided) marks, empty and full rows."""
    g = torch.Generator().manual_seed(shape[-1])
    marks = torch.rand(shape, generator=g) < 0.3
    marks[..., 0, :] = False
    marks[..., -1, :] = True
    if transposed:
        marks = marks.transpose(-2, -1)
    num, idx = K.tile_listing(marks)
    want_num, want_idx = P._listing(marks)
    assert torch.equal(num, want_num)
    assert torch.equal(idx, want_idx)


def _blocks(bsz, h, n_rb, count, n_blocks, seed):
    """Random block tables (B, H, row blocks, count): distinct blocks ascending, −1 padded."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((bsz, h, n_rb, count), -1, dtype=torch.int64)
    for idx in np.ndindex(bsz, h, n_rb):
        take = int(torch.randint(0, count + 1, (1,), generator=g))
        out[idx][:min(take, n_blocks)] = torch.sort(torch.randperm(n_blocks, generator=g)[:min(take, n_blocks)]).values
    return out


# (nq, nk, covered, picks as (block, count) or None, routes as (block, key block, count) or None);
# nk ≥ 1025 puts a row past one chunk of 1024 tiles
OWN_CASES = [(520, 700, (4, 100), None, None), (300, 300, (0, 0), None, None),
             (520, 700, (4, 129), (128, 2), None), (520, 648, (4, 129), None, (128, 128, 3)),
             (700, 900, (1, 300), (256, 1), (256, 256, 2)), (260, 1200, (0, 64), None, (128, 128, 4)),
             (128, 131200, (4, 513), None, (128, 128, 3)), (520, 700, (4, 0), None, (128, 128, 3)),
             (900, 400, (2, 129), (128, 2), (256, 128, 2)), (700, 300, (0, 0), None, (128, 256, 1))]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk,covered,picks,routes", OWN_CASES)
def test_own_tile_lists_are_the_torch_marks_and_lists(causal, nq, nk, covered, picks, routes):
    """Marks bit for bit (partial, full) and their lists, full width and :func:`list_width` wide,
    the narrow lists written without marks; every listed row within the width."""
    from types import SimpleNamespace

    pk = pick_block = ck = part = None
    if picks is not None:
        pick_block = picks[0]
        pk = _blocks(2, 3, -(-nq // pick_block), picks[1], -(-nk // pick_block), seed=nq + 1)
    if routes is not None:
        part = SimpleNamespace(block=routes[0], key_block=routes[1])
        ck = _blocks(2, 3, -(-nq // routes[0]), routes[2], -(-nk // routes[1]), seed=nk + 2)
    want = P.own_tiles(nq, nk, causal, covered, pk, pick_block or 128, torch.device("cpu"),
                       None if ck is None else (ck, part))
    args = (nq, nk, S.KB, causal, covered, torch.device("cpu"), pk, pick_block or 0, ck,
            0 if part is None else part.block, 0 if part is None else part.key_block)
    got = K.own_tile_lists(*args)
    for name, w, g in zip(("partial", "full"), want, got[:2]):
        assert g.shape == w.shape and torch.equal(g, w), name
    lists = (*P._listing(want[0]), *P._listing(want[1]))
    for w, g in zip(lists, got[2:]):
        assert g.shape == w.shape and torch.equal(g, w)
    width = P.list_width(nq, nk, causal, covered, pk, pick_block or 0, ck, 0 if part is None else part.key_block)
    assert max(int(want[0].sum(-1).max()), int(want[1].sum(-1).max())) <= width
    narrow = K.own_tile_lists(*args, width=width, marks=False)
    assert narrow[0] is None and narrow[1] is None
    for i, (w, g) in enumerate(zip(lists, narrow[2:])):
        w = w[..., :width] if i % 2 else w
        assert g.shape == w.shape and torch.equal(g, w)


def test_own_tile_lists_refuse_a_width_too_narrow():
    """Lists narrower than a row's tiles are an error (off CUDA), never a cut list."""
    with pytest.raises(ValueError, match="width of 2 tiles"):
        K.own_tile_lists(520, 700, S.KB, True, (4, 300), torch.device("cpu"), width=2, marks=False)
