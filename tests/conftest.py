"""Hypothesis profiles: ``ci`` (derandomized, the default), ``HYPOTHESIS_PROFILE=thorough`` for 10x
examples, not derandomized; the fuzz suite's outcome counts at the end of a run."""

import os

try:  # without CUDA, the Triton kernels run through the interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough", derandomize=False, max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter):
    """The outcomes of the fuzz suite (tests/fuzz.py), when it ran."""
    import sys

    fuzz = sys.modules.get("tests.fuzz")
    if fuzz is not None and fuzz.OUTCOMES:
        counts = ", ".join(f"{kind} {fuzz.OUTCOMES[kind]}" for kind in fuzz.KINDS)
        terminalreporter.write_line(f"fuzz outcomes: {sum(fuzz.OUTCOMES.values())} calls: {counts}")
