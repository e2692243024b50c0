"""HyperAttention in tiny random transformers decoders (Llama, Qwen2) and an encoder (BERT).

Every model is built from a small config (no downloads). In the exact limit
(``block`` >= every length, so each sortLSH block holds all keys) HyperAttention
is exact attention, so the logits must equal ``attn_implementation="sdpa"``'s:
plain causal, left and right padding, static-cache prefill, chunked prefill,
decode steps, greedy ``generate``. Marked ``real_model`` like test_real_model.py.
"""

import copy
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config,
    Qwen2ForCausalLM, StaticCache,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import hyperref.gpu.hf_attention as hf  # noqa: E402
from hyperref import HyperConfig, make_draws  # noqa: E402

pytestmark = pytest.mark.real_model

EXACT = HyperConfig(block=4096, samples=8, min_seq_len=8)  # sortLSH blocks hold every key: exact
NAME = "hyper_decoder_exact"
ATOL = 1e-4
DECODERS = ["llama", "qwen2"]
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, initializer_range=0.2)


def _config(kind):
    if kind == "llama":
        return LlamaConfig(**SIZES, num_key_value_heads=2, max_position_embeddings=256), LlamaForCausalLM
    if kind == "qwen2":
        return Qwen2Config(**SIZES, num_key_value_heads=2, max_position_embeddings=256), Qwen2ForCausalLM
    return BertConfig(**SIZES, max_position_embeddings=256, attention_probs_dropout_prob=0.0,
                      hidden_dropout_prob=0.0), BertModel


_MODELS = {}


def _pair(kind, dtype=torch.float32):
    """(sdpa model, the same weights with HyperAttention in the exact limit), built once per kind."""
    if (kind, dtype) not in _MODELS:
        cfg, cls = _config(kind)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        exact = cls(cfg).eval().to(dtype)
        hyper = copy.deepcopy(exact)
        hyper.set_attn_implementation(hf.register(EXACT, name=NAME))
        _MODELS[kind, dtype] = exact, hyper
    return _MODELS[kind, dtype]


