"""Dense, brute-force evaluations of SPEC's formulas, for small n only.

Written independently of the package's code paths: explicit matrices
``A``, ``M`` and the sampling matrix ``SᵀS``, loops where SPEC says "for each".
"""

import numpy as np

from hyperref.sampling import resolve_samples, sampling_probabilities


def brute_buckets(x, planes):
    """h(x) = gray⁻¹(c(x)) with gray⁻¹ by table lookup."""
    r = planes.shape[1]
    table = {t ^ (t >> 1): t for t in range(2**r)}
    out = []
    for row in x:
        code = sum((1 << kk) for kk in range(r) if float(row @ planes[:, kk]) > 0)
        out.append(table[code])
    return np.array(out)


def brute_mask(q, k, planes, block):
    """M_ij = [block(q_i) == block(k_j)] from SPEC §3, by sorting tuples."""
    nq, nk = len(q), len(k)
    hq, hk = brute_buckets(q, planes), brute_buckets(k, planes)
    order_q = sorted(range(nq), key=lambda i: (hq[i], i))
    order_k = sorted(range(nk), key=lambda j: (hk[j], j))
    n_blocks = -(-nk // block)
    qb = np.empty(nq, int)
    kb = np.empty(nk, int)
    for p, i in enumerate(order_q):
        qb[i] = min(p * nk // (nq * block), n_blocks - 1)
    for p, j in enumerate(order_k):
        kb[j] = p // block
    return np.array([[qb[i] == kb[j] for j in range(nk)] for i in range(nq)], dtype=float)


def sampling_matrix(u, v, sampler):
    """C = SᵀS: diagonal with C_jj = Σ_t [j_t = j] / (m p_j)."""
    p = sampling_probabilities(v, sampler)
    idx = resolve_samples(u, p)
    c = np.zeros(len(v))
    for j in idx:
        c[j] += 1.0 / (len(u) * p[j])
    return np.diag(c)


def dense_approxd(A, M, rows, cols, kappa=None):
    nk = A.shape[1]
    a = (A * M).sum(1)
    r = (A * (1 - M)).sum(1)
    tau = r[rows].max()
    if tau == 0:
        floor = 0.0
    elif kappa is None:
        floor = tau / (tau / r[rows].min())
    else:
        floor = tau / kappa
    rhat = np.zeros(A.shape[0])
    for l in cols:
        rhat += (1 - M[:, l]) * A[:, l]
    rhat *= nk / len(cols)
    return a + np.maximum(rhat, floor)


def dense_hyper(q, k, v, scale, config, bd):
    """(numerator N, normalizer d̃) of SPEC §5 with dense matrices."""
    A = np.exp(scale * q @ k.T)
    M = brute_mask(q, k, bd.lsh_planes, config.block)
    C = sampling_matrix(bd.sample_u, v, config.sampler)
    if config.estimator == "masked":
        B = A * M + (A * (1 - M)) @ C
    else:
        B = A @ C
    numer = B @ v
    if config.normalizer == "self":
        denom = B.sum(1)
    else:
        denom = dense_approxd(A, M, bd.approxd_rows, bd.approxd_cols, config.kappa)
    return numer, denom


def dense_exact_sums(q, k, v, scale, causal):
    A = np.exp(scale * q @ k.T)
    if causal:
        nq, nk = A.shape
        A = A * (np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq))
    return A @ v, A.sum(1)


def dense_causal(q, k, v, scale, config, draws, path=""):
    """Algorithm 4 as a true recursion, adding numerators and normalizers."""
    nq, nk = len(q), len(k)
    if nq <= config.min_seq_len or nk == 0:
        return dense_exact_sums(q, k, v, scale, True)
    qm = nq // 2
    km = min(max(qm + nk - nq, 0), nk)
    n1, d1 = dense_causal(q[:qm], k[:km], v[:km], scale, config, draws, path + "0")
    n2, d2 = dense_causal(q[qm:], k[km:], v[km:], scale, config, draws, path + "1")
    if km > 0:
        n21, d21 = dense_hyper(q[qm:], k[:km], v[:km], scale, config, draws.blocks[path])
        n2, d2 = n2 + n21, d2 + d21
    return np.vstack([n1, n2]), np.concatenate([d1, d2])
