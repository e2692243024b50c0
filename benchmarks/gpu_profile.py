"""Where the time of one HyperAttention forward goes (torch.profiler, CUDA kernel totals)."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import gpu
from hyperref import HyperConfig

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
d = int(sys.argv[2]) if len(sys.argv) > 2 else 64
for causal in (False, True):
    q, k, v = (torch.randn(1, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    run = lambda: gpu.hyper_attention(q, k, v, causal=causal, config=HyperConfig())
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"== n={n} d={d} causal={causal}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
