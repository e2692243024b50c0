"""GPU benchmark: HyperAttention (gpu/) against exact SDPA (FLASH_ATTENTION and CUDNN_ATTENTION).

B = 1, H = 32, bf16, d ∈ {64, 128}, n = 4096 … 131072 doubling (and longer
non-causal lengths with ``--long``), causal and non-causal, forward and
forward+backward. Times are medians of ``triton.testing.do_bench`` (CUDA
events, warm-up first); the exact backends are measured in the same run and
skipped (``-``) where a single call would exceed ``--exact-cap`` seconds
(predicted from the previous length). Accuracy: relative Frobenius error
against exact attention (float32, explicit) on ``--rows`` random query rows,
on Gaussian inputs and on inputs with planted heavy entries.

Usage::

    python benchmarks/gpu_bench.py [--d 64 128] [--max-n 131072] [--long] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from hyperref import gpu
from hyperref import HyperConfig


def gaussian(n, d, h, seed):
    g = torch.Generator("cuda").manual_seed(seed)
    return [torch.randn(1, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]


def planted(n, d, h, seed, logit=12.0):
    """Half of the queries point at one random key with logit ≈ ``logit`` (as hyperref.workloads)."""
    g = torch.Generator("cuda").manual_seed(seed)
    k = torch.randn(1, h, n, d, device="cuda", generator=g)
    q = 0.5 * torch.randn(1, h, n, d, device="cuda", generator=g)
    v = torch.randn(1, h, n, d, device="cuda", generator=g)
    partner = torch.randint(0, n, (1, h, n), device="cuda", generator=g)
    kp = k.gather(2, partner[..., None].expand(-1, -1, -1, d))
    norm = kp.norm(dim=-1, keepdim=True)
    direction = (kp + 0.1 * norm / math.sqrt(d) * torch.randn(kp.shape, device="cuda", generator=g)) / norm
    planted_q = direction * (logit * math.sqrt(d) / norm)
    mask = torch.rand(1, h, n, 1, device="cuda", generator=g) < 0.5
    q = torch.where(mask, planted_q, q)
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def exact_rows(q, k, v, rows, causal):
    """Exact attention of the selected query rows, float32, one head at a time."""
    n = k.shape[2]
    out = []
    for h in range(q.shape[1]):
        s = (q[0, h, rows].float() @ k[0, h].float().T) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(torch.arange(n, device="cuda")[None, :] > rows[:, None], float("-inf"))
        out.append(torch.softmax(s, dim=-1) @ v[0, h].float())
    return torch.stack(out)[None]


def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd(fn, q, k, v):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=q.dtype)

    def run():
        out = fn(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
    return run


def floors(n, d, h, causal, cfg, rate, bandwidth):
    """(FLOPs, bytes, floor ms) of the HyperAttention forward (sorted blocks + samples)."""
    keys = cfg.block + cfg.samples
    if causal:
        levels = max(0, math.ceil(math.log2(n / cfg.min_seq_len)))
        flops = 4 * d * h * (levels * (n / 2) * keys + n * cfg.min_seq_len / 2)
        nbytes = 2 * h * n * d * 4 * (levels + 1)
    else:
        flops = 4 * d * h * n * keys
        nbytes = 2 * h * n * d * 4  # q, k, v read, out written (bf16)
    return flops, nbytes, max(flops / rate, nbytes / bandwidth) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--min-n", type=int, default=4096)
    parser.add_argument("--max-n", type=int, default=131072)
    parser.add_argument("--long", action="store_true", help="also 262144 and 1048576 non-causal")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--exact-cap", type=float, default=2.0)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = HyperConfig()
    h = args.heads
    props = torch.cuda.get_device_properties(0)
    # the two ceilings, measured here
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rate = 2 * 8192**3 / (bench(lambda: a @ a) * 1e-3)
    big = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    bandwidth = 2 * big.numel() / (bench(lambda: big.clone()) * 1e-3)
    del a, big
    meta = {"date": datetime.date.today().isoformat(), "device": props.name,
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "bf16_matmul_tflops": rate / 1e12,
            "copy_tb_s": bandwidth / 1e12, "config": cfg.as_dict(), "heads": h}
    print(json.dumps(meta))
    rows_out = []
    for d in args.d:
        for causal in (False, True):
            lengths = []
            n = args.min_n
            while n <= args.max_n:
                lengths.append(n)
                n *= 2
            if args.long and not causal:
                lengths += [262144, 1048576]
            last_exact = {}
            for n in lengths:
                q, k, v = gaussian(n, d, h, n + d)
                gen = torch.Generator("cuda").manual_seed(0)
                hyper = lambda q_, k_, v_: gpu.hyper_attention(q_, k_, v_, causal=causal, config=cfg,
                                                               generator=gen)
                row = {"d": d, "causal": causal, "n": n}
                row["flops"], row["bytes"], row["floor_ms"] = floors(n, d, h, causal, cfg, rate, bandwidth)
                row["hyper_fwd_ms"] = bench(lambda: hyper(q, k, v))
                do_bwd = not args.no_backward and n <= 131072
                if do_bwd:
                    row["hyper_fwdbwd_ms"] = bench(fwd_bwd(hyper, q, k, v))
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                      ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    prev = last_exact.get(name)
                    predicted = prev[1] * (n / prev[0]) ** 2 if prev else 0.0
                    if predicted > args.exact_cap * 1e3:
                        continue
                    def exact(q_, k_, v_, backend=backend):
                        with sdpa_kernel(backend):
                            return sdpa(q_, k_, v_, is_causal=causal)
                    try:
                        row[f"{name}_fwd_ms"] = bench(lambda: exact(q, k, v))
                        if do_bwd:
                            row[f"{name}_fwdbwd_ms"] = bench(fwd_bwd(exact, q, k, v))
                        last_exact[name] = (n, row[f"{name}_fwd_ms"])
                    except RuntimeError as exc:  # backend unavailable for this shape
                        row[f"{name}_error"] = str(exc).splitlines()[0][:120]
                exact_fwd = [row[k_] for k_ in ("flash_fwd_ms", "cudnn_fwd_ms") if k_ in row]
                if exact_fwd:
                    row["best_exact_fwd_ms"] = min(exact_fwd)
                    row["speedup_fwd"] = row["best_exact_fwd_ms"] / row["hyper_fwd_ms"]
                exact_fb = [row[k_] for k_ in ("flash_fwdbwd_ms", "cudnn_fwdbwd_ms") if k_ in row]
                if exact_fb and do_bwd:
                    row["best_exact_fwdbwd_ms"] = min(exact_fb)
                    row["speedup_fwdbwd"] = row["best_exact_fwdbwd_ms"] / row["hyper_fwdbwd_ms"]
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    hyper(q, k, v)
                row["extra_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                if n <= 131072:
                    sel = torch.randint(0, n, (args.rows,), device="cuda", generator=gen)
                    for label, make in (("gaussian", gaussian), ("planted", planted)):
                        qq, kk, vv = (q, k, v) if label == "gaussian" else make(n, d, h, 7)
                        with torch.no_grad():
                            out = hyper(qq, kk, vv)[:, :, sel].float()
                            ref = exact_rows(qq, kk, vv, sel, causal)
                        row[f"relerr_{label}"] = float((out - ref).norm() / ref.norm())
                        # the error in units of the rms row norm of V (meaningful when Att ≈ 0)
                        v_rms = vv.float().pow(2).sum(-1).mean().sqrt()
                        row[f"err_v_{label}"] = float((out - ref).pow(2).sum(-1).mean().sqrt() / v_rms)
                rows_out.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=1)
    print()
    print("| d | causal | n | hyper fwd (ms) | flash fwd | cudnn fwd | speedup fwd | hyper f+b | best exact f+b | speedup f+b | floor fwd (ms) | extra mem (GiB) | rel.err gauss | rel.err planted | err/rms(v) gauss | err/rms(v) planted |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    f = lambda r, k_, fmt="{:.3f}": fmt.format(r[k_]) if k_ in r else "-"
    for r in rows_out:
        print(f"| {r['d']} | {r['causal']} | {r['n']} | {f(r,'hyper_fwd_ms')} | {f(r,'flash_fwd_ms')} | "
              f"{f(r,'cudnn_fwd_ms')} | {f(r,'speedup_fwd','{:.1f}')} | {f(r,'hyper_fwdbwd_ms')} | "
              f"{f(r,'best_exact_fwdbwd_ms')} | {f(r,'speedup_fwdbwd','{:.1f}')} | {f(r,'floor_ms')} | "
              f"{f(r,'extra_mem_gib','{:.2f}')} | {f(r,'relerr_gaussian','{:.3f}')} | {f(r,'relerr_planted','{:.3f}')} | "
              f"{f(r,'err_v_gaussian','{:.3f}')} | {f(r,'err_v_planted','{:.3f}')} |")


if __name__ == "__main__":
    main()
