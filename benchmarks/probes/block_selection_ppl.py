"""Perplexity of SmolLM2-135M when each block of query rows shares one key selection.

A script, not a test. The model (:func:`hyperref.lm.load_model`) runs on one
text of ``n`` tokens with the attention of all 30 layers replaced by a dense
*restricted exact softmax*: per head, row ``i`` attends with the exact softmax
of its logits restricted to a key set ``E_i`` (causal mask kept, no sampling),
``o_i = Σ_{j∈E_i} softmax_E(S_i)_j v_j``. Query head ``h`` reads key/value head
``h // 3``. ``base = sinks(4) | window(256) | heavykeys(64, 256)`` are hyperref's
own parts (:mod:`hyperref.exact_set`; the heavykeys rows are drawn from one
``numpy.random.default_rng(seed)`` stream, one draw per layer call). With ``P``
the exact causal softmax of a row over all its visible keys:

* ``block-oracle(bq, K)``: rows ``t·bq … t·bq + bq − 1`` form block ``t`` with
  first row ``c_t = t·bq``; ``B_t`` = the ``K`` keys ``j <= c_t − 256`` outside
  the sinks and heavykeys with the largest block-summed attention
  ``Σ_{i∈t} P_ij``; ``E_i = base_i ∪ B_t`` (every row of the block gets the
  same ``B_t``; all of it is visible and outside the window of every row of the block);
* ``row-oracle(K)``: per row, the ``K`` visible keys outside ``base_i`` of
  largest ``P_ij`` (a per-row ceiling at the same ``K``);
* ``row-quest(b, c, k)``: ``base | quest(b, c, k)`` (hyperref's per-row Quest part), exact, no samples;
* ``base``: ``base`` alone (the floor).

For each configuration the script reports the perplexity over the second half of
the text (``ppl2``, targets ``n/2 … n − 1``, :func:`hyperref.lm._perplexities`)
and the mean ``|E_i|`` over all layers, heads and rows (``keys``) and over rows
``i >= n/2`` (``keys2``). Reference rows at the same ``n``: exact attention
(transformers' SDPA) and hyperref's preset :func:`hyperref.presets.causal_lm`
(per-row Quest + 128 ``mixed`` samples, through :func:`hyperref.lm.evaluate`).

Texts: ``copy:FILE`` (the file's first ``n/2`` tokens twice; the second half
needs retrieval from ``n/2`` back) or ``plain:FILE`` (first ``n`` tokens).

Usage::

    python benchmarks/probes/block_selection_ppl.py --n 2048 --text copy:typing.py \\
        [--text plain:argparse.py] [--configs base,block:128:384,block:32:384,row:384,quest,preset]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import sysconfig
import time

import numpy as np
import torch

from hyperref import lm, presets
from hyperref.exact_set import Geometry, heavykeys, quest, sinks, window

W = 256
BASE = sinks(4) | window(W) | heavykeys(64, 256)
_names = itertools.count()


class Restricted:
    """Attention function for transformers: dense exact softmax restricted to ``E_i`` per head."""

    def __init__(self, kind: str, K: int = 384, bq: int = 128, seed: int = 0, exact_set=BASE):
        self.kind, self.K, self.bq, self.exact_set = kind, K, bq, exact_set
        self.rng = np.random.default_rng(seed)
        self.keys: list[float] = []
        self.keys2: list[float] = []

    def base_masks(self, q: np.ndarray, k: np.ndarray, scale: float, es) -> np.ndarray:
        """``(H, n, n)`` membership of ``es`` (visible keys only), hyperref's parts."""
        H, n, d = q.shape
        g = H // k.shape[0]
        geom = Geometry(n, n, True)
        es = es.within(geom)
        draws = es.draw(geom, d, (H,), self.rng)
        rows = np.arange(n)
        out = np.empty((H, n, n), dtype=bool)
        for h in range(H):
            dh = tuple(None if dr is None else dr[h] for dr in draws)
            out[h] = es.member_rows(q[h], k[h // g], scale, geom, rows, n, draws=dh)
        return out

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("one unpadded sequence only (the causal mask is implied)")
        b, H, n, d = query.shape
        assert b == 1
        scale = scaling if scaling is not None else module.scaling
        g = H // key.shape[1]
        q = query[0].double()
        k = key[0].double().repeat_interleave(g, dim=0)
        v = value[0].double().repeat_interleave(g, dim=0)
        base = torch.from_numpy(self.base_masks(q.numpy(), key[0].double().numpy(), scale,
                                                self.exact_set))
        jj = torch.arange(n)
        visible = jj[None, :] <= jj[:, None]  # (n, n)
        S = (q @ k.transpose(1, 2)) * scale
        S.masked_fill_(~visible, -torch.inf)
        E = base
        if self.kind in ("row", "block"):
            P = torch.softmax(S, dim=-1)
            if self.kind == "row":
                far = visible & ~base
                score = torch.where(far, P, torch.full_like(P, -1.0))
                kk = min(self.K, n)
                idx = score.topk(kk, dim=-1).indices
                sel = torch.zeros_like(base).scatter_(-1, idx, True) & far
            else:
                bq = self.bq
                nb = -(-n // bq)
                pad = nb * bq - n
                Pb = torch.nn.functional.pad(P, (0, 0, 0, pad)).reshape(H, nb, bq, n).sum(2)
                first = torch.arange(nb) * bq
                static = base[:, n - 1, :]  # sinks | heavykeys (| window of the last row)
                cand = (jj[None, None, :] <= (first - W)[None, :, None]) & ~static[:, None, :]
                score = torch.where(cand, Pb, torch.full_like(Pb, -1.0))
                kk = min(self.K, n)
                idx = score.topk(kk, dim=-1).indices
                selb = torch.zeros_like(cand).scatter_(-1, idx, True) & cand  # (H, nb, n)
                sel = selb.repeat_interleave(bq, dim=1)[:, :n]
            E = base | sel
        E = E & visible
        S = S.masked_fill(~E, -torch.inf)
        out = torch.softmax(S, dim=-1) @ v
        cnt = E.sum(-1).double()
        self.keys.append(float(cnt.mean()))
        self.keys2.append(float(cnt[:, n // 2:].mean()))
        return out.to(query.dtype)[None].transpose(1, 2).contiguous(), None


def run_restricted(model, ids, hook) -> dict:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = f"block_selection_{next(_names)}"
    AttentionInterface.register(name, hook)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    try:
        model.set_attn_implementation(name)
        nll, seconds = lm._forward(model, ids, "cpu")
    finally:
        model.set_attn_implementation("sdpa")
    return {**lm._perplexities(nll), "keys": float(np.mean(hook.keys)),
            "keys2": float(np.mean(hook.keys2)), "seconds": seconds}


def make(spec: str, seed: int):
    """``(label, hook)`` for a config spec (``preset`` and ``exact`` are handled by the caller)."""
    if spec == "base":
        return "base = sinks 4 + window 256 + heavykeys(64)", Restricted("base", seed=seed)
    if spec.startswith("block:"):
        _, bq, K = spec.split(":")
        return (f"base + block-oracle({bq} rows, {K} keys per block)",
                Restricted("block", K=int(K), bq=int(bq), seed=seed))
    if spec.startswith("row:"):
        K = int(spec.split(":")[1])
        return f"base + row-oracle({K} keys per row)", Restricted("row", K=K, seed=seed)
    if spec.startswith("quest"):
        b, c, kp = (8, 2048, 128) if spec == "quest" else map(int, spec.split(":")[1:])
        return (f"base + quest({b}, {c}, {kp}), exact, no samples",
                Restricted("base", seed=seed, exact_set=BASE | quest(b, c, kp)))
    raise SystemExit(f"unknown config {spec!r}")


def text_ids(tok, spec: str, n: int):
    """``(text, ids)`` of a ``copy:FILE`` or ``plain:FILE`` spec (FILE a path or a stdlib file)."""
    kind, _, fname = spec.partition(":")
    path = pathlib.Path(fname)
    if not path.is_file():
        path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / fname
    text = path.read_text(encoding="utf-8")
    return text, lm.token_ids(tok, text, n, kind == "copy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", action="append", required=True, help="copy:FILE or plain:FILE")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--configs", default="base,block:128:384,block:32:384,row:384,quest,preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append one JSON object per run to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = lm.load_model("cpu")
    sink = open(args.json, "a") if args.json else None
    say = lambda line: print(f"[block_selection_ppl] {line}", file=sys.stderr, flush=True)  # noqa: E731
    for spec in args.text:
        kind = spec.partition(":")[0]
        text, ids = text_ids(tok, spec, args.n)
        rows = []
        exact_done = False
        for c in args.configs.split(","):
            start = time.perf_counter()
            if c == "preset":
                r = lm.evaluate(presets.causal_lm(), text=text, n=args.n, copy=kind == "copy",
                                seed=args.seed, model=model, tokenizer=tok)
                if not exact_done:
                    rows.append(("exact", {**r["exact"], "keys": r["exact"]["keys_per_query"],
                                           "keys2": None}))
                    exact_done = True
                label = "preset causal_lm: base + quest(8, 2048, 128) + 128 samples (hyperref.lm)"
                res = {**r["hyper"], "keys": r["hyper"]["keys_per_query"], "keys2": None}
            else:
                label, hook = make(c, args.seed)
                res = run_restricted(model, ids, hook)
            res["wall"] = time.perf_counter() - start
            say(f"{spec} | {label}: ppl2 {res['ppl2']:.4f}, keys {res['keys']:.1f}, {res['wall']:.0f} s")
            rows.append((label, res))
            if sink:
                sink.write(json.dumps({"text": spec, "n": args.n, "config": c, "label": label, **res}) + "\n")
                sink.flush()
        print(f"### {spec}, n = {args.n}\n")
        print("| config | keys/row (all rows) | keys/row (rows >= n/2) | ppl2 |")
        print("| --- | ---: | ---: | ---: |")
        for label, res in rows:
            k2 = "-" if res["keys2"] is None else f"{res['keys2']:.0f}"
            print(f"| {label} | {res['keys']:.0f} | {k2} | {res['ppl2']:.4f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
