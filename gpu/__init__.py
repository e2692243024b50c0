"""gpu — HyperAttention in torch with fused Triton kernels, forward and backward.

Same structure as the reference: ``structure`` (LSH, sorting, samples),
``kernels`` (Triton), ``function`` (autograd), ``attention`` (public API).
Needs ``torch`` and ``triton`` (the ``gpu`` extra).
"""

from .attention import HyperAttention, hyper_attention
from .sdpa import scaled_dot_product_attention

__all__ = ["HyperAttention", "hyper_attention", "scaled_dot_product_attention"]
