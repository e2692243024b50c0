import os; os.environ["TRITON_INTERPRET"] = "1"
from harness import *
import torch
torch.set_num_threads(1)
from hyperref import HyperConfig as HC, make_draws
import hyperref.gpu as G
import hyperref.theory.bounds as B
from hyperref.theory.parameters import attention_parameters, spectral_error
from hyperref.theory.self_normalized import direct_moments
g = torch.Generator().manual_seed(0)
def T(*s, dt=torch.float32): return torch.randn(*s, generator=g).to(dt)
EX = HC(min_seq_len=10**9)
for backend in ("dense", "triton"):
    fn = f"gpu.hyper_attention[{backend}]"
    def f(q, k, v, **kw): return G.hyper_attention(q, k, v, backend=backend, **kw)
    for (nq, nk, tag) in [(0, 16, "0 rows"), (16, 0, "0 keys"), (1, 1, "length 1"), (7, 19, "nq<nk odd"), (19, 7, "nq>nk odd")]:
        for causal in (False, True):
            q, k, v = T(1, 1, nq, 16), T(1, 1, nk, 16), T(1, 1, nk, 16)
            ref = oracle(q.double().numpy(), k.double().numpy(), v.double().numpy(), causal) if nk else None
            probe(fn, f"{tag} causal={causal} (exact limit)", f"(1,1,{nq},16),(1,1,{nk},16)", lambda: f(q, k, v, causal=causal, config=EX), vs(ref, 1e-4, 1e-5) if ref is not None else None)
    q, k, v = T(0, 1, 8, 16), T(0, 1, 8, 16), T(0, 1, 8, 16); probe(fn, "0 batch", "(0,1,8,16)", lambda: f(q, k, v, config=EX))
    q, k, v = T(1, 0, 8, 16), T(1, 0, 8, 16), T(1, 0, 8, 16); probe(fn, "0 heads", "(1,0,8,16)", lambda: f(q, k, v, config=EX))
    q, k, v = T(1, 1, 8, 0), T(1, 1, 8, 0), T(1, 1, 8, 16); probe(fn, "d=0", "d=0", lambda: f(q, k, v, config=EX))
    q, k, v = T(1, 1, 8, 8), T(1, 1, 8, 8), T(1, 1, 8, 8); probe(fn, "d=8 (not in HEAD_DIMS)", "d=8", lambda: f(q, k, v, config=EX))
    q, k, v = T(8, 16), T(8, 16), T(8, 16); probe(fn, "2-d tensors", "(8,16)", lambda: f(q, k, v, config=EX))
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.complex64, torch.bool):
        if backend == "triton" and dt == torch.bfloat16:
            continue  # interpreter does not support bf16 (brief)
        q = (T(1, 1, 12, 16) * 3).to(dt); k = (T(1, 1, 12, 16) * 3).to(dt); v = (T(1, 1, 12, 16) * 3).to(dt)
        ref = oracle(q.double().numpy(), k.double().numpy(), v.double().numpy()) if dt.is_floating_point else None
        tol = 2e-2 if dt in (torch.float16, torch.bfloat16) else 1e-4
        probe(fn, f"dtype {dt} (exact limit)", str(dt), lambda: f(q, k, v, config=EX), vs(ref, tol, tol) if ref is not None else None)
    q, k, v = T(1, 1, 12, 16), T(1, 1, 12, 16), T(1, 1, 12, 16)
    probe(fn, "mixed dtypes", "q f16, k,v f32", lambda: f(q.half(), k, v, config=EX))
    for bad in (float("nan"), float("inf")):
        for w in "qkv":
            qq, kk, vv = q.clone(), k.clone(), v.clone(); dict(q=qq, k=kk, v=vv)[w][0, 0, 3, 2] = bad
            probe(fn, f"{bad} in {w}", f"{w}[...]={bad}", lambda: f(qq, kk, vv, config=EX))
            cfg2 = HC(block=4, samples=4, min_seq_len=4)
            probe(fn, f"{bad} in {w} (approx mode)", f"{w}[...]={bad}, min_seq_len=4", lambda: f(qq, kk, vv, config=cfg2))
    for val, tag in [(1e19, "q,k*1e19 float32"), (1e-30, "q,k*1e-30 float32")]:
        qq, kk = q * val, k * val
        with np.errstate(all="ignore"):
            ref = None
            import math
            qd, kd = qq.double().numpy(), kk.double().numpy()
            L = (qd @ kd.T[..., :]) if False else None
        refarr = np.asarray(oracle(np.longdouble(qq.double().numpy()), np.longdouble(kk.double().numpy()), v.double().numpy()), dtype=np.float64)
        probe(fn, tag + " (exact limit)", tag, lambda: f(qq, kk, v, config=EX), vs(refarr, 1e-3, 1e-3))
    qs = T(1, 1, 24, 32)[:, :, ::2, ::2]; ks = T(1, 1, 24, 32)[:, :, ::2, ::2]; vs2 = T(1, 1, 12, 32)[..., ::2]
    probe(fn, "non-contiguous strided", "[..., ::2, ::2]", lambda: f(qs, ks, vs2, causal=True, config=EX),
          vs(oracle(qs.double().numpy(), ks.double().numpy(), vs2.double().numpy(), True), 1e-4, 1e-5))
    qt = T(1, 12, 1, 16).transpose(1, 2); probe(fn, "transposed (B,N,H,D)->(B,H,N,D)", "transpose(1,2)", lambda: f(qt, qt, qt, config=EX),
          vs(oracle(qt.double().numpy(), qt.double().numpy(), qt.double().numpy()), 1e-4, 1e-5))
    q, k, v = T(1, 2, 48, 16), T(1, 2, 48, 16), T(1, 2, 48, 16)
    for cname, cfg in [("block=4,samples=4,min_seq_len=8", HC(block=4, samples=4, min_seq_len=8)),
                       ("block=1,samples=1,min_seq_len=1", HC(block=1, samples=1, min_seq_len=1)),
                       ("bits=30", HC(bits=30, block=4, samples=4, min_seq_len=8)), ("block=2**40", HC(block=2**40, min_seq_len=8)),
                       ("mode=direct", HC(mode="direct", min_seq_len=8)), ("approxd", HC(normalizer="approxd", min_seq_len=8))]:
        for causal in (False, True):
            def chk(r, v=v):
                a = r.double().numpy(); vv = v.double().numpy()
                ok = np.isfinite(a).all() and (a >= vv.min(2, keepdims=True) - 1e-4).all() and (a <= vv.max(2, keepdims=True) + 1e-4).all()
                return ("correct" if ok else "WRONG"), f"invariant finite & in hull: {ok}"
            probe(fn, f"config {cname} causal={causal}", cname, lambda: f(q, k, v, causal=causal, config=cfg, generator=torch.Generator().manual_seed(1)), chk)
    probe(fn, "backend='cuda'", "backend='cuda'", lambda: G.hyper_attention(q, k, v, backend="cuda"))
    probe(fn, "numpy arrays", "np.ndarray inputs", lambda: f(q.numpy(), k.numpy(), v.numpy()))
    probe(fn, "causal='yes'", "causal='yes'", lambda: f(q, k, v, causal="yes"))
    probe(fn, "generator=0", "generator=0", lambda: f(q, k, v, generator=0))
    probe(fn, "scale=nan", "scale=nan", lambda: f(q, k, v, scale=float("nan")))
    C = HC(block=4, samples=4, min_seq_len=8)
    dr = make_draws(C, 48, 48, 16, batch_shape=(1, 2), rng=0)
    probe(fn, "reference draws", "draws=make_draws(...,(1,2))", lambda: f(q, k, v, config=C, draws=dr), None)
    dr1 = make_draws(C, 48, 48, 16, rng=0)
    probe(fn, "draws with wrong batch_shape ()", "draws batch ()", lambda: f(q, k, v, config=C, draws=dr1))
    import dataclasses
    bd = dr.blocks[""]
    d2 = dataclasses.replace(dr, blocks={"": dataclasses.replace(bd, sample_u=np.full_like(bd.sample_u, 1.5))})
    probe(fn, "draws sample_u=1.5", "hand-built", lambda: f(q, k, v, config=C, draws=d2))
    d3 = dataclasses.replace(dr, blocks={"": dataclasses.replace(bd, sample_u=np.full_like(bd.sample_u, np.nan))})
    probe(fn, "draws sample_u=NaN", "hand-built", lambda: f(q, k, v, config=C, draws=d3))
