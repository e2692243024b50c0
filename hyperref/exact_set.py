"""Structured exact sets: the keys each query row computes exactly (SPEC §3b).

An exact set ``E`` is a union of named parts; every part is intersected with
what row ``i`` may see. Positions are absolute: row ``i`` is aligned with key
position ``c_i = i + (nk − nq)`` (SPEC §1), causal or not.

* :func:`sinks` ``(s)`` — keys ``j < s`` (the attention sinks of language models);
* :func:`window` ``(w)`` — causal: ``c_i − w < j ≤ c_i``; non-causal: ``|c_i − j| < w``;
* :func:`sortlsh` ``(bits, block, rounds)`` — the sortLSH block mask of SPEC §3 for
  ``rounds`` independent projections, united (``rounds = 1``, ``bits = 7``,
  ``block = 256`` is the paper); ``centred=True`` hashes the keys minus their mean
  (a row's ranking of logits does not change when one vector is subtracted from
  every key, but the angles the hash sees do);
* :func:`topk` ``(k)`` — the *oracle*: the ``k`` visible keys of largest logit
  (ties by smaller ``j``). ``O(nq·nk)``; a yardstick for detectors, not an algorithm.

Parts combine with ``|``::

    >>> E = sinks(4) | window(256) | sortlsh(bits=7, block=64, rounds=2)
    >>> E.describe()
    'sinks(4) | window(256) | sortlsh(bits=7, block=64, rounds=2)'

Each part is a small frozen dataclass with one method, :meth:`ExactPart.member`,
that returns the boolean membership of a row range over a key prefix. A part
that needs randomness declares the shape of its draws (:meth:`ExactPart.draw`);
the draws live in the call's frozen record (:mod:`hyperref.draws`), so every
engine sees the same exact set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import re
from typing import ClassVar

import numpy as np

from ._validation import InputError, check_bool, check_count
from .lsh import buckets
from .mask import query_blocks


@dataclass(frozen=True)
class Geometry:
    """Shapes of one head's problem: ``nq`` rows, ``nk`` keys, causal or not.

    ``offset = nk − nq`` aligns row ``i`` with key position ``c_i = i + offset``.
    """

    nq: int
    nk: int
    causal: bool

    @property
    def offset(self) -> int:
        return self.nk - self.nq

    def visible(self, rows: np.ndarray, nkeys: int) -> np.ndarray:
        """Boolean ``(len(rows), nkeys)``: key ``j`` is visible to row ``i``."""
        if not self.causal:
            return np.ones((len(rows), nkeys), dtype=bool)
        return np.arange(nkeys)[None, :] <= (rows[:, None] + self.offset)


class ExactPart:
    """One named part of an exact set (an interface; see the implementations below)."""

    #: name used by :meth:`describe` and the registry :data:`PARTS`
    kind: ClassVar[str] = ""
    #: True for parts that are yardsticks only (O(nq·nk) work)
    oracle: ClassVar[bool] = False

    def draw_shape(self, geom: Geometry, d: int):
        """``(shape, kind)`` of one head's draw (kind ``"f"`` or ``"i"``); ``None``: deterministic."""
        return None

    def draw(self, geom: Geometry, d: int, batch_shape: tuple, rng: np.random.Generator):
        """The random array this part needs (leading ``batch_shape``); ``None``: deterministic."""
        return None

    def prepare(self, q: np.ndarray, k: np.ndarray, scale: float, geom: Geometry, draws,
                covered: tuple = (0, 0)):
        """Per-head state computed once (hashes, sorted orders, selections); default none.

        ``covered = (s, w)``: the sink count and window width of the whole exact
        set, which a detector need not spend its budget on.
        """
        return None

    def within(self, geom: Geometry) -> "ExactPart":
        """This part with its sizes clamped to the sequence of ``geom``: the same members.

        A block, width, count or number of candidates larger than the sequence (beyond
        int64 too) acts as the whole sequence; arrays are sized and products formed from
        the clamped values. Default: the part itself.
        """
        return self

    def member(self, state, q, k, scale, geom: Geometry, rows: np.ndarray, nkeys: int) -> np.ndarray:
        """Boolean ``(len(rows), nkeys)``: key ``j < nkeys`` is in this part for row ``i``.

        Visibility is applied by :meth:`ExactSet.member`, not here.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """The part as the constructor call that makes it."""
        raise NotImplementedError

    def __or__(self, other) -> "ExactSet":
        return ExactSet((self,)) | other


def _at_most(part: ExactPart, **limits) -> ExactPart:
    """``part`` with each named size at most its limit (the part itself when none is above)."""
    over = {name: limit for name, limit in limits.items() if getattr(part, name) > limit}
    return replace(part, **over) if over else part


def _whole(geom: Geometry) -> int:
    """``max(nq, nk, 1)``: a row block or window this wide holds the whole sequence."""
    return max(geom.nq, geom.nk, 1)


def _scores(x: np.ndarray) -> np.ndarray:
    """``x`` in float64, or longdouble for longdouble inputs (their logits may lie beyond
    float64's range): the dtype the selections score in."""
    return x.astype(np.result_type(x.dtype, np.float64))


def _covered_within(covered: tuple, geom: Geometry) -> tuple:
    """The sink count and window width ``covered``, clamped as :meth:`Sinks.within`, :meth:`Window.within`."""
    s, w = covered
    return min(s, max(geom.nk, 1)), min(w, _whole(geom))


@dataclass(frozen=True)
class Sinks(ExactPart):
    """Keys ``j < count`` (attention sinks)."""

    count: int
    kind: ClassVar[str] = "sinks"

    def __post_init__(self):
        check_count(self.count, "sinks count", least=1)

    def within(self, geom):
        return _at_most(self, count=max(geom.nk, 1))

    def member(self, state, q, k, scale, geom, rows, nkeys):
        return np.broadcast_to(np.arange(nkeys)[None, :] < self.count, (len(rows), nkeys))

    def describe(self) -> str:
        return f"sinks({self.count})"


@dataclass(frozen=True)
class Window(ExactPart):
    """Recent keys: causal ``c_i − w < j ≤ c_i``; non-causal ``|c_i − j| < w``."""

    width: int
    kind: ClassVar[str] = "window"

    def __post_init__(self):
        check_count(self.width, "window width", least=1)

    def within(self, geom):
        return _at_most(self, width=_whole(geom))

    def member(self, state, q, k, scale, geom, rows, nkeys):
        width = self.within(geom).width
        c = rows[:, None] + geom.offset
        j = np.arange(nkeys)[None, :]
        if geom.causal:
            return (j > c - width) & (j <= c)
        return np.abs(c - j) < width

    def describe(self) -> str:
        return f"window({self.width})"


@dataclass(frozen=True)
class SortLSH(ExactPart):
    """The sortLSH block mask of SPEC §3, united over ``rounds`` independent hashes.

    Each round hashes all queries and keys of the head with its own Gaussian
    projections ``W ∈ R^{d×bits}``, stable-sorts both by bucket and cuts them
    into blocks (query at sorted position ``p`` joins block
    ``min(⌊p·nk/(nq·b)⌋, G−1)``). Key ``j`` is in row ``i``'s set if the two share a
    block in any round. ``centred`` hashes ``k_j − mean_j k_j`` instead of ``k_j``.
    """

    bits: int = 7
    block: int = 256
    rounds: int = 1
    centred: bool = False
    kind: ClassVar[str] = "sortlsh"

    def __post_init__(self):
        check_count(self.bits, "sortlsh bits", least=1)
        if self.bits > 30:
            raise InputError(f"sortlsh bits must be <= 30, got {self.bits}")
        check_count(self.block, "sortlsh block", least=1)
        check_count(self.rounds, "sortlsh rounds", least=1)
        check_bool(self.centred, "sortlsh centred")

    def draw_shape(self, geom, d):
        return (self.rounds, d, self.bits), "f"

    def draw(self, geom, d, batch_shape, rng):
        return rng.standard_normal(batch_shape + self.draw_shape(geom, d)[0])

    def within(self, geom):
        return _at_most(self, block=max(geom.nk, 1))

    def prepare(self, q, k, scale, geom, draws, covered=(0, 0)):
        block = self.within(geom).block
        keys = k - k.mean(axis=0, keepdims=True) if self.centred else k
        q_block = np.empty((self.rounds, len(q)), dtype=np.int64)
        k_block = np.empty((self.rounds, len(k)), dtype=np.int64)
        for r in range(self.rounds):
            planes = draws[r]
            perm_q = np.argsort(buckets(q, planes), kind="stable")
            perm_k = np.argsort(buckets(keys, planes), kind="stable")
            q_block[r, perm_q] = query_blocks(len(q), len(k), block)
            k_block[r, perm_k] = np.arange(len(k), dtype=np.int64) // block
        return q_block, k_block

    def member(self, state, q, k, scale, geom, rows, nkeys):
        q_block, k_block = state
        out = np.zeros((len(rows), nkeys), dtype=bool)
        for r in range(self.rounds):
            out |= q_block[r, rows][:, None] == k_block[r, None, :nkeys]
        return out

    def describe(self) -> str:
        centred = ", centred=True" if self.centred else ""
        return f"sortlsh(bits={self.bits}, block={self.block}, rounds={self.rounds}{centred})"


@dataclass(frozen=True)
class TopK(ExactPart):
    """Oracle: the ``k`` visible keys of largest logit per row (ties by smaller ``j``).

    Reference only (``O(nq·nk)`` logits): the upper bound a detector is measured against.
    """

    k: int
    kind: ClassVar[str] = "topk"
    oracle: ClassVar[bool] = True

    def __post_init__(self):
        check_count(self.k, "topk k", least=1)

    def within(self, geom):
        return _at_most(self, k=max(geom.nk, 1))

    def member(self, state, q, k, scale, geom, rows, nkeys):
        logits = (q[rows] @ k[:nkeys].T) * scale
        logits = np.where(geom.visible(rows, nkeys), logits, -np.inf)
        top = min(self.k, nkeys)
        # stable sort of −logits: among equal logits the smaller j comes first
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top]
        out = np.zeros((len(rows), nkeys), dtype=bool)
        np.put_along_axis(out, order, True, axis=1)
        return out & np.isfinite(logits)

    def describe(self) -> str:
        return f"topk({self.k})"