def _ids(b, n, seed=1):
    return torch.randint(3, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _padding(b, n, side, pads=(5, 0, 11)):
    """A (b, n) attention mask with ``pads[i]`` padded positions on ``side`` of sequence i."""
    mask = torch.ones(b, n, dtype=torch.long)
    for i in range(b):
        p = pads[i % len(pads)]
        if p and side == "left":
            mask[i, :p] = 0
        elif p:
            mask[i, n - p:] = 0
    return mask


def _logits(model, **kw):
    if "past_key_values" in kw and "cache" in inspect.signature(model.forward).parameters:
        kw["cache"] = kw.pop("past_key_values")  # the newer name (transformers >= 5.2x)
    with torch.no_grad():
        out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_close(got, want, atol=ATOL):
    assert got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= atol, f"max |hyper - sdpa| = {err:.3g} > {atol}"


# ---------------------------------------------------------------------- forward passes


@pytest.mark.parametrize("kind", DECODERS)
def test_plain_causal_forward_matches_sdpa(kind):
    exact, hyper = _pair(kind)
    ids = _ids(2, 48)
    _assert_close(_logits(hyper, input_ids=ids), _logits(exact, input_ids=ids))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", DECODERS)
def test_padded_batch_forward_matches_sdpa(kind, side):
    # every position is compared: left-padded query rows see no key (0, as sdpa gives); right-padded
    # ones see every real key (as in sdpa)
    exact, hyper = _pair(kind)
    ids, mask = _ids(3, 40), _padding(3, 40, side)
    _assert_close(_logits(hyper, input_ids=ids, attention_mask=mask),
                  _logits(exact, input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_forward_matches_sdpa(padded):
    exact, hyper = _pair("bert")
    ids = _ids(3, 40)
    kw = dict(input_ids=ids, attention_mask=_padding(3, 40, "right") if padded else None)
    _assert_close(_logits(hyper, **kw), _logits(exact, **kw))


def _cache(kind, model, kind_of_cache, size=128):
    if kind_of_cache == "static":
        return StaticCache(config=model.config, max_cache_len=size)
    return DynamicCache(config=model.config)


@pytest.mark.parametrize("kind", DECODERS)
def test_static_cache_prefill_matches_sdpa(kind):
    # 64 queries, 128 keys (the cache size) and no mask: sdpa's is_causal is top-left aligned, so the
    # empty slots after the first 64 keys are seen by no query
    exact, hyper = _pair(kind)
    ids = _ids(2, 64)
    got = _logits(hyper, input_ids=ids, past_key_values=_cache(kind, hyper, "static"), use_cache=True)
    want = _logits(exact, input_ids=ids, past_key_values=_cache(kind, exact, "static"), use_cache=True)
    _assert_close(got, want)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_chunked_prefill_matches_sdpa(kind, cache, padded):
    # the second chunk has 24 queries on 64 keys: a bottom-right causal mask (plus padding)
    exact, hyper = _pair(kind)
    ids = _ids(2, 64)
    mask = _padding(2, 64, "left") if padded else None
    caches = {m: _cache(kind, m, cache) for m in (exact, hyper)}
    out = {}
    for model in (exact, hyper):
        first = dict(attention_mask=None if mask is None else mask[:, :40])
        _logits(model, input_ids=ids[:, :40], past_key_values=caches[model], use_cache=True, **first)
        out[model] = _logits(model, input_ids=ids[:, 40:], attention_mask=mask,
                             past_key_values=caches[model], use_cache=True)
    _assert_close(out[hyper], out[exact])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_decode_steps_match_sdpa(kind, cache, padded):
    # one query row per step, on a dynamic cache (no mask without padding) or a static one (a mask)
    exact, hyper = _pair(kind)
    ids = _ids(2, 24)
    mask = _padding(2, 24, "left") if padded else torch.ones(2, 24, dtype=torch.long)
    steps = _ids(2, 6, seed=2)
    caches = {m: _cache(kind, m, cache) for m in (exact, hyper)}
    logits = {}
    for model in (exact, hyper):
        kw = dict(attention_mask=mask) if padded else {}
        _logits(model, input_ids=ids, past_key_values=caches[model], use_cache=True, **kw)
        logits[model] = []
        for t in range(steps.shape[1]):
            full = torch.cat([mask, torch.ones(2, t + 1, dtype=torch.long)], dim=1)
            kw = dict(attention_mask=full) if padded else {}
            logits[model].append(_logits(model, input_ids=steps[:, t:t + 1], past_key_values=caches[model],
                                         use_cache=True, **kw))
    _assert_close(torch.cat(logits[hyper], 1), torch.cat(logits[exact], 1))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_on_left_padded_prompts_matches_sdpa(kind, cache_implementation):
    exact, hyper = _pair(kind)
    ids, mask = _ids(2, 20, seed=3), _padding(2, 20, "left", pads=(7, 0))
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation=cache_implementation)
    with torch.no_grad():
        want = exact.generate(ids, **kw)
        got = hyper.generate(ids, **kw)
    assert want.shape == (2, 28)
    assert torch.equal(got, want), (got[:, 20:], want[:, 20:])


@pytest.mark.parametrize("kind", DECODERS)
def test_bf16_model_on_cpu_matches_sdpa_bf16(kind):
    # computed in float32 and cast back: close to sdpa in bf16, and to the float32 model
    exact, hyper = _pair(kind, torch.bfloat16)
    ids, mask = _ids(2, 32), _padding(2, 32, "left")
    got = _logits(hyper, input_ids=ids, attention_mask=mask)
    assert got.dtype == torch.bfloat16
    want = _logits(exact, input_ids=ids, attention_mask=mask)
    reference = _logits(_pair(kind)[0], input_ids=ids, attention_mask=mask)
    _assert_close(got, want, atol=0.05 * reference.abs().max().item())
    # the bf16 weights alone move the logits from the float32 model's; HyperAttention adds little
    hyper_error, sdpa_error = ((x.float() - reference).abs().mean().item() for x in (got, want))
    assert hyper_error <= 1.5 * sdpa_error, (hyper_error, sdpa_error)


# ---------------------------------------------------------------------- the function on its own


def _module(causal, groups=1):
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = causal, groups
    return module


def _qkv(b, nq, nk, h=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, hk, nk, d, generator=g),
            torch.randn(b, hk, nk, d, generator=g))


def _bottom_right(b, nq, nk, pads=(0, 0), side="left"):
    """The (b, 1, nq, nk) boolean mask transformers builds: causal (bottom-right) plus padding."""
    i = torch.arange(nq)[:, None] + nk - nq
    mask = (torch.arange(nk)[None, :] <= i).expand(b, 1, nq, nk).clone()
    for s, p in enumerate(pads):
        if p and side == "left":
            mask[s, ..., :p] = False
        elif p:
            mask[s, ..., nk - p:] = False
    return mask


def _float(mask, masked=float("-inf")):
    return torch.zeros(mask.shape).masked_fill(~mask, masked)


MASKS = {
    "no mask, square": (32, 32, True, lambda: None),
    "no mask, static-cache prefill (nk > nq)": (16, 40, True, lambda: None),
    "no mask, nq > nk (top-left)": (40, 16, True, lambda: None),
    "no mask, one query row": (1, 20, True, lambda: None),
    "no mask, encoder": (20, 30, False, lambda: None),
    "chunk, left padding": (16, 48, True, lambda: _bottom_right(2, 16, 48, pads=(5, 0))),
    "square, right padding": (24, 24, True, lambda: _bottom_right(2, 24, 24, pads=(0, 7), side="right")),
    "chunk, float -inf": (16, 48, True, lambda: _float(_bottom_right(2, 16, 48, pads=(5, 9)))),
    "chunk, float min": (16, 48, True,
                         lambda: _float(_bottom_right(2, 16, 48, (3, 0)), torch.finfo(torch.float32).min)),
    "decode, empty static slots": (1, 40, True, lambda: torch.arange(40).expand(2, 1, 1, 40) < 25),
    "per-head copies": (16, 16, True, lambda: _bottom_right(2, 16, 16, (4, 0)).expand(2, 4, 16, 16)),
    "one mask for the batch": (16, 16, True, lambda: _bottom_right(1, 16, 16, (4,))),
    "encoder padding": (20, 20, False, lambda: (torch.arange(20) < torch.tensor([[13], [20]]))[:, None, None]
                        .expand(2, 1, 20, 20)),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_function_matches_sdpa_on_each_mask_pattern(case):
    nq, nk, causal, make_mask = MASKS[case]
    q, k, v = _qkv(2, nq, nk)
    mask = make_mask()
    module = _module(causal, groups=2)
    got, _ = hf.make_attention_function(EXACT)(module, q, k, v, mask)
    want, _ = sdpa_attention_forward(module, q, k, v, mask)
    _assert_close(got, want, atol=1e-5)


def test_two_dimensional_padding_mask_drops_the_padded_keys():
    q, k, v = _qkv(2, 20, 20)
    keep = torch.arange(20) < torch.tensor([[13], [20]])
    fn = hf.make_attention_function(EXACT)
    got, _ = fn(_module(False), q, k, v, keep.long())
    want, _ = fn(_module(False), q, k, v, keep[:, None, None].expand(2, 1, 20, 20))
    _assert_close(got, want, atol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("sliding window", "not a prefix"),
    ("heads differ", "differ between heads"),
    ("additive bias", "additive attention biases"),
    ("keys seen shrink", "grow by one"),
    ("a row in the middle sees nothing", "grow by one"),
])
def test_masks_it_cannot_express_raise(case, match):
    q, k, v = _qkv(1, 16, 16)
    causal = _bottom_right(1, 16, 16)
    mask = {
        "sliding window": causal & (torch.arange(16)[None, :] > torch.arange(16)[:, None] - 4),
        "heads differ": torch.cat([causal.expand(1, 3, 16, 16), torch.ones(1, 1, 16, 16, dtype=torch.bool)], 1),
        "additive bias": _float(causal) + 0.5 * torch.randn(16, 16),
        "keys seen shrink": causal.flip(2),
        "a row in the middle sees nothing": causal & (torch.arange(16) != 5)[:, None],
    }[case]
    with pytest.raises(NotImplementedError, match=match):
        hf.make_attention_function(EXACT)(_module(True), q, k, v, mask)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 1, 5, 16), (2, 1, 16, 9), (2,)])
