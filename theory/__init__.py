"""theory — the fine-grained parameters of SPEC §2 and the bounds of SPEC §7."""

from .parameters import Parameters, SoftmaxOperator, attention_parameters, spectral_error

__all__ = ["Parameters", "SoftmaxOperator", "attention_parameters", "spectral_error"]
