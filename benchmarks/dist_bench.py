"""Head-parallel HyperAttention on several GPUs (NCCL) against one GPU.

Run with ``torchrun --nproc_per_node=W benchmarks/dist_bench.py --seq-len 1048576`` for the
distributed time (each rank holds n/W tokens of all H heads), and with
``python benchmarks/dist_bench.py --single --seq-len N`` for one GPU. Causal,
B = 1, H = 32, d = 128, bf16, default HyperConfig; CUDA-event medians of
``--reps`` calls after one warm-up; prints one JSON line per measurement (with device, versions
and date). ``bash benchmarks/dist_runs.sh`` runs both at 262144 and 1048576 tokens
(``results/dist_two_gpus.jsonl``; one GPU alone: ``results/dist_single.jsonl``).
Keep NVLink multicast off (NCCL_NVLS_ENABLE=0).
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
import triton

from hyperref import gpu
from hyperref.gpu.distributed import hyper_attention_distributed
from hyperref import HyperConfig


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", dest="n", type=int, default=1048576)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--no-backward", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cfg = HyperConfig()
    if args.single:
        rank, world, group = 0, 1, None
        torch.cuda.set_device(0)
    else:
        dist.init_process_group("nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.cuda.set_device(rank)
        group = None
    n_loc = args.n // world
    g = torch.Generator("cuda").manual_seed(rank)
    q, k, v = (torch.randn(1, args.heads, n_loc, args.d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    gen = torch.Generator("cuda").manual_seed(0)
    if args.single:
        attn = lambda a, b, c: gpu.hyper_attention(a, b, c, causal=True, config=cfg, generator=gen)
    else:
        attn = lambda a, b, c: hyper_attention_distributed(a, b, c, group=group, causal=True, config=cfg,
                                                           generator=gen)
    result = {"world": world, "n": args.n, "heads": args.heads, "d": args.d, "device": torch.cuda.get_device_name(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        with torch.no_grad():
            result["fwd_ms"] = timed(lambda: attn(q, k, v), args.reps)
        result["peak_mem_gib_fwd"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        result["fwd_ms"] = "out of memory"
        args.no_backward = True
    if not args.no_backward:
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(q)

        def step():
            torch.autograd.grad(attn(qq, kk, vv), (qq, kk, vv), grad)
        torch.cuda.reset_peak_memory_stats()
        try:
            result["fwdbwd_ms"] = timed(step, max(1, args.reps - 1))
            result["peak_mem_gib_fwdbwd"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError:
            result["fwdbwd_ms"] = "out of memory"
    if rank == 0:
        print(json.dumps(result), flush=True)
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
