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

from collections.abc import Mapping

import numpy as np
import torch

from hyperref import HyperConfig
from hyperref._validation import InputError, check_scale

from .hf_attention import _attend, _hyper_forward
from .options import KernelOptions, as_kernel_options


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False, *,
                                 config: HyperConfig | None = None,
                                 generator: torch.Generator | None = None,
                                 kernel_options: KernelOptions | Mapping | None = None) -> torch.Tensor:
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
    kernel_options : hyperref.gpu.KernelOptions or dict, optional
        Tuning switches of the Triton kernels (CUDA tensors); checked, and unused, on the CPU.

    Returns
    -------
    Tensor (B, H, L, Ev)

    Raises
    ------
    hyperref.InputError
        Non-tensors, non-floating dtypes, wrong shapes, a mask that does not broadcast to
        (B, H, L, S), a bad scale, generator or kernel_options, NaN/Inf inputs.
    NotImplementedError
        Masks that are not a full or causal pattern after dropping unseen keys, masks that
        differ between heads, additive biases.

    Examples
    --------
    >>> q = k = v = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    >>> exact = HyperConfig(min_seq_len=64)          # L <= min_seq_len: computed exactly
    >>> out = scaled_dot_product_attention(q, k, v, is_causal=True, config=exact)
    >>> bool(torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    ...                     atol=1e-5))
    True
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise InputError("query, key and value must be 4-d (B, H, L, E); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if attn_mask is not None and is_causal:
        raise InputError("attn_mask and is_causal cannot both be given (as in torch's SDPA)")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise InputError(f"{query.shape[1]} query heads and {key.shape[1]} key heads need enable_gqa=True")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise InputError("is_causal and enable_gqa must be bools")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    options = as_kernel_options(kernel_options)
    (b, h, nq, e), nk = query.shape, key.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise InputError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None, None]
        elif attn_mask.dim() != 4:
            raise InputError(f"attn_mask must be (L, S) or 4-d, got shape {tuple(attn_mask.shape)}")
        # broadcastable to (B, H, L, S), as torch's SDPA requires; the size-1 query and key
        # dimensions are expanded (a view) for the mask reader
        if any(m not in (1, want) for m, want in zip(attn_mask.shape, (b, h, nq, nk))):
            raise InputError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, H, L, S) = {(b, h, nq, nk)}")
        attn_mask = attn_mask.expand(attn_mask.shape[0], attn_mask.shape[1], nq, nk)
    if is_causal and nq == 1:  # top-left: the one query sees key 0 only (for the HF reader
        key, value, is_causal = key[:, :, :1], value[:, :, :1], False  # it is a decode step)
    config = HyperConfig() if config is None else config
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    rng = np.random.default_rng(seed)
    s = check_scale(scale, e) if e else scale

    def attend(q, k, v, causal):
        return _attend(q, k, v, causal, s, config, rng, options)

    return _hyper_forward(query, key, value, attn_mask, is_causal, attend)
