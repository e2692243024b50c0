"""``scaled_dot_product_attention``: HyperAttention with the signature and alignment of torch's SDPA.

A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` (no dropout):

======================  =============================================  ===============================
                        ``torch`` SDPA / this function                 ``hyperref`` ``causal=True``
======================  =============================================  ===============================
causal alignment        top-left: query ``i`` sees keys ``j <= i``     bottom-right: ``j <= i + Nk − Nq``
``Nq == Nk``            the same lower triangle                        the same lower triangle
======================  =============================================  ===============================

Masks (``attn_mask``): boolean (True = attend) or additive float holding only 0
and masked values (``-inf``, or ``<= -1e4``), of shape (L, S) or (B or 1, H or 1, L, S).
The keys no row sees are dropped and rows that see no key give 0 (torch gives
NaN there); what remains must be a full or causal pattern, else
:class:`NotImplementedError` names it (see :mod:`hyperref.gpu.hf_attention`, which
reads masks the same way).
"""

from __future__ import annotations

import numpy as np
import torch

from hyperref import HyperConfig

from .hf_attention import _attend, _hyper_forward


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                                 enable_gqa=False, *, config=None, generator=None):
    """HyperAttention in SDPA's convention.

    Parameters
    ----------
    query : Tensor (B, H, L, E)
    key, value : Tensor (B, Hk, S, E), (B, Hk, S, Ev); ``Hk == H`` unless ``enable_gqa``
    attn_mask : Tensor, optional
        Boolean or additive float mask, (L, S) or 4-d broadcastable to (B, H, L, S).
    is_causal : bool
        SDPA's top-left aligned causal mask; not together with ``attn_mask``.
    scale : float, optional
        Default ``1/sqrt(E)``.
    enable_gqa : bool
        Allow ``Hk`` dividing ``H`` (grouped-query attention).
    config : HyperConfig, optional
        Default ``HyperConfig()``.
    generator : torch.Generator, optional
        Seeds the draws (CPU: the reference; CUDA: the Triton path).

    Returns
    -------
    Tensor (B, H, L, Ev)

    Examples
    --------
    >>> q = k = v = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    >>> exact = HyperConfig(min_seq_len=64)          # L <= min_seq_len: computed exactly
    >>> out = scaled_dot_product_attention(q, k, v, is_causal=True, config=exact)
    >>> bool(torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    ...                     atol=1e-5))
    True
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key and value must be 4-d (B, H, L, E); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be given (as in torch's SDPA)")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads and {key.shape[1]} key heads need enable_gqa=True")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise TypeError("is_causal and enable_gqa must be bools")
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        elif attn_mask.dim() != 4:
            raise ValueError(f"attn_mask must be (L, S) or 4-d, got shape {tuple(attn_mask.shape)}")
    config = HyperConfig() if config is None else config
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    rng = np.random.default_rng(seed)
    s = query.shape[-1] ** -0.5 if scale is None else float(scale)

    def attend(q, k, v, causal):
        return _attend(q, k, v, causal, s, config, rng)

    return _hyper_forward(query, key, value, attn_mask, is_causal, attend)
