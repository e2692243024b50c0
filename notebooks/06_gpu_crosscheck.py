# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GPU cross-check
#
# **Question.** Does the GPU path compute the same function as the reference on the same draws,
# and how fast is it against exact attention? Where CUDA exists this notebook runs the check;
# elsewhere it shows the recorded H200 results from `benchmarks/`.

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:
    CUDA = False
print("CUDA available:", CUDA)

# %%
if CUDA:
    from hyperref import gpu
    import hyperref
    from hyperref import HyperConfig, make_draws

    cfg = HyperConfig(block=64, samples=64, min_seq_len=256)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 4, 2048, 64))
    for causal in (False, True):
        draws = make_draws(cfg, 2048, 2048, 64, causal=causal, batch_shape=(1, 4), rng=1)
        ref = hyperref.hyper_attention(q, k, v, causal=causal, config=cfg, draws=draws)
        out = gpu.hyper_attention(*(torch.tensor(x, device="cuda", dtype=torch.float32) for x in (q, k, v)),
                                  causal=causal, config=cfg, draws=draws, exact_hash=True)
        err = np.linalg.norm(out.cpu().numpy() - ref) / np.linalg.norm(ref)
        print(f"causal={causal}: relative difference GPU vs reference on the same draws {err:.2e}")
else:
    print("no CUDA here: the GPU cells are skipped; the recorded results follow")

# %%
root = pathlib.Path.cwd()
if not (root / "benchmarks").exists():
    root = root.parent
data = json.loads((root / "benchmarks/results/gpu_bench.json").read_text())
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for (d, causal), style in {(64, False): "o-", (128, False): "s-", (64, True): "o--", (128, True): "s--"}.items():
    rows = [r for r in data["rows"] if r["d"] == d and r["causal"] == causal and "speedup_fwd" in r]
    axes[0].loglog([r["n"] for r in rows], [r["speedup_fwd"] for r in rows], style,
                   label=f"d={d}, {'causal' if causal else 'non-causal'}")
    rows = [r for r in data["rows"] if r["d"] == d and r["causal"] == causal]
    axes[1].loglog([r["n"] for r in rows], [r["hyper_fwd_ms"] for r in rows], style, label=f"d={d}, causal={causal}")
axes[0].axhline(1, color="gray", lw=0.5)
axes[0].set_xlabel("n")
axes[0].set_ylabel("speedup over the fastest exact SDPA (forward)")
axes[0].legend(fontsize=8)
axes[1].set_xlabel("n")
axes[1].set_ylabel("HyperAttention forward (ms)")
axes[1].set_title(f"{data['meta']['device']}, B=1, H=32, bf16")
fig.tight_layout()

# %% [markdown]
# **Answer.** On a CUDA machine the GPU path matches the float64 reference on the same draws to
# float32 rounding (the test suite checks the same with derived tolerances, gradients included).
# The recorded H200 run (2026-11-29) shows the non-causal forward overtaking cuDNN by n ≈ 16k and
# reaching about 63–69× at 131k tokens (about 145–163× at 262k), growing linearly in n; the causal
# path reaches about 9–10× at 131k (the exact leaves and the levels' fused kernels dominate; see
# `benchmarks/GPU_RESULTS.md`).
