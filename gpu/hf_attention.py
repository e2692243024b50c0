"""HyperAttention inside Hugging Face ``transformers`` models, through ``AttentionInterface``.

>>> import hyperref.gpu.hf_attention as hf                                      # doctest: +SKIP
>>> hf.register(HyperConfig(block=64, samples=64, min_seq_len=64))     # doctest: +SKIP
>>> model = AutoModel.from_pretrained(path, attn_implementation="hyper")  # doctest: +SKIP

The registered function has the signature transformers expects
(``module, query, key, value, attention_mask, scaling=..., **kwargs`` with
``query`` of shape (B, H, N, D)) and returns ``(out, None)`` with ``out`` of
shape (B, N, H, D), like the built-in ``sdpa`` function, and it reads the
masks transformers builds for ``sdpa`` (:func:`transformers.masking_utils.sdpa_mask`).

Backends
--------
* CUDA tensors go to :func:`hyperref.gpu.hyper_attention` (Triton, differentiable;
  ``masked`` estimator, ``self`` normalizer).
* CPU tensors go to the reference :func:`hyperref.hyper_attention` (Numba
  engine, any configuration), computed in float32 (float64 stays float64) and
  cast back to the input dtype, so bf16 and fp16 models run too.
* Gradients on the CPU: when a gradient is needed (grad mode on and ``q``, ``k``
  or ``v`` requiring one), the forward is still the reference (same speed and
  memory as under :func:`torch.no_grad`); the backward recomputes the call with
  the dense torch twin of the GPU path (the same function of the same draws),
  which costs ``O(B·H·Nq·Nk)`` time *and memory* per attention call, one layer
  at a time. At ``N = 4096`` that is seconds and gigabytes per layer: train on
  the GPU, or keep CPU backward passes to short sequences. It needs the
  ``masked`` estimator and ``self`` normalizer.

Masks
-----
With no mask, the call follows ``sdpa``'s ``is_causal``: for a causal module
and ``Nq > 1``, query ``i`` sees key ``j`` iff ``j <= i`` (top-left aligned:
transformers passes no mask with ``Nk > Nq`` only when prefilling an empty
``StaticCache``, whose keys after the first ``Nq`` are empty slots); a single
query row (decoding) and non-causal modules see every key.

A mask (boolean, True = attend; or additive float, 0 = attend, ``-inf`` or
``<= -1e4`` = masked; shapes (B, Nk), (B, Nq, Nk) or (B, 1 or H, Nq, Nk)) is
read per sequence: the keys no query row sees (padding, empty cache slots) are
dropped, the query rows that see no key (left padding) give 0, as in ``sdpa``.
What remains must be one of the patterns HyperAttention computes: every row
sees a prefix of the kept keys, growing by one key per row until it holds them
all (causal, bottom-right aligned after the dropped keys; the rows after it —
right padding, or ``Nq > Nk`` top-left — see every key) or holding them all
from the first row (full attention: encoders, decoding). Other patterns
(sliding windows, chunked or packed-sequence masks, masks that differ between
heads, additive biases) raise ``NotImplementedError``.

Keyword arguments that change the attention and are not implemented raise
``NotImplementedError`` naming the keyword: ``softcap``, ``s_aux``,
``sinks``, ``position_bias`` (any value but None), ``sliding_window`` shorter
than the keys, and a nonzero ``dropout`` (attention dropout in training).
Other keywords (``position_ids``, ``use_cache``, ``cu_seq_lens_q``, ...) are
ignored, as ``sdpa`` ignores them.

The configuration can be given at registration, or per call as the keyword
argument ``hyper_config`` that models forward to their attention functions.
``layers`` restricts HyperAttention to some layers (``module.layer_idx``);
the others use exact SDPA. ``kernel_options`` (:class:`hyperref.gpu.KernelOptions`),
given at registration, tunes the Triton kernels of CUDA calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hyperref import HyperConfig, make_draws
from hyperref import hyper_attention as reference_attention

from .attention import hyper_attention as gpu_attention
from .options import DEFAULTS, KernelOptions, as_kernel_options

NAME = "hyper"

#: Keywords that change the attention and are not implemented: any value but None is refused
#: (Gemma 2's logit soft-capping, learned attention sinks, T5-style additive position biases).
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")

#: Entries of an additive float mask at or below this are masked (``exp`` of them is 0).
MASKED_AT_OR_BELOW = -1e4


# ----------------------------------------------------------------------------- keyword arguments

def _refuse_unsupported(dropout, kwargs, nk):
    """Raise ``NotImplementedError`` for keyword arguments that would change the result.

    Parameters
    ----------
    dropout : float
        The attention dropout probability the model passes (nonzero in training).
    kwargs : dict
        The other keyword arguments of the call.
    nk : int
        Number of keys of the call.

    Raises
    ------
    NotImplementedError
        Naming the keyword.
    """
    if dropout:
        raise NotImplementedError(
            f"HyperAttention has no attention dropout, got dropout={dropout} (a model in training "
            "mode with attention dropout): call model.eval() or set the attention dropout to 0")
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"HyperAttention does not implement the keyword argument {name!r} (got a value "
                "that is not None); use attn_implementation='eager' for this model")
    window = kwargs.get("sliding_window")
    if window is not None and nk > window:
        raise NotImplementedError(
            f"HyperAttention does not implement 'sliding_window' attention: sliding_window={window} "
            f"is shorter than the {nk} keys of the call")


# ----------------------------------------------------------------------------- masks to pieces

@dataclass(frozen=True)
class _Piece:
    """Query rows that all attend to the same keys, causally or fully.

    Attributes
    ----------
    rows : Tensor of int64
        Ascending indices of the query rows.
    keys : Tensor of int64
        Ascending indices of the keys they see.
    causal : bool
        Bottom-right aligned causal among ``rows`` and ``keys`` (row ``t`` of
        ``m`` sees ``keys[: t + len(keys) - m + 1]``), else every row sees every key.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    causal: bool


