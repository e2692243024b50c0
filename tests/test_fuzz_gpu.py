"""Fuzzing the GPU path (torch + Triton; the interpreter on CPU tensors, ``TRITON_INTERPRET=1``).

``hyperref.gpu.hyper_attention`` (both backends) against the float64 NumPy reference on the
same draws (``exact_hash=True``: the same hashes and samples, so only rounding differs), its
exact limit against exact attention, and ``hyperref.gpu.scaled_dot_product_attention`` against
torch's SDPA in float64. Tiny sizes: the interpreter runs every kernel instance in Python.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import hyperref  # noqa: E402
from hyperref import HyperConfig, make_draws  # noqa: E402
from hyperref import gpu  # noqa: E402

from .fuzz import (Refused, answer, examples, expect_input_error, logit_perturbation,  # noqa: E402
                   softmax_tolerance, verdict)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
F32_MAX = float(torch.finfo(torch.float32).max)


@st.composite
def gpu_case(draw, max_n=20):
    """Inputs (float64 copies of the values the device sees), shapes with ``Hk | H``, ``nq != nk``."""
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 2))
    nq, nk = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d = 16
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logit = 10.0 ** draw(st.floats(-2, 1.5))
    vscale = 2.0 ** draw(st.integers(-20, 20))
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64) * math.sqrt(logit)
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64) * math.sqrt(logit)
    v = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64) * vscale
    if dtype == torch.float16:
        v = v.clamp(-6e4, 6e4)
    q, k, v = (x.to(dtype).to(torch.float64) for x in (q, k, v))  # the values the device sees
    return dict(q=q, k=k, v=v, dtype=dtype, causal=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.5, -0.25, 0.0])))


NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _work(case, backend):
    """The dtype the arithmetic runs in: float32 in the Triton kernels (products of float16
    and bfloat16 entries are exact there), the input dtype in the dense backend."""
    if backend == "triton" or case["dtype"] == torch.bfloat16:
        return np.float32
    return NUMPY_OF[case["dtype"]]


def _tolerance(case, terms, work=np.float32):
    """The arithmetic in ``work``, the reference's float64, and one rounding of the output to its
    dtype."""
    q, k, v = (case[x].numpy() for x in "qkv")
    s = 1 / math.sqrt(q.shape[-1]) if case["scale"] is None else case["scale"]
    vmax = float(np.abs(v).max())
    tol = softmax_tolerance(logit_perturbation(q, k, s, work), terms, vmax, work)
    tol += softmax_tolerance(logit_perturbation(q, k, s, np.float64), terms, vmax, np.float64)
    fi = torch.finfo(case["dtype"])  # one rounding to the output dtype, subnormal spacing included
    return tol + float(fi.eps) * vmax + float(fi.smallest_normal * fi.eps)


def _overflow_ok(case, terms):
    """The documented refusal: dot products (formed before the scale), logits or weighted sums
    may exceed float32's range."""
    q, k, v = (case[x].abs().max().item() for x in "qkv")
    s = 1 / 4 if case["scale"] is None else abs(case["scale"])
    big = max(s, 1.0) * 16 * q * k > F32_MAX / 4 or v * terms > F32_MAX / 4
    return lambda err: "range" in str(err) and big