# SDPA
S = G.scaled_dot_product_attention
q, k, v = T(1, 2, 12, 16), T(1, 2, 12, 16), T(1, 2, 12, 16)
tsd = torch.nn.functional.scaled_dot_product_attention
def vst(ref, tol=1e-4):
    return lambda r: (("correct" if torch.allclose(r.double(), ref.double(), atol=tol, rtol=tol) else "WRONG"), f"vs torch SDPA max err {float((r.double()-ref.double()).abs().max()):.2g}")
probe("gpu.sdpa", "exact limit, no mask", "S(q,k,v,config=EX)", lambda: S(q, k, v, config=EX), vst(tsd(q, k, v)))
probe("gpu.sdpa", "is_causal exact limit (top-left)", "is_causal=True", lambda: S(q, k, v, is_causal=True, config=EX), vst(tsd(q, k, v, is_causal=True)))
qq = T(1, 2, 5, 16)
probe("gpu.sdpa", "is_causal L<S (top-left)", "L=5,S=12", lambda: S(qq, k, v, is_causal=True, config=EX), vst(tsd(qq, k, v, is_causal=True)))
kk, vv = T(1, 2, 5, 16), T(1, 2, 5, 16)
probe("gpu.sdpa", "is_causal L>S (top-left)", "L=12,S=5", lambda: S(q, kk, vv, is_causal=True, config=EX), vst(tsd(q, kk, vv, is_causal=True)))
bm = torch.rand(12, 12, generator=g) > 0.3
probe("gpu.sdpa", "bool mask (L,S)", "attn_mask bool", lambda: S(q, k, v, attn_mask=bm, config=EX), vst(tsd(q, k, v, attn_mask=bm)))
fm = torch.randn(12, 12, generator=g)
probe("gpu.sdpa", "float additive mask (L,S)", "attn_mask float", lambda: S(q, k, v, attn_mask=fm, config=EX), vst(tsd(q, k, v, attn_mask=fm)))
zm = torch.zeros(12, 12, dtype=torch.bool); zm[:, 0] = True; zm[3] = False
probe("gpu.sdpa", "bool mask with a fully masked row", "row 3 all False", lambda: S(q, k, v, attn_mask=zm, config=EX), None)
for shp in [(12, 5), (5, 12), (12,), (1, 2, 12, 12, 1), (2, 2, 12, 12), (1, 3, 12, 12)]:
    m = torch.ones(shp, dtype=torch.bool)
    probe("gpu.sdpa", f"wrong-shape mask {shp}", f"attn_mask.shape={shp}", lambda: S(q, k, v, attn_mask=m, config=EX))
