"""Sweep the kernels' tile configurations (BM, BN, warps, stages) on one GPU; prints a table.

For each head dim, times ``hyperref.gpu.hyper_attention`` at n = 131072 (B = 1, H = 32, bf16,
default config) with every forward configuration (non-causal and causal forward)
and, one backward kernel at a time (dq, dk/dv of the interval keys, dk/dv of the
sampled keys; the others at their defaults), every backward configuration
(non-causal forward+backward), through the kernel options ``fwd_tiles``, ``dq_tiles``, ``dkdv_tiles``
and ``smp_tiles`` (:class:`hyperref.gpu.KernelOptions`). The glue (hashing, sorting, sampling) is the same
in every row, so differences are the kernels'. Configurations that fail to
compile (shared memory) are reported as such. Ends with the best configuration
per (pass, d) as a Python dict, to copy into ``hyperref.gpu.function._tiles`` / ``_bwd_tiles``.

``--glue``: instead, the non-causal and causal forward under the hashing and
sorting options ``hash_rows``, ``sort_chunk``, ``sort_tile``.

Usage: ``python benchmarks/probes/gpu_tiles.py [--n 131072] [--d 64 128] [--glue | --fwd]``
"""

import argparse

import torch
import triton.testing

from hyperref import gpu
from hyperref import HyperConfig

# few configurations: each costs a compilation of every kernel variant (~10 s at d = 128)
FWD = [(128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
       (64, 32, 4, 3), (256, 64, 8, 2), (256, 64, 8, 3), (256, 32, 8, 3)]
BWD = {"dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3)],
       "dkdv": [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
       "smp": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]}


GLUE = {"hash_rows": [64, 128, 256], "sort_chunk": [1024, 2048, 4096], "sort_tile": [128, 256, 512]}


def header(args, what):
    """The table's first line: device, versions, size."""
    return (f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
            f"n = {args.n}, H = 32, bf16{what}")


def inputs(n, d, dtype):
    return tuple(torch.randn(1, 32, n, d, device="cuda", dtype=dtype) for _ in range(3))


def fmt(t):
    return t if isinstance(t, str) else f"{t:.3f}"


def time_ms(fn, rep):
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=rep)
    except Exception as exc:  # compile failure (e.g. out of shared memory): report it
        return f"failed: {type(exc).__name__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--glue", action="store_true")
    parser.add_argument("--fwd", action="store_true", help="forward configurations only")
    args = parser.parse_args()
    cfg = HyperConfig()
    dtype = torch.bfloat16
    best = {}
    if args.glue:
        glue(args, cfg, dtype)
        return

    def report(label, d, causal, tiles, t):
        """Print one table row; keep the fastest configuration per (pass, d, causal)."""
        print(f"| {label} | {d} | {causal} | {' | '.join(map(str, tiles))} | {fmt(t)} |", flush=True)
        key = (label, d, causal)
        if not isinstance(t, str) and (key not in best or t < best[key][1]):
            best[key] = (tiles, t)

    print(header(args, ""))
    print("| pass (fwd: forward; dq, dkdv, smp: forward+backward) | d | causal | BM | BN | warps | stages | ms |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for d in args.d:
        q, k, v = inputs(args.n, d, dtype)
        for causal in (False, True):
            for tiles in FWD:
                options = gpu.KernelOptions(fwd_tiles=tiles)
                t = time_ms(lambda: gpu.hyper_attention(q, k, v, causal=causal, config=cfg,
                                                        kernel_options=options), 100)
                report("fwd", d, causal, tiles, t)
        if args.fwd:
            continue
        fwd_tiles = best[("fwd", d, False)][0]
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(q)

        def fwd_bwd(options):
            out = gpu.hyper_attention(qg, kg, vg, config=cfg, kernel_options=options)
            torch.autograd.grad(out, (qg, kg, vg), grad)

        for kernel, configs in BWD.items():
            for tiles in configs:
                options = gpu.KernelOptions(fwd_tiles=fwd_tiles, **{f"{kernel}_tiles": tiles})
                report(kernel, d, False, tiles, time_ms(lambda: fwd_bwd(options), 200))
    print("best:", {f"{p}/d={d}/causal={c}": v for (p, d, c), v in best.items()})


def glue(args, cfg, dtype):
    """Forward times under each value of the hashing/sorting options (one at a time)."""
    print(header(args, "; forward ms"))
    print("| d | option | value | non-causal | causal |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for d in args.d:
        q, k, v = inputs(args.n, d, dtype)
        for name, values in GLUE.items():
            for value in values:
                options = gpu.KernelOptions(**{name: value})
                times = [time_ms(lambda: gpu.hyper_attention(q, k, v, causal=causal, config=cfg,
                                                             kernel_options=options), 100)
                         for causal in (False, True)]
                print(f"| {d} | {name} | {value} | {' | '.join(map(fmt, times))} |", flush=True)


if __name__ == "__main__":
    main()
