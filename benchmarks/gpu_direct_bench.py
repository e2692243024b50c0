"""GPU benchmark of the direct mode: block-sparse FlexAttention engine against exact and sink + window.

In one run, B = 1, H = 32, bf16, per length n and head dim d:

* **exact**: SDPA with FLASH_ATTENTION and with CUDNN_ATTENTION (the fastest of the two is the
  speedup's denominator);
* **sink + window**: FlexAttention with the exact pattern ``j < 64`` or ``c_i − W < j ≤ c_i`` at the
  keys-per-query budget of the direct mode (``W`` = that budget − 64), a block mask from
  ``create_block_mask``;
* **direct**: :func:`hyperref.gpu.direct_flex.direct_flex_attention` with the configuration given
  (default ``sinks(4) | window(256) | heavykeys(64, 256) | blocktop(128, 2)``, 128 samples per
  128-row query block), the whole call timed: selections, samples, plan and kernel.

Forward and forward+backward medians (``triton.testing.do_bench``); the plan alone; extra memory of
a forward (and its workspace: the extra memory beyond the output, for the direct mode and for sink
+ window); accuracy as the relative Frobenius error against exact attention (float32) on
``--rows`` random query rows, on Gaussian inputs and on inputs with planted heavy entries (half of
the queries point at one key with logit ≈ 12). Prints one JSON line per row and a markdown table.

Usage::

    python benchmarks/gpu_direct_bench.py [--n 16384 32768 65536 131072] [--d 64 128] [--causal both]
        [--kernel-options '{"bwd_BLOCK_M1": 64, ...}'] [--exact cudnn] [--no-backward]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import bench, exact_rows, fwd_bwd, gaussian, planted  # noqa: E402

from hyperref import HyperConfig  # noqa: E402
from hyperref.exact_set import parse_exact_set  # noqa: E402
from hyperref.gpu.direct_flex import _draws, direct_flex_attention  # noqa: E402
from hyperref.gpu.direct_plan import make_plan  # noqa: E402

DEFAULT_SET = "sinks(4) | window(256) | heavykeys(64, 256) | blocktop(128, 2)"
SINKS = 64

_flex = torch.compile(flex_attention, dynamic=False)


def keys_per_query(cfg, n, causal):
    """Attended keys per row of the direct mode, from above: exact-set keys + m samples."""
    E = cfg.exact_set
    keys = E.sink_count + E.window_width * (1 if causal else 2) + cfg.samples
    for p in E.parts:
        if p.kind == "heavykeys":
            keys += p.count
        elif p.kind == "blocktop":
            keys += p.count * p.block
        elif p.kind == "blockkeys":
            keys += p.keep
    return min(keys, n)


def sink_window(n, budget, causal):
    w = max(1, budget - SINKS)

    def mask(b, h, i, j):
        near = (i - j < w) & (j <= i) if causal else (i - j).abs() < w // 2
        return (j < SINKS) | near
    bm = create_block_mask(mask, None, None, n, n, device="cuda", _compile=True)
    return lambda q, k, v: _flex(q, k, v, block_mask=bm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--d", type=int, nargs="+", default=[64])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--exact-set", default=DEFAULT_SET)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--query-block", type=int, default=128)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--exact", nargs="+", choices=["flash", "cudnn"], default=["flash", "cudnn"],
                        help="the exact SDPA backends to time (one exact call at n = 1M takes seconds)")
    parser.add_argument("--kernel-options", type=json.loads, default=None,
                        help="FlexAttention kernel_options of the direct calls, a JSON object")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one compiled kernel per shape and mask
    cfg = HyperConfig(mode="direct", exact_set=parse_exact_set(args.exact_set), samples=args.samples,
                      query_block=args.query_block, min_seq_len=1024)
    props = torch.cuda.get_device_properties(0)
    meta = {"date": datetime.date.today().isoformat(), "device": props.name, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "config": cfg.as_dict(), "heads": args.heads, "kernel_options": args.kernel_options}
    print(json.dumps(meta), flush=True)
    h = args.heads
    rows = []
    causals = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    for d in args.d:
        for causal in causals:
            for n in args.n:
                q, k, v = gaussian(n, d, h, n + d)
                gen = torch.Generator("cuda").manual_seed(0)
                direct = lambda q_, k_, v_: direct_flex_attention(q_, k_, v_, causal=causal, config=cfg,
                                                                  generator=gen, kernel_options=args.kernel_options)
                budget = keys_per_query(cfg, n, causal)
                sw = sink_window(n, budget, causal)
                row = {"d": d, "causal": causal, "n": n, "keys_per_query": budget}
                row["direct_fwd_ms"] = bench(lambda: direct(q, k, v))
                scale = d ** -0.5

                def plan_only():
                    rows_, u = _draws(cfg, cfg.exact_set, n, n, d, causal, 1, h, q.device, None, gen)
                    with torch.no_grad():
                        make_plan(q, k, v, causal=causal, scale=scale, config=cfg, heavy_rows=rows_, sample_u=u,
                                  backward=False)
                row["plan_ms"] = bench(plan_only)
                row["sinkwindow_fwd_ms"] = bench(lambda: sw(q, k, v))
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    if name not in args.exact:
                        continue
                    def exact(q_, k_, v_, backend=backend):
                        with sdpa_kernel(backend):
                            return sdpa(q_, k_, v_, is_causal=causal)
                    try:
                        row[f"{name}_fwd_ms"] = bench(lambda: exact(q, k, v))
                        if not args.no_backward:
                            row[f"{name}_fwdbwd_ms"] = bench(fwd_bwd(exact, q, k, v))
                    except RuntimeError as exc:
                        row[f"{name}_error"] = str(exc).splitlines()[0][:120]
                if not args.no_backward:
                    row["direct_fwdbwd_ms"] = bench(fwd_bwd(direct, q, k, v))
                    row["sinkwindow_fwdbwd_ms"] = bench(fwd_bwd(sw, q, k, v))
                best = min(row[x] for x in ("flash_fwd_ms", "cudnn_fwd_ms") if x in row)
                row["speedup_fwd"] = best / row["direct_fwd_ms"]
                row["speedup_sinkwindow_fwd"] = best / row["sinkwindow_fwd_ms"]
                if not args.no_backward:
                    best_fb = min(row[x] for x in ("flash_fwdbwd_ms", "cudnn_fwdbwd_ms") if x in row)
                    row["speedup_fwdbwd"] = best_fb / row["direct_fwdbwd_ms"]
                    row["speedup_sinkwindow_fwdbwd"] = best_fb / row["sinkwindow_fwdbwd_ms"]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    out = direct(q, k, v)
                peak = torch.cuda.max_memory_allocated() - base
                row["extra_mem_gib"] = peak / 2**30
                row["workspace_gib"] = (peak - out.nbytes) / 2**30  # beyond the output itself
                del out
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    out = sw(q, k, v)
                row["sinkwindow_workspace_gib"] = (torch.cuda.max_memory_allocated() - base - out.nbytes) / 2**30
                del out
                sel = torch.randint(0, n, (args.rows,), device="cuda", generator=gen)
                for label in ("gaussian", "planted"):
                    qq, kk, vv = (q, k, v) if label == "gaussian" else planted(n, d, h, 7)
                    with torch.no_grad():
                        ref = exact_rows(qq, kk, vv, sel, causal)
                        for name, fn in (("direct", direct), ("sinkwindow", sw)):
                            out = fn(qq, kk, vv)[:, :, sel].float()
                            row[f"relerr_{name}_{label}"] = float((out - ref).norm() / ref.norm())
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    f = lambda r, key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "-"
    print()
    print(f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
          f"cuDNN {meta['cudnn']}; {meta['date']}; B = 1, H = {h}, bf16; direct: {args.exact_set}, "
          f"{args.samples} samples per {args.query_block}-row query block; sink + window: {SINKS} sinks + "
          "the window that gives the same keys per query."
          + (f" Direct kernel_options: {json.dumps(args.kernel_options)}." if args.kernel_options else ""))
    print()
    print("| d | causal | n | keys/query | direct fwd (ms) | plan (ms) | sink+window fwd | flash fwd | cudnn fwd "
          "| direct × best exact | sink+window × | direct f+b | sink+window f+b | best exact f+b | direct f+b × "
          "| rel.err direct gauss / planted | rel.err sink+window gauss / planted | extra mem (GiB) "
          "| workspace direct / sink+window (GiB) |")
    print("|" + "---|" * 19)
    for r in rows:
        best_fb = min((r[x] for x in ("flash_fwdbwd_ms", "cudnn_fwdbwd_ms") if x in r), default=None)
        print(f"| {r['d']} | {r['causal']} | {r['n']} | {r['keys_per_query']} | {f(r, 'direct_fwd_ms')} | "
              f"{f(r, 'plan_ms')} | {f(r, 'sinkwindow_fwd_ms')} | {f(r, 'flash_fwd_ms')} | {f(r, 'cudnn_fwd_ms')} | "
              f"{f(r, 'speedup_fwd', '{:.1f}')} | {f(r, 'speedup_sinkwindow_fwd', '{:.1f}')} | "
              f"{f(r, 'direct_fwdbwd_ms')} | {f(r, 'sinkwindow_fwdbwd_ms')} | "
              f"{'-' if best_fb is None else f'{best_fb:.2f}'} | {f(r, 'speedup_fwdbwd', '{:.1f}')} | "
              f"{f(r, 'relerr_direct_gaussian', '{:.3f}')} / {f(r, 'relerr_direct_planted', '{:.3f}')} | "
              f"{f(r, 'relerr_sinkwindow_gaussian', '{:.3f}')} / {f(r, 'relerr_sinkwindow_planted', '{:.3f}')} | "
              f"{f(r, 'extra_mem_gib')} | {f(r, 'workspace_gib', '{:.3f}')} / "
              f"{f(r, 'sinkwindow_workspace_gib', '{:.3f}')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
