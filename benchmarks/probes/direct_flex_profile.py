"""Where the time of the block-sparse direct engine goes, piece by piece (CUDA).

A script, not a test. B = 1, H = 32, bf16, d = 64, the configuration of
``benchmarks/gpu_direct_bench.py``; per length: the selections (``heavy_keys``,
``block_picks``, ``block_keys``), the samples (``sample_slots``), the whole plan, the two block
masks, the own-key and the gathered FlexAttention calls, the merge, the whole
forward and forward+backward, against cuDNN in the same run. Medians of
``triton.testing.do_bench``. Prints a markdown table; ``--json`` writes the rows.

Usage::

    python benchmarks/probes/direct_flex_profile.py [--n 32768 131072] [--causal both] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpu_bench import bench, fwd_bwd, gaussian  # noqa: E402
from gpu_direct_bench import DEFAULT_SET  # noqa: E402

from hyperref import HyperConfig  # noqa: E402
from hyperref.direct import paper_exact_set  # noqa: E402
from hyperref.exact_set import BlockKeys, BlockTop, Geometry, HeavyKeys, parse_exact_set  # noqa: E402
from hyperref.gpu import direct_flex as F  # noqa: E402
from hyperref.gpu import direct_plan as P  # noqa: E402
from hyperref.gpu import direct_select as S  # noqa: E402


def kernel_table(fn, calls=5, top=30):
    """The CUDA kernels of ``calls`` calls of ``fn`` (after one warm-up), by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--exact-set", default=DEFAULT_SET)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--query-block", type=int, default=128)
    parser.add_argument("--json")
    parser.add_argument("--trace", help="also write the CUDA kernels of the plan and of the whole forward "
                                         "(torch.profiler, sorted by CUDA time) to this file")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cfg = HyperConfig(mode="direct", exact_set=parse_exact_set(args.exact_set), samples=args.samples,
                      query_block=args.query_block, min_seq_len=1024)
    E = paper_exact_set(cfg)
    h, d = args.heads, 64
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "config": cfg.as_dict()}), flush=True)
    rows = []
    for causal in {"yes": [True], "no": [False], "both": [True, False]}[args.causal]:
        for n in args.n:
            q, k, v = gaussian(n, d, h, n + 1)
            gen = torch.Generator("cuda").manual_seed(0)
            scale = d ** -0.5
            heavy_rows, u = F._draws(cfg, E, n, n, d, causal, 1, h, q.device, None, gen)
            covered = (E.sink_count, E.window_width)
            r = {"n": n, "causal": causal}
            with torch.no_grad():
                for part in E.parts:
                    if isinstance(part, HeavyKeys):
                        r["heavy_keys_ms"] = bench(lambda: S.heavy_keys(part, q, k, heavy_rows, scale, causal,
                                                                        covered))
                    if isinstance(part, BlockTop):
                        r["block_picks_ms"] = bench(lambda: S.block_picks(part, q, k, causal, covered))
                    if isinstance(part, BlockKeys):
                        part = part.within(Geometry(n, n, causal))
                        if S.routes_tiles(part, n):
                            r["block_key_chosen_ms"] = bench(lambda: S.block_key_chosen(part, q, k, scale, causal,
                                                                                        covered))
                        else:
                            r["block_keys_ms"] = bench(lambda: S.block_keys(part, q, k, scale, causal, covered))
                if cfg.samples:
                    r["sample_slots_ms"] = bench(lambda: S.sample_slots(v, u, E, cfg.query_block, cfg.sampler,
                                                                        causal, n))
                plan_fn = lambda: P.make_plan(q, k, v, causal=causal, scale=scale, config=cfg,
                                              heavy_rows=heavy_rows, sample_u=u)
                r["plan_ms"] = bench(plan_fn)
                r["plan_fwd_ms"] = bench(lambda: P.make_plan(q, k, v, causal=causal, scale=scale, config=cfg,
                                                             heavy_rows=heavy_rows, sample_u=u, backward=False))
                plan = plan_fn()
                own_mask = F._listed_mask(plan, E, causal)
                r["own_tiles_partial"] = float(plan.kv_num.float().mean())  # per query tile
                r["own_tiles_full"] = float(plan.full_num.float().mean())

                def own_masks(grad=False, mask_mod=own_mask):
                    return F.own_block_mask(plan, mask_mod, grad)
                r["block_masks_ms"] = bench(own_masks)
                r["block_masks_bwd_ms"] = bench(lambda: own_masks(True))
                own_bm = own_masks()
                call = lambda *a, opts=None: F._flex_call("cuda", *a, scale=scale, kernel_options=opts)
                r["own_call_ms"] = bench(lambda: call(q, k, v, None, own_bm))
                # the same tile lists with the index-arithmetic mask alone (no tile lookups): what
                # the lookups cost (its answer differs where a partial tile holds picked keys)
                plain_bm = own_masks(mask_mod=F._window_mask(plan, E, causal))
                r["own_call_window_mask_ms"] = bench(lambda: call(q, k, v, None, plain_bm))
                q_t = k_g = v_g = o2 = None
                if plan.slots:
                    g_mask, g_score = F._gathered_mods(plan, E, cfg.query_block, causal)
                    n_g = plan.slots // S.GB
                    g_num = torch.full((1, 1, 1), n_g, dtype=torch.int32, device="cuda")
                    g_idx = torch.arange(n_g, dtype=torch.int32, device="cuda")[None, None, None]
                    g_bm = BlockMask.from_kv_blocks(g_num, g_idx, BLOCK_SIZE=(S.QB, S.GB), mask_mod=g_mask,
                                                    seq_lengths=(S.QB, plan.slots))
                    q_t = F._by_tile(q, plan.n_qt, S.QB)
                    k_g, v_g = F._gather_slots(k, plan), F._gather_slots(v, plan)
                    r["gather_ms"] = bench(lambda: (F._gather_slots(k, plan), F._gather_slots(v, plan)))

                    def take(x):  # the alternative: rows of a flat (B·H·nk, d) view by index_select
                        b_, h_, n_, d_ = x.shape
                        base = (torch.arange(b_ * h_, device=x.device) * n_).view(b_, h_, 1)
                        idx = (torch.clamp(plan.gpos, max=n_ - 1).long().reshape(b_, h_, -1) + base).reshape(-1)
                        return x.reshape(-1, d_).index_select(0, idx).view(b_, h_ * plan.n_qt, plan.slots, d_)
                    r["gather_take_ms"] = bench(lambda: (take(k), take(v)))
                    r["gathered_call_ms"] = bench(lambda: call(q_t, k_g, v_g, g_score, g_bm))
                    o1, l1 = call(q, k, v, None, own_bm)
                    o2, l2 = call(q_t, k_g, v_g, g_score, g_bm)
                    o2 = o2.reshape(1, h, -1, d)[:, :, :n]
                    l2 = l2.reshape(1, h, -1)[:, :, :n]
                    merge = F._compiled("merge", F.merge_partials)
                    r["merge_ms"] = bench(lambda: merge(o1, l1, o2, l2))
                r["kernels_ms"] = bench(lambda: F.flex_direct(q, k, v, plan, scale=scale, config=cfg,
                                                              causal=causal))
            direct = lambda q_, k_, v_: F.direct_flex_attention(q_, k_, v_, causal=causal, config=cfg,
                                                                generator=gen)
            r["direct_fwd_ms"] = bench(lambda: direct(q, k, v))
            r["direct_fwdbwd_ms"] = bench(fwd_bwd(direct, q, k, v))

            def cudnn(q_, k_, v_):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return sdpa(q_, k_, v_, is_causal=causal)
            r["cudnn_fwd_ms"] = bench(lambda: cudnn(q, k, v))
            r["cudnn_fwdbwd_ms"] = bench(fwd_bwd(cudnn, q, k, v))
            r["speedup_fwd"] = r["cudnn_fwd_ms"] / r["direct_fwd_ms"]
            r["speedup_fwdbwd"] = r["cudnn_fwdbwd_ms"] / r["direct_fwdbwd_ms"]
            if args.trace:
                with torch.no_grad(), open(args.trace, "a") as fh:
                    for name, fn in (("plan", plan_fn), ("forward", lambda: direct(q, k, v))):
                        fh.write(f"\n## {name}, causal {causal}, n {n} (5 calls after warm-up)\n\n")
                        fh.write(kernel_table(fn) + "\n")
            rows.append(r)
            print(json.dumps(r), flush=True)
            del q, k, v, plan, k_g, v_g, q_t, o2
            torch.cuda.empty_cache()
    keys = [x for x in rows[0] if x not in ("n", "causal")]
    print("\n| causal | n | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['causal']} | {r['n']} | " + " | ".join(f"{r.get(x, float('nan')):.2f}" for x in keys) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
