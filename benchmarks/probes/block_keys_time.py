"""Time of the pieces of the blockkeys selection on CUDA (B = 1, H = 32, bf16, d = 64); a probe.

    python benchmarks/probes/block_keys_time.py [n]
"""
import sys

import torch
from triton.testing import do_bench

from hyperref.exact_set import BlockKeys
from hyperref.gpu import direct_select as S
from hyperref.gpu import direct_kernels as K


def setup(n):
    """Gaussian ``q``, ``k`` (1, 32, n, 64) bf16, the part, ``(sinks, window)``, the scale and
    the representatives."""
    g = torch.Generator("cuda").manual_seed(0)
    q, k = (torch.randn(1, 32, n, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    part = BlockKeys(128, 384)
    return q, k, part, (4, 256), 0.125, S._rep_rows(part, n, q.device)


def main(n):
    q, k, part, cov, sc, reps = setup(n)
    t = {}
    t["rep_mass"] = do_bench(lambda: K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov))
    rm = K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov)
    t["candidates"] = do_bench(lambda: S.block_key_candidates(part, q, k, sc, True, cov, rep_scores=rm))
    ch = S.block_key_candidates(part, q, k, sc, True, cov, rep_scores=rm)
    t["fine_mass"] = do_bench(lambda: K.block_key_fine_mass(q, k, ch, 128, 128, sc, True, cov))
    pi = K.block_key_fine_mass(q, k, ch, 128, 128, sc, True, cov)
    t["fine_mass_1024"] = do_bench(lambda: K.block_key_fine_mass(q, k, ch[..., :8], 128, 128, sc, True, cov))
    t["top_keep"] = do_bench(lambda: S._top(pi, 384))
    t["topk_keep"] = do_bench(lambda: torch.topk(pi, 384, dim=-1))
    t["whole"] = do_bench(lambda: S.block_keys(part, q, k, sc, True, cov))
    print(" | ".join(f"{a} {b:.2f} ms" for a, b in t.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
