"""The one configuration object of HyperAttention (SPEC §3–§6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math

ESTIMATORS = ("paper", "masked")
SAMPLERS = ("rownorm", "uniform", "mixed")
NORMALIZERS = ("approxd", "self")


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
        Number ``m`` of i.i.d. key samples of the output estimator (SPEC §5).
        Default 256.
    min_seq_len : int
        Exact attention is used when the query length ``nq <= min_seq_len``;
        in the causal recursion it is the leaf size ``n_min`` (SPEC §6).
        Default 4096.
    estimator : {"masked", "paper"}
        ``masked``: exact on the sortLSH blocks, sampled on the residual;
        ``paper``: sampled on everything, Algorithm 3 as printed (SPEC §5).
    sampler : {"rownorm", "uniform", "mixed"}
        Sampling distribution of the ``m`` keys (SPEC §5).
    normalizer : {"self", "approxd"}
        ``self``: the ratio estimator (what a fused kernel computes);
        ``approxd``: the row sums of Algorithm 2 (SPEC §4).
    approxd_samples : int
        ``m_d``, the number of rows ``T`` and of column samples ``ℓ`` of ApproxD.
    kappa : float or None
        Upper bound on the row-ratio parameter κ for the ApproxD floor
        ``τ/κ``; ``None`` estimates it from the rows ``T`` (a heuristic).

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
    sampler: str = "rownorm"
    normalizer: str = "self"
    approxd_samples: int = 256
    kappa: float | None = None

    def __post_init__(self):
        for name in ("bits", "block", "samples", "min_seq_len", "approxd_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"HyperConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"HyperConfig.{name} must be >= 1, got {value}")
        if self.bits > 30:
            raise ValueError(f"HyperConfig.bits must be <= 30, got {self.bits}")
        for name, allowed in (
            ("estimator", ESTIMATORS),
            ("sampler", SAMPLERS),
            ("normalizer", NORMALIZERS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"HyperConfig.{name} must be one of {', '.join(allowed)}; got {value!r}"
                )
        if self.kappa is not None:
            kappa = self.kappa
            if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
                raise TypeError(f"HyperConfig.kappa must be a float or None, got {kappa!r}")
            if not math.isfinite(kappa) or kappa < 1:
                raise ValueError(f"HyperConfig.kappa must be finite and >= 1, got {kappa}")

    def as_dict(self) -> dict:
        """All settings as a plain dict (JSON-serializable)."""
        return asdict(self)
