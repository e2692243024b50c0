"""gpu — HyperAttention in torch with fused Triton kernels, forward and backward.

Same structure as the reference: ``structure`` (LSH, sorting, samples),
``kernels_forward``, ``kernels_backward``, ``kernels_sort``, ``kernels_sample`` (Triton),
``function`` (autograd), ``attention`` (public API), ``options`` (the kernels' tuning
switches, :class:`KernelOptions`).
Needs ``torch`` and ``triton`` (the ``gpu`` extra).
"""

from .attention import HyperAttention, hyper_attention
from .options import KernelOptions
from .sdpa import scaled_dot_product_attention

__all__ = ["HyperAttention", "KernelOptions", "hyper_attention", "scaled_dot_product_attention"]
