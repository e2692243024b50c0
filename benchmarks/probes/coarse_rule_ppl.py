"""Perplexity of SmolLM2-135M under whole-key-block selections chosen by different coarse rules.

A script, not a test. The question: can the coarse stage of ``blockkeys`` (whole key
blocks, no fine stage) rank key blocks without an exponential per logit? On the GPU
that stage is bounded by its exponentials (``benchmarks/GPU_RESULTS.md``); a rule of
maxima alone would run on the FMA pipes.

All 30 layers' attention is replaced by a dense exact softmax restricted to
``E_i = base_i ∪ (eligible keys of the chosen blocks of i's row block)`` (per head; query
head ``h`` reads key/value head ``h // 3``; float32), ``base = sinks(4) | window(w)``
(hyperref's parts). Row block ``t`` holds rows ``t·128 … t·128 + 127``; its
representatives are the rows ``t·128 + ⌈(m+1)·128/r⌉ − 1`` (``m < r``, as
``blockkeys``); its eligible keys are ``4 <= j <= t·128 − w``; key blocks are 128 keys;
the ``K`` blocks of largest score ``σ_tg`` among those holding an eligible key are chosen
(ties by the smaller block). With ``s_mj`` the representative ``m``'s scaled logits over its
visible keys:

* ``mass``: ``σ_tg = Σ_m Σ_{j∈g eligible} exp(s_mj − lse_m)`` (what ``blockkeys`` does);
* ``peak``: ``σ_tg = max_m max_{j∈g eligible} s_mj`` (the largest raw logit);
* ``peakrel``: ``σ_tg = max_m (max_{j∈g eligible} s_mj − max_j s_mj)`` (relative to the
  representative's own largest logit: no exponential, a per-row shift);
* ``peaksum``: ``σ_tg = Σ_m exp(max_{j∈g eligible} s_mj − max_j s_mj)`` (one exponential
  per key block instead of per logit).

Usage::

    python benchmarks/probes/coarse_rule_ppl.py --n 8192 --text copy:typing.py --text plain:argparse.py \\
        [--rules mass,peak,peakrel,peaksum] [--window 513] [--blocks 8] [--reps 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_selection_ppl import run_restricted, text_ids  # noqa: E402

from hyperref import lm  # noqa: E402
from hyperref.exact_set import _spread  # noqa: E402

BLK = 128
SINKS = 4


class CoarseRule:
    """Attention function for transformers: whole key blocks chosen per row block by ``rule``."""

    def __init__(self, rule: str, window: int, blocks: int, reps: int):
        self.rule, self.w, self.K, self.reps = rule, window, blocks, reps
        self.keys: list[float] = []
        self.keys2: list[float] = []

    def scores(self, S: torch.Tensor, n: int) -> torch.Tensor:
        """``σ`` (T, G) of one head from its scaled logits ``S`` (n, n), −inf where a block holds no eligible key."""
        T, G = -(-n // BLK), -(-n // BLK)
        off = torch.from_numpy(_spread(BLK, self.reps))
        rows = torch.clamp(torch.arange(T)[:, None] * BLK + off[None, :], max=n - 1)  # (T, r)
        s = S[rows]  # (T, r, n), −inf off the visible keys
        j = torch.arange(n)
        elig = (j[None, :] >= SINKS) & (j[None, :] <= (torch.arange(T) * BLK - self.w)[:, None])  # (T, n)
        pad = G * BLK - n
        blocks = lambda x, fill: torch.nn.functional.pad(x, (0, pad), value=fill).unflatten(-1, (G, BLK))
        has = blocks(elig, False).any(-1)  # (T, G)
        se = torch.where(elig[:, None, :], s, -torch.inf)
        if self.rule == "mass":
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            sigma = blocks(torch.exp(se - lse), 0.0).sum(-1).sum(1)
        else:
            peak = blocks(se, -torch.inf).amax(-1)  # (T, r, G)
            top = s.amax(-1, keepdim=True)  # (T, r, 1)
            if self.rule == "peak":
                sigma = peak.amax(1)
            elif self.rule == "peakrel":
                sigma = (peak - top).amax(1)
            elif self.rule == "peaksum":
                sigma = torch.exp(peak - top).sum(1)
            else:
                raise SystemExit(f"unknown rule {self.rule!r}")
        return torch.where(has, sigma, -torch.inf), has

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 is_causal=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("one unpadded sequence only (the causal mask is implied)")
        b, H, n, d = query.shape
        scale = scaling if scaling is not None else module.scaling
        g = H // key.shape[1]
        jj = torch.arange(n)
        visible = jj[None, :] <= jj[:, None]
        base = visible & ((jj[None, :] < SINKS) | (jj[None, :] > jj[:, None] - self.w))
        T = -(-n // BLK)
        first = torch.arange(T) * BLK
        elig_t = (jj[None, :] >= SINKS) & (jj[None, :] <= (first - self.w)[:, None])  # (T, n)
        out = torch.empty(H, n, value.shape[-1], dtype=torch.float32)
        cnt_all, cnt2 = [], []
        for h in range(H):
            q, k, v = query[0, h].float(), key[0, h // g].float(), value[0, h // g].float()
            S = (q @ k.T) * scale
            S.masked_fill_(~visible, -torch.inf)
            sigma, has = self.scores(S, n)
            kk = min(self.K, sigma.shape[-1])
            # the largest first, ties by the smaller block: a stable sort of −σ
            order = torch.sort(-sigma, dim=-1, stable=True).indices[:, :kk]
            chosen = torch.zeros_like(has).scatter_(-1, order, True) & has  # (T, G)
            keys_t = chosen.repeat_interleave(BLK, dim=-1)[:, :n] & elig_t  # (T, n)
            E = base | keys_t.repeat_interleave(BLK, dim=0)[:n]
            S.masked_fill_(~E, -torch.inf)
            out[h] = torch.softmax(S, dim=-1) @ v
            c = E.sum(-1).double()
            cnt_all.append(float(c.mean()))
            cnt2.append(float(c[n // 2:].mean()))
        self.keys.append(float(np.mean(cnt_all)))
        self.keys2.append(float(np.mean(cnt2)))
        return out.to(query.dtype)[None].transpose(1, 2).contiguous(), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", action="append", required=True, help="copy:FILE or plain:FILE")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rules", default="mass,peak,peakrel,peaksum")
    ap.add_argument("--window", type=int, default=513)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="append one JSON object per run to this file")
    args = ap.parse_args(argv)
    model, tok = lm.load_model("cpu")
    sink = open(args.json, "a") if args.json else None
    for spec in args.text:
        ids = text_ids(tok, spec, args.n)[1]
        print(f"### {spec}, n = {args.n}, sinks 4 + window {args.window} + {args.blocks} blocks of 128, "
              f"{args.reps} representatives\n\n| rule | keys/row | ppl2 |\n| --- | ---: | ---: |", flush=True)
        for rule in args.rules.split(","):
            start = time.perf_counter()
            res = run_restricted(model, ids, CoarseRule(rule, args.window, args.blocks, args.reps))
            res["wall"] = time.perf_counter() - start
            print(f"| {rule} | {res['keys']:.1f} | {res['ppl2']:.4f} |", flush=True)
            if sink:
                sink.write(json.dumps({"text": spec, "n": args.n, "rule": rule, "window": args.window,
                                       "blocks": args.blocks, "reps": args.reps, **res}) + "\n")
                sink.flush()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