@settings(max_examples=examples(20))
@given(st.data())
def test_gpu_matches_the_reference_on_the_same_draws(data):
    case = data.draw(gpu_case())
    q, k, v = case["q"], case["k"], case["v"]
    b, h, nq, d = q.shape
    nk = k.shape[2]
    cfg = HyperConfig(bits=data.draw(st.integers(1, 6)), block=data.draw(st.integers(1, 8)),
                      samples=data.draw(st.integers(1, 8)), min_seq_len=data.draw(st.integers(1, nq + 2)),
                      sampler=data.draw(st.sampled_from(["rownorm", "uniform", "mixed"])))
    backend = data.draw(st.sampled_from(["triton", "dense"]), label="backend")
    draws = make_draws(cfg, nq, nk, d, causal=case["causal"], batch_shape=(b, h), rng=data.draw(st.integers(0, 99)))
    ref, ref_lse = hyperref.hyper_attention(q.numpy(), k.numpy(), v.numpy(), causal=case["causal"],
                                            scale=case["scale"], config=cfg, draws=draws, return_lse=True,
                                            engine="numpy")
    dev = [x.to(DEVICE, case["dtype"]) for x in (q, k, v)]
    terms = nk + cfg.samples
    try:
        out, lse = answer(lambda: gpu.hyper_attention(*dev, causal=case["causal"], scale=case["scale"], config=cfg,
                                                      draws=draws, return_lse=True, exact_hash=True,
                                                      backend=backend), refusal_ok=_overflow_ok(case, terms))
    except Refused:
        return
    err = float((out.double().cpu() - torch.from_numpy(ref)).abs().max())
    work = _work(case, backend)
    tol = _tolerance(case, terms, work)
    seen = np.isfinite(ref_lse)
    same_seen = bool((torch.isfinite(lse.cpu()).numpy() == seen).all())
    lse_err = float(np.abs(lse.double().cpu().numpy()[seen] - ref_lse[seen]).max(initial=0.0))
    s = 1 / math.sqrt(d) if case["scale"] is None else case["scale"]
    lse_tol = logit_perturbation(q.numpy(), k.numpy(), s, work) + 4 * float(np.finfo(work).eps) * (
        terms + 4 + float(np.abs(ref_lse[seen]).max(initial=0.0)))
    verdict(out.dtype == case["dtype"] and err <= tol and same_seen and lse_err <= lse_tol + tol,
            f"{backend} {case['dtype']} vs the reference: out {err:.3g} (tol {tol:.3g}), lse {lse_err:.3g}; {cfg}")


@settings(max_examples=examples(20))
@given(st.data())
def test_gpu_exact_limit_is_exact_attention_even_at_huge_magnitudes(data):
    """``nq <= min_seq_len``: exact attention, also for logits up to ~1e38 and values near the
    float32 maximum, where the kernels' float32 sums may overflow: then an InputError."""
    case = data.draw(gpu_case(max_n=12))
    if case["dtype"] == torch.float32:
        big = data.draw(st.sampled_from([1.0, 1e9, 1e19]), label="q, k scale")
        case["q"], case["k"] = case["q"] * big, case["k"] * big
        if data.draw(st.booleans(), label="v near max"):
            case["v"] = torch.sign(case["v"]) * 3e38 * data.draw(st.sampled_from([0.1, 0.9]))
        case["q"], case["k"], case["v"] = (x.float().double() for x in (case["q"], case["k"], case["v"]))
    q, k, v = case["q"], case["k"], case["v"]
    cfg = HyperConfig(min_seq_len=q.shape[2])
    backend = data.draw(st.sampled_from(["triton", "dense"]), label="backend")
    try:
        out = answer(lambda: gpu.hyper_attention(*(x.to(DEVICE, case["dtype"]) for x in (q, k, v)),
                                                 causal=case["causal"], scale=case["scale"], config=cfg,
                                                 backend=backend), refusal_ok=_overflow_ok(case, k.shape[2]))
    except Refused:
        return
    want = hyperref.exact_attention(q.numpy(), k.numpy(), v.numpy(), causal=case["causal"], scale=case["scale"])
    err = float((out.double().cpu() - torch.from_numpy(want)).abs().max())
    tol = _tolerance(case, k.shape[2], _work(case, backend))
    verdict(err <= tol, f"{backend} exact limit: max|err| {err:.3g} > {tol:.3g}")


def _base():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 16, generator=g) for _ in range(3)]