def test_masks_of_the_wrong_shape_are_refused(shape):
    q, k, v = _qkv(2, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        hf.make_attention_function(EXACT)(_module(True), q, k, v, torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("keyword, value", [
    ("softcap", 50.0), ("s_aux", "sinks"), ("sinks", "sinks"), ("position_bias", "bias"),
    ("sliding_window", 8), ("dropout", 0.1),
])
def test_keywords_that_change_the_math_are_refused_by_name(keyword, value):
    q, k, v = _qkv(1, 16, 16)
    value = torch.zeros(4) if value == "sinks" else torch.zeros(1, 4, 16, 16) if value == "bias" else value
    with pytest.raises(NotImplementedError, match=keyword):
        hf.make_attention_function(EXACT)(_module(True), q, k, v, None, **{keyword: value})


def test_harmless_keywords_are_accepted():
    q, k, v = _qkv(1, 16, 16)
    fn = hf.make_attention_function(EXACT)
    want, _ = fn(_module(True), q, k, v, None)
    got, weights = fn(_module(True), q, k, v, None, dropout=0.0, softcap=None, s_aux=None,
                      position_bias=None, sliding_window=None, position_ids=torch.arange(16)[None],
                      use_cache=True, output_attentions=False, cu_seq_lens_q=None, hyper_config=EXACT)
    assert weights is None
    _assert_close(got, want, atol=1e-6)
    got, _ = fn(_module(True), q, k, v, None, sliding_window=16)  # a window holding every key
    _assert_close(got, want, atol=1e-6)


def test_kernel_options_are_checked_at_registration():
    from hyperref import InputError

    with pytest.raises(InputError, match="unknown option"):
        hf.make_attention_function(EXACT, kernel_options={"tiles": 64})
    with pytest.raises(InputError, match="hash_rows must be a power of two"):
        hf.register(EXACT, name="hyper_bad_options", kernel_options={"hash_rows": 3})
    q, k, v = _qkv(1, 16, 16)
    want, _ = hf.make_attention_function(EXACT)(_module(True), q, k, v, None)
    got, _ = hf.make_attention_function(EXACT, kernel_options={"leaves": "triton"})(_module(True), q, k, v, None)
    _assert_close(got, want, atol=1e-6)


def test_a_model_with_logit_softcapping_is_refused():
    gemma2 = pytest.importorskip("transformers.models.gemma2")
    cfg = gemma2.Gemma2Config(**{**SIZES, "num_hidden_layers": 1}, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=256)
    cfg._attn_implementation = hf.register(EXACT, name=NAME)
    model = gemma2.Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="softcap"):
        _logits(model, input_ids=_ids(1, 16))


def test_a_model_with_an_active_sliding_window_is_refused():
    cfg = Qwen2Config(**{**SIZES, "num_hidden_layers": 1}, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=8, max_window_layers=0)
    cfg._attn_implementation = hf.register(EXACT, name=NAME)
    model = Qwen2ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="sliding_window"):
        _logits(model, input_ids=_ids(1, 16))


