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


def input_magnitudes(q, k, v):
    """``{name: max |t|}`` (device scalars, :func:`largest_magnitude`) of the nonempty inputs
    among ``q, k, v``."""
    return {name: largest_magnitude(t) for name, t in (("q", q), ("k", k), ("v", v)) if t.numel()}


def nonfinite_inputs(magnitudes):
    """Pending flags of the inputs of :func:`input_magnitudes`: nonzero where one holds NaN/Inf
    (``None`` if all are empty)."""
    if not magnitudes:
        return None
    return list(magnitudes), torch.stack([~torch.isfinite(m) for m in magnitudes.values()]).int()


def with_flag(pending, name, flag):
    """``pending`` with one more check ``name`` whose device bool is ``flag``."""
    if pending is None:
        pending = ([], torch.zeros(0, dtype=torch.int32, device=flag.device))
    names, flags = pending
    return names + [name], torch.cat([flags.reshape(-1).int(), flag.reshape(1).int()])


def result_flag(pending, out, lse, first_with_keys=None):
    """``pending`` with one more check, ``overflow``: finite inputs gave a non-finite output, a
    NaN or +Inf ``lse``, or ``lse`` −inf in a row that sees keys — the arithmetic's range was
    passed and the answer would be a wrong number.

    ``lse`` −inf with output 0 is a row with no key; ``first_with_keys`` (an int) says that every
    row from that one on (of each ``(B·H)`` head, ``lse`` of shape ``(B·H, nq)``) has keys, so
    −inf there is flagged too. ``None``: −inf is a possible answer everywhere.
    """
    if not out.numel():
        return pending
    lse = lse.detach()
    bad = holds_nonfinite(out) | torch.isnan(lse).any() | torch.isposinf(lse).any()
    if first_with_keys is not None:
        bad = bad | torch.isneginf(lse[:, first_with_keys:]).any()
    return with_flag(pending, OVERFLOW, bad)


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