GPU_MUTATIONS = {
    "list q": (lambda q, k, v: ([1.0], k, v), {}, ["torch.tensor"]),
    "3-d q": (lambda q, k, v: (q[0], k, v), {}, ["shape"]),
    "dtype mix": (lambda q, k, v: (q.double(), k, v), {}, ["dtype"]),
    "int": (lambda q, k, v: (q.int(), k.int(), v.int()), {}, ["dtype"]),
    "float64 triton": (lambda q, k, v: (q.double(), k.double(), v.double()), {}, ["dtype"]),
    "head dim 5": (lambda q, k, v: (q[..., :5], k[..., :5], v), {}, ["head dim"]),
    "d = 0 dense": (lambda q, k, v: (q[..., :0], k[..., :0], v), {"backend": "dense"}, ["head dim"]),
    "nk != nv": (lambda q, k, v: (q, k, v[:, :, :-1]), {}, ["shape"]),
    "no keys": (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {"backend": "dense"}, ["key"]),
    "heads": (lambda q, k, v: (q[:, :1], k, v), {}, ["heads"]),
    "batch": (lambda q, k, v: (q, torch.cat([k, k]), v), {}, ["batch"]),
    "nan q": (lambda q, k, v: (q.index_fill(2, torch.tensor([3], device=q.device), float("nan")), k, v), {},
              ["q", "nan"]),
    "inf v": (lambda q, k, v: (q, k, v.index_fill(2, torch.tensor([0], device=q.device), float("inf"))), {},
              ["v", "inf"]),
    "inf k sampled": (lambda q, k, v: (q, k.index_fill(2, torch.tensor([7], device=q.device), -float("inf")), v),
                      {"config": HyperConfig(bits=2, block=2, samples=2, min_seq_len=2)}, ["k", "inf"]),
    "scale str": (lambda q, k, v: (q, k, v), {"scale": "x"}, ["scale"]),
    "scale huge": (lambda q, k, v: (q, k, v), {"scale": 10**400}, ["scale"]),
    "scale nan": (lambda q, k, v: (q, k, v), {"scale": math.nan}, ["scale"]),
    "config": (lambda q, k, v: (q, k, v), {"config": {"block": 2}}, ["config"]),
    "direct": (lambda q, k, v: (q, k, v), {"config": HyperConfig(mode="direct")}, ["direct"]),
    "paper": (lambda q, k, v: (q, k, v), {"config": HyperConfig(estimator="paper")}, ["estimator"]),
    "causal int": (lambda q, k, v: (q, k, v), {"causal": 1}, ["causal"]),
    "exact_hash str": (lambda q, k, v: (q, k, v), {"exact_hash": "yes"}, ["exact_hash"]),
    "generator": (lambda q, k, v: (q, k, v), {"generator": 3}, ["generator"]),
    "backend": (lambda q, k, v: (q, k, v), {"backend": "cuda"}, ["backend"]),
    "draws": (lambda q, k, v: (q, k, v), {"draws": "x", "config": HyperConfig(bits=2, block=2, samples=2,
                                                                             min_seq_len=2)}, ["draws"]),
}
if DEVICE == "cpu":
    GPU_MUTATIONS["bfloat16 interpreter"] = (lambda q, k, v: (q.bfloat16(), k.bfloat16(), v.bfloat16()), {},
                                             ["bfloat16"])


@settings(max_examples=examples(30))
@given(st.sampled_from(sorted(GPU_MUTATIONS)))
def test_gpu_invalid_inputs_are_input_errors(name):
    make, kwargs, words = GPU_MUTATIONS[name]
    args = make(*(x.to(DEVICE) for x in _base()))
    expect_input_error(lambda: gpu.hyper_attention(*args, **kwargs), *words)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention (SDPA's convention; the reference on CPU tensors)


@st.composite
def sdpa_case(draw):
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    gqa = draw(st.booleans())
    h = hk * (draw(st.integers(1, 2)) if gqa else 1)
    nq, nk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    e, ev = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    q = torch.randn(b, h, nq, e, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, nk, e, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, nk, ev, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["none", "causal", "full", "padding", "causal mask", "float causal", "broadcast"]))
    mask, is_causal = None, False
    if kind == "causal":
        is_causal = True
    elif kind == "full":
        mask = torch.ones(nq, nk, dtype=torch.bool)
    elif kind == "padding":  # the last keys hidden from every row (at least one kept)
        keep = draw(st.integers(1, nk))
        mask = (torch.arange(nk) < keep).expand(b, 1, nq, nk)
    elif kind in ("causal mask", "float causal"):
        mask = torch.ones(nq, nk, dtype=torch.bool).tril()  # SDPA's top-left alignment
        if kind == "float causal":
            mask = torch.zeros(nq, nk, dtype=torch.float64).masked_fill(~mask, -math.inf)
    else:  # (1, 1, 1, S): broadcast over heads and query rows
        mask = torch.ones(1, 1, 1, nk, dtype=torch.bool)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), mask=mask, is_causal=is_causal, gqa=gqa,
                scale=draw(st.sampled_from([None, 0.3, 2.0])), dtype=dtype)


