"""The direct mode's own-key call: FlexAttention against this package's Triton kernel, side by side (CUDA).

A script, not a test. B = 1, H = 32, bf16, d = 64, one exact set and one plan per length
(:func:`hyperref.gpu.direct_plan.make_plan`, a forward's plan): the own-key call of that plan
timed with FlexAttention (compiled, with its default ``kernel_options`` and with
``fwd_BLOCK_N=64``) and with :func:`hyperref.gpu.direct_tiles.own_tiles_forward` at each
candidate ``(BM, BN, PBN, num_warps, num_stages)``; the plan alone and cuDNN in the same run.
Every candidate's ``out`` and ``lse`` are compared with FlexAttention's (largest absolute
difference: the same entries, summed in another order). "fwd" adds the plan to the call
(no gathered call: the set has no samples or gathered keys).

Usage::

    python benchmarks/probes/direct_own_kernel.py [--n 131072] [--causal both] [--exact-set "..."] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpu_bench import bench, gaussian  # noqa: E402

from hyperref import HyperConfig  # noqa: E402
from hyperref.direct import paper_exact_set  # noqa: E402
from hyperref.exact_set import parse_exact_set  # noqa: E402
from hyperref.gpu import direct_flex as F  # noqa: E402
from hyperref.gpu.direct_plan import make_plan  # noqa: E402
from hyperref.gpu.direct_tiles import own_tiles_forward  # noqa: E402

PEAKS = "sinks(4) | window(513) | blockkeys(128, 1024, candidates=1024, peaks=True)"

FLEX = [{}, {"fwd_BLOCK_N": 64}]
TILES = [(128, 64, 32, 4, 3), (128, 64, 16, 4, 3), (128, 64, 32, 4, 4), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3),
         (64, 64, 16, 4, 3), (64, 64, 32, 4, 4), (64, 64, 16, 4, 4), (64, 32, 16, 4, 3), (64, 64, 16, 2, 3),
         (128, 32, 16, 4, 3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[131072])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--exact-set", default=PEAKS)
    parser.add_argument("--json")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cfg = HyperConfig(mode="direct", exact_set=parse_exact_set(args.exact_set), samples=0, min_seq_len=1024)
    E = paper_exact_set(cfg)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "heads": args.heads, "config": cfg.as_dict()}
    print(json.dumps(meta), flush=True)
    rows = []
    for n in args.n:
        q, k, v = gaussian(n, 64, args.heads, n + 1)
        scale = 64 ** -0.5
        for causal in {"yes": [True], "no": [False], "both": [True, False]}[args.causal]:
            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return sdpa(q, k, v, is_causal=causal)

            def plan_fn():
                gen = torch.Generator("cuda").manual_seed(0)
                rows_, u = F._draws(cfg, E, n, n, 64, causal, 1, args.heads, q.device, None, gen)
                return make_plan(q, k, v, causal=causal, scale=scale, config=cfg, heavy_rows=rows_, sample_u=u,
                                 backward=False)

            with torch.no_grad():
                base = bench(cudnn)
                plan = plan_fn()
                plan_ms = bench(plan_fn)
                mask = F._listed_mask(plan, E, causal)
                bm = F.own_block_mask(plan, mask, False)
                ref = None
                for opts in FLEX:
                    call = lambda: F._flex_call("cuda", q, k, v, None, bm, scale=scale, kernel_options=opts or None)
                    r = {"n": n, "causal": causal, "engine": "flex", "options": opts}
                    try:
                        o, lse = call()
                        if ref is None:
                            ref = (o.float(), lse.float())
                        r["max_abs_diff_out"] = float((o.float() - ref[0]).abs().max())
                        r["call_ms"] = bench(call)
                    except Exception as exc:  # noqa: BLE001  (a candidate that does not compile)
                        r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                for tiles in TILES:
                    call = lambda: own_tiles_forward(q, k, v, plan, sinks=E.sink_count, window=E.window_width,
                                                     causal=causal, scale=scale, tiles=tiles)
                    r = {"n": n, "causal": causal, "engine": "triton", "options": list(tiles)}
                    try:
                        o, lse = call()
                        fin = torch.isfinite(ref[1])
                        r["max_abs_diff_out"] = float((o.float() - ref[0]).abs().max())
                        r["max_abs_diff_lse"] = float((lse[fin] - ref[1][fin]).abs().max())
                        r["same_empty_rows"] = bool((torch.isinf(lse) == torch.isinf(ref[1])).all())
                        r["call_ms"] = bench(call)
                    except Exception as exc:  # noqa: BLE001
                        r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            for r in rows:
                if r["n"] == n and r["causal"] == causal:
                    r["cudnn_fwd_ms"], r["plan_ms"] = base, plan_ms
                    if "call_ms" in r:
                        r["fwd_ms"] = plan_ms + r["call_ms"]
                        r["fwd_x_cudnn"] = base / r["fwd_ms"]
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
          f"`{args.exact_set}`, B = 1, H = {args.heads}, bf16, d = 64\n")
    print("| n | causal | engine | options | own call (ms) | plan (ms) | fwd = plan + call | × cuDNN | cuDNN fwd |"
          " max abs diff out | lse | same empty rows | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = lambda key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "-"
        opts = r["options"]
        opts = ("(default)" if not opts else ", ".join(f"{a}={b}" for a, b in opts.items())) \
            if isinstance(opts, dict) else "BM, BN, PBN, warps, stages = " + ", ".join(map(str, opts))
        print(f"| {r['n']} | {r['causal']} | {r['engine']} | {opts} | {g('call_ms')} | {g('plan_ms')} | "
              f"{g('fwd_ms')} | {g('fwd_x_cudnn', '{:.1f}')} | {g('cudnn_fwd_ms')} | "
              f"{g('max_abs_diff_out', '{:.1e}')} | {g('max_abs_diff_lse', '{:.1e}')} | "
              f"{r.get('same_empty_rows', '-')} | {r.get('error', '')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
