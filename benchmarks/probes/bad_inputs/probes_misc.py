from harness import *
import dataclasses
from hyperref import hyper_attention as HA, HyperConfig as HC, make_draws, Draws, BlockDraws
from hyperref.draws import DirectDraws
from hyperref.exact_set import parse_exact_set, sinks, window, sortlsh, blocktop, heavykeys, quest, topk
import hyperref.theory.bounds as B
from hyperref.theory.parameters import attention_parameters, spectral_error
from hyperref.theory.self_normalized import direct_moments
R = np.random.default_rng(2)
q, k, v = R.standard_normal((3, 16, 8))
# 1e19 approxd detail
cfg = HC(block=4, samples=4, min_seq_len=4, approxd_samples=4, normalizer="approxd", estimator="paper")
with np.errstate(all="ignore"):
    o = HA((q*1e19).astype(np.float32), (k*1e19).astype(np.float32), v.astype(np.float32), config=cfg, engine="numpy", rng=0)
print("approxd 1e19 f32: #inf", int(np.isinf(o).sum()), "of", o.size)
with np.errstate(all="ignore"):
    o64 = HA(q*1e19, k*1e19, v, config=cfg, engine="numpy", rng=0)
print("approxd 1e19 f64 same data: max|out|", float(np.abs(o64).max()), "max|v|", float(np.abs(v).max()))
# HyperConfig
for kw in [dict(block=1), dict(samples=1), dict(block=2**40), dict(samples=2**40), dict(bits=30), dict(bits=31), dict(bits=0),
           dict(min_seq_len=2**62), dict(query_block=1), dict(block=0), dict(samples=0), dict(mode="direct", samples=0),
           dict(block=2.0), dict(block=True), dict(block=np.int64(4)), dict(kappa=0.5), dict(kappa=float("nan")), dict(kappa=True),
           dict(mode="foo"), dict(estimator="x"), dict(exact_set=sinks(2)), dict(exact_set="sinks(2)", mode="direct"),
           dict(mode="direct", normalizer="approxd"), dict(approxd_samples=0)]:
    probe("HyperConfig", str(kw), f"HyperConfig(**{kw})", lambda: HC(**kw))
def run_cfg(name, cfg, n=16, causal=False, d=8, exactlimit=False):
    qq, kk, vv = R.standard_normal((3, n, d))
    def chk(r):
        a = np.asarray(r)
        if exactlimit: return vs(oracle(qq, kk, vv, causal))(r)
        ok = np.isfinite(a).all() and (a >= vv.min(0) - 1e-9).all() and (a <= vv.max(0) + 1e-9).all()
        return ("correct" if ok else "WRONG"), f"invariant finite & in hull: {ok}"
    for eng in ("numpy", "numba"):
        probe(f"hyper_attention[{eng}] extreme config", name + f" causal={causal}", f"HA(n={n}, config={name}, causal={causal}, engine={eng})",
              lambda: HA(qq, kk, vv, config=cfg, causal=causal, engine=eng, rng=0), chk)
for causal in (False, True):
    run_cfg("block=1,samples=1,min_seq_len=1", HC(block=1, samples=1, min_seq_len=1, approxd_samples=1), causal=causal)
    run_cfg("block=2**40,min_seq_len=4", HC(block=2**40, min_seq_len=4), causal=causal)
    run_cfg("block=16(>=n),min_seq_len=4 (exact mask)", HC(block=16, samples=4, min_seq_len=4), causal=causal)
    run_cfg("samples=2**40,min_seq_len=4", HC(samples=2**40, block=4, min_seq_len=4), causal=causal)
    run_cfg("bits=30,min_seq_len=4", HC(bits=30, block=4, samples=4, min_seq_len=4), causal=causal)
    run_cfg("min_seq_len=2**62", HC(min_seq_len=2**62), causal=causal, exactlimit=True)
    run_cfg("direct query_block=1", HC(mode="direct", query_block=1, min_seq_len=4, samples=2), causal=causal)
    run_cfg("direct query_block=2**40", HC(mode="direct", query_block=2**40, min_seq_len=4, samples=2), causal=causal)
    run_cfg("direct samples=0", HC(mode="direct", samples=0, min_seq_len=4, exact_set=window(2)), causal=causal)
    run_cfg("direct samples=0 exact_set=sinks(1)", HC(mode="direct", samples=0, min_seq_len=4, exact_set=sinks(1)), causal=causal)
    run_cfg("direct window(2**40)", HC(mode="direct", samples=2, min_seq_len=4, exact_set=window(2**40)), causal=causal)
    run_cfg("direct sortlsh(30,1,1)", HC(mode="direct", samples=2, min_seq_len=4, exact_set=sortlsh(30, 1, 1)), causal=causal)
