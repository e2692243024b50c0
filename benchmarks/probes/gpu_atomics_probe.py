"""What adding dq tiles from several programs would cost on this GPU (a probe for the fused backward).

A fused backward of a sortLSH block (dq, dk, dv from one recomputation of the logits) adds each
row tile's dq from every key tile of its block: either by fp32 atomics (programs per key tile)
or by read-add-write in a program that owns the block's rows. This script times both on
``n = 65536·32`` rows (one causal level at n = 131072, H = 32) in tiles of 64 rows gathered
through a random permutation, each tile receiving ``reps = 4`` additions (block 256 / key tile 64).

Usage: ``python benchmarks/probes/gpu_atomics_probe.py``; prints one table.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_tiles(BUF, PERM, n_tiles, D: tl.constexpr, BM: tl.constexpr, REPS: tl.constexpr,
               ATOMIC: tl.constexpr):
    """Add 1 to a gathered tile of rows: once atomically (a program per addition) or ``REPS``
    times by read-add-write (one program per tile)."""
    t = tl.program_id(0) % n_tiles
    rows = tl.load(PERM + t * BM + tl.arange(0, BM)).to(tl.int64)
    ptr = BUF + rows[:, None] * D + tl.arange(0, D)[None, :]
    val = tl.full([BM, D], 1.0, tl.float32)
    if ATOMIC:
        tl.atomic_add(ptr, val)
    else:
        for _ in range(REPS):
            tl.store(ptr, tl.load(ptr) + val)


def main():
    n, bm, reps = 65536 * 32, 64, 4
    tiles = n // bm
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"{n} fp32 rows, tiles of {bm} gathered rows, {reps} additions per tile")
    print("| d | added (GB) | atomic (ms) | atomic (TB/s) | read-add-write (ms) | read-add-write (TB/s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in (64, 128):
        buf = torch.zeros(n, d, device="cuda")
        perm = torch.randperm(n, device="cuda", dtype=torch.int32)
        ta = triton.testing.do_bench(lambda: _add_tiles[(tiles * reps,)](buf, perm, tiles, D=d, BM=bm, REPS=1,
                                                                         ATOMIC=True))
        tp = triton.testing.do_bench(lambda: _add_tiles[(tiles,)](buf, perm, tiles, D=d, BM=bm, REPS=reps,
                                                                  ATOMIC=False))
        gb = n * d * 4 * reps / 1e9
        print(f"| {d} | {gb:.2f} | {ta:.3f} | {gb / ta:.2f} | {tp:.3f} | {gb / tp:.2f} |")


if __name__ == "__main__":
    main()
