"""Launch parameters of the blockkeys selection kernels on CUDA: time and agreement; a probe.

B = 1, H = 32, bf16, d = 64, causal, ``blockkeys(128, 384)`` with sinks 4 and window 256.
Prints one line per launch setting: median ms (``triton.testing.do_bench``) and the largest
difference from the default setting's output.

    python benchmarks/probes/block_keys_tiles.py [n]
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_keys_time import setup  # noqa: E402

from hyperref.gpu import direct_select as S  # noqa: E402
from hyperref.gpu import direct_kernels as K  # noqa: E402

q, k, part, cov, sc, reps = setup(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
base = K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov)
for launch in [{}, {"BR": 128}, {"BR": 128, "num_warps": 4}, {"num_warps": 4}, {"num_stages": 2},
               {"BR": 128, "num_stages": 2}, {"BR": 32, "num_warps": 4}]:
    try:
        out = K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov, launch=launch)
        ms = do_bench(lambda: K.block_key_rep_mass(q, k, reps, 128, 128, sc, True, cov, launch=launch))
        print(f"rep {launch}: {ms:.2f} ms, max diff {(out - base).abs().max().item():.2e}", flush=True)
    except Exception as exc:  # a setting that does not compile or fit
        print(f"rep {launch}: {type(exc).__name__} {str(exc)[:80]}", flush=True)
ch = S.block_key_candidates(part, q, k, sc, True, cov, rep_scores=base)
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