def _prefix_pieces(rows, keys, first):
    """The pieces of the pattern in which row ``t`` of ``rows`` sees ``keys[:first + t]``.

    Parameters
    ----------
    rows, keys : Tensor of int64
        Ascending query-row and key indices.
    first : int
        Number of keys the first row sees, ``>= 1``; the count grows by one per
        row and saturates at ``len(keys)``.

    Returns
    -------
    list of _Piece
        A bottom-right causal block (the rows up to the first one that sees
        every key), then the rows after it, which see every key; or one full
        piece when ``first >= len(keys)``.
    """
    m = len(rows)
    if m == 0:
        return []
    keys = keys[:first + m - 1]  # keys beyond the last row's prefix are seen by no row
    n = len(keys)
    if first >= n:
        return [_Piece(rows, keys, False)]
    block = n - first + 1  # rows of the causal block: its last row sees all n keys
    pieces = [_Piece(rows[:block], keys, True)]
    if block < m:
        pieces.append(_Piece(rows[block:], keys, False))
    return pieces


def _unmasked_pieces(nq, nk, causal, device):
    """The pieces of a call without a mask, as ``sdpa`` reads ``is_causal``.

    Parameters
    ----------
    nq, nk : int
        Query and key lengths, ``nq >= 1``.
    causal : bool
        The module's (or the call's) ``is_causal``.
    device : torch.device

    Returns
    -------
    list of _Piece
        Causal with ``nq > 1``: top-left aligned (row ``i`` sees keys ``j <= i``,
        as ``sdpa``'s ``is_causal``; transformers relies on it to prefill an empty
        static cache); otherwise one piece in which every row sees every key.
    """
    rows = torch.arange(nq, device=device)
    if not causal or nq == 1:
        return [_Piece(rows, torch.arange(nk, device=device), False)]
    return _prefix_pieces(rows, torch.arange(min(nq, nk), device=device), first=1)


def _as_allowed(mask):
    """Boolean (True = attend) version of a boolean, integer or additive float mask.

    Raises
    ------
    NotImplementedError
        A float mask with entries other than 0 and masked values (an additive bias).
    """
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    allowed = mask == 0
    if not bool((allowed | (mask <= MASKED_AT_OR_BELOW)).all()):
        raise NotImplementedError(
            "HyperAttention does not implement additive attention biases: a float attention_mask "
            f"must hold only 0 (attend) and -inf or values <= {MASKED_AT_OR_BELOW:g} (masked)")
    return allowed


def _allowed_keys(attention_mask, b, nq, nk):
    """The mask as booleans of shape (B or 1, nq, nk), True where a query row sees a key.

    Parameters
    ----------
    attention_mask : Tensor
        (B, Nk) key padding, (B, Nq, Nk), or (B, 1 or H, Nq, Nk) as transformers
        passes to ``sdpa``; the size-1 dimensions broadcast. Only the first
        ``nk`` key columns are read.
    b, nq, nk : int
        Batch size, query and key lengths of the call.

    Returns
    -------
    Tensor of bool

    Raises
    ------
    NotImplementedError
        Masks that differ between heads, or additive biases.
    ValueError
        Masks of another shape.
    """
    mask = attention_mask
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[2] not in (1, nq) or mask.shape[3] < nk:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit "
                         f"{b} sequences of {nq} queries and {nk} keys")
    mask = mask[..., :nk]
    if mask.shape[1] > 1:
        if not torch.equal(mask, mask[:, :1].expand_as(mask)):
            raise NotImplementedError("HyperAttention does not implement masks that differ between heads")
    allowed = _as_allowed(mask[:, 0])
    return allowed.expand(allowed.shape[0], nq, nk)


