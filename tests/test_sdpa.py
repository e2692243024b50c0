"""``hyperref.gpu.scaled_dot_product_attention`` against torch's SDPA in the exact limit."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from hyperref import HyperConfig  # noqa: E402
from hyperref.gpu import scaled_dot_product_attention as hyper_sdpa  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention
EXACT = HyperConfig(block=4096, samples=8, min_seq_len=8)  # the sortLSH block holds every key


def _qkv(b=2, h=4, hk=4, nq=40, nk=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, hk, nk, d, generator=g),
            torch.randn(b, hk, nk, d, generator=g))


@pytest.mark.parametrize("nq, nk", [(40, 40), (24, 40), (40, 24)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_sdpa_with_its_alignment(nq, nk, is_causal):
    q, k, v = _qkv(nq=nq, nk=nk)
    want = SDPA(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(hyper_sdpa(q, k, v, is_causal=is_causal, config=EXACT), want,
                               atol=1e-5, rtol=1e-5)


def test_grouped_heads_and_scale():
    q, k, v = _qkv(h=6, hk=2)
    want = SDPA(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(hyper_sdpa(q, k, v, is_causal=True, scale=0.3, enable_gqa=True, config=EXACT),
                               want, atol=1e-5, rtol=1e-5)


def test_boolean_and_additive_masks():
    q, k, v = _qkv(nq=32, nk=48)
    keep = torch.ones(2, 1, 32, 48, dtype=torch.bool)
    keep[0, ..., 40:] = False  # key padding of the first sequence
    keep[1] &= torch.ones(32, 48, dtype=torch.bool).tril(16)  # bottom-right causal (chunked prefill)
    want = SDPA(q, k, v, attn_mask=keep)
    torch.testing.assert_close(hyper_sdpa(q, k, v, attn_mask=keep, config=EXACT), want, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(hyper_sdpa(q, k, v, attn_mask=additive, config=EXACT), want,
                               atol=1e-5, rtol=1e-5)


def test_refusals():
    q, k, v = _qkv(h=4, hk=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        hyper_sdpa(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="both"):
        hyper_sdpa(q, k, v, attn_mask=torch.ones(40, 40, dtype=torch.bool), is_causal=True)
    with pytest.raises(NotImplementedError, match="bias"):
        hyper_sdpa(q, k, v, attn_mask=torch.randn(40, 40))
    band = torch.ones(40, 40, dtype=torch.bool).tril() & ~torch.ones(40, 40, dtype=torch.bool).tril(-8)
    with pytest.raises(NotImplementedError, match="prefix"):
        hyper_sdpa(q, k, v, attn_mask=band, config=EXACT)


def test_generator_makes_it_reproducible():
    q, k, v = _qkv(nq=512, nk=512, b=1, h=1, hk=1)
    cfg = HyperConfig(block=64, samples=16, min_seq_len=64)
    a = hyper_sdpa(q, k, v, is_causal=True, config=cfg, generator=torch.Generator().manual_seed(3))
    b = hyper_sdpa(q, k, v, is_causal=True, config=cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_docstring_example():
    import doctest

    import hyperref.gpu.sdpa as module

    assert doctest.testmod(module).failed == 0


def test_kernel_options_are_checked_and_passed():
    # on the CPU the reference computes (no kernel options apply), but bad ones are refused there too
    from hyperref import InputError
    from hyperref.gpu import KernelOptions

    q, k, v = _qkv()
    with pytest.raises(InputError, match="unknown option"):
        hyper_sdpa(q, k, v, config=EXACT, kernel_options={"tile": 64})
    with pytest.raises(InputError, match="leaves must be one of"):
        hyper_sdpa(q, k, v, config=EXACT, kernel_options={"leaves": "fast"})
    torch.testing.assert_close(hyper_sdpa(q, k, v, is_causal=True, config=EXACT,
                                          kernel_options=KernelOptions(leaves="triton")),
                               SDPA(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
