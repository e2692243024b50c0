"""GPU path against the float64 reference on the same draws (SPEC §8 tolerance policy).

On a machine without CUDA these run the Triton kernels through the interpreter
(``TRITON_INTERPRET=1``, set in conftest.py) at small sizes; with CUDA they run
on the device, at full size when ``HYPERREF_GPU_FULL=1``.
"""

import os

import numpy as np

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import hyperref  # noqa: E402
from hyperref import HyperConfig, make_draws  # noqa: E402

from hyperref import gpu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FULL = CUDA and os.environ.get("HYPERREF_GPU_FULL") == "1"
if FULL:
    N, D_LIST, DTYPES = 4096 + 123, (64, 128), (torch.float32, torch.bfloat16, torch.float16)
    CFG = HyperConfig(block=256, samples=256, min_seq_len=1024)
elif CUDA:
    N, D_LIST, DTYPES = 1000, (64, 128), (torch.float32, torch.bfloat16)
    CFG = HyperConfig(bits=5, block=64, samples=64, min_seq_len=200)
else:
    N, D_LIST, DTYPES = 150, (16,), (torch.float32,)
    CFG = HyperConfig(bits=3, block=32, samples=16, min_seq_len=40)


def _inputs(b, h, hk, nq, nk, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64)
    # round to the working precision once: every evaluation sees the same inputs
    return [x.to(dtype).to(torch.float64) for x in (q, k, v)]


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def _floor(dtype):
    return {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


CASES = [  # (causal, b, h, hk, nq, nk)
    (False, 1, 2, 1, N, N),
    (True, 1, 2, 1, N, N),
    (False, 2, 2, 2, N, N // 2 + 7),
    (True, 1, 4, 2, N + 3, N - 5),
    (True, 1, 2, 2, N - 9, N + 31),
    (True, 1, 2, 2, N, N),  # equal square leaves, heads not grouped: vendor leaves on CUDA
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", D_LIST)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, d, dtype):
    causal, b, h, hk, nq, nk = case
    q, k, v = _inputs(b, h, hk, nq, nk, d, nq + d, dtype)
    draws = make_draws(CFG, nq, nk, d, causal=causal, batch_shape=(b, h), rng=1)
    ref, ref_lse = hyperref.hyper_attention(q.numpy(), k.numpy(), v.numpy(), causal=causal,
                                            config=CFG, draws=draws, return_lse=True, engine="numpy")
    ref, ref_lse = torch.from_numpy(ref), torch.from_numpy(ref_lse)
    dev = [x.to(DEVICE, dtype) for x in (q, k, v)]
    out, lse = gpu.hyper_attention(*dev, causal=causal, config=CFG, draws=draws, return_lse=True,
                                   exact_hash=True)
    same, same_lse = gpu.hyper_attention(*dev, causal=causal, config=CFG, draws=draws,
                                         return_lse=True, exact_hash=True, backend="dense")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    err, err_same = _rel(out, ref), _rel(same, ref)
    assert err <= 2 * err_same + _floor(dtype), (err, err_same)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    assert _rel(lse.cpu()[seen], ref_lse[seen]) <= 2 * _rel(same_lse.cpu()[seen], ref_lse[seen]) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,lse_grad", [(c, True) for c in CASES[:2] + CASES[3:4]]
                         + [(CASES[5], True), (CASES[5], False)])
def test_gradients_match_dense_autograd(case, lse_grad, dtype):
    # without a gradient into lse, the vendor backward computes the leaves (CUDA, CASES[5])
    causal, b, h, hk, nq, nk = case
    d = D_LIST[0]
    q, k, v = _inputs(b, h, hk, nq, nk, d, 7, dtype)
    draws = make_draws(CFG, nq, nk, d, causal=causal, batch_shape=(b, h), rng=2)
    g = torch.Generator().manual_seed(3)
    g_out = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    g_lse = torch.randn(b, h, nq, generator=g, dtype=torch.float64)

    def grads(dtype_, backend, device):
        xs = [x.detach().to(device, dtype_).clone().requires_grad_() for x in (q, k, v)]
        out, lse = gpu.hyper_attention(*xs, causal=causal, config=CFG, draws=draws,
                                       return_lse=True, exact_hash=True, backend=backend)
        seen = torch.isfinite(lse)
        loss = (out.double() * g_out.to(device)).sum()
        if lse_grad:
            loss = loss + (torch.where(seen, lse.double(), 0.0) * g_lse.to(device)).sum()
        loss.backward()
        return [x.grad for x in xs]

    ref = grads(torch.float64, "dense", "cpu")
    fast = grads(dtype, "triton", DEVICE)
    same = grads(dtype, "dense", DEVICE)
    for name, gf, gs, gr in zip("qkv", fast, same, ref):
        assert torch.isfinite(gf).all(), name
        err, err_same = _rel(gf, gr), _rel(gs, gr)
        assert err <= 2 * err_same + 4 * _floor(dtype), (name, err, err_same)


def test_exact_fallback_matches_exact_attention():
    q, k, v = _inputs(1, 2, 1, 30, 45, D_LIST[0], 0, torch.float32)
    for causal in (False, True):
        ref = hyperref.exact_attention(q.numpy(), k.numpy(), v.numpy(), causal=causal)
        out = gpu.hyper_attention(*(x.to(DEVICE, torch.float32) for x in (q, k, v)),
                                  causal=causal, config=CFG)
        assert _rel(out, torch.from_numpy(ref)) < 1e-5


def test_device_draws_are_reproducible():
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 0, torch.float32))
    a = gpu.hyper_attention(q, k, v, config=CFG, generator=torch.Generator(DEVICE).manual_seed(5))
    b = gpu.hyper_attention(q, k, v, config=CFG, generator=torch.Generator(DEVICE).manual_seed(5))
    assert torch.equal(a, b)


