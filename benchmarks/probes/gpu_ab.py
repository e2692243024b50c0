"""A/B timing of implementation switches of gpu/ at one length; prints a table.

Times ``hyperref.gpu.hyper_attention`` (B = 1, H = 32, bf16, default config), forward and
forward+backward (backward from a fixed output gradient), causal and not, under
each variant of the kernel options (:class:`hyperref.gpu.KernelOptions`) ``one_block`` (single
interval+sample loop for row tiles inside one sortLSH block), ``leaves`` (who computes the
exact causal leaves) and ``counting_bits`` (0: radix sort of the LSH sort keys; 8: counting
sort of the buckets for up to 8 bits), next to exact
SDPA under cuDNN and FlashAttention measured in the same run. Tile sweeps:
``benchmarks/probes/gpu_tiles.py``.

Usage: ``python benchmarks/probes/gpu_ab.py [--n 131072] [--d 64 128] [--variants NAME ...]``
"""

import argparse

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from hyperref import gpu
from hyperref import HyperConfig

VARIANTS = {  # name: kernel options
    "general loops, triton leaves (v3)": gpu.KernelOptions(one_block=False, leaves="triton", counting_bits=0),
    "one-block loop, triton leaves": gpu.KernelOptions(leaves="triton"),
    "one-block loop, cudnn leaves, radix sort (v4)": gpu.KernelOptions(counting_bits=0),
    "one-block loop, cudnn leaves, counting sort": gpu.KernelOptions(),
    "one-block loop, flash leaves": gpu.KernelOptions(leaves="flash"),
}


def bench(fn, rep):
    try:
        return triton.testing.do_bench(fn, warmup=5, rep=rep)
    except Exception as exc:  # noqa: BLE001 - report, keep going
        return f"failed: {type(exc).__name__}: {str(exc)[:80]}"


def fmt(t):
    return t if isinstance(t, str) else f"{t:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    cfg = HyperConfig()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"n = {args.n}, B = 1, H = 32, bf16")
    print("| d | causal | what | fwd (ms) | fwd+bwd (ms) |")
    print("| ---: | --- | --- | ---: | ---: |")
    for d in args.d:
        q, k, v = (torch.randn(1, 32, args.n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        grad = torch.randn_like(q)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        for causal in (False, True):
            for name, backend in (("exact cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("exact flash", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(backend):
                    f = bench(lambda: sdpa(q, k, v, is_causal=causal), 300)
                    fb = bench(lambda: torch.autograd.grad(sdpa(qg, kg, vg, is_causal=causal),
                                                           (qg, kg, vg), grad), 600)
                print(f"| {d} | {causal} | {name} | {fmt(f)} | {fmt(fb)} |", flush=True)
            for name in args.variants:
                options = VARIANTS[name]
                if not causal and "flash leaves" in name:
                    continue  # no leaves without causality (the cudnn variants differ in the sort)
                f = bench(lambda: gpu.hyper_attention(q, k, v, causal=causal, config=cfg, kernel_options=options), 200)
                fb = bench(lambda: torch.autograd.grad(gpu.hyper_attention(qg, kg, vg, causal=causal, config=cfg,
                                                                           kernel_options=options),
                                                       (qg, kg, vg), grad), 400)
                print(f"| {d} | {causal} | {name} | {fmt(f)} | {fmt(fb)} |", flush=True)


if __name__ == "__main__":
    main()
