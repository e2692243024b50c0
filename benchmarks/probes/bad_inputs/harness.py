import os, json, traceback, math
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
from hyperref import InputError
RESULTS = []

def oracle(q, k, v, causal=False, scale=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    nq, nk = q.shape[-2], k.shape[-2]
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.ndim == 4 and k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k = np.repeat(k, g, axis=1); v = np.repeat(v, g, axis=1)
    L = s * (q @ np.swapaxes(k, -1, -2))
    if causal:
        vis = np.arange(nk)[None, :] <= (np.arange(nq)[:, None] + nk - nq)
        L = np.where(vis, L, -np.inf)
    m = L.max(-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)
    P = np.exp(L - m)
    S = P.sum(-1, keepdims=True)
    out = np.where(S > 0, (P @ v) / np.where(S > 0, S, 1), 0)
    return out

def close(a, b, rtol=1e-4, atol=1e-5):
    a = np.asarray(a, dtype=np.float64); b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)

def probe(fn_name, kind, call_str, thunk, check=None):
    """check(result) -> (cls, note) with cls in correct/WRONG/handled."""
    rec = dict(fn=fn_name, kind=kind, call=call_str)
    try:
        r = thunk()
    except InputError as e:
        rec.update(cls="clear error", exc="InputError", msg=str(e)[:200])
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        rec.update(cls="EXC?", exc=type(e).__name__, msg=str(e)[:200], where=where)
    else:
        if check is None:
            rec.update(cls="handled", note=describe(r))
        else:
            try:
                c, note = check(r)
            except Exception as e:
                c, note = "CHECKFAIL", f"{type(e).__name__}: {e}"
            rec.update(cls=c, note=note)
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)
    return rec

def describe(r):
    if isinstance(r, tuple):
        return "(" + ", ".join(describe(x) for x in r) + ")"
    if hasattr(r, "shape") and hasattr(r, "dtype"):
        try:
            a = np.asarray(r.detach().float().cpu() if hasattr(r, "detach") else r)
            fin = bool(np.isfinite(a.astype(np.float64)).all()) if a.size else True
        except Exception:
            fin = "?"
        return f"array{tuple(r.shape)} {r.dtype} finite={fin}"
    return repr(r)[:150]

def vs(ref, rtol=1e-4, atol=1e-5, dtype=None):
    def check(r):
        out = r[0] if isinstance(r, tuple) else r
        a = np.asarray(out.detach().double().cpu() if hasattr(out, "detach") else out)
        if dtype is not None and str(out.dtype) != dtype:
            return "WRONG", f"dtype {out.dtype}, expected {dtype}"
        if a.shape != np.shape(ref):
            return "WRONG", f"shape {a.shape} vs oracle {np.shape(ref)}"
        if not np.isfinite(a.astype(np.float64)).all() and np.isfinite(ref).all():
            return "WRONG", f"non-finite output ({np.isnan(a).sum()} NaN); oracle finite"
        err = float(np.max(np.abs(a.astype(np.float64) - ref))) if a.size else 0.0
        ok = np.allclose(a.astype(np.float64), ref, rtol=rtol, atol=atol)
        return ("correct" if ok else "WRONG"), f"max|err| vs float64 oracle {err:.3g}, dtype {out.dtype}"
    return check

def dump(path):
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)


def qkv_maker(rng):
    """``qkv(nq, nk, d=8, dv=None, dtype=float64, lead=())``: Gaussian q, k, v from ``rng``."""
    def qkv(nq, nk, d=8, dv=None, dtype=np.float64, lead=()):
        dv = d if dv is None else dv
        return (rng.standard_normal(lead + (nq, d)).astype(dtype), rng.standard_normal(lead + (nk, d)).astype(dtype),
                rng.standard_normal(lead + (nk, dv)).astype(dtype))
    return qkv


def inhull(v, dtype=None, tol=1e-4):
    """A check: the output is finite, of ``dtype``, and inside the per-coordinate hull of the rows of ``v``."""
    def check(r):
        out = r[0] if isinstance(r, tuple) else r
        a = np.asarray(out, dtype=np.float64)
        if dtype and str(out.dtype) != dtype: return "WRONG", f"dtype {out.dtype} expected {dtype}"
        if not np.isfinite(a).all(): return "WRONG", f"non-finite output ({np.isnan(a).sum()} NaN)"
        vv = np.asarray(v, dtype=np.float64)
        lo, hi = vv.min(-2, keepdims=True), vv.max(-2, keepdims=True)
        ok = bool(((a >= lo - tol*(1+abs(lo))) & (a <= hi + tol*(1+abs(hi)))).all())
        return ("correct" if ok else "WRONG"), f"invariant: finite, inside convex hull of v rows={ok}, dtype {out.dtype}"
    return check