m4 = torch.ones(1, 1, 12, 12, dtype=torch.bool)
probe("gpu.sdpa", "4-d broadcast mask (1,1,L,S)", "(1,1,12,12)", lambda: S(q, k, v, attn_mask=m4, config=EX), vst(tsd(q, k, v, attn_mask=m4)))
probe("gpu.sdpa", "int mask", "attn_mask int64", lambda: S(q, k, v, attn_mask=torch.ones(12, 12, dtype=torch.int64), config=EX))
probe("gpu.sdpa", "mask + is_causal", "both", lambda: S(q, k, v, attn_mask=bm, is_causal=True, config=EX))
probe("gpu.sdpa", "GQA without enable_gqa", "H=2,Hk=1", lambda: S(q, k[:, :1], v[:, :1], config=EX))
probe("gpu.sdpa", "GQA enable_gqa", "H=2,Hk=1", lambda: S(q, k[:, :1], v[:, :1], enable_gqa=True, config=EX), vst(tsd(q, k[:, :1], v[:, :1], enable_gqa=True)))
probe("gpu.sdpa", "3-d input", "(2,12,16)", lambda: S(q[0], k[0], v[0], config=EX))
probe("gpu.sdpa", "is_causal=1", "is_causal=1", lambda: S(q, k, v, is_causal=1, config=EX))
probe("gpu.sdpa", "0 rows", "L=0", lambda: S(q[:, :, :0], k, v, config=EX), vst(tsd(q[:, :, :0], k, v)))
probe("gpu.sdpa", "0 keys", "S=0", lambda: S(q, k[:, :, :0], v[:, :, :0], config=EX))
probe("gpu.sdpa", "NaN in q", "q nan", lambda: S(torch.full_like(q, float("nan")), k, v, config=EX))
probe("gpu.sdpa", "float64", "double", lambda: S(q.double(), k.double(), v.double(), config=EX), vst(tsd(q.double(), k.double(), v.double()), 1e-10))
probe("gpu.sdpa", "bfloat16", "bf16 (CPU: NumPy reference path)", lambda: S(q.bfloat16(), k.bfloat16(), v.bfloat16(), config=EX), vst(tsd(q.bfloat16(), k.bfloat16(), v.bfloat16()).float(), 2e-2))
probe("gpu.sdpa", "scale='x'", "scale='x'", lambda: S(q, k, v, scale="x", config=EX))
probe("gpu.sdpa", "scale=nan", "scale=nan", lambda: S(q, k, v, scale=float("nan"), config=EX))
probe("gpu.sdpa", "config=dict", "config={}", lambda: S(q, k, v, config={}))
probe("gpu.sdpa", "approx mode bool mask", "min_seq_len=4 + mask", lambda: S(q, k, v, attn_mask=bm, config=HC(block=4, samples=4, min_seq_len=4)))
# theory
for name, call in [("g1_bound(-1)", lambda: B.g1_bound(-1)), ("g1_bound(nan)", lambda: B.g1_bound(float("nan"))), ("g1_bound(0.5)", lambda: B.g1_bound(0.5)),
                   ("g1_bound(inf)", lambda: B.g1_bound(float("inf"))),
                   ("g2_bound(0,0.1,1,1)", lambda: B.g2_bound(0, 0.1, 1, 1)), ("g2_bound(10,0,1,1)", lambda: B.g2_bound(10, 0, 1, 1)),
                   ("g2_bound(10,1.5,1,1)", lambda: B.g2_bound(10, 1.5, 1, 1)), ("g2_bound(10,0.1,0.5,1)", lambda: B.g2_bound(10, 0.1, 0.5, 1)),
                   ("g2_bound(10,0.1,nan,1)", lambda: B.g2_bound(10, 0.1, float("nan"), 1)), ("g2_bound(2**40,.1,1,1)", lambda: B.g2_bound(2**40, 0.1, 1, 1)),
                   ("g2_bound(10.5,.1,1,1)", lambda: B.g2_bound(10.5, 0.1, 1, 1)), ("g2_bound(True,.1,1,1)", lambda: B.g2_bound(True, 0.1, 1, 1)),
                   ("g2_samples(0,.1,1,1)", lambda: B.g2_samples(0, 0.1, 1, 1)), ("g2_samples(1e-300,.1,1,1)", lambda: B.g2_samples(1e-300, 0.1, 1, 1)),
                   ("g2_samples(.1,1e-300,1,1)", lambda: B.g2_samples(0.1, 1e-300, 1, 1)),
                   ("g2_samples_alpha(.1,.1,0,1,10,10)", lambda: B.g2_samples_alpha(0.1, 0.1, 0, 1, 10, 10)),
                   ("g2_samples_alpha(.1,.1,1,1,0,10)", lambda: B.g2_samples_alpha(0.1, 0.1, 1, 1, 0, 10)),
                   ("g3_bound(10,.1,-1,1,1)", lambda: B.g3_bound(10, 0.1, -1, 1, 1)), ("g3_bound(10,.1,0,0,1)", lambda: B.g3_bound(10, 0.1, 0, 0, 1)),
                   ("g4_bound(-1,.1)", lambda: B.g4_bound(-1, 0.1)), ("g4_bound(.1,1)", lambda: B.g4_bound(0.1, 1)), ("g4_bound(.1,2)", lambda: B.g4_bound(0.1, 2)),
                   ("g5_failure(0,.1,1,10)", lambda: B.g5_failure(0, 0.1, 1, 10)), ("g5_failure(10,.1,0.5,10)", lambda: B.g5_failure(10, 0.1, 0.5, 10)),
                   ("g5_failure(10,.1,1,0)", lambda: B.g5_failure(10, 0.1, 1, 0)), ("g5_samples(.1,.1,1,10)", lambda: B.g5_samples(0.1, 0.1, 1, 10)),
                   ("g5_samples(0,.1,1,10)", lambda: B.g5_samples(0, 0.1, 1, 10)), ("g5_eta(0)", lambda: B.g5_eta(0)), ("g5_eta(1)", lambda: B.g5_eta(1)),
                   ("g5_eta(-1)", lambda: B.g5_eta(-1)), ("paper_sample_sizes(.1,1,1,1,8,100)", lambda: B.paper_sample_sizes(0.1, 1, 1, 1, 8, 100)),
                   ("paper_sample_sizes(0,1,1,1,8,100)", lambda: B.paper_sample_sizes(0, 1, 1, 1, 8, 100)),
                   ("paper_sample_sizes(.1,1,1,1,0,100)", lambda: B.paper_sample_sizes(0.1, 1, 1, 1, 0, 100)),
                   ("paper_sample_sizes(.1,1,1,1,8,0)", lambda: B.paper_sample_sizes(0.1, 1, 1, 1, 8, 0)),
                   ("product_bound(10,.1,empty...)", lambda: B.product_bound(10, 0.1, np.zeros(0), np.zeros((0, 2)), np.zeros(0), 1, 1)),
                   ("product_bound(10,.1,nan col_sq)", lambda: B.product_bound(10, 0.1, np.full(4, np.nan), np.ones((4, 2)), np.full(4, .25), 1, 1)),
                   ("product_bound(10,.1,p sums 2)", lambda: B.product_bound(10, 0.1, np.ones(4), np.ones((4, 2)), np.full(4, .5), 1, 1)),
                   ("product_bound(10,.1,p=0)", lambda: B.product_bound(10, 0.1, np.ones(4), np.ones((4, 2)), np.zeros(4), 1, 1)),
                   ("product_bound shape mismatch", lambda: B.product_bound(10, 0.1, np.ones(4), np.ones((3, 2)), np.full(4, .25), 1, 1))]:
    probe("theory.bounds", name, name, call)
