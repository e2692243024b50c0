"""HyperAttention inside Hugging Face ``transformers`` models, through ``AttentionInterface``.

>>> import hyperref.gpu.hf_attention as hf                                      # doctest: +SKIP
>>> hf.register(HyperConfig(block=64, samples=64, min_seq_len=64))     # doctest: +SKIP
>>> model = AutoModel.from_pretrained(path, attn_implementation="hyper")  # doctest: +SKIP

The registered function has the signature transformers expects
(``module, query, key, value, attention_mask, scaling=..., **kwargs`` with
``query`` of shape (B, H, N, D)) and returns ``(out, None)`` with ``out`` of
shape (B, N, H, D), like the built-in ``sdpa`` function.

* CUDA tensors go to :func:`hyperref.gpu.hyper_attention` (Triton, differentiable;
  ``masked`` estimator, ``self`` normalizer).
* CPU tensors go to the reference :func:`hyperref.hyper_attention` (Numba
  engine, any configuration) when no gradient is needed, and to the dense torch
  twin of the GPU path (differentiable, ``O(N²)`` memory) when one is.

Padding masks are honoured by dropping the padded keys of each sequence (any
pattern, as long as every query row of a sequence sees the same keys); masks
that differ between rows (causal plus padding) raise ``NotImplementedError``.
The configuration can be given at registration, or per call as the keyword
argument ``hyper_config`` that models forward to their attention functions.
``layers`` restricts HyperAttention to some layers (``module.layer_idx``);
the others use exact SDPA.
"""

from __future__ import annotations

import numpy as np
import torch

from hyperref import HyperConfig
from hyperref import hyper_attention as reference_attention

from .attention import hyper_attention as gpu_attention

NAME = "hyper"


def _valid_keys(attention_mask, b, nk):
    """Boolean (nk,) of the keys sequence ``b`` attends to, or None for all."""
    if attention_mask is None:
        return None
    m = attention_mask[b]
    while m.dim() > 2:
        if m.shape[0] != 1:
            m = m.flatten(0, -3)
            if not torch.equal(m, m[:1].expand_as(m)):
                raise NotImplementedError("HyperAttention supports one key mask per sequence (padding)")
        m = m[0]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    if allowed.dim() == 2:
        if not torch.equal(allowed, allowed[:1].expand_as(allowed)):
            raise NotImplementedError("HyperAttention supports one key mask per sequence (padding), "
                                      "not masks that differ between query rows")
        allowed = allowed[0]
    return allowed[-nk:]


def _attend(q, k, v, causal, scale, config, rng):
    """One sequence: q (1, H, N, D), k/v (1, Hk, Nk, ·)."""
    if q.is_cuda:
        return gpu_attention(q, k, v, causal=causal, scale=scale, config=config,
                             generator=torch.Generator(q.device).manual_seed(int(rng.integers(2**62))))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        from hyperref import make_draws

        draws = make_draws(config, q.shape[2], k.shape[2], q.shape[3], causal=causal,
                           batch_shape=tuple(q.shape[:2]), rng=rng)
        return gpu_attention(q, k, v, causal=causal, scale=scale, config=config,
                             draws=draws, backend="dense")
    out = reference_attention(*(t.detach().cpu().numpy() for t in (q, k, v)), causal=causal,
                              scale=scale, config=config, rng=rng)
    return torch.from_numpy(out).to(q.dtype)


def make_attention_function(config: HyperConfig | None = None, *, layers=None, seed=0):
    """The function to register: HyperAttention with ``config`` (default ``HyperConfig()``)."""
    state = {"rng": np.random.default_rng(seed)}

    def hyper_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=None, is_causal=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = getattr(module, "layer_idx", None)
        if layers is not None and layer not in layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if dropout and module.training:
            raise NotImplementedError("HyperAttention has no attention dropout")
        cfg = kwargs.get("hyper_config") or config or HyperConfig()
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        if causal and attention_mask is not None:
            raise NotImplementedError("causal HyperAttention with an explicit mask is not supported")
        outs = []
        for b in range(query.shape[0]):
            keep = _valid_keys(attention_mask, b, key.shape[2])
            k_b, v_b = key[b:b + 1], value[b:b + 1]
            if keep is not None and not bool(keep.all()):
                k_b, v_b = k_b[:, :, keep], v_b[:, :, keep]
            outs.append(_attend(query[b:b + 1], k_b, v_b, causal, scaling, cfg, state["rng"]))
        out = torch.cat(outs, dim=0) if outs else query.new_zeros(query.shape[:3] + value.shape[3:])
        return out.transpose(1, 2).contiguous(), None

    return hyper_attention_forward


def register(config: HyperConfig | None = None, *, name: str = NAME, layers=None, seed=0) -> str:
    """Register HyperAttention as ``attn_implementation=name`` (default ``"hyper"``).

    Parameters
    ----------
    config : HyperConfig, optional
        Used unless a call passes ``hyper_config=...``.
    name : str
        The ``attn_implementation`` string.
    layers : set of int, optional
        Approximate only these layers (``module.layer_idx``); the others run exact SDPA.
    seed : int
        Seed of the draws (one stream per registration).

    Returns
    -------
    str
        ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, make_attention_function(config, layers=layers, seed=seed))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