def _summary(values, shown=8):
    """``values`` as text, the middle elided when there are more than ``shown``."""
    if len(values) <= shown:
        return str(values)
    return f"[{', '.join(map(str, values[:shown // 2]))}, ..., {', '.join(map(str, values[-shown // 2:]))}]"


def _mask_pieces(allowed):
    """The pieces of one sequence's boolean mask (nq, nk).

    Keys no row sees are dropped; rows that see no key are in no piece (their
    output is 0). The rest must be a causal or full pattern (see
    :func:`_prefix_pieces`).

    Raises
    ------
    NotImplementedError
        Naming the pattern that is not one of those.
    """
    rows = allowed.any(1).nonzero().flatten()
    keys = allowed.any(0).nonzero().flatten()
    if len(rows) == 0:
        return []
    seen = allowed.index_select(0, rows).index_select(1, keys)
    counts = seen.sum(1)
    positions = torch.arange(len(keys), device=allowed.device)
    if not torch.equal(seen, positions[None, :] < counts[:, None]):
        raise NotImplementedError(
            "HyperAttention does not implement this attention_mask: after dropping the masked keys, "
            "a query row sees keys that are not a prefix of them (a sliding-window, chunked, "
            "packed-sequence or other non-causal pattern)")
    first = int(counts[0])
    grows = (first + torch.arange(len(rows), device=allowed.device)).clamp(max=len(keys))
    if not torch.equal(counts, grows):
        raise NotImplementedError(
            "HyperAttention does not implement this attention_mask: the number of keys seen must grow "
            "by one per query row (causal) or be all of them (full attention); the kept rows see "
            f"{_summary(counts.tolist())} keys")
    return _prefix_pieces(rows, keys, first)


# ----------------------------------------------------------------------------- computing

def _compute_dtype(dtype):
    """float64 for float64 inputs, else float32 (the reference computes in NumPy)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference(q, k, v, causal, scale, config, draws):
    """The NumPy reference on CPU tensors, in float32 (or float64), cast back to ``q.dtype``."""
    arrays = (t.detach().to(_compute_dtype(t.dtype)).numpy() for t in (q, k, v))
    out = reference_attention(*arrays, causal=causal, scale=scale, config=config, draws=draws)
    return torch.from_numpy(out).to(q.dtype)


class _ReferenceWithDenseBackward(torch.autograd.Function):
    """Forward by the reference; backward by recomputing the dense twin with the same draws.

    The forward costs what a no-grad call costs; the backward builds the dense
    ``O(B·H·Nq·Nk)`` graph of :func:`hyperref.gpu.hyper_attention` (``backend="dense"``)
    for this call only and differentiates it.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, config, draws):
        ctx.save_for_backward(q, k, v)
        ctx.call = (causal, scale, config, draws)
        return _reference(q, k, v, causal, scale, config, draws)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        causal, scale, config, draws = ctx.call
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        inputs = [t.detach().to(_compute_dtype(t.dtype)).requires_grad_(need) for t, need in zip(saved, needs)]
        with torch.enable_grad():
            out = gpu_attention(*inputs, causal=causal, scale=scale, config=config, draws=draws,
                                backend="dense")
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
        return (*(next(grads).to(t.dtype) if need else None for t, need in zip(saved, needs)),
                None, None, None, None)


def _attend(q, k, v, causal, scale, config, rng, options: KernelOptions = DEFAULTS):
    """HyperAttention of q (B, H, Nq, D) on k, v (B, Hk, Nk, ·), in the dtype of ``q``; CUDA
    tensors by the Triton path with ``options``, CPU tensors by the reference."""
    if q.is_cuda:
        return gpu_attention(q, k, v, causal=causal, scale=scale, config=config,
                             generator=torch.Generator(q.device).manual_seed(int(rng.integers(2**62))),
                             kernel_options=options)
    draws = make_draws(config, q.shape[2], k.shape[2], q.shape[3], causal=causal,
                       batch_shape=tuple(q.shape[:2]), rng=rng)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if config.estimator != "masked" or config.normalizer != "self":
            raise NotImplementedError(
                "gradients on the CPU need estimator='masked' and normalizer='self' (the dense twin "
                "of the GPU path); run under torch.no_grad() for other configurations")
        return _ReferenceWithDenseBackward.apply(q, k, v, causal, scale, config, draws)
    return _reference(q, k, v, causal, scale, config, draws)


