"""One small forward and backward of every GPU kernel family, for ``compute-sanitizer``.

A script, not a test: run it under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``
on a CUDA machine (``benchmarks/device_checks.sh sanitize``). It calls, at n = 512 (B = 1, H = 2,
Hk = 1, d = 64), fp16 and fp32:

* :func:`hyperref.gpu.hyper_attention` (the fused Triton kernels), causal and non-causal,
  forward and backward (the lse path included), with an odd length and ``nq != nk``;
* :func:`hyperref.gpu.direct_flex.direct_flex_attention` (FlexAttention), causal, forward and backward.

Prints one line per call; the sanitizer's summary follows.
"""

from __future__ import annotations

import torch

from hyperref import HyperConfig, gpu
from hyperref.exact_set import blocktop, heavykeys, sinks, window
from hyperref.gpu.direct_flex import direct_flex_attention


def run(fn, q, k, v, label):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    (out.float().sum() + 0.1 * lse.float().sum()).backward()
    torch.cuda.synchronize()
    print(label, "ok", tuple(out.shape), flush=True)


def main():
    g = torch.Generator("cuda").manual_seed(0)
    cfg = HyperConfig(block=64, samples=64, min_seq_len=128)
    direct = HyperConfig(mode="direct", exact_set=sinks(4) | window(128) | heavykeys(32, 64) | blocktop(128, 1),
                         query_block=64, samples=32, min_seq_len=128)
    for dtype in (torch.float16, torch.float32):
        for nq, nk in ((512, 512), (511, 700)):
            q = torch.randn(1, 2, nq, 64, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(1, 1, nk, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            for causal in (False, True):
                run(lambda q_, k_, v_: gpu.hyper_attention(q_, k_, v_, causal=causal, config=cfg, generator=g,
                                                           return_lse=True),
                    q, k, v, f"hyper_attention {dtype} {nq}x{nk} causal={causal}")
            run(lambda q_, k_, v_: direct_flex_attention(q_, k_, v_, causal=True, config=direct, generator=g,
                                                         return_lse=True),
                q, k, v, f"direct_flex_attention {dtype} {nq}x{nk}")


if __name__ == "__main__":
    main()
