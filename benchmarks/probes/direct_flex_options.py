"""FlexAttention ``kernel_options`` of the block-sparse direct engine, side by side (CUDA).

A script, not a test. B = 1, H = 32, bf16, d = 64, one exact set: the whole call
:func:`hyperref.gpu.direct_flex.direct_flex_attention` timed forward and forward+backward with
each candidate ``kernel_options`` (FlexAttention's tile sizes, warps, stages, TMA), against
cuDNN in the same run. The forward candidates are timed forward only, the backward ones
forward+backward with the default forward. A candidate that does not compile on the installed
torch is reported with its error. Every candidate's output is compared with the default's
(largest absolute difference), since tile sizes change only the order of the sums.

Usage::

    python benchmarks/probes/direct_flex_options.py --n 131072 --exact-set "..." [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpu_bench import bench, fwd_bwd, gaussian  # noqa: E402

from hyperref import HyperConfig  # noqa: E402
from hyperref.exact_set import parse_exact_set  # noqa: E402
from hyperref.gpu.direct_flex import direct_flex_attention  # noqa: E402

ROUTE = "sinks(4) | window(448) | blockkeys(128, 1024, candidates=1024)"

FORWARD = [
    {},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 2},
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"fwd_USE_TMA": True},
]
BACKWARD = [
    {},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
     "bwd_num_warps": 4, "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 8, "bwd_num_stages": 2},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 4, "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 4, "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 128, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 128,
     "bwd_num_warps": 8, "bwd_num_stages": 2},
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--causal", choices=["yes", "no"], default="yes")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--exact-set", default=ROUTE)
    parser.add_argument("--samples", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    causal = args.causal == "yes"
    cfg = HyperConfig(mode="direct", exact_set=parse_exact_set(args.exact_set), samples=args.samples,
                      min_seq_len=1024)
    n, h, d = args.n, args.heads, 64
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "n": n, "causal": causal, "config": cfg.as_dict()}
    print(json.dumps(meta), flush=True)
    q, k, v = gaussian(n, d, h, n + 1)

    def direct(opts):
        gen = torch.Generator("cuda").manual_seed(0)
        return lambda q_, k_, v_: direct_flex_attention(q_, k_, v_, causal=causal, config=cfg, generator=gen,
                                                        kernel_options=opts or None)

    def cudnn(q_, k_, v_):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q_, k_, v_, is_causal=causal)

    base_fwd = bench(lambda: cudnn(q, k, v))
    base_fb = bench(fwd_bwd(cudnn, q, k, v))
    with torch.no_grad():
        ref = direct({})(q, k, v).float()
    rows = []
    for phase, candidates in (("forward", FORWARD), ("backward", BACKWARD)):
        for opts in candidates:
            r = {"phase": phase, "options": opts}
            fn = direct(opts)
            try:
                with torch.no_grad():
                    r["max_abs_diff"] = float((fn(q, k, v).float() - ref).abs().max())
                if phase == "forward":
                    r["fwd_ms"] = bench(lambda: fn(q, k, v))
                    r["fwd_x_cudnn"] = base_fwd / r["fwd_ms"]
                else:
                    r["fwdbwd_ms"] = bench(fwd_bwd(fn, q, k, v))
                    r["fwdbwd_x_cudnn"] = base_fb / r["fwdbwd_ms"]
            except Exception as exc:  # a candidate the installed torch cannot compile
                r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\ncuDNN forward {base_fwd:.2f} ms, forward+backward {base_fb:.2f} ms\n")
    print("| phase | kernel_options | fwd (ms) | × cuDNN | f+b (ms) | × cuDNN | max abs diff vs default | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = lambda key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "-"
        opts = ", ".join(f"{a}={b}" for a, b in r["options"].items()) or "(default)"
        print(f"| {r['phase']} | {opts} | {g('fwd_ms')} | {g('fwd_x_cudnn', '{:.1f}')} | {g('fwdbwd_ms')} | "
              f"{g('fwdbwd_x_cudnn', '{:.1f}')} | {g('max_abs_diff', '{:.2e}')} | {r.get('error', '')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "cudnn_fwd_ms": base_fwd, "cudnn_fwdbwd_ms": base_fb, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
