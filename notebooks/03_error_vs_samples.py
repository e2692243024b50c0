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
# # Error versus samples
#
# **Question.** How does the measured spectral error of the sampled product fall with the
# number of samples m, for each estimator and sampler, compared with the G2/G3 bounds?

# %%
import matplotlib.pyplot as plt
import numpy as np

from hyperref.mask import block_structure, dense_mask
from hyperref.sampling import resolve_samples, sampling_probabilities
from hyperref.theory.bounds import product_bound

rng = np.random.default_rng(0)
n, d = 768, 16
c = 3 * rng.standard_normal((4, d))
q = c[rng.integers(0, 4, n)] + 0.3 * rng.standard_normal((n, d))
k = c[rng.integers(0, 4, n)] + 0.3 * rng.standard_normal((n, d))
v = rng.standard_normal((n, d)) * rng.uniform(0.1, 2, (n, 1))
S = q @ k.T / np.sqrt(d)
A = np.exp(S - S.max(1, keepdims=True))
P = A / A.sum(1, keepdims=True)
M = dense_mask(block_structure(q, k, rng.standard_normal((d, 7)), 64)).astype(float)
unit = np.linalg.norm(P, 2) * np.linalg.norm(v, 2)
ms = [4, 8, 16, 32, 64, 128, 256, 512]

fig, ax = plt.subplots(figsize=(7, 4.5))
for i, (est, X) in enumerate([("paper", P), ("masked", P * (1 - M))]):
    for j, sampler in enumerate(["rownorm", "uniform", "mixed"]):
        p = sampling_probabilities(v, sampler)
        errs = []
        for m in ms:
            e = []
            for seed in range(20):
                idx = resolve_samples(np.random.default_rng(seed).random(m), p)
                cnt = np.bincount(idx, minlength=n) / (m * p)
                e.append(np.linalg.norm(X @ (cnt[:, None] * v) - X @ v, 2) / unit)
            errs.append(np.median(e))
        style = "-" if est == "masked" else "--"
        ax.loglog(ms, errs, style, marker="o", color=f"C{j}", label=f"{est}, {sampler} (median of 20)")
        if sampler == "rownorm":
            bound = [product_bound(m, 0.1, (X**2).sum(0), v, p, np.linalg.norm(P, 2),
                                   np.linalg.norm(v, 2)) for m in ms]
            ax.loglog(ms, bound, ":", color="k" if est == "paper" else "gray",
                      label=f"{'G2' if est == 'paper' else 'G3'} bound, δ = 0.1")
ax.set_xlabel("samples m")
ax.set_ylabel("‖error‖_op / (‖P‖_op ‖V‖_op)")
ax.legend(fontsize=7)
ax.set_title("sampled product with exact D, clustered input, n = 768")
fig.tight_layout()

# %% [markdown]
# **Answer.** All curves fall like m^(−1/2), the rate of G2/G3; the bounds (dotted) sit above
# the medians by a factor of about 5 to 8 at every m (Markov at δ = 0.1 costs √10 ≈ 3, and
# ‖·‖_op ≤ ‖·‖_F the rest), so they are loose in constant but right in rate. The `masked`
# estimator (solid) is at or below `paper` (dashed) for each sampler, as G3 says, by a modest
# margin here because the blocks hold only part of the mass. The three samplers are within a
# factor 1.5 of each other on this input; `mixed` is never the worst.