# make_draws
C = HC(block=4, samples=4, min_seq_len=4, approxd_samples=4)
for args, kw, tag in [((C, 16, 16, 8), {}, "ok"), ((C, 0, 16, 8), {}, "nq=0"), ((C, 16, 0, 8), {}, "nk=0"), ((C, 16, 16, 0), {}, "d=0"),
                      ((C, -1, 16, 8), {}, "nq=-1"), ((C, 16.0, 16, 8), {}, "nq float"), ((C, True, 16, 8), {}, "nq bool"),
                      ((C, 16, 16, 8), dict(batch_shape=(2,)), "batch_shape (2,)"), ((C, 16, 16, 8), dict(batch_shape=(2, 3, 4)), "batch_shape 3-d"),
                      ((C, 16, 16, 8), dict(batch_shape=5), "batch_shape int"), ((C, 16, 16, 8), dict(batch_shape=(-1, 2)), "batch_shape negative"),
                      ((C, 16, 16, 8), dict(batch_shape=(0, 2)), "batch_shape (0,2)"), ((C, 16, 16, 8), dict(rng=-1), "rng=-1"),
                      (({}, 16, 16, 8), {}, "config dict"), ((C, 16, 16, 8), dict(causal="yes"), "causal str"),
                      ((HC(approxd_samples=2**40, block=4, samples=4, min_seq_len=4), 16, 16, 8), {}, "approxd_samples=2**40"),
                      ((HC(samples=2**40, block=4, min_seq_len=4), 16, 16, 8), {}, "samples=2**40")]:
    probe("make_draws", tag, f"make_draws(*{args[1:]}, **{kw})", lambda: make_draws(*args, **kw))
# make_draws with batch_shape (2,) then used
dr = make_draws(C, 16, 16, 8, batch_shape=(2,), rng=0)
probe("hyper_attention+draws", "draws with batch_shape (2,) on single-head call", "HA(draws=make_draws(batch_shape=(2,)))", lambda: HA(q, k, v, config=C, draws=dr))
# hand-built draws
base = make_draws(C, 16, 16, 8, rng=0); bd = base.blocks[""]
def hb(tag, **repl):
    nb = dataclasses.replace(bd, **repl)
    d2 = dataclasses.replace(base, blocks={"": nb})
    for eng in ("numpy", "numba"):
        def chk(r):
            a = np.asarray(r); ok = np.isfinite(a).all() and (a >= v.min(0) - 1e-9).all() and (a <= v.max(0) + 1e-9).all()
            return ("correct" if ok else "WRONG"), f"accepted; invariant finite & in hull: {ok}"
        probe(f"hyper_attention+hand-built BlockDraws[{eng}]", tag, f"BlockDraws({tag})", lambda: HA(q, k, v, config=C, draws=d2, engine=eng), chk)
hb("sample_u = 1.0", sample_u=np.ones(4))
hb("sample_u = 1.5", sample_u=np.full(4, 1.5))
hb("sample_u = -0.5", sample_u=np.full(4, -0.5))
hb("sample_u NaN", sample_u=np.full(4, np.nan))
hb("sample_u wrong length 3", sample_u=np.full(3, 0.5))
hb("sample_u int dtype", sample_u=np.zeros(4, dtype=np.int64))
hb("approxd_cols out of range 99", approxd_cols=np.full(4, 99))
hb("approxd_cols negative -1", approxd_cols=np.full(4, -1))
hb("approxd_rows out of range 99", approxd_rows=np.full(4, 99))
hb("lsh_planes wrong shape (8,3)", lsh_planes=np.zeros((8, 3)))
hb("lsh_planes NaN", lsh_planes=np.full((8, 7), np.nan))
hb("lsh_planes all zero", lsh_planes=np.zeros((8, 7)))
hb("lsh_planes list", lsh_planes=np.zeros((8, 7)).tolist())
# approxd config with bad draws
Ca = HC(block=4, samples=4, min_seq_len=4, approxd_samples=4, normalizer="approxd")
ba = make_draws(Ca, 16, 16, 8, rng=0)
for tag, repl in [("approxd_cols 99", dict(approxd_cols=np.full(4, 99))), ("approxd_rows 99", dict(approxd_rows=np.full(4, 99))),
                  ("approxd_rows -1", dict(approxd_rows=np.full(4, -1))), ("approxd_cols -100", dict(approxd_cols=np.full(4, -100)))]:
    d2 = dataclasses.replace(ba, blocks={"": dataclasses.replace(ba.blocks[""], **repl)})
    for eng in ("numpy", "numba"):
        probe(f"hyper_attention+hand-built BlockDraws[{eng}]", f"normalizer=approxd, {tag}", f"approxd + {tag}", lambda: HA(q, k, v, config=Ca, draws=d2, engine=eng))