# ---------------------------------------------------------------------- gradients on the CPU


def test_grad_mode_forward_is_the_fast_reference_and_backward_matches_sdpa(monkeypatch):
    # the dense O(N^2) twin runs only in the backward (before: in every forward under grad mode)
    calls = []

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return dense(*args, **kwargs)

    dense = hf.gpu_attention
    monkeypatch.setattr(hf, "gpu_attention", counting)
    exact, hyper = (copy.deepcopy(m).train() for m in _pair("llama"))
    ids, mask = _ids(2, 32), _padding(2, 32, "left")
    losses = [m(input_ids=ids, attention_mask=mask, labels=ids).loss for m in (exact, hyper)]
    assert calls == []
    _assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    assert len(calls) == 2 * 2  # two layers, two sequences (per-sequence masks)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        want, got = (dict(m.named_parameters())[name].grad for m in (exact, hyper))
        _assert_close(got, want, atol=1e-4 * want.abs().max().item())


def test_grad_mode_forward_and_backward_are_those_of_the_estimator():
    # beyond the exact limit: the forward equals the no-grad forward (same seed, same draws) and the
    # gradients are those of the dense twin with those draws
    cfg = HyperConfig(block=16, samples=16, min_seq_len=16)
    q, k, v = _qkv(1, 64, 64, d=32, seed=4)
    with torch.no_grad():
        plain, _ = hf.make_attention_function(cfg, seed=3)(_module(True), q, k, v, None)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = hf.make_attention_function(cfg, seed=3)(_module(True), *leaves, None)
    _assert_close(out, plain, atol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    draws = make_draws(cfg, 64, 64, 32, causal=True, batch_shape=(1, 4), rng=np.random.default_rng(3))
    twin = [t.clone().requires_grad_() for t in (q, k, v)]
    want = hf.gpu_attention(*twin, causal=True, config=cfg, draws=draws, backend="dense")
    (want.transpose(1, 2) * weights).sum().backward()
    _assert_close(out, want.transpose(1, 2), atol=1e-5)
    for got_t, want_t in zip(leaves, twin):
        _assert_close(got_t.grad, want_t.grad, atol=1e-5)
