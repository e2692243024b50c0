"""Exact causal leaves by a vendor attention kernel (cuDNN or FlashAttention-2 through torch).

The leaves of the causal recursion (SPEC §6) are exact causal attention on
diagonal blocks. When they are ``C`` equal squares of ``L`` rows (``nq = nk``
and the recursion halves evenly, e.g. any ``n = C·L`` with ``C`` a power of
two) and heads are not grouped, the (B·H, n, d) tensors *are* a batch of
``B·H·C`` independent causal attentions of length ``L``: a free view
``(B·H·C, 1, L, d)``. torch's private SDPA operators then compute the leaves
with the vendor kernels and return the log-sum-exp the merge needs (the public
``scaled_dot_product_attention`` does not return it).

Backward passes the *final* output and log-sum-exp of the whole attention
(every piece is part of one softmax): the vendor backward recomputes
``P = exp(S·scale − lse)`` and ``Δ = rowsum(dO ∘ O)`` from them, which are the
leaves' part of the global softmax gradient. The ``lse`` gradient term
(``Δ − dlse``) cannot be passed to those operators: with a gradient flowing
into ``lse`` the caller uses the Triton kernels instead.
"""

from __future__ import annotations

import torch

BACKENDS = ("cudnn", "flash")


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, leaf_len: int, grouped: bool,
              backend: str = "cudnn") -> bool:
    """Whether ``backend``'s kernels can compute the leaves of these (B·H, n, d) tensors:
    equal square leaves, ungrouped heads, fp16/bf16, d = dv ∈ {64, 128}, an Ampere or newer
    GPU (and cuDNN 9 for ``cudnn``)."""
    shapes = (leaf_len > 0 and not grouped and q.dtype in (torch.float16, torch.bfloat16)
              and q.shape[1] == k.shape[1] and q.shape[1] % leaf_len == 0
              and q.shape[2] == v.shape[2] and q.shape[2] in (64, 128)
              and all(t.is_contiguous() for t in (q, k, v)))
    if not (q.is_cuda and shapes) or torch.cuda.get_device_capability(q.device) < (8, 0):
        return False
    if backend == "cudnn":
        return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
    return backend == "flash"


def _batch_view(x: torch.Tensor, leaf_len: int) -> torch.Tensor:
    bh, n, d = x.shape
    return x.view(bh * (n // leaf_len), 1, leaf_len, d)


def forward(q, k, v, leaf_len: int, scale: float, backend: str):
    """``(out, lse, state)``: the leaves' output (B·H, n, d) in ``q``'s dtype, their
    log-sum-exp (B·H, n) float32 (natural log), and what :func:`backward` needs."""
    qb, kb, vb = (_batch_view(x, leaf_len) for x in (q, k, v))
    if backend == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False,
                                                                 scale=scale)
    elif backend == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, True, False, scale=scale)
    else:
        raise ValueError(f"leaf backend must be one of {BACKENDS}, got {backend!r}")
    out, lse = res[0], res[1]
    if lse.numel() != q.shape[0] * q.shape[1]:
        raise RuntimeError(f"{backend} returned a log-sum-exp of shape {tuple(lse.shape)}, "
                           f"expected {q.shape[0] * q.shape[1]} entries")
    state = (tuple(res[2:8]), tuple(lse.shape))
    out = out.reshape(q.shape[0], q.shape[1], v.shape[2]).contiguous()
    lse = lse.reshape(q.shape[0], q.shape[1]).float().contiguous()
    return out, lse, state


def backward(dout, q, k, v, out, lse, leaf_len: int, scale: float, backend: str, state):
    """``(dq, dk, dv)`` of the leaves for the final ``out`` and ``lse`` of the whole attention."""
    qb, kb, vb, ob, db = (_batch_view(x, leaf_len) for x in (q, k, v, out, dout))
    (cum_q, cum_k, max_q, max_k, seed, offset), lse_shape = state
    lse_b = lse.reshape(lse_shape)
    if backend == "cudnn":
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            db, qb, kb, vb, ob, lse_b, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            db, qb, kb, vb, ob, lse_b, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)
    return tuple(g.reshape(x.shape) for g, x in zip(grads, (q, k, v)))
