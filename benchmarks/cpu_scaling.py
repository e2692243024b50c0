"""CPU scaling of HyperAttention against exact float32 attention (one head, d = 64).

A script, not a test. Each (n, causal) point runs in a fresh subprocess so
that its peak memory (Linux VmHWM, reset through /proc/self/clear_refs just
before the call) belongs to that call alone. Exact attention is the row-blocked
BLAS reference (:func:`hyperref.exact_attention`, float32, causal rows skip
the hidden keys); when its predicted time exceeds ``--exact-cap`` seconds it is
skipped and extrapolated as ``n²`` from the last measured size (marked ``*``).

Usage::

    python benchmarks/cpu_scaling.py [--max-n 131072] [--exact-cap 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np
from hyperref import HyperConfig, exact_attention, hyper_attention, make_draws
from hyperref.workloads import planted_workload

n, causal, what, engine, repeats = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5])
q, k, v = planted_workload(n, 64, rng=0)
cfg = HyperConfig()
draws = make_draws(cfg, n, n, 64, causal=causal, rng=1)
if what == "hyper":  # compile and warm up: one untimed call of the measured call
    hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, engine=engine)

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
before = rss("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    if what == "hyper":
        hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws, engine=engine)
    else:
        exact_attention(q, k, v, causal=causal)
    times.append(time.perf_counter() - t0)
print(json.dumps({"time": sorted(times)[len(times) // 2], "peak": rss("VmHWM:"), "before": before}))
"""


def measure(n, causal, what, engine, repeats):
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), "1" if causal else "0", what,
                          engine, str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_exponent(ns, ts):
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def versions():
    """The machine and library versions a CPU benchmark table is stamped with."""
    import numba
    import numpy
    import scipy

    import hyperref

    info = {"python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
            "numba": numba.__version__, "hyperref": getattr(hyperref, "__version__", "?"),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import threadpoolctl

        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        info["blas"] = ", ".join(f"{p['internal_api']} {p['version']}" for p in blas) or "?"
    except Exception:  # pragma: no cover - informational only
        info["blas"] = "?"
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-n", type=int, default=4096)
    parser.add_argument("--max-n", type=int, default=131072)
    parser.add_argument("--exact-cap", type=float, default=300.0,
                        help="skip exact attention when its predicted time exceeds this (s)")
    parser.add_argument("--engine", default="numba", choices=["numba", "numpy"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    ns = []
    n = args.min_n
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    results = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "engine": args.engine,
               "d": 64, "config": "HyperConfig() defaults (bits 7, block 256, samples 256, "
               "min_seq_len 4096, masked/rownorm/self)", "rows": []}
    for causal in (False, True):
        last_exact = None
        for n in ns:
            hyper = measure(n, causal, "hyper", args.engine, args.repeats)
            row = {"n": n, "causal": causal, "time_hyper_s": hyper["time"],
                   "peak_rss_mib": hyper["peak"] / 2**20,
                   "extra_mib": (hyper["peak"] - hyper["before"]) / 2**20}
            predicted = None if last_exact is None else last_exact[1] * (n / last_exact[0]) ** 2
            if predicted is not None and predicted > args.exact_cap:
                row["time_exact_s"], row["exact_extrapolated"] = predicted, True
            else:
                exact = measure(n, causal, "exact", args.engine, 1)
                row["time_exact_s"], row["exact_extrapolated"] = exact["time"], False
                last_exact = (n, exact["time"])
            row["ratio"] = row["time_exact_s"] / row["time_hyper_s"]
            results["rows"].append(row)
            print(f"# measured n={n} causal={causal}: {row}", file=sys.stderr, flush=True)
    for causal in (False, True):
        rows = [r for r in results["rows"] if r["causal"] == causal]
        prev = None
        for r in rows:
            r["local_exponent"] = (math.log(r["time_hyper_s"] / prev["time_hyper_s"]) /
                                   math.log(r["n"] / prev["n"])) if prev else None
            prev = r
        sel = [r for r in rows if 16384 <= r["n"] <= 131072]
        if len(sel) >= 2:
            key = "exponent_causal" if causal else "exponent_noncausal"
            results[key] = fit_exponent([r["n"] for r in sel], [r["time_hyper_s"] for r in sel])
    if args.json:
        print(json.dumps(results, indent=2))
        return
    v = results["versions"]
    print(f"CPU scaling, {results['date']}: {v.get('cpu')} ({v['cpus']} cpus, {v.get('mem_gib')} GiB), "
          f"Python {v['python']}, numpy {v['numpy']}, scipy {v['scipy']}, numba {v['numba']}")
    print(f"engine {results['engine']}, one head, d = 64, float32, {results['config']}")
    print()
    print("| causal | n | HyperAttention (s) | exact float32 (s) | ratio | peak RSS (MiB) | extra (MiB) | local exponent |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results["rows"]:
        star = "*" if r["exact_extrapolated"] else ""
        le = "" if r["local_exponent"] is None else f"{r['local_exponent']:.2f}"
        print(f"| {r['causal']} | {r['n']} | {r['time_hyper_s']:.3f} | {r['time_exact_s']:.2f}{star} | "
              f"{r['ratio']:.1f} | {r['peak_rss_mib']:.0f} | {r['extra_mib']:.0f} | {le} |")
    print()
    for key in ("exponent_noncausal", "exponent_causal"):
        if key in results:
            print(f"fitted growth exponent {key.split('_')[1]} (n = 16384 … 131072): {results[key]:.3f}")
    print("* exact time extrapolated as n² from the last measured size")


if __name__ == "__main__":
    main()
