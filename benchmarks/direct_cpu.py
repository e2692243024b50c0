"""The direct mode on the CPU: the NumPy reference, the Numba engine and exact attention (one head).

A script, not a test. One causal head, d = 64, float32, the draws of
:func:`hyperref.make_draws` (the same for both engines), for two exact sets:

* ``causal_lm``: :func:`hyperref.presets.causal_lm` —
  ``sinks(4) | window(256) | heavykeys(64, 256) | quest(8, 2048, 128)``, 128 samples
  per 64-row query block;
* ``no quest``: the same without ``quest`` —
  ``sinks(4) | window(256) | heavykeys(64, 256)``, 128 samples.

Every measurement runs in a fresh subprocess with ``NUMBA_NUM_THREADS`` and the
BLAS threads set to the thread count, one untimed call first (compilation from
the cache, page faults), then the median of ``--repeats`` calls. The reference
(``engine="numpy"``) is measured where its predicted time (``n²`` from the last
measured size) is below ``--reference-cap`` seconds. Exact attention is
:func:`hyperref.exact_attention` (row-blocked BLAS, causal rows skip hidden keys).

Usage::

    python benchmarks/direct_cpu.py [--sizes 2048 8192 32768 65536] [--threads 1 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from cpu_scaling import versions  # the same stamp as the scaling table (run as a script)

CHILD = r"""
import dataclasses, json, sys, time
import numpy as np
from hyperref import exact_attention, hyper_attention, make_draws
from hyperref.exact_set import heavykeys, sinks, window
from hyperref.presets import causal_lm
from hyperref.workloads import planted_workload

n, what, config_name, repeats = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
q, k, v = planted_workload(n, 64, rng=0)
cfg = causal_lm()
if config_name == "no quest":
    cfg = dataclasses.replace(cfg, exact_set=sinks(4) | window(256) | heavykeys(64, 256))
draws = make_draws(cfg, n, n, 64, causal=True, rng=1)
keys = None
if what == "exact":
    call = lambda: exact_attention(q, k, v, causal=True)
else:
    call = lambda: hyper_attention(q, k, v, causal=True, config=cfg, draws=draws, engine=what)
    if what == "numba":
        from hyperref.direct_numba import direct_heads
        one = lambda x: x[None, None]
        batched = make_draws(cfg, n, n, 64, causal=True, batch_shape=(1, 1), rng=1)
        keys = float(direct_heads(one(q), one(k), one(v), 0.125, cfg, batched, True)[2].mean())
if what != "numpy":
    call()  # warm-up: compilation from the cache, first touch of the buffers
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
print(json.dumps({"time": sorted(times)[len(times) // 2], "keys": keys}))
"""

CONFIGS = {"causal_lm": "sinks(4) | window(256) | heavykeys(64, 256) | quest(8, 2048, 128)",
           "no quest": "sinks(4) | window(256) | heavykeys(64, 256)"}


def measure(n, what, config, threads, repeats):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), what, config, str(repeats)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reference-cap", type=float, default=60.0,
                        help="skip the reference where its predicted time exceeds this (s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions(), "d": 64,
               "load_before": os.getloadavg(), "rows": [], "exact": {}}
    threads = sorted(set(args.threads))
    for n in args.sizes:
        for t in threads:
            results["exact"][f"{n}/{t}"] = measure(n, "exact", "causal_lm", t, args.repeats)["time"]
            print(f"# exact n={n} threads={t}: {results['exact'][f'{n}/{t}']:.3f} s", file=sys.stderr,
                  flush=True)
    for name in CONFIGS:
        last_ref = None
        for n in args.sizes:
            row = {"n": n, "config": name, "numba": {}}
            for t in threads:
                got = measure(n, "numba", name, t, args.repeats)
                row["numba"][t], row["keys"] = got["time"], got["keys"]
            predicted = None if last_ref is None else last_ref[1] * (n / last_ref[0]) ** 2
            if predicted is None or predicted <= args.reference_cap:
                row["reference"] = measure(n, "numpy", name, threads[0], 1)["time"]
                last_ref = (n, row["reference"])
            else:
                row["reference"], row["reference_predicted"] = None, predicted
            results["rows"].append(row)
            print(f"# {name} n={n}: {row}", file=sys.stderr, flush=True)
    results["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    v = results["versions"]
    print(f"# The direct mode on the CPU: reference, Numba engine, exact attention\n")
    print(f"{results['date']}: {v.get('cpu')} ({v['cpus']} cpus), Python {v['python']}, numpy {v['numpy']}, "
          f"scipy {v['scipy']}, numba {v['numba']}, BLAS {v.get('blas')}; load average "
          f"{results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after.")
    print(f"One causal head, d = 64, float32, seconds (median of {args.repeats}; the reference: one "
          f"call, {threads[0]} thread). Exact sets: " + "; ".join(f"`{k}` = {e}" for k, e in CONFIGS.items())
          + ", 128 samples per 64-row query block. `keys` is the mean number of keys a query attends.\n")
    head = ["config", "n", "keys", "reference"] + [f"numba {t}t" for t in threads] + \
        [f"exact {t}t" for t in threads] + ["reference / numba", "exact / numba"]
    print("| " + " | ".join(head) + " |")
    print("| --- | " + " | ".join("---:" for _ in head[1:]) + " |")
    t0 = threads[0]
    for r in results["rows"]:
        ref = "—" if r["reference"] is None else f"{r['reference']:.2f}"
        exact = [results["exact"][f"{r['n']}/{t}"] for t in threads]
        cells = [r["config"], str(r["n"]), f"{r['keys']:.0f}", ref] + \
            [f"{r['numba'][t]:.3f}" for t in threads] + [f"{e:.2f}" for e in exact] + \
            ["—" if r["reference"] is None else f"{r['reference'] / r['numba'][t0]:.0f}",
             f"{exact[0] / r['numba'][t0]:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nRatios at {t0} thread. — : the reference is predicted (n², from the last measured size) "
          f"above {args.reference_cap:.0f} s and not run.")
    busy = max(results["load_before"][0], results["load_after"][0])
    if busy > v["cpus"] - 1 and len(threads) > 1:
        print(f"The load average ({busy:.1f}) exceeded {v['cpus'] - 1} on {v['cpus']} cpus: other processes "
              "held the cores, so the columns of more than one thread measure that contention, not "
              "parallel speed.")


if __name__ == "__main__":
    main()
