"""Named configurations: the paper's, and the best measured one for causal language models.

>>> causal_lm().mode
'direct'
"""

from __future__ import annotations

from .config import HyperConfig
from .exact_set import heavykeys, quest, sinks, window


def paper() -> HyperConfig:
    """The paper's settings (SPEC §3–§6): sortLSH 7 bits, blocks and samples of 256, recursion."""
    return HyperConfig(sampler="rownorm")


def causal_lm() -> HyperConfig:
    """The configuration that keeps a pretrained causal LM's perplexity (``benchmarks/REAL_LM.md``).

    Direct mode (SPEC §6b): four attention sinks, a window of 256, the 64 keys of
    largest attention from 256 sampled rows (``heavykeys``), per row the 128 best
    of the 2048 keys in the key blocks (of 8) with the highest Quest bound
    (``quest``), and 128 keys per 64-row query block sampled from its causal
    support with the consistent ``mixed`` sampler. On SmolLM2-135M at n = 8192
    in all 30 layers it attends about 515 keys per query and keeps perplexity
    within 5 % of exact on a copy task and 1 % on plain text; it *scores*
    (computes logits of) about 2500 keys per query, so it is a quality
    configuration, not a fast one.
    """
    return HyperConfig(mode="direct", min_seq_len=1024, query_block=64, samples=128,
                       exact_set=sinks(4) | window(256) | heavykeys(64, 256) | quest(8, 2048, 128))
