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
# # Real attention: where the mass is, and which exact-set parts capture it
#
# **Question.** Where is the attention mass of a real language model's heads, and which
# exact-set parts (SPEC §3b) capture it?
#
# The model is SmolLM2-135M (`hyperref.lm.load_model`: 30 layers, 9 query heads sharing 3
# key/value heads, head dim 64). The text is a *copy* text of n = 2048 tokens: the first 1024
# tokens of `hyperref.lm.default_text()`, twice, so rows ≥ 1024 can retrieve the passage they
# repeat. One forward pass records the post-RoPE q, k, v of layers 0, 5, 7, 20 and 23
# (`hyperref.lm.capture_qkv`: an attention function that stores its inputs and then runs
# transformers' SDPA). Every measure below is over rows i ≥ 1024 (the second copy).

# %%
import os
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars while the model loads
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import numpy as np
import torch

from hyperref import HyperConfig, make_draws
from hyperref.direct import direct_heads
from hyperref.exact_set import Geometry, heavykeys, quest, sinks, sortlsh, topk, window
from hyperref.lm import capture_qkv, default_text, load_model, token_ids

torch.set_num_threads(1)
n, LAYERS = 2048, (0, 5, 7, 20, 23)
model, tokenizer = load_model("cpu")
ids = token_ids(tokenizer, default_text(), n, copy=True)
captured, scale = capture_qkv(model, ids, LAYERS)
d = captured[0][0].shape[2]
heads = [(layer, h) for layer in LAYERS for h in range(9)]
names = [f"L{layer}H{h}" for layer, h in heads]
geom, rows = Geometry(n, n, causal=True), np.arange(n // 2, n)


def head_qkv(layer, h):
    """One query head's (n, d) q and its key/value head's k, v (q head h reads kv head h // 3)."""
    q, k, v = captured[layer]
    return q[h], k[h // 3], v[h // 3]


def probs(q, k):
    """Exact causal softmax rows i ≥ n/2 (float64)."""
    s = (q[rows] @ k.T) * scale
    s = np.where(geom.visible(rows, n), s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


P = {hd: probs(*head_qkv(*hd)[:2]) for hd in heads}
print(f"captured {len(heads)} heads, q {captured[0][0].shape}, k {captured[0][1].shape}, scale {scale}")

# %% [markdown]
# ## 1. Where the mass is
#
# Share of each row's attention on the first 4 keys (sinks), on the 256 most recent keys
# (window) and on everything else (the far region), averaged over rows ≥ 1024.


# %%
def captured_mass(es, hd, seed=0):
    """Per-row attention mass on the exact set ``es`` of head ``hd`` and the per-row key count."""
    q, k, _ = head_qkv(*hd)
    draws = es.draw(geom, d, (), np.random.default_rng(seed))
    member = es.member_rows(q, k, scale, geom, rows, n, draws=draws)
    return (P[hd] * member).sum(1), member.sum(1)


sink_share = np.array([captured_mass(sinks(4), hd)[0].mean() for hd in heads])
window_share = np.array([captured_mass(window(256), hd)[0].mean() for hd in heads])
far_share = 1 - sink_share - window_share
x = np.arange(len(heads))
fig, ax = plt.subplots(figsize=(11, 3))
ax.bar(x, sink_share, label="sinks(4)")
ax.bar(x, window_share, bottom=sink_share, label="window(256)")
ax.bar(x, far_share, bottom=sink_share + window_share, label="rest (far)", color="0.75")
ax.set_xticks(x, names, rotation=90, fontsize=7)
ax.set_ylabel("attention mass")
ax.set_title(f"mass per head, copy text, n = {n}, rows ≥ {n // 2}")
ax.legend(fontsize=8, ncol=3, loc="upper right", bbox_to_anchor=(1, 1.25))
fig.tight_layout()

# %% [markdown]
# ## 2. What each part captures, against the oracle
#
# Each part alone and the union of `hyperref.presets.causal_lm()` (with `quest(8, 1024, 128)`
# in place of `quest(8, 2048, 128)`: at n = 2048 a row has at most 1788 keys beyond the sinks and
# the window, so 2048 candidates would score every one of them exactly and leave Quest's block
# bound nothing to rank). The oracle for a row with c keys is its c largest probabilities;
# recall = Σ_rows detector mass / Σ_rows oracle mass.

# %%
SETS = {"sinks(4)": sinks(4), "window(256)": window(256), "heavykeys(64, 256)": heavykeys(64, 256),
        "quest(8, 1024, 128)": quest(8, 1024, 128)}
SETS["union"] = sinks(4) | window(256) | heavykeys(64, 256) | quest(8, 1024, 128)
mass = np.zeros((len(SETS), len(heads)))
recall = np.zeros_like(mass)
for col, hd in enumerate(heads):
    best = np.cumsum(np.sort(P[hd], axis=1)[:, ::-1], axis=1)  # oracle mass of the top c keys
    for r, es in enumerate(SETS.values()):
        got, count = captured_mass(es, hd)
        oracle = best[np.arange(len(rows)), np.maximum(count, 1) - 1] * (count > 0)
        mass[r, col], recall[r, col] = got.mean(), got.sum() / oracle.sum()

fig, axes = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
for r, label in enumerate(SETS):
    axes[0].plot(x, mass[r], "o-" if label == "union" else ".", lw=1, ms=4, label=label)
axes[0].set_ylabel("captured mass")
axes[0].legend(fontsize=7, ncol=5, loc="lower right", bbox_to_anchor=(1, 1))
im = axes[1].imshow(recall, aspect="auto", vmin=0, vmax=1, cmap="viridis")
axes[1].set_yticks(range(len(SETS)), list(SETS), fontsize=7)
axes[1].set_xticks(x, names, rotation=90, fontsize=7)
axes[1].set_title("recall = detector mass / oracle mass with the same keys per row", fontsize=9)
fig.colorbar(im, ax=axes[1], fraction=0.02)
fig.tight_layout()

# %% [markdown]
# ## 3. Output error against keys per query
#
# The direct mode (SPEC §6b) on single heads: 64-row query blocks, the exact set, and 128 keys per
# query block sampled (`mixed`) from the rest. Relative error ‖õ − o‖/‖o‖ over rows ≥ 1024 against
# the mean number of keys with nonzero weight per query (exact + distinct sampled keys) from
# `hyperref.direct.direct_heads`, which is what `hyper_attention(..., rng=seed)` runs in this mode
# (on the same draws, the same output). Budgets grow along each line as listed in its legend.

# %%
SW = sinks(4) | window(256)
FAMILIES = {  # SW = sinks(4) + window(256)
    "sinks(4) + window(w): w = 128, 256, 512, 768": [sinks(4) | window(w) for w in (128, 256, 512, 768)],
    "SW + sortlsh(7, 64, r): r = 1, 2, 4": [SW | sortlsh(7, 64, r) for r in (1, 2, 4)],
    "SW + heavykeys(64, 256) + quest(8, c, keep): (c, keep) = (256, 32), (512, 64), (1024, 128)":
        [SW | heavykeys(64, 256) | quest(8, c, keep) for c, keep in ((256, 32), (512, 64), (1024, 128))],
    "SW + topk(k) oracle: k = 16, 64, 256": [SW | topk(kk) for kk in (16, 64, 256)],
}
ERR_HEADS = [(20, 6), (23, 2), (5, 5), (0, 0)]


def direct_run(es, hd, samples=128, seed=0):
    """Relative output error (rows ≥ n/2) and mean keys per query of the direct mode on one head."""
    q, k, v = head_qkv(*hd)
    cfg = HyperConfig(mode="direct", exact_set=es, samples=samples, min_seq_len=256)
    draws = make_draws(cfg, n, n, d, causal=True, batch_shape=(1, 1), rng=seed)
    out, _, keys = direct_heads(q[None, None], k[None, None], v[None, None], scale, cfg, draws, True)
    exact = P[hd] @ v
    return np.linalg.norm(out[0, 0, rows] - exact) / np.linalg.norm(exact), keys[0, 0, rows].mean()


curves = {hd: {fam: np.array([direct_run(es, hd) for es in sets]) for fam, sets in FAMILIES.items()}
          for hd in ERR_HEADS}
fig, axes = plt.subplots(1, len(ERR_HEADS), figsize=(12, 3.2), sharey=True)
for ax, hd in zip(axes, ERR_HEADS):
    for fam, pts in curves[hd].items():
        ax.plot(pts[:, 1], pts[:, 0], "o-", ms=3, label=fam)
    ax.set_yscale("log")
    ax.set_title(f"L{hd[0]}H{hd[1]}", fontsize=9)
    ax.set_xlabel("mean keys per query")
axes[0].set_ylabel("‖õ − o‖ / ‖o‖, rows ≥ 1024")
fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=2, loc="lower center")
fig.tight_layout(rect=(0, 0.12, 1, 1))

# %% [markdown]
# ## Key numbers

# %%
far_heavy = [names[c] for c in np.argsort(-far_share)[:8]]
print("mean over heads: sinks %.3f, window %.3f, far %.3f" % (sink_share.mean(), window_share.mean(),
                                                                far_share.mean()))
print("heads with the most far mass:", ", ".join(f"{nm} {far_share[names.index(nm)]:.2f}" for nm in far_heavy))
for r, label in enumerate(SETS):
    print(f"{label:>20}: mass {mass[r].mean():.3f} (min {mass[r].min():.3f} at {names[mass[r].argmin()]}), "
          f"recall {recall[r].mean():.3f} (min {recall[r].min():.3f} at {names[recall[r].argmin()]})")
groups = {"layer 0": [c for c, (layer, _) in enumerate(heads) if layer == 0],
          "layers 5, 7": [c for c, (layer, _) in enumerate(heads) if layer in (5, 7)],
          "layers 20, 23": [c for c, (layer, _) in enumerate(heads) if layer >= 20]}
for group, cols in groups.items():
    print(f"{group:>13}: far {far_share[cols].mean():.3f}; mass / recall "
          + ", ".join(f"{label} {mass[r, cols].mean():.2f}/{recall[r, cols].mean():.2f}" for r, label in enumerate(SETS)))
print("relative error @ mean keys per query:")
for hd in ERR_HEADS:
    for fam, pts in curves[hd].items():
        print(f"  L{hd[0]}H{hd[1]} {fam.split(':')[0]:>43}:", ", ".join(f"{e:.3f} @ {kq:.0f}" for e, kq in pts))

# %% [markdown]
# **Answer.** On rows ≥ 1024 of the copy text the 45 heads put on average 0.18 of their mass on
# the first 4 keys, 0.32 in the 256-key window and 0.49 beyond it, in three patterns (plot 1).
# Layer-0 heads have no sink (0.00) and spread half their mass (0.52) over the far keys; layers 5
# and 7 put 0.64 far, on a few fixed positions (L7H7 0.87, L5H5 0.79); layers 20 and 23 lean on
# the sinks (0.41), except the retrieval heads L20H6 (0.86 far) and L23H2 (0.80), which read the
# passage 1024 tokens back. Alone (plot 2), `heavykeys(64, 256)` catches the fixed far keys of
# layers 5 and 7 (recall 0.74) but not layer 0 (0.18), and `quest(8, 1024, 128)` comes closest to
# the oracle (mean recall 0.94, worst 0.68 at L0H3). The `causal_lm()` union captures 0.92 of the
# mass at recall 0.97 (worst 0.885, L0H2): 0.97–0.98 in layers 5, 7, 20 and 23 and 0.69 in layer
# 0, where the flat far mass cannot be held by a few hundred keys. The output errors (plot 3)
# follow. For L20H6, L23H2 and L5H5, a window widened to 768 or 1–4 sortLSH rounds leaves the
# error at 0.5–1.1. Heavykeys + quest brings it to 0.007, 0.023 and 0.025 at about 520–540 keys
# per query, on the path of the topk oracle (0.001–0.019 at 530–590 keys). For the diffuse head
# L0H0 every family stays at 0.15–0.25, and only the wider window does better (0.11 at 880
# keys): its error comes from sampling a flat far region, not from a missed heavy key.
