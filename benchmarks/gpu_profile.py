"""Where the time of one HyperAttention call goes (torch.profiler, CUDA kernel totals).

Usage: ``python benchmarks/gpu_profile.py [n] [d]``: forward, then forward+backward
(from a fixed output gradient), non-causal and causal, B = 1, H = 32, bf16.
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import gpu
from hyperref import HyperConfig

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
d = int(sys.argv[2]) if len(sys.argv) > 2 else 64
for backward in (False, True):
    for causal in (False, True):
        q, k, v = (torch.randn(1, 32, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
        grad = torch.randn_like(q)

        def run():
            out = gpu.hyper_attention(q, k, v, causal=causal, config=HyperConfig())
            if backward:
                torch.autograd.grad(out, (q, k, v), grad)

        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"== n={n} d={d} causal={causal} {'forward+backward' if backward else 'forward'}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22,
                                        max_name_column_width=60))
