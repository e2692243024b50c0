"""Shared memory, registers and spills of the Triton kernels at the tiles ``hyperref.gpu.function`` picks.

Compiles the forward and the three backward kernels ahead of time for sm_90 (H100/H200) with
the installed Triton: no GPU is needed. A launch fails on the device when a kernel's shared
memory exceeds the per-block limit (227 KB on sm_90), with an ``OutOfResources`` error that says
nothing about head dims; this table shows which (head dim, dtype) pairs fit, and the register
use and stack (spill) bytes per thread that ptxas reports (``cuobjdump -res-usage``).

The registers and spills here are an upper bound: the runtime specializes the launched kernels
(32-bit strides where they fit), and on the H200 they use fewer registers and spill little or
nothing; ``gpu_launch_resources.py`` reports those (needs the GPU). The shared-memory check is
what this script is for.

Usage: ``python benchmarks/probes/gpu_resources.py [--d 16 32 64 128 256] [--dtype bf16 fp32]``; prints
one markdown table. Compiling the fp32 kernels at d = 256 takes minutes.
"""

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import hyperref.gpu.function as F
import hyperref.gpu.kernels_backward as KB
import hyperref.gpu.kernels_forward as KF

TARGET = GPUTarget("cuda", 90, 32)
SMEM_MAX = 232448  # bytes of dynamic shared memory per block on sm_90
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# pointer arguments that are not in the inputs' dtype
INT32 = {"PERM_Q", "PERM_K", "IDX", "STAG", "LO", "HI", "RTAG", "T_R0", "T_R1", "T_NODE", "RSTART", "REND",
         "C_R0", "C_R1", "C_NODE"}
FP32 = {"BIAS", "LSE", "DELTA", "DQ", "DK", "DV_"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton types of ``fn``'s arguments: pointers (upper-case names but the head counts), strides and sizes
    (int64 strides, int32 counts), the two scales (fp32), the ``constexprs``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("H", "HK", "G"):  # head counts
            sig[name] = "i32"
        elif name in INT32:
            sig[name] = "*i32"
        elif name in FP32:
            sig[name] = "*fp32"
        elif name.isupper() or name.endswith("_"):
            sig[name] = f"*{dtype}"
        elif name in ("scale", "scale_log2"):
            sig[name] = "fp32"
        elif name.startswith("s_") or name in ("nk", "nkv"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_sm90(fn, dtype: str, constexprs: dict, tiles) -> triton.compiler.CompiledKernel:
    """``fn`` compiled for sm_90 with ``constexprs`` (those ``fn`` takes) and (warps, stages)."""
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    src = ASTSource(fn, signature(fn, dtype, constexprs),
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=TARGET, options=dict(num_warps=tiles[2], num_stages=tiles[3]))


def usage(kernel) -> str:
    """ptxas's registers and stack bytes per thread of a compiled kernel."""
    objdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([objdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in out.splitlines() if "REG:" in line for item in line.split())
    return f"{fields.get('REG', '?')} | {fields.get('STACK', '?')}"


class _Piece:
    """Stands for a plan in ``hyperref.gpu.function._tiles``: whether its 256-row tiles lie in one block."""

    def __init__(self, one_block: bool):
        self._one = one_block

    def one_block(self, tile: int) -> bool:
        return self._one


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    args = parser.parse_args()
    cuda = torch.device("cuda")  # a device object only: the tile choice for a CUDA device
    print(f"# sm_90, triton {triton.__version__}; shared memory limit {SMEM_MAX} B per block")
    print("| dtype | d | kernel | BM | BN | warps | stages | shared (B) | fits | registers | stack (B) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for name in args.dtype:
        dtype = DTYPES[name]
        prec = F._prec(dtype)
        for d in args.d:
            common = dict(D=d, DV=d, PREC=prec, HAS_PERM=True, HAS_SAMPLES=True)
            runs = []
            for one in (False, True):
                tiles = F._tiles(d, dtype, cuda, _Piece(one))
                runs.append((f"fwd ({'one block' if one else 'general'})", KF._fwd_kernel, tiles,
                             dict(common, BM=tiles[0], BN=tiles[1], MERGE=True, ONE_BLOCK=one)))
            tiles = F._bwd_tiles("dq", d, dtype, cuda)
            runs.append(("dq", KB._bwd_dq_kernel, tiles, dict(common, BM=tiles[0], BN=tiles[1], ACCUM=True,
                                                              ONE_BLOCK=False)))
            tiles = F._bwd_tiles("dkdv", d, dtype, cuda)
            runs.append(("dkdv", KB._bwd_dkdv_kernel, tiles, dict(common, BM=tiles[0], BN=tiles[1], MODE=1,
                                                                  ONE_BLOCK=False)))
            tiles = F._bwd_tiles("smp", d, dtype, cuda)
            runs.append(("smp", KB._bwd_samples_kernel, tiles, dict(common, BM=tiles[0], BN=tiles[1])))
            for label, fn, tiles, constexprs in runs:
                kernel = compile_sm90(fn, name, constexprs, tiles)
                shared = kernel.metadata.shared
                print(f"| {name} | {d} | {label} | {' | '.join(map(str, tiles))} | {shared} | "
                      f"{'yes' if shared <= SMEM_MAX else 'NO'} | {usage(kernel)} |", flush=True)


if __name__ == "__main__":
    main()
