"""Fine-grained parameters of a structured exact set (SPEC §2, §3b), memory-light.

The parameters of docs/mathematics.md §2 are defined for any mask ``M``; here
``M_ij = [j ∈ E_i]`` is the membership of an exact set
(:class:`hyperref.exact_set.ExactSet`), intersected with what row ``i`` sees.
:class:`ExactSetMask` produces it a row block at a time, so
:func:`hyperref.theory.parameters.attention_parameters` computes ``α_res``, ``κ``,
the residual stable rank and the captured mass ``h_i`` for it without a second
implementation. :func:`exact_set_parameters` adds what only an exact set has: the
recall against the ``topk`` oracle at equal budget, and the same numbers for every
part of the union (what the part captures alone, and what the union loses without it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hyperref._validation import InputError, check_bool, check_qkv, check_scale
from hyperref.draws import as_generator
from hyperref.exact import logit_blocks
from hyperref.exact_set import ExactPart, ExactSet, Geometry, _far_from_covered, parse_exact_set

from .parameters import Parameters, attention_parameters


class ExactSetMask:
    """The membership ``M_ij = [j ∈ E_i]`` of an exact set (or of some of its parts), by row blocks.

    It has the interface of :class:`hyperref.mask.HeavyMask` (``nq``, ``nk``,
    ``rows(start, stop)``, ``nnz()``), so
    :func:`~hyperref.theory.parameters.attention_parameters` and
    :class:`~hyperref.theory.parameters.SoftmaxOperator` take it as their mask.

    Parameters
    ----------
    exact_set : ExactSet
    states : tuple
        The per-head state of every part, :meth:`hyperref.exact_set.ExactSet.prepare`.
    q, k : ndarray, shapes (nq, d), (nk, d)
    scale : float
    geom : Geometry
    select : tuple of int, optional
        Indices of the parts whose union is the mask (default: all of them).
    cache_bytes : int
        Keep each part's membership, packed to one bit an entry, while the packed
        arrays of all parts fit in this many bytes; otherwise recompute it on every
        pass (memory ``O(rows · nk)`` per call).

    Notes
    -----
    Each part's membership is :meth:`ExactSet.member` of that part alone, with the
    union's state, so the union of the parts is ``ExactSet.member`` of the whole set.
    Masks made by :meth:`restrict` share the cache; the packed unions of the row
    blocks asked for are kept as well (one more bit an entry per mask in use).
    """

    def __init__(self, exact_set: ExactSet, states: tuple, q, k, scale: float, geom: Geometry,
                 select: tuple | None = None, cache_bytes: int = 2**28):
        self.exact_set, self.states = exact_set, states
        self.q, self.k, self.scale, self.geom = q, k, scale, geom
        self.nq, self.nk = geom.nq, geom.nk
        n_parts = len(exact_set.parts)
        self.select = tuple(range(n_parts)) if select is None else tuple(select)
        width = -(-self.nk // 8)
        fits = n_parts * self.nq * width <= cache_bytes
        self._bits = np.zeros((n_parts, self.nq, width), dtype=np.uint8) if fits else None
        self._done = np.zeros(self.nq, dtype=bool)
        self._unions = {}  # (select, start, stop) -> packed union rows, while the parts are cached

    def restrict(self, select: tuple) -> "ExactSetMask":
        """The mask of the union of the parts ``select`` (sharing this mask's cache)."""
        out = object.__new__(ExactSetMask)
        out.__dict__.update(self.__dict__)
        out.select = tuple(select)
        return out

    def part_rows(self, start: int, stop: int) -> np.ndarray:
        """Boolean ``(n_parts, stop − start, nk)``: membership of every part, visible keys only."""
        if self._bits is not None and self._done[start:stop].all():
            return np.unpackbits(self._bits[:, start:stop], axis=2, count=self.nk).astype(bool)
        rows = np.arange(start, stop, dtype=np.int64)
        out = np.stack([ExactSet((part,)).member((state,), self.q, self.k, self.scale, self.geom, rows, self.nk)
                        for part, state in zip(self.exact_set.parts, self.states)])
        if self._bits is not None:
            self._bits[:, start:stop] = np.packbits(out, axis=2)
            self._done[start:stop] = True
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Boolean mask rows ``[start, stop)``, shape ``(stop − start, nk)``."""
        key = (self.select, start, stop)
        if key in self._unions:  # the iterative solves ask for the same row blocks on every pass
            return np.unpackbits(self._unions[key], axis=1, count=self.nk).astype(bool)
        parts = self.part_rows(start, stop)
        out = parts[list(self.select)].any(axis=0) if self.select else np.zeros(parts.shape[1:], bool)
        if self._bits is not None:
            self._unions[key] = np.packbits(out, axis=1)
        return out

    def nnz(self) -> int:
        """Number of ones (a row block at a time)."""
        step = max(1, 2**22 // max(1, self.nk))
        return int(sum(self.rows(s, min(self.nq, s + step)).sum() for s in range(0, self.nq, step)))


@dataclass(frozen=True)
class PartParameters:
    """One part of an exact set, with the union's state (what it contributes there).

    Attributes
    ----------
    description : str
        The part, as :meth:`ExactPart.describe` writes it.
    keys_mean : float
        Mean over rows of ``|E^p_i|`` (visible keys of the part).
    far_keys_mean : float
        Mean over rows of ``|E^p_i ∩ F_i|`` (its keys beyond the set's sinks and window).
    mass_mean, mass_min : float
        Mean and minimum over rows of ``Σ_{j∈E^p_i} P_ij``.
    gain_mean : float
        Mean over rows of ``h_i(E) − h_i(E without the part)`` (its marginal gain).
    recall, far_recall : float
        As :attr:`ExactSetParameters.recall` and ``far_recall``, for the part alone.
    params : Parameters or None
        :func:`~hyperref.theory.parameters.attention_parameters` with the part alone as
        the mask (``None`` unless asked for).
    """

    description: str
    keys_mean: float
    far_keys_mean: float
    mass_mean: float
    mass_min: float
    gain_mean: float
    recall: float
    far_recall: float
    params: Parameters | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "params"}
        if self.params is not None:
            out.update({f"params_{k}": v for k, v in self.params.as_dict().items()})
        return out


def _of_params(name: str) -> property:
    """A read-only attribute that is ``self.params.<name>``."""
    return property(lambda self: getattr(self.params, name), doc=f"``params.{name}``.")


@dataclass(frozen=True)
class ExactSetParameters:
    """The parameters of SPEC §2 for an exact set, its recall and its parts (SPEC §3b).

    Attributes
    ----------
    description : str
        The exact set.
    params : Parameters
        With ``M`` the exact set's membership: ``alpha_res``, ``kappa``,
        ``kappa_zero_rows``, ``srank_res``, ``fro_res``, ``heavy_mass_mean`` and
        ``heavy_mass_min`` (the captured mass), …
    keys_mean : float
        Mean over rows of ``|E_i|``.
    far_keys_mean : float
        Mean over rows of ``|E_i ∩ F_i|``, the keys beyond sinks and window.
    recall : float
        ``Σ_i h_i / Σ_i top_{|E_i|}(P_i)``: the captured mass against the ``topk``
        oracle with the row's own budget.
    far_recall : float
        ``Σ_i Σ_{E_i∩F_i} P_ij / Σ_i top_{|E_i∩F_i|}(P_i on F_i)``: the detectors'
        recall beyond sinks and window, at the same budget (``nan`` if there is none).
    parts : tuple of PartParameters
        One per part, in order (empty unless asked for).
    """

    description: str
    params: Parameters
    keys_mean: float
    far_keys_mean: float
    recall: float
    far_recall: float
    parts: tuple = ()

    alpha_res = _of_params("alpha_res")
    kappa = _of_params("kappa")
    srank_res = _of_params("srank_res")
    mass_mean = _of_params("heavy_mass_mean")
    mass_min = _of_params("heavy_mass_min")

    def as_dict(self) -> dict:
        """Scalars of the set (its ``Parameters`` flattened); the parts left out."""
        out = {k: v for k, v in asdict(self).items() if k not in ("params", "parts")}
        out.update(self.params.as_dict())
        return out


def _top_mass(sorted_cum: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mass of the ``counts[i]`` largest entries of row ``i`` from its descending cumulative sums."""
    idx = np.clip(counts - 1, 0, sorted_cum.shape[1] - 1)
    return np.where(counts > 0, np.take_along_axis(sorted_cum, idx[:, None], axis=1)[:, 0], 0.0)


def _check_draws(exact_set: ExactSet, draws, geom: Geometry, d: int) -> tuple:
    """The exact set's draws for one head, checked against :meth:`ExactSet.draw_shapes`."""
    shapes = exact_set.draw_shapes(geom, d)
    if not isinstance(draws, tuple) or len(draws) != len(shapes):
        raise InputError(f"draws must be a tuple with one entry per part ({len(shapes)}), as "
                         f"ExactSet.draw(geom, d, (), rng) returns, got {type(draws).__name__}")
    for i, (want, got) in enumerate(zip(shapes, draws)):
        if want is None:
            if got is not None:
                raise InputError(f"draws: part {i} ({exact_set.parts[i].describe()}) is deterministic; "
                                 "its draw must be None")
            continue
        shape, kind = want
        if not isinstance(got, np.ndarray) or got.shape != shape or got.dtype.kind != kind:
            raise InputError(f"draws: part {i} ({exact_set.parts[i].describe()}) needs an array of shape "
                             f"{shape} and kind '{kind}', got {getattr(got, 'shape', type(got).__name__)}")
        if kind == "i" and got.size and not ((got >= 0) & (got < geom.nq)).all():
            raise InputError(f"draws: part {i} must hold row indices in [0, {geom.nq})")
        if kind == "f" and not np.isfinite(got).all():
            raise InputError(f"draws: part {i} must be finite")
    return draws


def exact_set_parameters(q, k, v, exact_set, scale=None, *, causal=True, draws=None, parts=True,
                         part_params=False, residual_norm=True, rng=0,
                         cache_bytes=2**28) -> ExactSetParameters:
    r"""The parameters of SPEC §2 for one head and an exact set, with recall and per-part numbers.

    Parameters
    ----------
    q, k, v : ndarray, shapes (nq, d), (nk, d), (nk, dv)
    exact_set : ExactSet, ExactPart or str
        The exact set (a description such as ``"sinks(4) | window(256)"`` is parsed).
    scale : float, optional
        Default ``1/sqrt(d)``.
    causal : bool
        Causal (bottom-right aligned) visibility.
    draws : tuple, optional
        The exact set's draws for this head (``ExactSet.draw(geom, d, (), rng)``, or
        ``DirectDraws.exact`` of one head). Default: drawn from ``rng``.
    parts : bool
        Also report every part (:class:`PartParameters`).
    part_params : bool
        Also compute :class:`~hyperref.theory.parameters.Parameters` for every part alone
        (one more :func:`~hyperref.theory.parameters.attention_parameters` call per part).
    residual_norm : bool
        Compute ``‖P∘(1−M)‖_op`` and the residual stable rank (an iterative solve per mask).
    rng : int or numpy.random.Generator
        Seed of the exact set's draws (when not given) and of the operator-norm solves.
    cache_bytes : int
        Memory for the packed membership (:class:`ExactSetMask`).

    Returns
    -------
    ExactSetParameters

    Raises
    ------
    InputError
        Bad inputs, an exact set that is not one, draws of the wrong shapes.

    Notes
    -----
    With ``M_ij = [j ∈ E_i]`` (visible keys only), ``P_res = P∘(1−M)`` and
    ``r_i = Σ_j (1 − M_ij) A_ij``:

    .. math::
        \alpha_{\rm res} = n_k\max_j\|P_{\rm res}e_j\|^2,\quad
        \kappa = \frac{\max_i r_i}{\min_{i:\,r_i>0} r_i},\quad
        \mathrm{srank}(P_{\rm res}) = \frac{\|P_{\rm res}\|_F^2}{\|P_{\rm res}\|_{op}^2},\quad
        h_i = \sum_{j\in E_i}P_{ij},

    .. math::
        \mathrm{recall} = \frac{\sum_i h_i}{\sum_i \mathrm{top}_{|E_i|}(P_i)},\qquad
        \mathrm{gain}_p = \frac1{n}\sum_i \big(h_i(E) - h_i(E\setminus p)\big),

    where ``top_c(P_i)`` is the mass of the ``c`` largest entries of row ``i`` (the
    ``topk`` oracle with the row's own budget: recall ``≤ 1``, ``= 1`` for ``topk``
    itself) and ``E \ p`` the union of the other parts. ``far_recall`` is the same
    ratio on the keys ``F_i`` beyond sinks and window (docs/mathematics.md §3b). Means
    are over the rows that see at least one key. Work ``O(nq·nk·d)`` a pass, memory
    ``O(rows·nk)`` plus the packed membership.

    Examples
    --------
    >>> from hyperref.exact_set import sinks, window
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 64, 4))
    >>> es = exact_set_parameters(q, k, v, sinks(2) | window(8))
    >>> [p.description for p in es.parts], bool(0 < es.recall <= 1)
    (['sinks(2)', 'window(8)'], True)
    """
    q, k, v, single = check_qkv(q, k, v)
    if not single:
        raise InputError(f"q, k, v must be one head, shapes (nq, d), (nk, d), (nk, dv); got {q.shape[:2]} "
                         "batch and head axes")
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    nq, nk, d = len(q), len(k), q.shape[1]
    if not (nq and nk):
        raise InputError(f"the parameters need nq, nk >= 1, got nq={nq}, nk={nk}")
    causal = check_bool(causal, "causal")
    parts, part_params = check_bool(parts, "parts"), check_bool(part_params, "part_params")
    residual_norm = check_bool(residual_norm, "residual_norm")
    scale = check_scale(scale, d)
    if isinstance(exact_set, str):
        exact_set = parse_exact_set(exact_set)
    elif isinstance(exact_set, ExactPart):
        exact_set = ExactSet((exact_set,))
    if not isinstance(exact_set, ExactSet) or not exact_set.parts:
        raise InputError(f"exact_set must be a non-empty ExactSet (e.g. sinks(4) | window(256)), got {exact_set!r}")
    geom = Geometry(nq, nk, causal)
    if draws is None:
        gen = as_generator(rng)
        draws = exact_set.draw(geom, d, (), gen)
        rng = gen
    draws = _check_draws(exact_set, draws, geom, d)
    mask = ExactSetMask(exact_set, exact_set.prepare(q, k, scale, geom, draws), q, k, scale, geom,
                        cache_bytes=cache_bytes)
    params = attention_parameters(q, k, v, scale, causal=causal, mask=mask, residual_norm=residual_norm, rng=rng)
    stats = _mass_pass(q, k, scale, geom, mask, exact_set, parts)
    part_list = ()
    if parts:
        n_parts = len(exact_set.parts)
        part_list = tuple(
            PartParameters(
                description=part.describe(), keys_mean=stats["part_keys"][p],
                far_keys_mean=stats["part_far_keys"][p], mass_mean=stats["part_mass"][p],
                mass_min=stats["part_min"][p], gain_mean=stats["part_gain"][p], recall=stats["part_recall"][p],
                far_recall=stats["part_far_recall"][p],
                params=attention_parameters(q, k, v, scale, causal=causal, mask=mask.restrict((p,)),
                                            residual_norm=residual_norm, rng=rng,
                                            norm_p=(params.op_p, params.op_p_residual)) if part_params else None)
            for p, part in zip(range(n_parts), exact_set.parts))
    return ExactSetParameters(exact_set.describe(), params, stats["keys"], stats["far_keys"], stats["recall"],
                              stats["far_recall"], part_list)


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a float, ``nan`` when ``den`` is 0 (no budget, nothing to recall)."""
    return float(num) / float(den) if den > 0 else float("nan")


def _mass_pass(q, k, scale, geom: Geometry, mask: ExactSetMask, exact_set: ExactSet, parts: bool) -> dict:
    """One pass over row blocks: captured masses, oracle masses and key counts (set and parts)."""
    n_parts = len(exact_set.parts)
    sinks, width = exact_set.sink_count, exact_set.window_width
    keys = far_keys = mass = oracle = far_mass = far_oracle = 0.0
    p_keys, p_far_keys, p_mass, p_gain, p_oracle = (np.zeros(n_parts) for _ in range(5))
    p_far_mass, p_far_oracle = np.zeros(n_parts), np.zeros(n_parts)
    p_min = np.full(n_parts, np.inf)
    seen_rows = 0
    for start, stop, logits in logit_blocks(q, k, scale, causal=geom.causal):
        rows = np.arange(start, stop, dtype=np.int64)
        logits = logits.astype(np.float64)
        peak = logits.max(axis=1, keepdims=True)
        seen = np.isfinite(peak[:, 0])  # rows that see at least one key
        a = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
        P = a / np.where(seen, a.sum(axis=1), 1.0)[:, None]
        member = mask.part_rows(start, stop)
        union = member.any(axis=0)
        far = _far_from_covered(rows, geom.nk, geom, (sinks, width))  # docs/mathematics.md §3b "far"
        top = np.cumsum(-np.sort(-P, axis=1), axis=1)
        top_far = np.cumsum(-np.sort(-np.where(far, P, 0.0), axis=1), axis=1)
        h = np.where(union, P, 0.0).sum(axis=1)
        n_union, n_far = union.sum(axis=1), (union & far).sum(axis=1)
        keys += n_union[seen].sum()
        far_keys += n_far[seen].sum()
        mass += h[seen].sum()
        oracle += _top_mass(top, n_union)[seen].sum()
        far_mass += np.where(union & far, P, 0.0).sum(axis=1)[seen].sum()
        far_oracle += _top_mass(top_far, n_far)[seen].sum()
        seen_rows += int(seen.sum())
        if not parts:
            continue
        for p in range(n_parts):
            mp = member[p]
            hp = np.where(mp, P, 0.0).sum(axis=1)
            others = member[[x for x in range(n_parts) if x != p]].any(axis=0)
            np_keys, np_far = mp.sum(axis=1), (mp & far).sum(axis=1)
            p_keys[p] += np_keys[seen].sum()
            p_far_keys[p] += np_far[seen].sum()
            p_mass[p] += hp[seen].sum()
            p_min[p] = min(p_min[p], hp[seen].min(initial=np.inf))
            p_gain[p] += (h - np.where(others, P, 0.0).sum(axis=1))[seen].sum()
            p_oracle[p] += _top_mass(top, np_keys)[seen].sum()
            p_far_mass[p] += np.where(mp & far, P, 0.0).sum(axis=1)[seen].sum()
            p_far_oracle[p] += _top_mass(top_far, np_far)[seen].sum()
    rows_ = max(seen_rows, 1)
    return {
        "keys": float(keys) / rows_, "far_keys": float(far_keys) / rows_,
        "recall": _ratio(mass, oracle), "far_recall": _ratio(far_mass, far_oracle),
        "part_keys": [float(x) / rows_ for x in p_keys], "part_far_keys": [float(x) / rows_ for x in p_far_keys],
        "part_mass": [float(x) / rows_ for x in p_mass],
        "part_min": [float(x) if np.isfinite(x) else float("nan") for x in p_min],
        "part_gain": [float(x) / rows_ for x in p_gain],
        "part_recall": [_ratio(a, b) for a, b in zip(p_mass, p_oracle)],
        "part_far_recall": [_ratio(a, b) for a, b in zip(p_far_mass, p_far_oracle)],
    }
