"""What the gathers through the sortLSH permutations cost the fused forward kernel.

The forward kernel (:mod:`hyperref.gpu.kernels_forward`) reads each row tile's
queries and its block's keys through the permutations of the sort, so a tile's
rows lie anywhere in the head. Rows that all hash to one bucket keep their
original order (the counting sort is stable): the permutations are the
identity, every gathered tile is contiguous, and the kernel runs the same
instructions on the same number of keys. The difference of the two kernel times
is what the scattered reads cost, an upper bound on what sorted copies of Q, K and
V (read as contiguous tiles) could gain. The sampled keys stay random in both.

Usage: ``python benchmarks/probes/gpu_gather_locality.py [--n N] [--d D] [--json PATH]``;
B = 1, H = 32, bf16, ``HyperConfig()`` defaults, forward. "aligned" inputs are
``c + 1e-3·noise`` for one random vector ``c`` (every row in one bucket).
"""

import argparse
import datetime
import json

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from hyperref import HyperConfig, gpu


def kernel_times(call):
    """CUDA time (ms) per kernel name of one call (after warm-up)."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
            if e.self_device_time_total > 0}


def inputs(kind, n, d, gen):
    shape = (1, 32, n, d)
    if kind == "gaussian":
        return [torch.randn(shape, device="cuda", generator=gen).bfloat16() for _ in range(3)]
    c = torch.randn(1, 1, 1, d, device="cuda", generator=gen)
    q, k = (c + 1e-3 * torch.randn(shape, device="cuda", generator=gen) for _ in range(2))
    return [q.bfloat16(), k.bfloat16(), torch.randn(shape, device="cuda", generator=gen).bfloat16()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"NVIDIA {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.date.today().isoformat()}; n = {args.n}, d = {args.d}, B = 1, H = 32, bf16, "
          f"HyperConfig(), forward\n")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for causal in (False, True):
        for kind in ("gaussian", "aligned"):
            q, k, v = inputs(kind, args.n, args.d, gen)
            times = kernel_times(lambda: gpu.hyper_attention(q, k, v, causal=causal, config=HyperConfig()))
            fwd = sum(t for name, t in times.items() if "_fwd_kernel" in name)
            wall = triton.testing.do_bench(lambda: gpu.hyper_attention(q, k, v, causal=causal,
                                                                       config=HyperConfig()))
            rows.append(dict(causal=causal, inputs=kind, fwd_kernel_ms=fwd, call_ms=wall,
                             kernels=dict(sorted(times.items(), key=lambda kv: -kv[1])[:8])))
    print("| causal | inputs | forward kernel (ms, CUDA) | whole call (ms, do_bench) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'yes' if r['causal'] else 'no'} | {r['inputs']} | {r['fwd_kernel_ms']:.3f} | {r['call_ms']:.3f} |")
    for r in rows:
        print(f"\n{'causal' if r['causal'] else 'non-causal'}, {r['inputs']}: "
              + ", ".join(f"{name[:40]} {t:.3f}" for name, t in r["kernels"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, date=datetime.date.today().isoformat(),
                           n=args.n, d=args.d, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
