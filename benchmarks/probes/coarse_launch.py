"""Launch parameters of the blockkeys coarse kernel, side by side (CUDA).

A script, not a test. B = 1, H = 32, bf16, d = 64, Gaussian inputs, key blocks of 128,
row blocks of 128: :func:`hyperref.gpu.direct_kernels.block_key_rep_lse` (the coarse
kernel and its split merge) timed with each candidate launch (rows per program ``BR``,
warps, pipeline stages), for
the mass and the peaks rule and for 2 and 4 representatives per row block. Every
candidate's normalizers are compared with the default launch's (largest absolute
difference over the finite entries, and whether the −inf pattern is the same).

``--splits``: instead, the choice the engine runs with the peaks rule,
:func:`hyperref.gpu.direct_kernels.block_key_peak_top` (the coarse kernel with running lists,
the split merge, the selection), at each ``split_keys`` (keys per split of the key axis, at
most 32 splits), eight blocks per row block; every choice compared with the default's (equal
or not).

Usage::

    python benchmarks/probes/coarse_launch.py [--n 131072] [--splits] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpu_bench import bench, gaussian  # noqa: E402

from hyperref.exact_set import BlockKeys  # noqa: E402
from hyperref.gpu import direct_kernels as K  # noqa: E402
from hyperref.gpu.direct_select import _rep_rows  # noqa: E402


def compare(ref, got):
    same_inf = bool(torch.equal(torch.isinf(ref), torch.isinf(got)))
    fin = torch.isfinite(ref) & torch.isfinite(got)
    diff = float((ref[fin] - got[fin]).abs().max()) if fin.any() else 0.0
    return diff, same_inf


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--window", type=int, default=513)
    parser.add_argument("--splits", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.splits:
        return splits(args)
    launches = [{"BR": br, "num_warps": w, "num_stages": st}
                for br, w, st in itertools.product([64, 128], [4, 8], [2, 3, 4])]
    rows = []
    for n in args.n:
        q, k, _ = gaussian(n, 64, args.heads, n)
        for reps, peaks in [(2, True), (4, True), (2, False)]:
            part = BlockKeys(block=128, keep=1024, reps=reps, candidates=1024, key_block=128, peaks=peaks)
            rr = _rep_rows(part, n, q.device)
            cov = (4, args.window)

            def run(launch):
                return K.block_key_rep_lse(q, k, rr, 128, 128, 64 ** -0.5, True, cov, launch=launch, peaks=peaks)
            ref = run(None)
            for launch in ([None] + launches if peaks or reps == 2 else [None]):
                row = {"n": n, "reps": reps, "peaks": peaks, "launch": launch or "default"}
                try:
                    got = run(launch)
                    row["ms"] = bench(lambda: run(launch))
                    d1, s1 = compare(ref[0], got[0])
                    d2, s2 = compare(ref[1], got[1])
                    row["max_diff"] = max(d1, d2)
                    row["same_inf"] = s1 and s2
                except Exception as e:  # noqa: BLE001 - a launch the device cannot take is reported
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
            del ref
            torch.cuda.empty_cache()
    print("\n| n | reps | peaks | launch | ms | max diff | same −inf |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
        print(f"| {r['n']} | {r['reps']} | {r['peaks']} | {r['launch']} | {ms} | {r.get('max_diff', '')} | "
              f"{r.get('same_inf', '')} |")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


SPLIT_KEYS = [2048, 4096, 8192, 16384, 32768, 1 << 30]


def splits(args):
    rows = []
    for n in args.n:
        q, k, _ = gaussian(n, 64, args.heads, n)
        for reps in (2, 4):
            part = BlockKeys(block=128, keep=1024, reps=reps, candidates=1024, key_block=128, peaks=True)
            rr = _rep_rows(part, n, q.device)
            cov = (4, args.window)

            def run(launch):
                return K.block_key_peak_top(q, k, rr, 128, 128, 8, 64 ** -0.5, True, cov, launch=launch)
            ref = run(None)
            for keys in SPLIT_KEYS:
                launch = {"split_keys": keys}
                row = {"n": n, "reps": reps, "split_keys": keys, "splits": K._splits(n, 128, launch)[0]}
                row["same_choice"] = bool(torch.equal(run(launch), ref))
                row["ms"] = bench(lambda: run(launch))
                print(json.dumps(row), flush=True)
                rows.append(row)
            del ref
            torch.cuda.empty_cache()
    import datetime

    import triton
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today().isoformat()}; B = 1, H = {args.heads}, bf16, d = 64, causal, W {args.window}\n")
    print("| n | reps | split_keys | splits | ms | same choice as the default |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['reps']} | {r['split_keys']} | {r['splits']} | {r['ms']:.3f} | {r['same_choice']} |")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