def test_module_wrapper():
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 0, torch.float32))
    attn = gpu.HyperAttention(CFG, causal=True)
    assert attn(q, k, v).shape == q.shape


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v), "shape"),
    (lambda q, k, v: (q, k[:, :, :, :8], v), "mismatch"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "not supported"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q[:, :1], k.expand(1, 2, -1, -1), v.expand(1, 2, -1, -1)), "divide"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v), "head dims"),
    (lambda q, k, v: (torch.where(q > 2, float("nan"), q), k, v), "NaN"),
    # found after the kernels ran on them: they must neither crash nor return
    (lambda q, k, v: (q, k, torch.where(v > 1, float("inf"), v)), "v contains"),
    (lambda q, k, v: (q, torch.full_like(k, float("nan")), v), "k contains"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "empty"),
])
def test_bad_input(mutate, match):
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, 64, 64, 16, 0, torch.float32))
    with pytest.raises(ValueError, match=match):
        gpu.hyper_attention(*mutate(q, k, v), config=CFG)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(0, 2, 200, 16), (1, 2, 0, 16), (1, 0, 200, 16)])
def test_no_query_rows_give_an_empty_answer(shape, causal):
    # empty batch, no queries, no query heads (with one kv head): empty out and lse, like SDPA;
    # a NaN in the (nonempty) keys is still refused
    b, h, n, d = shape
    q = torch.randn(shape, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(b, 1, 200, d, device=DEVICE) for _ in range(2))
    out, lse = gpu.hyper_attention(q, k, v, causal=causal, config=CFG, return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3] and lse.dtype == torch.float32
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == shape and not q.grad.any()
    if b:
        with pytest.raises(ValueError, match="k contains"):
            gpu.hyper_attention(q, torch.full_like(k, float("nan")), v, causal=causal, config=CFG)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(causal="no"), TypeError, "causal must be a bool"),  # "no" is truthy
    (dict(return_lse="no"), TypeError, "return_lse must be a bool"),
    (dict(exact_hash=1), TypeError, "exact_hash must be a bool"),
    (dict(generator=3), TypeError, "torch.Generator"),
    (dict(scale=True), ValueError, "real number"),
    (dict(scale="0.5"), ValueError, "real number"),
    (dict(scale=float("inf")), ValueError, "finite"),
])
def test_bad_arguments(kwargs, exc, match):
    q = torch.randn(1, 1, 64, 16, device=DEVICE)
    with pytest.raises(exc, match=match):
        gpu.hyper_attention(q, q, q, config=CFG, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_give_the_contiguous_answer(causal):
    # a step of 2 along the head dim (the hash and row-norm kernels read rows with unit stride:
    # this gave another answer, silently), a transposed (B, N, H, D) layout, a broadcast key row
    base = torch.randn(1, 2, N, 2 * D_LIST[0], device=DEVICE)
    q = base[..., ::2]
    k = torch.randn(1, N, 2, D_LIST[0], device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 2, 1, D_LIST[0], device=DEVICE).expand(1, 2, N, -1)
    gen = lambda: torch.Generator(DEVICE).manual_seed(3)  # noqa: E731
    strided = gpu.hyper_attention(q, k, v, causal=causal, config=CFG, generator=gen())
    dense = gpu.hyper_attention(*(t.contiguous() for t in (q, k, v)), causal=causal, config=CFG, generator=gen())
    assert torch.equal(strided, dense)


def test_double_backward_is_refused_not_zero():
    # create_graph=True would give a gradient without a graph: a gradient penalty would add nothing
    q, k, v = (torch.randn(1, 2, N, D_LIST[0], device=DEVICE) for _ in range(3))
    q.requires_grad_()
    out = gpu.hyper_attention(q, k, v, config=CFG)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (grad,) = torch.autograd.grad(gpu.hyper_attention(q, k, v, config=CFG, backend="dense").sum(), q,
                                  create_graph=True)
    assert grad.requires_grad  # the dense twin has one


def test_unsupported_estimator_is_an_error():
    q = torch.randn(1, 1, 64, 16, device=DEVICE)
    with pytest.raises(ValueError, match="masked"):
        gpu.hyper_attention(q, q, q, config=HyperConfig(estimator="paper"))


def test_torch_compile_dense_matches_eager():
    # torch.compile runs the call with graph breaks (README): same answer as eager
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    cfg = HyperConfig(bits=3, block=16, samples=8, min_seq_len=24)

    def f(q, k, v):
        return gpu.hyper_attention(q, k, v, config=cfg, causal=True, backend="dense",
                                   generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(torch.compile(f)(q, k, v), f(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, chunk", [(3, 2048), (3, 32), (6, 48), (25, 2048)])
def test_hash_kernel_matches_torch_hash(bits, chunk):
    # bits <= 8: counting sort (chunks of 32/48 rows: several per node, one crossing none);
    # 25: sort keys need int64 (torch sort)
    from hyperref.gpu.structure import Layout, layout_arrays, sorted_order

    options = gpu.KernelOptions(sort_chunk=chunk, sort_tile=16, counting_on_cpu=True)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 150, 16, generator=g).to(DEVICE)
    layout = Layout(((10, 60, 0, 40), (60, 150, 40, 150)))  # two nodes of different sizes
    planes = torch.randn(6, 2, 16, bits, generator=g).to(DEVICE)
    arrays = layout_arrays(layout, 8, torch.device(DEVICE))
    kv_of = torch.arange(6, device=DEVICE) // 2  # 6 query heads on 3 key heads
    for side, bounds, starts in (("q", layout.row_bounds, [10, 60]), ("k", layout.col_bounds, [0, 40])):
        xs = x.repeat(2, 1, 1) if side == "q" else x
        args = (xs, planes, bounds, starts, arrays, side, kv_of, 6, 3)
        fast, pos = sorted_order(*args, exact=False, use_triton=True, positions=True, options=options)
        ref, ref_pos = sorted_order(*args, exact=True, use_triton=False, positions=True)
        assert torch.equal(fast, ref)
        assert torch.equal(sorted_order(*args, exact=False, use_triton=True, options=options), fast)
        for a, b, s0 in zip(bounds[:-1], bounds[1:], starts):  # the inverse permutation
            assert torch.equal(pos[:, s0:s0 + b - a], ref_pos[:, s0:s0 + b - a])
            assert torch.equal(pos.gather(1, fast[:, a:b].long()).cpu(), torch.arange(a, b).int().expand(6, -1))
        for a, b, s0 in zip(bounds[:-1], bounds[1:], starts):  # each node: a permutation of its rows
            assert torch.equal(fast[:, a:b].sort(dim=1).values.cpu(),
                               torch.arange(s0, s0 + b - a).expand(6, -1))


def _check_triton_sampler(sq, u, sampler, layout):
    # hyperref.gpu.structure.sample_nodes_triton = sample_nodes on the same device (keys, log-weights;
    # the same prefix sums, so the same keys even where a target ties with a prefix sum, as
    # u = 0.5 on uniform weights does) and the block tags ktag[position[key]] for a random
    # inverse permutation
    from hyperref.gpu.structure import layout_arrays, sample_nodes, sample_nodes_triton

    bh, nk = u.shape[0], sq.shape[1]
    g = torch.Generator().manual_seed(5)
    position = torch.stack([torch.randperm(nk, generator=g) for _ in range(bh)]).int()
    arrays = layout_arrays(layout, 4, torch.device(DEVICE))
    sq, u = sq.to(DEVICE), u.to(DEVICE)
    idx, log_w = (x.cpu() for x in sample_nodes(sq, u, sampler, layout, arrays))
    keys, bias, tags = sample_nodes_triton(sq, u, sampler, layout, arrays, position.to(DEVICE))
    assert keys.dtype == torch.int32 and torch.equal(keys.cpu().long(), idx)
    torch.testing.assert_close(bias.cpu(), log_w, rtol=1e-6, atol=0)
    ktag = arrays["ktag"].cpu()
    assert torch.equal(tags.cpu(), ktag[position.gather(1, idx.reshape(bh, -1)).long()].reshape(idx.shape))


@pytest.mark.parametrize("causal", [False, True])
def test_counting_sort_pipeline_equals_radix_sort_pipeline(causal):
    # the whole forward with the counting sort (and its inverse permutation for the samples'
    # block tags) = with torch's sort of the sort keys, on the same device draws: bitwise
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, 96, 96, D_LIST[0], 3, torch.float64))
    cfg = HyperConfig(bits=3, block=16, samples=8, min_seq_len=24)
    outs = []
    for counting in (True, False):
        options = {"counting_on_cpu": counting, "counting_bits": 8 if counting else 0, "sort_tile": 16}
        gen = torch.Generator(DEVICE).manual_seed(1)
        outs.append(gpu.hyper_attention(q, k, v, causal=causal, config=cfg, generator=gen, return_lse=True,
                                        kernel_options=options))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_samples_never_pick_zero_probability_keys():
    # u just below 1 can round the inverse-CDF target up to a node's top; the zero rows of V
    # after the node's last positive key must not be picked (reference: resolve_samples)
    from hyperref.gpu.structure import Layout, layout_arrays, row_sq_norms, sample_nodes

    v = torch.randn(1, 20, 16, dtype=torch.float64)
    v[0, 7:10] = 0.0  # node 0 covers keys [0, 10): its last positive key is 6
    v[0, 18:] = 0.0  # node 1 covers keys [10, 20): its last positive key is 17
    layout = Layout(((0, 5, 0, 10), (5, 12, 10, 20)))
    arrays = layout_arrays(layout, 4, torch.device("cpu"))
    u = torch.tensor([[[0.0, 0.5, float(np.nextafter(1.0, 0.0))]] * 2], dtype=torch.float64)
    for sampler in ("rownorm", "mixed", "uniform"):
        idx, log_w = sample_nodes(row_sq_norms(v, exact=True), u,
                                  sampler, layout, arrays)
        assert torch.isfinite(log_w).all()
        _check_triton_sampler(row_sq_norms(v, exact=True), u, sampler, layout)
        if sampler == "rownorm":
            assert idx[0, 0, 2] == 6 and idx[0, 1, 2] == 17
            assert idx[0, 0, 0] == 0 and idx[0, 1, 0] == 10
        assert ((idx[0, 0] >= 0) & (idx[0, 0] < 10)).all() and ((idx[0, 1] >= 10) & (idx[0, 1] < 20)).all()


def test_causal_graph_keeps_only_inputs_output_and_lse():
    # memory O(n·d) for training: the whole causal recursion is one autograd node that saves
    # q, k, v, out and lse (levels are merged in the kernel, no per-level buffers)
    cfg = HyperConfig(bits=3, block=32, samples=16, min_seq_len=40)
    q, k, v = (torch.randn(1, 2, 300, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out, lse = gpu.hyper_attention(q, k, v, causal=True, config=cfg, return_lse=True,
                                   generator=torch.Generator(DEVICE).manual_seed(0))
    nodes, stack = set(), [out.grad_fn, lse.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in nodes:
            nodes.add(fn)
            stack += [g for g, _ in fn.next_functions]
    kinds = sorted(type(fn).__name__ for fn in nodes)
    assert kinds.count("_PiecesAttentionBackward") == 1
    assert set(kinds) == {"_PiecesAttentionBackward", "ViewBackward0", "AccumulateGrad"}, kinds
    (attention,) = [fn for fn in nodes if type(fn).__name__ == "_PiecesAttentionBackward"]
    saved = sum(t.numel() for t in attention.saved_tensors)
    assert saved == 4 * q.numel() + lse.numel()


def test_torch_compile_triton_matches_eager():
    # the kernels and the index planning run eagerly inside a compiled function (graph breaks):
    # same output and gradients as eager
    cfg = HyperConfig(bits=3, block=16, samples=8, min_seq_len=24)
    q, k, v = (torch.randn(1, 2, 96, 16, device=DEVICE, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return gpu.hyper_attention(q, k, v, config=cfg, causal=True,
                                   generator=torch.Generator(DEVICE).manual_seed(0))

    eager, compiled = f(q, k, v), torch.compile(f)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_one_block_loop_equals_general_loops(causal):
    # row tiles inside one sortLSH block take the single interval+samples loop with per-column
    # masks; the general loops (per-row intervals, 2-D masks) must give the same answer
    import hyperref.gpu.function as F
    from hyperref.gpu.structure import Layout, tiles_in_one_block

    bm = F._tiles(D_LIST[0], torch.float32, torch.device(DEVICE))[0]
    assert tiles_in_one_block(Layout(((0, N, 0, N),)), CFG.block, bm)  # the whole, non-causal
    assert not tiles_in_one_block(Layout(((0, 100, 0, 37),)), 32, 16)  # blocks of ~86 rows
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 5, torch.float64))
    g_out = torch.randn_like(q)

    def run(options=None):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = gpu.hyper_attention(*xs, causal=causal, config=CFG, return_lse=True,
                                       generator=torch.Generator(DEVICE).manual_seed(3), kernel_options=options)
        return [out, lse] + list(torch.autograd.grad((out * g_out).sum() + lse.sum(), xs))

    got = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, run({"one_block": False})):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not CUDA, reason="the vendor kernels need CUDA")
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("d", [64, 128])
def test_vendor_leaves_match_triton_leaves(backend, d, monkeypatch):
    # causal leaves by cuDNN / FlashAttention (out, lse and the backward from the final out, lse)
    # against the Triton leaves, same draws; with a gradient into lse the Triton backward runs
    import hyperref.gpu.leaves as L

    cfg = HyperConfig(bits=5, block=64, samples=64, min_seq_len=256)
    q, k, v = (torch.randn(1, 4, 2048, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    g_out = torch.randn_like(q)
    g_lse = torch.randn(1, 4, 2048, device=DEVICE)
    calls = []
    forward = L.forward
    monkeypatch.setattr(L, "forward", lambda *a: calls.append(a[-1]) or forward(*a))

    def run(leaves, lse_grad):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = gpu.hyper_attention(*xs, causal=True, config=cfg, return_lse=True,
                                       generator=torch.Generator(DEVICE).manual_seed(0),
                                       kernel_options=gpu.KernelOptions(leaves=leaves))
        loss = (out.float() * g_out.float()).sum() + ((lse * g_lse).sum() if lse_grad else 0.0)
        return [out, lse] + list(torch.autograd.grad(loss, xs))

    for lse_grad in (False, True):
        ref = run("triton", lse_grad)
        got = run(backend, lse_grad)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            assert _rel(a, b) <= 2e-2, (name, lse_grad, _rel(a, b))
    assert calls == [backend, backend]


@pytest.mark.skipif(not CUDA, reason="the tile choice depends on the CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_one_program_per_block_tiles_equal_small_tiles(causal, monkeypatch):
    # at d = 128 (half precision) a sortLSH piece with blocks of 256 runs one program of 256
    # rows per block; the same forward with tiles of 64 rows must agree
    import hyperref.gpu.function as F

    cfg = HyperConfig(bits=5, block=256, samples=256, min_seq_len=512)
    q, k, v = (torch.randn(1, 2, 2048, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    chosen = []
    tiles = F._tiles
    monkeypatch.setattr(F, "_tiles", lambda *a: chosen.append(tiles(*a)) or chosen[-1])

    def run(options=None):
        return gpu.hyper_attention(q, k, v, causal=causal, config=cfg, return_lse=True,
                                   generator=torch.Generator(DEVICE).manual_seed(0), kernel_options=options)

    out, lse = run()
    assert chosen and all(t[0] == 256 for t in chosen), chosen
    small, small_lse = run({"fwd_tiles": (64, 32, 4, 3)})
    assert _rel(out, small) <= 1e-2
    assert torch.equal(torch.isfinite(lse), torch.isfinite(small_lse))
    assert _rel(lse, small_lse) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_one_nonfinite_entry_is_refused(name, causal):
    # flagged by the hash and row-norm kernels on the way; causal: the rows no level hashes
    # (q's first leaf, k's last: rows 0 and N − 1 below) by a reduction over those rows alone
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 1, torch.float64))
    x = {"q": q, "k": k, "v": v}[name]
    for value, where in ((float("nan"), (0, 1, N - 1, 3)), (float("-inf"), (0, 0, 0, 0)), (float("inf"), (0, 0, N // 2, 7))):
        xs = {"q": q, "k": k, "v": v}
        xs[name] = x.clone()
        xs[name][where[0], min(where[1], xs[name].shape[1] - 1), where[2], where[3]] = value
        with pytest.raises(ValueError, match=f"{name} contains"):
            gpu.hyper_attention(xs["q"], xs["k"], xs["v"], causal=causal, config=CFG)
    gpu.hyper_attention(q, k, v, causal=causal, config=CFG)  # and the clean inputs pass


@pytest.mark.skipif(not CUDA, reason="tiles and shared memory are the CUDA device's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 32, 256])
def test_other_head_dims_launch_and_match(d, dtype):
    # head dims besides 64 and 128 (the others' tests): every kernel launches at the tiles
    # hyperref.gpu.function picks (within the device's shared memory) and the causal forward and its
    # gradients match the float64 dense twin as in test_gradients_match_dense_autograd
    cfg = HyperConfig(bits=4, block=64, samples=64, min_seq_len=128)
    n = 600
    q, k, v = _inputs(1, 2, 2, n, n, d, d, dtype)
    draws = make_draws(cfg, n, n, d, causal=True, batch_shape=(1, 2), rng=4)
    g_out = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(dtype_, backend, device):
        xs = [x.detach().to(device, dtype_).clone().requires_grad_() for x in (q, k, v)]
        out = gpu.hyper_attention(*xs, causal=True, config=cfg, draws=draws, exact_hash=True, backend=backend)
        (out.double() * g_out.to(device)).sum().backward()
        return [out] + [x.grad for x in xs]

    ref = run(torch.float64, "dense", "cpu")
    fast = run(dtype, "triton", DEVICE)
    same = run(dtype, "dense", DEVICE)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), fast, same, ref):
        assert torch.isfinite(a).all(), name
        err, err_same = _rel(a, r), _rel(b, r)
        assert err <= 2 * err_same + 4 * _floor(dtype), (name, err, err_same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_into_rounds_the_fp32_sum_once(dtype):
    # the vendor-leaf backward adds the levels' fp32 gradients into the leaves' in one pass:
    # the same as torch's fp32 sum rounded to the dtype, bitwise, including a ragged tail
    from hyperref.gpu.function import _add_into

    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("the Triton interpreter does not round fp32 to bfloat16 (it does not support bf16)")
    g = torch.randn(3, 1000, 7, device=DEVICE).to(dtype)
    acc = 1e-3 * torch.randn(3, 1000, 7, device=DEVICE)
    expect = (g.float() + acc).to(dtype)
    got = _add_into(g, acc)
    assert got.data_ptr() == g.data_ptr() and got.dtype == dtype
    assert torch.equal(got, expect)


@pytest.mark.parametrize("n", [8, 9, 37, 64])
def test_blocked_prefix_sums(n):
    # two-level prefix sums = cumsum up to rounding, and nondecreasing for nonnegative input
    # (the inverse-CDF search needs it); zero stretches stay flat
    from hyperref.gpu.structure import prefix_sums

    g = torch.Generator().manual_seed(n)
    x = torch.rand(3, n, generator=g, dtype=torch.float64) ** 4
    x[:, n // 3: n // 2] = 0.0
    got = prefix_sums(x.to(DEVICE), block=4).cpu()
    torch.testing.assert_close(got, torch.cumsum(x, dim=-1), rtol=1e-14, atol=0)
    assert (got.diff(dim=-1) >= 0).all() and got.is_contiguous()


def test_gaps_of_hashed_rows():
    from hyperref.gpu.attention import _gaps

    assert _gaps([(4, 8), (2, 4), (6, 8), (12, 14)], 16) == [(0, 2), (8, 12), (14, 16)]
    assert _gaps([(0, 16)], 16) == [] and _gaps([], 3) == [(0, 3)]


@pytest.mark.parametrize("sampler", ["rownorm", "mixed", "uniform"])
def test_sample_nodes_match_reference_sampler(sampler):
    # node-batched inverse CDF = hyperref.sampling.sample_keys on each node's keys, per head;
    # two query heads per key/value head, zero rows of v, a node whose rows of v are all zero
    from hyperref.sampling import sample_keys
    from hyperref.gpu.structure import Layout, layout_arrays, row_sq_norms, sample_nodes

    g = torch.Generator().manual_seed(11)
    v = torch.randn(2, 60, 8, generator=g, dtype=torch.float64)
    v[:, 5:9] = 0.0
    v[1, 40:52] = 0.0  # node 1 of kv head 1: all zero
    layout = Layout(((0, 10, 0, 40), (10, 30, 40, 52), (30, 50, 52, 60)))
    arrays = layout_arrays(layout, 4, torch.device("cpu"))
    u = torch.rand(4, 3, 32, generator=g, dtype=torch.float64)
    idx, log_w = sample_nodes(row_sq_norms(v, exact=True), u, sampler, layout, arrays)
    for head in range(4):
        for t, (_, _, k0, k1) in enumerate(layout.nodes):
            ref_idx, ref_log_w = sample_keys(u[head, t].numpy(), v[head // 2, k0:k1].numpy(), sampler)
            assert torch.equal(idx[head, t], torch.from_numpy(ref_idx) + k0), (head, t)
            np.testing.assert_allclose(log_w[head, t].numpy(), ref_log_w, rtol=1e-6)
    _check_triton_sampler(row_sq_norms(v, exact=True), u, sampler, layout)


def test_unknown_leaf_backend_is_an_error():
    q = torch.randn(1, 1, 64, 16, device=DEVICE)
    with pytest.raises(ValueError, match="leaves"):
        gpu.hyper_attention(q, q, q, causal=True, config=CFG, kernel_options={"leaves": "foo"})


@pytest.mark.parametrize("options, message", [
    ({"one_blok": False}, "unknown option.*'one_blok'.*one_block, leaves"),
    ("fast", "KernelOptions or a dict"),
    ({"one_block": 1}, "one_block must be a bool"),
    ({"counting_on_cpu": "yes"}, "counting_on_cpu must be a bool"),
    ({"leaves": "cudnn9"}, "leaves must be one of"),
    ({"hash_rows": 64.0}, "hash_rows must be an int"),
    ({"counting_bits": True}, "counting_bits must be an int"),
    ({"hash_rows": 48}, r"hash_rows must be a power of two in \[16, 1024\], got 48"),
    ({"sort_tile": 2048}, "sort_tile must be a power of two"),
    ({"counting_bits": 9}, r"counting_bits must be in \[0, 8\], got 9"),
    ({"sort_chunk": 0}, "sort_chunk must be >= 1"),
    ({"fwd_tiles": (64, 32, 4)}, "fwd_tiles must be None or .* 4 ints"),
    ({"fwd_tiles": (64, 32.0, 4, 3)}, "4 ints"),
    ({"dq_tiles": (64, 8, 4, 2)}, "dq_tiles BN must be a power of two"),
    ({"bwd_tiles": (64, 64, 3, 2)}, "bwd_tiles num_warps must be one of"),
    ({"smp_tiles": (64, 64, 4, 0)}, r"smp_tiles num_stages must be in \[1, 8\]"),
])
@pytest.mark.parametrize("backend", ["triton", "dense"])
def test_bad_kernel_options_are_refused(options, message, backend):
    q = torch.randn(1, 1, 64, 16, device=DEVICE)
    with pytest.raises(hyperref.InputError, match=message):
        gpu.hyper_attention(q, q, q, config=CFG, backend=backend, kernel_options=options)
    if isinstance(options, dict) and "one_blok" not in options:
        with pytest.raises(hyperref.InputError, match=message):
            gpu.KernelOptions(**options)


def test_kernel_options_as_a_dict_equal_the_dataclass():
    options = gpu.KernelOptions(one_block=False, dq_tiles=[64, 32, 4, 2], bwd_tiles=(32, 32, 4, 2))
    assert options == gpu.KernelOptions(one_block=np.bool_(False), dq_tiles=(64, 32, 4, 2),
                                        bwd_tiles=(32, 32, 4, 2))
    assert hash(options) == hash(gpu.KernelOptions(**{f: getattr(options, f) for f in options.__dataclass_fields__}))
    assert options.tiles("dq") == (64, 32, 4, 2) and options.tiles("smp") == (32, 32, 4, 2)
    assert options.tiles("fwd") is None
    with pytest.raises(AttributeError):
        options.one_block = True  # frozen


class _Launches:
    """Stands for a Triton kernel: records the keyword arguments of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_kernel_options_reach_the_kernels(monkeypatch):
    # non-default tiles, loops and hash rows are what the kernels are launched with; the answer and
    # gradients are the defaults' within the tolerance of test_one_block_loop_equals_general_loops
    from hyperref.gpu import kernels_backward, kernels_forward, kernels_sort

    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 5, torch.float64))
    g_out = torch.randn_like(q)
    modules = {"_fwd_kernel": kernels_forward, "_bwd_dq_kernel": kernels_backward,
               "_bwd_dkdv_kernel": kernels_backward, "_bwd_samples_kernel": kernels_backward,
               "_hash_kernel": kernels_sort}
    names = tuple(modules)

    def run(options):
        spies = {name: _Launches(getattr(module, name)) for name, module in modules.items()}
        for name, spy in spies.items():
            monkeypatch.setattr(modules[name], name, spy)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = gpu.hyper_attention(*xs, config=CFG, return_lse=True, kernel_options=options,
                                       generator=torch.Generator(DEVICE).manual_seed(3))
        grads = torch.autograd.grad((out * g_out).sum() + lse.sum(), xs)
        for name, spy in spies.items():
            monkeypatch.setattr(modules[name], name, spy.kernel)
        return [out, lse, *grads], {name: spy.calls for name, spy in spies.items()}

    want, default = run(None)
    assert any(c["ONE_BLOCK"] for c in default["_fwd_kernel"])  # the whole, non-causal: one block
    options = gpu.KernelOptions(one_block=False, fwd_tiles=(32, 16, 4, 1), dq_tiles=(16, 32, 4, 1),
                                bwd_tiles=(32, 32, 4, 1), hash_rows=32)
    got, calls = run(options)
    assert all(c["BM"] == 32 and c["BN"] == 16 and not c["ONE_BLOCK"] for c in calls["_fwd_kernel"])
    assert all(c["BM"] == 16 and c["BN"] == 32 and not c["ONE_BLOCK"] for c in calls["_bwd_dq_kernel"])
    assert all(c["BM"] == 32 and c["BN"] == 32 and not c["ONE_BLOCK"] for c in calls["_bwd_dkdv_kernel"])
    assert all(c["BM"] == 32 and c["BN"] == 32 for c in calls["_bwd_samples_kernel"])
    assert calls["_hash_kernel"] and all(c["BM"] == 32 for c in calls["_hash_kernel"])
    assert all(calls[name] for name in names)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_finite_inputs_whose_output_overflows_are_refused(causal, sign):
    # every value at 3e38: a weighted average of them is 3e38, but the kernels' float32 sums
    # pass the float32 maximum, so the output holds ±Inf: a range error, not a wrong number
    q, k, v = (x.to(DEVICE, torch.float32) for x in _inputs(1, 2, 1, N, N, D_LIST[0], 3, torch.float64))
    v = torch.full_like(v, sign * 3e38)
    with pytest.raises(ValueError, match="range"):
        gpu.hyper_attention(q, k, v, causal=causal, config=CFG)
