"""Where the time of one HyperAttention call goes (torch.profiler, CUDA kernel totals).

Usage: ``python benchmarks/probes/gpu_profile.py [n] [d] [--host]``: forward, then
forward+backward (from a fixed output gradient), non-causal and causal, B = 1,
H = 32, bf16. ``--host``: the host side instead — Python functions by own time
(cProfile over 10 forward calls; ``tolist`` is the wait for the GPU at the end)
and the wall time per call.
"""

import cProfile
import datetime
import pstats
import sys
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from hyperref import gpu
from hyperref import HyperConfig

args = [a for a in sys.argv[1:] if not a.startswith("--")]
n = int(args[0]) if args else 131072
d = int(args[1]) if len(args) > 1 else 64
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"{datetime.date.today().isoformat()}; n = {n}, d = {d}, B = 1, H = 32, bf16, HyperConfig()")
if "--host" in sys.argv:
    q, k, v = (torch.randn(1, 32, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        def call():
            gpu.hyper_attention(q, k, v, causal=causal, config=HyperConfig())
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 10 * 1e3
        print(f"== n={n} d={d} causal={causal} forward: {wall:.3f} ms per call (wall, no profiler)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    sys.exit(0)
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
