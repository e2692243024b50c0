"""Launch parameters of the blockkeys selection kernels on CUDA: time and agreement; a probe.

B = 1, H = 32, bf16, d = 64, causal, ``blockkeys(128, 384)`` with sinks 4 and window 256.
Prints one line per launch setting: median ms (``triton.testing.do_bench``) and the largest
difference from the default setting's output.

    python benchmarks/probes/block_keys_tiles.py [n]
"""
import sys

import torch
from triton.testing import do_bench

from hyperref.exact_set import BlockKeys
from hyperref.gpu import direct_flex as F
from hyperref.gpu import direct_kernels as K

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
g = torch.Generator("cuda").manual_seed(0)
q, k = (torch.randn(1, 32, n, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
part, cov, sc = BlockKeys(128, 384), (4, 256), 0.125
reps = F._rep_rows(part, n, q.device)
base = K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov)
for launch in [{}, {"BR": 128}, {"BR": 128, "num_warps": 4}, {"num_warps": 4}, {"num_stages": 2},
               {"BR": 128, "num_stages": 2}, {"BR": 32, "num_warps": 4}]:
    try:
        out = K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov, launch=launch)
        ms = do_bench(lambda: K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov, launch=launch))
        print(f"rep {launch}: {ms:.2f} ms, max diff {(out - base).abs().max().item():.2e}", flush=True)
    except Exception as exc:  # a setting that does not compile or fit
        print(f"rep {launch}: {type(exc).__name__} {str(exc)[:80]}", flush=True)
ch = F.block_key_candidates(part, q, k, sc, True, cov, reps_mass=base)
base = K.block_key_fine_mass(q, k, ch, 128, 128, sc, True, cov)
for launch in [{}, {"BN": 128}, {"BN": 128, "num_warps": 4}, {"num_warps": 4}, {"num_stages": 2},
               {"BN": 32}, {"BN": 128, "num_stages": 2}, {"num_stages": 4}]:
    try:
        out = K.block_key_fine_mass(q, k, ch, 128, 128, sc, True, cov, launch=launch)
        ms = do_bench(lambda: K.block_key_fine_mass(q, k, ch, 128, 128, sc, True, cov, launch=launch))
        fin = torch.isfinite(base)
        print(f"fine {launch}: {ms:.2f} ms, max diff {(out[fin] - base[fin]).abs().max().item():.2e}", flush=True)
    except Exception as exc:
        print(f"fine {launch}: {type(exc).__name__} {str(exc)[:80]}", flush=True)
