"""Hypothesis strategies that build attention inputs by construction (no ``assume``)."""

import numpy as np
from hypothesis import strategies as st


def _orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


@st.composite
def attention_inputs(draw, n_min=32, n_max=96, d=8, regimes=None):
    """(q, k, v, regime) for one of the SPEC §2 regimes.

    * ``uniform``: tiny logits, α ≈ 1;
    * ``planted``: a controlled number of heavy keys that every query favours;
    * ``lowrank_v``: V with prescribed singular values (controlled srank(V));
    * ``large_logits``: logit scale up to about 50 (unbounded entries);
    * ``clustered``: queries and keys around a few shared directions (LSH-friendly);
    * ``adversarial``: heavy keys orthogonal-ish to their queries' buckets.
    """
    regimes = regimes or ["uniform", "planted", "lowrank_v", "large_logits", "clustered", "adversarial"]
    regime = draw(st.sampled_from(regimes))
    n = draw(st.integers(n_min, n_max))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d))
    k = rng.standard_normal((n, d))
    v = rng.standard_normal((n, d))
    if regime == "uniform":
        q *= 0.01
    elif regime == "planted":
        heavy = draw(st.integers(1, 4))
        strength = draw(st.floats(2.0, 8.0))
        direction = rng.standard_normal(d)
        direction /= np.linalg.norm(direction)
        q = 0.3 * q + strength * direction
        k[:heavy] += strength * direction
    elif regime == "lowrank_v":
        rank = draw(st.integers(1, d))
        sv = np.geomspace(1.0, draw(st.floats(1e-3, 1.0)), rank)
        v = _orthonormal(rng, n, rank) @ np.diag(sv) @ _orthonormal(rng, d, rank).T
    elif regime == "large_logits":
        scale = draw(st.floats(5.0, 50.0))
        q = scale * q / np.linalg.norm(q, axis=1, keepdims=True) * np.sqrt(d)
        k = k / np.linalg.norm(k, axis=1, keepdims=True)
    elif regime == "clustered":
        centers = rng.standard_normal((draw(st.integers(2, 6)), d)) * 3
        q = centers[rng.integers(0, len(centers), n)] + 0.2 * q
        k = centers[rng.integers(0, len(centers), n)] + 0.2 * k
    elif regime == "adversarial":
        # large logits on keys that point away from the query's own hash cell
        k = -q[rng.permutation(n)] * 2 + 0.1 * k
    return q, k, v, regime
