"""The one configuration object of HyperAttention (SPEC §3–§6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .exact_set import ExactSet

ESTIMATORS = ("paper", "masked")
SAMPLERS = ("rownorm", "uniform", "mixed")
NORMALIZERS = ("approxd", "self")
#: how a causal call is computed: the paper's recursion (SPEC §6) or query blocks (SPEC §6b)
MODES = ("recursive", "direct")
#: the largest value of an integer setting (they are int64 in the kernels)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class HyperConfig:
    """Settings of HyperAttention, validated at construction.

    Parameters
    ----------
    bits : int
        Number ``r`` of sign random projections of the angular LSH (SPEC §3);
        there are ``2**r`` buckets. Default 7 (the paper's value).
    block : int
        Key block size ``b`` of the sortLSH mask (SPEC §3). Default 256.
    samples : int
        Number ``m`` of i.i.d. key samples of the output estimator (SPEC §5);
        in the direct mode per query block, and 0 allowed (the exact set alone).
        Default 256.
    min_seq_len : int
        Exact attention is used when the query length ``nq <= min_seq_len``;
        in the causal recursion it is the leaf size ``n_min`` (SPEC §6).
        Default 4096.
    estimator : {"masked", "paper"}
        ``masked``: exact on the sortLSH blocks, sampled on the residual;
        ``paper``: sampled on everything, Algorithm 3 as printed (SPEC §5).
    sampler : {"mixed", "rownorm", "uniform"}
        Sampling distribution of the ``m`` keys (SPEC §5). The default ``mixed``
        gives every key positive probability, so the ``self`` normalizer
        converges also when some ``v_j = 0``; ``rownorm`` (the paper's) does not.
    normalizer : {"self", "approxd"}
        ``self``: the ratio estimator (what a fused kernel computes);
        ``approxd``: the row sums of Algorithm 2 (SPEC §4).
    approxd_samples : int
        ``m_d``, the number of rows ``T`` and of column samples ``ℓ`` of ApproxD.
    kappa : float or None
        Upper bound on the row-ratio parameter κ for the ApproxD floor
        ``τ/κ``; ``None`` estimates it from the rows ``T`` (a heuristic).
    mode : {"recursive", "direct"}
        ``recursive``: the paper — non-causal calls as Algorithms 1–3, causal
        ones by the recursion of SPEC §6. ``direct``: query blocks of
        ``query_block`` rows, each with its exact set and a residual sampled from
        its own support (SPEC §6b), causal or not; ``masked`` estimator and
        ``self`` normalizer only.
    exact_set : hyperref.exact_set.ExactSet or None
        The keys computed exactly (SPEC §3b), e.g.
        ``sinks(4) | window(256) | sortlsh(7, 64, 2)``. ``None``: the paper's
        ``sortlsh(bits, block, 1)``; the recursive mode takes only that one.
    query_block : int
        Rows per query block ``bq`` of the direct mode. Default 64.

    Raises
    ------
    hyperref.InputError
        A setting of the wrong type or out of range (every integer at most ``2**63 − 1``),
        or settings that do not go together; the message names the setting.

    Examples
    --------
    >>> HyperConfig(block=64, samples=64).block
    64
    """

    bits: int = 7
    block: int = 256
    samples: int = 256
    min_seq_len: int = 4096
    estimator: str = "masked"
    sampler: str = "mixed"
    normalizer: str = "self"
    approxd_samples: int = 256
    kappa: float | None = None
    mode: str = "recursive"
    exact_set: "ExactSet | None" = None
    query_block: int = 64

    def __post_init__(self) -> None:
        from ._validation import InputError  # a ValueError and a TypeError; imports this module

        direct = isinstance(self.mode, str) and self.mode == "direct"
        for name in ("bits", "block", "samples", "min_seq_len", "approxd_samples", "query_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"HyperConfig.{name} must be an int, got {value!r}")
            least = 0 if name == "samples" and direct else 1
            if value < least:
                raise InputError(f"HyperConfig.{name} must be >= {least}, got {value}"
                                 + (" (0 samples: the direct mode only)" if name == "samples" else ""))
            if value > INT64_MAX:  # sizes are int64 in the kernels and index arithmetic
                raise InputError(f"HyperConfig.{name} must be <= 2**63 - 1, got {value}")
        if self.bits > 30:
            raise InputError(f"HyperConfig.bits must be <= 30, got {self.bits}")
        for name, allowed in (
            ("estimator", ESTIMATORS),
            ("sampler", SAMPLERS),
            ("normalizer", NORMALIZERS),
            ("mode", MODES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise InputError(
                    f"HyperConfig.{name} must be one of {', '.join(allowed)}; got {value!r}"
                )
        if self.kappa is not None:
            kappa = self.kappa
            if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
                raise InputError(f"HyperConfig.kappa must be a float or None, got {kappa!r}")
            if not (abs(kappa) <= sys.float_info.max and kappa >= 1):  # ints beyond float: no
                raise InputError(f"HyperConfig.kappa must be finite and >= 1, got {kappa}")

        if self.exact_set is not None:
            from .exact_set import ExactSet

            if not isinstance(self.exact_set, ExactSet):
                raise InputError("HyperConfig.exact_set must be an ExactSet (e.g. sinks(4) | window(256)) "
                                f"or None, got {self.exact_set!r}")
            if self.mode == "recursive":
                raise InputError("HyperConfig.exact_set needs mode='direct' (the recursion of SPEC §6 "
                                 "uses the paper's sortLSH mask, set by bits and block)")
        if self.mode == "direct" and (self.estimator, self.normalizer) != ("masked", "self"):
            raise InputError("mode='direct' computes the masked estimator with the self normalizer; "
                             f"got estimator={self.estimator!r}, normalizer={self.normalizer!r}")

    def as_dict(self) -> dict[str, Any]:
        """All settings as a plain dict (JSON-serializable; the exact set as its description)."""
        out = asdict(self)
        out["exact_set"] = None if self.exact_set is None else self.exact_set.describe()
        return out