@settings(max_examples=examples(60))
@given(sdpa_case())
def test_sdpa_matches_torch_sdpa_in_the_exact_limit(case):
    q, k, v = case["q"], case["k"], case["v"]
    args = dict(attn_mask=case["mask"], is_causal=case["is_causal"], scale=case["scale"], enable_gqa=case["gqa"])
    out = answer(lambda: gpu.scaled_dot_product_attention(q, k, v, **args,
                                                          config=HyperConfig(min_seq_len=q.shape[2])))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), **args)
    seen = torch.isfinite(want).all(dim=-1)  # torch gives NaN on rows that see no key; this gives 0
    qn, kn = q.double().numpy(), k.double().numpy()
    s = 1 / math.sqrt(q.shape[-1]) if case["scale"] is None else case["scale"]
    vmax = float(v.abs().max())
    work = np.float32 if case["dtype"] == torch.float32 else np.float64
    tol = 2 * softmax_tolerance(logit_perturbation(qn, kn, s, work), k.shape[2], vmax, work)
    err = float((out.double() - want).abs().amax(dim=-1)[seen].max()) if seen.any() else 0.0
    zero = bool((out[~seen] == 0).all())
    verdict(out.dtype == case["dtype"] and err <= tol and zero, f"SDPA: max|err| {err:.3g} > {tol:.3g} "
                                                                f"or unseen rows not 0 ({case['mask'] is not None})")


SDPA_MUTATIONS = {
    "int": (lambda q, k, v: (q.int(), k.int(), v.int()), {}, ["floating"]),
    "list": (lambda q, k, v: ([1.0], k, v), {}, ["tensor"]),
    "3-d": (lambda q, k, v: (q[0], k[0], v[0]), {}, ["4-d"]),
    "gqa off": (lambda q, k, v: (q, k[:, :1], v[:, :1]), {}, ["enable_gqa"]),
    "mask and causal": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.bool),
                                                    "is_causal": True}, ["both"]),
    "mask heads 3 for 2": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(1, 3, 8, 8, dtype=torch.bool)},
                           ["broadcast"]),
    "mask 3-d": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(1, 8, 8, dtype=torch.bool)}, ["4-d"]),
    "mask shape": (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}, ["broadcast"]),
    "mask list": (lambda q, k, v: (q, k, v), {"attn_mask": [[True]]}, ["attn_mask"]),
    "scale str": (lambda q, k, v: (q, k, v), {"scale": "x"}, ["scale"]),
    "scale nan": (lambda q, k, v: (q, k, v), {"scale": math.nan}, ["scale"]),
    "scale huge": (lambda q, k, v: (q, k, v), {"scale": 10**400}, ["scale"]),
    "causal int": (lambda q, k, v: (q, k, v), {"is_causal": 1}, ["bool"]),
    "generator": (lambda q, k, v: (q, k, v), {"generator": 3}, ["generator"]),
    "config": (lambda q, k, v: (q, k, v), {"config": "paper"}, ["config"]),
    "nan": (lambda q, k, v: (q.index_fill(2, torch.tensor([1], device=q.device), float("nan")), k, v), {}, ["nan"]),
    "e mismatch": (lambda q, k, v: (q, k[..., :3], v), {}, ["dimension", "shape"]),
}


@settings(max_examples=examples(30))
@given(st.sampled_from(sorted(SDPA_MUTATIONS)))
def test_sdpa_invalid_inputs_are_input_errors(name):
    make, kwargs, words = SDPA_MUTATIONS[name]
    args = make(*_base())
    expect_input_error(lambda: gpu.scaled_dot_product_attention(
        *args, **({"config": HyperConfig(min_seq_len=4, block=2, samples=2)} | kwargs)), *words)
