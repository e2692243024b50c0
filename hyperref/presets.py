"""Named configurations: the paper's, and the best measured one for causal language models.

>>> causal_lm().mode
'direct'
"""

from __future__ import annotations

from .config import HyperConfig
from .exact_set import sinks, sortlsh, window


def paper() -> HyperConfig:
    """The paper's settings (SPEC §3–§6): sortLSH 7 bits, blocks and samples of 256, recursion."""
    return HyperConfig(sampler="rownorm")


def causal_lm() -> HyperConfig:
    """The configuration that keeps a pretrained causal LM's perplexity (``benchmarks/REAL_LM.md``).

    Direct mode (SPEC §6b): exact attention sinks and a sliding window, a
    sortLSH detector for the far heavy keys, and a residual sampled from each
    query block's causal support with the consistent ``mixed`` sampler.
    """
    return HyperConfig(mode="direct", min_seq_len=1024, query_block=64, samples=128,
                       exact_set=sinks(4) | window(256) | sortlsh(bits=7, block=64, rounds=4, centred=True))
