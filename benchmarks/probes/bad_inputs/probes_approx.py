from harness import *
from harness import inhull as hull_check
import dataclasses
import hyperref
from hyperref import hyper_attention as HA, HyperConfig as HC, make_draws, Draws, BlockDraws
from hyperref.draws import DirectDraws
from hyperref.exact_set import parse_exact_set, sinks, window, sortlsh, blocktop, heavykeys, quest, topk
R = np.random.default_rng(1)
qkv = qkv_maker(R)


def inhull(v, dtype=None):
    return hull_check(v, dtype, tol=1e-5)
SMALL = dict(block=4, samples=4, min_seq_len=4, approxd_samples=4)
CFGS = {"recursive": HC(**SMALL), "recursive-approxd-paper": HC(**SMALL, normalizer="approxd", estimator="paper"),
        "direct": HC(mode="direct", min_seq_len=4, samples=4, query_block=4),
        "direct+exactset": HC(mode="direct", min_seq_len=4, samples=4, query_block=4,
                              exact_set=sinks(2) | window(3) | sortlsh(3, 4, 2) | blocktop(4, 1) | heavykeys(3, 4) | quest(4, 8, 3) | topk(2))}
for engine in ("numpy", "numba"):
    for cname, cfg in CFGS.items():
        fname = f"hyper_attention[{engine},{cname}]"
        f = lambda *a, **k: HA(*a, config=cfg, engine=engine, rng=0, **k)
        for (nq, nk, tag) in [(0, 5, "0 rows"), (3, 0, "0 keys"), (5, 5, "n=5 just above min_seq_len"),
                              (9, 33, "nq<nk"), (33, 9, "nq>nk"), (31, 31, "odd length"), (64, 64, "n=64")]:
            for causal in (False, True):
                q, k, v = qkv(nq, nk)
                chk = (vs(oracle(q, k, v, causal)) if nq == 0 else inhull(v)) if nk else None
                if causal and nq > nk and nk:  # rows that see no key must be 0
                    base = inhull(v)
                    def chk(r, base=base, nq=nq, nk=nk):
                        c, n = base(r[nq-nk:]) if not isinstance(r, tuple) else base(r[0][nq-nk:])
                        z = np.all((r[0] if isinstance(r, tuple) else r)[:nq-nk] == 0)
                        return (c if z else "WRONG"), n + f"; rows with no visible key are 0: {bool(z)}"
                probe(fname, f"{tag} causal={causal}", f"HA(q{q.shape},k{k.shape},causal={causal},config={cname},engine={engine!r})",
                      lambda: f(q, k, v, causal=causal), chk)
        q, k, v = qkv(16, 16, lead=(2, 2))
        probe(fname, "batched (2,2,16,8)", "(B,H)=(2,2)", lambda: f(q, k, v, causal=True), inhull(v))
        q, k, v = qkv(16, 16, lead=(0, 2)); probe(fname, "0 batch", "(0,2,16,8)", lambda: f(q, k, v), vs(np.zeros((0, 2, 16, 8))))
        q = R.standard_normal((1, 4, 16, 8)); k = R.standard_normal((1, 2, 16, 8)); v = R.standard_normal((1, 2, 16, 3))
        probe(fname, "GQA 4/2 heads, dv=3", "(1,4,16,8),(1,2,16,8)", lambda: f(q, k, v, causal=True), inhull(np.repeat(v, 2, 1)))
        q, k, v = qkv(16, 16)
        for val, dt, tag in [(1e19, np.float32, "q,k*1e19 float32"), (1e160, np.float64, "q,k*1e160 float64"), (1e-30, np.float64, "q,k*1e-30")]:
            qq, kk, vv = (q*val).astype(dt), (k*val).astype(dt), v.astype(dt)
            probe(fname, tag, tag, lambda: f(qq, kk, vv, causal=False), inhull(vv, dtype=np.dtype(dt).name))
        for dt in (np.float16, np.float32, np.longdouble):
            qq, kk, vv = (x.astype(dt) for x in (q, k, v))
            probe(fname, f"dtype {np.dtype(dt).name}", f"as {np.dtype(dt).name}", lambda: f(qq, kk, vv, causal=True), inhull(vv))
        vb = (v * 1e38).astype(np.float32)
        probe(fname, "v*1e38 float32", "v*1e38 float32", lambda: f(q.astype(np.float32), k.astype(np.float32), vb), inhull(vb))
        qb = R.standard_normal((40, 16)); kb = R.standard_normal((40, 16)); vbb = R.standard_normal((40, 16))
        qs, ks, vs_ = qb[::2, ::2], kb[::2, ::2], vbb[::2, ::-2]
        probe(fname, "strided/negative-stride", "q[::2,::2],v[::2,::-2]", lambda: f(qs, ks, vs_, causal=True), inhull(vs_))
        # same draws -> same answer for strided vs contiguous
        def same(r, qs=qs, ks=ks, vs_=vs_):
            c = f(np.ascontiguousarray(qs), np.ascontiguousarray(ks), np.ascontiguousarray(vs_), causal=True)
            return ("correct" if np.allclose(r, c, atol=1e-12) else "WRONG"), f"strided == contiguous (same rng): {np.allclose(r, c)}"
        probe(fname, "strided equals contiguous", "same rng=0", lambda: f(qs, ks, vs_, causal=True), same)
        probe(fname, "engine='cuda'", "engine='cuda'", lambda: HA(q, k, v, engine="cuda"))
        probe(fname, "config=dict", "config={}", lambda: HA(q, k, v, config={}, engine=engine))
        probe(fname, "rng=-1", "rng=-1", lambda: HA(q, k, v, config=cfg, engine=engine, rng=-1))
        probe(fname, "rng='a'", "rng='a'", lambda: HA(q, k, v, config=cfg, engine=engine, rng="a"))
        # draws for wrong shape
        dr = make_draws(cfg, 16, 16, 8, rng=0)
        probe(fname, "draws for other causal", "draws(causal=False) on causal call", lambda: f(q, k, v, causal=True, draws=dr))
        probe(fname, "draws=dict", "draws={}", lambda: f(q, k, v, draws={}))
dump("res_approx.json")