def _take(t, index):
    """``t[:, :, index]`` for ascending ``index``: a view when it is a contiguous range."""
    n = len(index)
    start = int(index[0]) if n else 0
    if n == 0 or int(index[-1]) - start + 1 == n:
        return t[:, :, start:start + n]
    return t.index_select(2, index)


def _run_pieces(q, k, v, pieces, attend):
    """Output (B, H, Nq, Dv) of ``pieces``; rows in no piece are 0.

    Parameters
    ----------
    q, k, v : Tensor
        (B, H, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv).
    pieces : list of _Piece
    attend : callable
        ``attend(q, k, v, causal)`` for one piece.
    """
    nq = q.shape[2]
    if len(pieces) == 1 and len(pieces[0].rows) == nq:
        p = pieces[0]
        return attend(q, _take(k, p.keys), _take(v, p.keys), p.causal)
    out = q.new_zeros(q.shape[:3] + v.shape[3:])
    for p in pieces:
        out[:, :, p.rows] = attend(_take(q, p.rows), _take(k, p.keys), _take(v, p.keys), p.causal)
    return out


def _hyper_forward(query, key, value, attention_mask, causal, attend):
    """HyperAttention (B, H, Nq, Dv) of a call with or without a mask (see the module notes)."""
    b, _, nq, _ = query.shape
    nk = key.shape[2]
    if b == 0 or nq == 0:
        return query.new_zeros(query.shape[:3] + value.shape[3:])
    if attention_mask is None:
        return _run_pieces(query, key, value, _unmasked_pieces(nq, nk, causal, query.device), attend)
    allowed = _allowed_keys(attention_mask, b, nq, nk)
    if allowed.shape[0] == 1:  # one mask for the whole batch
        return _run_pieces(query, key, value, _mask_pieces(allowed[0]), attend)
    return torch.cat([_run_pieces(query[i:i + 1], key[i:i + 1], value[i:i + 1], _mask_pieces(allowed[i]), attend)
                      for i in range(b)])


def make_attention_function(config: HyperConfig | None = None, *, layers=None, seed=0,
                            kernel_options: KernelOptions | Mapping | None = None):
    """The function to register: HyperAttention with ``config`` (default ``HyperConfig()``).

    Parameters
    ----------
    config : HyperConfig, optional
        Used unless a call passes ``hyper_config=...``.
    layers : set of int, optional
        Approximate only these layers (``module.layer_idx``); the others run exact SDPA.
    seed : int
        Seed of the draws (one stream per function).
    kernel_options : hyperref.gpu.KernelOptions or dict, optional
        Tuning switches of the Triton kernels, for CUDA tensors (the CPU reference has none).

    Returns
    -------
    callable
        ``f(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
        is_causal=None, **kwargs) -> (out, None)``, ``out`` of shape (B, Nq, H, Dv).
        ``is_causal`` defaults to ``module.is_causal`` (False when the module has none).
    """
    options = as_kernel_options(kernel_options)
    state = {"rng": np.random.default_rng(seed)}

    def hyper_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=None, is_causal=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = getattr(module, "layer_idx", None)
        if layers is not None and layer not in layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        _refuse_unsupported(dropout, kwargs, key.shape[2])
        cfg = kwargs.get("hyper_config") or config or HyperConfig()
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))

        def attend(q, k, v, piece_causal):
            return _attend(q, k, v, piece_causal, scaling, cfg, state["rng"], options)

        out = _hyper_forward(query, key, value, attention_mask, causal, attend)
        return out.transpose(1, 2).contiguous(), None

    return hyper_attention_forward


def register(config: HyperConfig | None = None, *, name: str = NAME, layers=None, seed=0,
             kernel_options: KernelOptions | Mapping | None = None) -> str:
    """Register HyperAttention as ``attn_implementation=name`` (default ``"hyper"``).

    Parameters
    ----------
    config : HyperConfig, optional
        Used unless a call passes ``hyper_config=...``.
    name : str
        The ``attn_implementation`` string.
    layers : set of int, optional
        Approximate only these layers (``module.layer_idx``); the others run exact SDPA.
    seed : int
        Seed of the draws (one stream per registration).
    kernel_options : hyperref.gpu.KernelOptions or dict, optional
        Tuning switches of the Triton kernels, for CUDA tensors (checked here).

    Returns
    -------
    str
        ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    function = make_attention_function(config, layers=layers, seed=seed, kernel_options=kernel_options)
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
