from harness import *
import hyperref
from hyperref import exact_attention as EA, hyper_attention as HA, HyperConfig as HC, make_draws
R = np.random.default_rng(0)
qkv = qkv_maker(R)
EXACT = HC(min_seq_len=10**9)

for FN, fname, kw in [(EA, "exact_attention", {}),
                      (HA, "hyper_attention[numpy,exact-limit]", dict(engine="numpy", config=EXACT)),
                      (HA, "hyper_attention[numba,exact-limit]", dict(engine="numba", config=EXACT))]:
    f = lambda *a, FN=FN, kw=kw, **k2: FN(*a, **{**kw, **k2})
    # shapes
    for (nq, nk, tag) in [(0, 5, "0 rows"), (3, 0, "0 keys"), (0, 0, "0 rows and 0 keys"), (1, 1, "length 1"),
                           (3, 7, "nq<nk"), (7, 3, "nq>nk"), (13, 13, "odd length"), (1, 9, "nq=1 nk=9")]:
        for causal in (False, True):
            q, k, v = qkv(nq, nk)
            ref = oracle(q, k, v, causal) if nk or not nq else None
            probe(fname, f"{tag} causal={causal}", f"{fname}(q{q.shape},k{k.shape},v{v.shape},causal={causal})",
                  lambda: f(q, k, v, causal=causal, return_lse=True), vs(ref) if ref is not None else None)
    # batch/heads
    q, k, v = qkv(4, 4, lead=(0, 2)); probe(fname, "0 batch", "(0,2,4,8)", lambda: f(q, k, v), vs(np.zeros((0,2,4,8))))
    q, k, v = qkv(4, 4, lead=(1, 0)); probe(fname, "0 heads", "(1,0,4,8)", lambda: f(q, k, v))
    q = R.standard_normal((1, 4, 5, 8)); k = R.standard_normal((1, 2, 6, 8)); v = R.standard_normal((1, 2, 6, 3))
    probe(fname, "GQA 4q/2kv heads, dv=3", "(1,4,5,8),(1,2,6,8),(1,2,6,3)", lambda: f(q, k, v, causal=True), vs(oracle(q, k, v, True)))
    q = R.standard_normal((1, 3, 5, 8)); k = R.standard_normal((1, 2, 6, 8)); v = k.copy()
    probe(fname, "kv heads not dividing q heads", "3 q heads, 2 kv", lambda: f(q, k, v))
    q, k, v = qkv(4, 4, d=0); probe(fname, "d=0", "(4,0)", lambda: f(q, k, v))
    q, k, v = qkv(4, 4, dv=0); probe(fname, "dv=0", "v (4,0)", lambda: f(q, k, v))
    q, k, v = qkv(4, 4); probe(fname, "d mismatch q/k", "q (4,8) k (4,7)", lambda: f(q, k[:, :7], v))
    probe(fname, "nk != nv", "k (4,8) v (3,8)", lambda: f(q, k, v[:3]))
    probe(fname, "3-d input", "(1,4,8)", lambda: f(q[None], k[None], v[None]))
    probe(fname, "mixed ndim", "q 2-d, k 4-d", lambda: f(q, k[None, None], v[None, None]))
    probe(fname, "1-d input", "(8,)", lambda: f(q[0], k[0], v[0]))
    # values
    for val, dt, tag in [(1e19, np.float32, "entries 1e19 float32"), (1e160, np.float64, "entries 1e160 float64"),
                         (1e-30, np.float64, "entries 1e-30"), (1e-30, np.float32, "entries 1e-30 float32"),
                         (1e4, np.float16, "entries 1e4 float16")]:
        q, k, v = qkv(6, 6)
        qq = (q * val).astype(dt); kk = (k * val).astype(dt); vv = v.astype(dt)
        with np.errstate(all="ignore"):
            try: ref = oracle(qq, kk, vv)
            except Exception: ref = None
        refok = ref is not None and np.isfinite(ref).all()
        probe(fname, tag + " (q,k scaled)", f"q,k = N(0,1)*{val} as {dt.__name__}", lambda: f(qq, kk, vv),
              vs(ref, rtol=1e-2, atol=1e-2) if refok else None)
    q, k, v = qkv(6, 6); vbig = v * 1e19
    probe(fname, "v entries 1e19 float32", "v*1e19 float32", lambda: f(q.astype(np.float32), k.astype(np.float32), vbig.astype(np.float32)),
          vs(oracle(q, k, vbig.astype(np.float32)), rtol=1e-3, atol=0))
    vbig = (v * 1e38).astype(np.float32)
    probe(fname, "v entries 1e38 float32", "v*1e38 float32", lambda: f(q.astype(np.float32), k.astype(np.float32), vbig),
          vs(oracle(q, k, vbig), rtol=1e-3, atol=0))
    for bad in (np.nan, np.inf, -np.inf):
        for which in "qkv":
            q, k, v = qkv(4, 4); dict(q=q, k=k, v=v)[which][1, 2] = bad
            probe(fname, f"{bad} in {which}", f"{which}[1,2]={bad}", lambda: f(q, k, v))
    # dtypes
    for dt in [np.float16, np.float32, np.float64, np.longdouble, np.int64, np.complex128, np.bool_, object]:
        q, k, v = qkv(5, 5)
        qq, kk, vv = (x.astype(dt) for x in (q, k, v))
        ok = np.issubdtype(np.dtype(dt), np.floating)
        want = {np.float16: "float32"}.get(dt)
        probe(fname, f"dtype {np.dtype(dt)}", f"q,k,v as {np.dtype(dt)}", lambda: f(qq, kk, vv),
              vs(oracle(qq, kk, vv), rtol=3e-3 if dt == np.float16 else 1e-5, atol=3e-3 if dt == np.float16 else 1e-6) if ok else None)
    q, k, v = qkv(5, 5)
    probe(fname, "mixed dtypes f32/f64", "q f32, k,v f64", lambda: f(q.astype(np.float32), k, v), vs(oracle(q.astype(np.float32), k, v), dtype="float64"))
    probe(fname, "python lists", "lists", lambda: f(q.tolist(), k.tolist(), v.tolist()), vs(oracle(q, k, v)))
    qb = R.standard_normal((10, 16)); kb = R.standard_normal((12, 16)); vb = R.standard_normal((12, 6))
    qs, ks, vs_ = qb[::2, ::2], kb[::2, ::2], vb[::2, ::-2]
    probe(fname, "non-contiguous strided (::2, negative)", "q[::2,::2], v[::2,::-2]", lambda: f(qs, ks, vs_, causal=True), vs(oracle(qs, ks, vs_, True)))
    qt = np.asfortranarray(qs); probe(fname, "Fortran-order", "asfortranarray", lambda: f(qt, ks, vs_), vs(oracle(qt, ks, vs_)))
    qbr = np.broadcast_to(qb[:1], (5, 16)); kbr = np.broadcast_to(kb[:1], (5, 16))
    probe(fname, "broadcast (stride-0) arrays", "np.broadcast_to", lambda: f(qbr, kbr, vb[:5]), vs(oracle(qbr, kbr, vb[:5])))
    # scale / flags
    q, k, v = qkv(5, 5)
    for sc in [0.0, -1.0, 1e300, float("nan"), float("inf"), "1", True, np.float32(0.5), 3]:
        chk = None
        if isinstance(sc, (int, float, np.floating)) and not isinstance(sc, bool) and np.isfinite(sc) and abs(sc) < 1e10:
            chk = vs(oracle(q, k, v, scale=float(sc)))
        probe(fname, f"scale={sc!r}", f"scale={sc!r}", lambda: f(q, k, v, scale=sc), chk)
    for cv in ["yes", 1, None, np.True_]:
        probe(fname, f"causal={cv!r}", f"causal={cv!r}", lambda: f(q, k, v, causal=cv),
              vs(oracle(q, k, v, True)) if cv is np.True_ else None)
    probe(fname, "return_lse=1", "return_lse=1", lambda: f(q, k, v, return_lse=1))
    # lse check
    def lsecheck(r, q=q, k=k):
        L = (q @ k.T) / math.sqrt(8); m = L.max(1)
        ref = m + np.log(np.exp(L - m[:, None]).sum(1))
        return ("correct" if np.allclose(r[1], ref) else "WRONG"), f"lse max err {np.max(abs(r[1]-ref)):.2g}"
    probe(fname, "lse vs oracle", "return_lse=True", lambda: f(q, k, v, return_lse=True), lsecheck)
dump("res_core.json")