def _far_from_covered(rows: np.ndarray, nkeys: int, geom: Geometry, covered: tuple) -> np.ndarray:
    """Boolean (len(rows), nkeys): visible keys outside the sinks and window ``covered``."""
    s, w = _covered_within(covered, geom)
    j = np.arange(nkeys)[None, :]
    far = geom.visible(rows, nkeys) & (j >= s)
    if w:
        c = rows[:, None] + geom.offset
        far &= (j <= c - w) if geom.causal else (np.abs(c - j) >= w)
    return far


@dataclass(frozen=True)
class BlockTop(ExactPart):
    """Per block of ``block`` consecutive rows, the ``count`` key blocks of highest score.

    Keys are cut by position into blocks of ``block`` (``g``-th: keys
    ``g·b … (g+1)·b − 1``) with mean key ``k̄_g``. Row block ``t`` scores each
    key block that lies wholly outside the window (causal: ends at or before
    ``c_first − w``, ``c_first`` the block's first aligned row) by

    .. math:: \\sigma_{tg} = \\max_{i \\in t}\\; q_i \\cdot \\bar k_g

    and takes the ``count`` best (ties by smaller ``g``). Work
    ``O(nq · nk/b · d)`` for the scores: a fraction ``1/b`` of exact attention's,
    not near-linear (scored a chunk of row blocks at a time). Retrieval keys of
    language models come in runs of consecutive positions (a copied passage),
    which whole key blocks capture.
    """

    block: int = 64
    count: int = 4
    kind: ClassVar[str] = "blocktop"

    def __post_init__(self):
        check_count(self.block, "blocktop block", least=1)
        check_count(self.count, "blocktop count", least=1)

    def within(self, geom):
        block = min(self.block, _whole(geom))
        return _at_most(self, block=block, count=max(1, -(-geom.nk // block)))

    def prepare(self, q, k, scale, geom, draws, covered=(0, 0)):
        part, (_, w) = self.within(geom), _covered_within(covered, geom)
        b, nq, nk = part.block, len(q), len(k)
        starts = np.arange(0, nk, b)
        means = np.add.reduceat(_scores(k), starts, axis=0) / np.diff(np.append(starts, nk))[:, None]
        n_rb = -(-nq // b)
        g_end = np.minimum(starts + b, nk) - 1
        picked = np.empty((n_rb, min(part.count, len(starts))), dtype=np.int64)
        step = max(1, 2**22 // (b * len(starts)))  # row blocks per chunk: scores of ≤ 4M entries
        for t0 in range(0, n_rb, step):
            t1 = min(n_rb, t0 + step)
            per_row = _scores(q[t0 * b:t1 * b]) @ means.T  # (rows, key blocks)
            pad = np.full(((t1 - t0) * b - len(per_row), len(starts)), -np.inf)
            score = np.concatenate([per_row, pad]).reshape(t1 - t0, b, len(starts)).max(axis=1)
            if geom.causal:  # key blocks wholly before every row's window
                first = np.arange(t0, t1) * b + geom.offset
                score = np.where(g_end[None, :] <= (first - w)[:, None], score, -np.inf)
            order = np.argsort(-score, axis=1, kind="stable")[:, :part.count]
            best = np.take_along_axis(score, order, axis=1)
            picked[t0:t1] = np.where(np.isfinite(best), order, -1)
        return picked

    def member(self, state, q, k, scale, geom, rows, nkeys):
        b = self.within(geom).block
        key_block = np.arange(nkeys) // b
        picked = state[rows // b]  # (rows, count), −1 for none
        return (picked[:, :, None] == key_block[None, None, :]).any(axis=1)

    def describe(self) -> str:
        return f"blocktop(block={self.block}, count={self.count})"


@dataclass(frozen=True)
class HeavyKeys(ExactPart):
    """The ``count`` keys of largest attention from a uniform sample of ``rows`` queries.

    Draw rows ``T`` uniformly without replacement; with ``P_T`` their exact
    softmax rows restricted to keys outside the sinks and window
    (:func:`_far_from_covered`), score key ``j`` by its sampled column mass
    ``Σ_{i∈T} P_ij`` and keep the ``count`` best (ties by smaller ``j``): one
    static set per head, intersected with what each row sees. It finds the
    "secondary sinks" that language-model heads keep at fixed positions. Work
    ``O(|T| · nk · d)``, memory the softmax rows of a chunk of ``T`` at a time.
    """

    count: int = 64
    rows: int = 256
    kind: ClassVar[str] = "heavykeys"

    def __post_init__(self):
        check_count(self.count, "heavykeys count", least=1)
        check_count(self.rows, "heavykeys rows", least=1)

    def within(self, geom):
        return _at_most(self, count=max(geom.nk, 1), rows=max(geom.nq, 1))

    def draw_shape(self, geom, d):
        return (min(self.rows, geom.nq),), "i"

    def draw(self, geom, d, batch_shape, rng):
        (n_rows,), _ = self.draw_shape(geom, d)
        heads = int(np.prod(batch_shape, dtype=np.int64))
        out = np.stack([np.sort(rng.choice(geom.nq, size=n_rows, replace=False))
                        for _ in range(heads)]) if heads else np.zeros((0, n_rows), np.int64)
        return out.reshape(batch_shape + (n_rows,)).astype(np.int64)

    def prepare(self, q, k, scale, geom, draws, covered=(0, 0)):
        rows = np.asarray(draws, dtype=np.int64)
        nk = len(k)
        kt = _scores(k.T)
        score = np.zeros(nk)
        step = max(1, 2**20 // max(nk, 1))  # sampled rows per chunk: ≤ 1M scores at once
        for r0 in range(0, len(rows), step):
            part = rows[r0:r0 + step]
            logits = (_scores(q[part]) @ kt) * scale
            logits[~geom.visible(part, nk)] = -np.inf
            peak = logits.max(axis=1, keepdims=True)
            p = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0), out=logits)
            p /= np.maximum(p.sum(axis=1, keepdims=True), np.finfo(p.dtype).tiny)
            p[~_far_from_covered(part, nk, geom, covered)] = 0.0
            score += p.sum(axis=0)
        keep = np.argsort(-score, kind="stable")[:self.count]
        return np.sort(keep[score[keep] > 0])

    def member(self, state, q, k, scale, geom, rows, nkeys):
        mark = np.zeros(nkeys, dtype=bool)
        mark[state[state < nkeys]] = True
        return np.broadcast_to(mark[None, :], (len(rows), nkeys))

    def describe(self) -> str:
        return f"heavykeys(count={self.count}, rows={self.rows})"


@dataclass(frozen=True)
class Quest(ExactPart):
    """Per row, the ``keep`` best of the keys in the ``candidates/block`` key blocks of highest bound.

    Keys are cut by position into blocks of ``block``; each block keeps its
    per-coordinate minimum and maximum key (Tang et al., "Quest", 2024). For
    row ``i`` the bound

    .. math:: \\beta_{ig} = \\sum_c \\max(q_{ic}\\, \\min_{j\\in g} k_{jc},\\;
              q_{ic}\\, \\max_{j\\in g} k_{jc}) \\;\\ge\\; \\max_{j \\in g} q_i \\cdot k_j

    ranks the key blocks lying wholly outside the window (causal: ending at or
    before ``c_i − w``); the keys of the ``candidates/block`` best blocks are
    scored exactly and the ``keep`` of largest logit (ties by smaller ``j``) join
    the exact set. The fewer than ``block`` keys between the last such block and
    the window are left to the sampled residual. Work per row: ``O(nk/b · d)`` for the bounds (a fraction
    ``1/b`` of exact attention's, not near-linear) and ``O(candidates · d)``
    for the exact scores; only ``keep`` keys are attended.
    """

    block: int = 16
    candidates: int = 1024
    keep: int = 128
    kind: ClassVar[str] = "quest"

    def __post_init__(self):
        check_count(self.block, "quest block", least=1)
        check_count(self.candidates, "quest candidates", least=1)
        check_count(self.keep, "quest keep", least=1)
        if self.candidates < self.block:
            raise InputError(f"quest candidates ({self.candidates}) must hold at least one block "
                             f"({self.block} keys)")

    def within(self, geom):
        block = min(self.block, max(geom.nk, 1))
        return _at_most(self, block=block, candidates=max(1, -(-geom.nk // block)) * block,
                        keep=max(geom.nk, 1))

    def prepare(self, q, k, scale, geom, draws, covered=(0, 0)):
        starts = np.arange(0, len(k), self.within(geom).block)
        kk = _scores(k)
        return (np.minimum.reduceat(kk, starts, axis=0), np.maximum.reduceat(kk, starts, axis=0),
                _covered_within(covered, geom)[1])

    def member(self, state, q, k, scale, geom, rows, nkeys):
        kmin, kmax, w = state
        part = self.within(geom)
        b = part.block
        qr = _scores(q[rows])
        bound = np.maximum(qr, 0) @ kmax.T + np.minimum(qr, 0) @ kmin.T  # (rows, key blocks)
        if geom.causal:
            g_end = np.minimum(np.arange(1, len(kmin) + 1) * b, len(k)) - 1
            bound = np.where(g_end[None, :] <= (rows + geom.offset - w)[:, None], bound, -np.inf)
        top = np.argsort(-bound, axis=1, kind="stable")[:, :part.candidates // b]
        picked = np.zeros(bound.shape, dtype=bool)
        np.put_along_axis(picked, top, np.isfinite(np.take_along_axis(bound, top, axis=1)), axis=1)
        cand = np.repeat(picked, b, axis=1)[:, :nkeys]
        logits = np.where(cand, (qr @ _scores(k[:nkeys].T)) * scale, -np.inf)
        best = np.argsort(-logits, axis=1, kind="stable")[:, :part.keep]
        out = np.zeros((len(rows), nkeys), dtype=bool)
        np.put_along_axis(out, best, np.isfinite(np.take_along_axis(logits, best, axis=1)), axis=1)
        return out

    def describe(self) -> str:
        return f"quest(block={self.block}, candidates={self.candidates}, keep={self.keep})"


def _spread(block: int, reps: int) -> np.ndarray:
    """Offsets ``⌈(m+1)·block/reps⌉ − 1`` (``m < reps``) of a row block's representative rows."""
    return np.array([-(-(m + 1) * block // reps) - 1 for m in range(reps)], dtype=np.int64)


def _eligible_keys(j: np.ndarray, c_first: int, c_last: int, s: int, w: int, causal: bool) -> np.ndarray:
    """Keys ``j ≥ s`` visible to every row of a row block and outside each row's window.

    Causal: ``j ≤ c_first − w`` (``j ≤ c_first`` without a window); non-causal: ``j ≤
    c_first − w`` or ``j ≥ c_last + w`` (every key without a window). ``c_first``, ``c_last``
    are the block's first and last aligned rows.
    """
    if causal:
        return (j >= s) & (j <= c_first - w)
    if not w:
        return j >= s
    return (j >= s) & ((j <= c_first - w) | (j >= c_last + w))


@dataclass(frozen=True)
class BlockKeys(ExactPart):
    r"""Per block of ``block`` rows, the ``keep`` keys its rows attend most, found in two stages.

    Row block ``t`` (rows ``t·b … t·b + b − 1``, aligned ``c_first … c_last``) chooses
    among its *eligible* keys ``E_t``: keys ``j ≥ s`` that every row of the block sees
    and that lie outside every row's window (causal: ``j ≤ c_first − w``;
    :func:`_eligible_keys`), ``(s, w)`` the sinks and window of the exact set.

    1. **Coarse.** The ``reps`` spread rows ``r_m = t·b + ⌈(m+1)·b/reps⌉ − 1``
       (clamped to the block) take their exact softmax ``p_{r_m j}`` over every key
       they see; key block ``g`` (positions ``g·B … g·B + B − 1``, ``B`` =
       ``key_block``) scores

       .. math:: \sigma_{tg} = \sum_m \sum_{j \in g \cap E_t} p_{r_m j},

       and the ``⌊candidates/B⌋`` best blocks holding an eligible key (ties by
       smaller ``g``) give the candidates ``C_t`` (their eligible keys). With
       ``peaks=True`` a block scores its largest eligible logit instead, relative to
       the representative's largest visible one (no exponential per logit):

       .. math:: \sigma_{tg} = \max_m \Big(\max_{j \in g \cap E_t} s_{r_m j}
                 - \max_{j \le c_{r_m}} s_{r_m j}\Big).
    2. **Fine.** Every row ``i`` of the block scores the candidates exactly, with
       ``lse_i`` the log normalizer over ``C_t`` and the row's own sinks and window
       keys, and key ``j ∈ C_t`` gets the block's attention mass

       .. math:: \pi_{tj} = \sum_{i \in t} \exp(s_{ij} - \mathrm{lse}_i).

    The ``keep`` keys of largest ``π_tj`` (ties by smaller ``j``) join the exact set of
    every row of the block. Work per block ``O(reps·nk·d)`` for the coarse stage and
    ``O(b·(candidates + s + w + b)·d)`` for the fine one: a fraction about
    ``reps/b + 2·candidates/nk`` of exact causal attention's logits, not near-linear.
    Every row of a block shares the selection, so an engine computes it once per block
    (a block-sparse engine gathers the keys once per query tile).
    """

    block: int = 128
    keep: int = 384
    reps: int = 2
    candidates: int = 2048
    key_block: int = 128
    peaks: bool = False
    kind: ClassVar[str] = "blockkeys"

    def __post_init__(self):
        check_count(self.block, "blockkeys block", least=1)
        check_count(self.keep, "blockkeys keep", least=1)
        check_count(self.reps, "blockkeys reps", least=1)
        check_count(self.candidates, "blockkeys candidates", least=1)
        check_count(self.key_block, "blockkeys key_block", least=1)
        check_bool(self.peaks, "blockkeys peaks")
        if self.candidates < self.key_block:
            raise InputError(f"blockkeys candidates ({self.candidates}) must hold at least one key block "
                             f"({self.key_block} keys)")

    def within(self, geom):
        block = min(self.block, _whole(geom))
        key_block = min(self.key_block, max(geom.nk, 1))
        return _at_most(self, block=block, key_block=key_block, reps=block, keep=max(geom.nk, 1),
                        candidates=max(1, -(-geom.nk // key_block)) * key_block)

    def prepare(self, q, k, scale, geom, draws, covered=(0, 0)):
        part = self.within(geom)
        s, w = _covered_within(covered, geom)
        b, kb = part.block, part.key_block
        nq, nk = len(q), len(k)
        qs, kt = _scores(q), _scores(k).T
        j = np.arange(nk)
        starts = np.arange(0, nk, kb)
        n_pick = part.candidates // kb
        out = np.full((-(-nq // b), part.keep), -1, dtype=np.int64)
        for t in range(len(out)):
            lo, hi = t * b, min(nq, (t + 1) * b)
            c_first, c_last = lo + geom.offset, hi - 1 + geom.offset
            elig = _eligible_keys(j, c_first, c_last, s, w, geom.causal)
            if not elig.any():
                continue
            reps = np.minimum(lo + _spread(b, part.reps), hi - 1)
            logits = np.where(geom.visible(reps, nk), (qs[reps] @ kt) * scale, -np.inf)
            if part.peaks:  # every representative sees the eligible keys: a finite peak
                rel = np.where(elig, logits - logits.max(axis=1, keepdims=True), -np.inf)
                sigma = np.maximum.reduceat(rel, starts, axis=1).max(axis=0)
            else:
                sigma = np.add.reduceat(np.where(elig, _softmax_rows(logits).sum(axis=0), 0.0), starts)
            sigma = np.where(np.add.reduceat(elig.astype(np.int64), starts) > 0, sigma, -np.inf)
            chosen = np.argsort(-sigma, kind="stable")[:n_pick]
            chosen = chosen[np.isfinite(sigma[chosen])]
            cand = np.flatnonzero(elig & np.isin(j // kb, chosen))
            if len(cand) <= part.keep:  # every candidate is kept: the fine stage has no choice
                out[t, :len(cand)] = cand
                continue
            rows = np.arange(lo, hi)
            # the rows' own sinks and window keys (disjoint from the eligible ones)
            if geom.causal:
                near = np.arange(max(s, c_first - w + 1), min(nk, c_last + 1)) if w else np.zeros(0, np.int64)
            else:
                near = np.arange(max(s, c_first - w + 1), min(nk, c_last + w)) if w else np.zeros(0, np.int64)
            own = np.concatenate([np.arange(s), near]).astype(np.int64)
            c = rows[:, None] + geom.offset
            if geom.causal:
                own_ok = (own[None, :] <= c) & ((own[None, :] < s) | (own[None, :] > c - w))
            else:
                own_ok = (own[None, :] < s) | (np.abs(c - own[None, :]) < w)
            logits = (qs[rows] @ kt[:, np.concatenate([own, cand])]) * scale
            logits[:, :len(own)] = np.where(own_ok, logits[:, :len(own)], -np.inf)
            peak = logits.max(axis=1, keepdims=True)
            shift = np.where(np.isfinite(peak), peak, 0.0)
            lse = shift + np.log(np.exp(logits - shift).sum(axis=1, keepdims=True))
            pi = np.exp(logits[:, len(own):] - np.where(np.isfinite(lse), lse, np.inf)).sum(axis=0)
            best = np.sort(cand[np.argsort(-pi, kind="stable")[:part.keep]])
            out[t, :len(best)] = best
        return out

    def member(self, state, q, k, scale, geom, rows, nkeys):
        picked = state[rows // self.within(geom).block]  # (rows, keep), −1 for none
        out = np.zeros((len(rows), nkeys + 1), dtype=bool)
        np.put_along_axis(out, np.where((picked >= 0) & (picked < nkeys), picked, nkeys), True, axis=1)
        return out[:, :nkeys]

    def describe(self) -> str:
        peaks = ", peaks=True" if self.peaks else ""
        return (f"blockkeys(block={self.block}, keep={self.keep}, reps={self.reps}, "
                f"candidates={self.candidates}, key_block={self.key_block}{peaks})")


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row softmax; a row with no finite logit is all zeros."""
    peak = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
    return e / np.maximum(e.sum(axis=1, keepdims=True), np.finfo(e.dtype).tiny)


@dataclass(frozen=True)
class ExactSet:
    """A union of :class:`ExactPart` values (SPEC §3b).

    Examples
    --------
    >>> E = sinks(2) | window(2)
    >>> E.member_rows(np.zeros((6, 1)), np.zeros((6, 1)), 1.0, Geometry(6, 6, True),
    ...               np.arange(6), 6).astype(int)
    array([[1, 0, 0, 0, 0, 0],
           [1, 1, 0, 0, 0, 0],
           [1, 1, 1, 0, 0, 0],
           [1, 1, 1, 1, 0, 0],
           [1, 1, 0, 1, 1, 0],
           [1, 1, 0, 0, 1, 1]])
    """

    parts: tuple = field(default_factory=tuple)

    def __post_init__(self):
        parts = tuple(self.parts)
        for p in parts:
            if not isinstance(p, ExactPart):
                raise InputError(f"an exact set is made of exact-set parts, got {p!r}")
        object.__setattr__(self, "parts", parts)

    def __or__(self, other) -> "ExactSet":
        if isinstance(other, ExactPart):
            return ExactSet(self.parts + (other,))
        if isinstance(other, ExactSet):
            return ExactSet(self.parts + other.parts)
        return NotImplemented

    def describe(self) -> str:
        return " | ".join(p.describe() for p in self.parts) or "(empty)"

    def __str__(self) -> str:
        return self.describe()

    def part(self, kind: str):
        """The first part of type ``kind`` (``"sinks"``, ``"window"``, …) or ``None``."""
        return next((p for p in self.parts if p.kind == kind), None)

    @property
    def sink_count(self) -> int:
        """Largest ``s`` of the ``sinks`` parts (0 if none)."""
        return max((p.count for p in self.parts if isinstance(p, Sinks)), default=0)

    @property
    def window_width(self) -> int:
        """Largest ``w`` of the ``window`` parts (0 if none)."""
        return max((p.width for p in self.parts if isinstance(p, Window)), default=0)

    def within(self, geom: Geometry) -> "ExactSet":
        """Every part clamped to the sequence (:meth:`ExactPart.within`): the same members."""
        return ExactSet(tuple(p.within(geom) for p in self.parts))

    def draw_shapes(self, geom: Geometry, d: int) -> tuple:
        """:meth:`ExactPart.draw_shape` of every part, in order."""
        return tuple(p.draw_shape(geom, d) for p in self.parts)

    def draw(self, geom: Geometry, d: int, batch_shape: tuple, rng) -> tuple:
        """Draws of every part, in order (``None`` for deterministic parts)."""
        return tuple(p.draw(geom, d, batch_shape, rng) for p in self.parts)

    def prepare(self, q, k, scale, geom: Geometry, draws: tuple) -> tuple:
        """Per-head state of every part (``draws`` of this head)."""
        covered = (self.sink_count, self.window_width)
        return tuple(p.prepare(q, k, scale, geom, dr, covered) for p, dr in zip(self.parts, draws))

    def member(self, states, q, k, scale, geom: Geometry, rows, nkeys) -> np.ndarray:
        """Boolean ``(len(rows), nkeys)``: ``j ∈ E_i`` and ``j`` visible to row ``i``."""
        out = np.zeros((len(rows), nkeys), dtype=bool)
        for p, st in zip(self.parts, states):
            out |= p.member(st, q, k, scale, geom, rows, nkeys)
        return out & geom.visible(rows, nkeys)

    def member_rows(self, q, k, scale, geom: Geometry, rows, nkeys, draws=None) -> np.ndarray:
        """:meth:`member` with the per-head state prepared here (tests, notebooks)."""
        draws = tuple(None for _ in self.parts) if draws is None else draws
        return self.member(self.prepare(q, k, scale, geom, draws), q, k, scale, geom,
                           np.asarray(rows), nkeys)


def sinks(count: int) -> ExactSet:
    """The first ``count`` keys (SPEC §3b)."""
    return ExactSet((Sinks(count),))


def window(width: int) -> ExactSet:
    """The ``width`` most recent keys of each row (causal), or ``|c_i − j| < width``."""
    return ExactSet((Window(width),))


def sortlsh(bits: int = 7, block: int = 256, rounds: int = 1, *, centred: bool = False) -> ExactSet:
    """The sortLSH block mask of ``rounds`` independent hashes (SPEC §3, §3b)."""
    return ExactSet((SortLSH(bits, block, rounds, centred),))


def blocktop(block: int = 64, count: int = 4) -> ExactSet:
    """Per row block, the ``count`` key blocks of highest ``max_i q_i · k̄_g`` (SPEC §3b)."""
    return ExactSet((BlockTop(block, count),))


def heavykeys(count: int = 64, rows: int = 256) -> ExactSet:
    """The ``count`` keys with the largest attention from ``rows`` sampled queries (SPEC §3b)."""
    return ExactSet((HeavyKeys(count, rows),))


def quest(block: int = 16, candidates: int = 1024, keep: int = 128) -> ExactSet:
    """Per row, the ``keep`` largest logits among the keys of the key blocks of highest Quest bound."""
    return ExactSet((Quest(block, candidates, keep),))


def blockkeys(block: int = 128, keep: int = 384, reps: int = 2, candidates: int = 2048,
              key_block: int = 128, *, peaks: bool = False) -> ExactSet:
    """Per row block, the ``keep`` keys of largest block attention among two-stage candidates
    (``peaks``: candidate blocks by their largest logit instead of their mass)."""
    return ExactSet((BlockKeys(block, keep, reps, candidates, key_block, peaks),))


def topk(k: int) -> ExactSet:
    """The oracle heavy set: the ``k`` largest visible logits of each row (reference only)."""
    return ExactSet((TopK(k),))


#: exact-set constructors by name (what :func:`parse_exact_set` accepts)
PARTS = {"sinks": sinks, "window": window, "sortlsh": sortlsh, "blocktop": blocktop,
         "heavykeys": heavykeys, "quest": quest, "blockkeys": blockkeys, "topk": topk}

_CALL = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$")


def _literal(text: str):
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        raise InputError(f"exact-set arguments are integers or True/False, got {text!r}") from None


def parse_exact_set(text: str) -> ExactSet:
    """An exact set from its description, e.g. ``"sinks(4) | window(256) | sortlsh(7, 64, 2)"``.

    The inverse of :meth:`ExactSet.describe`; parts are the constructors of
    :data:`PARTS` with integer (or ``True``/``False``) arguments, positional or by name.

    Examples
    --------
    >>> parse_exact_set("sinks(4) | sortlsh(bits=7, block=64, rounds=2, centred=True)").describe()
    'sinks(4) | sortlsh(bits=7, block=64, rounds=2, centred=True)'
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"an exact set is a description such as 'sinks(4) | window(256)', got {text!r}")
    result = ExactSet(())
    for piece in text.split("|"):
        match = _CALL.match(piece)
        if not match or match.group(1) not in PARTS:
            raise InputError(f"unknown exact-set part {piece.strip()!r}; parts are "
                             + ", ".join(f"{name}(...)" for name in PARTS))
        args, kwargs = [], {}
        for arg in filter(None, (a.strip() for a in match.group(2).split(","))):
            if "=" in arg:
                key, value = arg.split("=", 1)
                kwargs[key.strip()] = _literal(value)
            else:
                args.append(_literal(arg))
        try:
            result = result | PARTS[match.group(1)](*args, **kwargs)
        except TypeError as err:
            raise InputError(f"bad arguments in {piece.strip()!r}: {err}") from None
    return result