probe("Draws", "blocks missing key ''", "Draws(..., blocks={})", lambda: HA(q, k, v, config=C, draws=dataclasses.replace(base, blocks={})))
probe("Draws", "blocks={'': 'x'}", "blocks={'':'x'}", lambda: HA(q, k, v, config=C, draws=dataclasses.replace(base, blocks={"": "x"})))
probe("Draws", "BlockDraws nq/nk fields lie (99)", "BlockDraws(nq=99)", lambda: HA(q, k, v, config=C, draws=dataclasses.replace(base, blocks={"": dataclasses.replace(bd, nq=99, nk=99)})))
# direct draws
CD = HC(mode="direct", min_seq_len=4, samples=4, query_block=4, exact_set=sinks(1) | sortlsh(3, 4, 1) | heavykeys(2, 4))
dd = make_draws(CD, 16, 16, 8, rng=0); D = dd.direct
def hd(tag, **repl):
    d2 = dataclasses.replace(dd, direct=dataclasses.replace(D, **repl))
    def chk(r):
        a = np.asarray(r); ok = np.isfinite(a).all() and (a >= v.min(0) - 1e-9).all() and (a <= v.max(0) + 1e-9).all()
        return ("correct" if ok else "WRONG"), f"accepted; invariant finite & in hull: {ok}"
    probe("hyper_attention+hand-built DirectDraws", tag, f"DirectDraws({tag})", lambda: HA(q, k, v, config=CD, draws=d2), chk)
hd("sample_u=1.0", sample_u=np.ones_like(D.sample_u))
hd("sample_u=2.0", sample_u=np.full_like(D.sample_u, 2.0))
hd("sample_u=-1", sample_u=np.full_like(D.sample_u, -1.0))
hd("sample_u NaN", sample_u=np.full_like(D.sample_u, np.nan))
hd("sample_u wrong shape (2,4)", sample_u=np.full((2, 4), 0.5))
hd("heavykeys rows out of range 99", exact=(D.exact[0], D.exact[1], np.full_like(D.exact[2], 99)))
hd("heavykeys rows -1", exact=(D.exact[0], D.exact[1], np.full_like(D.exact[2], -1)))
hd("sortlsh planes wrong shape", exact=(D.exact[0], np.zeros((1, 8, 2)), D.exact[2]))
hd("exact tuple too short", exact=(None,))
probe("Draws", "direct=None for direct config", "Draws(direct=None)", lambda: HA(q, k, v, config=CD, draws=dataclasses.replace(dd, direct=None)))
# exact_set parts / parser
for txt in ["sinks(4) | window(256)", "sinks(4) | sortlsh(bits=7, block=64, rounds=2, centred=True)", "", "   ", None, 5, "sinks(-1)", "sinks(0)",
            "sinks(4.5)", "sinks()", "sinks(1,2)", "foo(3)", "sinks(4) |", "sinks(x=3)", "window(2**40)", "sortlsh(31, 4, 1)", "sortlsh(0, 4, 1)",
            "quest(16, 8, 4)", "topk(0)", "sinks(1e3)", "SINKS(4)", "sinks(4)|window(3)|sinks(4)", "sinks(True)", "sortlsh(7,64,2,centred=1)",
            "sinks(99999999999999999999999)", "heavykeys(0, 4)", "blocktop(4, 0)"]:
    probe("parse_exact_set", repr(txt), f"parse_exact_set({txt!r})", lambda: parse_exact_set(txt))
for call in ["sinks(-1)", "sinks(0)", "sinks(2.0)", "sinks(True)", "window(0)", "window(-3)", "sortlsh(31)", "sortlsh(30)", "sortlsh(0)", "sortlsh(7, 0)",
             "sortlsh(7, 64, 0)", "sortlsh(7,64,1,centred='yes')", "blocktop(0)", "blocktop(4, 0)", "heavykeys(0)", "heavykeys(4, 0)",
             "quest(0)", "quest(16, 8)", "quest(16, 16, 0)", "topk(0)", "topk(-1)", "topk('3')", "sinks(2) | 3", "sinks(2**40)"]:
    probe("exact_set constructors", call, call, lambda: eval(call))
dump("res_misc.json")
