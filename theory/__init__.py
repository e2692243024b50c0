"""theory — the fine-grained parameters of SPEC §2 and the bounds of SPEC §7."""

from .exact_set_parameters import ExactSetMask, ExactSetParameters, PartParameters, exact_set_parameters
from .parameters import Parameters, SoftmaxOperator, attention_parameters, spectral_error

__all__ = ["ExactSetMask", "ExactSetParameters", "Parameters", "PartParameters", "SoftmaxOperator",
           "attention_parameters", "exact_set_parameters", "spectral_error"]
