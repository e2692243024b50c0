"""Hypothesis profiles: derandomized by default, ``HYPOTHESIS_PROFILE=thorough`` for 10x examples."""

import os

try:  # without CUDA, the Triton kernels run through the interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", derandomize=True, max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough", derandomize=False, max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
