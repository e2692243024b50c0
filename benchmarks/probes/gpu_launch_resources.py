"""Registers and spills of the Triton kernels as launched on the GPU (not compiled ahead of time).

`gpu_resources.py` compiles the kernels for sm_90 on a CPU machine with int64 strides and the
local Triton; the launched kernels are specialized by the runtime (32-bit strides where they
fit, divisibility) and compiled by the device's Triton, so their register use may differ. This
script runs one forward+backward per (head dim, causal) at ``n`` tokens, then lists every compiled
kernel of the ``hyperref.gpu.kernels_*`` modules with what the loaded binary reports: registers per
thread, spill bytes (local memory per thread), shared memory, warps, stages.

Usage: ``python benchmarks/probes/gpu_launch_resources.py [--n 131072] [--d 64 128]``; prints one
markdown table. Needs a CUDA device.
"""

import argparse
import datetime

import torch
import triton

from hyperref import gpu
from hyperref.gpu import kernels_backward, kernels_forward, kernels_sample, kernels_sort
from hyperref import HyperConfig

MODULES = (kernels_forward, kernels_backward, kernels_sort, kernels_sample)


def compiled(fn):
    """The compiled kernels in the runtime cache of the JIT function ``fn`` (any device)."""
    while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):  # autotuner/heuristics wrappers
        fn = fn.fn
    for caches in getattr(fn, "device_caches", {}).values():
        yield from caches[0].values()


def kernels():
    """Every compiled kernel of the kernel modules, by id: (name, compiled kernel)."""
    found = {}
    for module in MODULES:
        for name in sorted(dir(module)):
            if name.endswith("_kernel"):
                for kernel in compiled(getattr(module, name)):
                    found[id(kernel)] = (name, kernel)
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    args = p.parse_args()
    torch.manual_seed(0)
    table, seen = [], set()
    for d in args.d:
        for causal in (False, True):
            q, k, v = (torch.randn(1, 32, args.n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            out = gpu.hyper_attention(q, k, v, causal=causal, config=HyperConfig())
            out.sum().backward()
            torch.cuda.synchronize()
            for key, (name, kernel) in kernels().items():
                if key in seen:
                    continue
                seen.add(key)
                kernel._init_handles()
                md = kernel.metadata
                table.append((d, causal, name, md.num_warps, md.num_stages, md.shared, kernel.n_regs,
                              kernel.n_spills))
            del q, k, v, out
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; "
          f"one forward+backward per (d, causal), n = {args.n}, B = 1, H = 32, bf16, HyperConfig()")
    print("Each kernel is listed under the first call that compiled it. `local` is the local (spill) memory per "
          "thread the loaded binary reports.")
    print("| d | causal | kernel | warps | stages | shared (B) | registers | local (B) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in table:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