R = np.random.default_rng(0)
q, k, v = R.standard_normal((3, 12, 4))
for name, call in [("ok", lambda: attention_parameters(q, k, v)), ("nq=0", lambda: attention_parameters(q[:0], k, v)),
                   ("nk=0", lambda: attention_parameters(q, k[:0], v[:0])), ("nq=1,nk=1", lambda: attention_parameters(q[:1], k[:1], v[:1])),
                   ("nq<nk causal", lambda: attention_parameters(q[:5], k, v, causal=True)), ("nq>nk causal", lambda: attention_parameters(q, k[:5], v[:5], causal=True)),
                   ("NaN", lambda: attention_parameters(np.full_like(q, np.nan), k, v)), ("int", lambda: attention_parameters(q.astype(int), k.astype(int), v.astype(int))),
                   ("complex", lambda: attention_parameters(q + 0j, k, v)), ("4-d", lambda: attention_parameters(q[None, None], k[None, None], v[None, None])),
                   ("d mismatch", lambda: attention_parameters(q, k[:, :3], v)), ("1e160", lambda: attention_parameters(q * 1e160, k * 1e160, v)),
                   ("v=0", lambda: attention_parameters(q, k, np.zeros_like(v))), ("float32", lambda: attention_parameters(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))),
                   ("scale=nan", lambda: attention_parameters(q, k, v, scale=float("nan"))), ("mask='x'", lambda: attention_parameters(q, k, v, mask="x")),
                   ("causal='yes'", lambda: attention_parameters(q, k, v, causal="yes"))]:
    probe("theory.attention_parameters", name, f"attention_parameters({name})", call)
