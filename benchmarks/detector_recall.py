"""Recall of exact-set detectors on the attention of a real language model (SmolLM2-135M).

A script, not a test. One forward pass of SmolLM2-135M (:func:`hyperref.lm.load_model`,
on the CPU) over ``n`` tokens records the post-RoPE q, k, v of the chosen layers
(an attention function registered with transformers stores its inputs and then
runs transformers' SDPA). For every exact-set variant of :func:`variants` and
every query head of those layers (q head ``h`` reads kv head ``h // 3``), over
the rows ``i >= n/2``:

* keys = mean number of keys of the exact set per row (visible keys only);
* mass = mean over rows of the exact softmax mass on the exact set,
  ``Σ_{j ∈ E_i} P_ij``;
* oracle = mean over rows of the mass of the row's ``c_i`` largest probabilities,
  ``c_i = |E_i|`` (the ``topk`` oracle with the row's own key count);
* recall = ``Σ_i mass_i / Σ_i oracle_i``.

The exact sets are hyperref's own parts: per head
:meth:`hyperref.exact_set.ExactSet.prepare` with the draws of
:meth:`~hyperref.exact_set.ExactSet.draw`, then
:meth:`~hyperref.exact_set.ExactSet.member` on chunks of rows. Prints markdown:
a header line (device, versions, date, arguments), a table averaged over heads
(recall: mean, minimum and the worst head) and a per-head table.

Usage::

    python benchmarks/detector_recall.py [--n 2048] [--layers 0,5,7,12,18,20,23,27] [--copy] [--text FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from hyperref.exact_set import (Geometry, blocktop, heavykeys, quest, sinks, sortlsh,  # noqa: E402
                                window)
from hyperref.presets import causal_lm  # noqa: E402

SW = sinks(4) | window(256)


def variants() -> list:
    """The exact sets measured: single parts, then unions with sinks(4) | window(256) (``SW``)."""
    return [
        sinks(4), window(256), SW,
        sortlsh(7, 256, 1),
        sortlsh(7, 256, 1, centred=True), sortlsh(7, 64, 1), sortlsh(7, 64, 4), sortlsh(7, 64, 4, centred=True),
        blocktop(64, 4), blocktop(16, 16),
        heavykeys(64, 256), heavykeys(256, 256),
        quest(16, 1024, 128), quest(8, 1024, 128), quest(8, 512, 64), quest(8, 256, 32),
        SW | sortlsh(7, 256, 1), SW | sortlsh(7, 64, 2), SW | sortlsh(7, 64, 4, centred=True),
        SW | blocktop(64, 4), SW | heavykeys(64, 256), SW | blocktop(64, 4) | heavykeys(64, 256),
        SW | heavykeys(64, 256) | quest(8, 512, 64), SW | heavykeys(64, 256) | quest(8, 1024, 128),
        causal_lm().exact_set,
    ]


def label(es) -> str:
    """The exact set's description, with ``+`` for ``|`` (markdown cells), and its name if it has one."""
    names = {sortlsh(7, 256, 1): "the paper's", causal_lm().exact_set: "causal_lm()"}
    return es.describe().replace(" | ", " + ") + (f" ({names[es]})" if es in names else "")


def head_recall(q, k, scale, exact_sets, seed, chunk=256) -> np.ndarray:
    """``(len(exact_sets), 4)``: keys, mass, oracle mass (means over rows ``i >= n/2``), recall."""
    n, d = q.shape
    geom = Geometry(n, n, causal=True)
    sums = np.zeros((len(exact_sets), 3))
    prepared = []
    for es in exact_sets:
        draws = es.draw(geom, d, (), np.random.default_rng(seed))
        prepared.append((es, es.prepare(q, k, scale, geom, draws)))
    for start in range(n // 2, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        s = np.where(geom.visible(rows, n), (q[rows] @ k.T) * scale, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        best = np.cumsum(-np.sort(-p, axis=1), axis=1)  # mass of the row's c largest probabilities
        for r, (es, states) in enumerate(prepared):
            member = es.member(states, q, k, scale, geom, rows, n)
            count = member.sum(1)
            oracle = np.where(count > 0, best[np.arange(len(rows)), np.maximum(count, 1) - 1], 0.0)
            sums[r] += count.sum(), (p * member).sum(), oracle.sum()
    rows_total = n - n // 2
    return np.column_stack([sums[:, 0] / rows_total, sums[:, 1] / rows_total, sums[:, 2] / rows_total,
                            sums[:, 1] / np.maximum(sums[:, 2], np.finfo(float).tiny)])


def header(args, n_heads) -> str:
    import torch
    import transformers

    from hyperref.lm import MODEL_FILE

    text = args.text or "hyperref.lm.default_text()"
    return (f"Device: CPU ({platform.machine()}, {platform.processor() or platform.system()}), "
            f"{args.threads} thread(s); Python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{datetime.date.today().isoformat()}. Model {MODEL_FILE}; text {text}"
            f"{' (copy: first n/2 tokens twice)' if args.copy else ''}; n = {args.n}; "
            f"layers {args.layers} ({n_heads} heads); rows i >= {args.n // 2}; seed {args.seed}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens (even, at most 8192)")
    parser.add_argument("--layers", default="0,5,7,12,18,20,23,27", help="layers to capture: all, last:K, first:K, 0,3,7")
    parser.add_argument("--copy", action="store_true", help="the text's first n/2 tokens, twice")
    parser.add_argument("--text", type=pathlib.Path, help="text file (default: hyperref.lm.default_text())")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parts' draws")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from hyperref.lm import capture_qkv, default_text, load_model, parse_layers, token_ids

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model("cpu")
    layers = sorted(parse_layers(args.layers, model.config.num_hidden_layers))
    text = default_text() if args.text is None else args.text.read_text(encoding="utf-8")
    ids = token_ids(tokenizer, text, args.n, args.copy)
    qkv, scale = capture_qkv(model, ids, set(layers))
    chosen = variants()
    per_head = {}
    for layer in layers:
        q, k, _ = qkv[layer]
        group = q.shape[0] // k.shape[0]
        for h in range(q.shape[0]):
            per_head[f"L{layer}H{h}"] = head_recall(q[h], k[h // group], scale, chosen,
                                                    args.seed)
            print(f"L{layer}H{h} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    names = list(per_head)
    table = np.stack([per_head[nm] for nm in names])  # (heads, variants, 4)

    print(header(args, len(names)))
    print()
    print("Averaged over heads (keys, mass, oracle: means; recall: mean, minimum and the worst head).")
    print()
    print("| exact set | keys/row | mass | oracle mass | recall | min recall | worst head |")
    print("|---|---|---|---|---|---|---|")
    for r, es in enumerate(chosen):
        keys, mass, oracle, recall = table[:, r].T
        worst = int(recall.argmin())
        print(f"| {label(es)} | {keys.mean():.1f} | {mass.mean():.3f} | {oracle.mean():.3f} | "
              f"{recall.mean():.3f} | {recall.min():.3f} | {names[worst]} |")
    print()
    print("Per head.")
    print()
    print("| head | exact set | keys/row | mass | oracle mass | recall |")
    print("|---|---|---|---|---|---|")
    for c, name in enumerate(names):
        for r, es in enumerate(chosen):
            keys, mass, oracle, recall = table[c, r]
            print(f"| {name} | {label(es)} | {keys:.1f} | {mass:.3f} | {oracle:.3f} | {recall:.3f} |")
    print()
    print(f"Run time {time.perf_counter() - start:.0f} s (model load, forward pass and detectors).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
