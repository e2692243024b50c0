"""hyperref — a readable, verified reference of HyperAttention (arXiv 2310.05869).

The mathematics is in docs/mathematics.md; every function cites the section it implements
("SPEC §n" in docstrings is section n of that file).
"""

from ._validation import InputError
from .attention import exact_attention, hyper_attention
from .config import HyperConfig
from .draws import BlockDraws, Draws, make_draws

__all__ = [
    "BlockDraws",
    "Draws",
    "HyperConfig",
    "InputError",
    "exact_attention",
    "hyper_attention",
    "make_draws",
]
__version__ = "0.1.0"
