"""Range checks of the GPU engines, kept on the device until one read after the kernels.

An engine queues its flags next to its kernels — whether an input holds NaN/Inf,
whether the result left the range of the arithmetic — and reads them all in one
device sync at the end (:func:`raise_if_flagged`), so the host never waits for
the GPU before the kernels are queued. A flagged call raises
:class:`hyperref.InputError` and returns nothing: bad input gets a clear error,
never a wrong number.

``pending`` is ``(names, flags)``: the names of the checks and an int32 device
tensor of the same length, nonzero where the check failed (``None``: nothing to
check).
"""

from __future__ import annotations

import torch

from hyperref._validation import InputError

OVERFLOW = "overflow"


def largest_magnitude(t):
    """A device scalar: ``max |t|`` of the nonempty tensor ``t`` (NaN if it holds NaN, Inf if ±Inf).

    One reduction (``aminmax``: NaN propagates, ±Inf show in the extremes) where
    ``isfinite(t).any()`` would take five elementwise passes and a reduction.
    """
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi)


def holds_nonfinite(t):
    """A device bool: whether the nonempty tensor ``t`` holds NaN or ±Inf."""
    return ~torch.isfinite(largest_magnitude(t))


def nonfinite_inputs(q, k, v):
    """Pending flags of the nonempty inputs among ``q, k, v``: nonzero if it holds NaN/Inf
    (``None`` if all are empty)."""
    tensors = [(name, t) for name, t in (("q", q), ("k", k), ("v", v)) if t.numel()]
    if not tensors:
        return None
    return [name for name, _ in tensors], torch.stack([holds_nonfinite(t) for _, t in tensors]).int()


def with_flag(pending, name, flag):
    """``pending`` with one more check ``name`` whose device bool is ``flag``."""
    if pending is None:
        pending = ([], torch.zeros(0, dtype=torch.int32, device=flag.device))
    names, flags = pending
    return names + [name], torch.cat([flags.reshape(-1).int(), flag.reshape(1).int()])


def raise_if_flagged(pending):
    """Read the pending flags (one device sync) and raise for the first that failed."""
    if pending is None:
        return
    names, bad = pending
    for name, flagged in zip(names, bad.tolist()):
        if flagged and name == OVERFLOW:
            raise InputError("the logits or the weighted values exceed the range of the kernels' "
                             "arithmetic (|q|·|k|, |scale|·|q|·|k| or |v| too large): rescale q, k or v "
                             "(or the scale); hyperref.hyper_attention computes such inputs in float64")
        if flagged:
            raise InputError(f"{name} contains NaN or Inf")
