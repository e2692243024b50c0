"""A/B timing of implementation switches of gpu/ at one length; prints a table.

Times ``gpu.hyper_attention`` (B = 1, H = 32, bf16, default config), forward and
forward+backward (backward from a fixed output gradient), causal and not, under
each variant of the module switches ``gpu.function.ONE_BLOCK`` (single
interval+sample loop for row tiles inside one sortLSH block) and
``gpu.function.LEAVES`` (who computes the exact causal leaves), next to exact
SDPA under cuDNN and FlashAttention measured in the same run. Optionally sweeps
forward tile configurations of the chosen variant (``--tiles``).

Usage: ``python benchmarks/gpu_ab.py [--n 131072] [--d 64 128] [--tiles] [--bwd-tiles]``
"""

import argparse

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import gpu
from gpu import function
from hyperref import HyperConfig

VARIANTS = {  # name: (ONE_BLOCK, LEAVES)
    "general loops, triton leaves (v3)": (False, "triton"),
    "one-block loop, triton leaves": (True, "triton"),
    "one-block loop, cudnn leaves": (True, "cudnn"),
    "one-block loop, flash leaves": (True, "flash"),
}
BWD_TILES = {"dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3)],
             "dkdv": [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
             "smp": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]}
FWD_TILES = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4),
                  (128, 32, 4, 3)],
             128: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 32, 8, 3), (64, 64, 4, 4),
                   (64, 32, 4, 3)]}


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
    parser.add_argument("--tiles", action="store_true", help="sweep forward tiles")
    parser.add_argument("--bwd-tiles", action="store_true",
                        help="sweep each backward kernel's tiles (non-causal forward+backward)")
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
                function.ONE_BLOCK, function.LEAVES = VARIANTS[name]
                if not causal and name.endswith(("cudnn leaves", "flash leaves")):
                    continue  # no leaves without causality
                f = bench(lambda: gpu.hyper_attention(q, k, v, causal=causal, config=cfg), 200)
                fb = bench(lambda: torch.autograd.grad(gpu.hyper_attention(qg, kg, vg, causal=causal, config=cfg),
                                                       (qg, kg, vg), grad), 400)
                print(f"| {d} | {causal} | {name} | {fmt(f)} | {fmt(fb)} |", flush=True)
        if args.tiles:
            function.ONE_BLOCK, function.LEAVES = True, "cudnn"
            for tiles in FWD_TILES.get(d, []):
                function.TILE_OVERRIDES[("fwd", d, torch.bfloat16)] = tiles
                f = bench(lambda: gpu.hyper_attention(q, k, v, causal=False, config=cfg), 200)
                fc = bench(lambda: gpu.hyper_attention(q, k, v, causal=True, config=cfg), 200)
                print(f"| {d} | tiles {tiles} | fwd non-causal / causal | {fmt(f)} | {fmt(fc)} |", flush=True)
            function.TILE_OVERRIDES.clear()
        if args.bwd_tiles:
            function.ONE_BLOCK, function.LEAVES = True, "cudnn"
            for kernel, configs in BWD_TILES.items():
                for tiles in configs:
                    function.TILE_OVERRIDES[(kernel, d, torch.bfloat16)] = tiles
                    fb = bench(lambda: torch.autograd.grad(gpu.hyper_attention(qg, kg, vg, config=cfg),
                                                           (qg, kg, vg), grad), 300)
                    print(f"| {d} | {kernel} tiles {tiles} | fwd+bwd non-causal | | {fmt(fb)} |", flush=True)
                function.TILE_OVERRIDES.clear()


if __name__ == "__main__":
    main()
