"""Seeded synthetic workloads (the default input of ``hyperref run``)."""

from __future__ import annotations

import numpy as np


def planted_workload(n=16384, d=64, *, batch_shape=(), planted_fraction=0.5,
                     logit=12.0, noise=0.1, dtype=np.float32, rng=0):
    """Gaussian attention with planted heavy entries.

    Keys ``k_j ~ N(0, I_d)``; background queries ``q_i ~ N(0, I_d/4)``. A
    fraction ``planted_fraction`` of the queries is replaced by
    ``q_i = c·(k_π(i) + noise·g)/‖k_π(i)‖`` with ``c`` chosen so that the
    planted logit ``s·q_i·k_π(i)`` (``s = 1/√d``) is about ``logit``: each such
    row puts a large share of its mass on one key, which sortLSH should find
    (small angle). ``v_j ~ N(0, I_d)``.

    Parameters
    ----------
    n, d : int
    batch_shape : tuple
        ``()`` for ``(n, d)`` arrays, ``(B, H)`` for ``(B, H, n, d)``.
    planted_fraction : float in [0, 1]
    logit : float
        Target planted logit.
    noise : float
        Relative perturbation of the planted direction.
    dtype : numpy dtype
    rng : None, int or Generator

    Returns
    -------
    q, k, v : ndarray
    """
    rng = np.random.default_rng(rng)
    shape = tuple(batch_shape) + (n, d)
    k = rng.standard_normal(shape)
    q = 0.5 * rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    planted = rng.random(shape[:-1]) < planted_fraction
    partner = rng.integers(0, n, size=shape[:-1])
    kp = np.take_along_axis(k, partner[..., None], axis=-2)
    knorm = np.linalg.norm(kp, axis=-1, keepdims=True)
    direction = (kp + noise * knorm / np.sqrt(d) * rng.standard_normal(shape)) / knorm
    scaled = direction * (logit * np.sqrt(d) / knorm)
    q = np.where(planted[..., None], scaled, q)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