a = R.standard_normal((5, 3))
for name, call in [("ok", lambda: spectral_error(a, a + 0.1, 1.0, 1.0)), ("shape mismatch", lambda: spectral_error(a, a[:4], 1.0, 1.0)),
                   ("op_p=0", lambda: spectral_error(a, a + 0.1, 0.0, 1.0)), ("op_v=-1", lambda: spectral_error(a, a + 0.1, 1.0, -1.0)),
                   ("NaN approx", lambda: spectral_error(np.full_like(a, np.nan), a, 1.0, 1.0)), ("empty", lambda: spectral_error(a[:0], a[:0], 1.0, 1.0)),
                   ("1-d", lambda: spectral_error(a[0], a[0] + 1, 1.0, 1.0)), ("4-d", lambda: spectral_error(a[None, None], a[None, None] + 0.1, 1.0, 1.0))]:
    probe("theory.spectral_error", name, f"spectral_error({name})", call)
from hyperref.exact_set import sinks, window
CD = HC(mode="direct", min_seq_len=4, samples=4, query_block=4, exact_set=sinks(1) | window(2))
dd = make_draws(CD, 12, 12, 4, rng=0)
for name, call in [("ok", lambda: direct_moments(q, k, v, 0.5, CD, dd.direct, False)), ("causal", lambda: direct_moments(q, k, v, 0.5, CD, dd.direct, True)),
                   ("draws=Draws (not DirectDraws)", lambda: direct_moments(q, k, v, 0.5, CD, dd, False)),
                   ("draws for other nq", lambda: direct_moments(q[:6], k, v, 0.5, CD, dd.direct, False)),
                   ("recursive config", lambda: direct_moments(q, k, v, 0.5, HC(), dd.direct, False)),
                   ("NaN q", lambda: direct_moments(np.full_like(q, np.nan), k, v, 0.5, CD, dd.direct, False)),
                   ("scale=None", lambda: direct_moments(q, k, v, None, CD, dd.direct, False)),
                   ("nk=0", lambda: direct_moments(q, k[:0], v[:0], 0.5, CD, dd.direct, False)),
                   ("causal='yes'", lambda: direct_moments(q, k, v, 0.5, CD, dd.direct, "yes"))]:
    probe("theory.direct_moments", name, f"direct_moments({name})", call)
dump("res_gpu_theory.json")
