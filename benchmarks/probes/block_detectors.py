"""Block-granular heavy-key detectors on the attention of SmolLM2-135M, against per-row Quest.

A script, not a test. The measurement is the one of ``benchmarks/detector_recall.py``
(read its docstring): one forward pass of SmolLM2-135M on the CPU over ``n``
tokens records the post-RoPE q, k of the chosen layers (q head ``h`` reads kv
head ``h // 3``); for every head, over the rows ``i >= n/2``, an exact set
``E_i`` gives

* keys = mean ``|E_i|`` over rows (visible keys only);
* recall = ``Σ_i mass_i / Σ_i oracle_i``, ``mass_i = Σ_{j∈E_i} P_ij`` (exact
  softmax) and ``oracle_i`` the mass of the row's ``|E_i|`` largest probabilities.

Every exact set here is ``base | detector``, ``base = sinks(4) | window(256) |
heavykeys(64, 256)`` (hyperref's own parts, seed-0 draws as in
detector_recall.py), except the rows that say otherwise.

A *block detector* selects, per query block ``t`` of ``bq`` rows (rows
``t·bq … t·bq + bq − 1``, first aligned row ``c_t = t·bq``):

* ``C`` key blocks of ``B`` positions (``g``-th: keys ``g·B … g·B + B − 1``),
  only blocks wholly before the window of the block's first row,
  ``g·B + B − 1 <= c_t − w`` (``w = 256``), ranked by a block score ``σ_tg``
  (ties by smaller ``g``; blocks of score ``−inf`` are never taken);
* optionally ``G`` gathered keys ``j <= c_t − w`` outside the chosen blocks and
  outside sinks and heavykeys, ranked by a key score ``π_tj`` (ties by smaller ``j``);

and every row of the block attends to the same selection. Detectors (the
``score`` column names the scorer; ``cost`` is the scoring work as a fraction of
exact causal QKᵀ multiply-adds, ``n²d/2``, at ``n = 8192`` and ``n = 131072``):

* ``rowquest(s)``: per row ``i`` the Quest bound ``β_iu = Σ_c max(q_ic min_{j∈u} k_jc,
  q_ic max_{j∈u} k_jc)`` of every key sub-block ``u`` of ``s`` keys; ``σ_tg = max_{i∈t}
  max_{u⊂g} β_iu``, ``π_tj = max_{i∈t} β_{i,u(j)}`` (gathers whole sub-blocks). Cost ``2/s``.
* ``boxbox(s)``: the block's query box (per-coordinate min/max of its ``bq`` queries)
  against each sub-block's key box, ``Σ_c max`` over the four corner products. Cost ``4/(bq·s)``
  (elementwise, not a matrix product).
* ``meanq-bound(s)``: ``β`` of the block's mean query ``q̄_t``. Cost ``2/(bq·s)``.
* ``blocktop``: ``σ_tg = max_{i∈t} q_i · k̄_g`` (``k̄_g`` the block's mean key;
  hyperref's ``blocktop``). Cost ``1/B``.
* ``reps(kind, r)``: ``r`` representative query vectors per block, exact logits
  against every key ``j <=`` the representative's position (synthetic ones: the
  block's last row), softmax per representative; ``π_tj = Σ_r p_rj`` (their
  summed attention), ``σ_tg = Σ_{j∈g} π_tj``. Kinds: ``last`` (the last row),
  ``spread`` (rows ``t·bq + ⌈(m+1)·bq/r⌉ − 1``, ``m < r``), ``random`` (``r``
  rows drawn without replacement), ``mean`` (``q̄_t``), ``kmeans`` (``r``
  centroids of the block's queries, 8 Lloyd steps from the ``spread`` rows),
  ``mean+spread`` (``q̄_t`` and ``r − 1`` spread rows). Cost ``r/bq``.
* ``reps-bound(kind, r, s)``: the representatives' Quest bounds on sub-blocks of
  ``s`` (max over representatives). Cost ``2r/(bq·s)``.
* ``sketch(p, s)``: q and k projected on the head's top ``p`` right singular
  vectors of its keys; per row ``q_i'·k̄_u'`` against sub-block means in that
  space, max over the block's rows. Cost ``p/(d·s)``.
* ``2-level(coarse → C')``: the coarse scorer's top ``C'`` blocks, then every
  row of the block scores their ``C'·B`` keys exactly, ``π_tj = Σ_{i∈t} exp(S_ij
  − lse_i)`` with ``lse_i`` over the row's sinks, window, heavykeys and the
  candidates; ``σ_tg = Σ_{j∈g} π_tj``. Cost coarse ``+ 2C'B/n``.
* ``2-level(coarse → C', reps)``: the same with the ``spread`` representatives
  scoring the candidates instead of every row. Cost coarse ``+ 2rC'B/(bq·n)``.
* ``2-level(coarse → K keys in s-s)``: candidates are the ``K/s`` sub-blocks of ``s``
  keys of highest ``Σ_{j∈u} π_tj`` under the coarse scorer (its key scores), then
  every row scores them exactly as in ``2-level``. Cost coarse ``+ 2K/n``.

Per-row Quest's cost counts its bounds and the exact scores of its candidates,
``2/8 + 2·candidates/n``.

References: per-row ``quest(8, 8·keep, keep)`` (hyperref's part), with and
without ``base``; detectors alone are marked ``alone``.

Usage::

    python benchmarks/probes/block_detectors.py [--n 2048] [--layers 0,5,7,12,18,20,23,27]
        [--texts plain,copy] [--cache DIR] [--bq 128] [--kb 128] [--budgets C:G,...]
        [--only PREFIX;...] [--show-heads L20H6,...] [--heads K] [--row-blocks R] [--dump FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from hyperref.exact_set import Geometry, heavykeys, quest, sinks, window  # noqa: E402

S_SINKS, W_WIN = 4, 256
BASE = sinks(S_SINKS) | window(W_WIN) | heavykeys(64, 256)
SW = sinks(S_SINKS) | window(W_WIN)


# ---------------------------------------------------------------------------------------------
# capture


def capture(args) -> dict:
    """``{text: (q, k, scale, layers)}``; q ``(L, H, n, d)``, k ``(L, Hk, n, d)`` float64 (cached)."""
    out, need = {}, []
    for text in args.texts:
        path = args.cache / f"qkv_n{args.n}_{text}_{args.layers.replace(',', '-')}.npz"
        if path.is_file():
            z = np.load(path)
            out[text] = (z["q"], z["k"], float(z["scale"]), list(z["layers"]))
        else:
            need.append((text, path))
    if need:
        import torch
        from threadpoolctl import threadpool_limits

        from hyperref.lm import capture_qkv, default_text, load_model, parse_layers, token_ids

        torch.set_num_threads(1)
        threadpool_limits(1)
        model, tokenizer = load_model("cpu")
        layers = sorted(parse_layers(args.layers, model.config.num_hidden_layers))
        for text, path in need:
            ids = token_ids(tokenizer, default_text(), args.n, text == "copy")
            qkv, scale = capture_qkv(model, ids, set(layers))
            q = np.stack([qkv[lay][0] for lay in layers])
            k = np.stack([qkv[lay][1] for lay in layers])
            args.cache.mkdir(parents=True, exist_ok=True)
            np.savez(path, q=q, k=k, scale=scale, layers=np.array(layers))
            out[text] = (q, k, float(scale), layers)
    return out


# ---------------------------------------------------------------------------------------------
# one head's context


@dataclass
class Head:
    q: np.ndarray  # (n, d)
    k: np.ndarray
    scale: float
    bq: int
    kb: int
    seed: int
    rows: np.ndarray  # measured rows: whole query blocks, in increasing order
    blocks: np.ndarray = field(init=False)  # query block indices t
    S: np.ndarray = field(init=False)  # (rows, n) logits, −inf where not visible
    P: np.ndarray = field(init=False)
    best: np.ndarray = field(init=False)
    base: np.ndarray = field(init=False)  # (rows, n) base membership
    sw: np.ndarray = field(init=False)
    hk: np.ndarray = field(init=False)  # (n,) heavykeys
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.q)
        self.blocks = self.rows[::self.bq] // self.bq
        geom = Geometry(n, n, True)
        self.geom = geom
        vis = geom.visible(self.rows, n)
        self.S = np.where(vis, (self.q[self.rows] @ self.k.T) * self.scale, -np.inf)
        p = np.exp(self.S - self.S.max(1, keepdims=True))
        self.P = p / p.sum(1, keepdims=True)
        self.best = np.cumsum(-np.sort(-self.P, axis=1), axis=1)
        self.sw = self.member(SW)
        self.base = self.member(BASE)
        hk_state = BASE.prepare(self.q, self.k, self.scale, geom,
                                BASE.draw(geom, self.q.shape[1], (), np.random.default_rng(self.seed)))[2]
        self.hk = np.zeros(n, bool)
        self.hk[hk_state] = True

    @property
    def n(self):
        return len(self.q)

    def member(self, es) -> np.ndarray:
        geom = self.geom
        draws = es.draw(geom, self.q.shape[1], (), np.random.default_rng(self.seed))
        states = es.prepare(self.q, self.k, self.scale, geom, draws)
        return es.member(states, self.q, self.k, self.scale, geom, self.rows, self.n)

    def limit(self) -> np.ndarray:
        """``(T,)``: last eligible key position per query block, ``c_t − w``."""
        return self.blocks * self.bq - W_WIN

    def block_rows(self) -> np.ndarray:
        """``(T, bq)`` row indices into ``self.rows``."""
        return np.arange(len(self.rows)).reshape(-1, self.bq)

    def metrics(self, member: np.ndarray) -> np.ndarray:
        member = member & np.isfinite(self.S)
        count = member.sum(1)
        mass = (self.P * member).sum(1)
        oracle = np.where(count > 0, self.best[np.arange(len(self.rows)), np.maximum(count, 1) - 1], 0.0)
        return np.array([count.mean(), mass.mean(), oracle.mean(), mass.sum() / max(oracle.sum(), 1e-300)])


# ---------------------------------------------------------------------------------------------
# scorers: (σ (T, n/B), π (T, n) or None)


def _sub_minmax(k, s):
    starts = np.arange(0, len(k), s)
    return np.minimum.reduceat(k, starts, axis=0), np.maximum.reduceat(k, starts, axis=0)


def _bound(qv, kmin, kmax):
    return np.maximum(qv, 0) @ kmax.T + np.minimum(qv, 0) @ kmin.T


def _sub_to_keys(h: Head, sub: np.ndarray, s: int, lse: bool = False):
    """Sub-block scores ``(T, n/s)`` → (σ per key block, π per key), sub-blocks past c_t − w masked."""
    n, kb = h.n, h.kb
    end = np.arange(1, n // s + 1) * s - 1
    sub = np.where(end[None, :] <= h.limit()[:, None], sub, -np.inf)
    grouped = sub.reshape(len(sub), n // kb, kb // s)
    if lse:  # log Σ_u exp(scale·β_u): a soft maximum over the block's sub-blocks
        top = grouped.max(2, keepdims=True)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            sigma = np.log(np.exp(h.scale * (grouped - safe)).sum(2)) + h.scale * safe[..., 0]
        sigma = np.where(np.isfinite(top[..., 0]), sigma, -np.inf)
    else:
        sigma = grouped.max(2)
    return sigma, np.repeat(sub, s, axis=1)


def score_rowquest(h: Head, s: int):
    kmin, kmax = _sub_minmax(h.k, s)
    bnd = _bound(h.q[h.rows], kmin, kmax)  # (rows, n/s)
    sub = bnd[h.block_rows()].max(1)
    return _sub_to_keys(h, sub, s)


def score_boxbox(h: Head, s: int):
    kmin, kmax = _sub_minmax(h.k, s)
    qb = h.q[h.rows][h.block_rows()]  # (T, bq, d)
    qmin, qmax = qb.min(1), qb.max(1)
    corners = np.stack([np.einsum("tc,uc->tuc", a, b) for a in (qmin, qmax) for b in (kmin, kmax)])
    sub = corners.max(0).sum(2)
    return _sub_to_keys(h, sub, s)


def score_meanq_bound(h: Head, s: int, lse: bool = False):
    kmin, kmax = _sub_minmax(h.k, s)
    qbar = h.q[h.rows][h.block_rows()].mean(1)
    return _sub_to_keys(h, _bound(qbar, kmin, kmax), s, lse)


def score_blocktop(h: Head):
    kb = h.kb
    kbar = h.k.reshape(h.n // kb, kb, -1).mean(1)
    sub = (h.q[h.rows] @ kbar.T)[h.block_rows()].max(1)
    return _sub_to_keys(h, sub, kb)[0], None


def representatives(h: Head, kind: str, r: int):
    """``(T, r, d)`` vectors and ``(T, r)`` positions (causal limit of their logits)."""
    br = h.block_rows()
    qb = h.q[h.rows][br]  # (T, bq, d)
    pos_rows = h.rows[br]
    last = pos_rows[:, -1:]
    spread_idx = np.array([-(-(m + 1) * h.bq // r) - 1 for m in range(r)])
    if kind == "last":
        return qb[:, -r:], pos_rows[:, -r:]
    if kind == "spread":
        return qb[:, spread_idx], pos_rows[:, spread_idx]
    if kind == "random":
        rng = np.random.default_rng(h.seed)
        idx = np.stack([np.sort(rng.choice(h.bq, r, replace=False)) for _ in range(len(qb))])
        return np.take_along_axis(qb, idx[:, :, None], 1), np.take_along_axis(pos_rows, idx, 1)
    if kind == "mean":
        return qb.mean(1, keepdims=True), last
    if kind == "mean+spread":
        if r == 1:
            return qb.mean(1, keepdims=True), last
        idx = np.array([-(-(m + 1) * h.bq // (r - 1)) - 1 for m in range(r - 1)])
        return (np.concatenate([qb.mean(1, keepdims=True), qb[:, idx]], 1),
                np.concatenate([last, pos_rows[:, idx]], 1))
    if kind == "kmeans":
        cent = qb[:, spread_idx].copy()
        for _ in range(8):
            dist = ((qb[:, :, None, :] - cent[:, None, :, :]) ** 2).sum(3)  # (T, bq, r)
            lab = dist.argmin(2)
            for c in range(r):
                w = (lab == c)[:, :, None]
                cnt = w.sum(1)
                cent[:, c] = np.where(cnt > 0, (qb * w).sum(1) / np.maximum(cnt, 1), cent[:, c])
        return cent, np.repeat(last, r, 1)
    raise ValueError(kind)


def score_reps(h: Head, kind: str, r: int):
    key = ("reps", kind, r)
    if key not in h.cache:
        vec, pos = representatives(h, kind, r)
        logits = np.einsum("trd,jd->trj", vec, h.k) * h.scale
        logits = np.where(np.arange(h.n)[None, None, :] <= pos[:, :, None], logits, -np.inf)
        p = np.exp(logits - logits.max(2, keepdims=True))
        p /= p.sum(2, keepdims=True)
        pi = p.sum(1)
        pi = np.where(np.arange(h.n)[None, :] <= h.limit()[:, None], pi, -np.inf)
        sigma = pi.reshape(len(pi), h.n // h.kb, h.kb).sum(2)
        h.cache[key] = sigma, pi
    return h.cache[key]


def score_gauss(h: Head, r: int):
    """Gaussian moment of the block's logits: ``log mean_i exp(s q_i·k) ≈ s q̄·k + s²/2 · kᵀΣ_r k``."""
    qb = h.q[h.rows][h.block_rows()]  # (T, bq, d)
    qbar = qb.mean(1)
    _, sv, vt = np.linalg.svd(qb - qbar[:, None, :], full_matrices=False)  # (T, d), (T, d, d)
    var = sv[:, :r] ** 2 / h.bq  # top-r variances
    proj = np.einsum("trd,jd->trj", vt[:, :r], h.k)  # (T, r, n)
    logit = h.scale * (qbar @ h.k.T) + 0.5 * h.scale ** 2 * np.einsum("tr,trj->tj", var, proj ** 2)
    last = h.rows[h.block_rows()][:, -1]
    logit = np.where(np.arange(h.n)[None, :] <= last[:, None], logit, -np.inf)
    p = np.exp(logit - logit.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pi = np.where(np.arange(h.n)[None, :] <= h.limit()[:, None], p, -np.inf)
    return np.where(np.isfinite(pi), pi, 0.0).reshape(len(pi), h.n // h.kb, h.kb).sum(2), pi


def score_reps_bound(h: Head, kind: str, r: int, s: int):
    kmin, kmax = _sub_minmax(h.k, s)
    vec, _ = representatives(h, kind, r)
    sub = np.einsum("trd,ud->tru", np.maximum(vec, 0), kmax) + np.einsum("trd,ud->tru", np.minimum(vec, 0), kmin)
    return _sub_to_keys(h, sub.max(1), s)


def score_sketch(h: Head, p: int, s: int):
    _, _, vt = np.linalg.svd(h.k, full_matrices=False)
    proj = vt[:p].T  # (d, p)
    kbar = (h.k @ proj).reshape(h.n // s, s, p).mean(1)
    sub = ((h.q[h.rows] @ proj) @ kbar.T)[h.block_rows()].max(1)
    return _sub_to_keys(h, sub, s)


def score_oracle(h: Head, agg: str):
    """Not a detector: the block's true attention, ``π_tj = Σ_{i∈t} P_ij`` (or ``max_{i∈t}``)."""
    pt = h.P[h.block_rows()]
    pi = pt.sum(1) if agg == "sum" else pt.max(1)
    pi = np.where(np.arange(h.n)[None, :] <= h.limit()[:, None], pi, -np.inf)
    return np.where(np.isfinite(pi), pi, 0.0).reshape(len(pi), h.n // h.kb, h.kb).sum(2), pi


def two_level(h: Head, coarse, cprime: int, reps: int = 0):
    """Top ``cprime`` blocks of ``coarse``, rescored exactly by every row (or ``reps`` spread rows)."""
    sigma0, _ = coarse(h)
    T, nkb = sigma0.shape
    top = np.argsort(-sigma0, axis=1, kind="stable")[:, :cprime]
    cand_blocks = np.zeros((T, nkb), bool)
    np.put_along_axis(cand_blocks, top, np.isfinite(np.take_along_axis(sigma0, top, 1)), 1)
    return _rescore(h, np.repeat(cand_blocks, h.kb, axis=1), reps)


def two_level_sub(h: Head, coarse, s: int, cand_keys: int, reps: int = 0):
    """The ``cand_keys / s`` sub-blocks of ``s`` keys of highest ``Σ_{j∈u} π_tj`` under ``coarse``, rescored
    exactly by every row (or ``reps`` spread rows)."""
    _, pi0 = coarse(h)
    T, n = pi0.shape
    sub = pi0.reshape(T, n // s, s).sum(2)  # −inf where past c_t − w (s divides the block, so whole sub-blocks)
    top = np.argsort(-sub, axis=1, kind="stable")[:, :cand_keys // s]
    cand_sub = np.zeros(sub.shape, bool)
    np.put_along_axis(cand_sub, top, np.isfinite(np.take_along_axis(sub, top, 1)), 1)
    return _rescore(h, np.repeat(cand_sub, s, axis=1), reps)


def _rescore(h: Head, cand: np.ndarray, reps: int = 0):
    """``(σ, π)`` of the candidate keys ``cand`` ``(T, n)``: ``π_tj = Σ_i exp(S_ij − lse_i)`` over every row
    (or ``reps`` spread rows), ``lse_i`` over the row's sinks, window, heavykeys and the candidates."""
    T, n = cand.shape
    nkb = n // h.kb
    cand_blocks = cand.reshape(T, nkb, h.kb).any(2)
    j = np.arange(h.n)[None, None, :]
    if reps:
        vec, pos = representatives(h, "spread", reps)
        logits = np.einsum("trd,jd->trj", vec, h.k) * h.scale
    else:
        pos = h.rows[h.block_rows()]
        logits = h.S[h.block_rows()]  # (T, bq, n)
    pos = pos[:, :, None]
    # normaliser: the row's sinks, window, heavykeys and the candidates (all computable by the pass)
    known = (j <= pos) & (cand[:, None, :] | (j < S_SINKS) | (j > pos - W_WIN) | h.hk[None, None, :])
    lg = np.where(known, logits, -np.inf)
    e = np.exp(lg - lg.max(2, keepdims=True))
    p = np.where(cand[:, None, :], e, 0.0) / e.sum(2, keepdims=True)
    pi = np.where(cand, p.sum(1), -np.inf)
    sigma = np.where(cand_blocks, np.where(cand, pi, 0.0).reshape(T, nkb, h.kb).sum(2), -np.inf)
    return sigma, pi


# ---------------------------------------------------------------------------------------------
# selection


def select(h: Head, sigma, pi, C: int, G: int) -> np.ndarray:
    """``(rows, n)`` membership: the ``C`` best blocks and ``G`` best gathered keys of each query block."""
    T, nkb = sigma.shape
    n, kb = h.n, h.kb
    j = np.arange(n)
    elig_block = ((np.arange(nkb) + 1) * kb - 1)[None, :] <= h.limit()[:, None]
    sigma = np.where(elig_block, sigma, -np.inf)
    chosen = np.zeros((T, nkb), bool)
    if C:
        top = np.argsort(-sigma, axis=1, kind="stable")[:, :C]
        np.put_along_axis(chosen, top, np.isfinite(np.take_along_axis(sigma, top, 1)), 1)
    keys = np.repeat(chosen, kb, axis=1)
    if G and pi is not None:
        ok = (j[None, :] <= h.limit()[:, None]) & ~keys & ~h.hk[None, :] & (j[None, :] >= S_SINKS)
        sc = np.where(ok, pi, -np.inf)
        top = np.argsort(-sc, axis=1, kind="stable")[:, :G]
        gathered = np.zeros((T, n), bool)
        np.put_along_axis(gathered, top, np.isfinite(np.take_along_axis(sc, top, 1)), 1)
        keys |= gathered
    return np.repeat(keys, h.bq, axis=0)  # query blocks are consecutive row ranges


# ---------------------------------------------------------------------------------------------
# candidates


@dataclass
class Cand:
    name: str
    score: str
    C: int
    G: int
    cost: object  # n -> fraction
    fn: object  # Head -> (sigma, pi)  or  Head -> membership (kind "member")
    kind: str = "block"
    base: bool = True
    gap: bool = False  # also the keys between c_t − w and each row's window


def candidates(bq: int, kb: int, budgets: list, d: int = 64) -> list:
    """References, then every scorer at every budget ``(C, G)``."""
    cands = []
    for keep in (128, 192, 256):
        cands.append(Cand(f"quest(8, {8 * keep}, {keep}) per row", "per-row quest", 0, keep,
                          (lambda kp: (lambda n: 2 / 8 + 2 * 8 * kp / n))(keep),
                          (lambda kp: (lambda h: h.member(BASE | quest(8, 8 * kp, kp))))(keep),
                          kind="member"))
    cands.append(Cand("base alone", "-", 0, 0, lambda n: 0.0, lambda h: np.zeros_like(h.base), kind="member"))
    cands.append(Cand("base", "-", 0, 0, lambda n: 0.0, lambda h: np.zeros_like(h.base), kind="member", gap=True))

    def add(score, fn, cost, keys=True, **kw):
        done = set()
        for C, G in budgets:
            G = G if keys else 0  # a scorer without key scores gathers nothing
            if (C, G) not in done:
                done.add((C, G))
                cands.append(Cand(score, score, C, G, cost, fn, **kw))

    def reps(kind, r):
        return lambda h: score_reps(h, kind, r)

    add("oracle-block", lambda h: score_oracle(h, "sum"), lambda n: float("nan"))
    add("oracle-block(max)", lambda h: score_oracle(h, "max"), lambda n: float("nan"))
    add("rowquest(8)", lambda h: score_rowquest(h, 8), lambda n: 2 / 8)
    add("rowquest(16)", lambda h: score_rowquest(h, 16), lambda n: 2 / 16)
    add("boxbox(8)", lambda h: score_boxbox(h, 8), lambda n: 4 / (bq * 8))
    add("boxbox(16)", lambda h: score_boxbox(h, 16), lambda n: 4 / (bq * 16))
    add("meanq-bound(8)", lambda h: score_meanq_bound(h, 8), lambda n: 2 / (bq * 8))
    add("meanq-bound(16)", lambda h: score_meanq_bound(h, 16), lambda n: 2 / (bq * 16))
    add("meanq-bound-lse(8)", lambda h: score_meanq_bound(h, 8, lse=True), lambda n: 2 / (bq * 8))
    add("blocktop", score_blocktop, lambda n: 1 / kb, keys=False)
    for kind, r in [("last", 1), ("mean", 1), ("spread", 2), ("spread", 4), ("random", 4),
                    ("kmeans", 4), ("mean+spread", 4), ("spread", 8), ("kmeans", 8),
                    ("spread", 16), ("spread", 32)]:
        add(f"reps({kind}, {r})", reps(kind, r), (lambda rr: (lambda n: rr / bq))(r))
    for r in (1, 3, 7):
        add(f"gauss({r})", (lambda rr: (lambda h: score_gauss(h, rr)))(r), (lambda rr: (lambda n: (1 + rr) / bq))(r))
    add("reps-bound(spread, 4, 8)", lambda h: score_reps_bound(h, "spread", 4, 8), lambda n: 2 * 4 / (bq * 8))
    add("reps-bound(spread, 16, 8)", lambda h: score_reps_bound(h, "spread", 16, 8),
        lambda n: 2 * 16 / (bq * 8))
    add("sketch(8, 8)", lambda h: score_sketch(h, 8, 8), lambda n: 8 / (d * 8))
    add("sketch(16, 8)", lambda h: score_sketch(h, 16, 8), lambda n: 16 / (d * 8))
    for C, G in budgets:
        cp = max(8, 2 * C)
        for cname, coarse, ccost in [("meanq-bound(8)", lambda hh: score_meanq_bound(hh, 8), 2 / (bq * 8)),
                                     ("boxbox(16)", lambda hh: score_boxbox(hh, 16), 4 / (bq * 16)),
                                     ("reps(spread, 2)", reps("spread", 2), 2 / bq)]:
            cands.append(Cand(f"2-level({cname} → {cp})", f"2-level({cname} → 2C)", C, G,
                              (lambda cc, c_: (lambda n: cc + 2 * c_ * kb / n))(ccost, cp),
                              (lambda co, c_: (lambda h: two_level(h, co, c_)))(coarse, cp)))
        cands.append(Cand(f"2-level(meanq-bound(8) → {cp}, reps 8)", "2-level(meanq-bound(8) → 2C, reps 8)", C, G,
                          (lambda c_: (lambda n: 2 / (bq * 8) + 2 * 8 * c_ * kb / (bq * n)))(cp),
                          (lambda c_: (lambda h: two_level(h, lambda hh: score_meanq_bound(hh, 8), c_, reps=8)))(cp)))
    # more representatives or more candidate blocks in the coarse stage
    for r, cp in [(2, 16), (8, 8), (8, 16)]:
        add(f"2-level(reps(spread, {r}) → {cp})",
            (lambda r_, c_: (lambda h: two_level(h, reps("spread", r_), c_)))(r, cp),
            (lambda r_, c_: (lambda n: r_ / bq + 2 * c_ * kb / n))(r, cp))
    # fewer candidate blocks (a coarse stage that must discriminate at n = 2048), and candidates in sub-blocks
    for cp in (4, 6):
        add(f"2-level(reps(spread, 4) → {cp})", (lambda c_: (lambda h: two_level(h, reps("spread", 4), c_)))(cp),
            (lambda c_: (lambda n: 4 / bq + 2 * c_ * kb / n))(cp))
    for cname, coarse, ccost, s, ck in [("reps(spread, 4)", reps("spread", 4), 4 / bq, 16, 512),
                                        ("reps(spread, 4)", reps("spread", 4), 4 / bq, 16, 768),
                                        ("reps(spread, 8)", reps("spread", 8), 8 / bq, 16, 512),
                                        ("meanq-bound(8)", lambda hh: score_meanq_bound(hh, 8), 2 / (bq * 8),
                                         8, 512)]:
        add(f"2-level({cname} → {ck} keys in {s}s)",
            (lambda co, s_, ck_: (lambda h: two_level_sub(h, co, s_, ck_)))(coarse, s, ck),
            (lambda cc, ck_: (lambda n: cc + 2 * ck_ / n))(ccost, ck))
    return cands


# ---------------------------------------------------------------------------------------------


def run_head(h: Head, cands) -> np.ndarray:
    out = []
    scored = {}
    for c in cands:
        if c.kind == "member":
            extra = c.fn(h)
        else:
            if c.name not in scored:
                scored[c.name] = c.fn(h)
            sigma, pi = scored[c.name]
            extra = select(h, sigma, pi, c.C, c.G)
        if c.gap:
            c_row = h.rows[:, None]
            lim = np.repeat(h.limit(), h.bq)[:, None]
            j = np.arange(h.n)[None, :]
            extra = extra | ((j > lim) & (j <= c_row - W_WIN))
        out.append(h.metrics((h.base | extra) if c.base else extra))
    return np.array(out)


def fmt_cost(x: float) -> str:
    if x != x:
        return "-"
    return "0" if x == 0 else f"1/{1 / x:.0f}" if x < 0.4 else f"{x:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--layers", default="0,5,7,12,18,20,23,27")
    parser.add_argument("--texts", default="plain,copy", help="plain, copy or both")
    parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path("/tmp/block_detectors_qkv"))
    parser.add_argument("--bq", type=int, default=128)
    parser.add_argument("--kb", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=0, help="only the first K heads of each layer (0: all)")
    parser.add_argument("--row-blocks", type=int, default=0,
                        help="measure only this many evenly spaced blocks of 128 rows of the second half (0: all rows)")
    parser.add_argument("--budgets", default="1:0,1:128,2:128,4:128,8:128,0:256,1:256,0:384",
                        help="comma list of C:G (key blocks : gathered keys)")
    parser.add_argument("--dump", type=pathlib.Path, help="also save the per-head numbers (npz)")
    parser.add_argument("--only", default="", help="only candidates whose score starts with one of these, "
                        "separated by ';'")
    parser.add_argument("--show-heads", default="", help="also a per-head table of these heads, comma list "
                        "(e.g. L18H8,L20H3,L20H5,L20H6,L23H2)")
    args = parser.parse_args(argv)
    args.texts = args.texts.split(",")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    start = time.perf_counter()
    data = capture(args)
    budgets = [tuple(int(x) for x in b.split(":")) for b in args.budgets.split(",")]
    cands = candidates(args.bq, args.kb, budgets)
    if args.only:
        wanted = args.only.split(";")
        cands = [c for c in cands if c.kind == "member" or any(c.score.startswith(w) for w in wanted)]
    results = {}
    for text in args.texts:
        q, k, scale, layers = data[text]
        group = q.shape[1] // k.shape[1]
        n = q.shape[2]
        units = np.arange(n // 2 // 128, n // 128)
        if args.row_blocks:
            units = units[np.linspace(0, len(units) - 1, args.row_blocks).round().astype(int)]
        rows = (units[:, None] * 128 + np.arange(128)[None, :]).ravel()
        per = {}
        for li, layer in enumerate(layers):
            for hh in range(q.shape[1] if not args.heads else args.heads):
                h = Head(q[li, hh].astype(np.float64), k[li, hh // group].astype(np.float64), scale,
                         args.bq, args.kb, args.seed, rows)
                per[f"L{layer}H{hh}"] = run_head(h, cands)
                print(f"{text} L{layer}H{hh} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results[text] = per
    if args.dump:
        labels = [f"{c.name} | {c.C}x{args.kb}+{c.G}" for c in cands]
        np.savez(args.dump, labels=np.array(labels), **{f"{t}__{nm}": v for t, per in results.items()
                                                         for nm, v in per.items()})
    print(report(args, cands, results, data, start, sys.argv[1:] if argv is None else argv))
    return 0


def report(args, cands, results, data, start, argv=None) -> str:
    import torch
    import transformers

    nheads = len(next(iter(results.values())))
    lines = [f"Device: CPU ({platform.machine()}, {platform.processor() or platform.system()}), 1 thread; "
             f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}; {datetime.date.today().isoformat()}. "
             f"Model SmolLM2-135M-Instruct (hyperref.lm.load_model); text hyperref.lm.default_text(), "
             f"plain (first n tokens) and copy (first n/2 tokens twice); n = {args.n}; layers {args.layers} "
             f"({nheads} heads per text); rows i >= {args.n // 2}{f' ({args.row_blocks} evenly spaced blocks of 128 rows)' if args.row_blocks else ''}; bq = {args.bq}, B = {args.kb}; "
             f"base = {BASE.describe()}; seed {args.seed}.", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/probes/block_detectors.py "
             + " ".join(repr(a) if (" " in a or ";" in a or "(" in a) else a for a in (argv or []))
             + "`.", ""]
    lines += ["keys: mean attended exact keys per row; recall: mean over heads, minimum and the worst head; "
              "cost: scoring work / exact causal QKᵀ at n = 8192 and n = 131072.", ""]
    texts = list(results)
    head = "| detector | score | C×B + G | " + " | ".join(
        f"{t} keys | {t} mass | {t} recall | {t} min | {t} worst" for t in texts) + " | cost 8k | cost 128k |"
    lines += [head, "|" + "---|" * (3 + 5 * len(texts) + 2)]
    for ci, c in enumerate(cands):
        cells = []
        for t in texts:
            names = list(results[t])
            tab = np.stack([results[t][nm][ci] for nm in names])
            rec = tab[:, 3]
            cells += [f"{tab[:, 0].mean():.0f}", f"{tab[:, 1].mean():.3f}", f"{rec.mean():.3f}", f"{rec.min():.3f}", names[int(rec.argmin())]]
        budget = f"{c.C}×{args.kb} + {c.G}" if c.kind == "block" else "-"
        lines.append(f"| {c.name}{'' if c.base else ' (alone)'}{' + gap' if c.gap else ''} | {c.score} | {budget} | " + " | ".join(cells)
                     + f" | {fmt_cost(c.cost(8192))} | {fmt_cost(c.cost(131072))} |")
    shown = [nm for nm in args.show_heads.split(",") if nm]
    if shown:
        lines += ["", "Per head (mass: mean exact mass per row; recall as above).", "",
                  "| head | detector | C×B + G | "
                  + " | ".join(f"{t} keys | {t} mass | {t} recall" for t in texts) + " |",
                  "|" + "---|" * (3 + 3 * len(texts))]
        for nm in shown:
            for ci, c in enumerate(cands):
                cells = []
                for t in texts:
                    v = results[t].get(nm)
                    cells += ["-"] * 3 if v is None else [f"{v[ci][0]:.0f}", f"{v[ci][1]:.3f}", f"{v[ci][3]:.3f}"]
                budget = f"{c.C}×{args.kb} + {c.G}" if c.kind == "block" else "-"
                label = f"{c.name}{'' if c.base else ' (alone)'}{' + gap' if c.gap else ''}"
                lines.append(f"| {nm} | {label} | {budget} | " + " | ".join(cells) + " |")
    lines += ["", f"Run time {time.perf_counter() - start:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
